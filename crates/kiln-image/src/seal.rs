//! Seals: the manifest of every file of an image root (path, type, mode,
//! owner, size, content hash, link target) and a root hash over it, plus
//! verification of a tree on disk against a seal.
//!
//! The walk and the hashing are parallel (rayon): directories are read
//! concurrently, one depth at a time (the walk is a loop, not a recursion,
//! so a tree of any depth cannot overflow the stack), and files are hashed
//! on every core, large files in chunks across cores too. A path longer
//! than [`MAX_PATH`] is an error: every later step (layers, copies, the
//! runtime) must be able to name every file of a root. Modification times are deliberately not sealed: kiln
//! fixes them at bake time, and they carry no meaning for drift.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result};

/// Longest path, relative to an image root, that an image may hold. The
/// kernel's limit for a whole path is 4096 bytes, and a root lives under
/// the store's own path, so this leaves room for the store.
pub const MAX_PATH: usize = 3072;

/// Files at least this large are hashed from a memory map on all cores.
const LARGE_FILE: u64 = 4 << 20;

/// The kind of a sealed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

/// One sealed file: everything about it that kiln considers its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the root, `/`-separated, no leading slash.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// BLAKE3 of the content, for regular files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Link target, for symlinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Entry {
    /// The fields of `self` that differ from `other`, by name.
    pub fn changes(&self, other: &Entry) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.kind != other.kind {
            out.push("type");
        }
        if self.mode != other.mode {
            out.push("mode");
        }
        if self.uid != other.uid || self.gid != other.gid {
            out.push("owner");
        }
        if self.size != other.size || self.hash != other.hash {
            out.push("content");
        }
        if self.target != other.target {
            out.push("target");
        }
        out
    }
}

/// The seal of one image version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// Format version of this document.
    pub version: u32,
    pub algorithm: String,
    /// BLAKE3 over the canonical line of every entry, in path order.
    pub root: String,
    pub entries: Vec<Entry>,
}

impl Seal {
    /// Builds a seal from entries (sorted here), computing the root.
    pub fn from_entries(mut entries: Vec<Entry>) -> Seal {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let mut hasher = blake3::Hasher::new();
        for e in &entries {
            let leaf = blake3::hash(&serde_json::to_vec(e).expect("entry serializes"));
            hasher.update(leaf.as_bytes());
        }
        Seal {
            version: 1,
            algorithm: "blake3".into(),
            root: hasher.finalize().to_hex().to_string(),
            entries,
        }
    }

    /// Total bytes of regular file content.
    pub fn content_size(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| e.size)
            .sum()
    }

    pub fn by_path(&self) -> BTreeMap<&str, &Entry> {
        self.entries.iter().map(|e| (e.path.as_str(), e)).collect()
    }
}

/// Seals the tree below `root` (the root directory itself is not an entry).
pub fn seal_tree(root: &Path) -> Result<Seal> {
    Ok(seal_tree_cached(root, None)?.0)
}

/// What a file looked like when it was last hashed: if size, mtime, ctime
/// and inode are all unchanged, its content hash is reused. ctime is in
/// the key because nobody can set it back: touching a file's mtime back
/// after editing it still changes its ctime.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatCache {
    pub files: BTreeMap<String, (u64, i64, i64, u64, String)>,
}

fn stat_key(m: &fs::Metadata) -> (u64, i64, i64, u64) {
    (
        m.len(),
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        m.ino(),
    )
}

/// Seals `root`, re-hashing only files whose stat differs from `cache`
/// (all of them without a cache). Returns the seal and the new cache.
pub fn seal_tree_cached(root: &Path, cache: Option<&StatCache>) -> Result<(Seal, StatCache)> {
    let found = walk(root)?;
    let done = found
        .into_par_iter()
        .map(|(path, meta)| {
            let key = stat_key(&meta);
            let cached = cache
                .and_then(|c| c.files.get(&path))
                .filter(|c| (c.0, c.1, c.2, c.3) == key)
                .map(|c| c.4.clone());
            let e = entry_with(root, path, &meta, cached)?;
            Ok((e, key))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut next = StatCache::default();
    for (e, k) in &done {
        if let Some(h) = &e.hash {
            next.files
                .insert(e.path.clone(), (k.0, k.1, k.2, k.3, h.clone()));
        }
    }
    Ok((
        Seal::from_entries(done.into_iter().map(|d| d.0).collect()),
        next,
    ))
}

/// Every path below `root` (relative to it) with its metadata: one depth
/// at a time, the directories of each depth read in parallel.
fn walk(root: &Path) -> Result<Vec<(String, fs::Metadata)>> {
    let mut out = Vec::new();
    let mut depth = vec![String::new()];
    while !depth.is_empty() {
        let found: Vec<Vec<(String, fs::Metadata)>> = depth
            .par_iter()
            .map(|rel| read_dir(root, rel))
            .collect::<Result<_>>()?;
        depth = Vec::new();
        for (path, meta) in found.into_iter().flatten() {
            if meta.is_dir() {
                depth.push(path.clone());
            }
            out.push((path, meta));
        }
    }
    Ok(out)
}

/// The entries of one directory, `rel` below `root`.
fn read_dir(root: &Path, rel: &str) -> Result<Vec<(String, fs::Metadata)>> {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let mut here = Vec::new();
    for item in fs::read_dir(&dir).ctx("read directory", &dir)? {
        let item = item.ctx("read directory", &dir)?;
        let name = item.file_name();
        let name = name.to_str().ok_or_else(|| {
            crate::ImageError::Corrupt(format!("non-UTF-8 file name in {}", dir.display()))
        })?;
        let path = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        if path.len() > MAX_PATH {
            return Err(crate::ImageError::PathTooLong {
                root: root.to_path_buf(),
                path: path.chars().take(120).collect(),
                limit: MAX_PATH,
            });
        }
        let meta = fs::symlink_metadata(item.path()).ctx("stat", item.path())?;
        here.push((path, meta));
    }
    Ok(here)
}

fn entry_with(
    root: &Path,
    path: String,
    meta: &fs::Metadata,
    cached_hash: Option<String>,
) -> Result<Entry> {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_char_device() {
        Kind::CharDevice
    } else if ft.is_block_device() {
        Kind::BlockDevice
    } else {
        Kind::Socket
    };
    let full = root.join(&path);
    let (hash, target, size) = match kind {
        Kind::File => (
            Some(match cached_hash {
                Some(h) => h,
                None => hash_file(&full, meta.len())?,
            }),
            None,
            meta.len(),
        ),
        Kind::Symlink => {
            let t = fs::read_link(&full).ctx("read link", &full)?;
            (None, Some(t.to_string_lossy().into_owned()), 0)
        }
        _ => (None, None, 0),
    };
    Ok(Entry {
        path,
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size,
        hash,
        target,
    })
}

/// BLAKE3 of a file's content, hex.
pub fn hash_file(path: &Path, len: u64) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    if len >= LARGE_FILE {
        hasher.update_mmap_rayon(path).ctx("hash", path)?;
    } else {
        let mut f = fs::File::open(path).ctx("open", path)?;
        let mut buf = Vec::with_capacity(len as usize + 1);
        f.read_to_end(&mut buf).ctx("read", path)?;
        hasher.update(&buf);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// How a path differs between a seal and a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum Difference {
    Added {
        path: String,
    },
    Removed {
        path: String,
    },
    Changed {
        path: String,
        fields: Vec<&'static str>,
    },
}

impl Difference {
    pub fn path(&self) -> &str {
        match self {
            Difference::Added { path }
            | Difference::Removed { path }
            | Difference::Changed { path, .. } => path,
        }
    }
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Added { path } => write!(f, "added    /{path}"),
            Difference::Removed { path } => write!(f, "removed  /{path}"),
            Difference::Changed { path, fields } => {
                write!(f, "changed  /{path} ({})", fields.join(", "))
            }
        }
    }
}

/// Differences from `expected` to `actual`, in path order.
pub fn diff(expected: &Seal, actual: &Seal) -> Vec<Difference> {
    let want = expected.by_path();
    let have = actual.by_path();
    let mut out = Vec::new();
    for (path, e) in &want {
        match have.get(path) {
            None => out.push(Difference::Removed {
                path: path.to_string(),
            }),
            Some(a) => {
                let fields = e.changes(a);
                if !fields.is_empty() {
                    out.push(Difference::Changed {
                        path: path.to_string(),
                        fields,
                    });
                }
            }
        }
    }
    for path in have.keys() {
        if !want.contains_key(path) {
            out.push(Difference::Added {
                path: path.to_string(),
            });
        }
    }
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out
}

/// Re-hashes `root` and compares it with `seal`.
pub fn verify_tree(root: &Path, seal: &Seal) -> Result<Vec<Difference>> {
    Ok(diff(seal, &seal_tree(root)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_deeper_than_any_image_may_be_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        // 1,600 levels of `d`: 3,200 bytes of path, past MAX_PATH, still
        // creatable through full paths on the host.
        let mut rel = String::from("d");
        for _ in 1..1600 {
            rel.push_str("/d");
        }
        std::fs::create_dir_all(dir.path().join(&rel)).unwrap();
        let err = seal_tree(dir.path()).unwrap_err();
        assert!(
            matches!(&err, crate::ImageError::PathTooLong { path, limit: MAX_PATH, .. } if path.starts_with("d/d/d")),
            "{err}"
        );
        // Just under the limit seals, one entry per level.
        let ok = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ok.path().join(&rel[..MAX_PATH - 1])).unwrap();
        assert_eq!(seal_tree(ok.path()).unwrap().entries.len(), MAX_PATH / 2);
    }
}
