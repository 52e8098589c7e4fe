//! The serde shapes of `kiln.toml` as written, with source spans where a
//! later check needs to point at a value. Unknown keys are errors.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub project: RawProject,
    #[serde(default)]
    pub images: BTreeMap<String, RawImage>,
    #[serde(default)]
    pub env: BTreeMap<String, RawEnv>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProject {
    pub name: Spanned<String>,
    /// Default cap on what an imported base may expand to (`"8G"`).
    pub import_limit: Option<Spanned<String>>,
    pub vulnerabilities: Option<Spanned<RawAdvisories>>,
    pub scan: Option<Spanned<RawScan>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdvisories {
    pub osv: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScan {
    pub fail_on: Option<String>,
    pub unknown: Option<String>,
    pub ignore_unfixed: Option<bool>,
    pub ignore: Option<Vec<RawIgnore>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIgnore {
    pub id: String,
    pub until: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecrets {
    pub recipients: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrust {
    pub signers: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawImage {
    pub from: Option<Spanned<toml::Value>>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub workdir: Option<String>,
    pub ports: Option<Vec<u16>>,
    pub health: Option<Spanned<RawHealth>>,
    pub test: Option<Vec<Vec<String>>>,
    pub labels: Option<BTreeMap<String, String>>,
    pub mtime: Option<u64>,
    pub network: Option<bool>,
    pub user: Option<Spanned<String>>,
    pub limits: Option<Spanned<RawLimits>>,
    /// `"30m"` (scripts and tests alike) or `{ script = "30m", test = "5m" }`.
    pub timeout: Option<Spanned<toml::Value>>,
    pub import_limit: Option<Spanned<String>>,
    pub scan: Option<Spanned<RawScan>>,
    pub forbid: Option<Vec<Spanned<String>>>,
    pub forbid_packages: Option<Vec<Spanned<String>>>,
    pub setuid: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub pids: Option<i64>,
    pub memory: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    pub script: Option<String>,
    pub test: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFromTable {
    pub rootfs: Option<String>,
    pub oci: Option<String>,
    pub debootstrap: Option<String>,
    pub mirror: Option<String>,
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub http: Option<String>,
    pub port: Option<u16>,
    pub tcp: Option<u16>,
    pub command: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnv {
    pub inherit: Option<Spanned<String>>,
    /// `"local"`, or `{ swarm = "ENDPOINT", registry = "...", ... }`.
    pub provider: Option<Spanned<toml::Value>>,
    pub subnet: Option<Spanned<String>>,
    pub approvals: Option<u32>,
    pub pipeline_identities: Option<Vec<String>>,
    pub alarm: Option<String>,
    pub ttl: Option<Spanned<String>>,
    pub drift: Option<Spanned<String>>,
    pub unmanaged: Option<Spanned<String>>,
    pub replace_share: Option<u32>,
    pub quarantine: Option<Spanned<String>>,
    /// `{ ttl = "1s" }`: the environment's DNS.
    pub dns: Option<Spanned<RawDns>>,
    pub secrets: Option<Spanned<RawSecrets>>,
    pub trust: Option<Spanned<RawTrust>>,
    #[serde(default)]
    pub roles: BTreeMap<String, RawRole>,
}

impl RawEnv {
    /// This environment's settings over `parent`'s: each key set here wins,
    /// roles are merged key by key.
    pub fn over(mut self, parent: &RawEnv) -> RawEnv {
        let p = parent.clone();
        self.provider = self.provider.or(p.provider);
        // `subnet` is not inherited: every environment gets its own.
        self.approvals = self.approvals.or(p.approvals);
        self.pipeline_identities = self.pipeline_identities.or(p.pipeline_identities);
        self.alarm = self.alarm.or(p.alarm);
        self.ttl = self.ttl.or(p.ttl);
        self.drift = self.drift.or(p.drift);
        self.unmanaged = self.unmanaged.or(p.unmanaged);
        self.replace_share = self.replace_share.or(p.replace_share);
        self.quarantine = self.quarantine.or(p.quarantine);
        self.dns = self.dns.or(p.dns);
        self.secrets = self.secrets.or(p.secrets);
        self.trust = self.trust.or(p.trust);
        for (name, prole) in p.roles {
            match self.roles.remove(&name) {
                Some(mine) => {
                    self.roles.insert(name, mine.over(prole));
                }
                None => {
                    self.roles.insert(name, prole);
                }
            }
        }
        self
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRole {
    pub image: Option<Spanned<String>>,
    pub servers: Option<u32>,
    pub size: Option<Spanned<RawSize>>,
    pub ports: Option<Vec<u16>>,
    pub health: Option<Spanned<RawHealth>>,
    pub depends_on: Option<Vec<Spanned<String>>>,
    pub cold_only: Option<bool>,
    pub volumes: Option<BTreeMap<String, String>>,
    pub strategy: Option<Spanned<toml::Value>>,
    pub balancer: Option<Spanned<RawBalancer>>,
    pub ttl: Option<Spanned<String>>,
    pub drift: Option<Spanned<String>>,
    pub unmanaged: Option<Spanned<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub replace_share: Option<u32>,
    pub watch: Option<Spanned<Vec<String>>>,
    pub reach: Option<Spanned<Vec<String>>>,
    pub capabilities: Option<RawCapabilities>,
    pub user: Option<Spanned<String>>,
    pub secrets: Option<Vec<Spanned<String>>>,
    /// Docker-style placement constraints (`node.labels.zone==a`).
    pub placement: Option<Spanned<Vec<String>>>,
}

/// `capabilities = { drop = [...], add = [...] }`: changes to Docker's default set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCapabilities {
    pub drop: Option<Vec<Spanned<String>>>,
    pub add: Option<Vec<Spanned<String>>>,
}

impl RawRole {
    fn over(self, p: RawRole) -> RawRole {
        RawRole {
            image: self.image.or(p.image),
            servers: self.servers.or(p.servers),
            size: self.size.or(p.size),
            ports: self.ports.or(p.ports),
            health: self.health.or(p.health),
            depends_on: self.depends_on.or(p.depends_on),
            cold_only: self.cold_only.or(p.cold_only),
            volumes: self.volumes.or(p.volumes),
            strategy: self.strategy.or(p.strategy),
            balancer: self.balancer.or(p.balancer),
            ttl: self.ttl.or(p.ttl),
            drift: self.drift.or(p.drift),
            unmanaged: self.unmanaged.or(p.unmanaged),
            env: self.env.or(p.env),
            replace_share: self.replace_share.or(p.replace_share),
            watch: self.watch.or(p.watch),
            reach: self.reach.or(p.reach),
            capabilities: self.capabilities.or(p.capabilities),
            user: self.user.or(p.user),
            secrets: self.secrets.or(p.secrets),
            placement: self.placement.or(p.placement),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSize {
    pub cpus: Option<f64>,
    pub memory: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStrategyOpts {
    pub kind: String,
    pub max_surge: Option<u32>,
    pub max_unavailable: Option<u32>,
    pub min_healthy: Option<String>,
    pub rollback_window: Option<String>,
    pub share: Option<u32>,
    pub bake: Option<String>,
    pub max_error_rate: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBalancer {
    pub listen: String,
    pub port: Option<u16>,
    pub drain_timeout: Option<String>,
    /// Active health checks by the balancer: `"0s"` turns them off.
    pub check_interval: Option<String>,
    pub fall: Option<u32>,
    pub rise: Option<u32>,
    /// `"http"` or `"tcp"`; HTTP when the role's health check is HTTP.
    pub mode: Option<Spanned<String>>,
    /// `"round_robin"` or `"least_requests"`.
    pub algorithm: Option<Spanned<String>>,
    pub tls: Option<Spanned<RawTls>>,
    /// `"IP:PORT"` of the Prometheus metrics listener.
    pub admin: Option<Spanned<String>>,
    /// HTTP mode: requests at once per backend, at most.
    pub max_requests: Option<u32>,
    /// HTTP mode: how long a request waits for room, e.g. `"5s"`.
    pub queue_timeout: Option<String>,
    /// Nodes (ids or hostnames) a swarm environment runs the balancer on.
    pub nodes: Option<Vec<String>>,
}

/// `provider = { swarm = "ENDPOINT", registry = "HOST:PORT/PATH", tls =
/// "DIR", engines = { NODE = "ENDPOINT" }, ports = "FIRST-LAST" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSwarm {
    pub swarm: String,
    pub registry: Option<String>,
    pub tls: Option<String>,
    pub engines: Option<BTreeMap<String, String>>,
    pub ports: Option<String>,
}

/// `tls = { cert, key }` or `tls = { acme = { ... } }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub acme: Option<Spanned<RawAcme>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAcme {
    pub directory: Spanned<String>,
    pub email: Spanned<String>,
    pub domains: Spanned<Vec<Spanned<String>>>,
    /// A PEM root certificate to trust for a private ACME server.
    pub ca: Option<Spanned<String>>,
    /// Renew when less than this is left (default 30 days).
    pub renew_before: Option<Spanned<String>>,
}
