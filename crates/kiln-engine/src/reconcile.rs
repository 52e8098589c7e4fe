//! Reconcile: one pass of keeping an environment honest. It checks drift,
//! raises alarms, and turns findings into replacements through the same
//! plan-and-apply path as everything else: crashed or vanished servers are
//! recreated (self-healing), servers past their TTL are rotated (phoenix),
//! servers on stale images are replaced, and drifted servers are replaced
//! or quarantined and replaced according to the role's `drift` policy. No
//! more than the role's `replace_share` is replaced for drift or TTL at once.

use std::collections::BTreeMap;

use kiln_model::{DriftPolicy, Plan, ServerStatus, UnmanagedPolicy};
use kiln_provider::ServerRequest;
use serde::Serialize;

use crate::drift::{Finding, Report};
use crate::{Applied, Engine, Result};

/// What one reconcile pass found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Pass {
    pub report: Report,
    /// Servers replaced on purpose, with why.
    pub forced: BTreeMap<String, String>,
    /// Servers quarantined (`drift = "kill"`): forensics kept under
    /// `.kiln/quarantine/<env>/<server>/`.
    pub quarantined: Vec<String>,
    pub plan: Plan,
    /// The release made, unless it was a dry run or there was nothing to do.
    pub release: Option<i64>,
    /// Roles whose balancer was not running and was (or, in a dry run,
    /// would be) restarted.
    pub balancers_restarted: Vec<String>,
}

impl Engine<'_> {
    pub fn reconcile(
        &self,
        env_name: &str,
        dry_run: bool,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Pass> {
        let env = self.env(env_name)?;
        let report = self.drift(env_name, false)?;
        if !report.findings.is_empty() {
            let unmanaged: Vec<&Finding> = report
                .findings
                .iter()
                .filter(|f| f.kind == "unmanaged")
                .collect();
            if !unmanaged.is_empty() {
                self.alarm(
                    env_name,
                    "unmanaged",
                    serde_json::to_value(&unmanaged).unwrap_or_default(),
                );
            }
            self.alarm(
                env_name,
                "drift",
                serde_json::to_value(&report.findings).unwrap_or_default(),
            );
        }
        // Drift is read-only: the state and the runtime are as it saw them.
        let (servers, dead) = self.observe(env_name)?;
        let mut forced: BTreeMap<String, String> = BTreeMap::new();
        let mut quarantine: Vec<(String, Vec<Finding>)> = Vec::new();
        let mut budget: BTreeMap<String, usize> = env
            .roles
            .values()
            .map(|r| {
                (
                    r.name.clone(),
                    (r.servers as usize * r.replace_share as usize)
                        .div_ceil(100)
                        .max(1),
                )
            })
            .collect();
        for s in servers.iter().filter(|s| s.status == ServerStatus::Running) {
            let Some(role) = env.roles.get(&s.role) else {
                continue;
            };
            let mine: Vec<Finding> = report
                .findings
                .iter()
                .filter(|f| f.server == s.id)
                .cloned()
                .collect();
            let drifted: Vec<&Finding> = mine
                .iter()
                .filter(|f| {
                    matches!(f.kind.as_str(), "files" | "process" | "config")
                        || (f.kind == "writable" && f.detail.contains("executable"))
                })
                .collect();
            let expired = mine.iter().find(|f| f.kind == "expired");
            let reason = match (drifted.first(), role.drift, expired) {
                (Some(f), DriftPolicy::Replace, _) => {
                    Some(format!("drift ({}: {})", f.kind, f.detail))
                }
                (Some(f), DriftPolicy::Kill, _) => {
                    quarantine.push((s.id.clone(), mine.clone()));
                    Some(format!("quarantined for drift ({}: {})", f.kind, f.detail))
                }
                (_, _, Some(f)) => Some(format!("phoenix: past its ttl ({})", f.detail)),
                _ => None,
            };
            if let Some(reason) = reason {
                let left = budget.entry(s.role.clone()).or_default();
                if *left > 0 {
                    *left -= 1;
                    forced.insert(s.id.clone(), reason);
                }
            }
        }
        // Self-healing beyond crashes: a live server that fails its health
        // check on every probe of a short series (hung, wedged, serving
        // errors) is replaced, within the same share as drift and TTL.
        // One request per role and image, patched per server: resolving the
        // image and reading its config once, not once per server.
        let mut templates: BTreeMap<(String, String), Option<ServerRequest>> = BTreeMap::new();
        for s in servers
            .iter()
            .filter(|s| s.status == ServerStatus::Running && !dead.contains(&s.id))
        {
            if forced.contains_key(&s.id) {
                continue;
            }
            let Some(check) = env.roles.get(&s.role).and_then(|r| r.health.as_ref()) else {
                continue;
            };
            let template = templates
                .entry((s.role.clone(), s.image.clone()))
                .or_insert_with(|| {
                    let mut c = kiln_model::Change::new(
                        kiln_model::Action::Create,
                        &s.role,
                        &s.id,
                        s.slot,
                        "health check",
                    );
                    c.image = Some(s.image.clone());
                    // An image no longer in the store cannot be probed with a
                    // command check; such a server is stale and handled as such.
                    self.request(env_name, &c, &s.id, s.release).ok()
                });
            let Some(template) = template else { continue };
            let req = ServerRequest {
                id: s.id.clone(),
                address: s.address.clone(),
                slot: s.slot,
                release: s.release,
                ..template.clone()
            };
            if self.persistently_unhealthy(&req, check) {
                let left = budget.entry(s.role.clone()).or_default();
                if *left > 0 {
                    *left -= 1;
                    let over =
                        self.options.heal_spacing * self.options.heal_probes.saturating_sub(1);
                    forced.insert(
                        s.id.clone(),
                        format!(
                            "self-heal: failed {} health checks in a row over {:.1}s",
                            self.options.heal_probes,
                            over.as_secs_f64()
                        ),
                    );
                }
            }
        }
        quarantine.retain(|(id, _)| forced.contains_key(id));
        let targets = self.targets(env)?;
        let generation = self.state.generation(env_name)?;
        let taken = self.taken_ids()?;
        let input = kiln_planner::Input {
            env,
            targets: &targets,
            observed: &servers,
            dead: &dead,
            generation,
            now: (self.clock)(),
            cold: false,
            force: &forced,
            taken: &taken,
        };
        let plan = kiln_planner::plan(&input, random)?;
        // A role's balancer is part of the fleet: one that died (OOM, a
        // kill, a reboot) is restarted with the live servers behind it.
        let dead_fronts: Vec<String> = env
            .roles
            .values()
            .filter(|r| {
                r.balancer.is_some()
                    && servers
                        .iter()
                        .any(|s| s.role == r.name && s.status == ServerStatus::Running)
            })
            .filter(|r| !self.provider.balancer_alive(env_name, &r.name))
            .map(|r| r.name.clone())
            .collect();
        let mut pass = Pass {
            report,
            forced,
            quarantined: quarantine.iter().map(|q| q.0.clone()).collect(),
            plan,
            release: None,
            balancers_restarted: dead_fronts.clone(),
        };
        if !dry_run && !dead_fronts.is_empty() {
            let _lock = self.state.lock(env_name, "reconcile")?;
            for role in &dead_fronts {
                self.rebalance(env_name, role, None)?;
                let detail = format!("restarted the balancer of `{role}` (it was not running)");
                self.state
                    .record_event(env_name, &kiln_state::actor(), "self-heal", &detail)?;
                self.audit(env_name, "reconcile", "-", &detail)?;
                self.alarm(
                    env_name,
                    "balancer_restarted",
                    serde_json::json!({ "role": role }),
                );
            }
        }
        // Strays go when their role's policy says `kill`; state entries
        // whose process is gone are handled by the plan (recreated).
        let kill_strays = pass.report.findings.iter().any(|f| {
            f.kind == "unmanaged" && !servers.iter().any(|s| s.id == f.server) && {
                let role = f.detail.split('`').nth(3).unwrap_or("");
                env.roles.get(role).map(|r| r.unmanaged).unwrap_or_else(|| {
                    env.roles
                        .values()
                        .next()
                        .map(|r| r.unmanaged)
                        .unwrap_or(UnmanagedPolicy::Alarm)
                }) == UnmanagedPolicy::Kill
            }
        });
        if !dry_run {
            self.expire_quarantine(env_name)?;
        }
        if dry_run || (pass.plan.is_empty() && !kill_strays) {
            return Ok(pass);
        }
        if pass.plan.is_empty() {
            let _lock = self.state.lock(env_name, "reconcile")?;
            let done = self.converge_runtime(env_name)?;
            self.audit(
                env_name,
                "reconcile",
                "-",
                &format!("removed unmanaged: {}", done.join("; ")),
            )?;
            return Ok(pass);
        }
        for (id, findings) in &quarantine {
            self.quarantine(env_name, id, findings)?;
        }
        let applied: Result<Applied> = self.apply_or_roll_back(&pass.plan, "reconcile", random);
        match applied {
            Ok(a) => pass.release = Some(a.release),
            Err(e) => {
                self.alarm(
                    env_name,
                    "self_heal_failed",
                    serde_json::json!({ "error": e.to_string() }),
                );
                return Err(e);
            }
        }
        Ok(pass)
    }

    /// Whether a running server fails each of `heal_probes` health checks.
    /// One pass stops it from counting: a slow moment is not a failure.
    fn persistently_unhealthy(&self, req: &ServerRequest, check: &kiln_model::HealthCheck) -> bool {
        for i in 0..self.options.heal_probes.max(1) {
            if i > 0 {
                std::thread::sleep(self.options.heal_spacing);
            }
            if self.provider.probe(req, check) {
                return false;
            }
        }
        true
    }

    /// Deletes quarantine records older than the environment's `quarantine` keep time.
    fn expire_quarantine(&self, env: &str) -> Result<()> {
        let keep = self.env(env)?.quarantine_secs;
        let dir = self.store.root().join("quarantine").join(env);
        let now = (self.clock)();
        for item in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let at = std::fs::read(item.path().join("findings.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["quarantined_at"].as_i64());
            if at.is_some_and(|t| now - t > keep as i64) {
                let _ = std::fs::remove_dir_all(item.path());
                self.state.record_event(
                    env,
                    &kiln_state::actor(),
                    "quarantine expired",
                    &format!(
                        "deleted the evidence of {}",
                        item.file_name().to_string_lossy()
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// Keeps a drifted server's evidence before it is replaced: its
    /// findings, its log, and a copy of what its writable areas hold.
    fn quarantine(&self, env: &str, id: &str, findings: &[Finding]) -> Result<()> {
        let dir = self.store.root().join("quarantine").join(env).join(id);
        let _ = std::fs::create_dir_all(&dir);
        let record = serde_json::json!({ "server": id, "quarantined_at": (self.clock)(), "findings": findings });
        let _ = std::fs::write(
            dir.join("findings.json"),
            serde_json::to_vec_pretty(&record).unwrap_or_default(),
        );
        let _ = std::fs::copy(self.provider.log_path(env, id), dir.join("server.log"));
        if let Some(pid) = self.state.server(id)?.and_then(|s| s.pid) {
            for area in ["tmp", "run"] {
                let _ = std::process::Command::new("cp")
                    .arg("-a")
                    .arg(format!("/proc/{pid}/root/{area}"))
                    .arg(dir.join(area))
                    .status();
            }
        }
        self.state.record_event(
            env,
            &kiln_state::actor(),
            "quarantine",
            &format!("server {id} quarantined; evidence in {}", dir.display()),
        )?;
        self.audit(env, "quarantine", "-", &format!("server {id}"))?;
        Ok(())
    }
}
