//! Where servers run. The [`Provider`] trait is everything the engine may
//! ask of a runtime, and nothing about where the runtime keeps things:
//! make image versions available, create a server from a fully decided
//! request, destroy it, list what runs (with the labels that tie each
//! server to its environment, role and release), probe its health, read its
//! logs, switch and drain a role's balancer, look inside a server for
//! drift, verify the files it runs from, keep a drifted server's evidence,
//! and tear down what an environment leaves behind. Paths, processes and
//! network layout are the provider's own, so a remote provider is a new
//! crate, not a new branch in the engine.
//!
//! [`fake::Fake`] implements it in memory, scriptable, for hermetic engine
//! tests.
//!
//! Invariant: there is no exec, attach or shell in this interface.

pub mod check;
pub mod fake;
pub mod front;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_model::{
    Balancer, BalancerCheck, HealthCheck, ImageRef, Launch, NodeInfo, Server, Size, Subnet, Volume,
};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// An image version could not be made available to servers.
    #[error("cannot make image {image} available: {detail}")]
    Prepare { image: String, detail: String },
    /// Creating a server failed.
    #[error("cannot create server {id}: {detail}")]
    Create { id: String, detail: String },
    /// Destroying a server failed.
    #[error("cannot destroy server {id}: {detail}")]
    Destroy { id: String, detail: String },
    /// Anything else the runtime refused.
    #[error("{what}: {detail}")]
    Other { what: String, detail: String },
}

/// Everything needed to create one server; fully decided by the plan.
#[derive(Debug, Clone)]
pub struct ServerRequest {
    pub env: String,
    pub id: String,
    pub role: String,
    pub release: i64,
    pub slot: u32,
    /// The address the plan gave it.
    pub address: String,
    pub subnet: Subnet,
    pub image: ImageRef,
    /// The role spec hash the server is created with (recorded with it, so
    /// the server can be adopted back into a lost state).
    pub spec_hash: String,
    pub launch: Launch,
    pub size: Size,
    pub ports: Vec<u16>,
    pub volumes: Vec<Volume>,
    /// What the server may reach beyond its environment.
    pub reach: Vec<kiln_model::Reach>,
    /// The capabilities its processes may hold (root's; another user
    /// holds none).
    pub capabilities: std::collections::BTreeSet<kiln_model::Capability>,
    /// The node the plan put it on, on providers with several.
    pub node: Option<String>,
    /// Declared port → the host port of `node` the plan publishes it on.
    pub published: BTreeMap<u16, u16>,
    /// Secrets to deliver as files in `/run/secrets/` (decrypted by the
    /// engine just before the server is created; never written to disk
    /// outside the server's own tmpfs).
    pub secrets: Vec<SecretFile>,
}

/// One secret for a server: `/run/secrets/NAME`, mode 0400, owned by the
/// server's user. `Debug` shows the name and size, never the value; the
/// value is zeroed when dropped.
#[derive(Clone)]
pub struct SecretFile {
    pub name: String,
    pub value: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SecretFile({}, [redacted, {} bytes])",
            self.name,
            self.value.len()
        )
    }
}

/// What creating a server gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Started {
    /// Host pid of its first process, where the provider has one.
    pub pid: Option<i32>,
    /// The machine it runs on, for providers with several.
    pub node: Option<String>,
    /// Where the provider published declared ports elsewhere (declared →
    /// reachable); empty when every port is reached as itself.
    pub published: BTreeMap<u16, u16>,
    /// Its address, where the provider (not the plan) decides it.
    pub address: Option<String>,
}

/// A server the runtime knows about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub id: String,
    pub env: String,
    pub role: String,
    pub release: i64,
    pub pid: Option<i32>,
    /// Whether its first process is alive.
    pub alive: bool,
    /// What the runtime recorded about it when it was created (its labels):
    /// enough to adopt it into a state that lost it.
    pub record: Option<Server>,
}

/// One file written in a server's writable areas (tmpfs and volumes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Path inside the server.
    pub path: String,
    /// Executable (mode bits or an ELF header).
    pub executable: bool,
    /// setuid or setgid.
    pub setid: bool,
    /// Under a declared volume (not tmpfs).
    pub in_volume: bool,
}

/// What a provider can see inside a running server, for drift detection.
/// Observations only: what counts as drift is the engine's decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// Processes in the server that do not descend from its first process
    /// (someone entered it), as `pid: command line`.
    pub foreign_processes: Vec<String>,
    /// Interactive sessions the runtime itself reports (exec sessions).
    pub sessions: Vec<String>,
    /// Files in its writable areas.
    pub written: Vec<Written>,
    /// The memory limit its runtime enforces.
    pub memory_limit: Option<u64>,
    /// The image digest its runtime says it runs.
    pub image_digest: Option<String>,
    /// It runs from a root that was replaced since it started (a
    /// `--no-cache` repair of a tampered image).
    pub replaced_root: bool,
    /// TCP ports something listens on in its network.
    pub listening: Vec<u16>,
    /// Other settings the runtime reports changed behind kiln's back, said
    /// as `what: found, declared`.
    pub settings: Vec<String>,
}

/// Where a backend stands at its role's balancer. Ordered by how far out
/// of rotation it is (several balancers' views combine to the furthest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rotation {
    /// Takes new connections.
    InRotation,
    /// Taken out by the balancer's own health checks.
    FailingChecks,
    /// Takes no new connections; open ones finish.
    Draining,
}

/// A server to put behind its role's balancer, as its own release
/// declared it: during a rollout that changes the balanced port or the
/// health check, old and new servers differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `address:port` where the balancer reaches it.
    pub addr: String,
    /// The declared port that `addr` reaches.
    pub port: u16,
    /// The balancer's active check of it.
    pub check: Option<BalancerCheck>,
}

/// One backend of a role's balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `address:port`.
    pub addr: String,
    pub rotation: Rotation,
    /// Requests (or connections) tried so far.
    pub attempts: u64,
    /// Of those, failed ones: failed connections and HTTP 5xx responses.
    pub failures: u64,
}

/// A role's balancer as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerState {
    /// Whether its process (or service) runs.
    pub alive: bool,
    pub backends: Vec<Backend>,
    /// Instances (a role may have one per node) serving another backend
    /// set than the last switch: one whose node was away during it.
    pub behind: Vec<String>,
}

/// Files of the servers running one image version, against its seal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileCheck {
    /// Differences from the seal, one line each, per server.
    pub differences: BTreeMap<String, Vec<String>>,
    /// Whether every file was re-hashed (not only changed ones).
    pub full: bool,
}

/// The names an environment's DNS answers itself: each role's servers in
/// rotation under `ROLE` and `ROLE.ENV`, and each server under its id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    pub ttl_secs: u32,
    pub names: BTreeMap<String, Vec<std::net::Ipv4Addr>>,
}

/// A piece of a server's log, from `offset`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogChunk {
    pub bytes: Vec<u8>,
    /// Where the next read starts.
    pub next: u64,
}

/// A runtime that runs servers.
pub trait Provider {
    /// Makes image versions available to the servers about to be created
    /// (a remote provider pushes them to its registry). Called before an
    /// apply changes anything, so a failure leaves nothing half-updated.
    fn prepare(&self, env: &str, images: &[ImageRef]) -> Result<(), ProviderError>;
    /// The nodes new servers of `env` may be placed on, with the host
    /// ports taken on each; empty on a provider with a single host, where
    /// the planner places nothing.
    fn nodes(&self, env: &str) -> Result<Vec<NodeInfo>, ProviderError>;
    /// Creates and starts a server.
    fn create(&self, req: &ServerRequest) -> Result<Started, ProviderError>;
    /// Stops and removes a server and what is its alone; idempotent. Its
    /// logs stay readable.
    fn destroy(&self, env: &str, id: &str) -> Result<(), ProviderError>;
    /// Every server of `env` the runtime has, whether the state knows it or not.
    fn inventory(&self, env: &str) -> Result<Vec<Running>, ProviderError>;
    /// One health probe of a server.
    fn probe(&self, server: &Server, check: &HealthCheck) -> bool;
    /// Ids of the servers of `env` that have logs, destroyed ones included.
    fn log_ids(&self, env: &str) -> Result<Vec<String>, ProviderError>;
    /// A server's stdout and stderr from byte `offset` on.
    fn read_log(&self, env: &str, id: &str, offset: u64) -> Result<LogChunk, ProviderError>;
    /// Makes the role's balancer run and send new connections only to
    /// `backends`, returning once the switch is in effect.
    fn balance(
        &self,
        env: &str,
        role: &str,
        balancer: &Balancer,
        backends: &[Upstream],
    ) -> Result<(), ProviderError>;
    /// Makes `env`'s DNS answer `names` (starting its server if needed),
    /// returning once it does.
    fn publish(&self, env: &str, names: &Names) -> Result<(), ProviderError>;
    /// Where `env`'s DNS server answers, if it has one.
    fn dns_server(&self, env: &str) -> Option<std::net::SocketAddr>;
    /// Waits (bounded) until the balancer has no open connection to `backend`.
    fn drain(&self, env: &str, role: &str, backend: &str, timeout: Duration) -> bool;
    /// The role's balancer, or `None` when it has never been started.
    fn balancer(&self, env: &str, role: &str) -> Option<BalancerState>;
    /// Stops and removes a role's balancer; idempotent.
    fn remove_balancer(&self, env: &str, role: &str) -> Result<(), ProviderError>;
    /// Looks inside a running server (read-only). `volumes` are the role's.
    fn inspect(&self, server: &Server, volumes: &[Volume]) -> Inspection;
    /// Verifies the files of `servers`, all running `image`, against its
    /// seal: once per image version where the provider shares roots.
    fn verify_files(
        &self,
        image: &ImageRef,
        servers: &[&Server],
        full: bool,
    ) -> Result<FileCheck, ProviderError>;
    /// Keeps a drifted server's evidence (log, writable areas) before it is
    /// replaced; returns where it is kept.
    fn quarantine(
        &self,
        server: &Server,
        volumes: &[Volume],
        findings_json: &str,
    ) -> Result<String, ProviderError>;
    /// Deletes quarantine evidence of `env` kept since before `before`
    /// (epoch seconds); returns the servers whose evidence went.
    fn expire_quarantine(&self, env: &str, before: i64) -> Result<Vec<String>, ProviderError>;
    /// Server ids this provider's host already uses for anything (other
    /// environments, other projects): new servers must not take them.
    fn taken_ids(&self) -> Result<BTreeSet<String>, ProviderError>;
    /// The subnet `env`'s network has now, if it exists.
    fn network(&self, env: &str) -> Option<Subnet>;
    /// Who else on the provider's hosts uses addresses of `subnet` (another
    /// environment, an interface), if anyone: `None` when it is free for
    /// `env` (or already `env`'s own).
    fn network_conflict(&self, env: &str, subnet: Subnet) -> Result<Option<String>, ProviderError>;
    /// Removes what an environment has besides servers and balancers (its
    /// network), once its last server is gone; idempotent.
    fn teardown(&self, env: &str) -> Result<(), ProviderError>;
}
