//! The project's image store (default `.kiln/`): an OCI image layout of
//! content-addressed blobs, one record per image version, the unpacked and
//! sealed root of each version, and the cache of imported bases.
//!
//! ```text
//! .kiln/oci/                 OCI image layout: oci-layout, index.json, blobs/sha256/<hex>
//! .kiln/images/<name>/<n>.json   version records (the commit point of a build)
//! .kiln/images/<name>/current    the current version number
//! .kiln/roots/<hex>/         unpacked root of the version whose manifest is sha256:<hex>
//! .kiln/bases/<key>.json     imported bases (rootfs, OCI, debootstrap) by source key
//! .kiln/referrers/<hex>.json artifacts (SBOM, signatures) whose subject is manifest sha256:<hex>
//! .kiln/tmp/                 work in progress; emptied by the next writer
//! .kiln/lock                 held (POSIX record lock) by every writer
//! ```
//!
//! The store is private to its owner (mode 0700, set on every open, so
//! that stores made before this rule are fixed too): image roots hold
//! whatever their tarballs and scripts put there, setuid-root binaries
//! included, and no other user of the host may reach them. Inside a
//! sandbox `no_new_privileges` makes setuid bits inert.
//!
//! A blob written under a digest that is already present replaces the
//! present one if its content no longer matches its digest: rebuilding
//! the same bytes repairs a corrupt store.
//!
//! Invariant: every write is a temporary file or directory under `tmp/`
//! renamed into place, and a version exists only once its record is
//! written, after its blobs and root. A killed build leaves at most
//! unreferenced blobs (removed by `gc`) and `tmp/` debris (removed by the
//! next writer); never a half version.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{ImageError, IoContext, Result};

/// Where the store lives inside a project unless told otherwise.
pub const DEFAULT_DIR: &str = ".kiln";

/// A content digest, `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Digest(pub String);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }
    pub fn hex(&self) -> &str {
        self.0.strip_prefix("sha256:").unwrap_or(&self.0)
    }
    /// The first 12 hex digits, as people quote digests.
    pub fn short(&self) -> &str {
        &self.hex()[..12.min(self.hex().len())]
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A layer blob and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub digest: Digest,
    pub size: u64,
}

/// Whether a version passed its build and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Failed,
}

/// What went into a version, for `kiln image show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    /// The base, as declared: `scratch`, `image base@3`, `rootfs base.tar.gz`...
    pub source: String,
    pub files: Vec<String>,
    pub scripts: Vec<String>,
    pub tests: usize,
    /// Hash of every input; equal keys mean the build would be identical.
    pub cache_key: String,
}

/// One version of one image: the record whose presence makes it exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub name: String,
    pub version: u32,
    /// Digest of the OCI manifest: the version's identity.
    pub digest: Digest,
    /// Parent image as `name@version`, if layered on a kiln image.
    pub parent: Option<String>,
    pub parent_digest: Option<Digest>,
    /// When this version was built (RFC 3339, UTC). Not part of the image.
    pub created: String,
    /// Bytes of file content in the root.
    pub size: u64,
    pub outcome: Outcome,
    /// Why the version failed, if it did.
    pub error: Option<String>,
    pub seal_root: String,
    pub seal: Digest,
    pub config: Digest,
    pub layers: Vec<LayerRef>,
    pub inputs: Inputs,
    /// Wall time of the build in milliseconds.
    pub build_ms: u64,
    /// Who the image's processes run as, resolved in its own passwd and
    /// group at bake time (the config's `User` holds `uid:gid`); `None`
    /// for root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<kiln_model::ResolvedUser>,
}

/// A base imported from outside kiln, cached by its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRecord {
    pub key: String,
    pub source: String,
    pub layers: Vec<LayerRef>,
    pub seal: Digest,
    /// Environment taken from an OCI base's config, if any.
    #[serde(default)]
    pub env: Vec<String>,
}

/// An OCI artifact (an image manifest with an `artifactType` and a
/// `subject`) that refers to a version's image manifest: its SBOM, its
/// signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referrer {
    /// `application/vnd.cyclonedx+json`, [`crate::sign::ARTIFACT_TYPE`]...
    pub artifact_type: String,
    /// Digest of the artifact's manifest.
    pub digest: Digest,
    pub size: u64,
    /// Digest of its one layer: the SBOM or signature itself.
    pub payload: Digest,
}

/// An open store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Exclusive hold on the store for writers; released on drop or death.
pub struct StoreLock {
    _file: fs::File,
}

impl Store {
    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        let s = Store { root };
        for d in [
            s.blobs_dir(),
            s.root.join("images"),
            s.root.join("roots"),
            s.root.join("bases"),
            s.root.join("referrers"),
            s.tmp_dir(),
        ] {
            fs::create_dir_all(&d).ctx("create directory", &d)?;
        }
        use std::os::unix::fs::PermissionsExt;
        for private in [s.root.clone(), s.root.join("roots")] {
            fs::set_permissions(&private, fs::Permissions::from_mode(0o700))
                .ctx("chmod", &private)?;
        }
        let layout = s.root.join("oci/oci-layout");
        if !layout.exists() {
            s.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !s.index_path().exists() {
            s.write_index(&BTreeMap::new())?;
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("oci/blobs/sha256")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("oci/index.json")
    }

    /// Takes the writers' lock, waiting for another writer to finish.
    pub fn lock(&self) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx("open", &path)?;
        // A POSIX record lock, not flock(): sandbox processes are cloned from
        // kiln and keep its descriptors until they exec, and an flock() would
        // be shared with them, outliving a killed kiln. Record locks belong
        // to the process alone and die with it.
        let lk = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0, // the whole file
            l_pid: 0,
        };
        loop {
            let done = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETLKW(&lk));
            let err = match done {
                Ok(_) => break,
                Err(errno) => io::Error::from(errno),
            };
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(ImageError::Io {
                    op: "lock",
                    path,
                    source: err,
                });
            }
        }
        Ok(StoreLock { _file: file })
    }

    /// Removes what killed writers left in `tmp/`. Call it holding the lock,
    /// after stopping any sandbox a killed build left running over it.
    pub fn clear_tmp(&self) -> Result<()> {
        let tmp = self.tmp_dir();
        for item in fs::read_dir(&tmp).ctx("read directory", &tmp)? {
            let p = item.ctx("read directory", &tmp)?.path();
            // A process killed a moment ago may still be finishing a write.
            let mut tries = 0;
            while let Err(e) = crate::layer::remove_any(&p) {
                tries += 1;
                if tries > 20 {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// A fresh directory under `tmp/`, removed by the next writer if left.
    pub fn temp_dir(&self, label: &str) -> Result<PathBuf> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = self
            .tmp_dir()
            .join(format!("{label}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).ctx("create directory", &p)?;
        Ok(p)
    }

    /// Writes `bytes` to `path` through a temporary file and a rename.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self
            .tmp_dir()
            .join(format!(".w-{}-{}", std::process::id(), fastrand_suffix()));
        {
            let mut f = fs::File::create(&tmp).ctx("create", &tmp)?;
            f.write_all(bytes).ctx("write", &tmp)?;
            f.sync_all().ctx("sync", &tmp)?;
        }
        fs::rename(&tmp, path).ctx("rename into", path)
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Whether a blob exists and its content still hashes to its digest.
    pub fn blob_intact(&self, d: &Digest) -> bool {
        let Ok(mut f) = fs::File::open(self.blob_path(d)) else {
            return false;
        };
        let mut h = Sha256::new();
        if io::copy(&mut f, &mut h).is_err() {
            return false;
        }
        format!("sha256:{}", hex::encode(h.finalize())) == d.0
    }

    /// Stores bytes as a blob, returning their digest; a present blob of
    /// that digest whose content is corrupt is replaced.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        if !self.blob_intact(&d) {
            self.write_atomic(&self.blob_path(&d), bytes)?;
        }
        Ok(d)
    }

    /// Stores a JSON document canonically (sorted keys, compact) as a blob.
    pub fn put_json<T: Serialize>(&self, value: &T) -> Result<(Digest, u64)> {
        let bytes = canonical_json(value);
        Ok((self.put_blob(&bytes)?, bytes.len() as u64))
    }

    /// Moves a finished temporary file into the blobs under its digest
    /// (the caller hashed it while writing it). A present blob of that
    /// digest is kept if intact and replaced if corrupt.
    pub fn adopt_blob(&self, tmp: &Path, d: &Digest) -> Result<()> {
        if self.blob_intact(d) {
            return fs::remove_file(tmp).ctx("remove", tmp);
        }
        fs::rename(tmp, self.blob_path(d)).ctx("rename into", self.blob_path(d))
    }

    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(d);
        fs::read(&p).ctx("read blob", p)
    }

    pub fn read_json_blob<T: for<'de> Deserialize<'de>>(&self, d: &Digest) -> Result<T> {
        let bytes = self.read_blob(d)?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
            path: self.blob_path(d),
            source,
        })
    }

    /// Every blob digest in the store.
    pub fn blobs(&self) -> Result<Vec<Digest>> {
        let dir = self.blobs_dir();
        let mut out = Vec::new();
        for item in fs::read_dir(&dir).ctx("read directory", &dir)? {
            let name = item.ctx("read directory", &dir)?.file_name();
            out.push(Digest(format!("sha256:{}", name.to_string_lossy())));
        }
        Ok(out)
    }

    pub fn remove_blob(&self, d: &Digest) -> Result<u64> {
        let p = self.blob_path(d);
        let size = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(&p).ctx("remove", p)?;
        Ok(size)
    }

    /// The unpacked root of a version.
    pub fn root_path(&self, d: &Digest) -> PathBuf {
        self.root.join("roots").join(d.hex())
    }

    /// Every unpacked root in the store, by the digest it belongs to.
    pub fn roots(&self) -> Result<Vec<Digest>> {
        let dir = self.root.join("roots");
        let mut out = Vec::new();
        for item in fs::read_dir(&dir).ctx("read directory", &dir)? {
            let name = item.ctx("read directory", &dir)?.file_name();
            out.push(Digest(format!("sha256:{}", name.to_string_lossy())));
        }
        Ok(out)
    }

    fn image_dir(&self, name: &str) -> PathBuf {
        self.root.join("images").join(name)
    }

    /// Every version record of an image, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionRecord>> {
        let dir = self.image_dir(name);
        let mut out = Vec::new();
        let Ok(items) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        for item in items {
            let p = item.ctx("read directory", &dir)?.path();
            if p.extension().is_some_and(|e| e == "json") {
                let bytes = fs::read(&p).ctx("read", &p)?;
                out.push(
                    serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
                        path: p.clone(),
                        source,
                    })?,
                );
            }
        }
        out.sort_by_key(|r: &VersionRecord| r.version);
        Ok(out)
    }

    /// Names of every image with at least one version.
    pub fn image_names(&self) -> Result<Vec<String>> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for item in fs::read_dir(&dir).ctx("read directory", &dir)? {
            let item = item.ctx("read directory", &dir)?;
            if item.path().is_dir() {
                out.push(item.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn version(&self, name: &str, version: u32) -> Result<VersionRecord> {
        let p = self.image_dir(name).join(format!("{version}.json"));
        let bytes = fs::read(&p).map_err(|_| ImageError::UnknownVersion {
            name: name.into(),
            version,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Json { path: p, source })
    }

    /// The current version number of an image, if it has one.
    pub fn current(&self, name: &str) -> Result<Option<u32>> {
        let p = self.image_dir(name).join("current");
        match fs::read_to_string(&p) {
            Ok(s) => s.trim().parse().map(Some).map_err(|_| {
                ImageError::Corrupt(format!("{} is not a version number", p.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::Io {
                op: "read",
                path: p,
                source: e,
            }),
        }
    }

    /// The current version's record, or `NotBuilt`.
    pub fn current_record(&self, name: &str) -> Result<VersionRecord> {
        match self.current(name)? {
            Some(v) => self.version(name, v),
            None => Err(ImageError::NotBuilt(name.to_string())),
        }
    }

    /// Writes a version record: the commit point of a build.
    pub fn put_version(&self, rec: &VersionRecord) -> Result<()> {
        let dir = self.image_dir(&rec.name);
        fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        let bytes = serde_json::to_vec_pretty(rec).expect("record serializes");
        self.write_atomic(&dir.join(format!("{}.json", rec.version)), &bytes)
    }

    pub fn set_current(&self, name: &str, version: u32) -> Result<()> {
        self.write_atomic(
            &self.image_dir(name).join("current"),
            version.to_string().as_bytes(),
        )?;
        self.sync_index()
    }

    pub fn remove_version(&self, name: &str, version: u32) -> Result<()> {
        let p = self.image_dir(name).join(format!("{version}.json"));
        fs::remove_file(&p).ctx("remove", p)
    }

    pub fn base(&self, key: &str) -> Result<Option<BaseRecord>> {
        let p = self.root.join("bases").join(format!("{key}.json"));
        match fs::read(&p) {
            Ok(b) => {
                let rec: BaseRecord = serde_json::from_slice(&b)
                    .map_err(|source| ImageError::Json { path: p, source })?;
                let complete =
                    rec.layers.iter().all(|l| self.has_blob(&l.digest)) && self.has_blob(&rec.seal);
                Ok(complete.then_some(rec))
            }
            Err(_) => Ok(None),
        }
    }

    pub fn bases(&self) -> Result<Vec<BaseRecord>> {
        let dir = self.root.join("bases");
        let mut out = Vec::new();
        for item in fs::read_dir(&dir).ctx("read directory", &dir)? {
            let p = item.ctx("read directory", &dir)?.path();
            let b = fs::read(&p).ctx("read", &p)?;
            out.push(
                serde_json::from_slice(&b)
                    .map_err(|source| ImageError::Json { path: p, source })?,
            );
        }
        Ok(out)
    }

    pub fn put_base(&self, rec: &BaseRecord) -> Result<()> {
        let p = self.root.join("bases").join(format!("{}.json", rec.key));
        self.write_atomic(
            &p,
            &serde_json::to_vec_pretty(rec).expect("record serializes"),
        )
    }

    fn referrers_path(&self, subject: &Digest) -> PathBuf {
        self.root
            .join("referrers")
            .join(format!("{}.json", subject.hex()))
    }

    /// Every artifact that refers to the manifest `subject`, oldest first.
    pub fn referrers(&self, subject: &Digest) -> Result<Vec<Referrer>> {
        let p = self.referrers_path(subject);
        match fs::read(&p) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|source| ImageError::Json { path: p, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ImageError::Io {
                op: "read",
                path: p,
                source: e,
            }),
        }
    }

    /// Stores `payload` as an OCI artifact of `artifact_type` whose subject
    /// is the image manifest `subject`, and records it among the subject's
    /// referrers (once: the same artifact stored twice is one referrer).
    /// Callers hold the store lock.
    pub fn put_artifact(
        &self,
        subject: &Digest,
        artifact_type: &str,
        payload: &[u8],
        annotations: BTreeMap<String, String>,
    ) -> Result<Referrer> {
        use oci_spec::image::{DescriptorBuilder, ImageManifestBuilder, MediaType};
        let oci = |e: oci_spec::OciSpecError| {
            ImageError::Corrupt(format!("cannot build OCI artifact manifest: {e}"))
        };
        let descriptor = |mt: MediaType, d: &Digest, size: u64| {
            let digest: oci_spec::image::Digest =
                d.0.parse().map_err(|e: oci_spec::OciSpecError| oci(e))?;
            DescriptorBuilder::default()
                .media_type(mt)
                .digest(digest)
                .size(size)
                .build()
                .map_err(oci)
        };
        let subject_size = fs::metadata(self.blob_path(subject))
            .map(|m| m.len())
            .ctx("stat", self.blob_path(subject))?;
        let payload_digest = self.put_blob(payload)?;
        // The OCI 1.1 empty config for artifacts: `{}`.
        let empty = self.put_blob(b"{}")?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .artifact_type(MediaType::Other(artifact_type.to_string()))
            .config(descriptor(MediaType::EmptyJSON, &empty, 2)?)
            .layers(vec![descriptor(
                MediaType::Other(artifact_type.to_string()),
                &payload_digest,
                payload.len() as u64,
            )?])
            .subject(descriptor(MediaType::ImageManifest, subject, subject_size)?)
            .annotations(
                annotations
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            )
            .build()
            .map_err(oci)?;
        let (digest, size) = self.put_json(&manifest)?;
        let referrer = Referrer {
            artifact_type: artifact_type.to_string(),
            digest,
            size,
            payload: payload_digest,
        };
        let mut all = self.referrers(subject)?;
        if !all.contains(&referrer) {
            all.push(referrer.clone());
            self.write_atomic(
                &self.referrers_path(subject),
                &serde_json::to_vec_pretty(&all).expect("referrers serialize"),
            )?;
        }
        Ok(referrer)
    }

    /// Digests of every subject with referrers.
    pub fn referrer_subjects(&self) -> Result<Vec<Digest>> {
        let dir = self.root.join("referrers");
        let mut out = Vec::new();
        let Ok(items) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        for item in items {
            let name = item.ctx("read directory", &dir)?.file_name();
            if let Some(hex) = name.to_string_lossy().strip_suffix(".json") {
                out.push(Digest(format!("sha256:{hex}")));
            }
        }
        Ok(out)
    }

    /// Forgets the referrers of a subject (their blobs go with `gc`).
    pub fn remove_referrers(&self, subject: &Digest) -> Result<()> {
        let p = self.referrers_path(subject);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ImageError::Io {
                op: "remove",
                path: p,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Rewrites `index.json` so that it lists every successful version as
    /// `name:N` and each current version also as `name:latest`.
    pub fn sync_index(&self) -> Result<()> {
        let mut refs = BTreeMap::new();
        for name in self.image_names()? {
            let current = self.current(&name)?;
            for rec in self.versions(&name)? {
                if rec.outcome != Outcome::Ok {
                    continue;
                }
                let size = fs::metadata(self.blob_path(&rec.digest))
                    .map(|m| m.len())
                    .unwrap_or(0);
                refs.insert(
                    format!("{name}:{}", rec.version),
                    (rec.digest.clone(), size),
                );
                if current == Some(rec.version) {
                    refs.insert(format!("{name}:latest"), (rec.digest.clone(), size));
                }
            }
        }
        self.write_index(&refs)
    }

    fn write_index(&self, refs: &BTreeMap<String, (Digest, u64)>) -> Result<()> {
        let mut manifests: Vec<_> = refs
            .iter()
            .map(|(name, (d, size))| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": d.0,
                    "size": size,
                    "annotations": { "org.opencontainers.image.ref.name": name },
                })
            })
            .collect();
        // Artifacts of listed images, untagged, as OCI 1.1 layouts list referrers.
        let listed: std::collections::BTreeSet<&Digest> = refs.values().map(|(d, _)| d).collect();
        for subject in listed {
            for r in self.referrers(subject)? {
                manifests.push(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": r.digest.0,
                    "size": r.size,
                    "artifactType": r.artifact_type,
                }));
            }
        }
        let index = serde_json::json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests });
        self.write_atomic(&self.index_path(), &canonical_json(&index))
    }
}

/// JSON with sorted object keys and no whitespace: the same value always
/// gives the same bytes, so digests of configs and manifests are stable.
pub fn canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    // serde_json's Value keeps objects in a BTreeMap (no preserve_order), so
    // a round trip through it sorts every key.
    let v = serde_json::to_value(value).expect("value serializes");
    serde_json::to_vec(&v).expect("value serializes")
}

fn fastrand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos}-{}", N.fetch_add(1, Ordering::Relaxed))
}
