//! Drift: everything about an environment that differs from what was
//! declared and applied. Files against the image seal (each image version
//! verified once, not once per server, through the provider), what servers
//! write (executables, setuid files and watched paths; ordinary data in
//! volumes and tmpfs is not drift), processes that do not descend from the
//! entrypoint, running config, stale images, servers past their TTL, and
//! servers nobody declared. Findings matching an entry of the project's
//! `.kilnignore` are silenced. Read-only: drift changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use kiln_model::{Balancer, EnvSpec, HealthCheck, ImageRef, RoleSpec, Server, ServerStatus};
use serde::Serialize;

use crate::{Engine, Result};

/// What kind of difference a finding is. Reconcile acts on kinds, never on
/// the text of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A file of the image root differs from its seal.
    Files,
    /// An executable, setuid file or watched path written at runtime.
    Writable,
    /// A process that was not started by the server's entrypoint.
    Process,
    /// Running configuration differs from the declaration.
    Config,
    /// The server runs another version than the role's current image.
    Stale,
    /// The server is older than its role's TTL.
    Expired,
    /// Something nobody declared: a stray sandbox, a rogue backend, a
    /// state entry whose process is gone.
    Unmanaged,
    /// The server runs an image version the environment no longer trusts
    /// (no valid signature by any of its `trust` signers).
    Untrusted,
    /// The server runs an image version that today's advisories fail
    /// (the image's `scan` gate).
    Vulnerable,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Files => "files",
            FindingKind::Writable => "writable",
            FindingKind::Process => "process",
            FindingKind::Config => "config",
            FindingKind::Stale => "stale",
            FindingKind::Expired => "expired",
            FindingKind::Unmanaged => "unmanaged",
            FindingKind::Untrusted => "untrusted",
            FindingKind::Vulnerable => "vulnerable",
        }
    }

    pub fn parse(s: &str) -> Option<FindingKind> {
        use FindingKind::*;
        [
            Files, Writable, Process, Config, Stale, Expired, Unmanaged, Untrusted, Vulnerable,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// A change made to a server (as opposed to time passing or a newer
    /// image): the drift policy (`replace`, `kill`) acts on these.
    pub fn is_tampering(self) -> bool {
        matches!(
            self,
            FindingKind::Files | FindingKind::Writable | FindingKind::Process | FindingKind::Config
        )
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing that differs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    /// The server (or `balancer:ROLE`, or a backend address) it is about.
    pub server: String,
    pub kind: FindingKind,
    /// The role it belongs to, when one is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// A path inside the server it is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub detail: String,
}

/// The `kiln drift --json` document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub env: String,
    pub checked_at: i64,
    pub servers: usize,
    /// Image versions whose roots were re-hashed (once each).
    pub images_verified: Vec<String>,
    pub findings: Vec<Finding>,
    /// Findings silenced by `.kilnignore`.
    pub ignored: usize,
    /// What could not be checked, and why (advisories unreachable, no
    /// identity for a role's secrets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The report as text: a summary line, then findings grouped by server,
/// one `KIND DETAIL` line each. Colours are the CLI's.
pub fn render(report: &Report) -> String {
    let ignored = |pre: &str, post: &str| {
        if report.ignored > 0 {
            format!("{pre}{} ignored{post}", report.ignored)
        } else {
            String::new()
        }
    };
    if report.findings.is_empty() {
        let mut out = format!(
            "no drift in `{}`: {} servers match their declaration ({} image versions verified",
            report.env,
            report.servers,
            report.images_verified.len()
        );
        out.push_str(&ignored(", ", " findings"));
        out.push_str(").\n");
        out.push_str(&warnings(report));
        return out;
    }
    let servers: BTreeSet<&str> = report.findings.iter().map(|f| f.server.as_str()).collect();
    let mut out = format!(
        "DRIFT in `{}`: {} findings on {} servers{}\n",
        report.env,
        report.findings.len(),
        servers.len(),
        ignored(" (", ")")
    );
    let mut last = "";
    for f in &report.findings {
        if f.server != last {
            out.push_str(&format!("  {}\n", f.server));
            last = &f.server;
        }
        out.push_str(&format!("    {:<9} {}\n", f.kind.as_str(), f.detail));
    }
    out.push_str(&warnings(report));
    out
}

/// What could not be checked, one `warning:` line each.
fn warnings(report: &Report) -> String {
    report
        .warnings
        .iter()
        .map(|w| format!("warning: {w}\n"))
        .collect()
}

/// One `.kilnignore` line: `KIND SERVER PATH [until=YYYY-MM-DD] # reason`,
/// each of KIND, SERVER and PATH a value or `*` (PATH matches as a prefix
/// of the finding's path).
#[derive(Debug, Clone)]
struct Ignore {
    kind: Option<FindingKind>,
    server: String,
    path: String,
}

fn load_ignores(dir: &Path, now: i64) -> Vec<Ignore> {
    let Ok(text) = std::fs::read_to_string(dir.join(".kilnignore")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let l = l.split('#').next().unwrap_or("").trim();
            let mut f = l.split_whitespace();
            let (kind, server, path) = (f.next()?, f.next()?, f.next()?);
            let until = f.find_map(|w| w.strip_prefix("until="));
            if until.is_some_and(|u| day(u).is_none_or(|t| t <= now)) {
                return None;
            }
            let kind = match kind {
                "*" => None,
                k => Some(FindingKind::parse(k)?),
            };
            Some(Ignore {
                kind,
                server: server.into(),
                path: path.into(),
            })
        })
        .collect()
}

/// `YYYY-MM-DD` → epoch seconds (UTC midnight), by the civil-from-days
/// algorithm; `None` for anything else.
fn day(s: &str) -> Option<i64> {
    let mut p = s.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, d) = (p.next()??, p.next()??, p.next()??);
    if p.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400)
}

impl Ignore {
    fn matches(&self, f: &Finding) -> bool {
        self.kind.is_none_or(|k| k == f.kind)
            && (self.server == "*" || self.server == f.server)
            && (self.path == "*" || f.path.as_deref().unwrap_or("").starts_with(&self.path))
    }
}

/// The roles of `roles` that have a balancer, with it.
pub fn fronts<'a>(roles: impl Iterator<Item = &'a RoleSpec>) -> Vec<(String, Balancer)> {
    roles
        .filter_map(|r| r.balancer.clone().map(|b| (r.name.clone(), b)))
        .collect()
}

/// Ports a role's servers may listen on: declared ports, the balancer's
/// port and the health check's.
fn declared_ports(role: &RoleSpec) -> BTreeSet<u16> {
    let mut declared: BTreeSet<u16> = role.ports.iter().copied().collect();
    declared.extend(role.balancer.as_ref().map(|b| b.port));
    declared.extend(role.health.as_ref().and_then(|h| match h {
        HealthCheck::Http { port, .. } | HealthCheck::Tcp { port } => Some(*port),
        HealthCheck::Command { .. } => None,
    }));
    declared
}

/// Findings being collected.
struct Findings(Vec<Finding>);

impl Findings {
    fn push(&mut self, server: &str, kind: FindingKind, role: Option<&str>, detail: String) {
        self.0.push(Finding {
            server: server.into(),
            kind,
            role: role.map(str::to_string),
            path: None,
            detail,
        });
    }

    fn at(&mut self, s: &Server, kind: FindingKind, path: &str, detail: String) {
        self.0.push(Finding {
            server: s.id.clone(),
            kind,
            role: Some(s.role.clone()),
            path: Some(path.to_string()),
            detail,
        });
    }
}

impl Engine<'_> {
    /// Backends a role's balancer routes to that are no running server of
    /// that role in the state: (role, address:port). A hand-edited
    /// balancer, or one left behind by a crash.
    pub fn unknown_backends(
        &self,
        env: &str,
        servers: &[Server],
        fronts: &[(String, Balancer)],
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (role, b) in fronts {
            let known: BTreeSet<String> = servers
                .iter()
                .filter(|s| &s.role == role && s.status == ServerStatus::Running)
                .map(|s| s.endpoint(b.port))
                .collect();
            let Some(state) = self.provider.balancer(env, role) else {
                continue;
            };
            for backend in state.backends {
                let routed = backend.rotation != kiln_provider::Rotation::Draining;
                if routed && !known.contains(&backend.addr) {
                    out.push((role.clone(), backend.addr));
                }
            }
        }
        out
    }

    /// Checks `env` for drift. Read-only: changes nothing. With `full`,
    /// every file is re-hashed; otherwise files whose size, times and inode
    /// did not change since the last scan keep their hash.
    pub fn drift(&self, env_name: &str, full: bool) -> Result<Report> {
        let env = self.env(env_name)?;
        let now = (self.clock)();
        let servers = self.state.servers(Some(env_name))?;
        let running = self.provider.inventory(env_name)?;
        let alive: BTreeSet<&str> = running
            .iter()
            .filter(|r| r.alive)
            .map(|r| r.id.as_str())
            .collect();
        let known: BTreeSet<&str> = servers.iter().map(|s| s.id.as_str()).collect();
        let mut found = Findings(Vec::new());
        use FindingKind::*;

        for r in running.iter().filter(|r| !known.contains(r.id.as_str())) {
            let detail = format!(
                "sandbox labelled `{env_name}` (role `{}`) that the state does not know",
                r.role
            );
            found.push(&r.id, Unmanaged, Some(&r.role), detail);
        }
        for s in servers.iter().filter(|s| {
            matches!(s.status, ServerStatus::Running | ServerStatus::Standby)
                && !alive.contains(s.id.as_str())
        }) {
            let detail = "in the state, but its process is gone".to_string();
            found.push(&s.id, Unmanaged, Some(&s.role), detail);
        }
        self.drift_fronts(env, &servers, &mut found);
        let verified = self.drift_files(&servers, &alive, full, &mut found);

        let mut warnings = Vec::new();
        let targets: BTreeMap<String, (String, String, Option<String>)> = env
            .roles
            .values()
            .filter_map(|r| {
                let rec = self.store.current_record(&r.image).ok()?;
                let image = format!("{}@{}", rec.name, rec.version);
                // Without the identity, the secrets' fingerprints (part of
                // the hash) are unknown: the comparison is skipped, saying so.
                let hash = match self.secret_fingerprints(env_name, r) {
                    Ok(secrets) => Some(kiln_planner::spec_hash_with_secrets(r, &secrets)),
                    Err(e) => {
                        warnings.push(format!(
                            "role `{}`: spec not compared: {}",
                            r.name,
                            kiln_model::error_chain(&e)
                        ));
                        None
                    }
                };
                Some((r.name.clone(), (image, rec.digest.0.clone(), hash)))
            })
            .collect();
        self.drift_supply(env, &servers, &alive, &mut found, &mut warnings);
        for s in servers.iter().filter(|s| alive.contains(s.id.as_str())) {
            let Some(role) = env.roles.get(&s.role) else {
                let detail = format!("role `{}` is no longer declared", s.role);
                found.push(&s.id, Unmanaged, Some(&s.role), detail);
                continue;
            };
            self.drift_server(s, role, &mut found);
            if s.status != ServerStatus::Running {
                continue;
            }
            if let Some((image, digest, hash)) = targets.get(&s.role) {
                if digest != &s.image_digest {
                    let detail = format!("runs {}, the role's current image is {image}", s.image);
                    found.push(&s.id, Stale, Some(&s.role), detail);
                } else if hash.as_ref().is_some_and(|h| h != &s.spec_hash) {
                    let detail =
                        "created with a different role spec (size, ports, volumes or env)".into();
                    found.push(&s.id, Config, Some(&s.role), detail);
                }
            }
            if let Some(ttl) = role.ttl_secs {
                let age = (now - s.created).max(0) as u64;
                if age > ttl {
                    let detail = format!("{} old, ttl {}", age_text(age), age_text(ttl));
                    found.push(&s.id, Expired, Some(&s.role), detail);
                }
            }
        }
        let mut findings = found.0;
        let ignores = load_ignores(&self.project.dir, now);
        let before = findings.len();
        findings.retain(|f| !ignores.iter().any(|i| i.matches(f)));
        let ignored = before - findings.len();
        findings.sort();
        Ok(Report {
            env: env_name.into(),
            checked_at: now,
            servers: servers.len(),
            images_verified: verified,
            findings,
            ignored,
            warnings,
        })
    }

    /// The supply chain of what runs: each image version running in `env`
    /// is checked once against the environment's trusted signers and
    /// against today's advisories (the image's `scan` gate); every live
    /// server of a version that fails gets a finding.
    fn drift_supply(
        &self,
        env: &EnvSpec,
        servers: &[Server],
        alive: &BTreeSet<&str>,
        found: &mut Findings,
        warnings: &mut Vec<String>,
    ) {
        let live: Vec<&Server> = servers
            .iter()
            .filter(|s| alive.contains(s.id.as_str()))
            .collect();
        let versions: BTreeSet<(&str, &str)> = live
            .iter()
            .map(|s| (s.image.as_str(), s.image_digest.as_str()))
            .collect();
        if versions.is_empty() {
            return;
        }
        let advisories = match &self.project.vulnerabilities {
            None => None,
            Some(source) => match kiln_image::scan::Advisories::load(source, self.store) {
                Ok(a) => {
                    warnings.extend(a.warnings.iter().cloned());
                    Some(a)
                }
                Err(e) => {
                    warnings.push(format!(
                        "vulnerabilities not checked: {}",
                        kiln_model::error_chain(&e)
                    ));
                    None
                }
            },
        };
        for (image, digest) in versions {
            let on: Vec<&&Server> = live
                .iter()
                .filter(|s| s.image == image && s.image_digest == digest)
                .collect();
            let rec = match kiln_image::ops::resolve(self.store, image) {
                Ok(r) if r.digest.0 == digest => r,
                _ => {
                    warnings.push(format!(
                        "image {image} ({digest}) is no longer in the store: its signatures and advisories were not checked"
                    ));
                    continue;
                }
            };
            let mut details: Vec<(FindingKind, String)> = Vec::new();
            if let Some(trust) = &env.trust {
                if let Err(e) = kiln_image::sign::verify_signature(self.store, &rec, &trust.signers)
                {
                    details.push((FindingKind::Untrusted, format!("{image}: {e}")));
                }
            }
            if let Some(adv) = &advisories {
                let policy = kiln_image::scan::policy_for(self.project, &rec.name);
                match kiln_image::scan::scan_version(self.store, &rec, adv, &policy) {
                    Ok(report) if report.fails() => {
                        for f in report.blocking() {
                            details.push((
                                FindingKind::Vulnerable,
                                format!(
                                    "{image}: {} ({}) in {} {}, fixed in {}",
                                    f.id,
                                    f.severity.as_str(),
                                    f.package,
                                    f.installed,
                                    f.fixed.as_deref().unwrap_or("no version yet")
                                ),
                            ));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warnings.push(format!(
                        "image {image} not scanned: {}",
                        kiln_model::error_chain(&e)
                    )),
                }
            }
            for s in &on {
                for (kind, detail) in &details {
                    found.push(&s.id, *kind, Some(&s.role), detail.clone());
                }
            }
        }
    }

    /// Balancers that are down while their role serves, and backends nobody declared.
    fn drift_fronts(&self, env: &EnvSpec, servers: &[Server], found: &mut Findings) {
        let fronts = fronts(env.roles.values());
        for (role, _) in &fronts {
            let serving = servers
                .iter()
                .any(|s| &s.role == role && s.status == ServerStatus::Running);
            let state = self.provider.balancer(&env.name, role);
            for name in state.iter().flat_map(|b| &b.behind) {
                let detail = format!("the balancer `{name}` of role `{role}` serves another backend set than kiln last switched to (it was away): reconcile brings it up to date");
                found.push(
                    &format!("balancer:{role}"),
                    FindingKind::Config,
                    Some(role),
                    detail,
                );
            }
            let alive = state.is_some_and(|b| b.alive);
            if serving && !alive {
                let detail = format!("the balancer of role `{role}` is not running: its front is down (reconcile restarts it)");
                found.push(
                    &format!("balancer:{role}"),
                    FindingKind::Config,
                    Some(role),
                    detail,
                );
            }
        }
        for (role, addr) in self.unknown_backends(&env.name, servers, &fronts) {
            let detail = format!("balancer of `{}` role `{role}` routes to it, but no running server of the state has this address", env.name);
            found.push(&addr, FindingKind::Unmanaged, Some(&role), detail);
        }
    }

    /// Files of every live server against its image's seal, each image
    /// version verified once. Returns the versions verified.
    fn drift_files(
        &self,
        servers: &[Server],
        alive: &BTreeSet<&str>,
        full: bool,
        found: &mut Findings,
    ) -> Vec<String> {
        let mut by_image: BTreeMap<ImageRef, Vec<&Server>> = BTreeMap::new();
        for s in servers.iter().filter(|s| alive.contains(s.id.as_str())) {
            let (name, version) = s.image.rsplit_once('@').unwrap_or((&s.image, "0"));
            let image = ImageRef {
                name: name.to_string(),
                version: version.parse().unwrap_or(0),
                digest: s.image_digest.clone(),
            };
            by_image.entry(image).or_default().push(s);
        }
        let mut verified = Vec::new();
        for (image, on) in &by_image {
            match self.provider.verify_files(image, on, full) {
                Ok(check) => {
                    verified.push(image.to_string());
                    for s in on {
                        for d in check.differences.get(&s.id).into_iter().flatten() {
                            let path = d.split_whitespace().find(|w| w.starts_with('/'));
                            found.at(s, FindingKind::Files, path.unwrap_or(""), d.clone());
                        }
                    }
                }
                Err(e) => {
                    for s in on {
                        let detail = format!("image {image} cannot be verified: {e}");
                        found.push(&s.id, FindingKind::Files, Some(&s.role), detail);
                    }
                }
            }
        }
        verified
    }

    /// What the provider sees inside one live server.
    fn drift_server(&self, s: &Server, role: &RoleSpec, found: &mut Findings) {
        use FindingKind::*;
        let seen = self.provider.inspect(s, &role.volumes);
        for p in &seen.foreign_processes {
            let detail =
                format!("process not started by the entrypoint (an interactive login?): {p}");
            found.push(&s.id, Process, Some(&s.role), detail);
        }
        for session in &seen.sessions {
            let detail = format!("interactive session into the server: {session}");
            found.push(&s.id, Process, Some(&s.role), detail);
        }
        for w in &seen.written {
            let watched = role.watch.iter().find(|p| under(&w.path, p));
            let what = if w.setid {
                "new setuid/setgid file"
            } else if w.executable {
                "new executable"
            } else if watched.is_some() {
                "file written under a watched path"
            } else {
                continue;
            };
            found.at(s, Writable, &w.path, format!("{what} {}", w.path));
        }
        if seen.replaced_root {
            let detail = format!(
                "runs a root of {} that was replaced after tampering; it must be replaced",
                s.image
            );
            found.push(&s.id, Files, Some(&s.role), detail);
        }
        if let Some(label) = &seen.image_digest {
            if label != &s.image_digest {
                let detail = format!("runs image {label}, its release says {}", s.image_digest);
                found.push(&s.id, Config, Some(&s.role), detail);
            }
        }
        // Whatever listens must be declared: a port nobody declared is a
        // changed server (a debug listener, a bind shell).
        let declared = declared_ports(role);
        for port in seen.listening.iter().filter(|p| !declared.contains(p)) {
            let detail = format!(
                "listens on TCP port {port}, which the role does not declare (ports = {:?})",
                role.ports
            );
            found.push(&s.id, Config, Some(&s.role), detail);
        }
        if let Some(limit) = seen.memory_limit {
            if limit != role.size.memory_bytes {
                let detail = format!(
                    "memory limit {limit} bytes, declared {}",
                    role.size.memory_bytes
                );
                found.push(&s.id, Config, Some(&s.role), detail);
            }
        }
        for setting in &seen.settings {
            found.push(&s.id, Config, Some(&s.role), setting.clone());
        }
    }
}

/// Whether `path` is `dir` or below it.
fn under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn age_text(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    if d > 0 && h > 0 {
        format!("{d}d{h}h")
    } else if d > 0 {
        format!("{d}d")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else {
        format!("{secs}s")
    }
}
