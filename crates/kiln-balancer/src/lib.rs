//! The balancer: the stable front of a role. A TCP proxy on a listen
//! address whose backend set is read from a control directory and swapped
//! atomically while it runs, with connection draining.
//!
//! Control directory (`.kiln/balancers/<env>-<role>/`):
//! - `backends.json` — written by kiln (temp + rename): `{generation,
//!   backends: ["10.88.1.2:8080", ...]}`. The balancer checks it every
//!   [`POLL`] and switches in one step: new connections go only to the new
//!   set from then on.
//! - `status.json` — written by the balancer: the generation it serves and,
//!   per backend (current or draining), open connections and totals. kiln
//!   waits on it: for the switch to be acknowledged, and for a removed
//!   backend to drain before its server is destroyed.
//! - `pid`, `balancer.log`.
//!
//! Connections are spread round-robin; a backend that refuses a connection
//! is skipped for that connection (the next one is tried), so a server that
//! died between health checks costs a retry, not a failed request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

/// How often the control file is checked for a new backend set.
pub const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("cannot listen on {addr}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot {op} {}", path.display())]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("balancer at {} did not {what} within {secs}s", dir.display())]
    Timeout { dir: PathBuf, what: String, secs: u64 },
}

/// What kiln asks the balancer to serve.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backends {
    pub generation: u64,
    pub backends: Vec<String>,
}

/// Counters of one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub addr: String,
    /// Still receiving new connections.
    pub active: bool,
    /// Connections open right now.
    pub open: u64,
    pub total: u64,
    /// Connections to it that failed (refused or reset before a reply).
    pub errors: u64,
}

/// What the balancer reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub listen: String,
    /// The generation of the backend set it serves.
    pub generation: u64,
    pub backends: Vec<BackendStatus>,
    /// Client connections that found no backend to take them.
    pub rejected: u64,
    /// Increases with every write, so a reader can wait for a fresh one.
    pub seq: u64,
}

#[derive(Default)]
struct Counters {
    open: AtomicU64,
    total: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    generation: AtomicU64,
    /// The set new connections may use, swapped whole.
    current: Mutex<Arc<Vec<SocketAddr>>>,
    counters: Mutex<BTreeMap<SocketAddr, Arc<Counters>>>,
    next: AtomicUsize,
    rejected: AtomicU64,
    seq: AtomicU64,
}

pub fn backends_path(dir: &Path) -> PathBuf {
    dir.join("backends.json")
}

pub fn status_path(dir: &Path) -> PathBuf {
    dir.join("status.json")
}

/// Writes a file through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BalancerError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|source| BalancerError::Io { op: "write", path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| BalancerError::Io { op: "rename", path: path.to_path_buf(), source })
}

/// Sets the backends (kiln's side). Returns the new generation.
pub fn set_backends(dir: &Path, backends: &[String]) -> Result<u64, BalancerError> {
    std::fs::create_dir_all(dir).map_err(|source| BalancerError::Io { op: "create", path: dir.to_path_buf(), source })?;
    let generation = read_backends(dir).map(|b| b.generation).unwrap_or(0) + 1;
    let b = Backends { generation, backends: backends.to_vec() };
    write_atomic(&backends_path(dir), &serde_json::to_vec(&b).expect("serializes"))?;
    Ok(generation)
}

pub fn read_backends(dir: &Path) -> Option<Backends> {
    std::fs::read(backends_path(dir)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

pub fn read_status(dir: &Path) -> Option<Status> {
    std::fs::read(status_path(dir)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

/// Waits until the balancer serves `generation` (kiln's side).
pub fn wait_generation(dir: &Path, generation: u64, timeout: Duration) -> Result<Status, BalancerError> {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = read_status(dir) {
            if s.generation >= generation {
                return Ok(s);
            }
        }
        if start.elapsed() > timeout {
            return Err(BalancerError::Timeout { dir: dir.to_path_buf(), what: format!("switch to backend set {generation}"), secs: timeout.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `addr` has no open connection (or the timeout passes:
/// draining is bounded). Returns whether it drained fully.
pub fn wait_drained(dir: &Path, addr: &str, timeout: Duration) -> bool {
    let start = std::time::Instant::now();
    // Only a status written after this call started counts: counters in an
    // older one may predate the last connections to `addr`.
    let from = read_status(dir).map(|s| s.seq).unwrap_or(0);
    loop {
        let status = read_status(dir).filter(|s| s.seq >= from + 2);
        let open = status.as_ref().map(|s| s.backends.iter().find(|b| b.addr == addr).map(|b| b.open).unwrap_or(0));
        if open == Some(0) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a balancer until the process is told to stop (SIGTERM/SIGINT).
pub async fn run(listen: &str, dir: PathBuf) -> Result<(), BalancerError> {
    let listener = TcpListener::bind(listen).await.map_err(|source| BalancerError::Listen { addr: listen.to_string(), source })?;
    let shared = Arc::new(Shared {
        generation: AtomicU64::new(0),
        current: Mutex::new(Arc::new(Vec::new())),
        counters: Mutex::new(BTreeMap::new()),
        next: AtomicUsize::new(0),
        rejected: AtomicU64::new(0),
        seq: AtomicU64::new(0),
    });
    std::fs::write(dir.join("pid"), std::process::id().to_string()).map_err(|source| BalancerError::Io { op: "write", path: dir.join("pid"), source })?;
    load(&shared, &dir, listen);
    let watcher = {
        let shared = shared.clone();
        let dir = dir.clone();
        let listen = listen.to_string();
        tokio::spawn(async move {
            let mut last_mtime: Option<SystemTime> = None;
            let mut ticks = 0u32;
            loop {
                tokio::time::sleep(POLL).await;
                let mtime = std::fs::metadata(backends_path(&dir)).and_then(|m| m.modified()).ok();
                ticks += 1;
                if mtime != last_mtime {
                    last_mtime = mtime;
                    load(&shared, &dir, &listen);
                } else if ticks % 2 == 0 {
                    // Counters change with traffic: refresh them every 20 ms.
                    write_status(&shared, &dir, &listen);
                }
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|source| BalancerError::Io { op: "watch signals of", path: dir.clone(), source })?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move { proxy(client, shared).await });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    watcher.abort();
    Ok(())
}

/// Loads `backends.json` if it names a newer generation, and switches.
fn load(shared: &Shared, dir: &Path, listen: &str) {
    if let Some(b) = read_backends(dir) {
        if b.generation > shared.generation.load(Ordering::SeqCst) || shared.generation.load(Ordering::SeqCst) == 0 {
            let addrs: Vec<SocketAddr> = b.backends.iter().filter_map(|a| a.parse().ok()).collect();
            {
                let mut counters = shared.counters.lock().expect("counters");
                for a in &addrs {
                    counters.entry(*a).or_default();
                }
                // Forget drained backends that are no longer wanted.
                counters.retain(|a, c| addrs.contains(a) || c.open.load(Ordering::SeqCst) > 0);
            }
            *shared.current.lock().expect("current") = Arc::new(addrs);
            shared.generation.store(b.generation, Ordering::SeqCst);
        }
    }
    write_status(shared, dir, listen);
}

fn write_status(shared: &Shared, dir: &Path, listen: &str) {
    let current = shared.current.lock().expect("current").clone();
    let backends = shared
        .counters
        .lock()
        .expect("counters")
        .iter()
        .map(|(a, c)| BackendStatus {
            addr: a.to_string(),
            active: current.contains(a),
            open: c.open.load(Ordering::SeqCst),
            total: c.total.load(Ordering::SeqCst),
            errors: c.errors.load(Ordering::SeqCst),
        })
        .collect();
    let seq = shared.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let status = Status { pid: std::process::id(), listen: listen.to_string(), generation: shared.generation.load(Ordering::SeqCst), backends, rejected: shared.rejected.load(Ordering::SeqCst), seq };
    let _ = write_atomic(&status_path(dir), &serde_json::to_vec(&status).expect("serializes"));
}

async fn proxy(mut client: TcpStream, shared: Arc<Shared>) {
    let set = shared.current.lock().expect("current").clone();
    if set.is_empty() {
        shared.rejected.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let start = shared.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..set.len() {
        let addr = set[(start + i) % set.len()];
        let counters = shared.counters.lock().expect("counters").entry(addr).or_default().clone();
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                let _ = client.set_nodelay(true);
                counters.open.fetch_add(1, Ordering::SeqCst);
                counters.total.fetch_add(1, Ordering::Relaxed);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                counters.open.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            _ => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    shared.rejected.fetch_add(1, Ordering::Relaxed);
}
