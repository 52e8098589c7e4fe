//! The engine: turns a project and an environment into a plan (through the
//! pure planner, with the clock and randomness it is handed), and carries a
//! plan out exactly, step by step, through a [`Provider`].
//!
//! Invariants:
//! - the engine executes the plan's changes in order and decides nothing
//!   the plan did not (ids, slots, addresses, order are the plan's);
//! - every write takes the environment's lock and checks the plan's
//!   generation first: a stale plan is refused, nothing half-done;
//! - a server row is written before its sandbox exists (`creating`) and
//!   marked `destroying` before it is torn down; every step is journaled
//!   before and after. A crash therefore leaves rows that say what to
//!   finish, and [`Engine::converge_runtime`] (run before every apply)
//!   removes half-created servers, finishes destroys and kills strays, so
//!   a re-run converges with no orphan and no duplicate;
//! - an image whose unpacked root no longer matches its seal is refused
//!   before any server is launched from it.

pub mod drift;
pub mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kiln_image::Store;
use kiln_model::{
    Action, Change, EnvSpec, HealthCheck, Plan, Project, RoleTarget, Server, ServerStatus,
};
use kiln_planner::Input;
use kiln_provider::{Provider, ServerRequest};
use kiln_state::State;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The environment is not declared in `kiln.toml`.
    #[error("unknown environment `{0}`")]
    UnknownEnv(String),
    /// A role's image has no current version.
    #[error("role `{role}` runs image `{image}`, which has no current version; run `kiln image build {image}`")]
    NotBuilt { role: String, image: String },
    /// The plan was made against an older state of the environment.
    #[error("the plan is stale: it was made at generation {planned} of `{env}`, which is now at generation {current}; plan again")]
    Stale {
        env: String,
        planned: i64,
        current: i64,
    },
    /// The plan belongs to another environment.
    #[error("the plan is for environment `{plan}`, not `{env}`")]
    WrongEnv { plan: String, env: String },
    /// An image failed verification and cannot be launched.
    #[error("image {image} does not match its seal ({count} differences, first: {first}); rebuild it with `kiln image build`")]
    Tampered {
        image: String,
        count: usize,
        first: String,
    },
    /// A new server never passed its health check.
    #[error("server {server} ({role}) did not become healthy within {secs}s; the previous servers of `{role}` are still running. last log lines:\n{tail}")]
    Unhealthy {
        server: String,
        role: String,
        secs: u64,
        tail: String,
    },
    /// The canary gate failed.
    #[error("canary of `{role}` failed: {reason}")]
    CanaryFailed { role: String, reason: String },
    /// There is nothing to roll back to.
    #[error("cannot roll back `{env}`: {reason}")]
    NoRollback { env: String, reason: String },
    /// The environment requires approvals this plan does not have.
    #[error("`{env}` needs {required} approval(s) of the exact plan it applies, by someone other than its author; plan {hash} has {have}.\nSave a plan with `kiln plan {env} -o plan.json`, have it approved with `kiln approve {env} plan.json`, then run `kiln apply {env} plan.json`")]
    NotApproved {
        env: String,
        required: u32,
        have: usize,
        hash: String,
    },
    /// The author of a plan tried to approve it.
    #[error("{actor} made plan {hash}: someone else must approve it")]
    SelfApproval { actor: String, hash: String },
    /// The apply failed and the environment was returned to a previous release.
    #[error(
        "{cause}\nrolled back automatically to the images of release #{to} (as release #{release})"
    )]
    RolledBack {
        cause: Box<EngineError>,
        to: i64,
        release: i64,
    },
    #[error(transparent)]
    Plan(#[from] kiln_planner::PlanError),
    #[error(transparent)]
    State(#[from] kiln_state::StateError),
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    #[error(transparent)]
    Provider(#[from] kiln_provider::ProviderError),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// A plan's identity in the audit chain and for approvals: the first 16 hex
/// digits of the BLAKE3 hash of its JSON. Any edit to a saved plan changes it.
pub fn plan_hash(plan: &Plan) -> String {
    blake3::hash(&serde_json::to_vec(plan).expect("plan serializes")).to_hex()[..16].to_string()
}

/// What the engine reports while it works, for progress display.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Cleanup before applying: what was found and done.
    Converged { detail: String },
    /// Step `index` of `total` starts (batch `change.batch`).
    Step {
        index: usize,
        total: usize,
        change: Change,
    },
    /// A new server is up and its health is being checked.
    Waiting { server: String, address: String },
    /// A server passed its health check.
    Healthy {
        server: String,
        address: String,
        elapsed: Duration,
    },
    /// A server is gone.
    Destroyed { server: String },
    /// The apply failed; the environment goes back to release `to`.
    RollingBack { to: i64, reason: String },
    /// The balancer of these roles switched to the batch's new servers;
    /// `share` is, per role, (servers in the balancer on the plan's image,
    /// servers in the balancer).
    Switched {
        roles: Vec<String>,
        share: Vec<(String, usize, usize)>,
    },
    /// A server left the balancer and stays warm for `secs`.
    Standby { server: String, secs: u64 },
    /// Canary servers of `role` are watched for `secs`.
    Baking { role: String, secs: u64 },
}

/// Knobs of execution (not of the plan).
#[derive(Debug, Clone)]
pub struct Options {
    pub health_timeout: Duration,
    pub health_interval: Duration,
    /// Reconcile replaces a live server that fails this many health checks
    /// in a row, `heal_spacing` apart ("persistently unhealthy").
    pub heal_probes: u32,
    pub heal_spacing: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            health_timeout: Duration::from_secs(30),
            health_interval: Duration::from_millis(10),
            heal_probes: 3,
            heal_spacing: Duration::from_secs(1),
        }
    }
}

pub struct Engine<'a> {
    pub project: &'a Project,
    pub store: &'a Store,
    pub state: &'a State,
    pub provider: &'a dyn Provider,
    pub progress: &'a dyn Fn(Progress),
    /// Seconds since the epoch; injected so tests control time.
    pub clock: &'a dyn Fn() -> i64,
    pub options: Options,
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub release: i64,
    pub changes: usize,
}

impl<'a> Engine<'a> {
    pub fn env(&self, name: &str) -> Result<&'a EnvSpec> {
        self.project
            .envs
            .get(name)
            .ok_or_else(|| EngineError::UnknownEnv(name.to_string()))
    }

    /// What each role should run, from the image store's current versions.
    pub fn targets(&self, env: &EnvSpec) -> Result<Vec<RoleTarget>> {
        env.roles
            .values()
            .map(|r| {
                let rec =
                    self.store
                        .current_record(&r.image)
                        .map_err(|_| EngineError::NotBuilt {
                            role: r.name.clone(),
                            image: r.image.clone(),
                        })?;
                Ok(RoleTarget {
                    role: r.name.clone(),
                    image: format!("{}@{}", rec.name, rec.version),
                    image_digest: rec.digest.0.clone(),
                    spec_hash: kiln_planner::spec_hash(r),
                    servers: r.servers,
                    cold: r.cold_only || !r.volumes.is_empty(),
                })
            })
            .collect()
    }

    /// Servers the state records for `env`, and which of them are not alive.
    pub fn observe(&self, env: &str) -> Result<(Vec<Server>, BTreeSet<String>)> {
        let servers = self.state.servers(Some(env))?;
        let alive: BTreeSet<String> = self
            .provider
            .inventory(env)?
            .into_iter()
            .filter(|r| r.alive)
            .map(|r| r.id)
            .collect();
        let dead = servers
            .iter()
            .filter(|s| !alive.contains(&s.id))
            .map(|s| s.id.clone())
            .collect();
        Ok((servers, dead))
    }

    /// Server ids new servers must not take: every server the state knows
    /// in any environment, and whatever the provider's host already uses.
    pub fn taken_ids(&self) -> Result<BTreeSet<String>> {
        let mut out = self.provider.taken_ids();
        out.extend(self.state.server_ids()?);
        Ok(out)
    }

    /// Plans `env`. `random` gives new server id suffixes.
    pub fn plan(
        &self,
        env_name: &str,
        cold: bool,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Plan> {
        let targets = self.targets(self.env(env_name)?)?;
        self.plan_targets(env_name, targets, cold, random)
    }

    /// Plans `env` towards the given role targets (a previous release's, for a rollback).
    pub fn plan_targets(
        &self,
        env_name: &str,
        targets: Vec<RoleTarget>,
        cold: bool,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Plan> {
        let env = self.env(env_name)?;
        let (observed, dead) = self.observe(env_name)?;
        let generation = self.state.generation(env_name)?;
        let taken = self.taken_ids()?;
        let input = Input {
            env,
            targets: &targets,
            observed: &observed,
            dead: &dead,
            generation,
            now: (self.clock)(),
            cold,
            force: &Default::default(),
            taken: &taken,
        };
        Ok(kiln_planner::plan(&input, random)?)
    }

    /// The role targets a past release applied, for rolling back to it:
    /// release `to`, or else the last successful release before the last
    /// successful one.
    pub fn rollback_targets(&self, env: &str, to: Option<i64>) -> Result<(i64, Vec<RoleTarget>)> {
        let releases = self.state.releases(env)?;
        let ok: Vec<&kiln_state::Release> = releases
            .iter()
            .filter(|r| r.outcome == "succeeded" && r.kind != "destroy")
            .collect();
        let pick = match to {
            Some(n) => releases
                .iter()
                .find(|r| r.id == n)
                .ok_or(EngineError::NoRollback {
                    env: env.into(),
                    reason: format!("there is no release #{n}"),
                })?,
            None => {
                let latest = ok.last().ok_or(EngineError::NoRollback {
                    env: env.into(),
                    reason: "no release succeeded yet".into(),
                })?;
                let before = ok.iter().rev().find(|r| r.roles_json != latest.roles_json);
                before.copied().ok_or(EngineError::NoRollback {
                    env: env.into(),
                    reason: "no earlier release runs different images".into(),
                })?
            }
        };
        let targets: Vec<RoleTarget> =
            serde_json::from_str(&pick.roles_json).map_err(|e| EngineError::NoRollback {
                env: env.into(),
                reason: format!("release #{} has unreadable targets: {e}", pick.id),
            })?;
        if targets.is_empty() {
            return Err(EngineError::NoRollback {
                env: env.into(),
                reason: format!("release #{} ran no servers", pick.id),
            });
        }
        // Roles declared since then keep their current target.
        let spec = self.env(env)?;
        let mut merged = self.targets(spec)?;
        for t in merged.iter_mut() {
            if let Some(old) = targets.iter().find(|o| o.role == t.role) {
                *t = RoleTarget {
                    servers: t.servers,
                    ..old.clone()
                };
            }
        }
        for t in &merged {
            if kiln_image::ops::resolve(self.store, &t.image).is_err() {
                return Err(EngineError::NoRollback {
                    env: env.into(),
                    reason: format!(
                        "image {} of release #{} is no longer in the store",
                        t.image, pick.id
                    ),
                });
            }
        }
        Ok((pick.id, merged))
    }

    /// Applies `plan`; if a step fails after the environment started
    /// changing, returns it by itself to the last release that succeeded
    /// (through the same zero-downtime path) and reports both.
    pub fn apply_or_roll_back(
        &self,
        plan: &Plan,
        kind: &str,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Applied> {
        let before = self
            .state
            .releases(&plan.env)?
            .into_iter()
            .rev()
            .find(|r| r.outcome == "succeeded" && r.kind != "destroy");
        match self.apply(plan, kind) {
            Ok(a) => Ok(a),
            Err(
                e @ (EngineError::Unhealthy { .. }
                | EngineError::CanaryFailed { .. }
                | EngineError::Provider(_)),
            ) => {
                let Some(prev) = before else { return Err(e) };
                let targets: Vec<RoleTarget> =
                    serde_json::from_str(&prev.roles_json).unwrap_or_default();
                if targets.is_empty() {
                    return Err(e);
                }
                (self.progress)(Progress::RollingBack {
                    to: prev.id,
                    reason: e.to_string().lines().next().unwrap_or("").to_string(),
                });
                let back = self.plan_targets(&plan.env, targets, false, random)?;
                if back.is_empty() {
                    // The failure came before anything changed.
                    return Err(e);
                }
                let applied = self.apply(&back, "rollback (automatic)")?;
                Err(EngineError::RolledBack {
                    cause: Box::new(e),
                    to: prev.id,
                    release: applied.release,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// A plan that destroys every server of `env`.
    pub fn plan_destroy(&self, env_name: &str) -> Result<Plan> {
        let (mut observed, _) = self.observe(env_name)?;
        let generation = self.state.generation(env_name)?;
        // Dependents go first: `app` before the `db` it depends on. Roles no
        // longer declared go before everything.
        let order = self
            .project
            .envs
            .get(env_name)
            .map(kiln_planner::role_order)
            .unwrap_or_default();
        let rank = |role: &str| order.iter().position(|r| r == role).unwrap_or(usize::MAX);
        observed.sort_by(|a, b| rank(&b.role).cmp(&rank(&a.role)).then(a.id.cmp(&b.id)));
        let changes = observed
            .iter()
            .enumerate()
            .map(|(i, s)| Change {
                batch: i as u32 + 1,
                ..Change::new(
                    Action::Destroy,
                    &s.role,
                    &s.id,
                    s.slot,
                    "environment destroyed",
                )
            })
            .collect();
        Ok(Plan {
            format: kiln_planner::PLAN_FORMAT,
            env: env_name.to_string(),
            generation,
            created: (self.clock)(),
            order: vec![],
            targets: vec![],
            changes,
            cold: false,
            destroy: true,
            author: String::new(),
        })
    }

    /// Brings the runtime and the state into agreement before an apply:
    /// finishes half-done creates and destroys from a crashed run, removes
    /// servers whose process died, and kills sandboxes labelled with this
    /// environment that the state does not know (strays). Caller holds the lock.
    pub fn converge_runtime(&self, env: &str) -> Result<Vec<String>> {
        let actor = kiln_state::actor();
        let mut done = Vec::new();
        let running = self.provider.inventory(env)?;
        let alive: BTreeSet<&str> = running
            .iter()
            .filter(|r| r.alive)
            .map(|r| r.id.as_str())
            .collect();
        let known: BTreeSet<String> = self
            .state
            .servers(Some(env))?
            .into_iter()
            .map(|s| s.id)
            .collect();
        for s in self.state.servers(Some(env))? {
            let why = match s.status {
                ServerStatus::Creating => Some("half-created by an interrupted apply"),
                ServerStatus::Destroying => Some("half-destroyed by an interrupted apply"),
                ServerStatus::Running | ServerStatus::Standby if !alive.contains(s.id.as_str()) => {
                    Some("its process is gone")
                }
                ServerStatus::Running | ServerStatus::Standby => None,
            };
            if let Some(why) = why {
                self.provider.destroy(env, &s.id)?;
                self.state.remove_server(&s.id)?;
                let detail = format!("removed server {} ({why})", s.id);
                self.state.record_event(env, &actor, "cleanup", &detail)?;
                (self.progress)(Progress::Converged {
                    detail: detail.clone(),
                });
                done.push(detail);
            }
        }
        // Whatever happened before, balancers route only to live servers.
        for (role, addr) in self.unknown_backends(env, &self.state.servers(Some(env))?)? {
            let detail = format!(
                "removed backend {addr} from the balancer of `{role}` (no server of the state)"
            );
            self.state.record_event(env, &actor, "cleanup", &detail)?;
            (self.progress)(Progress::Converged {
                detail: detail.clone(),
            });
            done.push(detail);
        }
        if let Ok(spec) = self.env(env) {
            for role in spec.roles.values().filter(|r| r.balancer.is_some()) {
                self.rebalance(env, &role.name, None)?;
            }
        }
        for r in running.iter().filter(|r| !known.contains(&r.id)) {
            self.provider.destroy(env, &r.id)?;
            let detail = format!(
                "removed stray server {} (labelled `{env}`, unknown to the state)",
                r.id
            );
            self.state.record_event(env, &actor, "cleanup", &detail)?;
            (self.progress)(Progress::Converged {
                detail: detail.clone(),
            });
            done.push(detail);
        }
        Ok(done)
    }

    /// Carries out `plan` exactly. `kind` names the release: `apply`,
    /// `deploy --cold`, `destroy`.
    pub fn apply(&self, plan: &Plan, kind: &str) -> Result<Applied> {
        let result = self.apply_inner(plan, kind);
        let outcome = match &result {
            Ok(_) => "succeeded".to_string(),
            Err(e) => format!("failed: {}", e.to_string().lines().next().unwrap_or("")),
        };
        // Refusals before anything was touched (lock held, stale plan, no
        // approval) are audited too.
        self.audit(&plan.env, kind, &plan_hash(plan), &outcome)?;
        result
    }

    /// Records `actor`'s approval of a saved plan, as an entry of the audit
    /// chain (so approvals are as tamper-evident as the writes they allow).
    /// Returns everyone who has approved it so far.
    pub fn approve(&self, plan: &Plan, actor: &str) -> Result<Vec<String>> {
        self.env(&plan.env)?;
        let current = self.state.generation(&plan.env)?;
        if current != plan.generation {
            return Err(EngineError::Stale {
                env: plan.env.clone(),
                planned: plan.generation,
                current,
            });
        }
        let hash = plan_hash(plan);
        if actor == plan.author {
            return Err(EngineError::SelfApproval {
                actor: actor.to_string(),
                hash,
            });
        }
        self.audit_as(&plan.env, actor, "approve", &hash, "approved")?;
        let approvers = self.approvers(plan)?;
        let required = self.env(&plan.env)?.approvals;
        self.state.record_event(
            &plan.env,
            actor,
            "approve",
            &format!(
                "approved plan {hash} by {} ({} of {required})",
                plan.author,
                approvers.len()
            ),
        )?;
        Ok(approvers)
    }

    /// Distinct actors, other than its author, who approved this exact plan.
    pub fn approvers(&self, plan: &Plan) -> Result<Vec<String>> {
        let hash = plan_hash(plan);
        let mut out: Vec<String> = Vec::new();
        for e in self.state.audit(Some(&plan.env))? {
            if e.action == "approve"
                && e.plan_hash == hash
                && e.outcome == "approved"
                && e.actor != plan.author
                && !out.contains(&e.actor)
            {
                out.push(e.actor);
            }
        }
        Ok(out)
    }

    /// Whether a plan may be carried out as `kind`: environments with
    /// `approvals = N` need N approvals for apply, cold deploy and destroy.
    /// Rollbacks (to a release that was itself approved) and reconcile (the
    /// policies of the reviewed kiln.toml) need none: they must work when
    /// nobody is awake.
    pub fn check_approved(&self, plan: &Plan, kind: &str) -> Result<()> {
        let required = self.env(&plan.env)?.approvals;
        if required == 0
            || !matches!(kind, "apply" | "deploy --cold" | "destroy")
            || plan.is_empty()
        {
            return Ok(());
        }
        let have = self.approvers(plan)?.len();
        if have < required as usize {
            return Err(EngineError::NotApproved {
                env: plan.env.clone(),
                required,
                have,
                hash: plan_hash(plan),
            });
        }
        Ok(())
    }

    /// Appends a write to the audit chain; a write by an actor that is not
    /// one of the environment's pipeline identities fires its alarm.
    pub fn audit(&self, env: &str, action: &str, plan_hash: &str, outcome: &str) -> Result<()> {
        self.audit_as(env, &kiln_state::actor(), action, plan_hash, outcome)
    }

    fn audit_as(
        &self,
        env: &str,
        actor: &str,
        action: &str,
        plan_hash: &str,
        outcome: &str,
    ) -> Result<()> {
        let actor = actor.to_string();
        let ids = self
            .project
            .envs
            .get(env)
            .map(|e| e.pipeline_identities.clone())
            .unwrap_or_default();
        let pipeline = ids.is_empty() || ids.contains(&actor);
        let entry = self
            .state
            .append_audit(env, &actor, action, plan_hash, outcome, pipeline)?;
        if !pipeline {
            self.alarm(
                env,
                "non_pipeline_write",
                serde_json::to_value(&entry).unwrap_or_default(),
            );
        }
        Ok(())
    }

    /// Calls the environment's alarm hook, if it has one, with a JSON body:
    /// an `http://` URL gets a POST, anything else runs as a shell command
    /// with the body on stdin. A failing hook is logged, never fatal.
    pub fn alarm(&self, env: &str, kind: &str, detail: serde_json::Value) {
        let Some(hook) = self.project.envs.get(env).and_then(|e| e.alarm.clone()) else {
            return;
        };
        let body = serde_json::json!({ "env": env, "kind": kind, "time": (self.clock)(), "detail": detail }).to_string();
        let sent = if let Some(rest) = hook.strip_prefix("http://") {
            post(rest, &body)
        } else {
            run_hook(&hook, &body)
        };
        if let Err(e) = sent {
            tracing::warn!(env, kind, error = %e, "alarm hook failed");
        }
    }

    fn apply_inner(&self, plan: &Plan, kind: &str) -> Result<Applied> {
        let env_name = plan.env.as_str();
        let _lock = self.state.lock(env_name, kind)?;
        let current = self.state.generation(env_name)?;
        if current != plan.generation {
            return Err(EngineError::Stale {
                env: env_name.into(),
                planned: plan.generation,
                current,
            });
        }
        self.check_approved(plan, kind)?;
        self.verify_images(plan)?;
        self.converge_runtime(env_name)?;
        let actor = kiln_state::actor();
        let plan_hash = plan_hash(plan);
        let summary = format!(
            "{} to create, {} to replace, {} to destroy",
            plan.count(Action::Create),
            plan.count(Action::Replace),
            plan.count(Action::Destroy)
        );
        let roles_json = serde_json::to_string(&plan.targets).expect("targets serialize");
        let release =
            self.state
                .begin_release(env_name, &actor, kind, &plan_hash, &summary, &roles_json)?;
        let total = plan.changes.len();
        let mut i = 0;
        while i < total {
            let batch = plan.changes[i].batch;
            let n = plan.changes[i..]
                .iter()
                .take_while(|c| c.batch == batch)
                .count();
            let group = &plan.changes[i..i + n];
            for (k, change) in group.iter().enumerate() {
                (self.progress)(Progress::Step {
                    index: i + k + 1,
                    total,
                    change: change.clone(),
                });
                let what = format!("{:?} {}", change.action, change.reason).to_lowercase();
                self.state.step_started(
                    env_name,
                    release,
                    (i + k) as u32,
                    &format!("{:?}", change.action).to_lowercase(),
                    &change.server,
                    &what,
                )?;
            }
            let single = n == 1
                && !group[0].promote
                && group[0].keep_warm_secs.is_none()
                && group[0].bake_secs.is_none();
            let result = if single || batch == 0 {
                group.iter().try_for_each(|c| self.step(plan, c, release))
            } else {
                self.batch(plan, group, release)
            };
            if let Err(e) = result {
                for k in 0..n {
                    self.state.step_finished(
                        env_name,
                        release,
                        (i + k) as u32,
                        false,
                        &e.to_string(),
                    )?;
                }
                self.state
                    .finish_release(env_name, release, "failed", &e.to_string())?;
                return Err(e);
            }
            for k in 0..n {
                self.state
                    .step_finished(env_name, release, (i + k) as u32, true, "")?;
            }
            i += n;
        }
        self.state
            .finish_release(env_name, release, "succeeded", &summary)?;
        Ok(Applied {
            release,
            changes: total,
        })
    }

    fn verify_images(&self, plan: &Plan) -> Result<()> {
        let mut seen = BTreeSet::new();
        for c in plan.changes.iter().filter(|c| c.action != Action::Destroy) {
            let image = c.image.clone().unwrap_or_default();
            if !seen.insert(image.clone()) {
                continue;
            }
            let v = kiln_image::ops::verify(self.store, &image)?;
            if !v.ok() {
                let first = v
                    .differences
                    .first()
                    .map(|d| d.to_string())
                    .or_else(|| v.corrupt_blobs.first().map(|b| format!("corrupt blob {b}")))
                    .unwrap_or_default();
                return Err(EngineError::Tampered {
                    image,
                    count: v.differences.len() + v.corrupt_blobs.len(),
                    first: first.split_whitespace().collect::<Vec<_>>().join(" "),
                });
            }
        }
        Ok(())
    }

    /// Carries out a batch: every new server up and healthy (or a warm
    /// standby promoted), then one balancer switch per role, an optional
    /// canary bake, then the old servers drained and destroyed (or kept
    /// warm). A failure before the switch removes the batch's new servers,
    /// so the balancer never saw them.
    fn batch(&self, plan: &Plan, group: &[Change], release: i64) -> Result<()> {
        let env = plan.env.as_str();
        // Destroy-first replacements (rolling `max_unavailable`) leave the
        // balancer, drain and stop before anything of the batch starts.
        for c in group
            .iter()
            .filter(|c| c.action == Action::Replace && c.cold && !c.promote)
        {
            self.destroy(env, &c.server)?;
        }
        let mut fresh: Vec<String> = Vec::new();
        let mut result = Ok(());
        for c in group {
            let r = match (c.action, c.promote) {
                (Action::Create, _) => self
                    .create_quiet(plan, c, &c.server, release)
                    .map(|_| fresh.push(c.server.clone())),
                (Action::Replace, true) => self.promote(plan, c, release),
                (Action::Replace, false) => {
                    let id = c.replacement.clone().unwrap_or_default();
                    self.create_quiet(plan, c, &id, release)
                        .map(|_| fresh.push(id))
                }
                (Action::Destroy, _) => Ok(()),
            };
            if r.is_err() {
                result = r;
                break;
            }
        }
        if let Err(e) = result {
            for id in &fresh {
                let _ = self.provider.destroy(env, id);
                let _ = self.state.remove_server(id);
            }
            return Err(e);
        }
        let old: Vec<String> = group
            .iter()
            .filter(|c| {
                c.action != Action::Create && !(c.action == Action::Replace && c.cold && !c.promote)
            })
            .map(|c| c.server.clone())
            .collect();
        let roles: BTreeSet<&str> = group.iter().map(|c| c.role.as_str()).collect();
        for role in &roles {
            self.rebalance_without(env, role, &old)?;
        }
        let mut share = Vec::new();
        for role in &roles {
            let image = group
                .iter()
                .find(|c| c.role == *role)
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            let serving: Vec<kiln_model::Server> = self
                .state
                .servers(Some(env))?
                .into_iter()
                .filter(|s| {
                    s.role == *role && s.status == ServerStatus::Running && !old.contains(&s.id)
                })
                .collect();
            share.push((
                role.to_string(),
                serving.iter().filter(|s| s.image == image).count(),
                serving.len(),
            ));
        }
        (self.progress)(Progress::Switched {
            roles: roles.iter().map(|r| r.to_string()).collect(),
            share,
        });
        if let Some(c) = group.iter().find(|c| c.bake_secs.is_some()) {
            let new_ids: Vec<String> = group.iter().filter_map(|c| c.replacement.clone()).collect();
            if let Err(e) = self.bake(plan, c, &new_ids, release) {
                // Back to the old servers at once; the canaries finish what
                // they were serving (drained), then go.
                self.rebalance_without(env, &c.role, &new_ids)?;
                for id in &new_ids {
                    self.drain(env, id)?;
                    self.destroy_quiet(env, id)?;
                }
                return Err(e);
            }
        }
        for c in group.iter().filter(|c| old.contains(&c.server)) {
            self.drain(env, &c.server)?;
            match c.keep_warm_secs {
                Some(secs) => {
                    self.state
                        .set_standby(&c.server, (self.clock)() + secs as i64)?;
                    (self.progress)(Progress::Standby {
                        server: c.server.clone(),
                        secs,
                    });
                }
                None => self.destroy_quiet(env, &c.server)?,
            }
        }
        Ok(())
    }

    /// Watches freshly switched canary servers for `bake_secs`: each must
    /// stay healthy, and the balancer's error rate to them must stay at or
    /// under `max_error_rate`.
    fn bake(&self, plan: &Plan, c: &Change, ids: &[String], release: i64) -> Result<()> {
        let secs = c.bake_secs.unwrap_or(0);
        let max = c.max_error_rate.unwrap_or(0.0);
        let role = &self.env(&plan.env)?.roles[&c.role];
        let port = role.balancer.as_ref().map(|b| b.port);
        let backends: Vec<String> = ids
            .iter()
            .filter_map(|id| self.state.server(id).ok().flatten())
            .filter_map(|s| port.map(|p| format!("{}:{p}", s.address)))
            .collect();
        let base = self.provider.backend_stats(&plan.env, &c.role);
        let start = Instant::now();
        (self.progress)(Progress::Baking {
            role: c.role.clone(),
            secs,
        });
        loop {
            for id in ids {
                let req = self.request(&plan.env, c, id, release)?;
                let alive = self
                    .provider
                    .inventory(&plan.env)?
                    .into_iter()
                    .any(|r| &r.id == id && r.alive);
                if !alive
                    || role
                        .health
                        .as_ref()
                        .is_some_and(|h| !self.provider.probe(&req, h))
                {
                    return Err(EngineError::CanaryFailed {
                        role: c.role.clone(),
                        reason: format!("canary {id} failed its health check"),
                    });
                }
            }
            let now = self.provider.backend_stats(&plan.env, &c.role);
            let (mut total, mut errors) = (0u64, 0u64);
            for (addr, t, e) in &now {
                if backends.contains(addr) {
                    let (bt, be) = base
                        .iter()
                        .find(|b| &b.0 == addr)
                        .map(|b| (b.1, b.2))
                        .unwrap_or((0, 0));
                    total += t - bt.min(*t);
                    errors += e - be.min(*e);
                }
            }
            let attempts = total;
            if attempts > 0 && errors as f64 / attempts as f64 > max {
                return Err(EngineError::CanaryFailed {
                    role: c.role.clone(),
                    reason: format!(
                        "error rate {errors}/{attempts} at the balancer is above {max}"
                    ),
                });
            }
            if start.elapsed() >= Duration::from_secs(secs) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Brings a warm standby server back into service.
    fn promote(&self, plan: &Plan, c: &Change, release: i64) -> Result<()> {
        let id = c.replacement.clone().unwrap_or_default();
        let req = self.request(&plan.env, c, &id, release)?;
        let role = &self.env(&plan.env)?.roles[&c.role];
        self.wait_healthy(&req, role.health.as_ref())?;
        let pid = self.state.server(&id)?.and_then(|s| s.pid);
        self.state
            .set_server_status(&id, ServerStatus::Running, pid)?;
        Ok(())
    }

    fn step(&self, plan: &Plan, c: &Change, release: i64) -> Result<()> {
        match c.action {
            Action::Create => self.create(plan, c, &c.server, release),
            Action::Destroy => self.destroy(&plan.env, &c.server),
            Action::Replace => {
                let new_id = c.replacement.clone().unwrap_or_default();
                if c.cold {
                    self.destroy(&plan.env, &c.server)?;
                    self.create(plan, c, &new_id, release)
                } else {
                    self.create(plan, c, &new_id, release)?;
                    self.destroy(&plan.env, &c.server)
                }
            }
        }
    }

    /// The full request for a new server of change `c`, from the plan's
    /// target and the image's OCI config.
    pub fn request(&self, env: &str, c: &Change, id: &str, release: i64) -> Result<ServerRequest> {
        let spec = self.env(env)?;
        let role = &spec.roles[&c.role];
        let image = c.image.clone().unwrap_or_default();
        let rec = kiln_image::ops::resolve(self.store, &image)?;
        let cfg: oci_spec::image::ImageConfiguration = self.store.read_json_blob(&rec.config)?;
        let conf = cfg.config().clone().unwrap_or_default();
        let mut argv = conf.entrypoint().clone().unwrap_or_default();
        argv.extend(conf.cmd().clone().unwrap_or_default());
        let mut vars: BTreeMap<String, String> = conf
            .env()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        vars.extend(role.env.clone());
        Ok(ServerRequest {
            env: env.to_string(),
            id: id.to_string(),
            role: c.role.clone(),
            release,
            slot: c.slot,
            address: c.address.clone().unwrap_or_default(),
            subnet: spec.subnet.clone(),
            root: self.store.root_path(&rec.digest),
            image_digest: rec.digest.0.clone(),
            argv,
            env_vars: vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            workdir: conf.working_dir().clone().unwrap_or_else(|| "/".into()),
            cpus: role.size.cpus,
            memory_bytes: role.size.memory_bytes,
            volumes: role.volumes.clone(),
        })
    }

    fn create(&self, plan: &Plan, c: &Change, id: &str, release: i64) -> Result<()> {
        self.create_quiet(plan, c, id, release)?;
        self.rebalance(&plan.env, &c.role, None)
    }

    /// Creates a server and waits for its health, without touching the balancer.
    fn create_quiet(&self, plan: &Plan, c: &Change, id: &str, release: i64) -> Result<()> {
        let req = self.request(&plan.env, c, id, release)?;
        let target = plan.targets.iter().find(|t| t.role == c.role);
        let server = Server {
            id: id.to_string(),
            env: plan.env.clone(),
            role: c.role.clone(),
            slot: c.slot,
            image: c.image.clone().unwrap_or_default(),
            image_digest: req.image_digest.clone(),
            spec_hash: target.map(|t| t.spec_hash.clone()).unwrap_or_default(),
            address: req.address.clone(),
            created: (self.clock)(),
            status: ServerStatus::Creating,
            pid: None,
            release,
            standby_until: None,
        };
        self.state.put_server(&server)?;
        let pid = match self.provider.create(&req) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.provider.destroy(&plan.env, id);
                self.state.remove_server(id)?;
                return Err(e.into());
            }
        };
        self.state
            .set_server_status(id, ServerStatus::Creating, Some(pid))?;
        let role = &self.env(&plan.env)?.roles[&c.role];
        let min_healthy = match role.strategy {
            kiln_model::Strategy::Rolling {
                min_healthy_secs, ..
            } => min_healthy_secs,
            _ => 0,
        };
        let healthy = self
            .wait_healthy(&req, role.health.as_ref())
            .and_then(|_| self.stay_healthy(&req, role.health.as_ref(), min_healthy));
        if let Err(e) = healthy {
            let _ = self.provider.destroy(&plan.env, id);
            self.state.remove_server(id)?;
            return Err(e);
        }
        self.state
            .set_server_status(id, ServerStatus::Running, Some(pid))?;
        Ok(())
    }

    /// Points the role's balancer (if it has one) at its running servers,
    /// leaving out `without`; returns once the switch is in effect.
    fn rebalance(&self, env: &str, role: &str, without: Option<&str>) -> Result<()> {
        let without: Vec<String> = without.map(|w| vec![w.to_string()]).unwrap_or_default();
        self.rebalance_without(env, role, &without)
    }

    fn rebalance_without(&self, env: &str, role: &str, without: &[String]) -> Result<()> {
        let Some(b) = self
            .env(env)?
            .roles
            .get(role)
            .and_then(|r| r.balancer.clone())
        else {
            return Ok(());
        };
        let backends: Vec<String> = self
            .state
            .servers(Some(env))?
            .into_iter()
            .filter(|s| {
                s.role == role && s.status == ServerStatus::Running && !without.contains(&s.id)
            })
            .map(|s| format!("{}:{}", s.address, b.port))
            .collect();
        self.provider.balance(env, role, &b, &backends)?;
        Ok(())
    }

    fn wait_healthy(&self, req: &ServerRequest, check: Option<&HealthCheck>) -> Result<()> {
        (self.progress)(Progress::Waiting {
            server: req.id.clone(),
            address: req.address.clone(),
        });
        let started = Instant::now();
        loop {
            let alive = self
                .provider
                .inventory(&req.env)?
                .into_iter()
                .any(|r| r.id == req.id && r.alive);
            let healthy = alive && check.is_none_or(|c| self.provider.probe(req, c));
            if healthy {
                (self.progress)(Progress::Healthy {
                    server: req.id.clone(),
                    address: req.address.clone(),
                    elapsed: started.elapsed(),
                });
                return Ok(());
            }
            if !alive || started.elapsed() > self.options.health_timeout {
                let tail = tail(&self.provider.log_path(&req.env, &req.id), 15);
                let tail = if alive {
                    tail
                } else {
                    format!("{tail}\n(the server's process exited)")
                };
                return Err(EngineError::Unhealthy {
                    server: req.id.clone(),
                    role: req.role.clone(),
                    secs: self.options.health_timeout.as_secs(),
                    tail,
                });
            }
            std::thread::sleep(self.options.health_interval);
        }
    }

    /// Waits for a server's open connections at its balancer to finish.
    fn drain(&self, env: &str, id: &str) -> Result<()> {
        if let Some(s) = self.state.server(id)? {
            if let Some(b) = self
                .env(env)
                .ok()
                .and_then(|e| e.roles.get(&s.role))
                .and_then(|r| r.balancer.clone())
            {
                self.provider.drain(
                    env,
                    &s.role,
                    &format!("{}:{}", s.address, b.port),
                    Duration::from_secs(b.drain_timeout_secs),
                );
            }
        }
        Ok(())
    }

    /// Destroys a server already out of its balancer.
    fn destroy_quiet(&self, env: &str, id: &str) -> Result<()> {
        if self.state.server(id)?.is_some() {
            self.state
                .set_server_status(id, ServerStatus::Destroying, None)?;
        }
        self.provider.destroy(env, id)?;
        self.state.remove_server(id)?;
        (self.progress)(Progress::Destroyed {
            server: id.to_string(),
        });
        Ok(())
    }

    /// Keeps probing a healthy new server for `secs` (rolling `min_healthy`)
    /// before anything old is drained.
    fn stay_healthy(
        &self,
        req: &ServerRequest,
        check: Option<&HealthCheck>,
        secs: u64,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            let alive = self
                .provider
                .inventory(&req.env)?
                .into_iter()
                .any(|r| r.id == req.id && r.alive);
            if !alive || check.is_some_and(|c| !self.provider.probe(req, c)) {
                let tail = tail(&self.provider.log_path(&req.env, &req.id), 15);
                return Err(EngineError::Unhealthy {
                    server: req.id.clone(),
                    role: req.role.clone(),
                    secs,
                    tail: format!("(healthy at first, then failed within min_healthy)\n{tail}"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn destroy(&self, env: &str, id: &str) -> Result<()> {
        if let Some(s) = self.state.server(id)? {
            // Take it out of the balancer and let its connections finish
            // before anything stops it.
            let balancer = self
                .env(env)
                .ok()
                .and_then(|e| e.roles.get(&s.role))
                .and_then(|r| r.balancer.clone());
            if let (Some(b), ServerStatus::Running) = (balancer, s.status) {
                self.rebalance(env, &s.role, Some(id))?;
                self.provider.drain(
                    env,
                    &s.role,
                    &format!("{}:{}", s.address, b.port),
                    Duration::from_secs(b.drain_timeout_secs),
                );
            }
            self.state
                .set_server_status(id, ServerStatus::Destroying, None)?;
        }
        self.provider.destroy(env, id)?;
        self.state.remove_server(id)?;
        (self.progress)(Progress::Destroyed {
            server: id.to_string(),
        });
        Ok(())
    }
}

/// POSTs `body` to `host:port/path` over plain HTTP/1.0 (loopback hooks).
fn post(rest: &str, body: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let (hostport, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, "/".to_string()),
    };
    let mut s = std::net::TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "POST {path} HTTP/1.0\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    Ok(())
}

fn run_hook(cmd: &str, body: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(body.as_bytes())?;
    let status = child.wait()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("hook exited with {status}")))
    }
}

/// The last `n` lines of a log (empty if there is none).
pub fn tail(path: &std::path::Path, n: usize) -> String {
    kiln_image::bake::tail(path, n)
}

#[cfg(test)]
mod tests;
