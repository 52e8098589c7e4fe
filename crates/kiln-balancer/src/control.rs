//! The control directory: the contract between kiln and a running
//! balancer. kiln writes `backends.json` (what to serve, and how); the
//! balancer writes `status.json` (what it serves, and every counter). Both
//! are whole files replaced by a rename, so a reader never sees half of one.
//!
//! Everything here runs on kiln's side too (the local provider, the engine's
//! canary gate, `kiln server list`), so it is plain blocking code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::BalancerError;

/// What kiln asks the balancer to serve.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backends {
    pub generation: u64,
    pub backends: Vec<String>,
    /// The active health check of every backend, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// Backends checked otherwise than `check` (`null`: not checked):
    /// during a rollout that changes the health check, each server is
    /// checked as its own release declares.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, Option<Check>>,
    /// How the front speaks to clients. Absent in files written before
    /// HTTP mode existed, which therefore keep today's TCP behaviour.
    #[serde(default)]
    pub front: Front,
}

/// How the balancer fronts its backends: protocol, choice of backend, TLS
/// and the metrics listener. Changes apply to new client connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Front {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// TLS termination on the listen address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// `IP:PORT` of the admin listener serving Prometheus metrics at
    /// `/metrics` (and `status.json` at `/status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// HTTP mode: requests each backend is given at once at most; its
    /// learnt limit stays at or below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// HTTP mode: how long a request may wait for room before a 503
    /// (default 5 s; 0: not at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_ms: Option<u64>,
}

/// The protocol the front speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// HTTP/1.1 (and HTTP/2 over TLS) with clients, a backend chosen per
    /// request, pooled backend connections, retries, every response counted.
    Http,
    /// One backend connection per client connection, bytes relayed as they
    /// are (databases and other non-HTTP roles).
    #[default]
    Tcp,
}

/// How a backend is chosen for a request (HTTP) or connection (TCP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    /// The backend with the fewest requests (or connections) in flight;
    /// ties go round robin.
    LeastRequests,
}

/// Where the certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tls {
    /// PEM files, re-read when they change (absolute paths).
    Files { cert: PathBuf, key: PathBuf },
    /// Obtained and renewed from an ACME server.
    Acme(Acme),
}

/// An ACME account and the names to certify. The account key and the
/// certificate live in the control directory (`acme/`, mode 0600).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acme {
    /// The directory URL, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    pub email: String,
    pub domains: Vec<String>,
    /// A PEM root certificate to trust for the directory (a private ACME
    /// server); the public web roots otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Renew when the certificate has less than this left.
    #[serde(default = "thirty_days")]
    pub renew_before_secs: u64,
    /// How often the certificate's remaining lifetime is looked at, and how
    /// long to wait before trying again after a failed order.
    #[serde(default = "one_hour")]
    pub check_interval_ms: u64,
}

fn thirty_days() -> u64 {
    30 * 86_400
}

fn one_hour() -> u64 {
    3_600_000
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
    /// `GET path` must answer 2xx or 3xx. Port 0 is the backend's own.
    Http { path: String, port: u16 },
    /// A TCP connection must be accepted. Port 0 is the backend's own.
    Tcp { port: u16 },
}

/// Counters of one backend, as `status.json` reports them. The same
/// numbers are served as Prometheus metrics on the admin listener.
///
/// The canary gate's error rate is `(errors + responses_5xx) / (total +
/// errors)`: every attempt either got a response (`total`) or failed at the
/// transport level (`errors`), so in HTTP mode every response counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub addr: String,
    /// Still receiving new requests or connections (false while draining).
    pub active: bool,
    /// What a drain waits for: requests in flight (HTTP mode) plus client
    /// connections relayed to it (TCP mode).
    pub open: u64,
    /// HTTP mode: responses it sent (any status). TCP mode: connections
    /// it accepted.
    pub total: u64,
    /// Attempts that failed at the transport level: connection refused or
    /// timed out, or reset before a response.
    pub errors: u64,
    /// Passing its active health checks (always true without checks).
    #[serde(default = "yes")]
    pub healthy: bool,
    /// Active health checks it failed, in total.
    #[serde(default)]
    pub checks_failed: u64,
    /// Responses by status class. In HTTP mode every response is counted;
    /// in TCP mode the first response of each connection.
    #[serde(default)]
    pub responses_1xx: u64,
    #[serde(default)]
    pub responses_2xx: u64,
    #[serde(default)]
    pub responses_3xx: u64,
    #[serde(default)]
    pub responses_4xx: u64,
    #[serde(default)]
    pub responses_5xx: u64,
    /// Requests that failed on it and were sent to another backend.
    #[serde(default)]
    pub retries: u64,
    /// HTTP requests in flight on it right now.
    #[serde(default)]
    pub in_flight: u64,
}

fn yes() -> bool {
    true
}

/// The certificate being served, and the last refusal, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsStatus {
    /// `files` or `acme`.
    pub source: String,
    /// DNS names of the served certificate (empty until one is served).
    pub names: Vec<String>,
    /// Serial number of the served certificate, hex.
    pub serial: String,
    /// Its expiry, seconds since the Unix epoch.
    pub not_after: i64,
    /// Why the last new certificate (files changed, ACME order) was
    /// refused; the previous one is still served. Cleared by a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Certificates installed since the balancer started (reloads and
    /// renewals included).
    pub loaded: u64,
}

/// What the balancer reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub listen: String,
    /// The generation of the backend set it serves.
    pub generation: u64,
    pub backends: Vec<BackendStatus>,
    /// TCP mode: client connections that found no backend to take them.
    /// HTTP mode: requests answered 503 because no backend was up.
    pub rejected: u64,
    /// TCP mode: connections sent to failing backends because every
    /// backend was down.
    #[serde(default)]
    pub failed_open: u64,
    /// Increases with every write, so a reader can wait for a fresh one.
    pub seq: u64,
    #[serde(default)]
    pub mode: Mode,
    /// Client connections open right now.
    #[serde(default)]
    pub connections: u64,
    /// Malformed client requests answered 400 (or 431) and closed.
    #[serde(default)]
    pub bad_requests: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
}

pub fn backends_path(dir: &Path) -> PathBuf {
    dir.join("backends.json")
}

pub fn status_path(dir: &Path) -> PathBuf {
    dir.join("status.json")
}

/// Writes a file through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BalancerError> {
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

/// Sets the backends and their health check (kiln's side), keeping the
/// front settings (mode, TLS, ...) the control file already has. Returns
/// the new generation.
pub fn set_backends(
    dir: &Path,
    backends: &[String],
    check: Option<&Check>,
) -> Result<u64, BalancerError> {
    let front = read_backends(dir).map(|b| b.front).unwrap_or_default();
    set_backends_with(dir, backends, check, &front)
}

/// Sets the backends, their health check and the front settings (kiln's
/// side). Returns the new generation.
pub fn set_backends_with(
    dir: &Path,
    backends: &[String],
    check: Option<&Check>,
    front: &Front,
) -> Result<u64, BalancerError> {
    set_backends_checked(dir, backends, check, &BTreeMap::new(), front)
}

/// [`set_backends_with`], with backends whose own check differs from
/// `check` (`None`: that backend is not checked).
pub fn set_backends_checked(
    dir: &Path,
    backends: &[String],
    check: Option<&Check>,
    checks: &BTreeMap<String, Option<Check>>,
    front: &Front,
) -> Result<u64, BalancerError> {
    store_backends(
        dir,
        Backends {
            generation: 0,
            backends: backends.to_vec(),
            check: check.cloned(),
            checks: checks.clone(),
            front: front.clone(),
        },
    )
}

/// Writes `b` as the next generation of the control file (its own
/// `generation` is ignored) and returns that generation. Both kiln's side
/// and the balancer's control channel (`remote.rs`) write through it.
pub fn store_backends(dir: &Path, mut b: Backends) -> Result<u64, BalancerError> {
    std::fs::create_dir_all(dir).map_err(|source| BalancerError::Io {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    b.generation = read_backends(dir).map(|b| b.generation).unwrap_or(0) + 1;
    write_atomic(
        &backends_path(dir),
        &serde_json::to_vec(&b).expect("serializes"),
    )?;
    Ok(b.generation)
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
    wait_generation_with(|| read_status(dir), generation, timeout).ok_or_else(|| {
        BalancerError::Timeout {
            dir: dir.to_path_buf(),
            what: format!("switch to backend set {generation}"),
            secs: timeout.as_secs(),
        }
    })
}

/// [`wait_generation`] with the status read by `read` (a file, or a
/// balancer's control channel); `None` on timeout.
pub fn wait_generation_with(
    mut read: impl FnMut() -> Option<Status>,
    generation: u64,
    timeout: Duration,
) -> Option<Status> {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = read() {
            if s.generation >= generation {
                return Some(s);
            }
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `addr` has nothing open (no request in flight, no relayed
/// connection), or the timeout passes: draining is bounded. Returns
/// whether it drained fully.
pub fn wait_drained(dir: &Path, addr: &str, timeout: Duration) -> bool {
    wait_drained_with(|| read_status(dir), addr, timeout)
}

/// [`wait_drained`] with the status read by `read`.
pub fn wait_drained_with(
    mut read: impl FnMut() -> Option<Status>,
    addr: &str,
    timeout: Duration,
) -> bool {
    let start = std::time::Instant::now();
    // Only a status written after this call started counts: counters in an
    // older one may predate the last requests to `addr`.
    let from = read().map(|s| s.seq).unwrap_or(0);
    loop {
        let status = read().filter(|s| s.seq >= from + 2);
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
