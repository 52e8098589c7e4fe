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

/// TCP ports in LISTEN state in the network namespace of `pid`.
///
/// Asked of the kernel through sock_diag with a LISTEN-only filter, so only
/// the listening hash is visited. Reading `/proc/PID/net/tcp` instead walks
/// the host's whole established-socket table on every read (profiled at 74%
/// of a 20-server drift check); it stays as the fallback for a kernel
/// without `inet_diag`.
pub(crate) fn listening_ports(pid: i32) -> Vec<u16> {
    match diag::listening_ports(pid) {
        Ok(ports) => ports,
        Err(e) => {
            tracing::debug!(pid, error = %e, "sock_diag unavailable, reading /proc/PID/net/tcp");
            listening_ports_proc(pid)
        }
    }
}

/// The same answer from `/proc/PID/net/tcp` and `tcp6` (`local_address` is
/// `HEXIP:HEXPORT`, state `0A` is LISTEN).
fn listening_ports_proc(pid: i32) -> Vec<u16> {
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

/// A sock_diag dump of LISTEN sockets inside another network namespace.
mod diag {
    use std::collections::BTreeSet;
    use std::io;

    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

    pub(super) fn listening_ports(pid: i32) -> io::Result<Vec<u16>> {
        let socket = socket_in_netns_of(pid)?;
        let mut out = BTreeSet::new();
        for (family, id) in [
            (AF_INET, SocketId::new_v4()),
            (AF_INET6, SocketId::new_v6()),
        ] {
            dump(&socket, family, id, &mut out)?;
        }
        Ok(out.into_iter().collect())
    }

    /// A netlink socket belongs to the network namespace it was created in:
    /// a short-lived thread enters `pid`'s namespace, creates it and exits,
    /// leaving this thread where it was.
    fn socket_in_netns_of(pid: i32) -> io::Result<Socket> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
                socket.bind_auto()?;
                socket.connect(&SocketAddr::new(0, 0))?;
                Ok(socket)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread panicked")))
        })
    }

    fn dump(socket: &Socket, family: u8, id: SocketId, out: &mut BTreeSet<u16>) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id: id,
            })
            .into(),
        );
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0)?;
        let mut rx = vec![0u8; 32 * 1024];
        loop {
            let size = socket.recv(&mut &mut rx[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[offset..size])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        out.insert(r.header.socket_id.source_port);
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return Err(io::Error::other(format!("sock_diag: {e}")))
                    }
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_diag_sees_the_same_listeners_as_proc() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        // A connected socket is not a listener.
        let client = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let pid = std::process::id() as i32;
        let diag = diag::listening_ports(pid).expect("sock_diag answers in this namespace");
        assert!(diag.contains(&v4.local_addr().unwrap().port()), "{diag:?}");
        assert!(
            !diag.contains(&client.local_addr().unwrap().port()),
            "{diag:?}"
        );
        if let Some(v6) = v6 {
            assert!(diag.contains(&v6.local_addr().unwrap().port()), "{diag:?}");
        }
        let proc = listening_ports_proc(pid);
        // Other tests may open listeners meanwhile: compare only this one.
        assert!(proc.contains(&v4.local_addr().unwrap().port()), "{proc:?}");
    }
}
