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
//!
//! Active health checks: when kiln passes the role's HTTP or TCP check in
//! `backends.json`, every backend is probed each `interval_ms`; one failing
//! `fall` checks in a row is taken out of rotation (its open connections
//! finish), and put back after `rise` passing ones. If every backend is
//! down the balancer fails open and uses them all: a broken health endpoint
//! must not turn into a full outage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

/// How often the control file is checked for a new backend set.
pub const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("balancer at {} did not {what} within {secs}s", dir.display())]
    Timeout {
        dir: PathBuf,
        what: String,
        secs: u64,
    },
}

/// What kiln asks the balancer to serve.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backends {
    pub generation: u64,
    pub backends: Vec<String>,
    /// The active health check of every backend, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

/// An active health check the balancer runs against each backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub probe: Probe,
    /// Time between two checks of a backend.
    pub interval_ms: u64,
    /// Consecutive failures that take a backend out of rotation.
    pub fall: u32,
    /// Consecutive passes that put it back.
    pub rise: u32,
}

/// What a check does, against the backend's IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// `GET path` must answer 2xx or 3xx.
    Http { path: String, port: u16 },
    /// A TCP connection must be accepted.
    Tcp { port: u16 },
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
    /// Passing its active health checks (always true without checks).
    #[serde(default = "yes")]
    pub healthy: bool,
    /// Active health checks it failed, in total.
    #[serde(default)]
    pub checks_failed: u64,
    /// Responses that began with an HTTP 5xx status line (the first
    /// response of each connection is looked at).
    #[serde(default)]
    pub responses_5xx: u64,
}

fn yes() -> bool {
    true
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
    /// Connections sent to failing backends because every backend was down.
    #[serde(default)]
    pub failed_open: u64,
    /// Increases with every write, so a reader can wait for a fresh one.
    pub seq: u64,
}

#[derive(Default)]
struct Counters {
    open: AtomicU64,
    total: AtomicU64,
    errors: AtomicU64,
    /// Responses that began with an HTTP 5xx status line.
    responses_5xx: AtomicU64,
    /// Out of rotation by the active health check.
    down: AtomicBool,
    /// Consecutive failed (while up) or passed (while down) checks.
    streak: AtomicU32,
    checks_failed: AtomicU64,
}

struct Shared {
    generation: AtomicU64,
    /// The set new connections may use, swapped whole.
    current: Mutex<Arc<Vec<SocketAddr>>>,
    counters: Mutex<BTreeMap<SocketAddr, Arc<Counters>>>,
    next: AtomicUsize,
    rejected: AtomicU64,
    failed_open: AtomicU64,
    seq: AtomicU64,
    check: Mutex<Option<Check>>,
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
    std::fs::write(&tmp, bytes).map_err(|source| BalancerError::Io {
        op: "write",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| BalancerError::Io {
        op: "rename",
        path: path.to_path_buf(),
        source,
    })
}

/// Sets the backends and their health check (kiln's side). Returns the new
/// generation.
pub fn set_backends(
    dir: &Path,
    backends: &[String],
    check: Option<&Check>,
) -> Result<u64, BalancerError> {
    std::fs::create_dir_all(dir).map_err(|source| BalancerError::Io {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    let generation = read_backends(dir).map(|b| b.generation).unwrap_or(0) + 1;
    let b = Backends {
        generation,
        backends: backends.to_vec(),
        check: check.cloned(),
    };
    write_atomic(
        &backends_path(dir),
        &serde_json::to_vec(&b).expect("serializes"),
    )?;
    Ok(generation)
}

pub fn read_backends(dir: &Path) -> Option<Backends> {
    std::fs::read(backends_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

pub fn read_status(dir: &Path) -> Option<Status> {
    std::fs::read(status_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Waits until the balancer serves `generation` (kiln's side).
pub fn wait_generation(
    dir: &Path,
    generation: u64,
    timeout: Duration,
) -> Result<Status, BalancerError> {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = read_status(dir) {
            if s.generation >= generation {
                return Ok(s);
            }
        }
        if start.elapsed() > timeout {
            return Err(BalancerError::Timeout {
                dir: dir.to_path_buf(),
                what: format!("switch to backend set {generation}"),
                secs: timeout.as_secs(),
            });
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
        let open = status.as_ref().map(|s| {
            s.backends
                .iter()
                .find(|b| b.addr == addr)
                .map(|b| b.open)
                .unwrap_or(0)
        });
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
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| BalancerError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let shared = Arc::new(Shared {
        generation: AtomicU64::new(0),
        current: Mutex::new(Arc::new(Vec::new())),
        counters: Mutex::new(BTreeMap::new()),
        next: AtomicUsize::new(0),
        rejected: AtomicU64::new(0),
        failed_open: AtomicU64::new(0),
        seq: AtomicU64::new(0),
        check: Mutex::new(None),
    });
    std::fs::write(dir.join("pid"), std::process::id().to_string()).map_err(|source| {
        BalancerError::Io {
            op: "write",
            path: dir.join("pid"),
            source,
        }
    })?;
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
                let mtime = std::fs::metadata(backends_path(&dir))
                    .and_then(|m| m.modified())
                    .ok();
                ticks += 1;
                if mtime != last_mtime {
                    last_mtime = mtime;
                    load(&shared, &dir, &listen);
                } else if ticks.is_multiple_of(2) {
                    // Counters change with traffic: refresh them every 20 ms.
                    write_status(&shared, &dir, &listen);
                }
            }
        })
    };
    let checker = tokio::spawn(check_loop(shared.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| BalancerError::Io {
            op: "watch signals of",
            path: dir.clone(),
            source,
        })?;
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
    checker.abort();
    Ok(())
}

/// Loads `backends.json` if it names a newer generation, and switches.
fn load(shared: &Shared, dir: &Path, listen: &str) {
    if let Some(b) = read_backends(dir) {
        if b.generation > shared.generation.load(Ordering::SeqCst)
            || shared.generation.load(Ordering::SeqCst) == 0
        {
            let addrs: Vec<SocketAddr> = b.backends.iter().filter_map(|a| a.parse().ok()).collect();
            {
                let mut counters = shared.counters.lock().expect("counters");
                for a in &addrs {
                    // kiln switches only to servers it found healthy.
                    let c = counters.entry(*a).or_default();
                    c.down.store(false, Ordering::SeqCst);
                    c.streak.store(0, Ordering::SeqCst);
                }
                // Forget drained backends that are no longer wanted.
                counters.retain(|a, c| addrs.contains(a) || c.open.load(Ordering::SeqCst) > 0);
            }
            *shared.current.lock().expect("current") = Arc::new(addrs);
            *shared.check.lock().expect("check") = b.check.clone();
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
            healthy: !c.down.load(Ordering::SeqCst),
            checks_failed: c.checks_failed.load(Ordering::SeqCst),
            responses_5xx: c.responses_5xx.load(Ordering::SeqCst),
        })
        .collect();
    let seq = shared.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let status = Status {
        pid: std::process::id(),
        listen: listen.to_string(),
        generation: shared.generation.load(Ordering::SeqCst),
        backends,
        rejected: shared.rejected.load(Ordering::SeqCst),
        failed_open: shared.failed_open.load(Ordering::SeqCst),
        seq,
    };
    let _ = write_atomic(
        &status_path(dir),
        &serde_json::to_vec(&status).expect("serializes"),
    );
}

async fn proxy(mut client: TcpStream, shared: Arc<Shared>) {
    let set = shared.current.lock().expect("current").clone();
    if set.is_empty() {
        shared.rejected.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Backends failing their health checks are skipped, unless all are.
    let up: Vec<(SocketAddr, Arc<Counters>)> = {
        let mut counters = shared.counters.lock().expect("counters");
        set.iter()
            .map(|a| (*a, counters.entry(*a).or_default().clone()))
            .collect()
    };
    let healthy: Vec<&(SocketAddr, Arc<Counters>)> = up
        .iter()
        .filter(|(_, c)| !c.down.load(Ordering::Relaxed))
        .collect();
    let order: Vec<&(SocketAddr, Arc<Counters>)> = if healthy.is_empty() {
        shared.failed_open.fetch_add(1, Ordering::Relaxed);
        up.iter().collect()
    } else {
        healthy
    };
    let start = shared.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..order.len() {
        let (addr, counters) = order[(start + i) % order.len()];
        let (addr, counters) = (*addr, counters.clone());
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                let _ = client.set_nodelay(true);
                counters.open.fetch_add(1, Ordering::SeqCst);
                counters.total.fetch_add(1, Ordering::Relaxed);
                relay(&mut client, &mut upstream, &counters).await;
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

/// Relays a connection both ways (as `copy_bidirectional` does, each side
/// shut down when the other ends) and looks at the first bytes the backend
/// sends: an HTTP status line of 5xx counts as a failed response, which the
/// canary gate's error rate includes. Only the first response of a
/// connection is seen; the bytes themselves pass untouched.
async fn relay(client: &mut TcpStream, upstream: &mut TcpStream, counters: &Counters) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.split();
    let (mut from_backend, mut to_backend) = upstream.split();
    let up = async {
        let _ = tokio::io::copy(&mut from_client, &mut to_backend).await;
        let _ = to_backend.shutdown().await;
    };
    let down = async {
        let mut head = [0u8; 4096];
        let n = from_backend.read(&mut head).await?;
        if n > 0 {
            if status_code(&head[..n]).is_some_and(|c| c >= 500) {
                counters.responses_5xx.fetch_add(1, Ordering::Relaxed);
            }
            to_client.write_all(&head[..n]).await?;
            tokio::io::copy(&mut from_backend, &mut to_client).await?;
        }
        to_client.shutdown().await
    };
    let _ = tokio::join!(up, down);
}

/// The status code of an HTTP/1.x response from its first bytes
/// (`HTTP/1.1 503 ...`), or `None` if they are not a status line. The
/// balancer's checks, its 5xx counting and kiln's own probes all read
/// responses through this.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let code = head.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    (head.get(8) == Some(&b' ') && code.iter().all(u8::is_ascii_digit))
        .then(|| code.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0')))
}

/// A 2xx or 3xx status: what a health check accepts.
pub fn passes(head: &[u8]) -> bool {
    status_code(head).is_some_and(|c| (200..400).contains(&c))
}

/// Probes every backend of the current set each `interval_ms`, all at once,
/// and moves them in and out of rotation (`fall` / `rise`).
async fn check_loop(shared: Arc<Shared>) {
    loop {
        let check = shared.check.lock().expect("check").clone();
        let Some(check) = check else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let interval = Duration::from_millis(check.interval_ms.max(10));
        let set = shared.current.lock().expect("current").clone();
        let targets: Vec<(SocketAddr, Arc<Counters>)> = {
            let mut counters = shared.counters.lock().expect("counters");
            set.iter()
                .map(|a| (*a, counters.entry(*a).or_default().clone()))
                .collect()
        };
        // A check may take up to a second (two for long intervals): a busy
        // machine answering slowly is not a dead backend.
        let timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(2));
        let probes = targets.into_iter().map(|(addr, counters)| {
            let check = check.clone();
            tokio::spawn(async move {
                let ok = tokio::time::timeout(timeout, probe(addr, &check.probe))
                    .await
                    .unwrap_or(false);
                record(&counters, ok, &check, addr);
            })
        });
        let probes: Vec<_> = probes.collect();
        for p in probes {
            let _ = p.await;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Counts one check's outcome into the backend's streak and state.
fn record(c: &Counters, ok: bool, check: &Check, addr: SocketAddr) {
    if !ok {
        c.checks_failed.fetch_add(1, Ordering::Relaxed);
    }
    let down = c.down.load(Ordering::SeqCst);
    // The streak counts checks that argue for a change of state.
    if ok == down {
        let streak = c.streak.fetch_add(1, Ordering::SeqCst) + 1;
        let needed = if down { check.rise } else { check.fall }.max(1);
        if streak >= needed {
            c.down.store(!down, Ordering::SeqCst);
            c.streak.store(0, Ordering::SeqCst);
            if down {
                tracing::info!(%addr, "backend passes its health check again: back in rotation");
            } else {
                tracing::warn!(%addr, "backend fails its health check: out of rotation");
            }
        }
    } else {
        c.streak.store(0, Ordering::SeqCst);
    }
}

/// One health check against a backend's IP.
async fn probe(backend: SocketAddr, probe: &Probe) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    match probe {
        Probe::Tcp { port } => TcpStream::connect(SocketAddr::new(backend.ip(), *port))
            .await
            .is_ok(),
        Probe::Http { path, port } => {
            let Ok(mut s) = TcpStream::connect(SocketAddr::new(backend.ip(), *port)).await else {
                return false;
            };
            let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: kiln-balancer\r\nConnection: close\r\n\r\n", backend.ip());
            if s.write_all(req.as_bytes()).await.is_err() {
                return false;
            }
            // The status line is all that matters: `HTTP/1.x NNN ...`.
            let mut head = [0u8; 16];
            let mut got = 0;
            while got < 12 {
                match s.read(&mut head[got..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            passes(&head[..got])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend on `ip:port` that answers every request with `name`, with
    /// status 500 while `sick` is set.
    async fn backend(ip: &str, port: u16, name: &'static str, sick: Arc<AtomicBool>) -> SocketAddr {
        let l = TcpListener::bind((ip, port)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let sick = sick.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let status = if sick.load(Ordering::SeqCst) {
                        "500 Internal Server Error"
                    } else {
                        "200 OK"
                    };
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.0 {status}\r\nContent-Length: {}\r\n\r\n{name}",
                                name.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                });
            }
        });
        addr
    }

    async fn get(front: SocketAddr) -> String {
        let mut s = TcpStream::connect(front).await.unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Polls status.json (bounded) until `addr` reports `healthy`.
    async fn wait_health(dir: &Path, addr: SocketAddr, healthy: bool) {
        for _ in 0..1000 {
            if read_status(dir).is_some_and(|s| {
                s.backends
                    .iter()
                    .any(|b| b.addr == addr.to_string() && b.healthy == healthy)
            }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{addr} never had healthy = {healthy}: {:?}",
            read_status(dir)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_backends_leave_rotation_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a_sick, b_sick) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        // Two "servers" on one port at two loopback addresses, like a role's
        // servers on the bridge.
        let a = backend("127.0.0.2", 0, "a", a_sick.clone()).await;
        let b = backend("127.0.0.3", a.port(), "b", b_sick.clone()).await;
        let front = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let check = Check {
            probe: Probe::Http {
                path: "/healthz".into(),
                port: a.port(),
            },
            interval_ms: 20,
            fall: 2,
            rise: 2,
        };
        set_backends(dir.path(), &[a.to_string(), b.to_string()], Some(&check)).unwrap();
        let run_dir = dir.path().to_path_buf();
        tokio::spawn(async move { run(&front.to_string(), run_dir).await });
        wait_health(dir.path(), b, true).await;

        // `b` fails its checks: out of rotation, every request goes to `a`.
        b_sick.store(true, Ordering::SeqCst);
        wait_health(dir.path(), b, false).await;
        for _ in 0..20 {
            let reply = get(front).await;
            assert!(
                reply.starts_with("HTTP/1.0 200") && reply.ends_with("\r\n\r\na"),
                "{reply:?}"
            );
        }
        assert!(read_status(dir.path())
            .unwrap()
            .backends
            .iter()
            .any(|s| s.addr == b.to_string() && s.checks_failed >= 2));

        // Both fail: the balancer fails open instead of refusing everyone.
        a_sick.store(true, Ordering::SeqCst);
        wait_health(dir.path(), a, false).await;
        let replies: Vec<String> = sequential_gets(front, 4).await;
        assert!(
            replies.iter().all(|r| r.starts_with("HTTP/1.0 500")),
            "{replies:?}"
        );

        // `b` recovers: back in rotation after `rise` passing checks.
        b_sick.store(false, Ordering::SeqCst);
        wait_health(dir.path(), b, true).await;
        for _ in 0..20 {
            assert!(get(front).await.ends_with("\r\n\r\nb"));
        }
        let status = read_status(dir.path()).unwrap();
        assert!(status.failed_open >= 4, "{status:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_errors_are_counted_per_backend() {
        let dir = tempfile::tempdir().unwrap();
        let sick = Arc::new(AtomicBool::new(true));
        let b = backend("127.0.0.4", 0, "b", sick.clone()).await;
        let front = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        set_backends(dir.path(), &[b.to_string()], None).unwrap();
        let run_dir = dir.path().to_path_buf();
        tokio::spawn(async move { run(&front.to_string(), run_dir).await });
        for _ in 0..100 {
            if read_status(dir.path()).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Relayed untouched, and counted.
        for _ in 0..5 {
            assert!(get(front)
                .await
                .starts_with("HTTP/1.0 500 Internal Server Error\r\n"));
        }
        sick.store(false, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(get(front).await.ends_with("\r\n\r\nb"));
        }
        let counted = |s: &Status| {
            s.backends
                .iter()
                .find(|x| x.addr == b.to_string())
                .map(|x| (x.total, x.responses_5xx))
        };
        for _ in 0..200 {
            if read_status(dir.path()).as_ref().and_then(counted) == Some((8, 5)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("counters: {:?}", read_status(dir.path()));
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            status_code(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.0 200 OK"), Some(200));
        assert_eq!(status_code(b"HTTP/1.1 20"), None, "too short");
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert!(passes(b"HTTP/1.1 302 Found") && !passes(b"HTTP/1.1 404 Not Found"));
    }

    async fn sequential_gets(front: SocketAddr, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(get(front).await);
        }
        out
    }
}
