//! The `local` provider, kiln's embedded default: each server is a
//! libcontainer sandbox started in-process from its image's shared,
//! read-only unpacked root, with new pid/mount/uts/ipc/cgroup namespaces, a
//! network namespace of its own on the environment's bridge (its own
//! address, reachable from the host), tmpfs `/tmp` and `/run`, only its
//! declared volumes writable, cgroup limits from its size, hostname = its
//! id, and the minimal capability set. Its stdout and stderr go to
//! `<dir>/logs/<env>/<id>.log`, which outlives it. Servers outlive kiln.
//!
//! Layout under `<dir>` (the store, `.kiln/`): `servers/` (libcontainer
//! state and bundles), `logs/`, `volumes/<env>/<role>-<slot>/<volume>/`.

pub mod net;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_model::{Balancer, HealthCheck};
use kiln_provider::{Inspection, Provider, ProviderError, Running, ServerRequest};
use kiln_sandbox::{alive, Bind, Limits, Network, Runtime, SandboxSpec};

/// Labels written on every server sandbox, so strays are found by what they claim to be.
pub const LABEL_ENV: &str = "dev.kiln.env";
pub const LABEL_ROLE: &str = "dev.kiln.role";
pub const LABEL_RELEASE: &str = "dev.kiln.release";
pub const LABEL_DIGEST: &str = "dev.kiln.image";

pub struct Local {
    dir: PathBuf,
    runtime: Runtime,
    /// One reading of /proc shared by the inspections of a drift scan.
    procs: std::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<Procs>)>>,
}

/// Every process on the host: parent, pid namespace, whether a zombie.
struct Procs {
    parent: std::collections::BTreeMap<i32, i32>,
    ns: std::collections::BTreeMap<i32, PathBuf>,
    zombie: std::collections::BTreeSet<i32>,
}

impl Procs {
    fn read() -> Procs {
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

impl Local {
    pub fn new(dir: &Path) -> Local {
        Local {
            dir: dir.to_path_buf(),
            runtime: Runtime::new(&dir.join("servers")),
            procs: std::sync::Mutex::new(None),
        }
    }

    fn volume_dir(&self, env: &str, role: &str, slot: u32, name: &str) -> PathBuf {
        self.dir
            .join("volumes")
            .join(env)
            .join(format!("{role}-{slot}"))
            .join(name)
    }

    /// The name an environment's network is derived from: the store's
    /// path and the environment, so two projects' `staging` never share a bridge.
    pub fn net_key(&self, env: &str) -> String {
        format!("{}:{env}", self.dir.display())
    }

    /// Removes an environment's bridge (after its last server is gone).
    pub fn remove_network(&self, env: &str) -> Result<(), net::NetError> {
        net::remove_env(&self.net_key(env))
    }

    /// The sandbox runtime servers live in (for drift and stray detection).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}

impl Provider for Local {
    fn create(&self, req: &ServerRequest) -> Result<i32, ProviderError> {
        let fail = |detail: String| ProviderError::Create {
            id: req.id.clone(),
            detail,
        };
        // The runtime would create a missing mount point inside the shared,
        // sealed image root: refuse instead, the image must provide it.
        for v in &req.volumes {
            if !req.root.join(v.path.trim_start_matches('/')).is_dir() {
                return Err(fail(format!("the image has no directory {} for volume `{}`; create it in the image (files/ or a script)", v.path, v.name)));
            }
        }
        let envnet = net::ensure_env(&self.net_key(&req.env), &req.subnet)
            .map_err(|e| fail(e.to_string()))?;
        let addr = req
            .address
            .parse()
            .map_err(|_| fail(format!("bad address {}", req.address)))?;
        let netns = net::attach(&envnet, &req.id, addr).map_err(|e| fail(e.to_string()))?;
        let log = self.log_path(&req.env, &req.id);
        std::fs::create_dir_all(log.parent().expect("log has a parent"))
            .map_err(|e| fail(e.to_string()))?;
        let mut binds = Vec::new();
        for v in &req.volumes {
            let host = self.volume_dir(&req.env, &req.role, req.slot, &v.name);
            std::fs::create_dir_all(&host)
                .map_err(|e| fail(format!("create volume {}: {e}", host.display())))?;
            binds.push(Bind {
                source: host,
                destination: v.path.clone(),
                readonly: false,
            });
        }
        let mut spec = SandboxSpec::readonly(&req.id, &req.root, req.argv.clone(), &log);
        spec.env = req.env_vars.clone();
        spec.cwd = req.workdir.clone();
        spec.network = Network::Join(netns);
        spec.binds = binds;
        spec.limits = Some(Limits {
            memory_bytes: Some(req.memory_bytes as i64),
            cpus: Some(req.cpus),
            pids: Some(1024),
        });
        spec.labels = vec![
            (LABEL_ENV.into(), req.env.clone()),
            (LABEL_ROLE.into(), req.role.clone()),
            (LABEL_RELEASE.into(), req.release.to_string()),
            (LABEL_DIGEST.into(), req.image_digest.clone()),
        ];
        match self.runtime.start(&spec) {
            Ok(pid) => Ok(pid),
            Err(e) => {
                let _ = net::detach(&req.id);
                Err(fail(e.to_string()))
            }
        }
    }

    fn destroy(&self, _env: &str, id: &str) -> Result<(), ProviderError> {
        let fail = |detail: String| ProviderError::Destroy {
            id: id.to_string(),
            detail,
        };
        let pid = self.runtime.find(id).and_then(|f| f.pid);
        self.runtime.delete(id).map_err(|e| fail(e.to_string()))?;
        if let Some(pid) = pid {
            reap(pid);
        }
        net::detach(id).map_err(|e| fail(e.to_string()))
    }

    fn inventory(&self, env: &str) -> Result<Vec<Running>, ProviderError> {
        let found = self.runtime.list().map_err(|e| ProviderError::Other {
            what: "list servers".into(),
            detail: e.to_string(),
        })?;
        let mut out = Vec::new();
        for f in found {
            let label = |k: &str| {
                f.labels
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            };
            // Build and test sandboxes live elsewhere; anything here without
            // an environment label is still reported under no environment.
            if label(LABEL_ENV).as_deref() != Some(env) {
                continue;
            }
            let alive = f.running && f.pid.is_some_and(alive);
            out.push(Running {
                id: f.id.clone(),
                env: env.to_string(),
                role: label(LABEL_ROLE).unwrap_or_default(),
                release: label(LABEL_RELEASE)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
                pid: f.pid,
                alive,
            });
        }
        Ok(out)
    }

    fn probe(&self, req: &ServerRequest, check: &HealthCheck) -> bool {
        match check {
            HealthCheck::Http { path, port } => http_ok(&req.address, *port, path),
            HealthCheck::Tcp { port } => req.address.parse().ok().is_some_and(|ip| {
                TcpStream::connect_timeout(&SocketAddr::new(ip, *port), Duration::from_millis(500))
                    .is_ok()
            }),
            HealthCheck::Command { argv } => {
                // The command runs in a sandbox of the same image, in the
                // server's network namespace: never inside the server itself.
                let log = self
                    .dir
                    .join("logs")
                    .join(&req.env)
                    .join(format!("{}.health.log", req.id));
                let mut spec = SandboxSpec::readonly(
                    &format!("kiln-probe-{}", req.id),
                    &req.root,
                    argv.clone(),
                    &log,
                );
                spec.env = req.env_vars.clone();
                spec.network = Network::Join(net::netns_path(&req.id));
                let _ = std::fs::remove_file(&log);
                matches!(
                    self.runtime
                        .run_to_exit(&spec, Some(Duration::from_secs(10))),
                    Ok(0)
                )
            }
        }
    }

    fn log_path(&self, env: &str, id: &str) -> PathBuf {
        self.dir.join("logs").join(env).join(format!("{id}.log"))
    }

    fn balance(
        &self,
        env: &str,
        role: &str,
        b: &Balancer,
        backends: &[String],
    ) -> Result<(), ProviderError> {
        let fail = |detail: String| ProviderError::Other {
            what: format!("balancer of {env}/{role}"),
            detail,
        };
        let dir = self.balancer_dir(env, role);
        let check = b.check.as_ref().and_then(|c| {
            let probe = match &c.health {
                HealthCheck::Http { path, port } => kiln_balancer::Probe::Http {
                    path: path.clone(),
                    port: *port,
                },
                HealthCheck::Tcp { port } => kiln_balancer::Probe::Tcp { port: *port },
                HealthCheck::Command { .. } => return None,
            };
            Some(kiln_balancer::Check {
                probe,
                interval_ms: c.interval_ms,
                fall: c.fall,
                rise: c.rise,
            })
        });
        let generation = kiln_balancer::set_backends(&dir, backends, check.as_ref())
            .map_err(|e| fail(e.to_string()))?;
        self.ensure_balancer(&dir, &b.listen).map_err(fail)?;
        kiln_balancer::wait_generation(&dir, generation, Duration::from_secs(5))
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    fn drain(&self, env: &str, role: &str, backend: &str, timeout: Duration) -> bool {
        kiln_balancer::wait_drained(&self.balancer_dir(env, role), backend, timeout)
    }

    fn inspect(&self, _env: &str, id: &str, volumes: &[(String, PathBuf)]) -> Inspection {
        let Some(found) = self.runtime.find(id) else {
            return Inspection::default();
        };
        let mut out = Inspection {
            image_label: found
                .labels
                .iter()
                .find(|(k, _)| k == LABEL_DIGEST)
                .map(|(_, v)| v.clone()),
            ..Default::default()
        };
        let Some(pid) = found.pid else { return out };
        let procs = {
            let mut cached = self.procs.lock().expect("procs lock");
            match cached.as_ref() {
                Some((at, p)) if at.elapsed() < Duration::from_millis(500) => p.clone(),
                _ => {
                    let p = std::sync::Arc::new(Procs::read());
                    *cached = Some((std::time::Instant::now(), p.clone()));
                    p
                }
            }
        };
        out.foreign_processes = foreign_processes(pid, &procs);
        out.root_inode = std::fs::metadata(format!("/proc/{pid}/root"))
            .ok()
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
        // tmpfs areas are seen through the server's own root.
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        for area in ["tmp", "run"] {
            walk_files(&root.join(area), &format!("/{area}"), &mut out.writable);
        }
        for (inside, host) in volumes {
            walk_files(host, inside, &mut out.writable);
        }
        out.memory_limit = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/memory/kiln/{id}/memory.limit_in_bytes"
        ))
        .ok()
        .and_then(|s| s.trim().parse().ok());
        out.listening = listening_ports(pid);
        out
    }

    fn backend_stats(&self, env: &str, role: &str) -> Vec<(String, u64, u64)> {
        // Attempts: connections made plus connections that failed; failures:
        // connections that failed plus responses with an HTTP 5xx status.
        kiln_balancer::read_status(&self.balancer_dir(env, role))
            .map(|s| {
                s.backends
                    .into_iter()
                    .map(|b| (b.addr, b.total + b.errors, b.errors + b.responses_5xx))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn balancer_alive(&self, env: &str, role: &str) -> bool {
        balancer_pid(&self.balancer_dir(env, role)).is_some()
    }

    fn balancer_backends(&self, env: &str, role: &str) -> Vec<String> {
        let dir = self.balancer_dir(env, role);
        match kiln_balancer::read_status(&dir) {
            Some(s) => s
                .backends
                .into_iter()
                .filter(|b| b.active)
                .map(|b| b.addr)
                .collect(),
            None => kiln_balancer::read_backends(&dir)
                .map(|b| b.backends)
                .unwrap_or_default(),
        }
    }

    fn taken_ids(&self) -> std::collections::BTreeSet<String> {
        // Network namespaces and cgroups are host-wide: ids used by any
        // project's servers (and this project's containers) are taken.
        let mut out: std::collections::BTreeSet<String> = net::netns_ids().into_iter().collect();
        if let Ok(items) = std::fs::read_dir(&self.runtime.state) {
            out.extend(
                items
                    .flatten()
                    .map(|i| i.file_name().to_string_lossy().into_owned()),
            );
        }
        out
    }

    fn remove_balancer(&self, env: &str, role: &str) -> Result<(), ProviderError> {
        let dir = self.balancer_dir(env, role);
        if let Some(pid) = balancer_pid(&dir) {
            // SAFETY: kill(2) on a pid we verified runs our balancer.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            for _ in 0..200 {
                if !alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            reap(pid);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

impl Local {
    /// `.kiln/balancers/<env>-<role>/`: the balancer's control directory.
    pub fn balancer_dir(&self, env: &str, role: &str) -> PathBuf {
        self.dir.join("balancers").join(format!("{env}-{role}"))
    }

    /// Starts the role's balancer unless it runs. It is `kiln balancer
    /// serve` in a session of its own, so it outlives this process; any
    /// kiln command that needs it restarts it if it died.
    fn ensure_balancer(&self, dir: &Path, listen: &str) -> Result<(), String> {
        if balancer_pid(dir).is_some() {
            return Ok(());
        }
        let exe = std::env::var_os("KILN_EXE")
            .map(PathBuf::from)
            .or_else(|| std::env::current_exe().ok())
            .ok_or("cannot find the kiln executable")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("balancer.log"))
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(dir.join("pid"));
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("balancer")
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--dir")
            .arg(dir);
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it detaches the balancer
        // from kiln's session so it survives the terminal and kiln.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the balancer: {e}"))?;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if kiln_balancer::read_status(dir).is_some_and(|s| s.pid == child.id()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(format!(
            "the balancer did not start; see {}",
            dir.join("balancer.log").display()
        ))
    }
}

/// The pid of a live balancer for `dir`, if one runs.
fn balancer_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (alive(pid) && cmdline.windows(8).any(|w| w == b"balancer")).then_some(pid)
}

/// One HTTP/1.0 GET; healthy on a 2xx or 3xx status line. Hand-written on
/// purpose: a status line over a plain socket, with a hard per-attempt
/// timeout, is all a health probe needs, and an HTTP client crate would
/// bring TLS and a larger tree for nothing.
pub fn http_ok(address: &str, port: u16, path: &str) -> bool {
    let Ok(ip) = address.parse() else {
        return false;
    };
    let timeout = Duration::from_millis(500);
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(ip, port), timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    if s.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nUser-Agent: kiln-health\r\n\r\n")
            .as_bytes(),
    )
    .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    kiln_balancer::passes(&buf[..got])
}

/// Reaps a killed server if it is this process's child (servers started by
/// this kiln process are); otherwise init does.
fn reap(pid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    for _ in 0..50 {
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            _ => return,
        }
    }
}

/// Processes in `pid`'s pid namespace that are not `pid` or its descendants.
/// TCP ports in LISTEN state in the network namespace of `pid`, from
/// `/proc/PID/net/tcp` and `tcp6` (`local_address` is `HEXIP:HEXPORT`,
/// state `0A` is LISTEN).
fn listening_ports(pid: i32) -> Vec<u16> {
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

fn foreign_processes(pid: i32, procs: &Procs) -> Vec<String> {
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

/// Every non-directory below `dir`, shown as `shown/...`, flagging executables.
fn walk_files(dir: &Path, shown: &str, out: &mut Vec<(String, bool)>) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(items) = std::fs::read_dir(dir) else {
        return;
    };
    for item in items.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let path = format!("{}/{name}", shown.trim_end_matches('/'));
        match item.metadata() {
            Ok(m) if m.is_dir() => walk_files(&item.path(), &path, out),
            Ok(m) => {
                let exec = m.permissions().mode() & 0o111 != 0
                    || std::fs::File::open(item.path())
                        .ok()
                        .and_then(|mut f| {
                            let mut magic = [0u8; 4];
                            std::io::Read::read_exact(&mut f, &mut magic)
                                .ok()
                                .map(|_| &magic == b"\x7fELF")
                        })
                        .unwrap_or(false);
                out.push((path, exec));
            }
            Err(_) => {}
        }
    }
}
