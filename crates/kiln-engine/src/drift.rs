//! Drift: everything about an environment that differs from what was
//! declared and applied. Files against the image seal (each image version
//! verified once, not once per server), writable areas, processes that do
//! not descend from the entrypoint, running config, stale images, servers
//! past their TTL, and servers nobody declared. Findings matching an entry
//! of the project's `.kilnignore` are silenced.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use kiln_model::ServerStatus;
use serde::Serialize;

use crate::{Engine, Result};

/// One thing that differs. `kind` is one of: files, writable, process,
/// config, stale, expired, unmanaged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub server: String,
    pub kind: String,
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
        out.push_str(&format!("    {:<9} {}\n", f.kind, f.detail));
    }
    out
}

/// One `.kilnignore` line: `KIND SERVER PATH [until=YYYY-MM-DD] # reason`,
/// each of KIND, SERVER and PATH a value or `*` (PATH matches as a prefix
/// of the finding's detail path).
#[derive(Debug, Clone)]
struct Ignore {
    kind: String,
    server: String,
    path: String,
    until: Option<i64>,
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
            let until = f
                .find_map(|w| w.strip_prefix("until="))
                .and_then(chrono_day);
            Some(Ignore {
                kind: kind.into(),
                server: server.into(),
                path: path.into(),
                until,
            })
        })
        .filter(|i| i.until.is_none_or(|u| u > now))
        .collect()
}

/// `YYYY-MM-DD` → epoch seconds (UTC midnight), by the civil-from-days algorithm.
fn chrono_day(s: &str) -> Option<i64> {
    let mut p = s.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, d) = (p.next()??, p.next()??, p.next()??);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400)
}

impl Ignore {
    fn matches(&self, f: &Finding) -> bool {
        let path = f
            .detail
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .unwrap_or("");
        (self.kind == "*" || self.kind == f.kind)
            && (self.server == "*" || self.server == f.server)
            && (self.path == "*" || path.starts_with(&self.path))
    }
}

impl Engine<'_> {
    /// Backends a role's balancer routes to that are no running server of
    /// that role in the state: (role, address:port). A hand-edited
    /// balancer, or one left behind by a crash.
    pub fn unknown_backends(
        &self,
        env_name: &str,
        servers: &[kiln_model::Server],
    ) -> Result<Vec<(String, String)>> {
        let env = self.env(env_name)?;
        let mut out = Vec::new();
        for role in env.roles.values() {
            let Some(b) = &role.balancer else { continue };
            let known: BTreeSet<String> = servers
                .iter()
                .filter(|s| s.role == role.name && s.status == ServerStatus::Running)
                .map(|s| format!("{}:{}", s.address, b.port))
                .collect();
            for addr in self.provider.balancer_backends(env_name, &role.name) {
                if !known.contains(&addr) {
                    out.push((role.name.clone(), addr));
                }
            }
        }
        Ok(out)
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
        let mut findings = Vec::new();
        let mut push = |server: &str, kind: &str, detail: String| {
            findings.push(Finding {
                server: server.into(),
                kind: kind.into(),
                detail,
            })
        };

        for r in running.iter().filter(|r| !known.contains(r.id.as_str())) {
            push(
                &r.id,
                "unmanaged",
                format!(
                    "sandbox labelled `{env_name}` (role `{}`) that the state does not know",
                    r.role
                ),
            );
        }
        for s in servers.iter().filter(|s| {
            matches!(s.status, ServerStatus::Running | ServerStatus::Standby)
                && !alive.contains(s.id.as_str())
        }) {
            push(
                &s.id,
                "unmanaged",
                "in the state, but its process is gone".into(),
            );
        }
        for role in env.roles.values().filter(|r| r.balancer.is_some()) {
            let serving = servers
                .iter()
                .any(|s| s.role == role.name && s.status == ServerStatus::Running);
            if serving && !self.provider.balancer_alive(env_name, &role.name) {
                push(&format!("balancer:{}", role.name), "config", format!("the balancer of role `{}` is not running: its front is down (reconcile restarts it)", role.name));
            }
        }
        for (role, addr) in self.unknown_backends(env_name, &servers)? {
            push(&addr, "unmanaged", format!("balancer of `{env_name}` role `{role}` routes to it, but no running server of the state has this address"));
        }

        // Files: each image version verified once, findings on every server running it.
        let mut verified = Vec::new();
        let mut by_image: BTreeMap<&str, Vec<&kiln_model::Server>> = BTreeMap::new();
        for s in servers.iter().filter(|s| alive.contains(s.id.as_str())) {
            by_image.entry(s.image.as_str()).or_default().push(s);
        }
        for (image, on) in &by_image {
            match kiln_image::ops::verify_with(self.store, image, full, false) {
                Ok(v) => {
                    verified.push(image.to_string());
                    for s in on {
                        for d in &v.differences {
                            push(
                                &s.id,
                                "files",
                                d.to_string()
                                    .split_whitespace()
                                    .collect::<Vec<_>>()
                                    .join(" "),
                            );
                        }
                        for b in &v.corrupt_blobs {
                            push(&s.id, "files", format!("image blob {b} is corrupt"));
                        }
                    }
                }
                Err(e) => {
                    for s in on {
                        push(
                            &s.id,
                            "files",
                            format!("image {image} cannot be verified: {e}"),
                        );
                    }
                }
            }
        }

        let targets = self.targets(env).unwrap_or_default();
        for s in servers.iter().filter(|s| alive.contains(s.id.as_str())) {
            let Some(role) = env.roles.get(&s.role) else {
                push(
                    &s.id,
                    "unmanaged",
                    format!("role `{}` is no longer declared", s.role),
                );
                continue;
            };
            let volumes: Vec<(String, std::path::PathBuf)> = role
                .volumes
                .iter()
                .map(|v| {
                    (
                        v.path.clone(),
                        self.store
                            .root()
                            .join("volumes")
                            .join(env_name)
                            .join(format!("{}-{}", s.role, s.slot))
                            .join(&v.name),
                    )
                })
                .collect();
            let seen = self.provider.inspect(env_name, &s.id, &volumes);
            for p in &seen.foreign_processes {
                push(
                    &s.id,
                    "process",
                    format!("process not started by the entrypoint (an interactive login?): {p}"),
                );
            }
            for (path, exec) in &seen.writable {
                if *exec {
                    push(&s.id, "writable", format!("new executable {path}"));
                } else if !role.volumes.iter().any(|v| path.starts_with(&v.path)) {
                    push(&s.id, "writable", format!("new file {path}"));
                }
            }
            if let (Some(running), Ok(rec)) = (
                seen.root_inode,
                kiln_image::ops::resolve(self.store, &s.image),
            ) {
                use std::os::unix::fs::MetadataExt;
                if let Ok(m) = std::fs::metadata(self.store.root_path(&rec.digest)) {
                    if (m.dev(), m.ino()) != running {
                        push(&s.id, "files", format!("runs a root of {} that was replaced after tampering; it must be replaced", s.image));
                    }
                }
            }
            if let Some(label) = &seen.image_label {
                if label != &s.image_digest {
                    push(
                        &s.id,
                        "config",
                        format!("runs image {label}, its release says {}", s.image_digest),
                    );
                }
            }
            // Whatever listens must be declared: a port nobody declared is a
            // changed server (a debug listener, a bind shell).
            let mut declared: BTreeSet<u16> = role.ports.iter().copied().collect();
            declared.extend(role.balancer.as_ref().map(|b| b.port));
            declared.extend(role.health.as_ref().and_then(|h| match h {
                kiln_model::HealthCheck::Http { port, .. }
                | kiln_model::HealthCheck::Tcp { port } => Some(*port),
                kiln_model::HealthCheck::Command { .. } => None,
            }));
            for port in seen.listening.iter().filter(|p| !declared.contains(p)) {
                push(&s.id, "config", format!("listens on TCP port {port}, which the role does not declare (ports = {:?})", role.ports));
            }
            if let Some(limit) = seen.memory_limit {
                if limit != role.size.memory_bytes {
                    push(
                        &s.id,
                        "config",
                        format!(
                            "memory limit {limit} bytes, declared {}",
                            role.size.memory_bytes
                        ),
                    );
                }
            }
            if s.status == ServerStatus::Running {
                if let Some(t) = targets.iter().find(|t| t.role == s.role) {
                    if t.image_digest != s.image_digest {
                        push(
                            &s.id,
                            "stale",
                            format!("runs {}, the role's current image is {}", s.image, t.image),
                        );
                    } else if t.spec_hash != s.spec_hash {
                        push(
                            &s.id,
                            "config",
                            "created with a different role spec (size, ports, volumes or env)"
                                .into(),
                        );
                    }
                }
                if let Some(ttl) = role.ttl_secs {
                    let age = (now - s.created).max(0) as u64;
                    if age > ttl {
                        push(
                            &s.id,
                            "expired",
                            format!("{} old, ttl {}", kiln_spec_fmt(age), kiln_spec_fmt(ttl)),
                        );
                    }
                }
            }
        }
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
        })
    }
}

fn kiln_spec_fmt(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!(
            "{d}d{}",
            if h > 0 {
                format!("{h}h")
            } else {
                String::new()
            }
        )
    } else if h > 0 {
        format!("{h}h{m}m")
    } else {
        format!("{}s", secs)
    }
}
