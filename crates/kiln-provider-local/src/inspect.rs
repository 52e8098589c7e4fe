//! Looking inside a running server, read-only, for drift: processes that
//! do not descend from its first process, files written in its writable
//! areas, sockets it listens on, its cgroup's memory limit. Everything is
//! read from the host's `/proc`, the server's cgroup and the volume
//! directories; nothing is run inside the server.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_provider::Written;

/// Every process on the host: parent, pid namespace, whether a zombie.
pub(crate) struct Procs {
    parent: std::collections::BTreeMap<i32, i32>,
    ns: std::collections::BTreeMap<i32, PathBuf>,
    zombie: std::collections::BTreeSet<i32>,
}

impl Procs {
    pub(crate) fn read() -> Procs {
        let mut p = Procs {
            parent: Default::default(),
            ns: Default::default(),
            zombie: Default::default(),
        };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
            p.parent.insert(
                pid,
                rest.split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            );
            if rest.starts_with('Z') || rest.starts_with('X') {
                p.zombie.insert(pid);
            }
            if let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/pid")) {
                p.ns.insert(pid, ns);
            }
        }
        p
    }
}

/// TCP ports in LISTEN state in the network namespace of `pid`, from
/// `/proc/PID/net/tcp` and `tcp6` (`local_address` is `HEXIP:HEXPORT`,
/// state `0A` is LISTEN).
pub(crate) fn listening_ports(pid: i32) -> Vec<u16> {
    let mut out = std::collections::BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut cols = line.split_whitespace();
            let (Some(local), Some(state)) = (cols.nth(1), cols.nth(1)) else {
                continue;
            };
            if state == "0A" {
                if let Some(port) = local
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                {
                    out.insert(port);
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Processes in `pid`'s pid namespace that are not `pid` or its
/// descendants, as `pid: command line`.
pub(crate) fn foreign_processes(pid: i32, procs: &Procs) -> Vec<String> {
    let Some(target) = procs.ns.get(&pid) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (&p, ns) in &procs.ns {
        // A zombie runs nothing: it is only waiting to be reaped.
        if ns != target || procs.zombie.contains(&p) {
            continue;
        }
        let mut cur = p;
        let mut descends = false;
        for _ in 0..64 {
            if cur == pid {
                descends = true;
                break;
            }
            match procs.parent.get(&cur) {
                Some(&pp) if pp > 0 => cur = pp,
                _ => break,
            }
        }
        if !descends {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd: Vec<String> = cmd
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            out.push(format!("{p}: {}", cmd.join(" ")));
        }
    }
    out
}

/// Most entries one walk of a writable area reports: a server that fills
/// its tmpfs with millions of files is not listed file by file.
const WALK_LIMIT: usize = 100_000;

/// Every non-directory below `dir` (iteratively: no depth can overflow the
/// stack), shown as `shown/...`, flagged executable (mode bits or an ELF
/// header) and setuid/setgid.
pub(crate) fn walk_files(dir: &Path, shown: &str, in_volume: bool, out: &mut Vec<Written>) {
    let mut stack: Vec<(PathBuf, String)> =
        vec![(dir.to_path_buf(), shown.trim_end_matches('/').to_string())];
    while let Some((dir, shown)) = stack.pop() {
        let Ok(items) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in items.flatten() {
            if out.len() >= WALK_LIMIT {
                return;
            }
            let name = item.file_name().to_string_lossy().into_owned();
            let path = format!("{shown}/{name}");
            // symlink_metadata: a link is reported as what it is, never followed.
            let Ok(m) = item.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push((item.path(), path));
                continue;
            }
            let mode = m.permissions().mode();
            let executable = m.is_file() && (mode & 0o111 != 0 || elf(&item.path()));
            out.push(Written {
                path,
                executable,
                setid: mode & 0o6000 != 0,
                in_volume,
            });
        }
    }
}

fn elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"\x7fELF"
}

/// Device and inode of the root a process runs from.
pub(crate) fn root_inode(pid: i32) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/root"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}
