//! Secrets delivered to a server: each server gets a tmpfs of its own,
//! holding one file per secret (mode 0400, owned by the server's user),
//! bound read-only at `/run/secrets` inside the sandbox.
//!
//! The plaintext lives only in memory. The tmpfs is mounted on the host
//! (private, `nosuid,nodev,noexec`) just long enough for the sandbox to
//! bind it; once the sandbox runs, the host's mount is detached, so the
//! server's mount namespace holds the only reference and the memory goes
//! when the server does. No file of the store, the logs or the state ever
//! holds a value; a crash between staging and detaching leaves a mount
//! under `<dir>/secrets/` that the next create or destroy of that server
//! removes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_model::ResolvedUser;
use kiln_provider::SecretFile;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chown, Gid, Uid};

/// Where a server's secrets are staged on the host before its sandbox
/// binds them: `<dir>/secrets/<id>`.
pub(crate) fn staging_dir(dir: &Path, id: &str) -> PathBuf {
    dir.join("secrets").join(id)
}

/// Mounts a fresh tmpfs at `at` and writes `files` into it, owned by
/// `user` (root when `None`). Returns `at`, to bind into the sandbox.
/// On failure nothing stays mounted.
pub(crate) fn stage(
    at: &Path,
    files: &[SecretFile],
    user: Option<&ResolvedUser>,
) -> Result<(), String> {
    release(at);
    std::fs::create_dir_all(at).map_err(|e| format!("create {}: {e}", at.display()))?;
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", at.display()))?;
    // One page per file and its inode, plus one: tmpfs counts whole pages.
    let pages: usize = files.iter().map(|f| f.value.len().div_ceil(4096) + 1).sum();
    let size = (pages + 1) * 4096;
    let options = format!("size={size},nr_inodes={},mode=0700", files.len() + 8);
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(|e| format!("mount a tmpfs on {}: {e}", at.display()))?;
    let filled = (|| {
        // Private: nothing mounted or unmounted here propagates to or from
        // other mount namespaces (the sandbox's copy stays its own).
        mount(
            None::<&str>,
            at,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("make {} private: {e}", at.display()))?;
        let (uid, gid) = user.map_or((0, 0), |u| (u.uid, u.gid));
        let (uid, gid) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        for f in files {
            let path = at.join(&f.name);
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&path)
                .map_err(|e| format!("create secret file `{}`: {e}", f.name))?;
            out.write_all(&f.value)
                .map_err(|e| format!("write secret file `{}`: {e}", f.name))?;
            chown(&path, uid, gid).map_err(|e| format!("chown secret file `{}`: {e}", f.name))?;
        }
        chown(at, uid, gid).map_err(|e| format!("chown {}: {e}", at.display()))?;
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o500))
            .map_err(|e| format!("chmod {}: {e}", at.display()))
    })();
    if filled.is_err() {
        release(at);
    }
    filled
}

/// Detaches the host's mount at `at` (sandboxes that bound it keep
/// theirs) and removes the directory. Nothing there is not an error.
pub(crate) fn release(at: &Path) {
    // Several mounts may be stacked there after crashes; each call detaches one.
    for _ in 0..8 {
        if umount2(at, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
    let _ = std::fs::remove_dir(at);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounted(at: &Path) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let at = at.display().to_string();
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(at.as_str()))
    }

    #[test]
    fn staged_secrets_are_0400_files_of_the_user_on_a_tmpfs_that_release_removes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let at = staging_dir(dir.path(), "app-0001");
        let files = vec![SecretFile {
            name: "db_password".into(),
            value: zeroize::Zeroizing::new(b"s3cret".to_vec()),
        }];
        let user = ResolvedUser {
            name: None,
            uid: 1234,
            gid: 2345,
            additional_gids: vec![],
            home: None,
        };
        stage(&at, &files, Some(&user)).unwrap();
        assert!(mounted(&at));
        let m = std::fs::metadata(at.join("db_password")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o400);
        assert_eq!((m.uid(), m.gid()), (1234, 2345));
        assert_eq!(std::fs::read(at.join("db_password")).unwrap(), b"s3cret");
        let fs = nix::sys::statfs::statfs(&at).unwrap();
        assert_eq!(fs.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
        release(&at);
        assert!(!mounted(&at));
        assert!(!at.exists());
        // Releasing what is not there is fine.
        release(&at);
    }

    #[test]
    fn a_bad_name_leaves_nothing_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let at = staging_dir(dir.path(), "app-0002");
        let files = vec![SecretFile {
            name: "no/such/dir".into(),
            value: zeroize::Zeroizing::new(b"x".to_vec()),
        }];
        let err = stage(&at, &files, None).unwrap_err();
        assert!(err.contains("no/such/dir"), "{err}");
        assert!(!mounted(&at));
        assert!(!at.exists());
    }
}
