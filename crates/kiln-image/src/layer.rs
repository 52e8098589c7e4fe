//! Layer tarballs: writing normalised layers (sorted entries, fixed times
//! and owners as sealed, no user or group names, no build-host leakage) and
//! applying layers to a root with the hostile-archive rules enforced.
//!
//! Applying never writes outside the root: absolute paths and `..` are
//! refused, every parent of an entry is checked not to be a symlink (so a
//! link planted by an earlier entry or layer cannot redirect a later
//! write), device nodes are refused (the runtime provides `/dev`), and
//! hard links must point at an earlier regular entry inside the root.
//! An archive may also not expand past its [`Budget`] (the import limit),
//! nor hold a path longer than [`crate::seal::MAX_PATH`].
//!
//! Removing a tree ([`remove_any`]) works at any depth with two open
//! descriptors and no recursion: a build can leave 10,000 nested
//! directories, and `std::fs::remove_dir_all` needs a descriptor per level.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{ImageError, IoContext, Result};
use crate::seal::{Entry, Kind, Seal, MAX_PATH};

/// How much an archive may still write: file content plus a tar header's
/// worth (512 bytes) per entry, so that millions of empty files count too.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub limit: u64,
    pub used: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget { limit, used: 0 }
    }

    /// No cap: layers kiln wrote itself, already sealed.
    pub fn unlimited() -> Budget {
        Budget::new(u64::MAX)
    }

    /// Takes `bytes` from the budget, or says it is exhausted.
    fn take(&mut self, bytes: u64) -> bool {
        match self.used.checked_add(bytes) {
            Some(n) if n <= self.limit => {
                self.used = n;
                true
            }
            _ => false,
        }
    }
}

/// OCI whiteout prefix: `dir/.wh.name` deletes `dir/name` from lower layers.
pub const WHITEOUT: &str = ".wh.";
/// OCI opaque-directory marker: hides everything lower layers had in the dir.
pub const OPAQUE: &str = ".wh..wh..opq";

/// What one layer changes relative to its parent: entries to write (taken
/// from the built root) and paths to delete.
#[derive(Debug, Default)]
pub struct LayerChanges {
    pub write: Vec<Entry>,
    pub delete: Vec<String>,
}

impl LayerChanges {
    /// The changes that turn a root sealed as `parent` into one sealed as `child`.
    pub fn between(parent: &Seal, child: &Seal) -> LayerChanges {
        let before = parent.by_path();
        let after = child.by_path();
        let write = child
            .entries
            .iter()
            .filter(|e| {
                before
                    .get(e.path.as_str())
                    .is_none_or(|p| !p.changes(e).is_empty())
            })
            .cloned()
            .collect();
        // A deleted directory needs one whiteout, not one per child.
        let mut delete: Vec<String> = Vec::new();
        for path in before.keys() {
            if after.contains_key(path) {
                continue;
            }
            if delete
                .last()
                .is_some_and(|d| path.starts_with(&format!("{d}/")))
            {
                continue;
            }
            delete.push(path.to_string());
        }
        // A path whose type changed from directory to something else must be
        // whited out first so the lower directory's children disappear.
        for e in child.entries.iter() {
            if let Some(p) = before.get(e.path.as_str()) {
                if p.kind == Kind::Dir && e.kind != Kind::Dir {
                    delete.push(e.path.clone());
                }
            }
        }
        delete.sort();
        delete.dedup();
        LayerChanges { write, delete }
    }
}

/// Writes a normalised layer tar of `changes`, reading content from `root`.
/// Returns the writer. Entries are in path order, whiteouts first within
/// their directory so that a lower path is removed before anything new lands.
pub fn write_layer<W: Write>(root: &Path, changes: &LayerChanges, mtime: u64, out: W) -> Result<W> {
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let mut items: Vec<(String, Option<&Entry>)> = changes
        .delete
        .iter()
        .map(|p| {
            let (dir, name) = split(p);
            (join(dir, &format!("{WHITEOUT}{name}")), None)
        })
        .chain(changes.write.iter().map(|e| (e.path.clone(), Some(e))))
        .collect();
    items.sort_by_key(|a| order_key(&a.0));
    let io = |e: io::Error| ImageError::Io {
        op: "write layer from",
        path: root.to_path_buf(),
        source: e,
    };
    for (path, entry) in items {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(mtime);
        h.set_username("").map_err(io)?;
        h.set_groupname("").map_err(io)?;
        match entry {
            None => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(0);
                tar.append_data(&mut h, &path, io::empty()).map_err(io)?;
            }
            Some(e) => {
                h.set_mode(e.mode);
                h.set_uid(e.uid as u64);
                h.set_gid(e.gid as u64);
                match e.kind {
                    Kind::File => {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_size(e.size);
                        let full = root.join(&e.path);
                        let f = fs::File::open(&full).ctx("open", &full)?;
                        // The file must not change between sealing and packing.
                        let len = f.metadata().ctx("stat", &full)?.len();
                        if len != e.size {
                            return Err(ImageError::Corrupt(format!("{} changed while it was packed", full.display())));
                        }
                        tar.append_data(&mut h, &e.path, f.take(e.size)).map_err(io)?;
                    }
                    Kind::Dir => {
                        h.set_entry_type(tar::EntryType::Directory);
                        h.set_size(0);
                        tar.append_data(&mut h, format!("{}/", e.path), io::empty()).map_err(io)?;
                    }
                    Kind::Symlink => {
                        h.set_entry_type(tar::EntryType::Symlink);
                        h.set_size(0);
                        tar.append_link(&mut h, &e.path, e.target.as_deref().unwrap_or("")).map_err(io)?;
                    }
                    Kind::Fifo => {
                        h.set_entry_type(tar::EntryType::Fifo);
                        h.set_size(0);
                        tar.append_data(&mut h, &e.path, io::empty()).map_err(io)?;
                    }
                    Kind::CharDevice | Kind::BlockDevice | Kind::Socket => {
                        return Err(ImageError::Hostile {
                            archive: format!("image root {}", root.display()),
                            entry: e.path.clone(),
                            reason: "is a device node or socket, which images may not contain (the runtime provides /dev)".into(),
                        })
                    }
                }
            }
        }
    }
    tar.into_inner().map_err(io)
}

/// Whiteouts sort before their siblings; otherwise plain path order, with a
/// directory before its children.
fn order_key(path: &str) -> (String, u8, String) {
    let (dir, name) = split(path);
    (
        dir.to_string(),
        if name.starts_with(WHITEOUT) { 0 } else { 1 },
        name.to_string(),
    )
}

fn split(path: &str) -> (&str, &str) {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", path.trim_end_matches('/')),
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Opens a layer or rootfs archive, decompressing gzip or zstd by magic number.
pub fn open_archive(path: &Path) -> Result<Box<dyn Read>> {
    let mut f = io::BufReader::new(fs::File::open(path).ctx("open", path)?);
    let mut magic = [0u8; 4];
    let n = {
        use io::BufRead;
        let buf = f.fill_buf().ctx("read", path)?;
        let n = buf.len().min(4);
        magic[..n].copy_from_slice(&buf[..n]);
        n
    };
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(f)))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        let d = ruzstd::StreamingDecoder::new(f).map_err(|e| ImageError::Io {
            op: "decompress",
            path: path.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(f))
    }
}

/// Applies a layer to `root`, honouring OCI whiteouts. `archive` names the
/// source in errors. Nothing is ever written outside `root`, and nothing
/// past `budget`: the entry that would exceed it is refused before a byte
/// of it is written.
pub fn apply_layer(
    reader: impl Read,
    root: &Path,
    archive: &str,
    budget: &mut Budget,
) -> Result<()> {
    let mut ar = tar::Archive::new(reader);
    let hostile = |entry: &str, reason: &str| ImageError::Hostile {
        archive: archive.to_string(),
        entry: entry.to_string(),
        reason: reason.to_string(),
    };
    let rerr = |e: io::Error| ImageError::Io {
        op: "read archive",
        path: PathBuf::from(archive),
        source: e,
    };
    let mut hardlinks = Vec::new();
    for item in ar.entries().map_err(rerr)? {
        let mut item = item.map_err(rerr)?;
        let raw = item.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let rel = clean_path(&raw).map_err(|r| hostile(&shown, r))?;
        let Some(rel) = rel else { continue };
        if rel.as_os_str().len() > MAX_PATH {
            return Err(hostile(
                &shown.chars().take(120).collect::<String>(),
                &format!("has a path longer than {MAX_PATH} bytes"),
            ));
        }
        if !budget.take(item.header().entry_size().unwrap_or(0).saturating_add(512)) {
            return Err(ImageError::ImportTooLarge {
                archive: archive.to_string(),
                limit: budget.limit,
            });
        }
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = rel.parent().unwrap_or(Path::new(""));
        ensure_parents(root, parent).map_err(|r| hostile(&shown, &r))?;
        let dest = root.join(&rel);
        if name == OPAQUE {
            let dir = root.join(parent);
            for child in fs::read_dir(&dir).ctx("read directory", &dir)? {
                remove_any(&child.ctx("read directory", &dir)?.path())?;
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(hostile(&shown, "is a malformed whiteout"));
            }
            remove_any(&root.join(parent).join(hidden))?;
            continue;
        }
        let h = item.header();
        let mode = h.mode().map_err(rerr)? & 0o7777;
        let uid = h.uid().map_err(rerr)? as u32;
        let gid = h.gid().map_err(rerr)? as u32;
        let mtime = h.mtime().unwrap_or(0) as i64;
        let kind = h.entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                replace_non_dir(&dest)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
                    .ctx("create", &dest)?;
                io::copy(&mut item, &mut f).ctx("write", &dest)?;
                drop(f);
                finish(&dest, mode, uid, gid, mtime)?;
            }
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&dest)?;
                        fs::create_dir(&dest).ctx("create directory", &dest)?;
                    }
                    Err(_) => fs::create_dir(&dest).ctx("create directory", &dest)?,
                }
                finish(&dest, mode, uid, gid, mtime)?;
            }
            tar::EntryType::Symlink => {
                let target = item
                    .link_name_bytes()
                    .ok_or_else(|| hostile(&shown, "is a symlink without a target"))?
                    .into_owned();
                replace_non_dir(&dest)?;
                std::os::unix::fs::symlink(
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&target),
                    &dest,
                )
                .ctx("create symlink", &dest)?;
                nix::unistd::fchownat(
                    None,
                    &dest,
                    Some(uid.into()),
                    Some(gid.into()),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| ImageError::Io {
                    op: "chown",
                    path: dest.clone(),
                    source: e.into(),
                })?;
            }
            tar::EntryType::Link => {
                let target = item
                    .link_name_bytes()
                    .ok_or_else(|| hostile(&shown, "is a hard link without a target"))?
                    .into_owned();
                let target_rel = clean_path(&target)
                    .map_err(|r| hostile(&shown, &format!("links to a path that {r}")))?
                    .ok_or_else(|| hostile(&shown, "links to the root"))?;
                hardlinks.push((rel.clone(), target_rel, shown.clone()));
                let src = root.join(&hardlinks.last().unwrap().1);
                ensure_parents(
                    root,
                    hardlinks
                        .last()
                        .unwrap()
                        .1
                        .parent()
                        .unwrap_or(Path::new("")),
                )
                .map_err(|r| hostile(&shown, &r))?;
                match fs::symlink_metadata(&src) {
                    Ok(m) if m.is_file() => {}
                    _ => {
                        return Err(hostile(
                            &shown,
                            "links to something that is not an earlier regular file",
                        ))
                    }
                }
                replace_non_dir(&dest)?;
                fs::hard_link(&src, &dest).ctx("create hard link", &dest)?;
            }
            tar::EntryType::Fifo => {
                replace_non_dir(&dest)?;
                nix::unistd::mkfifo(&dest, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(|e| ImageError::Io {
                        op: "create fifo",
                        path: dest.clone(),
                        source: e.into(),
                    })?;
                finish(&dest, mode, uid, gid, mtime)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(hostile(
                    &shown,
                    "is a device node, which images may not contain (the runtime provides /dev)",
                ));
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            other => {
                return Err(hostile(
                    &shown,
                    &format!("has an unsupported type {other:?}"),
                ))
            }
        }
    }
    Ok(())
}

/// A relative, normalised path, or why it is refused; `None` for the root itself.
fn clean_path(raw: &[u8]) -> std::result::Result<Option<PathBuf>, &'static str> {
    let p = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(raw));
    if p.is_absolute() {
        return Err("has an absolute path");
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("climbs out of the root with `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("has an absolute path"),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Creates missing parent directories of an entry and refuses any parent
/// that is not a real directory (a symlink there would redirect the write).
fn ensure_parents(root: &Path, parent: &Path) -> std::result::Result<(), String> {
    let mut cur = root.to_path_buf();
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                let rel = cur.strip_prefix(root).unwrap_or(&cur).display().to_string();
                return Err(format!(
                    "would be written through the symlink `{rel}`, which could escape the root"
                ));
            }
            Ok(_) => {
                let rel = cur.strip_prefix(root).unwrap_or(&cur).display().to_string();
                return Err(format!("has a parent `{rel}` that is not a directory"));
            }
            Err(_) => {
                fs::create_dir(&cur).map_err(|e| format!("cannot create parent directory: {e}"))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

fn replace_non_dir(dest: &Path) -> Result<()> {
    match fs::symlink_metadata(dest) {
        Ok(_) => remove_any(dest),
        Err(_) => Ok(()),
    }
}

/// Removes a path of any type, not following symlinks, at any depth.
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => remove_tree(path).ctx("remove", path),
        Ok(_) => fs::remove_file(path).ctx("remove", path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::Io {
            op: "stat",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Removes the directory `top` and everything below it, iteratively, with
/// at most two directories open: every subdirectory of a subdirectory of
/// `top` is first moved up into `top` (a rename within one directory of
/// one filesystem), so nothing is ever deeper than two levels and no path
/// is longer than two names. Interrupted, it leaves only part of `top`.
fn remove_tree(top: &Path) -> io::Result<()> {
    use nix::dir::{Dir, Type};
    use nix::fcntl::{renameat2, OFlag, RenameFlags};
    use nix::sys::stat::{fstatat, Mode, SFlag};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    // Entries of a directory (not `.` and `..`), and whether each is a directory.
    let entries = |dir: &mut Dir| -> io::Result<Vec<(std::ffi::CString, bool)>> {
        let fd = dir.as_raw_fd();
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e?;
            let name = e.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let is_dir = match e.file_type() {
                Some(t) => t == Type::Directory,
                None => {
                    let st = fstatat(Some(fd), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                }
            };
            out.push((name.to_owned(), is_dir));
        }
        Ok(out)
    };
    let mut root = Dir::open(top, flags, Mode::empty())?;
    let root_fd = root.as_raw_fd();
    let mut counter = 0u64;
    loop {
        let mut subdirs = Vec::new();
        for (name, is_dir) in entries(&mut root)? {
            if is_dir {
                subdirs.push(name);
            } else {
                unlinkat(Some(root_fd), name.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
            }
        }
        if subdirs.is_empty() {
            break;
        }
        for sub in subdirs {
            let mut dir = Dir::openat(Some(root_fd), sub.as_c_str(), flags, Mode::empty())?;
            let dir_fd = dir.as_raw_fd();
            for (name, is_dir) in entries(&mut dir)? {
                if !is_dir {
                    unlinkat(Some(dir_fd), name.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
                    continue;
                }
                loop {
                    counter += 1;
                    let up = std::ffi::CString::new(format!(".kiln-rm-{counter}"))
                        .expect("no NUL in a number");
                    match renameat2(
                        Some(dir_fd),
                        name.as_c_str(),
                        Some(root_fd),
                        up.as_c_str(),
                        RenameFlags::RENAME_NOREPLACE,
                    ) {
                        Err(nix::errno::Errno::EEXIST) => continue,
                        other => break other?,
                    }
                }
            }
            drop(dir);
            unlinkat(Some(root_fd), sub.as_c_str(), UnlinkatFlags::RemoveDir)?;
        }
    }
    drop(root);
    fs::remove_dir(top)
}

fn finish(dest: &Path, mode: u32, uid: u32, gid: u32, mtime: i64) -> Result<()> {
    let sys = |op: &'static str| {
        move |e: nix::Error| ImageError::Io {
            op,
            path: dest.to_path_buf(),
            source: e.into(),
        }
    };
    nix::unistd::chown(dest, Some(uid.into()), Some(gid.into())).map_err(sys("chown"))?;
    // chown clears setuid bits: set the mode after it.
    fs::set_permissions(dest, fs::Permissions::from_mode(mode)).ctx("chmod", dest)?;
    let t = nix::sys::time::TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        None,
        dest,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(sys("set times of"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};

    /// `levels` nested directories `d` below `top`, made relative to open
    /// descriptors: their full path is far longer than the kernel allows.
    fn nest(top: &Path, levels: usize) {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut fd = nix::fcntl::open(top, flags, Mode::empty()).unwrap();
        for _ in 0..levels {
            mkdirat(Some(fd), "d", Mode::from_bits_truncate(0o755)).unwrap();
            let next = openat(Some(fd), "d", flags, Mode::empty()).unwrap();
            nix::unistd::close(fd).unwrap();
            fd = next;
        }
        // A file at the bottom, and a symlink that must not be followed.
        let file = openat(
            Some(fd),
            "f",
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        nix::unistd::close(file).unwrap();
        nix::unistd::symlinkat("/", Some(fd), "up").unwrap();
        nix::unistd::close(fd).unwrap();
    }

    #[test]
    fn a_tree_ten_thousand_deep_is_removed_with_few_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("deep");
        fs::create_dir(&top).unwrap();
        nest(&top, 10_000);
        fs::create_dir_all(top.join("wide/a/b")).unwrap();
        fs::write(top.join("wide/a/b/x"), "x").unwrap();
        // Our own names in the tree do not get in the way of the renames.
        fs::create_dir(top.join(".kiln-rm-1")).unwrap();
        remove_any(&top).unwrap();
        assert!(!top.exists());
        assert!(Path::new("/").exists(), "the symlink was followed");
    }

    #[test]
    fn an_archive_past_its_budget_is_refused_before_the_entry_is_written() {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, size) in [("small", 100usize), ("big", 10_000)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(size as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, &vec![0u8; size][..]).unwrap();
        }
        let bytes = tar.into_inner().unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut budget = Budget::new(5_000);
        let err = apply_layer(&bytes[..], root.path(), "test.tar", &mut budget).unwrap_err();
        assert_eq!(
            err.to_string(),
            "refused test.tar: it expands past the import limit of 4.8 KiB (`import_limit` in kiln.toml)"
        );
        assert!(root.path().join("small").exists());
        assert!(!root.path().join("big").exists());
        let root = tempfile::tempdir().unwrap();
        apply_layer(
            &bytes[..],
            root.path(),
            "test.tar",
            &mut Budget::new(11_124),
        )
        .unwrap();
    }
}
