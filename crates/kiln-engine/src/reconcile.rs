//! Reconcile: one pass of keeping an environment honest. It checks drift,
//! raises alarms, and turns findings into replacements through the same
//! plan-and-apply path as everything else: crashed or vanished servers are
//! recreated (self-healing), hung ones replaced, servers past their TTL
//! rotated (phoenix), servers on stale images replaced, and drifted servers
//! replaced or quarantined and replaced according to the role's `drift`
//! policy. No more than the role's `replace_share` is replaced for drift,
//! TTL or hangs at once. A role's balancer that died is restarted.

use std::collections::BTreeMap;

use kiln_model::{DriftPolicy, EnvSpec, Plan, PlanKind, Server, ServerStatus, UnmanagedPolicy};
use serde::Serialize;

use crate::drift::{Finding, FindingKind, Report};
use crate::{Engine, Result};

/// What one reconcile pass found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Pass {
    pub report: Report,
    /// Servers replaced on purpose, with why.
    pub forced: BTreeMap<String, String>,
    /// Servers quarantined (`drift = "kill"`): their evidence is kept by the
    /// provider before they are replaced.
    pub quarantined: Vec<String>,
    pub plan: Plan,
    /// The release made, unless it was a dry run or there was nothing to do.
    pub release: Option<i64>,
    /// Roles whose balancer was not running and was (or, in a dry run,
    /// would be) restarted.
    pub balancers_restarted: Vec<String>,
}

/// How many servers of each role one pass may replace.
fn budgets(env: &EnvSpec) -> BTreeMap<String, usize> {
    env.roles
        .values()
        .map(|r| {
            let share = (r.servers as usize * r.replace_share as usize)
                .div_ceil(100)
                .max(1);
            (r.name.clone(), share)
        })
        .collect()
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
        self.alarm_findings(env_name, &report);
        // Drift is read-only: the state and the runtime are as it saw them.
        let (servers, dead) = self.observe(env_name)?;
        let mut budget = budgets(env);
        let mut forced: BTreeMap<String, String> = BTreeMap::new();
        let mut quarantine: Vec<(Server, Vec<Finding>)> = Vec::new();
        let mut spend = |s: &Server, why: String, forced: &mut BTreeMap<String, String>| {
            let left = budget.entry(s.role.clone()).or_default();
            if *left > 0 {
                *left -= 1;
                forced.insert(s.id.clone(), why);
                true
            } else {
                false
            }
        };
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
            let drifted = mine.iter().find(|f| f.kind.is_tampering());
            let expired = mine.iter().find(|f| f.kind == FindingKind::Expired);
            let reason = match (drifted, role.drift, expired) {
                (Some(f), DriftPolicy::Replace, _) => {
                    Some((format!("drift ({}: {})", f.kind, f.detail), false))
                }
                (Some(f), DriftPolicy::Kill, _) => Some((
                    format!("quarantined for drift ({}: {})", f.kind, f.detail),
                    true,
                )),
                (_, _, Some(f)) => Some((format!("phoenix: past its ttl ({})", f.detail), false)),
                _ => None,
            };
            if let Some((why, kill)) = reason {
                if spend(s, why, &mut forced) && kill {
                    quarantine.push((s.clone(), mine));
                }
            }
        }
        // Self-healing beyond crashes: a live server that fails its health
        // check on every probe of a short series (hung, wedged, serving
        // errors) is replaced, within the same share as drift and TTL.
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
            if self.persistently_unhealthy(s, check) {
                let over = self.options.heal_spacing * self.options.heal_probes.saturating_sub(1);
                let why = format!(
                    "self-heal: failed {} health checks in a row over {:.1}s",
                    self.options.heal_probes,
                    over.as_secs_f64()
                );
                spend(s, why, &mut forced);
            }
        }
        let targets = self.targets(env)?;
        let plan = self.plan_targets(
            env_name,
            targets.clone(),
            PlanKind::Reconcile,
            &forced,
            random,
        )?;
        let dead_fronts = self.dead_fronts(env, &servers);
        let mut pass = Pass {
            report,
            forced,
            quarantined: quarantine.iter().map(|q| q.0.id.clone()).collect(),
            plan,
            release: None,
            balancers_restarted: dead_fronts.clone(),
        };
        if dry_run {
            return Ok(pass);
        }
        if !dead_fronts.is_empty() {
            self.restart_fronts(env, &dead_fronts)?;
        }
        self.expire_quarantine(env_name)?;
        // Backends nobody declared go where the role's policy says `kill`
        // (strays are destroyed by the plan itself).
        let rogue = self
            .unknown_backends(
                env_name,
                &servers,
                &crate::drift::fronts(env.roles.values()),
            )
            .into_iter()
            .any(|(role, _)| crate::unmanaged_policy(env, &role) == UnmanagedPolicy::Kill);
        if pass.plan.is_empty() {
            if rogue {
                let _lock = self.lock(env_name, PlanKind::Reconcile.as_str())?;
                let done = self.converge_runtime(env_name, &targets)?;
                let outcome = format!("removed unmanaged: {}", done.join("; "));
                self.audit(env_name, PlanKind::Reconcile.as_str(), "-", &outcome)?;
            }
            return Ok(pass);
        }
        for (s, findings) in &quarantine {
            self.quarantine(env, s, findings)?;
        }
        match self.apply_or_roll_back(&pass.plan, random) {
            Ok(a) => pass.release = Some(a.release),
            Err(e) => {
                let detail = serde_json::json!({ "error": e.to_string() });
                self.alarm(env_name, "self_heal_failed", detail);
                return Err(e);
            }
        }
        Ok(pass)
    }

    fn alarm_findings(&self, env: &str, report: &Report) {
        if report.findings.is_empty() {
            return;
        }
        let unmanaged: Vec<&Finding> = report
            .findings
            .iter()
            .filter(|f| f.kind == FindingKind::Unmanaged)
            .collect();
        if !unmanaged.is_empty() {
            let detail = serde_json::to_value(&unmanaged).unwrap_or_default();
            self.alarm(env, "unmanaged", detail);
        }
        let detail = serde_json::to_value(&report.findings).unwrap_or_default();
        self.alarm(env, "drift", detail);
    }

    /// Roles with a balancer and running servers whose balancer is not
    /// running, or (in part) serves another set than the last switch.
    fn dead_fronts(&self, env: &EnvSpec, servers: &[Server]) -> Vec<String> {
        env.roles
            .values()
            .filter(|r| {
                r.balancer.is_some()
                    && servers
                        .iter()
                        .any(|s| s.role == r.name && s.status == ServerStatus::Running)
            })
            .filter(|r| {
                !self
                    .provider
                    .balancer(&env.name, &r.name)
                    .is_some_and(|b| b.alive && b.behind.is_empty())
            })
            .map(|r| r.name.clone())
            .collect()
    }

    /// A role's balancer is part of the fleet: one that died (OOM, a kill,
    /// a reboot) is restarted with the live servers behind it; one that
    /// missed a switch gets the live servers.
    fn restart_fronts(&self, env: &EnvSpec, roles: &[String]) -> Result<()> {
        let _lock = self.lock(&env.name, PlanKind::Reconcile.as_str())?;
        for role in roles {
            let behind = self
                .provider
                .balancer(&env.name, role)
                .filter(|b| b.alive)
                .map(|b| b.behind)
                .unwrap_or_default();
            let b = env.roles.get(role).and_then(|r| r.balancer.as_ref());
            self.rebalance(&env.name, role, b, &[])?;
            let detail = if behind.is_empty() {
                format!("restarted the balancer of `{role}` (it was not running)")
            } else {
                format!(
                    "brought the balancer of `{role}` up to date ({} served an older backend set)",
                    behind.join(", ")
                )
            };
            self.state
                .record_event(&env.name, &kiln_state::actor(), "self-heal", &detail)?;
            self.audit(&env.name, PlanKind::Reconcile.as_str(), "-", &detail)?;
            let detail = serde_json::json!({ "role": role });
            self.alarm(&env.name, "balancer_restarted", detail);
        }
        Ok(())
    }

    /// Whether a running server fails each of `heal_probes` health checks.
    /// One pass stops it from counting: a slow moment is not a failure.
    fn persistently_unhealthy(&self, s: &Server, check: &kiln_model::HealthCheck) -> bool {
        for i in 0..self.options.heal_probes.max(1) {
            if i > 0 {
                std::thread::sleep(self.options.heal_spacing);
            }
            if self.provider.probe(s, check) {
                return false;
            }
        }
        true
    }

    /// Deletes quarantine evidence older than the environment's keep time.
    fn expire_quarantine(&self, env: &str) -> Result<()> {
        let keep = self.env(env)?.quarantine_secs as i64;
        let before = (self.clock)().saturating_sub(keep);
        for id in self.provider.expire_quarantine(env, before)? {
            let detail = format!("deleted the evidence of {id}");
            self.state
                .record_event(env, &kiln_state::actor(), "quarantine expired", &detail)?;
        }
        Ok(())
    }

    /// Keeps a drifted server's evidence before it is replaced: its
    /// findings, its log, and a copy of what its writable areas hold.
    fn quarantine(&self, env: &EnvSpec, s: &Server, findings: &[Finding]) -> Result<()> {
        let record = serde_json::json!({
            "server": s.id,
            "quarantined_at": (self.clock)(),
            "findings": findings,
        });
        let volumes = env
            .roles
            .get(&s.role)
            .map(|r| r.volumes.clone())
            .unwrap_or_default();
        let kept = self.provider.quarantine(s, &volumes, &record.to_string())?;
        let detail = format!("server {} quarantined; evidence in {kept}", s.id);
        self.state
            .record_event(&env.name, &kiln_state::actor(), "quarantine", &detail)?;
        self.audit(&env.name, "quarantine", "-", &format!("server {}", s.id))?;
        Ok(())
    }
}
