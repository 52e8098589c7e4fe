//! Bounds on concurrent work, per client address and in total: forwards in
//! flight, TCP connections open. A client over its share is refused at
//! once, so it cannot take the capacity every other client needs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Table {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub(crate) struct Limiter {
    per_source: usize,
    total: usize,
    table: Mutex<Table>,
}

/// One unit of work's place in the limits; released when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Arc<Limiter>,
    source: IpAddr,
}

impl Limiter {
    pub(crate) fn new(per_source: usize, total: usize) -> Limiter {
        Limiter {
            per_source,
            total,
            table: Mutex::new(Table::default()),
        }
    }

    /// A place for one more unit of work from `source`, if its share and
    /// the total allow.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Permit> {
        let mut t = self.table.lock().expect("limit table");
        let mine = t.by_source.get(&source).copied().unwrap_or(0);
        if mine >= self.per_source || t.total >= self.total {
            return None;
        }
        t.total += 1;
        *t.by_source.entry(source).or_insert(0) += 1;
        Some(Permit {
            limiter: self.clone(),
            source,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut t = self.limiter.table.lock().expect("limit table");
        t.total -= 1;
        if let Some(n) = t.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                t.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_total_are_enforced_and_released() {
        let l = Arc::new(Limiter::new(2, 3));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none(), "over a's share");
        let _b1 = l.admit(b).unwrap();
        assert!(l.admit(b).is_none(), "over the total");
        drop(a1);
        assert!(l.admit(b).is_some());
    }
}
