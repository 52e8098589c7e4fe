//! The default seccomp filter of every sandbox: Docker's default profile,
//! kept as data (`seccomp-default.json`, whose `provenance` says where its
//! rules come from) and turned into the OCI `LinuxSeccomp` that
//! libcontainer loads just before the sandbox's command starts.
//!
//! As with Docker, the filter depends on the sandbox's capabilities: a
//! rule that needs `SYS_ADMIN` (mount, unshare, setns, namespace flags of
//! clone) is only present when the sandbox keeps `SYS_ADMIN`.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use kiln_model::Capability;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscallBuilder,
};
use serde::Deserialize;

/// The profile, as shipped in the binary.
const PROFILE: &str = include_str!("seccomp-default.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    #[allow(dead_code)]
    provenance: String,
    default_errno: u32,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    names: Vec<String>,
    action: Action,
    #[serde(default)]
    errno: Option<u32>,
    #[serde(default)]
    args: Vec<Arg>,
    /// Present only when the sandbox keeps all of these.
    #[serde(default)]
    caps: Vec<Capability>,
    /// Absent when the sandbox keeps any of these.
    #[serde(default)]
    unless_caps: Vec<Capability>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    unless_arches: Vec<String>,
    /// (major, minor) of the first kernel the rule applies to.
    #[serde(default)]
    min_kernel: Option<(u32, u32)>,
    #[allow(dead_code)]
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    Allow,
    Errno,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Arg {
    index: usize,
    op: Op,
    value: u64,
    /// For `masked_eq`: the bits compared with `value`.
    #[serde(default)]
    mask: u64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Eq,
    Ne,
    MaskedEq,
}

/// The profile, without the names that the host's libseccomp does not know
/// (syscalls newer than it): libcontainer would skip each with a warning
/// in every sandbox's log.
fn profile() -> &'static Profile {
    static CELL: OnceLock<Profile> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut p: Profile =
            serde_json::from_str(PROFILE).expect("the embedded seccomp profile is valid JSON");
        for r in &mut p.rules {
            r.names
                .retain(|n| libseccomp::ScmpSyscall::from_name(n).is_ok());
        }
        p.rules.retain(|r| !r.names.is_empty());
        p
    })
}

/// The running kernel's (major, minor), or (0, 0) when unreadable.
fn kernel() -> (u32, u32) {
    static CELL: OnceLock<(u32, u32)> = OnceLock::new();
    *CELL.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release
            .trim()
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    })
}

/// The host's architecture as Docker's profile names it (Go's GOARCH), and
/// the seccomp architectures the filter covers on it. Unlike Docker, not
/// x32 on x86-64: Debian's kernels disable that ABI, and each architecture
/// costs libseccomp about 3 ms to compile into every sandbox's filter (a
/// server starts in about 30 ms). A system call of an architecture the
/// filter does not cover kills the process (libseccomp's default).
fn arch() -> (&'static str, Vec<Arch>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86]),
        "aarch64" => ("arm64", vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]),
        "x86" => ("x86", vec![Arch::ScmpArchX86]),
        "arm" => ("arm", vec![Arch::ScmpArchArm]),
        "s390x" => ("s390x", vec![Arch::ScmpArchS390x, Arch::ScmpArchS390]),
        "riscv64" => ("riscv64", vec![Arch::ScmpArchRiscv64]),
        "powerpc64" => ("ppc64le", vec![Arch::ScmpArchPpc64le]),
        other => (other, vec![Arch::ScmpArchNative]),
    }
}

/// Docker's default filter for a sandbox that keeps `caps` (its bounding set).
pub fn default_filter(caps: &BTreeSet<Capability>) -> LinuxSeccomp {
    let p = profile();
    let (goarch, arches) = arch();
    let kernel = kernel();
    let mut syscalls = Vec::new();
    for r in &p.rules {
        let applies = r.caps.iter().all(|c| caps.contains(c))
            && !r.unless_caps.iter().any(|c| caps.contains(c))
            && (r.arches.is_empty() || r.arches.iter().any(|a| a == goarch))
            && !r.unless_arches.iter().any(|a| a == goarch)
            && r.min_kernel.is_none_or(|m| kernel >= m);
        if !applies {
            continue;
        }
        let args: Vec<_> = r
            .args
            .iter()
            .map(|a| {
                let b = LinuxSeccompArgBuilder::default().index(a.index);
                match a.op {
                    Op::Eq => b.op(LinuxSeccompOperator::ScmpCmpEq).value(a.value),
                    Op::Ne => b.op(LinuxSeccompOperator::ScmpCmpNe).value(a.value),
                    // libcontainer 0.7 compares `(arg & value_two) == value`
                    // (runc reads the two the other way round): the mask goes
                    // in `value_two`. A test proves fork still works.
                    Op::MaskedEq => b
                        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                        .value(a.value)
                        .value_two(a.mask),
                }
                .build()
                .expect("all fields of a seccomp argument are set")
            })
            .collect();
        let mut s = LinuxSyscallBuilder::default()
            .names(r.names.clone())
            .action(match r.action {
                Action::Allow => LinuxSeccompAction::ScmpActAllow,
                Action::Errno => LinuxSeccompAction::ScmpActErrno,
            });
        if let Some(e) = r.errno {
            s = s.errno_ret(e);
        }
        if !args.is_empty() {
            s = s.args(args);
        }
        syscalls.push(s.build().expect("names and action are set"));
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(p.default_errno)
        .architectures(arches)
        .syscalls(syscalls)
        .build()
        .expect("default action is set")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(f: &LinuxSeccomp, name: &str) -> bool {
        f.syscalls().iter().flatten().any(|s| {
            s.action() == LinuxSeccompAction::ScmpActAllow
                && s.args().is_none()
                && s.names().iter().any(|n| n == name)
        })
    }

    #[test]
    fn the_profile_parses_and_every_name_is_a_known_syscall_somewhere() {
        let raw: Profile = serde_json::from_str(PROFILE).unwrap();
        assert!(raw.provenance.contains("moby/moby"));
        assert_eq!(raw.default_errno, 1);
        // Only names newer than the host's libseccomp are dropped; a typo
        // would be dropped too, so this host's libseccomp must know them all.
        let kept: usize = profile().rules.iter().map(|r| r.names.len()).sum();
        let all: usize = raw.rules.iter().map(|r| r.names.len()).sum();
        assert_eq!(kept, all);
    }

    #[test]
    fn namespaces_and_mounts_need_sys_admin() {
        let docker = default_filter(&Capability::docker_default());
        for name in ["read", "execve", "setuid", "chroot", "kill"] {
            assert!(allowed(&docker, name), "{name}");
        }
        for name in [
            "mount", "unshare", "setns", "umount2", "clone", "bpf", "reboot", "kcmp",
        ] {
            assert!(!allowed(&docker, name), "{name}");
        }
        // clone is allowed only without namespace flags; clone3 fails with ENOSYS.
        let clone: Vec<_> = docker
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| s.names().iter().any(|n| n == "clone" || n == "clone3"))
            .collect();
        assert_eq!(clone.len(), 2, "{clone:?}");
        let mut admin = Capability::docker_default();
        admin.insert(Capability::SysAdmin);
        let admin = default_filter(&admin);
        for name in ["mount", "unshare", "setns", "clone", "clone3"] {
            assert!(allowed(&admin, name), "{name}");
        }
        let mut none = BTreeSet::new();
        assert!(!allowed(&default_filter(&none), "chroot"));
        none.insert(Capability::SysPtrace);
        assert!(allowed(&default_filter(&none), "kcmp"));
    }
}
