//! The `local` provider, kiln's embedded default: each server is a
//! libcontainer sandbox started in-process from its image's shared,
//! read-only unpacked root, with new pid/mount/uts/ipc/cgroup namespaces, a
//! network namespace of its own on the environment's bridge (its own
//! address, reachable from the host), tmpfs `/tmp` and `/run`, only its
//! declared volumes writable, cgroup limits from its size, and hostname =
//! its id. Its stdout and stderr go to a log file that outlives it.
//! Servers and balancers outlive kiln.
//!
//! Layout under `<dir>` (the store, `.kiln/`), the provider's own:
//! `servers/` (libcontainer state and bundles), `logs/<env>/<id>.log`,
//! `volumes/<env>/<role>-<slot>/<volume>/`, `balancers/<env>-<role>/`,
//! `quarantine/<env>/<id>/`, `secrets/<id>/` (a server's secrets tmpfs,
//! mounted there only while its sandbox is being created; see `secrets.rs`).

mod balancer;
mod daemon;
mod dns;
pub mod firewall;
mod inspect;
pub mod net;
mod secrets;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_image::Store;
use kiln_model::{Balancer, HealthCheck, ImageRef, Server, Volume};
use kiln_provider::front::backend_set;
use kiln_provider::{
    check, BalancerState, FileCheck, Inspection, LogChunk, Provider, ProviderError, Running,
    ServerRequest, Started,
};
use kiln_sandbox::{alive, Bind, Limits, Network, Runtime, SandboxSpec};

/// Labels written on every server sandbox, so strays are found by what they claim to be.
pub const LABEL_ENV: &str = "dev.kiln.env";
pub const LABEL_ROLE: &str = "dev.kiln.role";
pub const LABEL_RELEASE: &str = "dev.kiln.release";
pub const LABEL_DIGEST: &str = "dev.kiln.image";
pub const LABEL_IMAGE: &str = "dev.kiln.image-ref";
pub const LABEL_SLOT: &str = "dev.kiln.slot";
pub const LABEL_ADDRESS: &str = "dev.kiln.address";
pub const LABEL_SPEC: &str = "dev.kiln.spec";
pub const LABEL_CREATED: &str = "dev.kiln.created";

pub struct Local {
    dir: PathBuf,
    store: Store,
    runtime: Runtime,
    /// One reading of /proc shared by the inspections of a drift scan.
    procs: std::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<inspect::Procs>)>>,
    /// Balancer ports this process let through to servers, by bridge.
    opened: std::sync::Mutex<BTreeSet<(String, u16)>>,
}

impl Local {
    /// The provider over `store` (its directory holds the provider's layout too).
    pub fn new(store: &Store) -> Local {
        let dir = store.root().to_path_buf();
        Local {
            runtime: Runtime::new(&dir.join("servers")),
            dir,
            store: store.clone(),
            procs: std::sync::Mutex::new(None),
            opened: Default::default(),
        }
    }

    fn volume_dir(&self, env: &str, role: &str, slot: u32, name: &str) -> PathBuf {
        self.dir
            .join("volumes")
            .join(env)
            .join(format!("{role}-{slot}"))
            .join(name)
    }

    fn log_path(&self, env: &str, id: &str) -> PathBuf {
        self.dir.join("logs").join(env).join(format!("{id}.log"))
    }

    /// The name an environment's network is derived from: the store's
    /// path and the environment, so two projects' `staging` never share a bridge.
    pub fn net_key(&self, env: &str) -> String {
        format!("{}:{env}", self.dir.display())
    }

    /// The sandbox runtime servers live in.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    fn procs(&self) -> std::sync::Arc<inspect::Procs> {
        let mut cached = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        match cached.as_ref() {
            Some((at, p)) if at.elapsed() < Duration::from_millis(500) => p.clone(),
            _ => {
                let p = std::sync::Arc::new(inspect::Procs::read());
                *cached = Some((std::time::Instant::now(), p.clone()));
                p
            }
        }
    }

    fn sandbox_spec(&self, req: &ServerRequest, netns: PathBuf) -> Result<SandboxSpec, String> {
        let root = self
            .store
            .root_path(&kiln_image::Digest(req.image.digest.clone()));
        let mut binds = Vec::new();
        for v in &req.volumes {
            let host = self.volume_dir(&req.env, &req.role, req.slot, &v.name);
            if !host.exists() {
                create_volume(&host, &root.join(v.path.trim_start_matches('/')))?;
            }
            binds.push(Bind {
                source: host,
                destination: v.path.clone(),
                readonly: false,
            });
        }
        // Names resolve through the environment's DNS server; the root stays
        // read-only (a file of the provider's is bound over the image's).
        let image_resolv = root.join("etc/resolv.conf");
        if image_resolv
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_file())
        {
            binds.push(Bind {
                source: self.resolv_conf(&req.env, req.subnet.gateway())?,
                destination: "/etc/resolv.conf".into(),
                readonly: true,
            });
        }
        let log = self.log_path(&req.env, &req.id);
        let mut spec = SandboxSpec::readonly(&req.id, &root, req.launch.argv.clone(), &log);
        spec.env = req.launch.env.clone();
        spec.cwd = req.launch.workdir.clone();
        spec.network = Network::Join(netns);
        spec.capabilities = req.capabilities.clone();
        spec.user = req.launch.user.clone();
        if !req.secrets.is_empty() {
            binds.push(Bind {
                source: secrets::staging_dir(&self.dir, &req.id),
                destination: "/run/secrets".into(),
                readonly: true,
            });
        }
        spec.binds = binds;
        spec.limits = Some(Limits {
            memory_bytes: Some(req.size.memory_bytes as i64),
            cpus: Some(req.size.cpus),
            pids: Some(1024),
        });
        spec.labels = vec![
            (LABEL_ENV.into(), req.env.clone()),
            (LABEL_ROLE.into(), req.role.clone()),
            (LABEL_RELEASE.into(), req.release.to_string()),
            (LABEL_DIGEST.into(), req.image.digest.clone()),
            (LABEL_IMAGE.into(), req.image.to_string()),
            (LABEL_SLOT.into(), req.slot.to_string()),
            (LABEL_ADDRESS.into(), req.address.clone()),
            (LABEL_SPEC.into(), req.spec_hash.clone()),
            (LABEL_CREATED.into(), now().to_string()),
        ];
        Ok(spec)
    }
}

impl Provider for Local {
    fn nodes(&self, _env: &str) -> Result<Vec<kiln_model::NodeInfo>, ProviderError> {
        // One host: the planner places nothing.
        Ok(Vec::new())
    }

    fn prepare(&self, _env: &str, images: &[ImageRef]) -> Result<(), ProviderError> {
        // Roots are already unpacked in the store this provider runs from.
        for i in images {
            let root = self.store.root_path(&kiln_image::Digest(i.digest.clone()));
            if !root.is_dir() {
                return Err(ProviderError::Prepare {
                    image: i.to_string(),
                    detail: format!("no unpacked root at {}", root.display()),
                });
            }
        }
        Ok(())
    }

    fn create(&self, req: &ServerRequest) -> Result<Started, ProviderError> {
        let fail = |detail: String| ProviderError::Create {
            id: req.id.clone(),
            detail,
        };
        let root = self
            .store
            .root_path(&kiln_image::Digest(req.image.digest.clone()));
        // The runtime would create a missing mount point inside the shared,
        // sealed image root: refuse instead, the image must provide it.
        for v in &req.volumes {
            if !root.join(v.path.trim_start_matches('/')).is_dir() {
                return Err(fail(format!("the image has no directory {} for volume `{}`; create it in the image (files/ or a script)", v.path, v.name)));
            }
        }
        let envnet = net::ensure_env(&self.net_key(&req.env), req.subnet)
            .map_err(|e| fail(e.to_string()))?;
        let addr = req
            .address
            .parse()
            .map_err(|_| fail(format!("bad address {}", req.address)))?;
        let netns = net::attach(&envnet, &req.id, addr).map_err(|e| fail(e.to_string()))?;
        if let Err(e) = firewall::allow(&envnet.bridge, req.subnet, &req.id, addr, &req.reach) {
            let _ = net::detach(&req.id);
            return Err(fail(e.to_string()));
        }
        let log = self.log_path(&req.env, &req.id);
        let staging = secrets::staging_dir(&self.dir, &req.id);
        let prepared = log
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .map_err(|e| e.to_string())
            .and_then(|_| {
                if req.secrets.is_empty() {
                    return Ok(());
                }
                secrets::stage(&staging, &req.secrets, req.launch.user.as_ref())
            })
            .and_then(|_| self.sandbox_spec(req, netns));
        let started =
            prepared.and_then(|spec| self.runtime.start(&spec).map_err(|e| e.to_string()));
        // The sandbox holds its own mount of the secrets now (or failed):
        // the host lets go of the plaintext either way.
        if !req.secrets.is_empty() {
            secrets::release(&staging);
        }
        match started {
            Ok(pid) => Ok(Started {
                pid: Some(pid),
                ..Started::default()
            }),
            Err(e) => {
                let _ = net::detach(&req.id);
                Err(fail(e))
            }
        }
    }

    fn destroy(&self, env: &str, id: &str) -> Result<(), ProviderError> {
        let fail = |detail: String| ProviderError::Destroy {
            id: id.to_string(),
            detail,
        };
        let pid = self.runtime.find(id).and_then(|f| f.pid);
        self.runtime.delete(id).map_err(|e| fail(e.to_string()))?;
        // Left mounted only by a crash during its creation.
        secrets::release(&secrets::staging_dir(&self.dir, id));
        if let Some(pid) = pid {
            reap(pid);
        }
        firewall::forget(&net::bridge_name(&self.net_key(env)), id)
            .map_err(|e| fail(e.to_string()))?;
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
            if label(LABEL_ENV).as_deref() != Some(env) {
                continue;
            }
            let role = label(LABEL_ROLE).unwrap_or_default();
            let release = label(LABEL_RELEASE)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            // Servers created by this kiln carry everything a state row has.
            let record = (|| {
                Some(Server {
                    id: f.id.clone(),
                    env: env.to_string(),
                    role: role.clone(),
                    slot: label(LABEL_SLOT)?.parse().ok()?,
                    image: label(LABEL_IMAGE)?,
                    image_digest: label(LABEL_DIGEST)?,
                    spec_hash: label(LABEL_SPEC)?,
                    address: label(LABEL_ADDRESS)?,
                    created: label(LABEL_CREATED)?.parse().ok()?,
                    status: kiln_model::ServerStatus::Running,
                    pid: f.pid,
                    release,
                    standby_until: None,
                    node: None,
                    published: Default::default(),
                })
            })();
            out.push(Running {
                alive: f.running && f.pid.is_some_and(alive),
                id: f.id.clone(),
                env: env.to_string(),
                role,
                release,
                pid: f.pid,
                record,
            });
        }
        Ok(out)
    }

    fn probe(&self, server: &Server, check: &HealthCheck) -> bool {
        let Ok(ip) = server.address.parse() else {
            return false;
        };
        match check {
            HealthCheck::Http { path, port } => check::http(SocketAddr::new(ip, *port), path),
            HealthCheck::Tcp { port } => check::tcp(SocketAddr::new(ip, *port)),
            HealthCheck::Command { argv } => {
                // The command runs in a sandbox of the same image, in the
                // server's network namespace: never inside the server itself.
                let log = self
                    .dir
                    .join("logs")
                    .join(&server.env)
                    .join(format!("{}.health.log", server.id));
                let root = self
                    .store
                    .root_path(&kiln_image::Digest(server.image_digest.clone()));
                let mut spec = SandboxSpec::readonly(
                    &format!("kiln-probe-{}", server.id),
                    &root,
                    argv.clone(),
                    &log,
                );
                spec.network = Network::Join(net::netns_path(&server.id));
                let _ = std::fs::remove_file(&log);
                matches!(
                    self.runtime
                        .run_to_exit(&spec, Some(Duration::from_secs(10))),
                    Ok(0)
                )
            }
        }
    }

    fn log_ids(&self, env: &str) -> Result<Vec<String>, ProviderError> {
        let dir = self.dir.join("logs").join(env);
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|i| {
                let name = i.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".log")?;
                (!id.ends_with(".health")).then(|| id.to_string())
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn read_log(&self, env: &str, id: &str, offset: u64) -> Result<LogChunk, ProviderError> {
        use std::io::{Read, Seek};
        let path = self.log_path(env, id);
        let fail = |e: std::io::Error| ProviderError::Other {
            what: format!("read the log of {id}"),
            detail: e.to_string(),
        };
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LogChunk {
                    bytes: Vec::new(),
                    next: offset,
                })
            }
            Err(e) => return Err(fail(e)),
        };
        f.seek(std::io::SeekFrom::Start(offset)).map_err(fail)?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(fail)?;
        Ok(LogChunk {
            next: offset + bytes.len() as u64,
            bytes,
        })
    }

    fn balance(
        &self,
        env: &str,
        role: &str,
        b: &Balancer,
        backends: &[kiln_provider::Upstream],
    ) -> Result<(), ProviderError> {
        let fail = |detail: String| ProviderError::Other {
            what: format!("balancer of {env}/{role}"),
            detail,
        };
        let dir = self.balancer_dir(env, role);
        self.open_front(env, &b.listen)
            .map_err(|e| fail(e.to_string()))?;
        let generation = kiln_balancer::store_backends(&dir, backend_set(b, backends))
            .map_err(|e| fail(e.to_string()))?;
        self.ensure_balancer(&dir, &b.listen).map_err(fail)?;
        kiln_balancer::wait_generation(&dir, generation, Duration::from_secs(5))
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    fn publish(&self, env: &str, names: &kiln_provider::Names) -> Result<(), ProviderError> {
        self.publish_names(env, names)
    }

    fn dns_server(&self, env: &str) -> Option<SocketAddr> {
        let gw = self.gateway(env)?;
        Some(SocketAddr::new(std::net::IpAddr::V4(gw), 53))
    }

    fn drain(&self, env: &str, role: &str, backend: &str, timeout: Duration) -> bool {
        kiln_balancer::wait_drained(&self.balancer_dir(env, role), backend, timeout)
    }

    fn balancer(&self, env: &str, role: &str) -> Option<BalancerState> {
        self.balancer_state(env, role)
    }

    fn remove_balancer(&self, env: &str, role: &str) -> Result<(), ProviderError> {
        self.stop_balancer(env, role);
        Ok(())
    }

    fn inspect(&self, server: &Server, volumes: &[Volume]) -> Inspection {
        let Some(found) = self.runtime.find(&server.id) else {
            return Inspection::default();
        };
        let mut out = Inspection {
            image_digest: found
                .labels
                .iter()
                .find(|(k, _)| k == LABEL_DIGEST)
                .map(|(_, v)| v.clone()),
            ..Default::default()
        };
        let Some(pid) = found.pid else { return out };
        out.foreign_processes = inspect::foreign_processes(pid, &self.procs());
        let root = self
            .store
            .root_path(&kiln_image::Digest(server.image_digest.clone()));
        if let (Some(running), Ok(m)) = (inspect::root_inode(pid), std::fs::metadata(&root)) {
            use std::os::unix::fs::MetadataExt;
            out.replaced_root = (m.dev(), m.ino()) != running;
        }
        // tmpfs areas are seen through the server's own root.
        let inside = PathBuf::from(format!("/proc/{pid}/root"));
        for area in ["tmp", "run"] {
            inspect::walk_files(
                &inside.join(area),
                &format!("/{area}"),
                false,
                &mut out.written,
            );
        }
        for v in volumes {
            let host = self.volume_dir(&server.env, &server.role, server.slot, &v.name);
            inspect::walk_files(&host, &v.path, true, &mut out.written);
        }
        out.memory_limit = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/memory/kiln/{}/memory.limit_in_bytes",
            server.id
        ))
        .ok()
        .and_then(|s| s.trim().parse().ok());
        out.listening = inspect::listening_ports(pid);
        out
    }

    fn verify_files(
        &self,
        image: &ImageRef,
        servers: &[&Server],
        full: bool,
    ) -> Result<FileCheck, ProviderError> {
        // Every server of a version runs from the one shared root: verified once.
        let v = kiln_image::ops::verify_with(&self.store, &image.to_string(), full, false)
            .map_err(|e| ProviderError::Other {
                what: format!("verify image {image}"),
                detail: e.to_string(),
            })?;
        let mut lines: Vec<String> = v
            .differences
            .iter()
            .map(|d| {
                d.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        lines.extend(
            v.corrupt_blobs
                .iter()
                .map(|b| format!("image blob {b} is corrupt")),
        );
        Ok(FileCheck {
            differences: servers
                .iter()
                .filter(|_| !lines.is_empty())
                .map(|s| (s.id.clone(), lines.clone()))
                .collect(),
            full,
        })
    }

    fn quarantine(
        &self,
        server: &Server,
        volumes: &[Volume],
        findings_json: &str,
    ) -> Result<String, ProviderError> {
        let dir = self.quarantine_dir(&server.env).join(&server.id);
        let fail = |e: std::io::Error| ProviderError::Other {
            what: format!("quarantine {}", server.id),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(&dir).map_err(fail)?;
        std::fs::write(dir.join("findings.json"), findings_json).map_err(fail)?;
        let _ = std::fs::copy(
            self.log_path(&server.env, &server.id),
            dir.join("server.log"),
        );
        let mut areas: Vec<(PathBuf, String)> = Vec::new();
        if let Some(pid) = server.pid {
            for area in ["tmp", "run"] {
                areas.push((
                    PathBuf::from(format!("/proc/{pid}/root/{area}")),
                    area.into(),
                ));
            }
        }
        for v in volumes {
            let host = self.volume_dir(&server.env, &server.role, server.slot, &v.name);
            areas.push((host, format!("volume-{}", v.name)));
        }
        for (from, to) in areas {
            // `cp -a` keeps modes, owners, times and links as they were:
            // evidence, not a working copy. Entry by entry, so that
            // `/run/secrets` (delivered, not written) is never copied out.
            let _ = std::fs::create_dir_all(dir.join(&to));
            let Ok(items) = std::fs::read_dir(&from) else {
                continue;
            };
            for item in items.flatten() {
                if to == "run" && item.file_name() == "secrets" {
                    continue;
                }
                let _ = std::process::Command::new("cp")
                    .arg("-a")
                    .arg(item.path())
                    .arg(dir.join(&to))
                    .status();
            }
        }
        Ok(dir.display().to_string())
    }

    fn expire_quarantine(&self, env: &str, before: i64) -> Result<Vec<String>, ProviderError> {
        let mut gone = Vec::new();
        for item in std::fs::read_dir(self.quarantine_dir(env))
            .into_iter()
            .flatten()
            .flatten()
        {
            let at = std::fs::read(item.path().join("findings.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["quarantined_at"].as_i64());
            if at.is_some_and(|t| t < before) {
                let _ = std::fs::remove_dir_all(item.path());
                gone.push(item.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(gone)
    }

    fn taken_ids(&self) -> Result<BTreeSet<String>, ProviderError> {
        // Network namespaces and cgroups are host-wide: ids used by any
        // project's servers (and this project's containers) are taken.
        let mut out: BTreeSet<String> = net::netns_ids().into_iter().collect();
        if let Ok(items) = std::fs::read_dir(&self.runtime.state) {
            out.extend(
                items
                    .flatten()
                    .map(|i| i.file_name().to_string_lossy().into_owned()),
            );
        }
        Ok(out)
    }

    fn network(&self, env: &str) -> Option<kiln_model::Subnet> {
        net::registered_subnet(&net::bridge_name(&self.net_key(env)))
    }

    fn network_conflict(
        &self,
        env: &str,
        subnet: kiln_model::Subnet,
    ) -> Result<Option<String>, ProviderError> {
        net::conflict(&self.net_key(env), subnet).map_err(|e| ProviderError::Other {
            what: format!("check the addresses of {subnet}"),
            detail: e.to_string(),
        })
    }

    fn teardown(&self, env: &str) -> Result<(), ProviderError> {
        self.stop_dns(env);
        net::remove_env(&self.net_key(env)).map_err(|e| ProviderError::Other {
            what: format!("remove the network of `{env}`"),
            detail: e.to_string(),
        })
    }
}

impl Local {
    /// Lets the environment's servers reach a balancer listening on all
    /// addresses or on their gateway (once per process and port).
    fn open_front(&self, env: &str, listen: &str) -> Result<(), net::NetError> {
        let Ok(addr) = listen.parse::<SocketAddr>() else {
            return Ok(());
        };
        let bridge = net::bridge_name(&self.net_key(env));
        let Some(subnet) = net::registered_subnet(&bridge) else {
            return Ok(());
        };
        let std::net::IpAddr::V4(ip) = addr.ip() else {
            return Ok(());
        };
        if !(ip.is_unspecified() || ip == subnet.gateway()) {
            return Ok(());
        }
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if opened.insert((bridge.clone(), addr.port())) {
            firewall::open_port(&bridge, subnet, addr.port())?;
        }
        Ok(())
    }

    fn quarantine_dir(&self, env: &str) -> PathBuf {
        self.dir.join("quarantine").join(env)
    }
}

/// Creates a volume's directory with the owner, group and mode of its
/// mount point in the image, as Docker's named volumes do, so a non-root
/// daemon can write to it. An existing volume keeps what it has.
fn create_volume(host: &std::path::Path, mount_point: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fail = |e: &dyn std::fmt::Display| format!("create volume {}: {e}", host.display());
    let m = std::fs::metadata(mount_point).map_err(|e| fail(&e))?;
    // Built aside and renamed in: a crash never leaves a volume with the
    // wrong owner that a later start would take as it is.
    let tmp = host.with_extension("new");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| fail(&e))?;
    nix::unistd::chown(
        &tmp,
        Some(nix::unistd::Uid::from_raw(m.uid())),
        Some(nix::unistd::Gid::from_raw(m.gid())),
    )
    .map_err(|e| fail(&e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m.mode() & 0o7777))
        .map_err(|e| fail(&e))?;
    std::fs::rename(&tmp, host).map_err(|e| fail(&e))
}

/// Seconds since the epoch.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reaps a killed server if it is this process's child (servers started by
/// this kiln process are); otherwise init does.
pub(crate) fn reap(pid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    for _ in 0..50 {
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(2)),
            _ => return,
        }
    }
}
