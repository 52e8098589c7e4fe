//! Plain domain types shared by every layer of kiln: image recipes,
//! environments and their roles, as validated from `kiln.toml`.
//!
//! Invariant: this crate does no I/O and depends on nothing but `serde`.
//! Everything here is already validated: a `Project` that exists is one whose
//! images form a forest and whose roles name images that exist.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A validated project: the images it bakes and the environments it fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    /// Absolute path of the project directory (where `kiln.toml` lives).
    pub dir: PathBuf,
    pub images: BTreeMap<String, ImageSpec>,
    pub envs: BTreeMap<String, EnvSpec>,
    /// Where vulnerability advisories come from (`[project] vulnerabilities`).
    #[serde(default)]
    pub vulnerabilities: Option<AdvisorySource>,
}

impl Project {
    /// Image names in build order: every parent before its children, ties by name.
    pub fn build_order(&self) -> Vec<String> {
        let mut order = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for name in self.images.keys() {
            self.visit(name, &mut seen, &mut order);
        }
        order
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut std::collections::BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        if let Some(ImageSource::Image(parent)) = self.images.get(name).map(|i| &i.from) {
            self.visit(parent, seen, order);
        }
        order.push(name.to_string());
    }

    /// `name` and all its ancestors, root first.
    pub fn lineage(&self, name: &str) -> Vec<String> {
        let mut chain = vec![name.to_string()];
        let mut cur = name;
        while let Some(ImageSource::Image(parent)) = self.images.get(cur).map(|i| &i.from) {
            chain.push(parent.clone());
            cur = parent;
        }
        chain.reverse();
        chain
    }
}

/// Where an image's root starts before its own files and scripts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// An empty root.
    Scratch,
    /// Another kiln image of the same project (layering).
    Image(String),
    /// A rootfs tarball (`.tar`, `.tar.gz`/`.tgz`, `.tar.zst`), absolute path.
    Rootfs(PathBuf),
    /// An OCI image layout directory and the tag to take from its index.
    Oci { dir: PathBuf, tag: String },
    /// `debootstrap` of a Debian suite.
    Debootstrap {
        suite: String,
        mirror: String,
        variant: String,
    },
}

/// A health check of a server (or of an image, declared for its roles).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheck {
    Http { path: String, port: u16 },
    Tcp { port: u16 },
    Command { argv: Vec<String> },
}

/// A named image recipe: each build of it is an immutable, sealed version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub name: String,
    pub from: ImageSource,
    /// `images/<name>/files/`, copied into the root at the same relative paths.
    pub files_dir: PathBuf,
    /// `images/<name>/scripts/`, run in lexical order inside the build sandbox.
    pub scripts_dir: PathBuf,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub ports: Vec<u16>,
    pub health: Option<HealthCheck>,
    /// Commands run in a sandbox from the sealed, read-only image before it becomes current.
    pub test: Vec<Vec<String>>,
    pub labels: BTreeMap<String, String>,
    /// Modification time written for every file (seconds since the epoch):
    /// fixed so that the same inputs give the same bytes.
    pub mtime: u64,
    /// Whether build scripts may use the network (default: yes).
    pub build_network: bool,
    /// The vulnerability gate (the image's own `scan`, else the project's).
    #[serde(default)]
    pub scan: Option<ScanPolicy>,
    /// The hardening policy: forbidden paths and packages, setuid files.
    #[serde(default)]
    pub hardening: Hardening,
}

/// Where OSV advisories are read from: a directory or a `.zip` of OSV JSON
/// in the ecosystem exports' format, on disk or at an HTTP(S) URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvisorySource {
    /// An absolute path (a directory of `*.json` or a `.zip`).
    Path(PathBuf),
    /// An `http://` or `https://` URL of a `.zip`, cached per URL.
    Url(String),
}

/// How bad a vulnerability is, lowest first (ordered: `Low < Critical`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "low" => Some(Severity::Low),
            "medium" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// The vulnerability gate of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPolicy {
    /// Findings at or above this severity keep a version from becoming current.
    pub fail_on: Severity,
    /// The severity assumed for an advisory that states none (default high:
    /// the gate fails closed).
    pub unknown: Severity,
    /// Findings with no fixed version yet do not fail the gate.
    pub ignore_unfixed: bool,
    pub ignore: Vec<ScanIgnore>,
}

/// One accepted advisory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanIgnore {
    /// Advisory id or one of its aliases (`CVE-2024-1234`, `DSA-5555-1`).
    pub id: String,
    /// Last day (`YYYY-MM-DD`, UTC) the entry applies; none: for good.
    pub until: Option<String>,
    pub reason: String,
}

/// What a hardened image may not contain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardening {
    /// Glob patterns over absolute paths (`/usr/bin/ssh*`).
    pub forbid: Vec<String>,
    /// dpkg package names.
    pub forbid_packages: Vec<String>,
    pub setuid: SetuidPolicy,
}

/// What to do about setuid and setgid files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetuidPolicy {
    /// Listed by `kiln image show`, allowed.
    #[default]
    Report,
    /// Any setuid or setgid file fails the build.
    Deny,
}

/// Size of a server: CPU share and memory limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Size {
    pub cpus: f64,
    pub memory_bytes: u64,
}

/// How servers of a role are replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Strategy {
    Rolling {
        max_surge: u32,
        max_unavailable: u32,
        min_healthy_secs: u64,
    },
    BlueGreen {
        rollback_window_secs: u64,
    },
    Canary {
        share_percent: u32,
        bake_secs: u64,
        max_error_rate: f64,
    },
}

/// What to do about drift on a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftPolicy {
    Alarm,
    Replace,
    Kill,
}

/// What to do about servers nobody declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnmanagedPolicy {
    Alarm,
    Kill,
}

/// A declared writable volume of a role (the persistent data layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    /// Absolute path inside the server.
    pub path: String,
}

/// A role's stable front.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balancer {
    pub listen: String,
    pub port: u16,
    pub drain_timeout_secs: u64,
    /// The balancer's own active health check of its backends: the role's
    /// HTTP or TCP health check (a command check is kiln's alone).
    #[serde(default)]
    pub check: Option<BalancerCheck>,
}

/// How the balancer checks its backends between kiln's own probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancerCheck {
    pub health: HealthCheck,
    pub interval_ms: u64,
    /// Consecutive failures that take a backend out of rotation.
    pub fall: u32,
    /// Consecutive passes that put it back.
    pub rise: u32,
}

/// One role of an environment: `app`, `lb`, `db`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleSpec {
    pub name: String,
    pub image: String,
    pub servers: u32,
    pub size: Size,
    pub ports: Vec<u16>,
    pub health: Option<HealthCheck>,
    pub depends_on: Vec<String>,
    pub cold_only: bool,
    pub volumes: Vec<Volume>,
    pub strategy: Strategy,
    pub balancer: Option<Balancer>,
    pub ttl_secs: Option<u64>,
    /// At most this share (percent) of the role is replaced at once by
    /// reconcile for drift or TTL (at least one server).
    pub replace_share: u32,
    pub drift: DriftPolicy,
    pub unmanaged: UnmanagedPolicy,
    pub env: BTreeMap<String, String>,
    /// Names of the environment's secrets this role's servers receive as
    /// files in `/run/secrets/`.
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// An environment: `staging`, `production`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvSpec {
    pub name: String,
    pub provider: String,
    /// Subnet of the environment's servers, e.g. `10.77.1.0/24`.
    pub subnet: String,
    pub approvals: u32,
    pub pipeline_identities: Vec<String>,
    pub alarm: Option<String>,
    /// How long a quarantined server's evidence is kept (seconds).
    pub quarantine_secs: u64,
    pub roles: BTreeMap<String, RoleSpec>,
    /// Who may encrypt this environment's secrets (`secrets/ENV/*.age`).
    #[serde(default)]
    pub secrets: Option<SecretsSpec>,
    /// Image versions must be signed by one of these keys to run here.
    #[serde(default)]
    pub trust: Option<Trust>,
}

/// The age recipients an environment's secrets are encrypted to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsSpec {
    /// `age1...` X25519 recipients.
    pub recipients: Vec<String>,
}

/// Trusted image signers of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// SSH public keys in OpenSSH format (`ssh-ed25519 AAAA... alice@ops`).
    pub signers: Vec<String>,
}

/// Lifecycle of a server as the state records it. A server row is written
/// *before* its sandbox is created (`Creating`) and marked `Destroying`
/// before it is torn down, so a crash at any point leaves a row that says
/// what to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerStatus {
    Creating,
    Running,
    Destroying,
    /// Out of the balancer but kept running: the previous set of a
    /// blue-green rollout, kept warm for an instant switch back.
    Standby,
}

impl ServerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerStatus::Creating => "creating",
            ServerStatus::Running => "running",
            ServerStatus::Destroying => "destroying",
            ServerStatus::Standby => "standby",
        }
    }
    pub fn parse(s: &str) -> Option<ServerStatus> {
        match s {
            "creating" => Some(ServerStatus::Creating),
            "running" => Some(ServerStatus::Running),
            "destroying" => Some(ServerStatus::Destroying),
            "standby" => Some(ServerStatus::Standby),
            _ => None,
        }
    }
}

/// A server as the state knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// `app-3f9c`: role and four hex digits; also the hostname.
    pub id: String,
    pub env: String,
    pub role: String,
    /// Position within the role (0..servers); a replacement takes over the
    /// slot, and with it the slot's volumes.
    pub slot: u32,
    /// `name@version` of the image.
    pub image: String,
    pub image_digest: String,
    /// Hash of the role spec the server was created with.
    pub spec_hash: String,
    /// The server's own IP address.
    pub address: String,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    pub status: ServerStatus,
    /// Host pid of the server's first process, once started.
    pub pid: Option<i32>,
    /// Release that created it.
    pub release: i64,
    /// For a `standby` server: when its rollback window ends (epoch seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_until: Option<i64>,
}

/// What a role should run, resolved from the spec and the image store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleTarget {
    pub role: String,
    /// `name@version`.
    pub image: String,
    pub image_digest: String,
    pub spec_hash: String,
    pub servers: u32,
    /// Destroy-then-create replacement (declared `cold_only`, or a role with volumes).
    pub cold: bool,
}

/// One step of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Replace,
    Destroy,
}

/// One change of a plan: fully decided (ids, slots, addresses) so that
/// execution makes no choices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub action: Action,
    pub role: String,
    /// The server acted on: the new id for `create`, the old id for
    /// `replace` and `destroy`.
    pub server: String,
    /// For `replace`: the id of the server that replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
    pub slot: u32,
    /// Address of the new server (create and replace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `name@version` of the new server's image (create and replace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Why: `new server`, `image changed (app@1 → app@2)`, `spec changed`, ...
    pub reason: String,
    /// Replacement destroys the old server before creating the new one.
    #[serde(default)]
    pub cold: bool,
    /// Changes with the same batch number are carried out together: their
    /// new servers come up and pass health checks, the balancer switches to
    /// them in one step, then the old servers are drained.
    #[serde(default)]
    pub batch: u32,
    /// For `replace`: the replacement already exists (a warm standby server
    /// of a blue-green rollout) and is switched back to, not created.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub promote: bool,
    /// For `replace`: keep the old server warm, out of the balancer, for
    /// this many seconds instead of destroying it (blue-green).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_warm_secs: Option<u64>,
    /// After this batch switches, watch it for this many seconds (canary
    /// bake) before going on; a failed health check or an error rate above
    /// `max_error_rate` at the balancer rolls the release back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
}

impl Change {
    /// A change with nothing but its action, role, server, slot and reason set.
    pub fn new(action: Action, role: &str, server: &str, slot: u32, reason: &str) -> Change {
        Change {
            action,
            role: role.to_string(),
            server: server.to_string(),
            replacement: None,
            slot,
            address: None,
            image: None,
            reason: reason.to_string(),
            cold: false,
            batch: 0,
            promote: false,
            keep_warm_secs: None,
            bake_secs: None,
            max_error_rate: None,
        }
    }
}

/// A plan for one environment: the contract of `kiln plan -o` and `--json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Format version of this document.
    pub format: u32,
    pub env: String,
    /// The environment's generation the plan was made against; a plan whose
    /// generation is not the current one is stale and refused.
    pub generation: i64,
    /// When it was planned (seconds since the epoch).
    pub created: i64,
    /// Roles in start order (`depends_on` first).
    pub order: Vec<String>,
    pub targets: Vec<RoleTarget>,
    pub changes: Vec<Change>,
    /// Destroy everything first (`kiln deploy --cold`).
    #[serde(default)]
    pub cold: bool,
    /// Destroys the whole environment (`kiln destroy`, `kiln plan --destroy`).
    #[serde(default)]
    pub destroy: bool,
    /// Who made the plan: an approval must come from someone else.
    #[serde(default)]
    pub author: String,
}

impl Plan {
    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action == action).count()
    }
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}
