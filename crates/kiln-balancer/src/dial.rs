//! Connecting to a backend, with hedged attempts.
//!
//! A backend whose accept queue is full drops the SYN, and the kernel sends
//! it again only after its initial retransmission timeout of one second: a
//! request that lands there waits a whole second for a backend that is
//! free again a few milliseconds later. (busybox httpd listens with a
//! backlog of 9; the bench saw ~75 dropped SYNs per backend in 5 s, which
//! put every front's p99 at one second.) So when a connection attempt has
//! not completed after a few times the backend's usual connect time, a
//! second attempt starts beside it, then a third, each gap twice the last;
//! the first to connect wins and the others are dropped (closed). Nothing
//! has been sent on any of them, so this is safe for every request.
//!
//! Hedging has a budget per backend: at most [`MAX_HEDGING`] connects to
//! it hedge at once. When its queue overflows, most extra SYNs are dropped
//! too, and each costs a socket, a connect and a close: unbounded, 256
//! clients on three busybox backends made 1.2–1.4 connects per request
//! (HAProxy: 0.98), a fifth of the balancer's CPU. A connect that finds no
//! budget keeps waiting on its first attempt and asks again at its next
//! hedge time.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// Attempts in flight at most for one connection.
const MAX_ATTEMPTS: u32 = 6;
/// The shortest wait before a second attempt.
const MIN_HEDGE: Duration = Duration::from_millis(20);
/// The longest: past this the kernel's own retransmission is near anyway.
const MAX_HEDGE: Duration = Duration::from_millis(400);
/// Connects to one backend hedging at the same time, at most.
pub(crate) const MAX_HEDGING: u32 = 4;

/// A backend's smoothed connect time (µs), for the hedge delay, and its
/// connects hedging now.
#[derive(Default)]
pub(crate) struct ConnectTime(AtomicU64, AtomicU32);

/// One connect's share of its backend's hedging budget, given back on drop.
struct Hedging<'a>(&'a AtomicU32);

impl Drop for Hedging<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectTime {
    /// Four times the usual connect time, within [MIN_HEDGE, MAX_HEDGE].
    fn hedge_after(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed).saturating_mul(4))
            .clamp(MIN_HEDGE, MAX_HEDGE)
    }

    /// A share of the hedging budget, if any is left.
    fn hedging(&self) -> Option<Hedging<'_>> {
        self.1
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_HEDGING).then_some(n + 1)
            })
            .ok()
            .map(|_| Hedging(&self.1))
    }

    /// Folds in one attempt's own duration (EWMA, 1/8 weight). A hedged
    /// connection's winner is timed from its own start, so a dropped SYN
    /// does not inflate the next hedge delay.
    fn record(&self, took: Duration) {
        let sample = took.as_micros().min(u128::from(u32::MAX)) as u64;
        let old = self.0.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.0.store(new, Ordering::Relaxed);
    }
}

/// How a connection is closed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Close {
    /// FIN, as usual.
    Normal,
    /// RST (`SO_LINGER` 0): no TIME_WAIT left on this host. For
    /// connections closed only once everything on them has been read.
    Reset,
}

/// A TCP connection to `addr` within `timeout`, hedged as described above,
/// and whether it was slow (its first attempt outlived the hedge delay: the
/// backend's accept queue was full). `hedges` counts the extra attempts
/// started. An attempt that connects but loses the race never carried a
/// byte and is reset.
pub(crate) async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    time: &ConnectTime,
    hedges: &prometheus::IntCounter,
    close: Close,
) -> io::Result<(TcpStream, bool)> {
    let attempt = move || async move {
        let start = Instant::now();
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // Set before connecting: an attempt dropped at any point after
        // its handshake is reset, never left in TIME_WAIT.
        socket.set_zero_linger()?;
        let stream = socket.connect(addr).await?;
        Ok::<_, io::Error>((stream, start.elapsed()))
    };
    let won = |(stream, took): (TcpStream, Duration), slow: bool| {
        time.record(took);
        if close == Close::Normal {
            // Back to the default: linger off, a FIN on close.
            #[allow(deprecated)]
            stream.set_linger(None)?;
        }
        Ok((stream, slow))
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut gap = time.hedge_after().min(timeout);
    // Most connects finish long before the first hedge: no task for them.
    let mut first = Box::pin(attempt());
    if let Ok(done) = tokio::time::timeout(gap, &mut first).await {
        return won(done?, false);
    }
    // Held until this connect is done; the losing attempts end with it.
    let _budget = loop {
        if let Some(b) = time.hedging() {
            break b;
        }
        gap = (gap * 2).min(MAX_HEDGE);
        tokio::select! {
            done = &mut first => return won(done?, true),
            _ = tokio::time::sleep(gap) => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
        }
    };
    let mut attempts = JoinSet::new();
    attempts.spawn(first);
    attempts.spawn(attempt());
    hedges.inc();
    let mut started = 2;
    gap *= 2;
    let mut next = tokio::time::Instant::now() + gap;
    loop {
        tokio::select! {
            done = attempts.join_next() => match done {
                Some(Ok(Ok(done))) => return won(done, true),
                // A refusal or unreachable network is an answer, unless
                // another attempt is still waiting.
                Some(Ok(Err(e))) if attempts.is_empty() => return Err(e),
                Some(Ok(Err(_))) => {}
                Some(Err(e)) if attempts.is_empty() => return Err(io::Error::other(e)),
                Some(Err(_)) => {}
                None => return Err(io::Error::other("no connection attempt left")),
            },
            _ = tokio::time::sleep_until(next), if started < MAX_ATTEMPTS => {
                attempts.spawn(attempt());
                hedges.inc();
                started += 1;
                gap *= 2;
                next += gap;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("hedges", "test").unwrap()
    }

    #[tokio::test]
    async fn a_listening_backend_connects_without_hedging() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (time, hedges) = (ConnectTime::default(), counter());
        let addr = l.local_addr().unwrap();
        let (_, slow) = connect(addr, Duration::from_secs(2), &time, &hedges, Close::Normal)
            .await
            .unwrap();
        assert!(!slow);
        assert_eq!(hedges.get(), 0);
        assert!(time.0.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_at_once() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (time, hedges) = (ConnectTime::default(), counter());
        let start = Instant::now();
        let e = connect(addr, Duration::from_secs(2), &time, &hedges, Close::Normal)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        // Not after the 2 s timeout (loose bound: CI machines are loaded).
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(hedges.get(), 0);
    }

    /// A listener whose accept queue is full drops SYNs: the hedged
    /// attempts connect once it has room, long before the kernel's
    /// one-second retransmission.
    #[tokio::test]
    async fn a_dropped_syn_is_hedged_long_before_the_retransmission() {
        // backlog 0: the queue holds one connection; fill it.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(50), TcpStream::connect(addr)).await
            {
                held.push(s);
            }
        }
        // Accept (free the queue) a little after the first attempt.
        let accepting = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let mut accepted = Vec::new();
            while let Ok(Ok((s, _))) =
                tokio::time::timeout(Duration::from_secs(3), listener.accept()).await
            {
                accepted.push(s);
            }
        });
        let (time, hedges) = (ConnectTime::default(), counter());
        let start = Instant::now();
        let (_, slow) = connect(addr, Duration::from_secs(3), &time, &hedges, Close::Normal)
            .await
            .unwrap();
        let took = start.elapsed();
        assert!(slow, "the backend's full queue is not reported");
        assert!(took < Duration::from_millis(900), "took {took:?}");
        assert!(hedges.get() >= 1, "no hedge needed: {took:?}");
        accepting.abort();
    }

    #[test]
    fn the_hedging_budget_is_bounded_and_given_back() {
        let time = ConnectTime::default();
        let held: Vec<_> = (0..MAX_HEDGING).map(|_| time.hedging().unwrap()).collect();
        assert!(time.hedging().is_none(), "over budget");
        drop(held);
        assert!(time.hedging().is_some());
    }
}
