//! Connections to Docker engines: endpoint parsing (`unix://`, `tcp://`,
//! TLS client certificates as Docker's `DOCKER_CERT_PATH`), API version
//! negotiation with a floor, and timeouts so that nothing ever hangs.
//!
//! Two kinds of engine matter: the swarm manager kiln is pointed at
//! ([`crate::Cluster`]: services, tasks, nodes, service logs), and each
//! node's own engine ([`crate::NodeEngine`]): containers, exec sessions and
//! filesystem exports only exist on the node that runs them; a manager
//! does not proxy them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;

use crate::error::{Result, SwarmError};

/// The oldest API kiln accepts: Docker 20.10 (Debian 12's `docker.io`).
/// 1.41 is also the first with `CapabilityAdd`/`CapabilityDrop` on a
/// service's container spec.
pub const MIN_API: (usize, usize) = (1, 41);

/// How long a control request (anything but a stream) may take, connection
/// included. bollard applies it until the response headers arrive, so
/// streams (logs, exports) are not cut by it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a Docker engine listens, and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `unix:///var/run/docker.sock` or `tcp://host:2376`.
    pub url: String,
    /// Client certificates for `tcp://` (Docker's `--tlsverify`).
    pub tls: Option<TlsFiles>,
}

/// `ca.pem`, `cert.pem` and `key.pem`, as in Docker's `DOCKER_CERT_PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The three files of a Docker certificate directory.
    pub fn from_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

impl Endpoint {
    /// A plain endpoint (no TLS).
    pub fn new(url: impl Into<String>) -> Endpoint {
        Endpoint {
            url: url.into(),
            tls: None,
        }
    }

    /// A `tcp://` endpoint verified with the certificates in `cert_dir`.
    pub fn with_tls(url: impl Into<String>, cert_dir: &Path) -> Endpoint {
        Endpoint {
            url: url.into(),
            tls: Some(TlsFiles::from_dir(cert_dir)),
        }
    }

    /// As the docker CLI reads its environment: `DOCKER_HOST` (default the
    /// local socket), TLS when `DOCKER_TLS_VERIFY` is set, from
    /// `DOCKER_CERT_PATH` (default `~/.docker`).
    pub fn from_env() -> Endpoint {
        let url = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let verify = std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty() && v != "0");
        let tls = verify.then(|| {
            let dir = std::env::var_os("DOCKER_CERT_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".docker")
                });
            TlsFiles::from_dir(&dir)
        });
        Endpoint { url, tls }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// A connected engine: the bollard client at the negotiated API version.
#[derive(Debug, Clone)]
pub struct Engine {
    pub(crate) docker: Docker,
    pub(crate) endpoint: String,
    /// The API version in use (the lower of the engine's and bollard's).
    pub api_version: String,
    /// The engine's own version, e.g. `20.10.24+dfsg1`.
    pub engine_version: String,
}

impl Engine {
    /// Connects, negotiates the API version and refuses engines older than
    /// [`MIN_API`]. Fails within [`REQUEST_TIMEOUT`] when nothing answers.
    pub async fn connect(endpoint: &Endpoint) -> Result<Engine> {
        Engine::connect_with_timeout(endpoint, REQUEST_TIMEOUT).await
    }

    /// [`Engine::connect`] with another request timeout (whole seconds, at least 1).
    pub async fn connect_with_timeout(endpoint: &Endpoint, timeout: Duration) -> Result<Engine> {
        let ep = endpoint.url.clone();
        let timeout = timeout.as_secs().max(1);
        let unreachable = |source| SwarmError::Unreachable {
            endpoint: ep.clone(),
            source,
        };
        let docker = if let Some(path) = ep.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(SwarmError::Endpoint {
                    endpoint: ep,
                    reason: "no socket path".into(),
                });
            }
            Docker::connect_with_unix(path, timeout, bollard::API_DEFAULT_VERSION)
                .map_err(unreachable)?
        } else if let Some(hostport) = ep.strip_prefix("tcp://") {
            check_hostport(&ep, hostport)?;
            match &endpoint.tls {
                Some(tls) => {
                    for p in [&tls.ca, &tls.cert, &tls.key] {
                        if let Err(source) = std::fs::metadata(p) {
                            return Err(SwarmError::Tls {
                                endpoint: ep,
                                path: p.clone(),
                                source,
                            });
                        }
                    }
                    Docker::connect_with_ssl(
                        &ep,
                        &tls.key,
                        &tls.cert,
                        &tls.ca,
                        timeout,
                        bollard::API_DEFAULT_VERSION,
                    )
                    .map_err(unreachable)?
                }
                None => Docker::connect_with_http(&ep, timeout, bollard::API_DEFAULT_VERSION)
                    .map_err(unreachable)?,
            }
        } else {
            return Err(SwarmError::Endpoint {
                endpoint: ep,
                reason: "expected unix:///PATH or tcp://HOST:PORT".into(),
            });
        };
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        let v = docker.client_version();
        let version = docker.version().await.map_err(unreachable)?;
        let server_api = version.api_version.clone().unwrap_or_default();
        if parse_api(&server_api).is_none_or(|s| s < MIN_API) {
            return Err(SwarmError::ApiTooOld {
                endpoint: ep,
                version: server_api,
                minimum: format!("{}.{}", MIN_API.0, MIN_API.1),
            });
        }
        Ok(Engine {
            docker,
            endpoint: ep,
            api_version: format!("{}.{}", v.major_version, v.minor_version),
            engine_version: version.version.unwrap_or_default(),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The underlying client, for calls this crate does not wrap.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// An `Api` error for `op` on this engine.
    pub(crate) fn api(
        &self,
        op: impl Into<String>,
    ) -> impl FnOnce(bollard::errors::Error) -> SwarmError {
        let endpoint = self.endpoint.clone();
        let op = op.into();
        move |source| SwarmError::Api {
            endpoint,
            op,
            source,
        }
    }
}

fn check_hostport(ep: &str, hostport: &str) -> Result<()> {
    let bad = |reason: &str| SwarmError::Endpoint {
        endpoint: ep.into(),
        reason: reason.into(),
    };
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| bad("expected tcp://HOST:PORT"))?;
    if host.is_empty() || host.contains('/') {
        return Err(bad("expected tcp://HOST:PORT"));
    }
    port.parse::<u16>()
        .map_err(|_| bad("the port is not a number"))?;
    Ok(())
}

/// `"1.41"` → `(1, 41)`.
pub fn parse_api(v: &str) -> Option<(usize, usize)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_compare_numerically() {
        assert_eq!(parse_api("1.41"), Some((1, 41)));
        assert!(parse_api("1.9").unwrap() < MIN_API);
        assert!(parse_api("1.100").unwrap() > MIN_API);
        assert_eq!(parse_api("x"), None);
    }

    #[tokio::test]
    async fn bad_endpoints_are_refused_before_any_io() {
        for (url, reason) in [
            ("http://h:1", "expected unix:///PATH or tcp://HOST:PORT"),
            ("unix://", "no socket path"),
            ("tcp://host", "expected tcp://HOST:PORT"),
            ("tcp://host:port", "the port is not a number"),
        ] {
            let e = Engine::connect(&Endpoint::new(url)).await.unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("invalid Docker endpoint `{url}`: {reason}")
            );
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_at_once() {
        let e = Engine::connect(&Endpoint::new("unix:///nonexistent/docker.sock"))
            .await
            .unwrap_err();
        assert!(matches!(e, SwarmError::Unreachable { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn missing_tls_files_are_named() {
        let e = Engine::connect(&Endpoint::with_tls(
            "tcp://127.0.0.1:2376",
            Path::new("/nonexistent/certs"),
        ))
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "TLS file /nonexistent/certs/ca.pem for tcp://127.0.0.1:2376"
        );
    }
}
