//! Read and maintenance operations on baked images: list, show, verify and
//! garbage collection. Their results are the `--json` contracts.

use std::collections::BTreeSet;
use std::fs;

use serde::Serialize;

use crate::error::{ImageError, Result};
use crate::seal::{self, Difference, Seal};
use crate::store::{Digest, LayerRef, Outcome, Store, VersionRecord};

/// A version's status as `kiln image list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Current,
    Previous,
    Failed,
}

/// One row of `kiln image list --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ListItem {
    pub name: String,
    pub version: u32,
    pub digest: Digest,
    /// `name@version` of the parent image, or null.
    pub parent: Option<String>,
    pub created: String,
    /// Bytes of file content in the image's root.
    pub size: u64,
    pub status: Status,
}

/// Every version of every image in the store (or of `only`), by name then version.
pub fn list(store: &Store, only: Option<&str>) -> Result<Vec<ListItem>> {
    let names = match only {
        Some(n) => vec![n.to_string()],
        None => store.image_names()?,
    };
    let mut out = Vec::new();
    for name in names {
        let current = store.current(&name)?;
        for r in store.versions(&name)? {
            let status = match (r.outcome, current == Some(r.version)) {
                (Outcome::Failed, _) => Status::Failed,
                (Outcome::Ok, true) => Status::Current,
                (Outcome::Ok, false) => Status::Previous,
            };
            out.push(ListItem {
                name: r.name,
                version: r.version,
                digest: r.digest,
                parent: r.parent,
                created: r.created,
                size: r.size,
                status,
            });
        }
    }
    Ok(out)
}

/// Resolves `NAME` (current version) or `NAME@VERSION`.
pub fn resolve(store: &Store, reference: &str) -> Result<VersionRecord> {
    match reference.split_once('@') {
        Some((name, v)) => {
            let version =
                v.trim_start_matches('v')
                    .parse()
                    .map_err(|_| ImageError::UnknownVersion {
                        name: name.into(),
                        version: 0,
                    })?;
            store.version(name, version)
        }
        None => {
            if store.versions(reference)?.is_empty() {
                return Err(ImageError::NotBuilt(reference.to_string()));
            }
            store.current_record(reference)
        }
    }
}

/// `kiln image show --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    pub name: String,
    pub version: u32,
    pub digest: Digest,
    pub parent: Option<String>,
    pub created: String,
    pub size: u64,
    pub status: Status,
    /// Ancestors first, this version last, as `name@version`.
    pub lineage: Vec<String>,
    pub layers: Vec<LayerRef>,
    pub seal_root: String,
    pub seal: Digest,
    pub files_sealed: usize,
    pub inputs: crate::store::Inputs,
    pub build_ms: u64,
    pub error: Option<String>,
    /// Regular files with the setuid or setgid bit.
    pub setuid: Vec<crate::policy::SpecialFile>,
    /// Files and directories anyone may write.
    pub world_writable: Vec<crate::policy::SpecialFile>,
    /// Digest of the SBOM artifact, if the version has one.
    pub sbom: Option<Digest>,
    /// Keys whose signatures are stored with the version (not checked
    /// against any environment's trust).
    pub signatures: Vec<crate::sign::Signer>,
}

pub fn show(store: &Store, reference: &str) -> Result<Shown> {
    let r = resolve(store, reference)?;
    let status = list(store, Some(&r.name))?
        .into_iter()
        .find(|i| i.version == r.version)
        .map(|i| i.status)
        .unwrap_or(Status::Previous);
    let mut lineage = vec![format!("{}@{}", r.name, r.version)];
    let mut parent = r.parent.clone();
    while let Some(p) = parent {
        lineage.push(p.clone());
        parent = resolve(store, &p).ok().and_then(|rec| rec.parent);
    }
    lineage.reverse();
    let sealed: Seal = store.read_json_blob(&r.seal)?;
    Ok(Shown {
        name: r.name.clone(),
        version: r.version,
        digest: r.digest.clone(),
        parent: r.parent.clone(),
        created: r.created.clone(),
        size: r.size,
        status,
        lineage,
        layers: r.layers.clone(),
        seal_root: r.seal_root.clone(),
        seal: r.seal.clone(),
        files_sealed: sealed.entries.len(),
        inputs: r.inputs.clone(),
        build_ms: r.build_ms,
        error: r.error.clone(),
        setuid: crate::policy::setuid_files(&sealed),
        world_writable: crate::policy::world_writable(&sealed),
        sbom: crate::sbom::read(store, &r)?.map(|s| s.referrer.digest),
        signatures: crate::sign::signatures(store, &r)?
            .into_iter()
            .map(|s| s.signer)
            .collect(),
    })
}

/// What `kiln image verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub name: String,
    pub version: u32,
    pub digest: Digest,
    pub entries: usize,
    pub bytes: u64,
    /// Files of the unpacked root that differ from the seal.
    pub differences: Vec<Difference>,
    /// Blobs whose content no longer matches their digest.
    pub corrupt_blobs: Vec<Digest>,
}

impl Verified {
    pub fn ok(&self) -> bool {
        self.differences.is_empty() && self.corrupt_blobs.is_empty()
    }
}

/// Re-hashes a version's root and blobs and compares them with its seal and digests.
pub fn verify(store: &Store, reference: &str) -> Result<Verified> {
    verify_with(store, reference, true, true)
}

/// Like [`verify`]; with `full = false`, files whose size, times and inode
/// are unchanged since the last verification keep their last hash (warm
/// drift scans); with `blobs = false` only the unpacked root is checked
/// (what servers run), not the store's blobs.
pub fn verify_with(store: &Store, reference: &str, full: bool, blobs: bool) -> Result<Verified> {
    let r = resolve(store, reference)?;
    let sealed: Seal = store.read_json_blob(&r.seal)?;
    if Digest::of(&store.read_blob(&r.seal)?) != r.seal {
        return Err(ImageError::Corrupt(format!(
            "the seal of {}@{} does not match its digest",
            r.name, r.version
        )));
    }
    if sealed.root != r.seal_root || Seal::from_entries(sealed.entries.clone()).root != sealed.root
    {
        return Err(ImageError::Corrupt(format!(
            "the seal root of {}@{} does not match its entries",
            r.name, r.version
        )));
    }
    let root = store.root_path(&r.digest);
    let cache_path = store
        .root()
        .join("cache/stat")
        .join(format!("{}.json", r.digest.hex()));
    let cache: Option<seal::StatCache> = if full {
        None
    } else {
        fs::read(&cache_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    };
    let differences = if root.is_dir() {
        let (actual, next) = seal::seal_tree_cached(&root, cache.as_ref())?;
        let diffs = seal::diff(&sealed, &actual);
        if let Some(dir) = cache_path.parent() {
            let _ = fs::create_dir_all(dir);
            let _ = fs::write(&cache_path, serde_json::to_vec(&next).unwrap_or_default());
        }
        diffs
    } else {
        vec![Difference::Removed {
            path: String::new(),
        }]
    };
    let mut corrupt_blobs = Vec::new();
    let check_blobs = blobs;
    let blobs: Vec<&Digest> = if check_blobs {
        blobs_of(&r)
    } else {
        Vec::new()
    };
    for d in blobs {
        if !store.blob_intact(d) {
            corrupt_blobs.push(d.clone());
        }
    }
    Ok(Verified {
        name: r.name,
        version: r.version,
        digest: r.digest,
        entries: sealed.entries.len(),
        bytes: sealed.content_size(),
        differences,
        corrupt_blobs,
    })
}

/// Every blob a version refers to: manifest, config, seal and layers.
pub(crate) fn blobs_of(r: &VersionRecord) -> Vec<&Digest> {
    std::iter::once(&r.digest)
        .chain(std::iter::once(&r.config))
        .chain(std::iter::once(&r.seal))
        .chain(r.layers.iter().map(|l| &l.digest))
        .collect()
}

/// What `kiln image gc` removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Collected {
    pub versions: Vec<String>,
    pub blobs: usize,
    pub roots: usize,
    /// Retired roots (replaced after tampering) removed: no process mounts
    /// them any more.
    pub retired: usize,
    /// Retired roots kept because a running server still has them mounted.
    pub retired_in_use: usize,
    pub bytes: u64,
}

/// Removes versions that are not current, not among the `keep` newest
/// successful previous versions of their image (the rollback window), and
/// not in `in_use` (digests some environment runs); then every blob, root
/// and base that nothing kept refers to.
pub fn gc(store: &Store, keep: usize, in_use: &BTreeSet<Digest>) -> Result<Collected> {
    let _lock = store.lock()?;
    store.clear_tmp()?;
    let mut out = Collected::default();
    let mut live_blobs = BTreeSet::new();
    let mut live_roots = BTreeSet::new();
    for name in store.image_names()? {
        let current = store.current(&name)?;
        let versions = store.versions(&name)?;
        let previous: BTreeSet<u32> = versions
            .iter()
            .rev()
            .filter(|r| r.outcome == Outcome::Ok && Some(r.version) != current)
            .take(keep)
            .map(|r| r.version)
            .collect();
        for r in versions {
            let kept = Some(r.version) == current
                || previous.contains(&r.version)
                || in_use.contains(&r.digest);
            if kept {
                live_blobs.extend([r.digest.clone(), r.config.clone(), r.seal.clone()]);
                live_blobs.extend(r.layers.iter().map(|l| l.digest.clone()));
                live_roots.insert(r.digest.clone());
            } else {
                store.remove_version(&name, r.version)?;
                out.versions.push(format!("{name}@{}", r.version));
            }
        }
    }
    // Artifacts (SBOM, signatures) live as long as the image they refer to.
    for subject in store.referrer_subjects()? {
        if !live_roots.contains(&subject) {
            store.remove_referrers(&subject)?;
            continue;
        }
        for r in store.referrers(&subject)? {
            live_blobs.insert(r.digest.clone());
            live_blobs.insert(r.payload.clone());
            live_blobs.insert(Digest::of(b"{}"));
        }
    }
    // Imported bases are the import cache: kept while their blobs are.
    for b in store.bases()? {
        live_blobs.extend(b.layers.iter().map(|l| l.digest.clone()));
        live_blobs.insert(b.seal.clone());
    }
    for d in store.blobs()? {
        if !live_blobs.contains(&d) {
            out.bytes += store.remove_blob(&d)?;
            out.blobs += 1;
        }
    }
    for d in store.roots()? {
        if !live_roots.contains(&d) {
            crate::layer::remove_any(&store.root_path(&d))?;
            out.roots += 1;
        }
    }
    // A retired root goes once no mount namespace on the host still has it
    // mounted (the servers started from it have all been replaced).
    let retired = store.root().join("retired");
    let items: Vec<fs::DirEntry> = fs::read_dir(&retired)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    if !items.is_empty() {
        // Every mount namespace's table is read only when there is something to decide.
        let mounted = mounted_roots();
        for item in items {
            let name = item.file_name().to_string_lossy().into_owned();
            let suffix = format!("/retired/{}", mountinfo_escape(&name));
            if mounted
                .iter()
                .any(|m| m.ends_with(&suffix) || m.contains(&format!("{suffix}/")))
            {
                out.retired_in_use += 1;
                continue;
            }
            crate::layer::remove_any(&item.path())?;
            out.retired += 1;
        }
    }
    store.sync_index()?;
    Ok(out)
}

/// The source path (field 4 of `/proc/PID/mountinfo`) of every mount in
/// every mount namespace on the host, each namespace read once. Paths are
/// as mountinfo escapes them.
fn mounted_roots() -> BTreeSet<String> {
    let mut namespaces = BTreeSet::new();
    let mut out = BTreeSet::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(ns) = fs::read_link(p.path().join("ns/mnt")) else {
            continue;
        };
        if !namespaces.insert(ns) {
            continue;
        }
        let Ok(info) = fs::read_to_string(p.path().join("mountinfo")) else {
            continue;
        };
        out.extend(
            info.lines()
                .filter_map(|l| l.split(' ').nth(3))
                .map(str::to_string),
        );
    }
    out
}

/// mountinfo's octal escapes for space, tab, newline and backslash.
fn mountinfo_escape(s: &str) -> String {
    s.replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012")
}
