//! kiln servers as Swarm services: one service with one replica per
//! server, pinned by digest and labelled with env, role, release, slot and
//! server id. This module owns the mapping both ways ([`ServerSpec`] ⇄
//! Docker's `ServiceSpec`), so that config drift is a plain comparison of
//! what kiln asked for with what the swarm now holds; and creation,
//! listing (with each service's tasks, nodes and addresses), waiting,
//! removal and logs.
//!
//! Restart policy: kiln asks for `none` by default. Swarm then never
//! starts a second task for a server on its own: a crash or a lost node
//! shows up as a dead task that kiln's reconcile replaces through a plan
//! (journaled, audited, within `replace_share`). `on-failure` is offered
//! for roles that prefer Swarm's quicker restarts in place.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, EndpointSpecModeEnum, Limit, Mount, MountTmpfsOptions, MountType,
    MountVolumeOptions, ResourceObject, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
    TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{ListServicesOptions, ListTasksOptions, LogsOptions};
use futures_util::{Stream, StreamExt as _};

use crate::cluster::{Cluster, NodeHealth};
use crate::error::{Result, SwarmError};

pub const LABEL_ENV: &str = "dev.kiln.env";
/// How long a host port may stay taken (by a stopping container) before a
/// task that needs it is an error.
const PORT_GRACE: Duration = Duration::from_secs(15);
pub const LABEL_ROLE: &str = "dev.kiln.role";
pub const LABEL_RELEASE: &str = "dev.kiln.release";
pub const LABEL_SLOT: &str = "dev.kiln.slot";
pub const LABEL_SERVER: &str = "dev.kiln.server";
/// The image's manifest digest (`sha256:...`), as the local provider labels it.
pub const LABEL_DIGEST: &str = "dev.kiln.image";

const TMPFS_DEFAULT: u64 = 64 << 20;

/// How Swarm may restart a server's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Never: a dead task stays dead until kiln replaces the server.
    Never,
    /// Swarm restarts a task that exits non-zero, at most this many times.
    OnFailure { max_attempts: u32 },
}

/// A port of the server published on its node (host mode: no routing mesh,
/// which needs IPVS). `published` is unique per node among kiln's servers,
/// so two servers of one role may share a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMap {
    pub target: u16,
    pub published: u16,
}

/// A node-local named volume mounted into the server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VolumeMount {
    /// The volume's name on its node (created there on first use).
    pub name: String,
    pub target: String,
}

/// Everything kiln decides about one server on a swarm. The planner fills
/// it; nothing is chosen at execution time.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSpec {
    pub env: String,
    pub role: String,
    pub release: i64,
    pub slot: u32,
    /// The server id, e.g. `app-3f9c`.
    pub server: String,
    /// `REPO@sha256:...`: never a tag.
    pub image: String,
    /// Entrypoint then command; empty keeps the image's.
    pub argv: Vec<String>,
    /// `KEY=VALUE`.
    pub env_vars: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub cpus: f64,
    pub memory_bytes: u64,
    /// Also reserve the limits, so the scheduler refuses a node without room
    /// (a pending task with "no suitable node") instead of overcommitting it.
    pub reserve: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub ports: Vec<PortMap>,
    /// Placement constraints the role declares (`node.labels.zone==a`).
    pub constraints: Vec<String>,
    /// The node the server must run on (`node.id`): the node of its volumes,
    /// or the planner's choice when it spreads servers itself.
    pub node: Option<String>,
    pub volumes: Vec<VolumeMount>,
    /// Size of the tmpfs on /tmp and /run each.
    pub tmpfs_bytes: u64,
    pub restart: Restart,
    pub stop_grace: Duration,
}

impl ServerSpec {
    /// The service's name: `kiln-ENV-SERVER`.
    pub fn service_name(&self) -> String {
        service_name(&self.env, &self.server)
    }

    /// The image's manifest digest (`sha256:...`).
    pub fn digest(&self) -> Option<&str> {
        image_digest(&self.image)
    }

    /// The labels on the service and its containers.
    pub fn labels(&self) -> HashMap<String, String> {
        let mut l = HashMap::new();
        l.insert(LABEL_ENV.into(), self.env.clone());
        l.insert(LABEL_ROLE.into(), self.role.clone());
        l.insert(LABEL_RELEASE.into(), self.release.to_string());
        l.insert(LABEL_SLOT.into(), self.slot.to_string());
        l.insert(LABEL_SERVER.into(), self.server.clone());
        if let Some(d) = self.digest() {
            l.insert(LABEL_DIGEST.into(), d.to_string());
        }
        l
    }

    fn check(&self) -> Result<()> {
        let bad = |reason: String| SwarmError::Spec {
            server: self.server.clone(),
            reason,
        };
        if self.digest().is_none() {
            return Err(SwarmError::NotByDigest {
                image: self.image.clone(),
            });
        }
        let name = self.service_name();
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
        if name.len() > 63 || !name.chars().all(ok) {
            return Err(bad(format!(
                "service name `{name}` must be at most 63 letters, digits, '-', '_' or '.'"
            )));
        }
        if !(self.cpus >= 0.0 && self.cpus.is_finite()) {
            return Err(bad(format!("invalid CPU limit {}", self.cpus)));
        }
        let mut published: Vec<u16> = self.ports.iter().map(|p| p.published).collect();
        published.sort_unstable();
        if published.windows(2).any(|w| w[0] == w[1]) || published.contains(&0) {
            return Err(bad("published ports must be distinct and non-zero".into()));
        }
        Ok(())
    }

    /// Docker's service spec for this server.
    pub fn to_service(&self) -> Result<ServiceSpec> {
        self.check()?;
        let labels = self.labels();
        let mut mounts = vec![
            tmpfs("/tmp", self.tmpfs_bytes, 0o1777),
            tmpfs("/run", self.tmpfs_bytes, 0o755),
        ];
        mounts.extend(self.volumes.iter().map(|v| Mount {
            target: Some(v.target.clone()),
            source: Some(v.name.clone()),
            typ: Some(MountType::VOLUME),
            read_only: Some(false),
            volume_options: Some(MountVolumeOptions {
                labels: Some(labels.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }));
        let limits = Limit {
            nano_cpus: (self.cpus > 0.0).then(|| (self.cpus * 1e9).round() as i64),
            memory_bytes: (self.memory_bytes > 0).then_some(self.memory_bytes as i64),
            pids: None,
        };
        let reservations = self.reserve.then_some(ResourceObject {
            nano_cpus: limits.nano_cpus,
            memory_bytes: limits.memory_bytes,
            generic_resources: None,
        });
        let mut constraints = self.constraints.clone();
        if let Some(node) = &self.node {
            constraints.push(format!("node.id=={node}"));
        }
        let (condition, max_attempts) = match self.restart {
            Restart::Never => (TaskSpecRestartPolicyConditionEnum::NONE, None),
            Restart::OnFailure { max_attempts } => (
                TaskSpecRestartPolicyConditionEnum::ON_FAILURE,
                Some(i64::from(max_attempts)),
            ),
        };
        let (command, args) = match self.argv.as_slice() {
            [] => (None, None),
            argv => (Some(argv.to_vec()), None),
        };
        Ok(ServiceSpec {
            name: Some(self.service_name()),
            labels: Some(labels.clone()),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(self.image.clone()),
                    labels: Some(labels),
                    command,
                    args,
                    hostname: Some(self.server.clone()),
                    env: Some(self.env_vars.clone()),
                    dir: self.workdir.clone(),
                    user: self.user.clone(),
                    read_only: Some(true),
                    mounts: Some(mounts),
                    stop_grace_period: Some(self.stop_grace.as_nanos() as i64),
                    capability_add: (!self.cap_add.is_empty()).then(|| caps(&self.cap_add)),
                    capability_drop: (!self.cap_drop.is_empty()).then(|| caps(&self.cap_drop)),
                    ..Default::default()
                }),
                resources: Some(TaskSpecResources {
                    limits: Some(limits),
                    reservations,
                    ..Default::default()
                }),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(condition),
                    max_attempts,
                    ..Default::default()
                }),
                placement: Some(TaskSpecPlacement {
                    constraints: (!constraints.is_empty()).then_some(constraints),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
                ..Default::default()
            }),
            endpoint_spec: Some(EndpointSpec {
                // No virtual IP: it needs IPVS, and kiln addresses servers
                // by node address and published port anyway.
                mode: Some(EndpointSpecModeEnum::DNSRR),
                ports: Some(
                    self.ports
                        .iter()
                        .map(|p| EndpointPortConfig {
                            protocol: Some(EndpointPortConfigProtocolEnum::TCP),
                            target_port: Some(i64::from(p.target)),
                            published_port: Some(i64::from(p.published)),
                            publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        })
    }

    /// What kiln would have asked for to get `service`; None when the service
    /// lacks kiln's labels. The inverse of [`ServerSpec::to_service`] for
    /// every field kiln sets (the read-only root and the tmpfs mounts are
    /// fixed, so [`config_drift`] checks them on the raw spec).
    pub fn from_service(service: &ServiceSpec) -> Option<ServerSpec> {
        let labels = service.labels.clone().unwrap_or_default();
        let get = |k: &str| labels.get(k).cloned();
        let task = service.task_template.clone().unwrap_or_default();
        let c = task.container_spec.unwrap_or_default();
        let limits = task
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        let reserve = task
            .resources
            .as_ref()
            .and_then(|r| r.reservations.as_ref())
            .is_some_and(|r| r.nano_cpus.is_some() || r.memory_bytes.is_some());
        let mut constraints = task
            .placement
            .and_then(|p| p.constraints)
            .unwrap_or_default();
        let node = constraints
            .iter()
            .position(|c| c.starts_with("node.id=="))
            .map(|i| constraints.remove(i)["node.id==".len()..].to_string());
        let mounts = c.mounts.clone().unwrap_or_default();
        let tmpfs_bytes = mounts
            .iter()
            .find(|m| m.typ == Some(MountType::TMPFS))
            .and_then(|m| m.tmpfs_options.as_ref()?.size_bytes)
            .unwrap_or_default() as u64;
        let volumes = mounts
            .iter()
            .filter(|m| m.typ == Some(MountType::VOLUME))
            .map(|m| VolumeMount {
                name: m.source.clone().unwrap_or_default(),
                target: m.target.clone().unwrap_or_default(),
            })
            .collect();
        let restart = task.restart_policy.unwrap_or_default();
        let ports = service
            .endpoint_spec
            .as_ref()
            .and_then(|e| e.ports.clone())
            .unwrap_or_default()
            .iter()
            .map(|p| PortMap {
                target: p.target_port.unwrap_or_default() as u16,
                published: p.published_port.unwrap_or_default() as u16,
            })
            .collect();
        let mut argv = c.command.clone().unwrap_or_default();
        argv.extend(c.args.clone().unwrap_or_default());
        Some(ServerSpec {
            env: get(LABEL_ENV)?,
            role: get(LABEL_ROLE)?,
            release: get(LABEL_RELEASE)?.parse().ok()?,
            slot: get(LABEL_SLOT)?.parse().ok()?,
            server: get(LABEL_SERVER)?,
            image: c.image.clone().unwrap_or_default(),
            argv,
            env_vars: c.env.clone().unwrap_or_default(),
            workdir: c.dir.clone(),
            user: c.user.clone(),
            cpus: limits.nano_cpus.unwrap_or_default() as f64 / 1e9,
            memory_bytes: limits.memory_bytes.unwrap_or_default() as u64,
            reserve,
            cap_add: caps(&c.capability_add.clone().unwrap_or_default()),
            cap_drop: caps(&c.capability_drop.clone().unwrap_or_default()),
            ports,
            constraints,
            node,
            volumes,
            tmpfs_bytes,
            restart: match restart.condition {
                Some(TaskSpecRestartPolicyConditionEnum::ON_FAILURE) => Restart::OnFailure {
                    max_attempts: restart.max_attempts.unwrap_or_default() as u32,
                },
                _ => Restart::Never,
            },
            stop_grace: Duration::from_nanos(c.stop_grace_period.unwrap_or_default().max(0) as u64),
        })
    }
}

/// `kiln-ENV-SERVER`.
pub fn service_name(env: &str, server: &str) -> String {
    format!("kiln-{env}-{server}")
}

/// The `sha256:...` of `REPO@sha256:...`.
pub fn image_digest(image: &str) -> Option<&str> {
    let (_, d) = image.rsplit_once('@')?;
    let hex = d.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(d)
}

fn tmpfs(target: &str, size: u64, mode: i64) -> Mount {
    Mount {
        target: Some(target.into()),
        typ: Some(MountType::TMPFS),
        tmpfs_options: Some(MountTmpfsOptions {
            size_bytes: Some(if size == 0 { TMPFS_DEFAULT } else { size } as i64),
            mode: Some(mode),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Capabilities as Docker stores them for services: `CAP_` prefix, upper
/// case, sorted (the spec says `NET_RAW`, Docker may echo `CAP_NET_RAW`).
fn caps(list: &[String]) -> Vec<String> {
    let mut out: Vec<String> = list
        .iter()
        .map(|c| {
            let c = c.to_ascii_uppercase();
            if c.starts_with("CAP_") || c == "ALL" {
                c
            } else {
                format!("CAP_{c}")
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

// ---- config drift ------------------------------------------------------------

/// A part of a server's service that differs from what kiln asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpecField {
    Image,
    Command,
    Env,
    User,
    Workdir,
    Cpus,
    Memory,
    Reservations,
    Capabilities,
    Ports,
    Placement,
    Volumes,
    /// The root is no longer read-only.
    ReadOnly,
    /// /tmp or /run is no longer a tmpfs of the declared size.
    Tmpfs,
    Restart,
    Labels,
    Replicas,
}

/// One difference: what kiln asked for and what the swarm holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    pub field: SpecField,
    pub expected: String,
    pub actual: String,
}

impl std::fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}: expected {}, found {}",
            self.field, self.expected, self.actual
        )
    }
}

/// Every difference between the service kiln asked for (`expected`) and
/// the service as the swarm now holds it (someone ran `docker service
/// update` behind kiln's back).
pub fn config_drift(expected: &ServerSpec, actual: &ServiceSpec) -> Vec<ConfigChange> {
    let mut out = Vec::new();
    let mut cmp = |field, e: String, a: String| {
        if e != a {
            out.push(ConfigChange {
                field,
                expected: e,
                actual: a,
            });
        }
    };
    let Some(a) = ServerSpec::from_service(actual) else {
        cmp(SpecField::Labels, "kiln's labels".into(), "missing".into());
        return out;
    };
    let e = expected;
    cmp(SpecField::Image, e.image.clone(), a.image.clone());
    cmp(
        SpecField::Command,
        format!("{:?}", e.argv),
        format!("{:?}", a.argv),
    );
    cmp(
        SpecField::Env,
        format!("{:?}", e.env_vars),
        format!("{:?}", a.env_vars),
    );
    cmp(
        SpecField::User,
        format!("{:?}", e.user),
        format!("{:?}", a.user),
    );
    cmp(
        SpecField::Workdir,
        format!("{:?}", e.workdir),
        format!("{:?}", a.workdir),
    );
    let nano = |c: f64| (c * 1e9).round() as i64;
    cmp(
        SpecField::Cpus,
        nano(e.cpus).to_string(),
        nano(a.cpus).to_string(),
    );
    cmp(
        SpecField::Memory,
        e.memory_bytes.to_string(),
        a.memory_bytes.to_string(),
    );
    cmp(
        SpecField::Reservations,
        e.reserve.to_string(),
        a.reserve.to_string(),
    );
    cmp(
        SpecField::Capabilities,
        format!("add {:?} drop {:?}", caps(&e.cap_add), caps(&e.cap_drop)),
        format!("add {:?} drop {:?}", a.cap_add, a.cap_drop),
    );
    let sorted = |p: &[PortMap]| {
        let mut p = p.to_vec();
        p.sort();
        format!("{p:?}")
    };
    cmp(SpecField::Ports, sorted(&e.ports), sorted(&a.ports));
    cmp(
        SpecField::Placement,
        format!("{:?} node {:?}", e.constraints, e.node),
        format!("{:?} node {:?}", a.constraints, a.node),
    );
    cmp(
        SpecField::Volumes,
        format!("{:?}", e.volumes),
        format!("{:?}", a.volumes),
    );
    cmp(
        SpecField::Restart,
        format!("{:?}", e.restart),
        format!("{:?}", a.restart),
    );
    cmp(
        SpecField::Labels,
        format!("{:?}", sorted_map(&e.labels())),
        format!(
            "{:?}",
            sorted_map(&actual.labels.clone().unwrap_or_default())
        ),
    );
    let c = actual
        .task_template
        .as_ref()
        .and_then(|t| t.container_spec.as_ref());
    cmp(
        SpecField::ReadOnly,
        "true".into(),
        c.and_then(|c| c.read_only).unwrap_or(false).to_string(),
    );
    let tmpfs_of = |spec: &ServiceSpec| {
        let mut t: Vec<String> = spec
            .task_template
            .as_ref()
            .and_then(|t| t.container_spec.as_ref())
            .and_then(|c| c.mounts.clone())
            .unwrap_or_default()
            .iter()
            .filter(|m| m.typ == Some(MountType::TMPFS))
            .map(|m| {
                format!(
                    "{}:{}",
                    m.target.clone().unwrap_or_default(),
                    m.tmpfs_options
                        .as_ref()
                        .and_then(|o| o.size_bytes)
                        .unwrap_or_default()
                )
            })
            .collect();
        t.sort();
        t.join(",")
    };
    if let Ok(want) = e.to_service() {
        cmp(SpecField::Tmpfs, tmpfs_of(&want), tmpfs_of(actual));
    }
    let replicas = actual
        .mode
        .as_ref()
        .and_then(|m| m.replicated.as_ref())
        .and_then(|r| r.replicas);
    cmp(
        SpecField::Replicas,
        "Some(1)".into(),
        format!("{replicas:?}"),
    );
    out
}

fn sorted_map(m: &HashMap<String, String>) -> BTreeMap<&String, &String> {
    m.iter().collect()
}

// ---- observed state ------------------------------------------------------------

/// A task's state, as Swarm reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaskPhase {
    /// Created, allocated, pending (no node chosen yet: e.g. no node with room).
    Pending,
    /// Assigned to a node, pulling or starting.
    Starting,
    Running,
    /// Exited 0.
    Complete,
    /// Exited non-zero or failed to start.
    Failed,
    /// Stopped on purpose (replaced, removed, or its node went away).
    Shutdown,
    /// The node refused it (e.g. the image cannot be pulled).
    Rejected,
    /// Its node has been down too long: the swarm gave up on it.
    Orphaned,
    Remove,
}

impl TaskPhase {
    fn from(s: Option<TaskState>) -> TaskPhase {
        match s {
            Some(TaskState::RUNNING) => TaskPhase::Running,
            Some(
                TaskState::ASSIGNED
                | TaskState::ACCEPTED
                | TaskState::PREPARING
                | TaskState::READY
                | TaskState::STARTING,
            ) => TaskPhase::Starting,
            Some(TaskState::COMPLETE) => TaskPhase::Complete,
            Some(TaskState::FAILED) => TaskPhase::Failed,
            Some(TaskState::SHUTDOWN) => TaskPhase::Shutdown,
            Some(TaskState::REJECTED) => TaskPhase::Rejected,
            Some(TaskState::ORPHANED) => TaskPhase::Orphaned,
            Some(TaskState::REMOVE) => TaskPhase::Remove,
            _ => TaskPhase::Pending,
        }
    }
}

/// One task of a server's service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    pub phase: TaskPhase,
    /// What the swarm wants of it (Running, or Shutdown once replaced).
    pub desired: TaskPhase,
    pub node_id: String,
    /// The node's address (where published ports are), if known.
    pub node_addr: Option<String>,
    pub node_health: Option<NodeHealth>,
    pub container_id: Option<String>,
    /// Swarm's words, e.g. "started", "no suitable node (...)".
    pub message: String,
    pub error: Option<String>,
    /// When the state last changed (RFC 3339).
    pub since: String,
}

impl Task {
    /// Running, meant to run, on a node that answers.
    pub fn alive(&self) -> bool {
        self.phase == TaskPhase::Running
            && self.desired == TaskPhase::Running
            && self.node_health == Some(NodeHealth::Ready)
    }
}

/// A kiln server found on the swarm.
#[derive(Debug, Clone)]
pub struct Server {
    pub service_id: String,
    pub service_name: String,
    /// The spec as the swarm holds it now, mapped back (None: labels missing).
    pub spec: Option<ServerSpec>,
    /// Docker's raw spec, for [`config_drift`].
    pub raw: ServiceSpec,
    /// The service's version index (changes with every update).
    pub version: u64,
    /// Newest first.
    pub tasks: Vec<Task>,
}

impl Server {
    /// The task the swarm means to run: the newest with desired state Running,
    /// else the newest.
    pub fn current(&self) -> Option<&Task> {
        self.tasks
            .iter()
            .find(|t| t.desired == TaskPhase::Running)
            .or_else(|| self.tasks.first())
    }

    pub fn alive(&self) -> bool {
        self.current().is_some_and(Task::alive)
    }

    /// The id kiln knows it by: its server label, else (a stray with
    /// kiln's env label only) its service name.
    pub fn inventory_id(&self) -> String {
        self.label(LABEL_SERVER)
            .map_or_else(|| self.service_name.clone(), str::to_string)
    }

    /// `NODE_ADDR:PUBLISHED` of the target port `port`, once placed.
    pub fn address(&self, port: u16) -> Option<String> {
        let t = self.current()?;
        let addr = t.node_addr.as_ref()?;
        let p = self
            .spec
            .as_ref()?
            .ports
            .iter()
            .find(|p| p.target == port)?;
        Some(format!("{addr}:{}", p.published))
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.raw.labels.as_ref()?.get(key).map(String::as_str)
    }
}

/// A chunk of a server's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogChunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

impl Cluster {
    /// Creates the server's service (one replica). Fails if a service of
    /// that name exists. Returns the service id; see [`Cluster::wait_running`].
    pub async fn create_server(&self, spec: &ServerSpec) -> Result<String> {
        let service = spec.to_service()?;
        let e = &self.engine;
        let created = e
            .docker
            .create_service(service, None)
            .await
            .map_err(e.api(format!("create service {}", spec.service_name())))?;
        Ok(created.id.unwrap_or_default())
    }

    /// Every service carrying kiln's labels (of `env`, or of any
    /// environment), with their tasks and where they run.
    pub async fn servers(&self, env: Option<&str>) -> Result<Vec<Server>> {
        let e = &self.engine;
        let label = match env {
            Some(env) => format!("{LABEL_ENV}={env}"),
            None => LABEL_ENV.to_string(),
        };
        let filters = HashMap::from([("label".to_string(), vec![label])]);
        let services = e
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(filters),
                status: None,
            }))
            .await
            .map_err(e.api("list services"))?;
        if services.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = services.iter().filter_map(|s| s.id.clone()).collect();
        let tasks = e
            .docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([("service".to_string(), ids)])),
            }))
            .await
            .map_err(e.api("list tasks"))?;
        let nodes: HashMap<String, (String, NodeHealth)> = self
            .nodes()
            .await?
            .into_iter()
            .map(|n| (n.id, (n.addr, n.health)))
            .collect();
        let mut by_service: HashMap<String, Vec<(String, Task)>> = HashMap::new();
        for t in tasks {
            let status = t.status.clone().unwrap_or_default();
            let node_id = t.node_id.clone().unwrap_or_default();
            let node = nodes.get(&node_id);
            let created = t
                .created_at
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default();
            let task = Task {
                id: t.id.clone().unwrap_or_default(),
                phase: TaskPhase::from(status.state),
                desired: TaskPhase::from(t.desired_state),
                node_addr: node.map(|n| n.0.clone()).filter(|a| !a.is_empty()),
                node_health: node.map(|n| n.1),
                node_id,
                container_id: status.container_status.and_then(|c| c.container_id),
                message: status.message.unwrap_or_default(),
                error: status.err,
                since: status.timestamp.map(|d| d.to_string()).unwrap_or_default(),
            };
            by_service
                .entry(t.service_id.clone().unwrap_or_default())
                .or_default()
                .push((created, task));
        }
        let mut out: Vec<Server> = services
            .into_iter()
            .map(|s| {
                let id = s.id.clone().unwrap_or_default();
                let raw = s.spec.clone().unwrap_or_default();
                let mut tasks = by_service.remove(&id).unwrap_or_default();
                tasks.sort_by(|a, b| b.0.cmp(&a.0));
                Server {
                    service_name: raw.name.clone().unwrap_or_default(),
                    spec: ServerSpec::from_service(&raw),
                    raw,
                    version: s.version.and_then(|v| v.index).unwrap_or_default(),
                    tasks: tasks.into_iter().map(|t| t.1).collect(),
                    service_id: id,
                }
            })
            .collect();
        out.sort_by(|a, b| a.service_name.cmp(&b.service_name));
        Ok(out)
    }

    /// One server by service name, if it exists.
    pub async fn server(&self, env: &str, server: &str) -> Result<Option<Server>> {
        let name = service_name(env, server);
        Ok(self
            .servers(Some(env))
            .await?
            .into_iter()
            .find(|s| s.service_name == name))
    }

    /// Waits until the server's task runs on a ready node. A task that
    /// fails, is rejected, or cannot be placed (no node with room, no node
    /// matching its constraints) is an error at once, with Swarm's reason.
    pub async fn wait_running(&self, env: &str, server: &str, timeout: Duration) -> Result<Server> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no task yet");
        // A host port still held by a container that is stopping (a
        // server just removed) frees itself in a moment, and Swarm places
        // the task then: only a port held for longer is an error.
        let mut port_busy_since: Option<Instant> = None;
        loop {
            if let Some(s) = self.server(env, server).await? {
                if s.alive() {
                    return Ok(s);
                }
                if let Some(t) = s.current() {
                    let reason = t.error.clone().unwrap_or_else(|| t.message.clone());
                    let port_busy = t
                        .error
                        .as_deref()
                        .is_some_and(|e| e.contains("host-mode port already in use"));
                    port_busy_since =
                        port_busy.then(|| port_busy_since.unwrap_or_else(Instant::now));
                    let unplaceable = t.phase == TaskPhase::Pending
                        && t.error
                            .as_deref()
                            .is_some_and(|e| e.contains("no suitable node"))
                        && port_busy_since.is_none_or(|since| since.elapsed() >= PORT_GRACE);
                    if unplaceable
                        || matches!(
                            t.phase,
                            TaskPhase::Failed | TaskPhase::Rejected | TaskPhase::Complete
                        )
                    {
                        return Err(SwarmError::Task {
                            server: server.into(),
                            state: format!("{:?}", t.phase).to_lowercase(),
                            message: reason,
                        });
                    }
                    last = format!("{:?}: {reason}", t.phase);
                }
            }
            if Instant::now() > deadline {
                return Err(SwarmError::Timeout {
                    what: format!("server {server} running ({last})"),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes the server's service (idempotent) and waits until the swarm
    /// has no task of it left, so its published ports are free again.
    pub async fn remove_server(&self, env: &str, server: &str, timeout: Duration) -> Result<()> {
        let e = &self.engine;
        let mut name = service_name(env, server);
        let id = match e.docker.inspect_service(&name, None).await {
            Ok(s) => s.id.unwrap_or_default(),
            // Not kiln's name: a stray carrying kiln's labels (unmanaged),
            // known by its server label or its own service name.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => match self
                .servers(Some(env))
                .await?
                .into_iter()
                .find(|s| s.inventory_id() == server)
            {
                Some(stray) => {
                    name = stray.service_name;
                    stray.service_id
                }
                None => return Ok(()),
            },
            Err(err) => return Err(e.api(format!("inspect service {name}"))(err)),
        };
        match e.docker.delete_service(&name).await {
            Ok(()) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(err) => return Err(e.api(format!("remove service {name}"))(err)),
        }
        let deadline = Instant::now() + timeout;
        loop {
            let tasks = e
                .docker
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(HashMap::from([("service".to_string(), vec![id.clone()])])),
                }))
                .await
                .unwrap_or_default();
            if tasks.is_empty() {
                return Ok(());
            }
            // A task on a node that is down cannot confirm its end until
            // the node returns, and then the swarm stops it (its service is
            // gone): it holds nothing kiln could place now.
            let down: HashSet<String> = self
                .nodes()
                .await
                .map(|ns| {
                    ns.into_iter()
                        .filter(|n| n.health != NodeHealth::Ready)
                        .map(|n| n.id)
                        .collect()
                })
                .unwrap_or_default();
            let left = tasks
                .iter()
                .filter(|t| !t.node_id.as_ref().is_some_and(|n| down.contains(n)))
                .count();
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SwarmError::Timeout {
                    what: format!("removal of service {name} ({left} tasks left)"),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's stdout and stderr through the manager (any node), from
    /// the start or the last `tail` lines; `follow` keeps the stream open.
    pub fn logs(
        &self,
        env: &str,
        server: &str,
        follow: bool,
        tail: Option<usize>,
    ) -> impl Stream<Item = Result<LogChunk>> + use<> {
        let name = service_name(env, server);
        let api = self.engine.api(format!("logs of service {name}"));
        let opts = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            tail: tail.map_or_else(|| "all".into(), |n| n.to_string()),
            ..Default::default()
        };
        let mut api = Some(api);
        self.engine
            .docker
            .service_logs(&name, Some(opts))
            .map(move |r| match r {
                Ok(bollard::container::LogOutput::StdErr { message }) => {
                    Ok(LogChunk::Stderr(message.to_vec()))
                }
                Ok(o) => Ok(LogChunk::Stdout(o.into_bytes().to_vec())),
                Err(e) => Err(match api.take() {
                    Some(api) => api(e),
                    None => SwarmError::Api {
                        endpoint: String::new(),
                        op: "logs".into(),
                        source: e,
                    },
                }),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServerSpec {
        ServerSpec {
            env: "prod".into(),
            role: "app".into(),
            release: 3,
            slot: 1,
            server: "app-3f9c".into(),
            image: format!("10.0.0.5:5000/shop@sha256:{}", "a".repeat(64)),
            argv: vec!["/busybox".into(), "httpd".into(), "-f".into()],
            env_vars: vec!["PORT=8080".into()],
            workdir: Some("/".into()),
            user: Some("1000".into()),
            cpus: 0.5,
            memory_bytes: 256 << 20,
            reserve: true,
            cap_add: vec![],
            cap_drop: vec!["net_raw".into()],
            ports: vec![PortMap {
                target: 8080,
                published: 31001,
            }],
            constraints: vec!["node.labels.zone==a".into()],
            node: Some("abc".into()),
            volumes: vec![VolumeMount {
                name: "prod-db-data-1".into(),
                target: "/data".into(),
            }],
            tmpfs_bytes: 16 << 20,
            restart: Restart::Never,
            stop_grace: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_service_maps_back_to_the_spec_it_came_from() {
        let s = spec();
        let svc = s.to_service().unwrap();
        let back = ServerSpec::from_service(&svc).unwrap();
        let mut want = s.clone();
        want.cap_drop = vec!["CAP_NET_RAW".into()];
        assert_eq!(back, want);
        assert!(
            config_drift(&s, &svc).is_empty(),
            "{:?}",
            config_drift(&s, &svc)
        );
    }

    #[test]
    fn changes_behind_kilns_back_are_named() {
        let s = spec();
        let mut svc = s.to_service().unwrap();
        let c = svc
            .task_template
            .as_mut()
            .unwrap()
            .container_spec
            .as_mut()
            .unwrap();
        c.image = Some("10.0.0.5:5000/shop:latest".into());
        c.read_only = Some(false);
        svc.task_template
            .as_mut()
            .unwrap()
            .resources
            .as_mut()
            .unwrap()
            .limits
            .as_mut()
            .unwrap()
            .memory_bytes = Some(1 << 30);
        svc.endpoint_spec.as_mut().unwrap().ports.as_mut().unwrap()[0].published_port = Some(80);
        let fields: Vec<SpecField> = config_drift(&s, &svc)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            [
                SpecField::Image,
                SpecField::Memory,
                SpecField::Ports,
                SpecField::ReadOnly
            ]
        );
    }

    #[test]
    fn tags_and_bad_specs_are_refused() {
        let mut s = spec();
        s.image = "shop:latest".into();
        assert!(matches!(
            s.to_service(),
            Err(SwarmError::NotByDigest { .. })
        ));
        let mut s = spec();
        s.ports.push(PortMap {
            target: 9090,
            published: 31001,
        });
        assert_eq!(
            s.to_service().unwrap_err().to_string(),
            "server app-3f9c: published ports must be distinct and non-zero"
        );
        let mut s = spec();
        s.server = "x".repeat(60);
        assert!(s.to_service().is_err());
    }

    #[test]
    fn digests_are_taken_from_pinned_references_only() {
        let d = format!("sha256:{}", "0f".repeat(32));
        assert_eq!(image_digest(&format!("r:5000/a/b@{d}")), Some(d.as_str()));
        assert_eq!(image_digest("r:5000/a:tag"), None);
        assert_eq!(image_digest("a@sha256:short"), None);
    }
}
