//! [`Swarm`]: kiln's `Provider` on a Docker Swarm. It turns the engine's
//! fully decided requests into this crate's calls and blocks on them (it
//! owns a tokio runtime): `prepare` pushes versions to the registry by
//! digest, `nodes` is the inventory the planner places servers with,
//! `create` runs exactly the node and published ports the plan chose, and
//! `inventory`, logs and drift read the swarm back.
//!
//! What a swarm does not do for kiln yet runs through a front provider on
//! kiln's own host (the `local` provider in the CLI): each role's balancer
//! and the environment's DNS. Backends are `NODE_IP:PORT`, so that front
//! reaches servers on every node.
//!
//! A destroyed server's log is copied to `DIR/logs/ENV/ID.log` first, so
//! `kiln logs` outlives the service.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt as _;
use kiln_image::{Digest, Store};
use kiln_model::{
    error_chain, Balancer, BalancerCheck, HealthCheck, ImageRef, NodeInfo, Server, Subnet,
    SwarmSpec, Volume,
};
use kiln_provider::{
    BalancerState, FileCheck, Inspection, LogChunk, Names, Provider, ProviderError, Running,
    ServerRequest, Started,
};

use crate::cluster::Cluster;
use crate::engine::Endpoint;
use crate::error::SwarmError;
use crate::node::NodeEngine;
use crate::registry::{Registry, RegistryOptions};
use crate::server::{
    config_drift, LogChunk as Chunk, PortMap, Restart, ServerSpec, VolumeMount, LABEL_SERVER,
};

/// The label holding the service spec as kiln created it (JSON), so that
/// config drift compares with what kiln asked for, not with kiln.toml now.
pub const LABEL_SPEC: &str = "dev.kiln.spec";
/// What else a state row has, so a server can be adopted back into a state
/// that lost it: the image as `name@version`, the role spec hash, and the
/// creation time (seconds since the epoch), as the local provider labels.
pub const LABEL_IMAGE_REF: &str = "dev.kiln.image-ref";
pub const LABEL_SPEC_HASH: &str = "dev.kiln.spec-hash";
pub const LABEL_CREATED: &str = "dev.kiln.created";

/// How long a new server's task may take to run (pull included).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long removing a service may take (its grace period included).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);
const TMPFS_BYTES: u64 = 64 << 20;
const STOP_GRACE: Duration = Duration::from_secs(10);

/// An environment's swarm.
pub struct Swarm {
    spec: SwarmSpec,
    pub(crate) store: Store,
    /// Where kept logs, quarantined evidence and balancer tokens go.
    pub(crate) dir: PathBuf,
    /// Serves DNS for the swarm's servers (see the module doc).
    front: Box<dyn Provider>,
    pub(crate) rt: tokio::runtime::Runtime,
    cluster: Mutex<Option<Cluster>>,
    registry: Mutex<Option<std::sync::Arc<Registry>>>,
    /// The balancer image's reference, once baked and pushed.
    pub(crate) balancer_image: Mutex<Option<String>>,
    /// Each role's running balancers as last listed (see `front`).
    pub(crate) fronts: Mutex<BTreeMap<(String, String), Vec<crate::front::Live>>>,
}

fn other(what: impl Into<String>) -> impl FnOnce(SwarmError) -> ProviderError {
    let what = what.into();
    move |e| ProviderError::Other {
        what,
        detail: error_chain(&e),
    }
}

impl Swarm {
    /// No I/O: the manager is connected on first use, so commands on
    /// other environments never wait for an unreachable swarm.
    pub fn new(spec: SwarmSpec, store: Store, front: Box<dyn Provider>) -> Swarm {
        let dir = store.root().join("swarm");
        // A current-thread runtime: every call blocks on one future.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime without I/O drivers failing means no memory");
        Swarm {
            spec,
            store,
            dir,
            front,
            rt,
            cluster: Mutex::new(None),
            registry: Mutex::new(None),
            balancer_image: Mutex::new(None),
            fronts: Mutex::new(BTreeMap::new()),
        }
    }

    fn endpoint(&self, url: &str) -> Endpoint {
        match &self.spec.tls {
            Some(dir) => Endpoint::with_tls(url, dir),
            None => Endpoint::new(url),
        }
    }

    /// The manager, connected once.
    pub fn cluster(&self) -> Result<Cluster, ProviderError> {
        let mut g = self.cluster.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let ep = self.endpoint(&self.spec.endpoint);
        let c = self
            .rt
            .block_on(Cluster::connect(&ep))
            .map_err(other("connect to the swarm manager"))?;
        *g = Some(c.clone());
        Ok(c)
    }

    pub(crate) fn registry(&self) -> Result<std::sync::Arc<Registry>, ProviderError> {
        let mut g = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = g.as_ref() {
            return Ok(r.clone());
        }
        let r = Registry::new(
            &self.spec.registry,
            RegistryOptions {
                insecure: self.spec.registry_insecure,
                ..Default::default()
            },
        )
        .map_err(other("registry"))?;
        let r = std::sync::Arc::new(r);
        *g = Some(r.clone());
        Ok(r)
    }

    /// The engine of one node (for exec sessions and exports): from the
    /// spec's `engines`, else the node's `dev.kiln.engine` label.
    fn node_engine(&self, cluster: &Cluster, node_id: &str) -> Option<NodeEngine> {
        let nodes = self.rt.block_on(cluster.nodes()).ok()?;
        let node = nodes.iter().find(|n| n.id == node_id)?;
        let url = self
            .spec
            .engines
            .get(&node.id)
            .or_else(|| self.spec.engines.get(&node.hostname))
            .map(String::as_str)
            .or_else(|| node.engine_endpoint())?;
        self.rt
            .block_on(NodeEngine::connect(&self.endpoint(url)))
            .ok()
    }

    fn log_path(&self, env: &str, id: &str) -> PathBuf {
        self.dir.join("logs").join(env).join(format!("{id}.log"))
    }

    /// A service's whole log as the engine has it (stdout and stderr interleaved).
    fn service_log(&self, cluster: &Cluster, env: &str, id: &str) -> Result<Vec<u8>, SwarmError> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut s = std::pin::pin!(cluster.logs(env, id, false, None));
            while let Some(c) = s.next().await {
                match c? {
                    Chunk::Stdout(b) | Chunk::Stderr(b) => out.extend(b),
                }
            }
            Ok(out)
        })
    }

    /// What kiln asks the swarm for, for `req`.
    fn server_spec(&self, req: &ServerRequest, image: String) -> ServerSpec {
        let mut cap_add: Vec<String> = req.capabilities.iter().map(|c| c.to_string()).collect();
        cap_add.sort();
        ServerSpec {
            env: req.env.clone(),
            role: req.role.clone(),
            release: req.release,
            slot: req.slot,
            server: req.id.clone(),
            image,
            argv: req.launch.argv.clone(),
            env_vars: req.launch.env.clone(),
            workdir: Some(req.launch.workdir.clone()).filter(|w| !w.is_empty()),
            user: req
                .launch
                .user
                .as_ref()
                .map(|u| format!("{}:{}", u.uid, u.gid)),
            cpus: req.size.cpus,
            memory_bytes: req.size.memory_bytes,
            reserve: false,
            // Exactly the role's set, whatever the engine's default is.
            cap_add,
            cap_drop: vec!["ALL".into()],
            ports: req
                .published
                .iter()
                .map(|(&target, &published)| PortMap { target, published })
                .collect(),
            constraints: Vec::new(),
            node: req.node.clone(),
            volumes: req
                .volumes
                .iter()
                .map(|v| VolumeMount {
                    name: format!("kiln-{}-{}-{}-{}", req.env, req.role, req.slot, v.name),
                    target: v.path.clone(),
                })
                .collect(),
            tmpfs_bytes: TMPFS_BYTES,
            restart: Restart::Never,
            stop_grace: STOP_GRACE,
        }
    }

    fn remove(&self, cluster: &Cluster, env: &str, id: &str) -> Result<(), SwarmError> {
        self.rt
            .block_on(cluster.remove_server(env, id, REMOVE_TIMEOUT))
    }
}

impl Provider for Swarm {
    fn prepare(&self, _env: &str, images: &[ImageRef]) -> Result<(), ProviderError> {
        let registry = self.registry()?;
        for image in images {
            let digest = Digest(image.digest.clone());
            self.rt
                .block_on(registry.push(&self.store, &digest))
                .map_err(|e| ProviderError::Prepare {
                    image: image.to_string(),
                    detail: error_chain(&e),
                })?;
        }
        Ok(())
    }

    fn nodes(&self, _env: &str) -> Result<Vec<NodeInfo>, ProviderError> {
        let cluster = self.cluster()?;
        let nodes = self
            .rt
            .block_on(cluster.nodes())
            .map_err(other("list swarm nodes"))?;
        let servers = self
            .rt
            .block_on(cluster.servers(None))
            .map_err(other("list services"))?;
        let mut ports = crate::front::taken_ports(&servers);
        Ok(nodes
            .into_iter()
            .map(|n| NodeInfo {
                available: n.schedulable(),
                ports: ports.remove(&n.id).unwrap_or_default(),
                id: n.id,
                hostname: n.hostname,
                address: n.addr,
                labels: n.labels,
                manager: n.manager,
            })
            .collect())
    }

    fn create(&self, req: &ServerRequest) -> Result<Started, ProviderError> {
        let fail = |detail: String| ProviderError::Create {
            id: req.id.clone(),
            detail,
        };
        if !req.secrets.is_empty() {
            // kiln.toml refuses this; a server must never start without
            // the secrets its plan promised it.
            return Err(fail(
                "the swarm provider does not deliver secrets yet".into(),
            ));
        }
        let cluster = self.cluster()?;
        let image = self
            .registry()?
            .reference(&Digest(req.image.digest.clone()));
        let spec = self.server_spec(req, image);
        let mut service = spec.to_service().map_err(|e| fail(error_chain(&e)))?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        service.labels.get_or_insert_with(Default::default).extend([
            (LABEL_IMAGE_REF.to_string(), req.image.to_string()),
            (LABEL_SPEC_HASH.to_string(), req.spec_hash.clone()),
            (LABEL_CREATED.to_string(), created.to_string()),
        ]);
        let json = serde_json::to_string(&service).map_err(|e| fail(e.to_string()))?;
        service
            .labels
            .get_or_insert_with(Default::default)
            .insert(LABEL_SPEC.into(), json);
        let docker = cluster.engine().docker().clone();
        self.rt
            .block_on(docker.create_service(service, None))
            .map_err(|e| fail(error_chain(&e)))?;
        let running = self
            .rt
            .block_on(cluster.wait_running(&req.env, &req.id, START_TIMEOUT))
            .map_err(|e| fail(error_chain(&e)))?;
        let task = running.current();
        Ok(Started {
            pid: None,
            node: task.map(|t| t.node_id.clone()),
            published: req.published.clone(),
            address: task.and_then(|t| t.node_addr.clone()),
        })
    }

    fn destroy(&self, env: &str, id: &str) -> Result<(), ProviderError> {
        let fail = |e: SwarmError| ProviderError::Destroy {
            id: id.into(),
            detail: error_chain(&e),
        };
        let cluster = self.cluster()?;
        let exists = self
            .rt
            .block_on(cluster.server(env, id))
            .map_err(fail)?
            .is_some();
        if exists {
            // Keep its log: the engine forgets a removed service's output.
            if let Ok(log) = self.service_log(&cluster, env, id) {
                let path = self.log_path(env, id);
                if let Some(parent) = path.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = std::fs::write(&path, log);
            }
        }
        self.remove(&cluster, env, id).map_err(fail)
    }

    fn inventory(&self, env: &str) -> Result<Vec<Running>, ProviderError> {
        let cluster = self.cluster()?;
        let servers = self
            .rt
            .block_on(cluster.servers(Some(env)))
            .map_err(other("list services"))?;
        // Services carrying the env's label but not kiln's whole set of
        // labels (made by hand) are listed too: the engine finds them
        // unmanaged, and may remove them.
        // The role balancers are not servers (see `front`).
        Ok(servers
            .iter()
            .filter(|s| !crate::front::is_balancer(s))
            .map(|s| match s.spec.as_ref() {
                Some(spec) => Running {
                    id: spec.server.clone(),
                    env: spec.env.clone(),
                    role: spec.role.clone(),
                    release: spec.release,
                    pid: None,
                    alive: s.alive(),
                    record: record_of(s, spec),
                },
                None => Running {
                    id: s.inventory_id(),
                    env: env.to_string(),
                    role: s
                        .label(crate::server::LABEL_ROLE)
                        .unwrap_or_default()
                        .to_string(),
                    release: 0,
                    pid: None,
                    alive: s.alive(),
                    record: None,
                },
            })
            .collect())
    }

    fn probe(&self, server: &Server, check: &HealthCheck) -> bool {
        let at = |port: u16| server.endpoint(port).parse::<SocketAddr>().ok();
        match check {
            HealthCheck::Http { path, port } => {
                at(*port).is_some_and(|a| kiln_provider::check::http(a, path))
            }
            HealthCheck::Tcp { port } => at(*port).is_some_and(kiln_provider::check::tcp),
            // Refused by the spec for swarm environments: kiln never execs.
            HealthCheck::Command { .. } => false,
        }
    }

    fn log_ids(&self, env: &str) -> Result<Vec<String>, ProviderError> {
        let mut ids: BTreeSet<String> = self.inventory(env)?.into_iter().map(|r| r.id).collect();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs").join(env)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(id) = name.strip_suffix(".log") {
                    ids.insert(id.to_string());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }

    fn read_log(&self, env: &str, id: &str, offset: u64) -> Result<LogChunk, ProviderError> {
        let cluster = self.cluster()?;
        let live = self
            .rt
            .block_on(cluster.server(env, id))
            .map_err(other(format!("log of {id}")))?
            .is_some();
        let bytes = if live {
            self.service_log(&cluster, env, id)
                .map_err(other(format!("log of {id}")))?
        } else {
            std::fs::read(self.log_path(env, id)).map_err(|e| ProviderError::Other {
                what: format!("log of {id}"),
                detail: e.to_string(),
            })?
        };
        let start = (offset as usize).min(bytes.len());
        Ok(LogChunk {
            next: bytes.len() as u64,
            bytes: bytes[start..].to_vec(),
        })
    }

    fn balance(
        &self,
        env: &str,
        role: &str,
        balancer: &Balancer,
        backends: &[kiln_provider::Upstream],
    ) -> Result<(), ProviderError> {
        // Backends are `NODE_IP:PUBLISHED`, each server on its own host
        // port: a check of the balanced port probes each backend's own
        // port (0); a check of another declared port cannot be expressed
        // per backend, so only kiln's health gates stay for it.
        let own_port = |check: &Option<BalancerCheck>, balanced: u16| {
            let mut c = check.clone()?;
            match &mut c.health {
                HealthCheck::Http { port, .. } | HealthCheck::Tcp { port } if *port == balanced => {
                    *port = 0;
                    Some(c)
                }
                _ => None,
            }
        };
        let mut b = balancer.clone();
        b.check = own_port(&balancer.check, balancer.port);
        let backends: Vec<kiln_provider::Upstream> = backends
            .iter()
            .map(|u| kiln_provider::Upstream {
                check: own_port(&u.check, u.port),
                ..u.clone()
            })
            .collect();
        let set = kiln_provider::front::backend_set(&b, &backends);
        self.switch_balancers(env, role, &b, &set)
    }

    fn publish(&self, env: &str, names: &Names) -> Result<(), ProviderError> {
        self.front.publish(env, names)
    }

    fn dns_server(&self, env: &str) -> Option<SocketAddr> {
        self.front.dns_server(env)
    }

    fn drain(&self, env: &str, role: &str, backend: &str, timeout: Duration) -> bool {
        self.drain_balancers(env, role, backend, timeout)
    }

    fn balancer(&self, env: &str, role: &str) -> Option<BalancerState> {
        self.balancer_state(env, role)
    }

    fn remove_balancer(&self, env: &str, role: &str) -> Result<(), ProviderError> {
        self.remove_balancers(env, Some(role))
    }

    fn inspect(&self, server: &Server, _volumes: &[Volume]) -> Inspection {
        let Ok(cluster) = self.cluster() else {
            return Inspection::default();
        };
        let Ok(Some(found)) = self.rt.block_on(cluster.server(&server.env, &server.id)) else {
            return Inspection::default();
        };
        let mut out = Inspection::default();
        if let Some(actual) = &found.spec {
            out.image_digest = actual.digest().map(str::to_string);
            out.memory_limit = Some(actual.memory_bytes).filter(|&m| m > 0);
        }
        let created: Option<bollard::models::ServiceSpec> = found
            .label(LABEL_SPEC)
            .and_then(|j| serde_json::from_str(j).ok());
        if let Some(expected) = created.as_ref().and_then(ServerSpec::from_service) {
            // The kept spec and the adoption record are kiln's own labels,
            // not part of what it asked for.
            let mut actual = found.raw.clone();
            if let Some(l) = actual.labels.as_mut() {
                for k in [LABEL_SPEC, LABEL_IMAGE_REF, LABEL_SPEC_HASH, LABEL_CREATED] {
                    l.remove(k);
                }
            }
            out.settings = config_drift(&expected, &actual)
                .iter()
                .map(ToString::to_string)
                .collect();
        }
        if let Some(t) = found.current() {
            if let (Some(container), Some(node)) =
                (&t.container_id, self.node_engine(&cluster, &t.node_id))
            {
                if let Ok(s) = self.rt.block_on(node.exec_sessions(container)) {
                    out.sessions = s
                        .open
                        .iter()
                        .map(|id| format!("open exec session {id}"))
                        .chain(
                            s.started
                                .iter()
                                .map(|(at, cmd)| format!("exec `{cmd}` at {at}")),
                        )
                        .collect();
                }
            }
        }
        out
    }

    fn verify_files(
        &self,
        image: &ImageRef,
        servers: &[&Server],
        _full: bool,
    ) -> Result<FileCheck, ProviderError> {
        let fail = |detail: String| ProviderError::Other {
            what: format!("verify files of {image}"),
            detail,
        };
        let cluster = self.cluster()?;
        let Some(env) = servers.first().map(|s| s.env.clone()) else {
            return Ok(FileCheck::default());
        };
        let rec = self
            .store
            .version(&image.name, image.version)
            .map_err(|e| fail(error_chain(&e)))?;
        let seal: kiln_image::seal::Seal = self
            .store
            .read_json_blob(&rec.seal)
            .map_err(|e| fail(error_chain(&e)))?;
        let wanted: BTreeSet<&str> = servers.iter().map(|s| s.id.as_str()).collect();
        let found: Vec<crate::server::Server> = self
            .rt
            .block_on(cluster.servers(Some(&env)))
            .map_err(|e| fail(error_chain(&e)))?
            .into_iter()
            .filter(|s| s.label(LABEL_SERVER).is_some_and(|id| wanted.contains(id)))
            .collect();
        let mut out = FileCheck {
            differences: BTreeMap::new(),
            full: true,
        };
        // One export per node and version stands for every server of it there.
        for target in crate::node::export_targets(&found) {
            let node = self
                .node_engine(&cluster, &target.node_id)
                .ok_or_else(|| {
                    fail(format!(
                        "node {} has no engine kiln can reach (set `engines` in the provider or the node label dev.kiln.engine)",
                        target.node_id
                    ))
                })?;
            let mounts = ["tmp", "run"];
            let diffs = self
                .rt
                .block_on(node.verify_export(&target.container, &seal, &mounts))
                .map_err(|e| fail(error_chain(&e)))?;
            let lines: Vec<String> = diffs.iter().map(ToString::to_string).collect();
            for s in &found {
                let same_place = s.current().is_some_and(|t| t.node_id == target.node_id);
                if let (true, Some(id)) = (same_place, s.label(LABEL_SERVER)) {
                    if !lines.is_empty() {
                        out.differences.insert(id.to_string(), lines.clone());
                    }
                }
            }
        }
        Ok(out)
    }

    fn quarantine(
        &self,
        server: &Server,
        _volumes: &[Volume],
        findings_json: &str,
    ) -> Result<String, ProviderError> {
        let dir = self
            .dir
            .join("quarantine")
            .join(&server.env)
            .join(&server.id);
        let io = |e: std::io::Error| ProviderError::Other {
            what: format!("quarantine {}", server.id),
            detail: format!("{}: {e}", dir.display()),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::write(dir.join("findings.json"), findings_json).map_err(io)?;
        let cluster = self.cluster()?;
        if let Ok(log) = self.service_log(&cluster, &server.env, &server.id) {
            std::fs::write(dir.join("log"), log).map_err(io)?;
        }
        Ok(dir.display().to_string())
    }

    fn expire_quarantine(&self, env: &str, before: i64) -> Result<Vec<String>, ProviderError> {
        let mut gone = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.dir.join("quarantine").join(env)) else {
            return Ok(gone);
        };
        for e in rd.flatten() {
            let modified = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(i64::MAX, |d| d.as_secs() as i64);
            if modified < before && std::fs::remove_dir_all(e.path()).is_ok() {
                gone.push(e.file_name().to_string_lossy().to_string());
            }
        }
        Ok(gone)
    }

    fn taken_ids(&self) -> Result<BTreeSet<String>, ProviderError> {
        let cluster = self.cluster()?;
        let servers = self
            .rt
            .block_on(cluster.servers(None))
            .map_err(other("list services"))?;
        Ok(servers
            .iter()
            .filter_map(|s| s.label(LABEL_SERVER).map(str::to_string))
            .collect())
    }

    fn network(&self, _env: &str) -> Option<Subnet> {
        // Servers are reached at their nodes' addresses: no network of kiln's.
        None
    }

    fn network_conflict(
        &self,
        _env: &str,
        _subnet: Subnet,
    ) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    fn teardown(&self, env: &str) -> Result<(), ProviderError> {
        self.remove_balancers(env, None)?;
        self.front.teardown(env)
    }
}

/// The state row of a server kiln created, from its service's labels and
/// where its task runs (None for a service made otherwise, or not placed).
fn record_of(found: &crate::server::Server, spec: &ServerSpec) -> Option<Server> {
    let task = found.current()?;
    Some(Server {
        id: spec.server.clone(),
        env: spec.env.clone(),
        role: spec.role.clone(),
        slot: spec.slot,
        image: found.label(LABEL_IMAGE_REF)?.to_string(),
        image_digest: spec.digest()?.to_string(),
        spec_hash: found.label(LABEL_SPEC_HASH)?.to_string(),
        address: task.node_addr.clone()?,
        created: found.label(LABEL_CREATED)?.parse().ok()?,
        status: kiln_model::ServerStatus::Running,
        pid: None,
        release: spec.release,
        standby_until: None,
        node: Some(task.node_id.clone()).filter(|n| !n.is_empty()),
        published: spec.ports.iter().map(|p| (p.target, p.published)).collect(),
    })
}
