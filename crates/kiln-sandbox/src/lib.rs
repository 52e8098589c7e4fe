//! Sandboxes: commands run in containers through youki's `libcontainer`,
//! in-process, from a root directory on disk.
//!
//! Two uses share this one mechanism: build sandboxes (a writable root,
//! the host's network when the image allows it, a broad root capability
//! set for package managers) and the read-only sandboxes that tests and
//! servers run in (read-only root, tmpfs `/tmp` and `/run`, a network
//! namespace of their own, minimal capabilities, cgroup limits).
//!
//! Invariant: no function here opens a shell in, or joins, a running
//! sandbox; containers are only created, waited for, signalled, listed and
//! deleted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec,
};

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

/// Which capability set the sandbox's process keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// The OCI default: AUDIT_WRITE, KILL, NET_BIND_SERVICE.
    Minimal,
    /// What a root build script needs to install packages (Docker's default set).
    Build,
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
    pub privilege: Privilege,
    /// Where stdout and stderr go (one file, interleaved).
    pub log: PathBuf,
    /// Extra OCI annotations, e.g. environment, role and release labels.
    pub labels: Vec<(String, String)>,
}

impl SandboxSpec {
    /// A sandbox with the defaults of a read-only server: isolated network,
    /// tmpfs, minimal capabilities.
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
            privilege: Privilege::Minimal,
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
    /// when killed). The container is deleted afterwards, whatever happens.
    pub fn run_to_exit(
        &self,
        spec: &SandboxSpec,
        timeout: Option<Duration>,
    ) -> Result<i32, SandboxError> {
        let pid = self.start(spec)?;
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
        let mut container = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
            .with_root_path(&self.state)
            .map_err(|e| start(chain(&e)))?
            .with_stdin(stdin)
            .with_stdout(log)
            .with_stderr(log2)
            .validate_id()
            .map_err(|e| start(chain(&e)))?
            .as_init(&bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| start(chain(&e)))?;
        if let Err(e) = container.start() {
            // The container's first process is parked waiting for start.
            let _ = container.delete(true);
            return Err(start(chain(&e)));
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
                        tracing::warn!(id, error = %chain(&e), "libcontainer delete failed; removing state");
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

fn capabilities(p: Privilege) -> Vec<Capability> {
    use Capability::*;
    match p {
        Privilege::Minimal => vec![AuditWrite, Kill, NetBindService],
        Privilege::Build => vec![
            Chown,
            DacOverride,
            Fowner,
            Fsetid,
            Kill,
            Setgid,
            Setuid,
            Setpcap,
            NetBindService,
            NetRaw,
            SysChroot,
            Mknod,
            AuditWrite,
            Setfcap,
        ],
    }
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
    let caps: std::collections::HashSet<Capability> =
        capabilities(s.privilege).into_iter().collect();
    let mut process = ProcessBuilder::default()
        .terminal(false)
        .args(s.args.clone())
        .env(env)
        .cwd(s.cwd.clone())
        .no_new_privileges(true)
        .build()?;
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .inheritable(std::collections::HashSet::<Capability>::new())
            .ambient(std::collections::HashSet::<Capability>::new())
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
    if let Some(r) = defaults.readonly_paths() {
        linux = linux.readonly_paths(r.clone());
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

/// The whole chain of an error on one line; libcontainer's errors are
/// mostly transparent wrappers whose detail is in the sources.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
}
