//! Plain domain types shared by every layer of kiln: image recipes,
//! environments and their roles, as validated from `kiln.toml`.
//!
//! Invariant: this crate does no I/O and depends on nothing but `serde`.
//! Everything here is already validated: a `Project` that exists is one whose
//! images form a forest and whose roles name images that exist.

mod plan;
mod release;
mod subnet;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use plan::*;
pub use release::*;
pub use subnet::{Subnet, SubnetError, DEFAULT_POOL, MAX_PREFIX, MIN_PREFIX};

/// An error and its sources on one line, `: `-separated: what kiln shows
/// for errors whose detail is in their sources (libcontainer's, Docker's).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

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
    /// The user the image's processes (tests, servers) run as; root if none.
    #[serde(default)]
    pub user: Option<UserSpec>,
    /// Limits of the build scripts and tests of this image.
    #[serde(default)]
    pub build_limits: BuildLimits,
    /// Bytes an imported base of this image may expand to.
    #[serde(default = "default_import_limit")]
    pub import_limit_bytes: u64,
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

fn default_import_limit() -> u64 {
    DEFAULT_IMPORT_LIMIT
}

/// A Linux capability, named as in `capabilities(7)` without the `CAP_`
/// prefix (`NET_RAW`). Parsed case-insensitively, with or without `CAP_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Capability {
    Chown,
    DacOverride,
    DacReadSearch,
    Fowner,
    Fsetid,
    Kill,
    Setgid,
    Setuid,
    Setpcap,
    LinuxImmutable,
    NetBindService,
    NetBroadcast,
    NetAdmin,
    NetRaw,
    IpcLock,
    IpcOwner,
    SysModule,
    SysRawio,
    SysChroot,
    SysPtrace,
    SysPacct,
    SysAdmin,
    SysBoot,
    SysNice,
    SysResource,
    SysTime,
    SysTtyConfig,
    Mknod,
    Lease,
    AuditWrite,
    AuditControl,
    Setfcap,
    MacOverride,
    MacAdmin,
    Syslog,
    WakeAlarm,
    BlockSuspend,
    AuditRead,
    Perfmon,
    Bpf,
    CheckpointRestore,
}

impl Capability {
    /// Every capability the kernel defines, in the kernel's numbering order.
    pub const ALL: [Capability; 41] = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::DacReadSearch,
        Capability::Fowner,
        Capability::Fsetid,
        Capability::Kill,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setpcap,
        Capability::LinuxImmutable,
        Capability::NetBindService,
        Capability::NetBroadcast,
        Capability::NetAdmin,
        Capability::NetRaw,
        Capability::IpcLock,
        Capability::IpcOwner,
        Capability::SysModule,
        Capability::SysRawio,
        Capability::SysChroot,
        Capability::SysPtrace,
        Capability::SysPacct,
        Capability::SysAdmin,
        Capability::SysBoot,
        Capability::SysNice,
        Capability::SysResource,
        Capability::SysTime,
        Capability::SysTtyConfig,
        Capability::Mknod,
        Capability::Lease,
        Capability::AuditWrite,
        Capability::AuditControl,
        Capability::Setfcap,
        Capability::MacOverride,
        Capability::MacAdmin,
        Capability::Syslog,
        Capability::WakeAlarm,
        Capability::BlockSuspend,
        Capability::AuditRead,
        Capability::Perfmon,
        Capability::Bpf,
        Capability::CheckpointRestore,
    ];

    /// Docker's default set: what a server (and a build script) gets unless
    /// its role drops or adds capabilities.
    pub const DOCKER_DEFAULT: [Capability; 14] = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fowner,
        Capability::Fsetid,
        Capability::Kill,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::NetRaw,
        Capability::SysChroot,
        Capability::Mknod,
        Capability::AuditWrite,
        Capability::Setfcap,
    ];

    /// The kernel's number of this capability (`CAP_CHOWN` is 0).
    pub fn number(self) -> u32 {
        Capability::ALL
            .iter()
            .position(|c| *c == self)
            .map(|i| i as u32)
            .unwrap_or(u32::MAX)
    }

    /// The name without the `CAP_` prefix, as `capabilities(7)` spells it.
    pub fn name(self) -> &'static str {
        use Capability::*;
        match self {
            Chown => "CHOWN",
            DacOverride => "DAC_OVERRIDE",
            DacReadSearch => "DAC_READ_SEARCH",
            Fowner => "FOWNER",
            Fsetid => "FSETID",
            Kill => "KILL",
            Setgid => "SETGID",
            Setuid => "SETUID",
            Setpcap => "SETPCAP",
            LinuxImmutable => "LINUX_IMMUTABLE",
            NetBindService => "NET_BIND_SERVICE",
            NetBroadcast => "NET_BROADCAST",
            NetAdmin => "NET_ADMIN",
            NetRaw => "NET_RAW",
            IpcLock => "IPC_LOCK",
            IpcOwner => "IPC_OWNER",
            SysModule => "SYS_MODULE",
            SysRawio => "SYS_RAWIO",
            SysChroot => "SYS_CHROOT",
            SysPtrace => "SYS_PTRACE",
            SysPacct => "SYS_PACCT",
            SysAdmin => "SYS_ADMIN",
            SysBoot => "SYS_BOOT",
            SysNice => "SYS_NICE",
            SysResource => "SYS_RESOURCE",
            SysTime => "SYS_TIME",
            SysTtyConfig => "SYS_TTY_CONFIG",
            Mknod => "MKNOD",
            Lease => "LEASE",
            AuditWrite => "AUDIT_WRITE",
            AuditControl => "AUDIT_CONTROL",
            Setfcap => "SETFCAP",
            MacOverride => "MAC_OVERRIDE",
            MacAdmin => "MAC_ADMIN",
            Syslog => "SYSLOG",
            WakeAlarm => "WAKE_ALARM",
            BlockSuspend => "BLOCK_SUSPEND",
            AuditRead => "AUDIT_READ",
            Perfmon => "PERFMON",
            Bpf => "BPF",
            CheckpointRestore => "CHECKPOINT_RESTORE",
        }
    }

    /// Docker's default set as a set.
    pub fn docker_default() -> BTreeSet<Capability> {
        Capability::DOCKER_DEFAULT.into_iter().collect()
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability name that `capabilities(7)` does not define.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCapability(pub String);

impl std::fmt::Display for UnknownCapability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown capability `{}`; expected a name from capabilities(7) such as \"NET_RAW\" or \"CAP_SYS_ADMIN\"",
            self.0
        )
    }
}

impl std::error::Error for UnknownCapability {}

impl std::str::FromStr for Capability {
    type Err = UnknownCapability;
    fn from_str(s: &str) -> Result<Capability, UnknownCapability> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        Capability::ALL
            .into_iter()
            .find(|c| c.name() == bare)
            .ok_or_else(|| UnknownCapability(s.to_string()))
    }
}

impl TryFrom<String> for Capability {
    type Error = UnknownCapability;
    fn try_from(s: String) -> Result<Capability, UnknownCapability> {
        s.parse()
    }
}

impl From<Capability> for String {
    fn from(c: Capability) -> String {
        c.name().to_string()
    }
}

/// One side of a `user` declaration: a numeric id or a name to look up.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdRef {
    Id(u32),
    Name(String),
}

impl std::fmt::Display for IdRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdRef::Id(n) => write!(f, "{n}"),
            IdRef::Name(n) => f.write_str(n),
        }
    }
}

/// A declared `user = "NAME" | "UID" | "NAME:GROUP" | "UID:GID"`, resolved
/// against an image's own `/etc/passwd` and `/etc/group` at bake time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserSpec {
    pub user: IdRef,
    pub group: Option<IdRef>,
}

impl std::fmt::Display for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.group {
            Some(g) => write!(f, "{}:{g}", self.user),
            None => write!(f, "{}", self.user),
        }
    }
}

impl std::str::FromStr for UserSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<UserSpec, String> {
        let part = |p: &str| -> Result<IdRef, String> {
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                // (uid_t)-1 means "unchanged" to the kernel: never a real id.
                return match p.parse::<u32>() {
                    Ok(n) if n != u32::MAX => Ok(IdRef::Id(n)),
                    _ => Err(format!("`{p}` is out of range; ids go up to 4294967294")),
                };
            }
            let ok = !p.is_empty()
                && p.len() <= 32
                && !p.starts_with('-')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if ok {
                Ok(IdRef::Name(p.to_string()))
            } else {
                Err(format!("`{p}` is not a user or group name; expected letters, digits, `_`, `-` or `.` (at most 32), or a number"))
            }
        };
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        Ok(UserSpec {
            user: part(u)?,
            group: g.map(part).transpose()?,
        })
    }
}

impl TryFrom<String> for UserSpec {
    type Error = String;
    fn try_from(s: String) -> Result<UserSpec, String> {
        s.parse()
    }
}

impl From<UserSpec> for String {
    fn from(u: UserSpec) -> String {
        u.to_string()
    }
}

/// A user resolved in an image's `/etc/passwd` and `/etc/group`: what the
/// runtime needs to start a process as that user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedUser {
    /// The user's name, if the image's passwd has one for this uid.
    pub name: Option<String>,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: every group of `/etc/group` that lists the user.
    pub additional_gids: Vec<u32>,
    /// Home directory from passwd, if any.
    pub home: Option<String>,
}

impl ResolvedUser {
    /// Root, as a process runs when an image declares no user.
    pub fn root() -> ResolvedUser {
        ResolvedUser {
            name: Some("root".into()),
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            home: Some("/root".into()),
        }
    }
}

/// Resource limits of an image's build scripts and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLimits {
    /// Most processes (and threads) at once.
    pub pids: u32,
    pub memory_bytes: u64,
    /// Time allowed to each build script.
    pub script_timeout_secs: u64,
    /// Time allowed to each image test.
    pub test_timeout_secs: u64,
}

impl Default for BuildLimits {
    fn default() -> BuildLimits {
        BuildLimits {
            pids: 4096,
            memory_bytes: 4 << 30,
            script_timeout_secs: 30 * 60,
            test_timeout_secs: 5 * 60,
        }
    }
}

/// Bytes an imported base (rootfs tarball, OCI layers, debootstrap) may
/// expand to unless `import_limit` says otherwise.
pub const DEFAULT_IMPORT_LIMIT: u64 = 8 << 30;

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
    /// HTTP or TCP. Plans written before HTTP mode existed read as TCP,
    /// their behaviour then.
    #[serde(default)]
    pub mode: BalancerMode,
    #[serde(default)]
    pub algorithm: BalancerAlgorithm,
    /// TLS termination on `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BalancerTls>,
    /// `IP:PORT` of the admin listener serving Prometheus metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// HTTP mode: requests each backend is given at once at most (the
    /// learnt limit stays at or below it); unbounded but learnt when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// HTTP mode: how long a request may wait for room on a backend before
    /// it is answered 503 (the balancer's default when absent; 0: no wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_ms: Option<u64>,
    /// On providers with several nodes: the nodes (ids or hostnames) the
    /// balancer runs on, each publishing `listen`'s port; every node when
    /// empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

/// The protocol a balancer speaks with clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerMode {
    /// Requests parsed, a backend chosen per request, every response counted.
    Http,
    /// Connections relayed byte for byte.
    #[default]
    Tcp,
}

/// How a balancer chooses a backend for each request (or connection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerAlgorithm {
    #[default]
    RoundRobin,
    LeastRequests,
}

/// Where a balancer's TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerTls {
    /// PEM files (absolute paths), reloaded when they change.
    Files { cert: String, key: String },
    /// Obtained and renewed over ACME.
    Acme {
        directory: String,
        email: String,
        domains: Vec<String>,
        /// PEM root to trust for the directory (absolute path), if private.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca: Option<String>,
        /// Renew when less than this is left.
        renew_before_secs: u64,
    },
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
    /// Absolute paths inside the server whose writable files are drift even
    /// when they are ordinary data (config a server rewrites, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<String>,
    /// What its servers may open connections to beyond their environment
    /// (everything else is refused by the provider's isolation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reach: Vec<Reach>,
    /// Capabilities of the role's servers: Docker's default set with the
    /// role's `drop` and `add` applied.
    #[serde(default = "Capability::docker_default")]
    pub capabilities: BTreeSet<Capability>,
    /// Who its servers run as, over the image's `user`; resolved in the
    /// image's own `/etc/passwd` and `/etc/group` when planning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserSpec>,
    /// Names of the environment's secrets this role's servers receive as
    /// files in `/run/secrets/`.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Placement constraints on providers with several nodes, in Docker's
    /// syntax (`node.labels.zone==a`, `node.hostname!=db1`, `node.role==worker`,
    /// `node.id==...`): every one must hold on a server's node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Constraint>,
}

/// A destination servers of a role may reach: `host:PORT` (a service on
/// the host, at the environment's gateway) or `A.B.C.D[/N]:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    pub to: ReachTarget,
    pub port: u16,
}

/// Where a [`Reach`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReachTarget {
    /// The host itself, at the environment's gateway address.
    Host,
    /// An IPv4 network (a single address is a /32).
    Net {
        addr: std::net::Ipv4Addr,
        prefix: u8,
    },
}

/// Where an environment's servers run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderSpec {
    /// Sandboxes on this host (the embedded default).
    Local,
    /// Services on a Docker Swarm, reached through a manager's Engine API.
    Swarm(SwarmSpec),
}

impl ProviderSpec {
    /// The provider's name as `kiln.toml` says it.
    pub fn name(&self) -> &'static str {
        match self {
            ProviderSpec::Local => "local",
            ProviderSpec::Swarm(_) => "swarm",
        }
    }
}

/// An environment on a Docker Swarm: `provider = { swarm = "unix:///...",
/// registry = "host:5000/shop", ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmSpec {
    /// A manager's Engine API: `unix:///var/run/docker.sock` or
    /// `tcp://HOST:PORT`.
    pub endpoint: String,
    /// The repository images are pushed to and pulled from by digest,
    /// `HOST[:PORT]/PATH` (each image under `PATH/NAME`).
    pub registry: String,
    /// The registry speaks plain HTTP (declared as `http://HOST:PORT/PATH`,
    /// as Docker's `insecure-registries`).
    #[serde(default)]
    pub registry_insecure: bool,
    /// A directory with `ca.pem`, `cert.pem` and `key.pem` (Docker's
    /// `DOCKER_CERT_PATH`) for `tcp://` endpoints: the manager's and the
    /// nodes'. Absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<PathBuf>,
    /// Each node's own Engine API (exec sessions and filesystem exports are
    /// only visible there), by node id or hostname. Nodes not listed are
    /// reached through their `dev.kiln.engine` label, if any.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub engines: BTreeMap<String, String>,
    /// Host ports the planner publishes servers' ports on, first and last.
    pub ports: (u16, u16),
}

/// A placement constraint, in Docker's syntax: `node.labels.zone==a`,
/// `node.hostname!=db1`, `node.role==worker`, `node.id==ID`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Constraint {
    pub attribute: NodeAttribute,
    /// `==` (true) or `!=` (false).
    pub equal: bool,
    pub value: String,
}

/// What a [`Constraint`] looks at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeAttribute {
    Id,
    Hostname,
    /// `manager` or `worker`.
    Role,
    Label(String),
}

impl Constraint {
    /// Whether `node` satisfies it (a missing label is unequal to anything).
    pub fn holds(&self, node: &NodeInfo) -> bool {
        let found = match &self.attribute {
            NodeAttribute::Id => Some(node.id.as_str()),
            NodeAttribute::Hostname => Some(node.hostname.as_str()),
            NodeAttribute::Role => Some(if node.manager { "manager" } else { "worker" }),
            NodeAttribute::Label(k) => node.labels.get(k).map(String::as_str),
        };
        (found == Some(self.value.as_str())) == self.equal
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = match &self.attribute {
            NodeAttribute::Id => "node.id".to_string(),
            NodeAttribute::Hostname => "node.hostname".to_string(),
            NodeAttribute::Role => "node.role".to_string(),
            NodeAttribute::Label(k) => format!("node.labels.{k}"),
        };
        let op = if self.equal { "==" } else { "!=" };
        write!(f, "{key}{op}{}", self.value)
    }
}

impl std::str::FromStr for Constraint {
    type Err = String;
    fn from_str(c: &str) -> Result<Constraint, String> {
        let bad = |why: &str| {
            format!("placement constraint `{c}` {why}; expected \"node.labels.KEY==VALUE\", \"node.hostname!=NAME\", \"node.role==worker\" or \"node.id==ID\"")
        };
        let (key, equal, value) = match (c.split_once("!="), c.split_once("==")) {
            (Some((k, v)), _) => (k, false, v),
            (None, Some((k, v))) => (k, true, v),
            _ => return Err(bad("has no == or !=")),
        };
        let (key, value) = (key.trim(), value.trim());
        let attribute = match key {
            "node.id" => NodeAttribute::Id,
            "node.hostname" => NodeAttribute::Hostname,
            "node.role" => NodeAttribute::Role,
            _ => match key.strip_prefix("node.labels.") {
                Some(l) if !l.is_empty() => NodeAttribute::Label(l.to_string()),
                _ => return Err(bad("names no attribute kiln knows")),
            },
        };
        if value.is_empty() || value.contains(['=', '!']) {
            return Err(bad("has no single value"));
        }
        if attribute == NodeAttribute::Role && !matches!(value, "manager" | "worker") {
            return Err(bad("compares node.role with neither manager nor worker"));
        }
        Ok(Constraint {
            attribute,
            equal,
            value: value.to_string(),
        })
    }
}

impl TryFrom<String> for Constraint {
    type Error = String;
    fn try_from(s: String) -> Result<Constraint, String> {
        s.parse()
    }
}

impl From<Constraint> for String {
    fn from(c: Constraint) -> String {
        c.to_string()
    }
}

/// Host ports servers' ports are published on unless `ports` says otherwise.
pub const SWARM_PORTS: (u16, u16) = (30000, 32767);

/// A machine of a provider with several, as the planner sees it: what it
/// may place a server on, and which host ports are taken there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub hostname: String,
    /// Where servers on it are reached (published ports are bound there).
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub manager: bool,
    /// Up and accepting new servers.
    pub available: bool,
    /// Host ports something publishes on it now (any environment, anything).
    pub ports: BTreeSet<u16>,
}

/// An environment: `staging`, `production`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvSpec {
    pub name: String,
    pub provider: ProviderSpec,
    /// Subnet of the environment's servers, e.g. `10.77.1.0/24`.
    pub subnet: Subnet,
    /// Whether `subnet` was declared (otherwise it was derived from the
    /// project's and environment's names).
    pub subnet_declared: bool,
    pub approvals: u32,
    pub pipeline_identities: Vec<String>,
    pub alarm: Option<String>,
    /// How long a quarantined server's evidence is kept (seconds).
    pub quarantine_secs: u64,
    /// TTL of the environment's DNS answers: a server leaving a role is
    /// withdrawn from DNS at least this long before it stops.
    #[serde(default = "default_dns_ttl")]
    pub dns_ttl_secs: u32,
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
    /// The machine it runs on, for providers with several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Declared port → the port it is reachable on at `address`, where the
    /// provider publishes it elsewhere; a port not listed is itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub published: BTreeMap<u16, u16>,
}

impl Server {
    /// `address:port` where the server's declared `port` is reached.
    pub fn endpoint(&self, port: u16) -> String {
        let p = self.published.get(&port).copied().unwrap_or(port);
        format!("{}:{p}", self.address)
    }
}

fn default_dns_ttl() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_parse_with_or_without_prefix_in_any_case() {
        for s in [
            "NET_RAW",
            "net_raw",
            "CAP_NET_RAW",
            "cap_Net_Raw",
            " NET_RAW ",
        ] {
            assert_eq!(s.parse::<Capability>(), Ok(Capability::NetRaw), "{s}");
        }
        assert!("NET_RAWX".parse::<Capability>().is_err());
        assert!("CAP_".parse::<Capability>().is_err());
        assert!("".parse::<Capability>().is_err());
        // Every name round-trips, and numbers follow the kernel's order.
        for (i, c) in Capability::ALL.iter().enumerate() {
            assert_eq!(c.name().parse::<Capability>(), Ok(*c));
            assert_eq!(c.number(), i as u32);
        }
        assert_eq!(Capability::CheckpointRestore.number(), 40);
        assert_eq!(Capability::docker_default().len(), 14);
    }

    #[test]
    fn capabilities_serialize_as_their_names() {
        let json = serde_json::to_string(&Capability::docker_default()).unwrap();
        assert!(json.starts_with(r#"["CHOWN","DAC_OVERRIDE","#), "{json}");
        let back: BTreeSet<Capability> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Capability::docker_default());
        assert!(serde_json::from_str::<Capability>(r#""NOPE""#).is_err());
    }

    #[test]
    fn constraints_parse_print_and_hold() {
        let node = NodeInfo {
            id: "n1".into(),
            hostname: "vm".into(),
            address: "10.0.0.1".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            manager: true,
            available: true,
            ports: BTreeSet::new(),
        };
        for (c, holds) in [
            ("node.labels.zone==a", true),
            ("node.labels.zone != a", false),
            ("node.labels.disk==ssd", false),
            ("node.labels.disk!=ssd", true),
            ("node.role==manager", true),
            ("node.hostname!=vm", false),
            ("node.id==n1", true),
        ] {
            let parsed: Constraint = c.parse().unwrap();
            assert_eq!(parsed.holds(&node), holds, "{c}");
            assert_eq!(parsed.to_string(), c.replace(' ', ""));
        }
        for bad in [
            "zone==a",
            "node.labels.==a",
            "node.role==boss",
            "node.id=x",
            "node.id==",
            "node.id==a==b",
        ] {
            assert!(bad.parse::<Constraint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn user_specs_parse_names_ids_and_groups() {
        let u: UserSpec = "postgres".parse().unwrap();
        assert_eq!((u.user, u.group), (IdRef::Name("postgres".into()), None));
        let u: UserSpec = "1000:100".parse().unwrap();
        assert_eq!((u.user, u.group), (IdRef::Id(1000), Some(IdRef::Id(100))));
        let u: UserSpec = "www-data:adm".parse().unwrap();
        assert_eq!(u.to_string(), "www-data:adm");
        for bad in [
            "",
            ":",
            "a:",
            ":b",
            "4294967295",
            "99999999999",
            "a b",
            "-x",
            "a:b:c",
        ] {
            assert!(bad.parse::<UserSpec>().is_err(), "{bad:?} parsed");
        }
    }
}
