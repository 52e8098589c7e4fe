//! kiln-dns: each environment's DNS server, and kiln's side of it.
//!
//! The server answers the names of one environment from a record set that
//! kiln switches atomically while it runs (`ROLE`, `ROLE.ENV` → the role's
//! servers in rotation; a server's id → that server), and forwards every
//! other name to the host's resolvers. It is the `kiln dns-server serve`
//! process; kiln drives it through a control directory ([`control`]).
//!
//! Answers (see [`respond`](crate::respond) for the exact rules):
//! - a known name: its A records with the record set's TTL for A and ANY
//!   queries, NOERROR with no records (NODATA) for other types; names
//!   match without regard to ASCII case, with or without a trailing dot;
//!   there is no implicit search suffix: kiln lists every spelling
//!   (`app` and `app.staging`), so what resolves is exactly what kiln
//!   wrote;
//! - any other name: forwarded to the upstream resolvers, each tried in
//!   turn within [`Config::forward_timeout`]; SERVFAIL when none answers
//!   in time, NXDOMAIN at once when there is no upstream;
//! - a client with too many forwards in flight: REFUSED at once.
//!
//! Cost and fairness: a known name is answered from an encoded template
//! by the UDP socket's own thread (no allocation, no task, no lock), on
//! [`Config::udp_sockets`] sockets sharing each address (`SO_REUSEPORT`),
//! so local answers never wait on forwarding or on a scheduler. Forwards run as tasks,
//! bounded per client address and in total, and each has a deadline; TCP
//! connections are bounded the same way and closed when idle.
//!
//! Malformed packets are answered FORMERR (or NOTIMP for other opcodes)
//! when their header can be read, and dropped otherwise; responses are
//! never answered.

mod batch;
pub mod client;
pub mod control;
mod forward;
mod limit;
mod respond;
mod serve;
mod zone;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use client::{lookup, query, Answer, Lookup};
pub use control::{
    read_records, read_status, running, set_records, wait_generation, Counters, Records,
    RecordsFile, Status, DEFAULT_TTL,
};
pub use hickory_proto::op::ResponseCode;
pub use hickory_proto::rr::RecordType;
pub use serve::Server;

/// Errors of the server, of kiln's control helpers and of the client.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({transport})")]
    Listen {
        addr: SocketAddr,
        transport: &'static str,
        source: std::io::Error,
    },
    /// The server was given nothing to listen on.
    #[error("no listen address given")]
    NoListen,
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A name of a record set is not a valid DNS name.
    #[error("{name:?} is not a valid DNS name")]
    InvalidName {
        name: String,
        source: hickory_proto::ProtoError,
    },
    #[error("an empty name cannot be in a record set")]
    EmptyName,
    /// The server did not acknowledge a record set in time.
    #[error("the DNS server at {} did not switch to record set {generation} within {} ms", dir.display(), waited.as_millis())]
    Timeout {
        dir: PathBuf,
        generation: u64,
        waited: Duration,
    },
    /// A query from [`client`] got no usable answer.
    #[error("no answer from {server} within {} ms", waited.as_millis())]
    NoAnswer {
        server: SocketAddr,
        waited: Duration,
    },
    #[error("query to {server} failed")]
    Query {
        server: SocketAddr,
        source: hickory_net::NetError,
    },
    #[error("cannot start a runtime for the query")]
    Runtime(#[source] std::io::Error),
}

/// How a server runs. Every limit has a default; see [`Config::new`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The control directory: `records.json` in, `status.json` and `pid`
    /// out.
    pub dir: PathBuf,
    /// Addresses to answer on, over UDP and TCP each. With port 0 the
    /// server picks one free port for both transports (see
    /// [`Server::local_addrs`] and the status).
    pub listen: Vec<SocketAddr>,
    /// Resolvers for names the record set does not hold, tried in order.
    /// Empty: such names get NXDOMAIN.
    pub upstreams: Vec<SocketAddr>,
    /// The most a forwarded query may take before the client gets
    /// SERVFAIL; below the 5 s resolvers wait for an answer by default,
    /// so they see the failure rather than a timeout.
    pub forward_timeout: Duration,
    /// Forwards one client address may have in flight.
    pub forwards_per_client: usize,
    /// Forwards the server may have in flight in all.
    pub forwards_total: usize,
    /// UDP sockets per listen address, each served by a thread of its
    /// own: one per core lets the kernel spread clients over cores. TCP,
    /// forwards and the control directory run on the caller's runtime.
    pub udp_sockets: usize,
    /// TCP connections one client address may have open.
    pub tcp_per_client: usize,
    /// TCP connections open in all.
    pub tcp_total: usize,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle: Duration,
}

impl Config {
    /// A configuration with the default limits: 2 s forward timeout, 32
    /// forwards per client and 512 in all, one UDP socket per core (at
    /// most 4), 16 TCP connections per client and 256 in all, 10 s idle.
    pub fn new(dir: PathBuf, listen: Vec<SocketAddr>) -> Config {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Config {
            dir,
            listen,
            upstreams: Vec::new(),
            forward_timeout: Duration::from_secs(2),
            forwards_per_client: 32,
            forwards_total: 512,
            udp_sockets: cores.clamp(1, 4),
            tcp_per_client: 16,
            tcp_total: 256,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// Binds the configured addresses and serves until `shutdown` completes,
/// then stops taking queries, gives forwards in flight half a second to
/// finish (SERVFAIL to those that do not) and closes TCP connections.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DnsError> {
    Server::bind(config)?.run(shutdown).await
}

/// Completes when the process is asked to stop (SIGTERM or SIGINT): the
/// `shutdown` of the `kiln dns-server serve` process.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default action (exit) still stops
        // the process: there is nothing to wait for here.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
