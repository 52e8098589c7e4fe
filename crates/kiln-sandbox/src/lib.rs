//! Sandboxes: commands run in containers through youki's `libcontainer`,
//! in-process, from a root directory on disk.
//!
//! Two uses share this one mechanism: build sandboxes (a writable root,
//! the host's network when the image allows it) and the read-only
//! sandboxes that tests and servers run in (read-only root, tmpfs `/tmp`
//! and `/run`, a network namespace of their own).
//!
//! Every sandbox, whatever its use, gets: an explicit capability set
//! (Docker's default unless told otherwise), `no_new_privileges`, Docker's
//! default seccomp filter for that capability set (`seccomp.rs`), and a
//! read-only `/sys/fs/cgroup` and `/proc/sys`.
//!
//! A process started as a user other than root keeps no capability at
//! all: its bounding set is the sandbox's set, but its effective,
//! permitted, inheritable and ambient sets are empty. This is Docker's
//! rule for non-root users; since `no_new_privileges` also stops setuid
//! binaries and file capabilities from granting anything, such a process
//! can never gain a capability. Daemons that need privileges start as
//! root and drop them (nginx's master, postgres's initdb wrapper). As in
//! Docker, ports below 1024 are not privileged inside a sandbox that has
//! its own network namespace (`net.ipv4.ip_unprivileged_port_start = 0`),
//! so a non-root daemon can still listen on port 80.
//!
//! Sandboxes that `run_to_exit` (build scripts, image tests, command
//! probes) are tied to the thread that runs them: their first process
//! gets `PR_SET_PDEATHSIG = SIGKILL` just before it executes the command,
//! and killing a pid namespace's first process kills the whole namespace.
//! So a `kiln` killed with SIGKILL leaves no build process behind. Servers
//! (`start`) are not tied: they outlive `kiln`.
//!
//! Invariant: no function here opens a shell in, or joins, a running
//! sandbox; containers are only created, waited for, signalled, listed and
//! deleted.

mod seccomp;

use kiln_model::error_chain;
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use kiln_model::{Capability, ResolvedUser};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder,
    MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

pub use seccomp::default_filter as default_seccomp_filter;

/// Errors of sandbox operations; the source carries libcontainer's chain.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The OCI runtime configuration could not be built or written.
    #[error("cannot prepare sandbox {id}: {detail}")]
    Prepare { id: String, detail: String },
    /// libcontainer refused to create or start the container.
    #[error("cannot start sandbox {id}: {detail}")]
    Start { id: String, detail: String },
    /// Waiting for, signalling or deleting the container failed.
    #[error("sandbox {id}: {detail}")]
    Control { id: String, detail: String },
    /// The command ran past its time limit and was killed.
    #[error("sandbox {id} ran longer than {secs}s and was killed")]
    Timeout { id: String, secs: u64 },
}

/// The network a sandbox sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// The host's network namespace (build sandboxes that may download).
    Host,
    /// A fresh namespace with only a loopback device.
    Isolated,
    /// A namespace prepared beforehand, e.g. `/var/run/netns/NAME`.
    Join(PathBuf),
}

/// A host directory bind-mounted into the sandbox.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
}

/// Resource limits, applied as cgroup settings.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub memory_bytes: Option<i64>,
    /// CPUs as a fraction of one core's time (0.5 = half a core).
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
}

/// Docker's default capability set: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// MKNOD, AUDIT_WRITE, SETFCAP. What every sandbox gets unless its spec
/// says otherwise.
pub fn docker_default_capabilities() -> BTreeSet<Capability> {
    Capability::docker_default()
}

/// Everything needed to run one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Container id; also the default hostname.
    pub id: String,
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    /// `KEY=VALUE`; `PATH` is added if missing.
    pub env: Vec<String>,
    pub cwd: String,
    pub readonly_root: bool,
    /// Mount tmpfs on `/tmp` and `/run`.
    pub tmpfs: bool,
    pub network: Network,
    pub hostname: String,
    pub binds: Vec<Bind>,
    pub limits: Option<Limits>,
    /// The capabilities the sandbox keeps: the bounding set, and for root
    /// also the effective and permitted sets (see the module doc for other
    /// users). The seccomp filter follows it, as Docker's does.
    pub capabilities: BTreeSet<Capability>,
    /// Docker's default seccomp filter for `capabilities`. On in every
    /// sandbox kiln runs (builds, tests, servers); `false` exists only so
    /// that kiln-bench can measure what the filter costs a start.
    pub seccomp: bool,
    /// Who the command runs as (uid, gid, supplementary groups); root when
    /// `None`. Names and home are the caller's business (`HOME` goes in `env`).
    pub user: Option<ResolvedUser>,
    /// Where stdout and stderr go (one file, interleaved).
    pub log: PathBuf,
    /// Extra OCI annotations, e.g. environment, role and release labels.
    pub labels: Vec<(String, String)>,
}

impl SandboxSpec {
    /// A sandbox with the defaults of a read-only server: isolated network,
    /// tmpfs, Docker's default capabilities, root.
    pub fn readonly(id: &str, rootfs: &Path, args: Vec<String>, log: &Path) -> SandboxSpec {
        SandboxSpec {
            id: id.to_string(),
            rootfs: rootfs.to_path_buf(),
            args,
            env: Vec::new(),
            cwd: "/".into(),
            readonly_root: true,
            tmpfs: true,
            network: Network::Isolated,
            hostname: id.to_string(),
            binds: Vec::new(),
            limits: None,
            capabilities: docker_default_capabilities(),
            seccomp: true,
            user: None,
            log: log.to_path_buf(),
            labels: Vec::new(),
        }
    }
}

/// Where libcontainer keeps container state, and where bundles are written.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// libcontainer's state root: `<state>/<id>/state.json`.
    pub state: PathBuf,
    /// OCI bundles (config.json) of running containers.
    pub bundles: PathBuf,
}

/// A container found in the runtime's state.
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub pid: Option<i32>,
    pub running: bool,
    pub labels: Vec<(String, String)>,
}

/// Held while libcontainer creates and starts a container (see `start`).
static LIBCONTAINER: std::sync::Mutex<()> = std::sync::Mutex::new(());

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Runtime {
    pub fn new(dir: &Path) -> Runtime {
        Runtime {
            state: dir.join("state"),
            bundles: dir.join("bundles"),
        }
    }

    /// Runs a sandbox to completion and returns its exit status (128 + signal
    /// when killed). The container is deleted afterwards, whatever happens,
    /// and it dies with the calling thread (see the module doc).
    pub fn run_to_exit(
        &self,
        spec: &SandboxSpec,
        timeout: Option<Duration>,
    ) -> Result<i32, SandboxError> {
        let pid = self.create(spec, true)?;
        let waited = wait(pid, timeout);
        let deleted = self.delete(&spec.id);
        match waited {
            Some(code) => {
                deleted?;
                Ok(code)
            }
            None => Err(SandboxError::Timeout {
                id: spec.id.clone(),
                secs: timeout.map(|t| t.as_secs()).unwrap_or(0),
            }),
        }
    }

    /// Creates and starts a sandbox, returning the host pid of its first
    /// process. The process is a child of the caller until the caller
    /// exits; then init adopts it, so servers outlive `kiln`.
    pub fn start(&self, spec: &SandboxSpec) -> Result<i32, SandboxError> {
        self.create(spec, false)
    }

    /// Creates and starts a sandbox; `tied`: it is killed when the calling
    /// thread dies.
    fn create(&self, spec: &SandboxSpec, tied: bool) -> Result<i32, SandboxError> {
        let prep = |detail: String| SandboxError::Prepare {
            id: spec.id.clone(),
            detail,
        };
        let bundle = self.bundles.join(&spec.id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| prep(format!("create {}: {e}", bundle.display())))?;
        std::fs::create_dir_all(&self.state)
            .map_err(|e| prep(format!("create {}: {e}", self.state.display())))?;
        // A leftover from a killed run with the same id would make create fail.
        if self.state.join(&spec.id).exists() {
            let _ = self.delete(&spec.id);
            std::fs::create_dir_all(&bundle)
                .map_err(|e| prep(format!("create {}: {e}", bundle.display())))?;
        }
        let oci = oci_spec(spec).map_err(|e| prep(e.to_string()))?;
        oci.save(bundle.join("config.json"))
            .map_err(|e| prep(format!("write config.json: {e}")))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| prep(format!("open log {}: {e}", spec.log.display())))?;
        let log2 = log.try_clone().map_err(|e| prep(e.to_string()))?;
        let stdin = File::open("/dev/null").map_err(|e| prep(e.to_string()))?;
        let start = |detail: String| SandboxError::Start {
            id: spec.id.clone(),
            detail,
        };
        // libcontainer chdir()s the whole process into the state directory
        // while it creates and starts a container; concurrent calls would
        // race on the working directory, so they are serialised.
        let _guard = LIBCONTAINER.lock().unwrap_or_else(|e| e.into_inner());
        let mut builder = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
            .with_root_path(&self.state)
            .map_err(|e| start(error_chain(&e)))?
            .with_stdin(stdin)
            .with_stdout(log)
            .with_stderr(log2);
        if tied {
            builder = builder.with_executor(TiedToParent);
        }
        let mut container = builder
            .validate_id()
            .map_err(|e| start(error_chain(&e)))?
            .as_init(&bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| start(error_chain(&e)))?;
        if let Err(e) = container.start() {
            // The container's first process is parked waiting for start.
            let _ = container.delete(true);
            return Err(start(error_chain(&e)));
        }
        container
            .pid()
            .map(|p| p.as_raw())
            .ok_or_else(|| start("started container has no pid".into()))
    }

    /// SIGKILLs every process of a sandbox and removes its state, cgroup
    /// and bundle. Deleting a sandbox that is already gone is not an error.
    pub fn delete(&self, id: &str) -> Result<(), SandboxError> {
        let ctl = |detail: String| SandboxError::Control {
            id: id.to_string(),
            detail,
        };
        let dir = self.state.join(id);
        if dir.exists() {
            match Container::load(dir.clone()) {
                Ok(mut c) => {
                    if c.can_kill() {
                        let _ = c.kill(nix::sys::signal::Signal::SIGKILL, true);
                        // Wait until the process is really gone (or a zombie):
                        // callers remove what it was writing right after.
                        if let Some(pid) = c.pid() {
                            let start = Instant::now();
                            while start.elapsed() < Duration::from_secs(2) && alive(pid.as_raw()) {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                        }
                    }
                    // Right after the process is reaped its cgroup can still be
                    // busy for a moment; retry before giving up.
                    let mut pause = Duration::from_millis(2);
                    let mut result = c.delete(true);
                    for _ in 0..12 {
                        if result.is_ok() {
                            break;
                        }
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(200));
                        result = c.delete(true);
                    }
                    if let Err(e) = result {
                        tracing::warn!(id, error = %error_chain(&e), "libcontainer delete failed; removing state");
                        sweep_cgroup(id);
                        if dir.exists() {
                            std::fs::remove_dir_all(&dir)
                                .map_err(|e| ctl(format!("remove {}: {e}", dir.display())))?;
                        }
                    }
                }
                Err(_) => {
                    // No state to drive libcontainer with: kill what the
                    // sandbox's cgroup holds and remove the cgroup by hand.
                    sweep_cgroup(id);
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| ctl(format!("remove {}: {e}", dir.display())))?
                }
            }
        }
        let bundle = self.bundles.join(id);
        if bundle.exists() {
            std::fs::remove_dir_all(&bundle)
                .map_err(|e| ctl(format!("remove {}: {e}", bundle.display())))?;
        }
        Ok(())
    }

    /// Every container in this runtime's state, with its labels.
    pub fn list(&self) -> Result<Vec<Found>, SandboxError> {
        let mut out = Vec::new();
        let Ok(items) = std::fs::read_dir(&self.state) else {
            return Ok(out);
        };
        for item in items.flatten() {
            out.push(self.load(&item.file_name().to_string_lossy()));
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// One container, without loading every other one.
    pub fn find(&self, id: &str) -> Option<Found> {
        self.state.join(id).is_dir().then(|| self.load(id))
    }

    fn load(&self, id: &str) -> Found {
        // A process killed while libcontainer was creating a container
        // leaves a directory without a readable state.json: it is still
        // listed (not running, no pid) so that callers can delete it.
        let (pid, running) = match Container::load(self.state.join(id)) {
            Ok(mut c) => {
                let _ = c.refresh_status();
                (
                    c.pid().map(|p| p.as_raw()),
                    matches!(
                        c.status(),
                        ContainerStatus::Running | ContainerStatus::Paused
                    ),
                )
            }
            Err(_) => (None, false),
        };
        let labels = std::fs::read(self.bundles.join(id).join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Spec>(&b).ok())
            .and_then(|s| s.annotations().clone())
            .map(|a| a.into_iter().collect())
            .unwrap_or_default();
        Found {
            id: id.to_string(),
            pid,
            running,
            labels,
        }
    }
}

/// Where a sandbox's cgroup lives (see `cgroups_path` in `oci_spec`): one
/// directory per v1 controller, or one under the v2 unified hierarchy.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join("kiln").join(id)];
    if let Ok(controllers) = std::fs::read_dir(root) {
        dirs.extend(
            controllers
                .flatten()
                .map(|c| c.path().join("kiln").join(id)),
        );
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// SIGKILLs every process in a sandbox's cgroups and removes them.
fn sweep_cgroup(id: &str) {
    let dirs = cgroup_dirs(id);
    for dir in &dirs {
        for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    for dir in &dirs {
        let mut pause = Duration::from_millis(2);
        for _ in 0..10 {
            if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

/// Whether a pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Waits for a child to exit, polling so that a timeout can be honoured.
/// Returns `None` when the timeout passed (the process is then killed).
fn wait(pid: i32, timeout: Option<Duration>) -> Option<i32> {
    let pid = Pid::from_raw(pid);
    let started = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => return Some(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Some(128 + s as i32),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            // Not our child (adopted elsewhere): fall back to watching /proc.
            Err(_) => {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return Some(0);
                }
            }
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn ns(
    t: LinuxNamespaceType,
    path: Option<&Path>,
) -> Result<LinuxNamespace, oci_spec::OciSpecError> {
    let mut b = LinuxNamespaceBuilder::default().typ(t);
    if let Some(p) = path {
        b = b.path(p);
    }
    b.build()
}

/// Executes the sandbox's command the way libcontainer's default executor
/// does, after asking the kernel to SIGKILL this process (the first of the
/// sandbox's pid namespace, so the whole sandbox) when the thread that
/// created it dies. It runs after the switch to the sandbox's user, which
/// would otherwise clear the setting, and the exec that follows keeps it
/// (no_new_privileges: no setuid or file-capability exec can clear it).
#[derive(Clone)]
struct TiedToParent;

impl Executor for TiedToParent {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(|e| ExecutorError::Other(format!("prctl(PR_SET_PDEATHSIG): {e}")))?;
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

/// `/sys/fs/cgroup` and every cgroup hierarchy mounted below it on the host:
/// libcontainer mounts a sandbox's own view of each one at the same place,
/// writable unless remounted read-only, and a writable cgroupfs would let
/// a sandbox raise its own limits.
fn cgroup_paths() -> &'static [String] {
    static CELL: OnceLock<Vec<String>> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut out = vec!["/sys/fs/cgroup".to_string()];
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in info.lines() {
            let Some(point) = line.split(' ').nth(4) else {
                continue;
            };
            if let Some(name) = point.strip_prefix("/sys/fs/cgroup/") {
                if !name.is_empty() && !name.contains('/') && !out.iter().any(|p| p == point) {
                    out.push(point.to_string());
                }
            }
        }
        out
    })
}

/// The OCI runtime spec of a sandbox.
fn oci_spec(s: &SandboxSpec) -> Result<Spec, oci_spec::OciSpecError> {
    let mut spec = Spec::default();
    spec.set_root(Some(
        RootBuilder::default()
            .path(&s.rootfs)
            .readonly(s.readonly_root)
            .build()?,
    ));
    spec.set_hostname(Some(s.hostname.clone()));
    let mut env = s.env.clone();
    // libcontainer resolves args[0] through PATH and requires it.
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.into());
    }
    let bounding: oci_spec::runtime::Capabilities =
        s.capabilities.iter().map(|c| oci_capability(*c)).collect();
    let root = s.user.as_ref().is_none_or(|u| u.uid == 0);
    // A user other than root holds no capability (see the module doc).
    let held = if root {
        bounding.clone()
    } else {
        oci_spec::runtime::Capabilities::new()
    };
    let mut process = ProcessBuilder::default()
        .terminal(false)
        .args(s.args.clone())
        .env(env)
        .cwd(s.cwd.clone())
        .no_new_privileges(true)
        .build()?;
    if let Some(u) = &s.user {
        let mut user = UserBuilder::default().uid(u.uid).gid(u.gid);
        if !u.additional_gids.is_empty() {
            user = user.additional_gids(u.additional_gids.clone());
        }
        process.set_user(user.build()?);
    }
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(bounding)
            .effective(held.clone())
            .permitted(held)
            .inheritable(oci_spec::runtime::Capabilities::new())
            .ambient(oci_spec::runtime::Capabilities::new())
            .build()?,
    ));
    spec.set_process(Some(process));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    if s.tmpfs {
        for dst in ["/tmp", "/run"] {
            mounts.push(
                MountBuilder::default()
                    .destination(dst)
                    .typ("tmpfs")
                    .source("tmpfs")
                    .options(vec![
                        "nosuid".into(),
                        "nodev".into(),
                        "mode=1777".into(),
                        "size=65536k".into(),
                    ])
                    .build()?,
            );
        }
    }
    for b in &s.binds {
        let mut opts = vec!["rbind".to_string(), "nosuid".into(), "nodev".into()];
        if b.readonly {
            opts.push("ro".into());
        }
        mounts.push(
            MountBuilder::default()
                .destination(&b.destination)
                .typ("bind")
                .source(&b.source)
                .options(opts)
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    let mut namespaces = vec![
        ns(LinuxNamespaceType::Pid, None)?,
        ns(LinuxNamespaceType::Ipc, None)?,
        ns(LinuxNamespaceType::Uts, None)?,
        ns(LinuxNamespaceType::Mount, None)?,
        ns(LinuxNamespaceType::Cgroup, None)?,
    ];
    match &s.network {
        Network::Host => {}
        Network::Isolated => namespaces.push(ns(LinuxNamespaceType::Network, None)?),
        Network::Join(p) => namespaces.push(ns(LinuxNamespaceType::Network, Some(p))?),
    }
    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(format!("/kiln/{}", s.id)));
    if let Some(m) = defaults.masked_paths() {
        linux = linux.masked_paths(m.clone());
    }
    let mut readonly = defaults.readonly_paths().clone().unwrap_or_default();
    readonly.extend(cgroup_paths().iter().cloned());
    linux = linux.readonly_paths(readonly);
    if s.seccomp {
        linux = linux.seccomp(seccomp::default_filter(&s.capabilities));
    }
    if s.network != Network::Host {
        // As Docker does: the namespace is the sandbox's own, so its low
        // ports guard nothing on the host.
        linux = linux.sysctl(std::collections::HashMap::from([(
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "0".to_string(),
        )]));
    }
    if let Some(l) = &s.limits {
        let mut r = LinuxResourcesBuilder::default();
        if let Some(m) = l.memory_bytes {
            r = r.memory(LinuxMemoryBuilder::default().limit(m).build()?);
        }
        if let Some(c) = l.cpus {
            let period = 100_000u64;
            r = r.cpu(
                LinuxCpuBuilder::default()
                    .quota((c * period as f64) as i64)
                    .period(period)
                    .build()?,
            );
        }
        if let Some(p) = l.pids {
            r = r.pids(LinuxPidsBuilder::default().limit(p).build()?);
        }
        linux = linux.resources(r.build()?);
    }
    spec.set_linux(Some(linux.build()?));
    if !s.labels.is_empty() {
        spec.set_annotations(Some(s.labels.iter().cloned().collect()));
    }
    Ok(spec)
}

/// The OCI name of a capability.
fn oci_capability(c: Capability) -> oci_spec::runtime::Capability {
    c.name()
        .parse()
        .expect("oci-spec knows every capability of capabilities(7)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_killed_while_being_created_is_listed_and_deleted() {
        let dir = std::env::temp_dir().join(format!("kiln-sandbox-test-{}", std::process::id()));
        let runtime = Runtime::new(&dir);
        // What a SIGKILL during libcontainer's create leaves: a state
        // directory with no state.json, and the bundle written before it.
        std::fs::create_dir_all(runtime.state.join("half")).unwrap();
        std::fs::create_dir_all(runtime.bundles.join("half")).unwrap();
        let found = runtime.list().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].id.as_str(), found[0].pid, found[0].running),
            ("half", None, false)
        );
        runtime.delete("half").unwrap();
        assert!(runtime.list().unwrap().is_empty());
        assert!(!runtime.bundles.join("half").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A read-only busybox root and a runtime beside it, in a fresh
    /// directory: what these tests run real sandboxes from (as root).
    struct Fixture {
        dir: tempfile::TempDir,
        runtime: Runtime,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::Builder::new()
                .prefix("kiln-sandbox-")
                .tempdir()
                .unwrap();
            let root = dir.path().join("root");
            for d in ["bin", "proc", "sys", "dev", "tmp", "run", "mnt", "etc"] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            std::fs::copy("/bin/busybox", root.join("bin/busybox"))
                .expect("busybox-static is installed (scripts/setup.sh)");
            for applet in [
                "sh", "cat", "grep", "id", "echo", "sleep", "unshare", "mount", "mkdir", "httpd",
                "chroot",
            ] {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
            let runtime = Runtime::new(&dir.path().join("runtime"));
            Fixture { dir, runtime }
        }

        fn spec(&self, id: &str, script: &str) -> SandboxSpec {
            SandboxSpec::readonly(
                &format!("kiln-unit-{id}-{}", std::process::id()),
                &self.dir.path().join("root"),
                vec!["/bin/sh".into(), "-c".into(), script.into()],
                &self.dir.path().join(format!("{id}.log")),
            )
        }

        /// Runs `spec` to its end; returns its status and output.
        fn run(&self, spec: &SandboxSpec) -> (i32, String) {
            let status = self
                .runtime
                .run_to_exit(spec, Some(Duration::from_secs(60)))
                .unwrap();
            (
                status,
                std::fs::read_to_string(&spec.log).unwrap_or_default(),
            )
        }
    }

    /// A capability set as `/proc/PID/status` shows it (`CapBnd:` etc.).
    fn mask(caps: &BTreeSet<Capability>) -> String {
        format!(
            "{:016x}",
            caps.iter().fold(0u64, |m, c| m | 1 << c.number())
        )
    }

    fn status_line<'a>(out: &'a str, key: &str) -> &'a str {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
    }

    #[test]
    fn root_keeps_dockers_capabilities_under_seccomp_and_cannot_mount_or_unshare() {
        let f = Fixture::new();
        let spec = f.spec(
            "root",
            "grep -E '^(Seccomp|NoNewPrivs|Cap(Bnd|Eff|Prm|Inh|Amb)):' /proc/self/status; \
             unshare -m true && echo UNSHARED; mount -t tmpfs none /mnt && echo MOUNTED; \
             chroot / true && echo CHROOTED; echo forked $(echo inside a subshell)",
        );
        let (status, out) = f.run(&spec);
        assert_eq!(status, 0, "{out}");
        let docker = mask(&docker_default_capabilities());
        assert_eq!(status_line(&out, "Seccomp:"), "2", "{out}");
        assert_eq!(status_line(&out, "NoNewPrivs:"), "1", "{out}");
        assert_eq!(status_line(&out, "CapBnd:"), docker, "{out}");
        assert_eq!(status_line(&out, "CapEff:"), docker, "{out}");
        assert_eq!(
            status_line(&out, "CapInh:"),
            mask(&BTreeSet::new()),
            "{out}"
        );
        assert!(
            !out.contains("UNSHARED") && !out.contains("MOUNTED"),
            "{out}"
        );
        // What the default set allows still works: chroot, fork.
        assert!(out.contains("CHROOTED"), "{out}");
        assert!(out.contains("forked inside a subshell"), "{out}");
    }

    #[test]
    fn cgroupfs_and_proc_sys_are_read_only() {
        let f = Fixture::new();
        let mut spec = f.spec(
            "cgroupfs",
            "for p in /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max \
                      /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do \
               if [ -e $p ]; then echo TRY $p; echo 100000000 > $p && echo WROTE $p; fi; done; \
             mkdir /sys/fs/cgroup/memory/escape /sys/fs/cgroup/escape && echo MADE; \
             echo 1 > /proc/sys/kernel/panic && echo WROTE /proc/sys; echo done",
        );
        spec.limits = Some(Limits {
            memory_bytes: Some(64 << 20),
            cpus: None,
            pids: Some(64),
        });
        let (_, out) = f.run(&spec);
        assert!(
            out.contains("TRY "),
            "no cgroup limit file was visible:\n{out}"
        );
        assert!(out.contains("done"), "{out}");
        assert!(!out.contains("WROTE") && !out.contains("MADE"), "{out}");
        assert!(out.contains("Read-only file system"), "{out}");
    }

    #[test]
    fn another_user_holds_no_capability_but_may_listen_on_low_ports() {
        let f = Fixture::new();
        let mut spec = f.spec(
            "user",
            "id; grep -E '^(Seccomp|Cap(Bnd|Eff|Prm|Amb)):' /proc/self/status; \
             httpd -p 80 -h /tmp && echo LISTENING",
        );
        spec.user = Some(ResolvedUser {
            name: None,
            uid: 65534,
            gid: 65534,
            additional_gids: vec![100, 4],
            home: None,
        });
        let (status, out) = f.run(&spec);
        assert_eq!(status, 0, "{out}");
        // Supplementary groups as given, and nothing else (no root group).
        assert!(out.contains("uid=65534 gid=65534 groups=4,100\n"), "{out}");
        let none = mask(&BTreeSet::new());
        assert_eq!(status_line(&out, "Seccomp:"), "2", "{out}");
        assert_eq!(
            status_line(&out, "CapBnd:"),
            mask(&docker_default_capabilities()),
            "{out}"
        );
        for key in ["CapEff:", "CapPrm:", "CapAmb:"] {
            assert_eq!(status_line(&out, key), none, "{key} {out}");
        }
        assert!(out.contains("LISTENING"), "{out}");
    }

    #[test]
    fn a_narrowed_set_is_what_the_sandbox_keeps() {
        let f = Fixture::new();
        let mut spec = f.spec(
            "narrow",
            "grep -E '^CapBnd:' /proc/self/status; chroot / true && echo CHROOTED",
        );
        spec.capabilities.remove(&Capability::SysChroot);
        spec.capabilities.insert(Capability::SysPtrace);
        let (_, out) = f.run(&spec);
        assert_eq!(
            status_line(&out, "CapBnd:"),
            mask(&spec.capabilities),
            "{out}"
        );
        // Without SYS_CHROOT the filter refuses chroot too, as Docker's does.
        assert!(!out.contains("CHROOTED"), "{out}");
    }

    /// A static program that calls clone(2) itself (busybox's `unshare`
    /// uses unshare(2)), built with the C compiler cargo links with.
    const CLONE_PROBE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
static int child(void *arg) { (void)arg; return 0; }
static char stack[1 << 16];
int main(void) {
    int flags[] = {0, CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID};
    const char *names[] = {"plain", "newuser", "newns", "newnet", "newpid"};
    for (int i = 0; i < 5; i++) {
        int pid = clone(child, stack + sizeof stack, flags[i] | SIGCHLD, NULL);
        if (pid < 0) {
            printf("%s refused: %s\n", names[i], strerror(errno));
        } else {
            waitpid(pid, NULL, 0);
            printf("%s allowed\n", names[i]);
        }
    }
    return 0;
}
"#;

    #[test]
    fn clone_forks_but_cannot_make_namespaces() {
        let f = Fixture::new();
        let src = f.dir.path().join("clone.c");
        std::fs::write(&src, CLONE_PROBE).unwrap();
        let out = std::process::Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(f.dir.path().join("root/bin/clone-probe"))
            .arg(&src)
            .output()
            .expect("a C compiler (cargo links with one)");
        assert!(out.status.success(), "{out:?}");
        let mut spec = f.spec("clone", "");
        spec.args = vec!["/bin/clone-probe".into()];
        let (status, out) = f.run(&spec);
        assert_eq!(status, 0, "{out}");
        assert!(out.contains("plain allowed"), "{out}");
        for ns in ["newuser", "newns", "newnet", "newpid"] {
            assert!(
                out.contains(&format!("{ns} refused: Operation not permitted")),
                "{ns}: {out}"
            );
        }
        // With SYS_ADMIN the filter lets them through, as Docker's does.
        spec.capabilities.insert(Capability::SysAdmin);
        spec.id.push_str("-admin");
        let (_, out) = f.run(&spec);
        assert!(out.contains("newns allowed"), "{out}");
    }

    #[test]
    fn a_sandbox_past_its_time_is_killed_and_deleted() {
        let f = Fixture::new();
        let spec = f.spec("timeout", "sleep 1000 & sleep 1000");
        let err = f
            .runtime
            .run_to_exit(&spec, Some(Duration::from_millis(300)))
            .unwrap_err();
        assert!(matches!(err, SandboxError::Timeout { .. }), "{err}");
        assert!(f.runtime.find(&spec.id).is_none());
    }
}
