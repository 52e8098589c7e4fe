//! Pushing image versions from kiln's store to a registry through the OCI
//! distribution API (`oci-client`), by digest: the manifest bytes kiln
//! sealed are sent unchanged, so the registry's digest is kiln's digest,
//! and servers run `REPO@sha256:...`, never a tag. Blobs the registry
//! already has are skipped; layers stream from the store's files.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt as _;
use kiln_image::{Digest, Store};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::error::{Result, SwarmError};

/// OCI media type of kiln's manifests.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A repository kiln pushes to, e.g. `10.0.0.5:5000/shop`.
pub struct Registry {
    repo: String,
    client: Client,
    auth: RegistryAuth,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// `REPO@sha256:...`: what a service runs.
    pub reference: String,
    pub blobs_pushed: usize,
    pub blobs_skipped: usize,
    pub bytes_pushed: u64,
    pub elapsed: Duration,
}

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Plain HTTP (Docker's `insecure-registries`), as for a registry on a
    /// private network without certificates.
    pub insecure: bool,
    /// `user`, `password`; anonymous when None.
    pub basic_auth: Option<(String, String)>,
    /// Connect timeout (default 10 s) and read timeout (default 60 s).
    pub connect_timeout: Option<Duration>,
    pub read_timeout: Option<Duration>,
}

impl Registry {
    /// `repo` is `HOST[:PORT]/PATH`, without tag or digest.
    pub fn new(repo: &str, opts: RegistryOptions) -> Result<Registry> {
        // reqwest is built without a default crypto provider; kiln uses ring
        // everywhere (bollard's TLS too). A second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let host = repo.split('/').next().unwrap_or_default().to_string();
        Reference::try_from(format!("{repo}@sha256:{}", "0".repeat(64)).as_str()).map_err(|e| {
            SwarmError::Registry {
                repo: repo.into(),
                op: "parse repository".into(),
                source: OciDistributionError::GenericError(Some(e.to_string())),
            }
        })?;
        let config = ClientConfig {
            protocol: if opts.insecure {
                ClientProtocol::HttpsExcept(vec![host])
            } else {
                ClientProtocol::Https
            },
            // One PUT per blob, streamed from the file.
            use_monolithic_push: true,
            connect_timeout: Some(opts.connect_timeout.unwrap_or(Duration::from_secs(10))),
            read_timeout: Some(opts.read_timeout.unwrap_or(Duration::from_secs(60))),
            ..Default::default()
        };
        Ok(Registry {
            repo: repo.to_string(),
            client: Client::new(config),
            auth: match opts.basic_auth {
                Some((u, p)) => RegistryAuth::Basic(u, p),
                None => RegistryAuth::Anonymous,
            },
        })
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// `REPO@DIGEST`.
    pub fn reference(&self, digest: &Digest) -> String {
        format!("{}@{}", self.repo, digest)
    }

    /// Pushes the version whose manifest is `digest` from `store`: config
    /// and layers first (skipping those present), then the manifest bytes as
    /// stored. The registry's digest for it must be `digest`.
    pub async fn push(&self, store: &Store, digest: &Digest) -> Result<Pushed> {
        let t0 = Instant::now();
        let reference = self.reference(digest);
        let r: Reference = reference.parse().map_err(|e: oci_client::ParseError| {
            self.err("parse reference")(OciDistributionError::GenericError(Some(e.to_string())))
        })?;
        let manifest = store
            .read_blob(digest)
            .map_err(|source| SwarmError::Store {
                what: format!("manifest {digest}"),
                source: Box::new(source),
            })?;
        let parsed: oci_client::manifest::OciImageManifest = serde_json::from_slice(&manifest)
            .map_err(|e| self.err("read manifest")(OciDistributionError::JsonError(e)))?;
        self.client
            .auth(&r, &self.auth, RegistryOperation::Push)
            .await
            .map_err(self.err("authenticate"))?;
        let mut pushed = Pushed {
            reference: reference.clone(),
            blobs_pushed: 0,
            blobs_skipped: 0,
            bytes_pushed: 0,
            elapsed: Duration::ZERO,
        };
        let blobs = std::iter::once(&parsed.config).chain(parsed.layers.iter());
        for d in blobs {
            if self
                .client
                .blob_exists(&r, &d.digest)
                .await
                .map_err(self.err(format!("check blob {}", d.digest)))?
            {
                pushed.blobs_skipped += 1;
                continue;
            }
            let blob = Digest(d.digest.clone());
            let path = store.blob_path(&blob);
            let size = std::fs::metadata(&path)
                .map_err(|e| self.err(format!("read blob {}", d.digest))(e.into()))?
                .len();
            self.client
                .push_blob_stream(&r, file_stream(&path).await?, &d.digest, Some(size))
                .await
                .map_err(self.err(format!("push blob {}", d.digest)))?;
            pushed.blobs_pushed += 1;
            pushed.bytes_pushed += size;
        }
        let url = self
            .client
            .push_manifest_raw(
                &r,
                manifest,
                MANIFEST_MEDIA_TYPE.parse().expect("a valid header value"),
            )
            .await
            .map_err(self.err(format!("push manifest {digest}")))?;
        // The registry answers with the manifest's location, by digest.
        if let Some(got) = url.rsplit('/').next().filter(|s| s.starts_with("sha256:")) {
            if got != digest.0 {
                return Err(SwarmError::DigestMismatch {
                    repo: self.repo.clone(),
                    expected: digest.0.clone(),
                    got: got.to_string(),
                });
            }
        }
        pushed.elapsed = t0.elapsed();
        Ok(pushed)
    }

    /// The digest the registry serves for `reference` (a tag or a digest).
    pub async fn digest_of(&self, reference: &str) -> Result<String> {
        let r: Reference = reference.parse().map_err(|e: oci_client::ParseError| {
            self.err("parse reference")(OciDistributionError::GenericError(Some(e.to_string())))
        })?;
        self.client
            .fetch_manifest_digest(&r, &self.auth)
            .await
            .map_err(self.err(format!("fetch manifest {reference}")))
    }

    fn err(&self, op: impl Into<String>) -> impl FnOnce(OciDistributionError) -> SwarmError {
        let repo = self.repo.clone();
        let op = op.into();
        move |source| SwarmError::Registry { repo, op, source }
    }
}

async fn file_stream(
    path: &Path,
) -> Result<
    impl futures_util::Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static,
> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|source| SwarmError::Io {
            op: "open",
            path: path.into(),
            source,
        })?;
    Ok(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)
        .map_err(OciDistributionError::IoError))
}
