//! TLS termination with rustls: the served certificate (swapped whole, so
//! a new one takes new handshakes while open connections keep theirs),
//! checks that refuse a bad certificate before it replaces a good one,
//! the watcher that reloads certificate files when they change, and the
//! TLS-ALPN-01 answers of an ACME order in progress.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::control::Mode;
use crate::fleet::Fleet;

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// How often certificate files are looked at.
const FILE_POLL: Duration = Duration::from_millis(200);
/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate was refused. The previous one keeps being served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("no PEM private key found")]
    NoKey,
    #[error("the private key cannot be used")]
    Key { source: rustls::Error },
    #[error("the certificate and the private key do not match")]
    Mismatch,
    #[error("the certificate cannot be parsed: {reason}")]
    Certificate { reason: String },
    #[error("the certificate expired at {not_after} (Unix time)")]
    Expired { not_after: i64 },
    #[error("the certificate is not valid before {not_before} (Unix time)")]
    NotYetValid { not_before: i64 },
}

/// A certificate that passed every check, ready to serve.
#[derive(Clone)]
pub(crate) struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    pub serial: String,
    pub not_after: i64,
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses and checks a PEM certificate chain and its key: the key must be
/// usable and match the certificate, which must be valid `now`.
pub(crate) fn load_pem(cert_pem: &[u8], key_pem: &[u8], now: i64) -> Result<Loaded, TlsError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .ok()
        .flatten()
        .ok_or(TlsError::NoKey)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Key { source })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::Mismatch)
        }
        Err(e) => {
            return Err(TlsError::Certificate {
                reason: e.to_string(),
            })
        }
    }
    let (_, x509) = x509_parser::parse_x509_certificate(&certified.cert[0]).map_err(|e| {
        TlsError::Certificate {
            reason: e.to_string(),
        }
    })?;
    let not_before = x509.validity().not_before.timestamp();
    let not_after = x509.validity().not_after.timestamp();
    if now > not_after {
        return Err(TlsError::Expired { not_after });
    }
    if now < not_before {
        return Err(TlsError::NotYetValid { not_before });
    }
    let names = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let serial = x509
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        serial,
        not_after,
    })
}

/// Reads and checks a certificate and key from files.
pub(crate) fn load_files(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    load_pem(&read(cert)?, &read(key)?, unix_now())
}

/// The served certificate's two server configs (HTTP mode offers HTTP/2
/// and HTTP/1.1 over ALPN; TCP mode offers nothing) and the TLS-ALPN-01
/// challenge certificates of an order in progress, by domain.
#[derive(Default)]
pub(crate) struct Certs {
    configs: ArcSwapOption<Configs>,
    served: Mutex<Option<Loaded>>,
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

struct Configs {
    http: Arc<ServerConfig>,
    tcp: Arc<ServerConfig>,
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn server_config(key: Arc<CertifiedKey>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(key)));
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

impl Certs {
    /// Serves `loaded` from the next handshake on, and reports it.
    pub fn install(&self, loaded: Loaded, source: &str, fleet: &Fleet) {
        self.configs.store(Some(Arc::new(Configs {
            http: server_config(loaded.key.clone(), &[b"h2", b"http/1.1"]),
            tcp: server_config(loaded.key.clone(), &[]),
        })));
        tracing::info!(
            names = ?loaded.names,
            serial = %loaded.serial,
            not_after = loaded.not_after,
            "serving a new {source} certificate"
        );
        fleet.metrics.cert_not_after.set(loaded.not_after);
        fleet.set_tls(|t| {
            t.source = source.to_string();
            t.names = loaded.names.clone();
            t.serial = loaded.serial.clone();
            t.not_after = loaded.not_after;
            t.error = None;
            t.loaded += 1;
        });
        *self.served.lock().expect("served") = Some(loaded);
    }

    /// Reports a refused certificate; the served one stays.
    pub fn refuse(&self, reason: String, source: &str, fleet: &Fleet) {
        tracing::warn!("{source} certificate refused, the previous one is kept: {reason}");
        fleet.set_tls(|t| {
            t.source = source.to_string();
            t.error = Some(reason);
        });
    }

    /// The certificate being served.
    pub fn served(&self) -> Option<Loaded> {
        self.served.lock().expect("served").clone()
    }

    pub fn set_challenge(&self, domain: &str, key: Arc<CertifiedKey>) {
        self.challenges
            .lock()
            .expect("challenges")
            .insert(domain.to_ascii_lowercase(), key);
    }

    pub fn clear_challenges(&self) {
        self.challenges.lock().expect("challenges").clear();
    }

    /// Runs the handshake of a new client connection. `None` if it failed,
    /// if no certificate is served yet, or if it was an ACME validation
    /// (answered, then closed). Otherwise the stream and whether HTTP/2
    /// was negotiated.
    pub async fn accept(
        &self,
        stream: TcpStream,
        mode: Mode,
    ) -> Option<(TlsStream<TcpStream>, bool)> {
        let handshake = async {
            let start = LazyConfigAcceptor::new(Acceptor::default(), stream)
                .await
                .ok()?;
            let hello = start.client_hello();
            let acme = hello
                .alpn()
                .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
            if acme {
                let name = hello.server_name()?.to_ascii_lowercase();
                let key = self
                    .challenges
                    .lock()
                    .expect("challenges")
                    .get(&name)
                    .cloned()?;
                let _ = start
                    .into_stream(server_config(key, &[ACME_TLS_ALPN]))
                    .await;
                return None;
            }
            let configs = self.configs.load_full()?;
            let config = match mode {
                Mode::Http => configs.http.clone(),
                Mode::Tcp => configs.tcp.clone(),
            };
            let tls = start.into_stream(config).await.ok()?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Some((tls, h2))
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .ok()
            .flatten()
    }
}

/// Serves the certificate files and reloads them whenever either changes;
/// a pair that fails its checks is refused and the previous one kept.
pub(crate) async fn watch_files(certs: Arc<Certs>, fleet: Arc<Fleet>, cert: PathBuf, key: PathBuf) {
    let stamp = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.modified().ok(), m.len(), m.ino())
        })
    };
    let mut last = None;
    loop {
        let now = (stamp(&cert), stamp(&key));
        if Some(&now) != last.as_ref() {
            last = Some(now);
            match load_files(&cert, &key) {
                Ok(loaded) => certs.install(loaded, "files", &fleet),
                Err(e) => certs.refuse(kiln_model::error_chain(&e), "files", &fleet),
            }
        }
        tokio::time::sleep(FILE_POLL).await;
    }
}
