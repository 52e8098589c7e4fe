//! The backend set a balancer serves: every known backend with its
//! counters, health and idle connections; the set new requests may use,
//! swapped whole on a switch; the choice of a backend; and the
//! `status.json` snapshot written from all of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::admit::{Limit, Queue};
use crate::control::{
    read_backends, status_path, write_atomic, Algorithm, BackendStatus, Check, Front, Status,
    TlsStatus,
};
use crate::dial::ConnectTime;
use crate::http::Pool;
use crate::metrics::{BackendMetrics, Metrics};

/// One backend: where it is, its counters and its idle HTTP connections.
pub(crate) struct Backend {
    pub addr: SocketAddr,
    pub m: BackendMetrics,
    /// Out of rotation by the active health check.
    pub down: AtomicBool,
    /// Consecutive failed (while up) or passed (while down) checks.
    pub streak: AtomicU32,
    /// HTTP responses it sent (TCP mode counts connections instead).
    pub answered: AtomicU64,
    /// In the served set (false while draining): only then are its
    /// connections kept for reuse.
    pub active: AtomicBool,
    pub pool: Pool,
    pub connect_time: ConnectTime,
    /// Requests it is given at once, learnt (see `admit`).
    pub limit: Limit,
    /// The balancer's queue, told when this backend has room again.
    pub queue: Arc<Queue>,
}

impl Backend {
    pub(crate) fn new(addr: SocketAddr, metrics: &Metrics, queue: Arc<Queue>) -> Backend {
        let m = metrics.backend(&addr.to_string());
        m.up.set(1);
        Backend {
            addr,
            limit: Limit::new(m.limit.clone()),
            m,
            down: AtomicBool::new(false),
            streak: AtomicU32::new(0),
            answered: AtomicU64::new(0),
            active: AtomicBool::new(true),
            pool: Pool::default(),
            connect_time: ConnectTime::default(),
            queue,
        }
    }

    pub fn is_up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// What a drain waits for.
    fn open(&self) -> u64 {
        (self.m.in_flight.get().max(0) + self.m.open.get().max(0)) as u64
    }

    /// How busy it is, for least-requests.
    pub fn load(&self) -> i64 {
        self.m.in_flight.get() + self.m.open.get()
    }
}

/// Everything the balancer's tasks share.
pub(crate) struct Fleet {
    pub listen: String,
    /// The set new requests may use, swapped whole.
    pub current: ArcSwap<Vec<Arc<Backend>>>,
    /// Every backend still known: the current set and draining ones.
    known: Mutex<BTreeMap<SocketAddr, Arc<Backend>>>,
    next: AtomicUsize,
    pub front: ArcSwap<Front>,
    pub check: ArcSwap<Option<Check>>,
    /// Backends checked otherwise than `check`.
    pub checks: ArcSwap<BTreeMap<SocketAddr, Option<Check>>>,
    pub generation: AtomicU64,
    seq: AtomicU64,
    pub metrics: Arc<Metrics>,
    pub tls: Mutex<Option<TlsStatus>>,
    /// Requests waiting for room on a backend.
    pub queue: Arc<Queue>,
}

impl Fleet {
    pub fn new(listen: &str) -> Fleet {
        let metrics = Metrics::new();
        Fleet {
            queue: Arc::new(Queue::new(metrics.queued.clone())),
            listen: listen.to_string(),
            current: ArcSwap::from_pointee(Vec::new()),
            known: Mutex::new(BTreeMap::new()),
            next: AtomicUsize::new(0),
            front: ArcSwap::from_pointee(Front::default()),
            check: ArcSwap::from_pointee(None),
            checks: ArcSwap::from_pointee(BTreeMap::new()),
            generation: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            metrics,
            tls: Mutex::new(None),
        }
    }

    /// Loads `backends.json` if it names a newer generation, and switches.
    /// Returns whether it switched.
    pub fn load(&self, dir: &Path) -> bool {
        let Some(b) = read_backends(dir) else {
            return false;
        };
        let served = self.generation.load(Ordering::SeqCst);
        if b.generation <= served && served != 0 {
            return false;
        }
        let addrs: Vec<SocketAddr> = b.backends.iter().filter_map(|a| a.parse().ok()).collect();
        let cap = b.front.max_requests;
        self.queue.set_timeout(b.front.queue_timeout_ms);
        let set: Vec<Arc<Backend>> = {
            let mut known = self.known.lock().expect("known");
            let set = addrs
                .iter()
                .map(|a| {
                    let b = known
                        .entry(*a)
                        .or_insert_with(|| {
                            Arc::new(Backend::new(*a, &self.metrics, self.queue.clone()))
                        })
                        .clone();
                    // kiln switches only to servers it found healthy.
                    b.down.store(false, Ordering::SeqCst);
                    b.streak.store(0, Ordering::SeqCst);
                    b.active.store(true, Ordering::SeqCst);
                    b.m.up.set(1);
                    b
                })
                .collect();
            for (a, b) in known.iter() {
                if !addrs.contains(a) {
                    // Draining: no new requests, and no idle connection
                    // kept open to a server about to stop.
                    b.active.store(false, Ordering::SeqCst);
                    b.pool.clear();
                    b.m.up.set(0);
                }
            }
            for b in known.values() {
                b.limit.set_cap(cap);
            }
            // Forget drained backends that are no longer wanted.
            known.retain(|a, b| {
                let keep = addrs.contains(a) || b.open() > 0;
                if !keep {
                    self.metrics.forget(&a.to_string());
                }
                keep
            });
            set
        };
        self.current.store(Arc::new(set));
        self.queue.changed();
        self.check.store(Arc::new(b.check.clone()));
        self.checks.store(Arc::new(
            b.checks
                .iter()
                .filter_map(|(a, c)| Some((a.parse().ok()?, c.clone())))
                .collect(),
        ));
        self.front.store(Arc::new(b.front.clone()));
        self.generation.store(b.generation, Ordering::SeqCst);
        self.metrics.generation.set(b.generation as i64);
        true
    }

    /// The first backend to try among `set`, by the front's algorithm,
    /// among those passing their checks (`None` if none does).
    pub fn pick(&self, set: &[Arc<Backend>], algorithm: Algorithm) -> Option<usize> {
        let n = set.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        match algorithm {
            Algorithm::RoundRobin => (0..n).map(|i| (start + i) % n).find(|&i| set[i].is_up()),
            Algorithm::LeastRequests => {
                let mut best: Option<(usize, i64)> = None;
                for i in (0..n).map(|i| (start + i) % n) {
                    if !set[i].is_up() {
                        continue;
                    }
                    let load = set[i].load();
                    if best.is_none_or(|(_, l)| load < l) {
                        best = Some((i, load));
                    }
                }
                best.map(|(i, _)| i)
            }
        }
    }

    /// A reading of every counter, as `status.json` has it.
    pub fn status(&self) -> Status {
        let current = self.current.load();
        let backends = self
            .known
            .lock()
            .expect("known")
            .values()
            .map(|b| {
                let r = |i: usize| b.m.responses[i].get();
                let in_flight = b.m.in_flight.get().max(0) as u64;
                BackendStatus {
                    addr: b.addr.to_string(),
                    active: current.iter().any(|c| c.addr == b.addr),
                    open: b.open(),
                    total: b.answered.load(Ordering::Relaxed) + b.m.connections.get(),
                    errors: b.m.errors.get(),
                    healthy: b.is_up(),
                    checks_failed: b.m.checks_failed.get(),
                    responses_1xx: r(0),
                    responses_2xx: r(1),
                    responses_3xx: r(2),
                    responses_4xx: r(3),
                    responses_5xx: r(4),
                    retries: b.m.retries.get(),
                    in_flight,
                }
            })
            .collect();
        Status {
            pid: std::process::id(),
            listen: self.listen.clone(),
            generation: self.generation.load(Ordering::SeqCst),
            backends,
            rejected: self.metrics.rejected.get(),
            failed_open: self.metrics.failed_open.get(),
            seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
            mode: self.front.load().mode,
            connections: self.metrics.client_connections.get().max(0) as u64,
            bad_requests: self.metrics.bad_requests.get(),
            tls: self.tls.lock().expect("tls").clone(),
        }
    }

    pub fn write_status(&self, dir: &Path) {
        let status = self.status();
        let _ = write_atomic(
            &status_path(dir),
            &serde_json::to_vec(&status).expect("serializes"),
        );
    }

    /// Records a TLS event into the status.
    pub fn set_tls(&self, f: impl FnOnce(&mut TlsStatus)) {
        let mut tls = self.tls.lock().expect("tls");
        f(tls.get_or_insert_with(TlsStatus::default));
    }
}
