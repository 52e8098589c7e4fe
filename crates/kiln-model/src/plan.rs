//! Plans: what the planner decided for one environment, the contract of
//! `kiln plan -o` and `--json`. A plan is self-contained: each role's
//! target carries the complete runtime spec the engine launches from
//! (image, launch config, declared role spec), so applying a saved plan
//! never re-reads `kiln.toml`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{RoleSpec, Subnet};

/// One sealed image version, by name, version and manifest digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    pub name: String,
    pub version: u32,
    /// `sha256:…` of the OCI manifest.
    pub digest: String,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// How a server's first process is started, resolved from the image's OCI
/// config and the role's declaration at planning time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// Entrypoint followed by command.
    pub argv: Vec<String>,
    /// `KEY=VALUE`: the image's environment, then the role's over it.
    pub env: Vec<String>,
    pub workdir: String,
    /// Who the process runs as (resolved in the image); `None` is root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<crate::ResolvedUser>,
    /// Secrets delivered as files in `/run/secrets/`, by name, with the
    /// keyed fingerprint of the value the plan was made with. Never the
    /// value: that is decrypted when a server is created.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub secrets: std::collections::BTreeMap<String, String>,
}

/// What a role runs, fully resolved: the target of its servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleTarget {
    pub role: String,
    pub image: ImageRef,
    /// Hash of what makes a server of this role what it is besides its
    /// image (see `kiln_planner::spec_hash`): a server created with another
    /// hash is replaced.
    pub spec_hash: String,
    pub servers: u32,
    /// Destroy-then-create replacement (declared `cold_only`, or a role with volumes).
    pub cold: bool,
    pub launch: Launch,
    /// The role as declared when the plan was made: size, ports, volumes,
    /// health, balancer, strategy, policies.
    pub spec: RoleSpec,
}

/// Environment settings a plan is executed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvTarget {
    pub subnet: Subnet,
    /// TTL of DNS answers; servers are withdrawn from DNS this long
    /// before they stop.
    #[serde(default = "one")]
    pub dns_ttl_secs: u32,
}

fn one() -> u32 {
    1
}

/// Why a plan exists: what carrying it out is, for locks, approvals,
/// releases and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanKind {
    /// `kiln apply`: make the environment match `kiln.toml`.
    Apply,
    /// `kiln deploy --cold`: destroy everything, then create afresh.
    DeployCold,
    /// `kiln destroy`: every server goes.
    Destroy,
    /// `kiln rollback`: back to a previous release's targets.
    Rollback,
    /// An apply that failed, returned to the last release that succeeded.
    AutoRollback,
    /// `kiln reconcile`: heal, rotate, replace stale and drifted servers.
    Reconcile,
    /// `kiln promote`: another environment's image digests.
    Promote,
}

impl PlanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanKind::Apply => "apply",
            PlanKind::DeployCold => "deploy_cold",
            PlanKind::Destroy => "destroy",
            PlanKind::Rollback => "rollback",
            PlanKind::AutoRollback => "auto_rollback",
            PlanKind::Reconcile => "reconcile",
            PlanKind::Promote => "promote",
        }
    }

    pub fn parse(s: &str) -> Option<PlanKind> {
        [
            PlanKind::Apply,
            PlanKind::DeployCold,
            PlanKind::Destroy,
            PlanKind::Rollback,
            PlanKind::AutoRollback,
            PlanKind::Reconcile,
            PlanKind::Promote,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// How people say it: the command that made it.
    pub fn label(self) -> &'static str {
        match self {
            PlanKind::Apply => "apply",
            PlanKind::DeployCold => "deploy --cold",
            PlanKind::Destroy => "destroy",
            PlanKind::Rollback => "rollback",
            PlanKind::AutoRollback => "rollback (automatic)",
            PlanKind::Reconcile => "reconcile",
            PlanKind::Promote => "promote",
        }
    }

    /// Kinds an environment with `approvals = N` gates: the ones that carry
    /// out a human's new intent. Rollbacks return to an approved release and
    /// reconcile carries out the reviewed policies: both must work when
    /// nobody is awake.
    pub fn needs_approval(self) -> bool {
        matches!(
            self,
            PlanKind::Apply | PlanKind::DeployCold | PlanKind::Destroy | PlanKind::Promote
        )
    }

    /// Kinds a saved plan file may have (made by `kiln plan` or `kiln promote`).
    pub fn can_be_saved(self) -> bool {
        self.needs_approval()
    }
}

impl fmt::Display for PlanKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The action of a change, for counting and display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Replace,
    Destroy,
}

/// One change of a plan, fully decided (ids, slots, addresses, order) so
/// that execution makes no choices. Changes with the same `batch` are
/// carried out together: their new servers come up and pass health checks,
/// the balancer switches to them in one step, then the old ones go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    Create(Create),
    Replace(Replace),
    Destroy(Destroy),
}

/// A new server in an empty slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Create {
    pub role: String,
    /// The new server's id.
    pub server: String,
    pub slot: u32,
    pub address: String,
    /// `name@version` of its image.
    pub image: String,
    pub reason: String,
    pub batch: u32,
    /// The node it runs on, on providers with several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Declared port → the host port of `node` it is published on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub published: BTreeMap<u16, u16>,
}

/// How the new server of a replacement comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaceOrder {
    /// The new server starts and is healthy before the old one leaves.
    CreateFirst,
    /// The old server is drained and destroyed before the new one starts
    /// (cold-only roles, rolling `max_unavailable`).
    DestroyFirst,
    /// The replacement is a warm standby of a blue-green rollout, switched
    /// back to: nothing is created.
    SwitchBack,
}

/// A canary gate: after its batch switches, the new servers are watched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    pub bake_secs: u64,
    /// Failed share of requests at the balancer above which the gate fails.
    pub max_error_rate: f64,
}

/// A server replaced by another in its slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replace {
    pub role: String,
    /// The server that goes.
    pub server: String,
    /// The server that takes its slot.
    pub replacement: String,
    pub slot: u32,
    /// The replacement's address.
    pub address: String,
    /// `name@version` of the replacement's image.
    pub image: String,
    pub reason: String,
    pub batch: u32,
    pub order: ReplaceOrder,
    /// Keep the old server warm, out of the balancer, for this many seconds
    /// instead of destroying it (blue-green).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_warm_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// The replacement's node, on providers with several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Declared port → the host port of `node` the replacement is published on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub published: BTreeMap<u16, u16>,
}

/// A server that goes and is not replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destroy {
    pub role: String,
    pub server: String,
    pub slot: u32,
    pub reason: String,
    pub batch: u32,
}

impl Change {
    pub fn action(&self) -> Action {
        match self {
            Change::Create(_) => Action::Create,
            Change::Replace(_) => Action::Replace,
            Change::Destroy(_) => Action::Destroy,
        }
    }

    pub fn role(&self) -> &str {
        match self {
            Change::Create(c) => &c.role,
            Change::Replace(c) => &c.role,
            Change::Destroy(c) => &c.role,
        }
    }

    /// The server acted on: the new one for a create, the old one otherwise.
    pub fn server(&self) -> &str {
        match self {
            Change::Create(c) => &c.server,
            Change::Replace(c) => &c.server,
            Change::Destroy(c) => &c.server,
        }
    }

    pub fn batch(&self) -> u32 {
        match self {
            Change::Create(c) => c.batch,
            Change::Replace(c) => c.batch,
            Change::Destroy(c) => c.batch,
        }
    }

    pub fn set_batch(&mut self, batch: u32) {
        match self {
            Change::Create(c) => c.batch = batch,
            Change::Replace(c) => c.batch = batch,
            Change::Destroy(c) => c.batch = batch,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Change::Create(c) => &c.reason,
            Change::Replace(c) => &c.reason,
            Change::Destroy(c) => &c.reason,
        }
    }

    /// The `name@version` a new server runs, if the change makes one.
    pub fn image(&self) -> Option<&str> {
        match self {
            Change::Create(c) => Some(&c.image),
            Change::Replace(c) => Some(&c.image),
            Change::Destroy(_) => None,
        }
    }
}

/// A plan for one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Format version of this document; a plan of another format is refused.
    pub format: u32,
    pub kind: PlanKind,
    pub env: String,
    /// The environment's generation the plan was made against; a plan whose
    /// generation is not the current one is stale and refused.
    pub generation: i64,
    /// When it was planned (seconds since the epoch).
    pub created: i64,
    /// Who made the plan: an approval must come from someone else.
    pub author: String,
    /// For rollbacks: the release whose targets it returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<i64>,
    /// For promotions: the environment whose digests it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<String>,
    /// Environment settings the changes are carried out with.
    pub target: EnvTarget,
    /// Roles in start order (`depends_on` first).
    pub order: Vec<String>,
    /// What each role runs once the plan is applied (none for a destroy).
    pub targets: Vec<RoleTarget>,
    pub changes: Vec<Change>,
}

impl Plan {
    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action() == action).count()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn target(&self, role: &str) -> Option<&RoleTarget> {
        self.targets.iter().find(|t| t.role == role)
    }
}
