//! The balancer: the stable front of a role (`kiln balancer serve`). It
//! listens on one address and spreads clients over a backend set that kiln
//! switches atomically while it runs, draining the backends it leaves.
//!
//! Two modes (`Front::mode` in `backends.json`):
//! - **HTTP** (`http.rs`, on hyper): keep-alive with clients, HTTP/2 over
//!   TLS ALPN, a backend chosen per request (round robin or least
//!   requests), pooled backend connections, retries that never repeat a
//!   sent body, `X-Forwarded-For`/`-Proto` and `Forwarded`, every response
//!   counted by status class and backend, 503 with `Retry-After` when no
//!   backend is up, 400 and a closed connection for malformed requests.
//! - **TCP** (`tcp.rs`): one backend connection per client connection,
//!   bytes relayed untouched, fail-open when every backend is down.
//!
//! Either can terminate TLS (`tls.rs`: certificate files reloaded when
//! they change; `acme.rs`: certificates obtained and renewed over ACME).
//! Backends are health-checked (`health.rs`); counters are Prometheus
//! metrics (`metrics.rs`), served on an optional admin listener and written
//! to `status.json`.
//!
//! Control directory (`.kiln/balancers/<env>-<role>/`), see `control.rs`:
//! - `backends.json`, written by kiln: generation, backends, health check,
//!   front settings. The balancer checks it every [`POLL`] and switches in
//!   one step: new requests go only to the new set from then on.
//! - `status.json`, written by the balancer every 20 ms: the generation it
//!   serves, per-backend counters, the served certificate. kiln waits on it:
//!   for a switch to be acknowledged, for a removed backend to drain.
//! - `pid`, `balancer.log`, and `acme/` (account and certificate, 0600).
//!
//! A balancer kiln cannot reach through a directory (a Swarm service on
//! another machine) also serves a control channel over HTTP (`remote.rs`)
//! that reads and writes those same files.

mod acme;
mod admit;
mod control;
mod dial;
mod fleet;
mod head;
mod health;
mod http;
mod metrics;
mod remote;
mod tcp;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub use acme::AcmeError;
pub use control::{
    backends_path, read_backends, read_status, set_backends, set_backends_checked,
    set_backends_with, status_path, store_backends, wait_drained, wait_drained_with,
    wait_generation, wait_generation_with, Acme, Algorithm, BackendStatus, Backends, Check, Front,
    Mode, Probe, Status, Tls, TlsStatus,
};
pub use health::{passes, status_code};
pub use tls::TlsError;

use fleet::Fleet;
use tls::Certs;

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

/// The control channel over HTTP: where it listens, and the bearer token
/// every request must carry.
#[derive(Debug, Clone)]
pub struct Control {
    pub addr: String,
    pub token: String,
}

/// Runs a balancer until the process is told to stop (SIGTERM/SIGINT).
pub async fn run(listen: &str, dir: PathBuf) -> Result<(), BalancerError> {
    run_with(listen, dir, None).await
}

/// [`run`], also serving the control channel when `control` is given.
pub async fn run_with(
    listen: &str,
    dir: PathBuf,
    control: Option<Control>,
) -> Result<(), BalancerError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| BalancerError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let fleet = Arc::new(Fleet::new(listen));
    let certs = Arc::new(Certs::default());
    std::fs::write(dir.join("pid"), std::process::id().to_string()).map_err(|source| {
        BalancerError::Io {
            op: "write",
            path: dir.join("pid"),
            source,
        }
    })?;
    fleet.load(&dir);
    let mut tasks = FrontTasks::default();
    tasks.apply(&fleet, &certs, &dir).await;
    fleet.write_status(&dir);
    let watcher = {
        let (fleet, certs, dir) = (fleet.clone(), certs.clone(), dir.clone());
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
                    if fleet.load(&dir) {
                        tasks.apply(&fleet, &certs, &dir).await;
                    }
                    fleet.write_status(&dir);
                } else if ticks.is_multiple_of(2) {
                    // Counters change with traffic: refresh them every 20 ms.
                    fleet.write_status(&dir);
                }
            }
        })
    };
    let checker = tokio::spawn(health::check_loop(fleet.clone()));
    let remote = match control {
        Some(c) => Some(tokio::spawn(remote::serve(
            metrics::bind_admin(&c.addr).await?,
            dir.clone(),
            c.token.into(),
            fleet.metrics.clone(),
        ))),
        None => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| BalancerError::Io {
            op: "watch signals of",
            path: dir.clone(),
            source,
        })?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                tokio::spawn(client(stream, peer, fleet.clone(), certs.clone()));
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    watcher.abort();
    checker.abort();
    if let Some(r) = remote {
        r.abort();
    }
    Ok(())
}

/// Counts a client connection while it is open.
struct Open(Arc<Fleet>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.client_connections.dec();
    }
}

/// Serves one client connection in the front's current mode.
async fn client(stream: TcpStream, peer: SocketAddr, fleet: Arc<Fleet>, certs: Arc<Certs>) {
    let _ = stream.set_nodelay(true);
    fleet.metrics.client_connections.inc();
    let _open = Open(fleet.clone());
    let (mode, tls) = {
        let front = fleet.front.load();
        (front.mode, front.tls.is_some())
    };
    match (tls, mode) {
        (false, Mode::Http) => http::serve(stream, peer, false, false, fleet).await,
        (false, Mode::Tcp) => tcp::proxy(stream, fleet).await,
        (true, mode) => {
            let Some((stream, h2)) = certs.accept(stream, mode).await else {
                return;
            };
            match mode {
                Mode::Http => http::serve(stream, peer, true, h2, fleet).await,
                Mode::Tcp => tcp::proxy(stream, fleet).await,
            }
        }
    }
}

/// The tasks that follow the front's settings: the certificate source
/// (file watcher or ACME) and the admin listener, restarted when their
/// settings change.
#[derive(Default)]
struct FrontTasks {
    tls: Option<(Tls, JoinHandle<()>)>,
    admin: Option<(String, JoinHandle<()>)>,
}

impl FrontTasks {
    async fn apply(&mut self, fleet: &Arc<Fleet>, certs: &Arc<Certs>, dir: &Path) {
        let front = fleet.front.load_full();
        if self.tls.as_ref().map(|(t, _)| t) != front.tls.as_ref() {
            if let Some((_, task)) = self.tls.take() {
                task.abort();
            }
            self.tls = front.tls.clone().map(|t| {
                let (certs, fleet) = (certs.clone(), fleet.clone());
                let task = match t.clone() {
                    Tls::Files { cert, key } => {
                        tokio::spawn(tls::watch_files(certs, fleet, cert, key))
                    }
                    Tls::Acme(cfg) => tokio::spawn(acme::run(cfg, dir.to_path_buf(), certs, fleet)),
                };
                (t, task)
            });
        }
        if self.admin.as_ref().map(|(a, _)| a) != front.admin.as_ref() {
            if let Some((_, task)) = self.admin.take() {
                task.abort();
            }
            if let Some(addr) = &front.admin {
                match metrics::bind_admin(addr).await {
                    Ok(listener) => {
                        let status_file = control::status_path(dir);
                        let status =
                            Arc::new(move || std::fs::read(&status_file).unwrap_or_default());
                        let task = tokio::spawn(metrics::serve_admin(
                            listener,
                            fleet.metrics.clone(),
                            status,
                        ));
                        self.admin = Some((addr.clone(), task));
                    }
                    Err(e) => tracing::warn!("admin listener: {}", kiln_model::error_chain(&e)),
                }
            }
        }
    }
}
