//! Isolation of environments on the host, with `iptables` (the same tool,
//! and so the same backend, Docker uses; run as one `iptables-restore
//! --noflush` script per change, like `net.rs` runs `ip -batch`).
//!
//! Per environment bridge `B` (with gateway `GW`), two chains named from
//! the bridge's hash:
//! - `KF-<hash>` (from `FORWARD`, for traffic in or out of `B`): servers of
//!   the environment reach each other (bridged frames cross `FORWARD` when
//!   `br_netfilter` is loaded, as Docker loads it); replies to connections
//!   a server was allowed to open come back; each server's declared
//!   `reach` is accepted; everything else is dropped: other environments,
//!   other projects, the outside.
//! - `KI-<hash>` (from `INPUT`, for traffic from `B` to the host itself):
//!   replies to what the host opened (health checks, balancers' backend
//!   connections), DNS on the gateway, the environment's balancer ports on
//!   the gateway, and declared `reach` to the host; everything else is
//!   dropped, so a host service bound to 0.0.0.0 is not exposed to servers.
//!
//! Jumps are inserted at the top of `FORWARD` and `INPUT`; a firewall that
//! Docker (or anyone) set to policy DROP does not matter for kiln's
//! bridges, whose traffic is decided before its rules. Per-server rules
//! carry a comment `kiln:<server id>` and go with the server.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use kiln_model::{Reach, ReachTarget, Subnet};

use crate::net::NetError;

fn chains(bridge: &str) -> (String, String) {
    let hash = bridge.trim_start_matches("kb-");
    (format!("KF-{hash}"), format!("KI-{hash}"))
}

/// Creates (or re-creates) the environment's chains and jumps. Idempotent:
/// the chains are flushed and rebuilt, so running it twice leaves one set.
pub fn isolate(bridge: &str, subnet: Subnet, balancer_ports: &[u16]) -> Result<(), NetError> {
    let (fwd, inp) = chains(bridge);
    let gw = subnet.gateway();
    let mut s = String::from("*filter\n");
    for chain in [&fwd, &inp] {
        writeln!(s, ":{chain} - [0:0]").unwrap();
    }
    // FORWARD: within the environment, replies, then nothing else.
    writeln!(s, "-A {fwd} -i {bridge} -o {bridge} -j ACCEPT").unwrap();
    writeln!(
        s,
        "-A {fwd} -o {bridge} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    )
    .unwrap();
    writeln!(s, "-A {fwd} -j DROP").unwrap();
    // INPUT: replies to the host, DNS and balancers on the gateway.
    writeln!(
        s,
        "-A {inp} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    )
    .unwrap();
    for proto in ["udp", "tcp"] {
        writeln!(s, "-A {inp} -d {gw}/32 -p {proto} --dport 53 -j ACCEPT").unwrap();
    }
    for port in balancer_ports {
        writeln!(s, "-A {inp} -d {gw}/32 -p tcp --dport {port} -j ACCEPT").unwrap();
    }
    writeln!(s, "-A {inp} -j DROP").unwrap();
    s.push_str("COMMIT\n");
    restore(&s)?;
    // The jumps, once each, at the top.
    for (base, dir, chain) in [
        ("FORWARD", "-i", &fwd),
        ("FORWARD", "-o", &fwd),
        ("INPUT", "-i", &inp),
    ] {
        let rule = [dir, bridge, "-j", chain.as_str()];
        if iptables(&[&["-C", base][..], &rule].concat()).is_err() {
            iptables(&[&["-I", base, "1"][..], &rule].concat())?;
        }
    }
    Ok(())
}

/// Whether the environment's chains exist.
pub fn isolated(bridge: &str) -> bool {
    let (fwd, _) = chains(bridge);
    iptables(&["-S", &fwd]).is_ok()
}

/// Lets a balancer port on the gateway through (a balancer started after
/// the environment's network was made).
pub fn open_port(bridge: &str, subnet: Subnet, port: u16) -> Result<(), NetError> {
    let (_, inp) = chains(bridge);
    let gw = subnet.gateway().to_string();
    let port = port.to_string();
    let rule = ["-d", &gw, "-p", "tcp", "--dport", &port, "-j", "ACCEPT"];
    if iptables(&[&["-C", &inp][..], &rule].concat()).is_err() {
        iptables(&[&["-I", &inp, "1"][..], &rule].concat())?;
    }
    Ok(())
}

/// Lets one server reach what its role declares.
pub fn allow(
    bridge: &str,
    subnet: Subnet,
    id: &str,
    addr: Ipv4Addr,
    reach: &[Reach],
) -> Result<(), NetError> {
    if reach.is_empty() {
        return Ok(());
    }
    let (fwd, inp) = chains(bridge);
    let mut s = String::from("*filter\n");
    for r in reach {
        let (dst, chain) = match r.to {
            ReachTarget::Host => (format!("{}/32", subnet.gateway()), &inp),
            ReachTarget::Net { addr, prefix } => (format!("{addr}/{prefix}"), &fwd),
        };
        writeln!(
            s,
            "-I {chain} 1 -s {addr}/32 -d {dst} -p tcp --dport {} -m comment --comment kiln:{id} -j ACCEPT",
            r.port
        )
        .unwrap();
    }
    s.push_str("COMMIT\n");
    restore(&s)
}

/// Removes a server's own rules, if it had any.
pub fn forget(bridge: &str, id: &str) -> Result<(), NetError> {
    let (fwd, inp) = chains(bridge);
    let tag = format!("kiln:{id}");
    for chain in [fwd, inp] {
        let Ok(rules) = iptables(&["-S", &chain]) else {
            continue;
        };
        for line in rules
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == tag))
        {
            let Some(rest) = line.strip_prefix("-A ") else {
                continue;
            };
            let args: Vec<&str> = std::iter::once("-D")
                .chain(rest.split_whitespace())
                .collect();
            iptables(&args)?;
        }
    }
    Ok(())
}

/// Removes the environment's jumps and chains; idempotent.
pub fn remove(bridge: &str) -> Result<(), NetError> {
    let (fwd, inp) = chains(bridge);
    for (base, dir, chain) in [
        ("FORWARD", "-i", &fwd),
        ("FORWARD", "-o", &fwd),
        ("INPUT", "-i", &inp),
    ] {
        while iptables(&["-D", base, dir, bridge, "-j", chain]).is_ok() {}
    }
    for chain in [&fwd, &inp] {
        if iptables(&["-S", chain]).is_ok() {
            iptables(&["-F", chain])?;
            iptables(&["-X", chain])?;
        }
    }
    Ok(())
}

/// Runs `iptables -w ARGS`; its stdout on success.
fn iptables(args: &[&str]) -> Result<String, NetError> {
    let cmd = format!("iptables -w {}", args.join(" "));
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(NetError::Command {
        cmd,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Applies a rule set with `iptables-restore --noflush`, in one transaction.
fn restore(script: &str) -> Result<(), NetError> {
    let cmd = format!(
        "iptables-restore -w --noflush [{}]",
        script.lines().collect::<Vec<_>>().join("; ")
    );
    let spawn = |source| NetError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetError::Command {
        cmd,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}
