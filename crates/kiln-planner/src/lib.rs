//! The planner: pure functions from (declared environment, resolved role
//! targets, observed servers, releases, clock, randomness) to a [`Plan`].
//! Apply, cold deploy, destroy, rollback target selection, the automatic
//! rollback after a failed apply and reconcile's forced replacements are all
//! decided here; the engine only executes.
//!
//! Invariants: no I/O, no clock or random source of its own (both are
//! arguments), deterministic for the same inputs. Everything execution
//! needs is decided here: new server ids, slots, addresses, batches and
//! order, so the engine makes no choices.

mod render;
mod rollback;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use kiln_model::{
    Canary, Change, Create, Destroy, EnvSpec, EnvTarget, NodeInfo, Plan, PlanKind, ProviderSpec,
    Replace, ReplaceOrder, RoleSpec, RoleTarget, Server, ServerStatus, Strategy,
};

pub use render::render;
pub use rollback::{auto_rollback, declared_changes, rollback_targets, DeclaredChange};

/// Version of the plan file format written by this planner. Format 2:
/// self-contained targets and typed changes.
pub const PLAN_FORMAT: u32 = 2;

/// Server ids are `ROLE-XXXX`: at most this many servers of one role exist
/// at once, old and new together.
pub const MAX_IDS_PER_ROLE: usize = 1 << 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The environment's subnet cannot hold the servers it declares.
    #[error("subnet {subnet} of environment `{env}` has no free address for another server")]
    SubnetFull { env: String, subnet: String },
    /// A role has no resolved target (its image was not built).
    #[error("role `{role}` has no target; its image must be built first")]
    NoTarget { role: String },
    /// Every id of a role is taken.
    #[error("role `{role}` has no free server id left (at most 65,536 servers of one role)")]
    IdsExhausted { role: String },
    /// There is nothing to roll back to.
    #[error("cannot roll back `{env}`: {reason}")]
    NoRollback { env: String, reason: String },
    /// No node may take another server of a role.
    #[error("no node can take a server of role `{role}`: {reason}")]
    NoNode { role: String, reason: String },
    /// A node has no free host port left in the provider's range.
    #[error("node {node} has no free host port in {first}-{last} for role `{role}`")]
    PortsFull {
        role: String,
        node: String,
        first: u16,
        last: u16,
    },
}

/// Everything the planner looks at.
pub struct Input<'a> {
    pub env: &'a EnvSpec,
    /// One per role of `env`.
    pub targets: &'a [RoleTarget],
    /// Every server the state records for this environment, any status.
    pub observed: &'a [Server],
    /// Ids of observed servers that are not actually running (crashed).
    pub dead: &'a BTreeSet<String>,
    pub generation: i64,
    pub now: i64,
    pub kind: PlanKind,
    /// Servers to replace although their image and spec are current, with
    /// why (reconcile: drift policy, TTL, self-healing).
    pub force: &'a BTreeMap<String, String>,
    /// Server ids in use outside this environment (other environments,
    /// other projects on the same host): new ids avoid them.
    pub taken: &'a BTreeSet<String>,
    /// Servers the runtime runs for this environment that the state does
    /// not know, as (id, role): planned to be destroyed.
    pub strays: &'a [(String, String)],
    /// The provider's nodes, on providers with several (empty otherwise):
    /// new servers are placed on them and their ports published there.
    pub nodes: &'a [NodeInfo],
}

/// Roles in start order: every role after the roles it depends on, ties by name.
pub fn role_order(env: &EnvSpec) -> Vec<String> {
    fn visit(r: &str, env: &EnvSpec, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
        if !seen.insert(r.to_string()) {
            return;
        }
        for d in env
            .roles
            .get(r)
            .map(|r| r.depends_on.as_slice())
            .unwrap_or(&[])
        {
            visit(d, env, seen, out);
        }
        out.push(r.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for r in env.roles.keys() {
        visit(r, env, &mut seen, &mut out);
    }
    out
}

/// Hash of what a role's servers are made of, besides the image: size,
/// ports, volumes and environment. Count, strategy and policies are not in
/// it: changing them does not make existing servers wrong.
pub fn spec_hash(role: &RoleSpec) -> String {
    let mut v = serde_json::json!({
        "cpus": role.size.cpus,
        "memory": role.size.memory_bytes,
        "ports": role.ports,
        "volumes": role.volumes,
        "env": role.env,
    });
    // Only what differs from the defaults joins the hash, so servers made
    // before these keys existed are not all replaced.
    if role.capabilities != kiln_model::Capability::docker_default() {
        v["capabilities"] = serde_json::json!(role.capabilities);
    }
    if let Some(user) = &role.user {
        v["user"] = serde_json::json!(user.to_string());
    }
    if !role.reach.is_empty() {
        v["reach"] = serde_json::json!(role.reach);
    }
    blake3::hash(v.to_string().as_bytes()).to_hex()[..16].to_string()
}

/// [`spec_hash`] with the keyed fingerprints of the role's secrets (name →
/// fingerprint): a new secret value makes a new hash, so the role's
/// servers are replaced through the usual path. A role without secrets
/// keeps its plain spec hash.
pub fn spec_hash_with_secrets(
    role: &RoleSpec,
    secrets: &std::collections::BTreeMap<String, String>,
) -> String {
    let plain = spec_hash(role);
    if secrets.is_empty() {
        return plain;
    }
    let v = serde_json::json!({ "spec": plain, "secrets": secrets });
    blake3::hash(v.to_string().as_bytes()).to_hex()[..16].to_string()
}

/// Hands out new ids and addresses: ids never used by any observed or
/// taken server, addresses from the lowest free one, in one pass.
struct Allocator<'a> {
    env: &'a EnvSpec,
    ids: BTreeSet<String>,
    per_role: BTreeMap<String, usize>,
    /// Per role, where the last linear walk for a free id ended: every id
    /// it passed was taken and stays taken for the plan, so the next walk
    /// starts there and all walks of a plan cost at most one lap.
    walked: BTreeMap<String, u16>,
    used: BTreeSet<Ipv4Addr>,
    hosts: Box<dyn Iterator<Item = Ipv4Addr> + 'a>,
    nodes: Nodes<'a>,
}

/// Where a new server goes: its address, and on providers with several
/// nodes its node and the host ports its declared ports are published on.
struct Placed {
    address: String,
    node: Option<String>,
    published: BTreeMap<u16, u16>,
}

/// Node bookkeeping for providers with several nodes: how many servers of
/// each role and in all each node has, and which host ports are taken on
/// it, updated as servers are placed so one plan never double-books.
struct Nodes<'a> {
    /// The provider's range of host ports; None on single-host providers.
    range: Option<(u16, u16)>,
    nodes: &'a [NodeInfo],
    per_role: BTreeMap<(String, String), usize>,
    total: BTreeMap<String, usize>,
    ports: BTreeMap<String, BTreeSet<u16>>,
}

impl<'a> Nodes<'a> {
    fn new(input: &Input<'a>) -> Nodes<'a> {
        let range = match &input.env.provider {
            ProviderSpec::Swarm(s) => Some(s.ports),
            ProviderSpec::Local => None,
        };
        let mut per_role: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut total: BTreeMap<String, usize> = BTreeMap::new();
        let mut ports: BTreeMap<String, BTreeSet<u16>> = input
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.ports.clone()))
            .collect();
        let present = input.observed.iter().filter(|s| {
            !input.dead.contains(&s.id)
                && matches!(s.status, ServerStatus::Running | ServerStatus::Standby)
        });
        for s in present {
            let Some(node) = &s.node else { continue };
            *per_role.entry((s.role.clone(), node.clone())).or_default() += 1;
            *total.entry(node.clone()).or_default() += 1;
        }
        // Ports of every server the state knows stay booked, dead ones too:
        // their services may still hold them until the engine removes them.
        for s in input.observed {
            if let Some(node) = &s.node {
                ports
                    .entry(node.clone())
                    .or_default()
                    .extend(s.published.values());
            }
        }
        Nodes {
            range,
            nodes: input.nodes,
            per_role,
            total,
            ports,
        }
    }

    /// Picks the node for a new server of `t`'s role: one that is
    /// available and meets the role's constraints, with the fewest servers
    /// of the role (the server being replaced not counted), then the fewest
    /// in all, then the lowest id. A replacement of a role with volumes
    /// stays on its slot's node, where the volumes are.
    fn place(
        &mut self,
        t: &RoleTarget,
        replacing: Option<&Server>,
    ) -> Result<Option<Placed>, PlanError> {
        let Some((first, last)) = self.range else {
            return Ok(None);
        };
        let role = t.role.as_str();
        let no_node = |reason: String| PlanError::NoNode {
            role: role.into(),
            reason,
        };
        let pinned = replacing
            .filter(|_| !t.spec.volumes.is_empty())
            .and_then(|s| s.node.as_deref());
        let fits = self.nodes.iter().filter(|n| {
            n.available
                && t.spec.placement.iter().all(|c| c.holds(n))
                && pinned.is_none_or(|p| p == n.id)
        });
        let load = |n: &NodeInfo| {
            let mine = self
                .per_role
                .get(&(role.to_string(), n.id.clone()))
                .copied()
                .unwrap_or(0);
            let leaving = replacing.is_some_and(|s| s.node.as_deref() == Some(n.id.as_str()));
            (
                mine.saturating_sub(usize::from(leaving)),
                self.total.get(&n.id).copied().unwrap_or(0),
                n.id.clone(),
            )
        };
        let Some(node) = fits.min_by_key(|n| load(n)) else {
            return Err(no_node(match pinned {
                Some(p) => format!("its volumes are on node {p}, which is not available"),
                None if self.nodes.iter().all(|n| !n.available) => "no node is available".into(),
                None => format!(
                    "no available node meets its placement constraints ({})",
                    t.spec
                        .placement
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }));
        };
        let taken = self.ports.entry(node.id.clone()).or_default();
        let mut published = BTreeMap::new();
        for &port in &t.spec.ports {
            let Some(free) = (first..=last).find(|p| !taken.contains(p)) else {
                return Err(PlanError::PortsFull {
                    role: role.into(),
                    node: node.id.clone(),
                    first,
                    last,
                });
            };
            taken.insert(free);
            published.insert(port, free);
        }
        *self
            .per_role
            .entry((role.to_string(), node.id.clone()))
            .or_default() += 1;
        *self.total.entry(node.id.clone()).or_default() += 1;
        Ok(Some(Placed {
            address: node.address.clone(),
            node: Some(node.id.clone()),
            published,
        }))
    }
}

impl<'a> Allocator<'a> {
    fn new(input: &Input<'a>) -> Allocator<'a> {
        let ids: BTreeSet<String> = input
            .observed
            .iter()
            .map(|s| s.id.clone())
            .chain(input.taken.iter().cloned())
            .collect();
        let mut per_role: BTreeMap<String, usize> = BTreeMap::new();
        for id in &ids {
            if let Some((role, _)) = id.rsplit_once('-') {
                *per_role.entry(role.to_string()).or_default() += 1;
            }
        }
        Allocator {
            env: input.env,
            ids,
            per_role,
            walked: BTreeMap::new(),
            used: input
                .observed
                .iter()
                .filter_map(|s| s.address.parse().ok())
                .collect(),
            hosts: Box::new(input.env.subnet.hosts()),
            nodes: Nodes::new(input),
        }
    }

    /// Address, node and published ports of a new server of `t`'s role
    /// (`replacing` the given one, if any).
    fn place(&mut self, t: &RoleTarget, replacing: Option<&Server>) -> Result<Placed, PlanError> {
        match self.nodes.place(t, replacing)? {
            Some(p) => Ok(p),
            None => Ok(Placed {
                address: self.address()?,
                node: None,
                published: BTreeMap::new(),
            }),
        }
    }

    fn address(&mut self) -> Result<String, PlanError> {
        for a in self.hosts.by_ref() {
            if self.used.insert(a) {
                return Ok(a.to_string());
            }
        }
        Err(PlanError::SubnetFull {
            env: self.env.name.clone(),
            subnet: self.env.subnet.to_string(),
        })
    }

    fn id(&mut self, role: &str, random: &mut dyn FnMut() -> u16) -> Result<String, PlanError> {
        let count = self.per_role.entry(role.to_string()).or_default();
        if *count >= MAX_IDS_PER_ROLE {
            return Err(PlanError::IdsExhausted { role: role.into() });
        }
        // With ids left, a random pick collides with probability < 1; after
        // a few tries, walk up (from where this role's last walk ended) so
        // the search ends, and costs at most one lap per plan whatever the
        // random source returns.
        for _ in 0..16 {
            let id = format!("{role}-{:04x}", random());
            if self.ids.insert(id.clone()) {
                *count += 1;
                return Ok(id);
            }
        }
        let mut n = match self.walked.get(role) {
            Some(n) => *n,
            None => random(),
        };
        for _ in 0..MAX_IDS_PER_ROLE {
            let id = format!("{role}-{n:04x}");
            if self.ids.insert(id.clone()) {
                *count += 1;
                self.walked.insert(role.to_string(), n);
                return Ok(id);
            }
            n = n.wrapping_add(1);
        }
        Err(PlanError::IdsExhausted { role: role.into() })
    }
}

struct Batches(u32);

impl Batches {
    fn next(&mut self) -> u32 {
        self.0 += 1;
        self.0
    }
}

/// Makes the plan for `input.kind` (apply, cold deploy, rollback,
/// automatic rollback, reconcile, promote). `random` supplies the 16-bit
/// suffixes of new server ids.
pub fn plan(input: &Input, random: &mut dyn FnMut() -> u16) -> Result<Plan, PlanError> {
    let env = input.env;
    let cold = input.kind == PlanKind::DeployCold;
    let order = role_order(env);
    let mut alloc = Allocator::new(input);
    let mut batch = Batches(0);
    let targets: BTreeMap<&str, &RoleTarget> =
        input.targets.iter().map(|t| (t.role.as_str(), t)).collect();
    // Only running, live servers count as present; the engine cleans up
    // the rest (half-created, half-destroyed, crashed) before it executes.
    let live: Vec<&Server> = input
        .observed
        .iter()
        .filter(|s| s.status == ServerStatus::Running && !input.dead.contains(&s.id))
        .collect();
    let mut changes = leftovers(input, &mut batch);

    if cold {
        for role in order.iter().rev() {
            for s in live.iter().filter(|s| &s.role == role) {
                changes.push(destroy(
                    s,
                    "cold deploy: every server is destroyed first",
                    batch.next(),
                ));
            }
        }
        for s in live.iter().filter(|s| !env.roles.contains_key(&s.role)) {
            changes.push(destroy(
                s,
                "role removed from the environment",
                batch.next(),
            ));
        }
    }

    for role in &order {
        let t = targets
            .get(role.as_str())
            .ok_or_else(|| PlanError::NoTarget { role: role.clone() })?;
        plan_role(
            input,
            t,
            &live,
            &mut alloc,
            &mut batch,
            &mut changes,
            random,
        )?;
    }
    if !cold {
        let removed = input.observed.iter().filter(|s| {
            !env.roles.contains_key(&s.role)
                && !input.dead.contains(&s.id)
                && matches!(s.status, ServerStatus::Running | ServerStatus::Standby)
        });
        for s in removed {
            changes.push(destroy(
                s,
                "role removed from the environment",
                batch.next(),
            ));
        }
    }
    Ok(Plan {
        format: PLAN_FORMAT,
        kind: input.kind,
        env: env.name.clone(),
        generation: input.generation,
        created: input.now,
        author: String::new(),
        rollback_to: None,
        promoted_from: None,
        target: EnvTarget {
            subnet: env.subnet,
            dns_ttl_secs: env.dns_ttl_secs,
        },
        order,
        targets: input.targets.to_vec(),
        changes,
    })
}

/// What a crashed run or a dead process left behind: rows half-created or
/// half-destroyed, servers whose process is gone, and strays. Destroying
/// them first makes the plan say what the engine cleans up.
fn leftovers(input: &Input, batch: &mut Batches) -> Vec<Change> {
    let mut out = Vec::new();
    for s in input.observed {
        let why = match s.status {
            ServerStatus::Creating => "half-created by an interrupted apply",
            ServerStatus::Destroying => "half-destroyed by an interrupted apply",
            _ if input.dead.contains(&s.id) => "its process is gone",
            _ => continue,
        };
        out.push(destroy(s, why, batch.next()));
    }
    for (id, role) in input.strays {
        out.push(Change::Destroy(Destroy {
            role: role.clone(),
            server: id.clone(),
            slot: 0,
            reason: "stray: labelled with the environment, unknown to the state".into(),
            batch: batch.next(),
        }));
    }
    out
}

/// The changes of one role: new servers in empty slots, replacements in
/// batches by strategy, standby servers past their window, scale-down.
fn plan_role(
    input: &Input,
    t: &RoleTarget,
    live: &[&Server],
    alloc: &mut Allocator,
    batch: &mut Batches,
    changes: &mut Vec<Change>,
    random: &mut dyn FnMut() -> u16,
) -> Result<(), PlanError> {
    let role = t.role.as_str();
    let cold = input.kind == PlanKind::DeployCold;
    let had_slot: BTreeSet<u32> = input
        .observed
        .iter()
        .filter(|s| s.role == role)
        .map(|s| s.slot)
        .collect();
    let mut by_slot: BTreeMap<u32, &Server> = BTreeMap::new();
    let mut extra = Vec::new();
    if !cold {
        let mut mine: Vec<&Server> = live.iter().copied().filter(|s| s.role == role).collect();
        mine.sort_by_key(|s| (s.slot, s.created, s.id.clone()));
        for s in mine {
            if s.slot < t.servers && !by_slot.contains_key(&s.slot) {
                by_slot.insert(s.slot, s);
            } else {
                extra.push(s);
            }
        }
    }
    // Warm standby servers of a blue-green rollout: destroyed once their
    // window is over, otherwise available for an instant switch back.
    let mut standby: Vec<&Server> = Vec::new();
    let standbys = input.observed.iter().filter(|s| {
        s.role == role && s.status == ServerStatus::Standby && !input.dead.contains(&s.id)
    });
    for s in standbys {
        if cold || s.standby_until.is_none_or(|u| u <= input.now) {
            changes.push(destroy(
                s,
                "blue-green rollback window is over",
                batch.next(),
            ));
        } else {
            standby.push(s);
        }
    }
    let mut replaces: Vec<(&Server, String)> = Vec::new();
    for slot in 0..t.servers {
        let Some(s) = by_slot.get(&slot) else {
            let reason = if cold {
                "cold deploy".to_string()
            } else if had_slot.contains(&slot) {
                format!("slot {slot} has no running server")
            } else {
                "new server".to_string()
            };
            let server = alloc.id(role, random)?;
            let at = alloc.place(t, None)?;
            changes.push(Change::Create(Create {
                role: role.into(),
                server,
                slot,
                address: at.address,
                image: t.image.to_string(),
                reason,
                batch: batch.next(),
                node: at.node,
                published: at.published,
            }));
            continue;
        };
        let reason = if s.image_digest != t.image.digest {
            Some(format!("image changed ({} → {})", s.image, t.image))
        } else if s.spec_hash != t.spec_hash {
            Some("spec changed".to_string())
        } else {
            input.force.get(&s.id).cloned()
        };
        if let Some(reason) = reason {
            replaces.push((s, reason));
        }
    }
    if !replaces.is_empty() {
        let promotable: Vec<&Server> = standby
            .iter()
            .copied()
            .filter(|s| s.image_digest == t.image.digest && s.spec_hash == t.spec_hash)
            .collect();
        let strategy = if t.cold {
            Strategy::Rolling {
                max_surge: 1,
                max_unavailable: 0,
                min_healthy_secs: 0,
            }
        } else {
            t.spec.strategy.clone()
        };
        let ctx = Batching {
            t,
            standby: &standby,
            promotable: &promotable,
        };
        ctx.replace(strategy, replaces, alloc, batch, changes, random)?;
    }
    for s in extra {
        let why = format!("scaled down to {} servers", t.servers);
        changes.push(destroy(s, &why, batch.next()));
    }
    Ok(())
}

/// Turns a role's replacements into batches according to its strategy.
struct Batching<'a> {
    t: &'a RoleTarget,
    standby: &'a [&'a Server],
    promotable: &'a [&'a Server],
}

impl Batching<'_> {
    fn replace(
        &self,
        strategy: Strategy,
        replaces: Vec<(&Server, String)>,
        alloc: &mut Allocator,
        batch: &mut Batches,
        changes: &mut Vec<Change>,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<(), PlanError> {
        let role = self.t.role.as_str();
        let base = |s: &Server, reason: String, batch: u32| Replace {
            role: role.into(),
            server: s.id.clone(),
            replacement: String::new(),
            slot: s.slot,
            address: String::new(),
            image: self.t.image.to_string(),
            reason,
            batch,
            order: ReplaceOrder::CreateFirst,
            keep_warm_secs: None,
            canary: None,
            node: None,
            published: BTreeMap::new(),
        };
        let place = |c: &mut Replace, s: &Server, alloc: &mut Allocator| -> Result<(), PlanError> {
            let at = alloc.place(self.t, Some(s))?;
            c.address = at.address;
            c.node = at.node;
            c.published = at.published;
            Ok(())
        };
        match strategy {
            Strategy::BlueGreen {
                rollback_window_secs,
            } => {
                let b = batch.next();
                let switch_back = self.promotable.len() >= replaces.len();
                for (i, (s, reason)) in replaces.into_iter().enumerate() {
                    let mut c = base(s, reason, b);
                    if switch_back {
                        let warm = self.promotable[i];
                        c.replacement = warm.id.clone();
                        c.address = warm.address.clone();
                        c.node = warm.node.clone();
                        c.published = warm.published.clone();
                        c.order = ReplaceOrder::SwitchBack;
                        c.reason =
                            format!("{}; blue-green: switch back to warm {}", c.reason, warm.id);
                    } else {
                        c.replacement = alloc.id(role, random)?;
                        place(&mut c, s, alloc)?;
                        c.keep_warm_secs = Some(rollback_window_secs);
                        c.reason = format!(
                            "{}; blue-green: new set, one switch, old set warm for {rollback_window_secs}s",
                            c.reason
                        );
                    }
                    changes.push(Change::Replace(c));
                }
                // Standby servers that are not switched back to are of no further use.
                if !switch_back {
                    for s in self.standby {
                        changes.push(destroy(s, "superseded standby server", b));
                    }
                }
            }
            Strategy::Canary {
                share_percent,
                bake_secs,
                max_error_rate,
            } => {
                let first = (replaces.len() as u64 * share_percent as u64)
                    .div_ceil(100)
                    .max(1) as usize;
                let b = batch.next();
                for (i, (s, reason)) in replaces.into_iter().enumerate() {
                    let mut c = base(s, reason, b);
                    c.replacement = alloc.id(role, random)?;
                    place(&mut c, s, alloc)?;
                    if i < first {
                        c.canary = Some(Canary {
                            bake_secs,
                            max_error_rate,
                        });
                        c.reason = format!(
                            "{}; canary ({share_percent}%), baked {bake_secs}s",
                            c.reason
                        );
                    } else {
                        c.batch = batch.next();
                    }
                    changes.push(Change::Replace(c));
                }
            }
            Strategy::Rolling {
                max_surge,
                max_unavailable,
                ..
            } => {
                // Kubernetes' reading: a batch replaces `max_surge +
                // max_unavailable` servers; `max_unavailable` of them are
                // destroyed before their replacements start (capacity may
                // drop by that much), the rest are surged (created first).
                let (surge, unavailable) = if self.t.cold {
                    (0, 1)
                } else {
                    (max_surge as usize, max_unavailable as usize)
                };
                let size = (surge + unavailable).max(1);
                let mut b = 0;
                for (i, (s, reason)) in replaces.into_iter().enumerate() {
                    if i % size == 0 {
                        b = batch.next();
                    }
                    let mut c = base(s, reason, b);
                    if self.t.cold {
                        c.order = ReplaceOrder::DestroyFirst;
                        c.reason = format!(
                            "{}; cold-only: destroyed before its replacement starts",
                            c.reason
                        );
                    } else if i % size < unavailable {
                        c.order = ReplaceOrder::DestroyFirst;
                        c.reason = format!(
                            "{}; max_unavailable = {unavailable}: destroyed before its replacement starts",
                            c.reason
                        );
                    }
                    c.replacement = alloc.id(role, random)?;
                    place(&mut c, s, alloc)?;
                    changes.push(Change::Replace(c));
                }
            }
        }
        Ok(())
    }
}

/// A plan that destroys every server of an environment: dependents before
/// what they depend on (`app` before the `db` it uses), servers of roles no
/// longer declared first of all.
pub fn plan_destroy(
    env: &EnvSpec,
    observed: &[Server],
    strays: &[(String, String)],
    generation: i64,
    now: i64,
) -> Plan {
    let order = role_order(env);
    let rank = |role: &str| order.iter().position(|r| r == role).unwrap_or(usize::MAX);
    let mut servers: Vec<&Server> = observed.iter().collect();
    servers.sort_by(|a, b| rank(&b.role).cmp(&rank(&a.role)).then(a.id.cmp(&b.id)));
    let mut changes: Vec<Change> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| destroy(s, "environment destroyed", i as u32 + 1))
        .collect();
    for (id, role) in strays {
        changes.push(Change::Destroy(Destroy {
            role: role.clone(),
            server: id.clone(),
            slot: 0,
            reason: "stray: labelled with the environment, unknown to the state".into(),
            batch: changes.len() as u32 + 1,
        }));
    }
    Plan {
        format: PLAN_FORMAT,
        kind: PlanKind::Destroy,
        env: env.name.clone(),
        generation,
        created: now,
        author: String::new(),
        rollback_to: None,
        promoted_from: None,
        target: EnvTarget {
            subnet: env.subnet,
            dns_ttl_secs: env.dns_ttl_secs,
        },
        order: vec![],
        targets: vec![],
        changes,
    }
}

fn destroy(s: &Server, reason: &str, batch: u32) -> Change {
    Change::Destroy(Destroy {
        role: s.role.clone(),
        server: s.id.clone(),
        slot: s.slot,
        reason: reason.to_string(),
        batch,
    })
}

#[cfg(test)]
mod tests;
