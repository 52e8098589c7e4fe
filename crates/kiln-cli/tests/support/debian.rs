//! A real Debian base for end-to-end tests: `debootstrap --variant=minbase
//! bookworm`, as a tarball that `from = { rootfs = "..." }` imports.
//!
//! Built once and shared by every test and every test binary: it lives
//! under `$CARGO_TARGET_TMPDIR/kiln-debian/`, and an exclusive `flock` on a
//! lock file next to it makes concurrent callers (threads or processes)
//! wait for the one that builds it. A tarball that exists is complete (it
//! is written under a temporary name, then renamed). Set
//! `KILN_TEST_DEBIAN_MIRROR` to use another mirror (a snapshot URL pins the
//! package versions).
//!
//! The tarball has no device nodes (kiln refuses them in bases), no apt
//! lists (scripts run `apt-get update`) and no `.deb` cache.

#![allow(dead_code)]

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The suite the fixture bootstraps.
pub const SUITE: &str = "bookworm";

const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The path of `bookworm-minbase.tar`, building it on first use.
pub fn debian_rootfs() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| build(Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-debian")))
        .clone()
}

/// Holds an exclusive `flock` on a file until dropped.
struct Flock(fs::File);

impl Flock {
    fn acquire(path: &Path) -> Flock {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            assert!(
                e.kind() == std::io::ErrorKind::Interrupted,
                "cannot lock {}: {e}",
                path.display()
            );
        }
        Flock(f)
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor we locked.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

fn build(dir: PathBuf) -> PathBuf {
    fs::create_dir_all(&dir).expect("fixture directory");
    let tar = dir.join(format!("{SUITE}-minbase.tar"));
    let _lock = Flock::acquire(&dir.join(format!("{SUITE}-minbase.lock")));
    if tar.is_file() {
        return tar;
    }
    // Debris of a builder that was killed: nobody else holds the lock.
    if let Ok(items) = fs::read_dir(&dir) {
        for i in items.flatten() {
            if i.file_name().to_string_lossy().starts_with("work.") {
                let _ = fs::remove_dir_all(i.path());
            }
        }
    }
    let work = dir.join(format!("work.{}", std::process::id()));
    let root = work.join("root");
    fs::create_dir_all(&work).unwrap();
    let mirror = std::env::var("KILN_TEST_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
    let out = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(SUITE)
        .arg(&root)
        .arg(&mirror)
        .env("SOURCE_DATE_EPOCH", "86400")
        .output()
        .expect("debootstrap is installed (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "debootstrap {SUITE} from {mirror} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for d in [
        "dev",
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "var/log",
        "tmp",
        "run",
    ] {
        if let Ok(items) = fs::read_dir(root.join(d)) {
            for i in items.flatten() {
                let p = i.path();
                if i.file_name() == "partial" || i.file_name() == "lock" {
                    continue;
                }
                if p.is_dir() && !p.is_symlink() {
                    fs::remove_dir_all(&p).unwrap();
                } else {
                    fs::remove_file(&p).unwrap();
                }
            }
        }
    }
    let part = work.join("out.tar");
    let st = Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&part)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success(), "tar of the Debian root failed");
    fs::rename(&part, &tar).unwrap();
    fs::remove_dir_all(&work).unwrap();
    tar
}
