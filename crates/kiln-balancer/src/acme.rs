//! ACME (RFC 8555) with instant-acme: an account, an order for the
//! configured domains answered with TLS-ALPN-01 (RFC 8737) on the
//! balancer's own TLS listener, and renewal when the certificate has less
//! than `renew_before` left. The account key, the certificate and its key
//! are kept in the control directory's `acme/` (files mode 0600), so a
//! restarted balancer serves at once and keeps its account.
//!
//! A failed order (directory unreachable, challenge refused, bad
//! certificate) is reported in `status.json` with its reason; the served
//! certificate stays, and the order is tried again after
//! `check_interval`. A renewal swaps the certificate for new handshakes
//! only: no connection is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use kiln_model::error_chain;
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::control::Acme;
use crate::fleet::Fleet;
use crate::tls::{load_files, load_pem, unix_now, Certs, Loaded, TlsError};

/// The longest an order may take, from the directory to the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME request to {directory} failed")]
    Protocol {
        directory: String,
        source: instant_acme::Error,
    },
    #[error("ACME order for {domains:?} failed: {reason}")]
    Order {
        domains: Vec<String>,
        reason: String,
    },
    #[error("cannot {op} {}", path.display())]
    Store {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the issued certificate was refused")]
    Refused { source: TlsError },
    #[error("cannot make the TLS-ALPN-01 certificate for {domain}: {reason}")]
    Challenge { domain: String, reason: String },
    #[error("ACME order at {directory} took longer than {secs}s")]
    Timeout { directory: String, secs: u64 },
}

/// The account as stored: the directory it belongs to and its key.
#[derive(Serialize, Deserialize)]
struct SavedAccount {
    directory: String,
    credentials: AccountCredentials,
}

pub(crate) fn store_dir(dir: &Path) -> PathBuf {
    dir.join("acme")
}

/// Keeps a certificate for `cfg.domains` served until the task is aborted.
pub(crate) async fn run(cfg: Acme, dir: PathBuf, certs: Arc<Certs>, fleet: Arc<Fleet>) {
    let store = store_dir(&dir);
    let (cert_path, key_path) = (store.join("cert.pem"), store.join("key.pem"));
    if let Ok(saved) = load_files(&cert_path, &key_path) {
        if covers(&saved, &cfg.domains) {
            certs.install(saved, "acme", &fleet);
        }
    }
    let interval = Duration::from_millis(cfg.check_interval_ms.max(100));
    loop {
        let due = match certs.served() {
            Some(l) => {
                !covers(&l, &cfg.domains) || l.not_after - unix_now() < cfg.renew_before_secs as i64
            }
            None => true,
        };
        if due {
            let outcome = tokio::time::timeout(ORDER_TIMEOUT, obtain(&cfg, &store, &certs))
                .await
                .unwrap_or_else(|_| {
                    Err(AcmeError::Timeout {
                        directory: cfg.directory.clone(),
                        secs: ORDER_TIMEOUT.as_secs(),
                    })
                });
            certs.clear_challenges();
            match outcome {
                Ok((loaded, cert_pem, key_pem)) => {
                    let saved = write_private(&key_path, key_pem.as_bytes())
                        .and_then(|()| write_private(&cert_path, cert_pem.as_bytes()));
                    if let Err(e) = saved {
                        tracing::warn!("{}", error_chain(&e));
                    }
                    certs.install(loaded, "acme", &fleet);
                }
                Err(e) => certs.refuse(error_chain(&e), "acme", &fleet),
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Whether a certificate names every domain wanted.
fn covers(l: &Loaded, domains: &[String]) -> bool {
    domains
        .iter()
        .all(|d| l.names.iter().any(|n| n.eq_ignore_ascii_case(d)))
}

/// One order, from the account to a checked certificate (and its PEMs).
async fn obtain(
    cfg: &Acme,
    store: &Path,
    certs: &Certs,
) -> Result<(Loaded, String, String), AcmeError> {
    let protocol = |source| AcmeError::Protocol {
        directory: cfg.directory.clone(),
        source,
    };
    let order_failed = |reason: String| AcmeError::Order {
        domains: cfg.domains.clone(),
        reason,
    };
    let account = account(cfg, store).await?;
    let ids: Vec<Identifier> = cfg
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(protocol)?;
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(protocol)?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(order_failed(format!("an authorization is {other:?}"))),
        }
        let mut challenge = authz
            .challenge(ChallengeType::TlsAlpn01)
            .ok_or_else(|| order_failed("the server offers no tls-alpn-01 challenge".into()))?;
        let domain = challenge.identifier().to_string();
        let digest = challenge.key_authorization().digest();
        certs.set_challenge(&domain, challenge_cert(&domain, digest.as_ref())?);
        challenge.set_ready().await.map_err(protocol)?;
    }
    let poll = RetryPolicy::new().timeout(Duration::from_secs(60));
    let status = order.poll_ready(&poll).await.map_err(protocol)?;
    if status != OrderStatus::Ready {
        return Err(order_failed(format!("the order is {status:?}")));
    }
    let key_pem = order.finalize().await.map_err(protocol)?;
    let cert_pem = order.poll_certificate(&poll).await.map_err(protocol)?;
    let loaded = load_pem(cert_pem.as_bytes(), key_pem.as_bytes(), unix_now())
        .map_err(|source| AcmeError::Refused { source })?;
    Ok((loaded, cert_pem, key_pem))
}

/// The stored account for this directory, or a new one (then stored).
async fn account(cfg: &Acme, store: &Path) -> Result<Account, AcmeError> {
    let protocol = |source| AcmeError::Protocol {
        directory: cfg.directory.clone(),
        source,
    };
    let builder = || match &cfg.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let path = store.join("account.json");
    let saved = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<SavedAccount>(&b).ok())
        .filter(|s| s.directory == cfg.directory);
    if let Some(saved) = saved {
        return builder()
            .map_err(protocol)?
            .from_credentials(saved.credentials)
            .await
            .map_err(protocol);
    }
    let contact = format!("mailto:{}", cfg.email);
    let (account, credentials) = builder()
        .map_err(protocol)?
        .create(
            &NewAccount {
                contact: &[&contact],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(protocol)?;
    let saved = SavedAccount {
        directory: cfg.directory.clone(),
        credentials,
    };
    write_private(
        &path,
        &serde_json::to_vec(&saved).expect("account credentials serialize"),
    )?;
    Ok(account)
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge: the
/// domain, and the key authorization's digest in a critical extension.
fn challenge_cert(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let fail = |reason: String| AcmeError::Challenge {
        domain: domain.to_string(),
        reason,
    };
    if digest.len() != 32 {
        return Err(fail(format!("a {}-byte digest", digest.len())));
    }
    let mut params =
        rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(|e| fail(e.to_string()))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let cert = params.self_signed(&key).map_err(|e| fail(e.to_string()))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .map_err(|e| fail(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// Writes a secret: mode 0600 from creation, through a rename, in a
/// directory only root reads.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let store = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| AcmeError::Store { op, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(store("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(store("protect", dir))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(store("create", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(store("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(store("rename", path))
}
