//! Where servers run. The [`Provider`] trait is everything the engine may
//! ask of a runtime: create a server from an unpacked, sealed image root,
//! destroy it, list what runs (with the labels that tie each server to its
//! environment, role and release), probe its health, and locate its logs.
//! [`fake::Fake`] implements it in memory for hermetic engine tests.
//!
//! Invariant: there is no exec, attach or shell in this interface.

pub mod fake;

use std::path::PathBuf;

use std::time::Duration;

use std::collections::BTreeSet;

use kiln_model::{Balancer, HealthCheck, Volume};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Creating a server failed.
    #[error("cannot create server {id}: {detail}")]
    Create { id: String, detail: String },
    /// Destroying a server failed.
    #[error("cannot destroy server {id}: {detail}")]
    Destroy { id: String, detail: String },
    /// Listing or probing failed.
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
    pub address: String,
    /// The environment's subnet (CIDR).
    pub subnet: String,
    /// The unpacked root of the sealed image version (shared, read-only).
    pub root: PathBuf,
    pub image_digest: String,
    /// Entrypoint followed by command.
    pub argv: Vec<String>,
    /// `KEY=VALUE`, image environment then role environment.
    pub env_vars: Vec<String>,
    pub workdir: String,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub volumes: Vec<Volume>,
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
}

/// What a provider can see inside a running server, for drift detection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// Processes in the server that do not descend from its first process
    /// (someone entered its namespaces), as `pid: command line`.
    pub foreign_processes: Vec<String>,
    /// Files in its writable areas (tmpfs and volumes): path inside the
    /// server and whether it is executable.
    pub writable: Vec<(String, bool)>,
    /// The memory limit its cgroup enforces.
    pub memory_limit: Option<u64>,
    /// The image digest its sandbox is labelled with.
    pub image_label: Option<String>,
    /// Device and inode of the root directory it runs from.
    pub root_inode: Option<(u64, u64)>,
    /// TCP ports something listens on in its network namespace.
    pub listening: Vec<u16>,
}

/// A runtime that runs servers.
pub trait Provider {
    /// Creates and starts a server; returns the host pid of its first process.
    fn create(&self, req: &ServerRequest) -> Result<i32, ProviderError>;
    /// Stops and removes a server and its network; idempotent. Logs stay.
    fn destroy(&self, env: &str, id: &str) -> Result<(), ProviderError>;
    /// Every server of `env` the runtime has, whether the state knows it or not.
    fn inventory(&self, env: &str) -> Result<Vec<Running>, ProviderError>;
    /// One health probe of a server at `address`.
    fn probe(&self, req: &ServerRequest, check: &HealthCheck) -> bool;
    /// Where the server's stdout and stderr are kept (they outlive it).
    fn log_path(&self, env: &str, id: &str) -> PathBuf;
    /// Makes the role's balancer run and send new connections only to
    /// `backends` (`address:port`), returning once the switch is in effect.
    fn balance(
        &self,
        env: &str,
        role: &str,
        balancer: &Balancer,
        backends: &[String],
    ) -> Result<(), ProviderError>;
    /// Waits (bounded) until the balancer has no open connection to `backend`.
    fn drain(&self, env: &str, role: &str, backend: &str, timeout: Duration) -> bool;
    /// Looks inside a running server (read-only).
    fn inspect(&self, _env: &str, _id: &str, _volumes: &[(String, PathBuf)]) -> Inspection {
        Inspection::default()
    }
    /// Per backend of a role's balancer: (address, attempts, failures) so far: attempts are connections made or failed, failures are failed connections and HTTP 5xx responses.
    fn backend_stats(&self, _env: &str, _role: &str) -> Vec<(String, u64, u64)> {
        Vec::new()
    }
    /// Whether a role's balancer is running (true when the provider has none
    /// to supervise).
    fn balancer_alive(&self, _env: &str, _role: &str) -> bool {
        true
    }
    /// The backends a role's balancer routes new connections to right now.
    fn balancer_backends(&self, _env: &str, _role: &str) -> Vec<String> {
        Vec::new()
    }
    /// Server ids this provider's host already uses for anything (other
    /// environments, other projects): new servers must not take them.
    fn taken_ids(&self) -> BTreeSet<String> {
        BTreeSet::new()
    }
    /// Stops and removes a role's balancer.
    fn remove_balancer(&self, env: &str, role: &str) -> Result<(), ProviderError>;
}
