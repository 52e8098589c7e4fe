//! The one error type of the crate: every variant names the endpoint,
//! registry, service or container it is about. `Display` never repeats the
//! source; callers print the chain.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// The endpoint string is not one kiln can use.
    #[error("invalid Docker endpoint `{endpoint}`: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// A TLS file named by the endpoint cannot be used.
    #[error("TLS file {} for {endpoint}", path.display())]
    Tls {
        endpoint: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The engine does not answer (refused, missing socket, or timeout).
    #[error("Docker engine at {endpoint} is unreachable")]
    Unreachable {
        endpoint: String,
        source: bollard::errors::Error,
    },
    /// The engine's API is older than what kiln needs.
    #[error("Docker engine at {endpoint} speaks API {version}; kiln needs {minimum} or later (Docker 20.10)")]
    ApiTooOld {
        endpoint: String,
        version: String,
        minimum: String,
    },
    /// Services can only be managed through a swarm manager.
    #[error("Docker engine at {endpoint} is not a swarm manager (node state: {state}); point kiln at a manager")]
    NotManager { endpoint: String, state: String },
    /// An API call failed.
    #[error("{op} on {endpoint}")]
    Api {
        endpoint: String,
        op: String,
        source: bollard::errors::Error,
    },
    /// A service's image is not pinned by digest.
    #[error("image `{image}` is not pinned by digest (expected REPO@sha256:...)")]
    NotByDigest { image: String },
    /// A server spec kiln cannot turn into a service.
    #[error("server {server}: {reason}")]
    Spec { server: String, reason: String },
    /// Something did not happen in time.
    #[error("{what}: not done after {}s", .after.as_secs())]
    Timeout { what: String, after: Duration },
    /// A task failed or was rejected by the swarm (e.g. no node with room).
    #[error("server {server}: task {state}: {message}")]
    Task {
        server: String,
        state: String,
        message: String,
    },
    /// The image store could not give what is to be pushed.
    #[error("image store: {what}")]
    Store {
        what: String,
        source: Box<kiln_image::ImageError>,
    },
    /// The registry refused or failed a push.
    #[error("registry {repo}: {op}")]
    Registry {
        repo: String,
        op: String,
        source: oci_client::errors::OciDistributionError,
    },
    /// The registry stored the manifest under another digest.
    #[error("registry {repo} stored the manifest as {got}, kiln sealed {expected}")]
    DigestMismatch {
        repo: String,
        expected: String,
        got: String,
    },
    /// A local file could not be read.
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Reading a container's exported filesystem failed.
    #[error("export of container {container}")]
    Export {
        container: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = SwarmError> = std::result::Result<T, E>;
