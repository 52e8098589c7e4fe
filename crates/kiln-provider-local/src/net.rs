//! Host networking for local servers. Owns one Linux bridge per environment (`kb-<hash>`,
//! gateway = the subnet's `.1`) and one network namespace per server (`kiln-<id>` under
//! `/var/run/netns`), joined to it by a veth pair (`kv<hash>` on the host, `eth0` inside).
//! The host reaches servers directly on the bridge: no sysctl, NAT or firewall rule is touched.
//!
//! Everything goes through the `ip` command, not a netlink crate (rtnetlink
//! and friends bring an async runtime and a large dependency tree for a
//! handful of requests). For a fast server start each operation is one
//! `ip -batch -` process (`attach` needs a second, `ip -n`, for the inside of
//! the namespace) and existence checks read `/proc` instead of spawning.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;

use kiln_model::Subnet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NETNS_DIR: &str = "/var/run/netns";
const NETNS_PREFIX: &str = "kiln-";
const READY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("subnet {subnet} of {env} overlaps {user}; give the environment another `subnet`")]
    Conflict {
        subnet: Subnet,
        env: String,
        user: String,
    },
    #[error("invalid server id `{id}`: expected letters, digits, '-', '_' or '.'")]
    ServerId { id: String },
    #[error("{addr} is not a server address of {subnet}")]
    Address { addr: Ipv4Addr, subnet: Subnet },
    #[error("bridge port {veth} not forwarding after {}s", READY_TIMEOUT.as_secs())]
    NotReady { veth: String },
    #[error("cannot run `{cmd}`")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An environment's network: a bridge named from the env, the subnet's
/// first host address (.1) on the bridge as gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvNet {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub subnet: Subnet,
}

/// Creates the environment's bridge if missing, gives it the gateway
/// address if missing and sets it up. Idempotent; one `ip` process.
pub fn ensure_env(env: &str, subnet: Subnet) -> Result<EnvNet, NetError> {
    let (gateway, prefix) = (subnet.gateway(), subnet.prefix());
    let net = EnvNet {
        bridge: bridge_name(env),
        gateway,
        prefix,
        subnet,
    };
    let mut script = String::new();
    let new = !link_exists(&net.bridge)?;
    if new {
        if let Some(user) = conflict(env, subnet)? {
            return Err(NetError::Conflict {
                subnet,
                env: env.to_string(),
                user,
            });
        }
        // A fixed MAC: otherwise the bridge takes the lowest MAC among its
        // ports, which changes as servers come and go and leaves stale
        // gateway entries in the servers' ARP caches.
        let h = fnv(env).to_be_bytes();
        let mac = format!(
            "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            h[0], h[1], h[2], h[3], h[4]
        );
        writeln!(script, "link add {} address {mac} type bridge", net.bridge).unwrap();
    }
    // `replace` is a no-op when the address is already there.
    let b = &net.bridge;
    writeln!(
        script,
        "addr replace {gateway}/{prefix} dev {b}\nlink set dev {b} up"
    )
    .unwrap();
    ip(&[], &script)?;
    if new {
        register(&net.bridge, env, subnet);
    }
    if new || !crate::firewall::isolated(&net.bridge) {
        crate::firewall::isolate(&net.bridge, subnet, &[])?;
    }
    Ok(net)
}

/// The bridge of the environment network keyed `env`.
pub fn bridge_name(env: &str) -> String {
    format!("kb-{}", hash10(env))
}

/// Where kiln notes whose each bridge is, so a collision names the other
/// project's environment (`/run`: bridges do not outlive a reboot either).
const REGISTRY: &str = "/run/kiln/networks";

fn register(bridge: &str, env: &str, subnet: Subnet) {
    let _ = std::fs::create_dir_all(REGISTRY);
    // The subnet, then the key (a path, which may hold spaces).
    let _ = std::fs::write(
        Path::new(REGISTRY).join(bridge),
        format!("{subnet}\n{env}\n"),
    );
}

/// The subnet a kiln bridge was registered with.
pub fn registered_subnet(bridge: &str) -> Option<Subnet> {
    let text = std::fs::read_to_string(Path::new(REGISTRY).join(bridge)).ok()?;
    text.lines().next()?.parse().ok()
}

/// Who else on this host uses addresses of `subnet`: another kiln
/// environment (named by its store and environment) or an interface.
/// `None` when it is free, or used only by the environment keyed `env`.
pub fn conflict(env: &str, subnet: Subnet) -> Result<Option<String>, NetError> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map_err(|source| NetError::Spawn {
            cmd: "ip -4 -o addr show".into(),
            source,
        })?;
    let ours = bridge_name(env);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `377: kb-be032875b3    inet 10.77.63.1/24 scope global ...`
        let mut words = line.split_whitespace();
        let (Some(iface), Some("inet"), Some(cidr)) = (words.nth(1), words.next(), words.next())
        else {
            continue;
        };
        let Some((addr, prefix)) = cidr.split_once('/') else {
            continue;
        };
        let (Ok(addr), Ok(prefix)) = (addr.parse::<Ipv4Addr>(), prefix.parse::<u8>()) else {
            continue;
        };
        if iface == ours || !overlaps(subnet, addr, prefix) {
            continue;
        }
        let owner = std::fs::read_to_string(Path::new(REGISTRY).join(iface))
            .ok()
            .and_then(|t| t.lines().nth(1).map(str::to_string));
        return Ok(Some(match owner {
            Some(key) => format!("kiln environment {key} (bridge {iface}, {cidr})"),
            None => format!("interface {iface} ({cidr})"),
        }));
    }
    Ok(None)
}

/// Whether `subnet` and the network of `addr/prefix` share addresses.
fn overlaps(subnet: Subnet, addr: Ipv4Addr, prefix: u8) -> bool {
    let p = prefix.min(subnet.prefix());
    let m = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
    u32::from(addr) & m == u32::from(subnet.network()) & m
}

/// Deletes the environment's bridge and its firewall rules if present
/// (idempotent). Ports still attached are released, not deleted: `detach`
/// owns them.
pub fn remove_env(env: &str) -> Result<(), NetError> {
    let bridge = bridge_name(env);
    crate::firewall::remove(&bridge)?;
    if link_exists(&bridge)? {
        ip(&[], &format!("link del {bridge}\n"))?;
    }
    let _ = std::fs::remove_file(Path::new(REGISTRY).join(&bridge));
    Ok(())
}

/// Server ids that have a network namespace on this host, whichever
/// project made them.
pub fn netns_ids() -> Vec<String> {
    let Ok(items) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    items
        .flatten()
        .filter_map(|i| {
            i.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(NETNS_PREFIX))
                .map(str::to_string)
        })
        .collect()
}

/// The namespace a server's container joins: `/var/run/netns/kiln-<id>`.
pub fn netns_path(server_id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("{NETNS_PREFIX}{server_id}"))
}

/// Creates the server's namespace with `eth0` at `addr` on the bridge and a
/// default route via the gateway, and returns its path once the host can
/// reach it. Leftovers of the same id (a crashed run) are removed first.
pub fn attach(net: &EnvNet, server_id: &str, addr: Ipv4Addr) -> Result<PathBuf, NetError> {
    check_id(server_id)?;
    if !net.subnet.is_host(addr) {
        return Err(NetError::Address {
            addr,
            subnet: net.subnet,
        });
    }
    let (ns, veth) = (
        format!("{NETNS_PREFIX}{server_id}"),
        format!("kv{}", hash10(server_id)),
    );
    let mut host = cleanup_script(server_id, &veth)?;
    // The peer is created inside the namespace, already named eth0, so it
    // never appears (or clashes with a name) on the host.
    // eth0's MAC is derived from its address (as Docker does): a server
    // that takes over an address a destroyed server had answers with the
    // same MAC, so the host's and the balancer's ARP entries stay right
    // instead of pointing at a dead veth for seconds.
    let o = addr.octets();
    let mac = format!("02:4b:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    writeln!(
        host,
        "netns add {ns}\nlink add {veth} type veth peer name eth0 address {mac} netns {ns}"
    )
    .unwrap();
    writeln!(host, "link set dev {veth} master {} up", net.bridge).unwrap();
    // Addresses and link state do not survive a move between namespaces, so
    // the inside is configured from inside, by a second process.
    let inside = format!(
        "link set dev lo up\naddr add {addr}/{} dev eth0\nlink set dev eth0 up\n\
         route add default via {}\n",
        net.prefix, net.gateway
    );
    let wired = ip(&[], &host).and_then(|()| ip(&["-n", &ns], &inside));
    if let Err(e) = wired.and_then(|()| wait_forwarding(&veth)) {
        let _ = detach(server_id); // do not leave a half-wired namespace behind
        return Err(e);
    }
    Ok(netns_path(server_id))
}

/// Deletes the server's host veth and namespace, whichever are present.
/// Idempotent; at most one `ip` process.
pub fn detach(server_id: &str) -> Result<(), NetError> {
    check_id(server_id)?;
    let script = cleanup_script(server_id, &format!("kv{}", hash10(server_id)))?;
    if !script.is_empty() {
        ip(&[], &script)?;
    }
    Ok(())
}

/// Server ids of every `kiln-*` namespace present, sorted (to find strays).
pub fn list_netns() -> Result<Vec<String>, NetError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(|source| NetError::Io {
            path: NETNS_DIR.into(),
            source,
        })?,
    };
    // An entry that vanishes while listing is one less stray, not an error.
    let names = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok());
    let mut ids: Vec<String> = names
        .filter_map(|n| n.strip_prefix(NETNS_PREFIX).map(String::from))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Batch lines removing a server's leftovers. The veth goes first, and
/// explicitly: deleting it removes its peer at once, whereas a deleted
/// namespace's devices are torn down later by the kernel (or never, while a
/// process still holds it), keeping the address alive and the name taken.
fn cleanup_script(server_id: &str, veth: &str) -> Result<String, NetError> {
    let mut s = String::new();
    if link_exists(veth)? {
        writeln!(s, "link del {veth}").unwrap();
    }
    if netns_path(server_id).exists() {
        writeln!(s, "netns del {NETNS_PREFIX}{server_id}").unwrap();
    }
    Ok(s)
}

/// Waits until the host veth is up and its bridge port forwarding (usually
/// true at the first look). Carrier changes reach the bridge through the
/// kernel's linkwatch work queue, after `ip` has returned; until then frames
/// are dropped, and a lost first ARP request costs a health check a second.
fn wait_forwarding(veth: &str) -> Result<(), NetError> {
    let dir = Path::new("/sys/class/net").join(veth);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let start = Instant::now();
    while read("operstate").trim() != "up" || read("brport/state").trim() != "3" {
        if !dir.exists() {
            return Ok(()); // this /sys belongs to another namespace: nothing to learn
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(NetError::NotReady { veth: veth.into() });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Ids become namespace file names and words of a batch script: keep them to
/// characters that are safe in both.
fn check_id(id: &str) -> Result<(), NetError> {
    let safe = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
    if id.is_empty() || id.len() > 200 || id.starts_with('.') || !id.bytes().all(safe) {
        return Err(NetError::ServerId { id: id.into() });
    }
    Ok(())
}

/// Whether a network device exists, without spawning: `/proc/self/net/dev`
/// (unlike `/sys/class/net`) always shows the reader's own namespace.
fn link_exists(name: &str) -> Result<bool, NetError> {
    let path = Path::new("/proc/self/net/dev");
    let io = |source| NetError::Io {
        path: path.into(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    Ok(text
        .lines()
        .skip(2)
        .any(|l| l.split(':').next().map(str::trim) == Some(name)))
}

/// Runs `ip [global] -batch -` with `script` on stdin. Without `-force`,
/// `ip` stops at the first failing line and exits non-zero.
fn ip(global: &[&str], script: &str) -> Result<(), NetError> {
    let args: Vec<&str> = global.iter().copied().chain(["-batch", "-"]).collect();
    let cmd = format!(
        "ip {} [{}]",
        args.join(" "),
        script.lines().collect::<Vec<_>>().join("; ")
    );
    let spawn = |source| NetError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    // A write error means `ip` exited early; its status and stderr say why.
    let _ = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(NetError::Command {
        cmd,
        status: out.status.to_string(),
        stderr,
    })
}

/// 64-bit FNV-1a: stable across releases and platforms (the names derived
/// from it outlive the process), and no dependency for 40 bits of a name.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Ten hex digits: `kb-` and `kv` names then fit IFNAMSIZ (15 characters).
fn hash10(s: &str) -> String {
    format!("{:016x}", fnv(s))[..10].to_string()
}
