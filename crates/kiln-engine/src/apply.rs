//! Carrying out a plan: under the environment's lock, after the stale-plan
//! check, the approval gate, seal verification of every image to launch and
//! the provider's preparation of them, batch by batch: new servers up and
//! healthy, one balancer switch per role, an optional canary bake, then the
//! old servers drained and destroyed (or kept warm). Every step is
//! journaled before and after it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_model::{
    Action, Balancer, Change, HealthCheck, ImageRef, Outcome, Plan, PlanKind, Replace,
    ReplaceOrder, RoleTarget, Server, ServerStatus, Strategy,
};
use kiln_provider::{SecretFile, ServerRequest, Upstream};

use crate::{plan_hash, Engine, EngineError, Progress, Result};

/// The journal boundaries of an apply, in order: the release begun, each
/// step started and finished, the release finished. With `KILN_CRASH_AT=N`
/// set, the process SIGKILLs itself at boundary N: crash-point tests use
/// it to prove that a re-run converges from every boundary.
fn boundary() {
    static CRASH_AT: OnceLock<Option<u32>> = OnceLock::new();
    static PASSED: AtomicU32 = AtomicU32::new(0);
    let at = *CRASH_AT.get_or_init(|| std::env::var("KILN_CRASH_AT").ok()?.parse().ok());
    let n = PASSED.fetch_add(1, Ordering::SeqCst) + 1;
    if at == Some(n) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub release: i64,
    pub changes: usize,
}

impl Engine<'_> {
    /// Carries out a plan: gated by approvals for the kinds that need them;
    /// an apply or promotion that fails after the environment started
    /// changing returns by itself to the last release that succeeded.
    pub fn run(&self, plan: &Plan, random: &mut dyn FnMut() -> u16) -> Result<Applied> {
        match plan.kind {
            PlanKind::Apply | PlanKind::Promote => self.apply_or_roll_back(plan, random),
            _ => self.apply(plan),
        }
    }

    /// Carries out `plan` exactly, and audits it (refusals too).
    pub fn apply(&self, plan: &Plan) -> Result<Applied> {
        let result = self.apply_inner(plan);
        let outcome = match &result {
            Ok(_) => "succeeded".to_string(),
            Err(e) => format!("failed: {}", first_line(e)),
        };
        self.audit(&plan.env, plan.kind.as_str(), &plan_hash(plan), &outcome)?;
        result
    }

    /// Applies `plan`; if a step fails after the environment started
    /// changing, returns it to the last release that succeeded (through the
    /// same zero-downtime path) and reports both.
    pub fn apply_or_roll_back(
        &self,
        plan: &Plan,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Applied> {
        let before = self.state.releases(&plan.env)?;
        let e = match self.apply(plan) {
            Ok(a) => return Ok(a),
            Err(
                e @ (EngineError::Unhealthy { .. }
                | EngineError::CanaryFailed { .. }
                | EngineError::Provider(_)),
            ) => e,
            Err(e) => return Err(e),
        };
        let Some((to, targets)) = kiln_planner::auto_rollback(&before, &plan.targets) else {
            return Err(e);
        };
        (self.progress)(Progress::RollingBack {
            to,
            reason: first_line(&e),
        });
        let mut back = self.plan_targets(
            &plan.env,
            targets,
            PlanKind::AutoRollback,
            &Default::default(),
            random,
        )?;
        back.rollback_to = Some(to);
        if back.is_empty() {
            // The failure came before anything changed.
            return Err(e);
        }
        let applied = self.apply(&back)?;
        Err(EngineError::RolledBack {
            cause: Box::new(e),
            to,
            release: applied.release,
        })
    }

    fn apply_inner(&self, plan: &Plan) -> Result<Applied> {
        let env = plan.env.as_str();
        let _lock = self.lock(env, plan.kind.as_str())?;
        let current = self.state.generation(env)?;
        if current != plan.generation {
            return Err(EngineError::Stale {
                env: env.into(),
                planned: plan.generation,
                current,
            });
        }
        self.check_approved(plan)?;
        let images = self.verify_images(plan)?;
        let secrets = self.open_secrets(plan)?;
        if !secrets.is_empty() {
            // The chain records which secrets went where, by name and keyed
            // fingerprint: enough to tell values apart, nothing to reveal one.
            let delivered: Vec<String> = plan
                .targets
                .iter()
                .filter(|t| secrets.contains_key(&t.role))
                .flat_map(|t| {
                    t.launch
                        .secrets
                        .iter()
                        .map(move |(n, f)| format!("{n} ({f}) to role `{}`", t.role))
                })
                .collect();
            let outcome = format!("delivers {}", delivered.join(", "));
            self.audit(env, "secrets", &plan_hash(plan), &outcome)?;
        }
        self.provider.prepare(env, &images)?;
        self.converge_runtime(env, &plan.targets)?;
        let actor = kiln_state::actor();
        let summary = format!(
            "{} to create, {} to replace, {} to destroy",
            plan.count(Action::Create),
            plan.count(Action::Replace),
            plan.count(Action::Destroy)
        );
        let release = self.state.begin_release(
            env,
            &actor,
            plan.kind,
            &plan_hash(plan),
            &summary,
            &plan.targets,
        )?;
        boundary();
        let run = Run {
            engine: self,
            plan,
            release,
            secrets,
        };
        if let Err(e) = run.changes() {
            self.state
                .finish_release(env, release, Outcome::Failed, &e.to_string())?;
            return Err(e);
        }
        self.retire_fronts(plan)?;
        self.state
            .finish_release(env, release, Outcome::Succeeded, &summary)?;
        boundary();
        Ok(Applied {
            release,
            changes: plan.changes.len(),
        })
    }

    /// Verifies every image the plan launches against its seal, and that the
    /// store still has it as the version the plan names. Returns them.
    fn verify_images(&self, plan: &Plan) -> Result<Vec<ImageRef>> {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let launched: BTreeSet<&str> = plan.changes.iter().filter_map(|c| c.image()).collect();
        let mut out = Vec::new();
        for t in plan.targets.iter().filter(|t| {
            launched.contains(t.image.to_string().as_str()) && seen.insert(&t.image.digest)
        }) {
            let image = t.image.to_string();
            let rec =
                kiln_image::ops::resolve(self.store, &image).map_err(|_| EngineError::Missing {
                    image: image.clone(),
                    digest: t.image.digest.clone(),
                })?;
            if rec.digest.0 != t.image.digest {
                return Err(EngineError::Missing {
                    image,
                    digest: t.image.digest.clone(),
                });
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
                    name: t.image.name.clone(),
                    count: v.differences.len() + v.corrupt_blobs.len(),
                    first: first.split_whitespace().collect::<Vec<_>>().join(" "),
                });
            }
            if let Ok(env) = self.env(&plan.env) {
                self.check_trust(env, &t.role, &t.image)?;
            }
            out.push(t.image.clone());
        }
        Ok(out)
    }

    /// Decrypts the secrets of every role the plan launches servers of,
    /// checking each against the fingerprint the plan carries: a value
    /// changed since a saved plan was made refuses the plan. Plans kiln
    /// makes itself (rollbacks, reconcile) deliver today's values, the
    /// only ones there are. Values stay in memory, zeroed when dropped.
    fn open_secrets(&self, plan: &Plan) -> Result<BTreeMap<String, Vec<SecretFile>>> {
        let launched: BTreeSet<&str> = plan
            .changes
            .iter()
            .filter(|c| c.image().is_some())
            .map(|c| c.role())
            .collect();
        let mut out = BTreeMap::new();
        let env = plan.env.as_str();
        for t in plan
            .targets
            .iter()
            .filter(|t| launched.contains(t.role.as_str()) && !t.spec.secrets.is_empty())
        {
            let fail = |source| EngineError::Secrets {
                env: env.into(),
                role: t.role.clone(),
                source: Box::new(source),
            };
            let identity = kiln_secrets::Identity::required().map_err(fail)?;
            let key = kiln_secrets::FingerprintKey::load(&self.project.dir, env, &identity)
                .map_err(fail)?;
            let mut files = Vec::new();
            for name in &t.spec.secrets {
                let value =
                    kiln_secrets::decrypt(&self.project.dir, env, name, &identity).map_err(fail)?;
                let current = key.fingerprint(&value);
                let planned = t.launch.secrets.get(name).cloned().unwrap_or_default();
                if plan.kind.can_be_saved() && current != planned {
                    return Err(EngineError::SecretChanged {
                        env: env.into(),
                        name: name.clone(),
                        planned,
                        current,
                    });
                }
                files.push(SecretFile {
                    name: name.clone(),
                    value: zeroize::Zeroizing::new(value.expose().to_vec()),
                });
            }
            out.insert(t.role.clone(), files);
        }
        Ok(out)
    }

    /// After the changes: balancers of roles that have no server left and
    /// are not declared by the plan go; after a destroy of the whole
    /// environment, everything it had besides servers goes too.
    fn retire_fronts(&self, plan: &Plan) -> Result<()> {
        let env = plan.env.as_str();
        let left = self.state.servers(Some(env))?;
        let mut roles: BTreeSet<&str> = plan.changes.iter().map(|c| c.role()).collect();
        if plan.kind == PlanKind::Destroy {
            if let Ok(spec) = self.env(env) {
                roles.extend(spec.roles.keys().map(String::as_str));
            }
        }
        for role in roles {
            let declared = plan.target(role).is_some();
            if !declared && !left.iter().any(|s| s.role == role) {
                self.provider.remove_balancer(env, role)?;
            }
        }
        if plan.kind == PlanKind::Destroy && left.is_empty() {
            self.provider.teardown(env)?;
            self.state.record_event(
                env,
                &kiln_state::actor(),
                "teardown",
                "the environment's balancers and network were removed with its last server",
            )?;
        }
        Ok(())
    }

    /// Puts the role's rotation in effect: its running servers, leaving
    /// out `without`, behind its balancer (if it has one) and under its
    /// names in the environment's DNS. Returns once both answer from it.
    pub(crate) fn rebalance(
        &self,
        env: &str,
        role: &str,
        balancer: Option<&Balancer>,
        without: &[String],
    ) -> Result<()> {
        let servers = self.state.servers(Some(env))?;
        let in_rotation = |s: &&Server| {
            s.role == role && s.status == ServerStatus::Running && !without.contains(&s.id)
        };
        self.provider
            .publish(env, &names(env, &servers, role, without, self.dns_ttl(env)))?;
        let Some(b) = balancer else { return Ok(()) };
        // Each server as its own release declared the balancer (port and
        // check): mid-rollout, old and new servers may differ.
        let mut declared: BTreeMap<i64, Balancer> = BTreeMap::new();
        let mut backends = Vec::new();
        for s in servers.iter().filter(in_rotation) {
            let own = match declared.entry(s.release) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(self.declared_balancer(s, b)?)
                }
            };
            backends.push(Upstream {
                addr: s.endpoint(own.port),
                port: own.port,
                check: own.check.clone(),
            });
        }
        self.provider.balance(env, role, b, &backends)?;
        Ok(())
    }

    /// The balancer as `s`'s own release declared it (port, check), or
    /// `current` when that release recorded none.
    fn declared_balancer(&self, s: &Server, current: &Balancer) -> Result<Balancer> {
        Ok(self
            .state
            .release(&s.env, s.release)?
            .and_then(|r| r.targets.into_iter().find(|t| t.role == s.role))
            .and_then(|t| t.spec.balancer)
            .unwrap_or_else(|| current.clone()))
    }

    /// The TTL of `env`'s DNS answers.
    pub(crate) fn dns_ttl(&self, env: &str) -> u32 {
        self.project.envs.get(env).map_or(1, |e| e.dns_ttl_secs)
    }
}

/// The names `env`'s DNS answers: `ROLE` and `ROLE.ENV` for each role's
/// running servers (leaving `without` out of `role`), and every server
/// that is not being torn down under its own id.
pub fn names(
    env: &str,
    servers: &[Server],
    role: &str,
    without: &[String],
    ttl_secs: u32,
) -> kiln_provider::Names {
    let mut out = kiln_provider::Names {
        ttl_secs,
        names: Default::default(),
    };
    for s in servers {
        let Ok(ip) = s.address.parse::<std::net::Ipv4Addr>() else {
            continue;
        };
        let left = s.role == role && without.contains(&s.id);
        if matches!(s.status, ServerStatus::Running | ServerStatus::Standby) {
            out.names.insert(s.id.clone(), vec![ip]);
        }
        for name in [s.role.clone(), format!("{}.{env}", s.role)] {
            let addrs = out.names.entry(name).or_default();
            if s.status == ServerStatus::Running && !left {
                addrs.push(ip);
            }
        }
    }
    out
}

/// One apply in progress: the plan, its release, and the engine.
struct Run<'e, 'a> {
    engine: &'e Engine<'a>,
    plan: &'e Plan,
    release: i64,
    /// Decrypted secrets by role, for the servers this apply creates.
    secrets: BTreeMap<String, Vec<SecretFile>>,
}

impl Run<'_, '_> {
    fn env(&self) -> &str {
        &self.plan.env
    }

    /// Waits until a server withdrawn from DNS at `since` may stop:
    /// clients that resolved it just before hold the answer for the TTL.
    /// Where the provider serves no DNS for the environment (a swarm's
    /// servers do not resolve through kiln), nobody holds an answer.
    fn outlive_ttl(&self, since: Instant) {
        if self.engine.provider.dns_server(self.env()).is_none() {
            return;
        }
        let ttl = Duration::from_secs(u64::from(self.plan.target.dns_ttl_secs));
        if let Some(left) = ttl.checked_sub(since.elapsed()) {
            std::thread::sleep(left);
        }
    }

    fn target(&self, role: &str) -> Result<&RoleTarget> {
        self.plan
            .target(role)
            .ok_or_else(|| EngineError::UnknownRole { role: role.into() })
    }

    fn balancer(&self, role: &str) -> Option<&Balancer> {
        self.plan
            .target(role)
            .and_then(|t| t.spec.balancer.as_ref())
    }

    /// Every batch in order, journaled.
    fn changes(&self) -> Result<()> {
        let (env, state) = (self.env(), self.engine.state);
        let changes = &self.plan.changes;
        let total = changes.len();
        let mut i = 0;
        while i < total {
            let batch = changes[i].batch();
            let n = changes[i..]
                .iter()
                .take_while(|c| c.batch() == batch)
                .count();
            let group = &changes[i..i + n];
            for (k, change) in group.iter().enumerate() {
                (self.engine.progress)(Progress::Step {
                    index: i + k + 1,
                    total,
                    change: change.clone(),
                });
                let action = format!("{:?}", change.action()).to_lowercase();
                let what = format!("{action} {}", change.reason());
                state.step_started(
                    env,
                    self.release,
                    (i + k) as u32,
                    &action,
                    change.server(),
                    &what,
                )?;
                boundary();
            }
            if let Err(e) = self.batch(group) {
                for k in 0..n {
                    state.step_finished(
                        env,
                        self.release,
                        (i + k) as u32,
                        false,
                        &e.to_string(),
                    )?;
                }
                return Err(e);
            }
            for k in 0..n {
                state.step_finished(env, self.release, (i + k) as u32, true, "")?;
                boundary();
            }
            i += n;
        }
        Ok(())
    }

    /// A batch of one plain change is a step; anything else (several
    /// changes, blue-green, canary, switch back) switches together.
    fn batch(&self, group: &[Change]) -> Result<()> {
        match group {
            [Change::Create(c)] => {
                self.create(&c.role, &Spot::of_create(c))?;
                self.engine
                    .rebalance(self.env(), &c.role, self.balancer(&c.role), &[])
            }
            [Change::Destroy(d)] => self.destroy(&d.server),
            [Change::Replace(r)]
                if r.order != ReplaceOrder::SwitchBack
                    && r.keep_warm_secs.is_none()
                    && r.canary.is_none() =>
            {
                self.replace(r)
            }
            _ => self.together(group),
        }
    }

    fn replace(&self, r: &Replace) -> Result<()> {
        if r.order == ReplaceOrder::DestroyFirst {
            self.destroy(&r.server)?;
            self.create(&r.role, &Spot::of_replace(r))?;
        } else {
            self.create(&r.role, &Spot::of_replace(r))?;
        }
        self.engine
            .rebalance(self.env(), &r.role, self.balancer(&r.role), &[])?;
        if r.order != ReplaceOrder::DestroyFirst {
            self.destroy(&r.server)?;
        }
        Ok(())
    }

    /// A batch: destroy-first replacements drained and stopped, every new
    /// server up and healthy (or a warm standby promoted), one switch per
    /// role, an optional canary bake, then the old servers drained and
    /// destroyed (or kept warm). A failure before the switch removes the
    /// batch's new servers, so the balancer never saw them.
    fn together(&self, group: &[Change]) -> Result<()> {
        let env = self.env();
        let replaces = || {
            group.iter().filter_map(|c| match c {
                Change::Replace(r) => Some(r),
                _ => None,
            })
        };
        for r in replaces().filter(|r| r.order == ReplaceOrder::DestroyFirst) {
            self.destroy(&r.server)?;
        }
        let mut fresh: Vec<String> = Vec::new();
        let mut result = Ok(());
        for c in group {
            let r = match c {
                Change::Create(c) => self
                    .create(&c.role, &Spot::of_create(c))
                    .map(|_| fresh.push(c.server.clone())),
                Change::Replace(r) if r.order == ReplaceOrder::SwitchBack => self.promote(r),
                Change::Replace(r) => self
                    .create(&r.role, &Spot::of_replace(r))
                    .map(|_| fresh.push(r.replacement.clone())),
                Change::Destroy(_) => Ok(()),
            };
            if r.is_err() {
                result = r;
                break;
            }
        }
        if let Err(e) = result {
            for id in &fresh {
                let _ = self.engine.provider.destroy(env, id);
                let _ = self.engine.state.remove_server(id);
            }
            return Err(e);
        }
        // What leaves the balancer at the switch: the old servers of
        // create-first replacements and plain destroys.
        let old: Vec<String> = group
            .iter()
            .filter_map(|c| match c {
                Change::Create(_) => None,
                Change::Replace(r) if r.order == ReplaceOrder::DestroyFirst => None,
                other => Some(other.server().to_string()),
            })
            .collect();
        let roles: BTreeSet<&str> = group.iter().map(|c| c.role()).collect();
        let switched = Instant::now();
        for role in &roles {
            self.engine
                .rebalance(env, role, self.balancer(role), &old)?;
        }
        self.report_switch(group, &roles, &old)?;
        if let Some(r) = replaces().find(|r| r.canary.is_some()) {
            let new_ids: Vec<String> = replaces().map(|r| r.replacement.clone()).collect();
            if let Err(e) = self.bake(r, &new_ids) {
                // Back to the old servers at once; the canaries finish what
                // they were serving (drained), then go.
                self.engine
                    .rebalance(env, &r.role, self.balancer(&r.role), &new_ids)?;
                let withdrawn = Instant::now();
                for id in &new_ids {
                    self.drain(id)?;
                }
                self.outlive_ttl(withdrawn);
                for id in &new_ids {
                    self.destroy_quiet(id)?;
                }
                return Err(e);
            }
        }
        let leaving: Vec<&Change> = group
            .iter()
            .filter(|c| old.iter().any(|o| o == c.server()))
            .collect();
        for c in &leaving {
            self.drain(c.server())?;
        }
        if !leaving.is_empty() {
            self.outlive_ttl(switched);
        }
        for c in leaving {
            match c {
                Change::Replace(Replace {
                    keep_warm_secs: Some(secs),
                    server,
                    ..
                }) => {
                    let until = (self.engine.clock)() + *secs as i64;
                    self.engine.state.set_standby(server, until)?;
                    (self.engine.progress)(Progress::Standby {
                        server: server.clone(),
                        secs: *secs,
                    });
                }
                _ => self.destroy_quiet(c.server())?,
            }
        }
        Ok(())
    }

    fn report_switch(
        &self,
        group: &[Change],
        roles: &BTreeSet<&str>,
        old: &[String],
    ) -> Result<()> {
        let servers = self.engine.state.servers(Some(self.env()))?;
        let mut share = Vec::new();
        for role in roles {
            let image = group
                .iter()
                .find(|c| c.role() == *role)
                .and_then(|c| c.image())
                .unwrap_or_default();
            let serving: Vec<&Server> = servers
                .iter()
                .filter(|s| {
                    s.role == *role && s.status == ServerStatus::Running && !old.contains(&s.id)
                })
                .collect();
            let on_new = serving.iter().filter(|s| s.image == image).count();
            share.push((role.to_string(), on_new, serving.len()));
        }
        (self.engine.progress)(Progress::Switched {
            roles: roles.iter().map(|r| r.to_string()).collect(),
            share,
        });
        Ok(())
    }

    /// Watches freshly switched canary servers for their bake time: each
    /// must stay alive and healthy, and the balancer's error rate to them
    /// must stay at or under `max_error_rate`.
    fn bake(&self, r: &Replace, ids: &[String]) -> Result<()> {
        let Some(canary) = &r.canary else {
            return Ok(());
        };
        let env = self.env();
        let spec = &self.target(&r.role)?.spec;
        let port = spec.balancer.as_ref().map(|b| b.port);
        let servers: Vec<Server> = ids
            .iter()
            .filter_map(|id| self.engine.state.server(id).ok().flatten())
            .collect();
        let backends: Vec<String> = servers
            .iter()
            .filter_map(|s| port.map(|p| s.endpoint(p)))
            .collect();
        let counts = |state: Option<kiln_provider::BalancerState>| {
            state
                .map(|b| b.backends)
                .unwrap_or_default()
                .into_iter()
                .filter(|b| backends.contains(&b.addr))
                .map(|b| (b.addr, (b.attempts, b.failures)))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let base = counts(self.engine.provider.balancer(env, &r.role));
        let start = Instant::now();
        (self.engine.progress)(Progress::Baking {
            role: r.role.clone(),
            secs: canary.bake_secs,
        });
        loop {
            for s in &servers {
                let alive = self.alive(&s.id)?;
                if !alive
                    || spec
                        .health
                        .as_ref()
                        .is_some_and(|h| !self.engine.provider.probe(s, h))
                {
                    return Err(EngineError::CanaryFailed {
                        role: r.role.clone(),
                        reason: format!("canary {} failed its health check", s.id),
                    });
                }
            }
            let (mut attempts, mut errors) = (0u64, 0u64);
            for (addr, (t, e)) in counts(self.engine.provider.balancer(env, &r.role)) {
                let (bt, be) = base.get(&addr).copied().unwrap_or((0, 0));
                attempts += t.saturating_sub(bt);
                errors += e.saturating_sub(be);
            }
            if attempts > 0 && errors as f64 / attempts as f64 > canary.max_error_rate {
                return Err(EngineError::CanaryFailed {
                    role: r.role.clone(),
                    reason: format!(
                        "error rate {errors}/{attempts} at the balancer is above {}",
                        canary.max_error_rate
                    ),
                });
            }
            if start.elapsed() >= Duration::from_secs(canary.bake_secs) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Brings a warm standby server back into service.
    fn promote(&self, r: &Replace) -> Result<()> {
        let server =
            self.engine
                .state
                .server(&r.replacement)?
                .ok_or_else(|| EngineError::UnknownRole {
                    role: r.role.clone(),
                })?;
        let health = self.target(&r.role)?.spec.health.clone();
        self.wait_healthy(&server, health.as_ref())?;
        self.engine
            .state
            .set_server_status(&server.id, ServerStatus::Running, server.pid)?;
        Ok(())
    }

    /// The full request for a new server of `role`, from the plan alone.
    fn request(&self, role: &str, at: &Spot) -> Result<ServerRequest> {
        let t = self.target(role)?;
        Ok(ServerRequest {
            env: self.env().to_string(),
            id: at.id.to_string(),
            role: role.to_string(),
            release: self.release,
            slot: at.slot,
            address: at.address.to_string(),
            node: at.node.map(str::to_string),
            published: at.published.clone(),
            subnet: self.plan.target.subnet,
            image: t.image.clone(),
            spec_hash: t.spec_hash.clone(),
            launch: t.launch.clone(),
            size: t.spec.size.clone(),
            ports: t.spec.ports.clone(),
            volumes: t.spec.volumes.clone(),
            reach: t.spec.reach.clone(),
            capabilities: t.spec.capabilities.clone(),
            secrets: self.secrets.get(role).cloned().unwrap_or_default(),
        })
    }

    /// Creates a server and waits for its health, without touching the
    /// balancer (the caller switches it in). The row is written before the sandbox exists.
    fn create(&self, role: &str, at: &Spot) -> Result<()> {
        let (engine, env) = (self.engine, self.env());
        let (id, slot, address) = (at.id, at.slot, at.address);
        let req = self.request(role, at)?;
        let t = self.target(role)?;
        let mut server = Server {
            id: id.to_string(),
            env: env.to_string(),
            role: role.to_string(),
            slot,
            image: t.image.to_string(),
            image_digest: t.image.digest.clone(),
            spec_hash: t.spec_hash.clone(),
            address: address.to_string(),
            created: (engine.clock)(),
            status: ServerStatus::Creating,
            pid: None,
            release: self.release,
            standby_until: None,
            node: at.node.map(str::to_string),
            published: at.published.clone(),
        };
        engine.state.put_server(&server)?;
        let started = match engine.provider.create(&req) {
            Ok(s) => s,
            Err(e) => {
                let _ = engine.provider.destroy(env, id);
                engine.state.remove_server(id)?;
                return Err(e.into());
            }
        };
        server.pid = started.pid;
        if started.node.is_some() {
            server.node = started.node;
        }
        if !started.published.is_empty() {
            server.published = started.published;
        }
        if let Some(a) = started.address {
            server.address = a;
        }
        engine.state.put_server(&server)?;
        let min_healthy = match t.spec.strategy {
            Strategy::Rolling {
                min_healthy_secs, ..
            } => min_healthy_secs,
            _ => 0,
        };
        let health = t.spec.health.as_ref();
        let healthy = self
            .wait_healthy(&server, health)
            .and_then(|_| self.stay_healthy(&server, health, min_healthy));
        if let Err(e) = healthy {
            let _ = engine.provider.destroy(env, id);
            engine.state.remove_server(id)?;
            return Err(e);
        }
        engine
            .state
            .set_server_status(id, ServerStatus::Running, server.pid)?;
        Ok(())
    }

    fn alive(&self, id: &str) -> Result<bool> {
        Ok(self
            .engine
            .provider
            .inventory(self.env())?
            .into_iter()
            .any(|r| r.id == id && r.alive))
    }

    fn wait_healthy(&self, s: &Server, check: Option<&HealthCheck>) -> Result<()> {
        let engine = self.engine;
        (engine.progress)(Progress::Waiting {
            server: s.id.clone(),
            address: s.address.clone(),
        });
        let started = Instant::now();
        loop {
            let alive = self.alive(&s.id)?;
            if alive && check.is_none_or(|c| engine.provider.probe(s, c)) {
                (engine.progress)(Progress::Healthy {
                    server: s.id.clone(),
                    address: s.address.clone(),
                    elapsed: started.elapsed(),
                });
                return Ok(());
            }
            if !alive || started.elapsed() > engine.options.health_timeout {
                let tail = engine.log_tail(self.env(), &s.id, 15);
                let tail = if alive {
                    tail
                } else {
                    format!("{tail}\n(the server's process exited)")
                };
                return Err(EngineError::Unhealthy {
                    server: s.id.clone(),
                    role: s.role.clone(),
                    secs: engine.options.health_timeout.as_secs(),
                    tail,
                });
            }
            std::thread::sleep(engine.options.health_interval);
        }
    }

    /// Keeps probing a healthy new server for `secs` (rolling `min_healthy`)
    /// before anything old is drained.
    fn stay_healthy(&self, s: &Server, check: Option<&HealthCheck>, secs: u64) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            if !self.alive(&s.id)? || check.is_some_and(|c| !self.engine.provider.probe(s, c)) {
                let tail = self.engine.log_tail(self.env(), &s.id, 15);
                return Err(EngineError::Unhealthy {
                    server: s.id.clone(),
                    role: s.role.clone(),
                    secs,
                    tail: format!("(healthy at first, then failed within min_healthy)\n{tail}"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Waits for a server's open connections at its balancer to finish.
    fn drain(&self, id: &str) -> Result<()> {
        if let Some(s) = self.engine.state.server(id)? {
            if let Some(b) = self.balancer(&s.role) {
                self.drain_server(&s, b)?;
            }
        }
        Ok(())
    }

    /// Waits for `s`'s open connections at its balancer `b` to finish; `s`
    /// is found there at the port its own release declared.
    fn drain_server(&self, s: &Server, b: &Balancer) -> Result<()> {
        let own = self.engine.declared_balancer(s, b)?;
        self.engine.provider.drain(
            self.env(),
            &s.role,
            &s.endpoint(own.port),
            Duration::from_secs(b.drain_timeout_secs),
        );
        Ok(())
    }

    /// Destroys a server already out of its balancer.
    fn destroy_quiet(&self, id: &str) -> Result<()> {
        let engine = self.engine;
        if engine.state.server(id)?.is_some() {
            engine
                .state
                .set_server_status(id, ServerStatus::Destroying, None)?;
        }
        engine.provider.destroy(self.env(), id)?;
        engine.state.remove_server(id)?;
        (engine.progress)(Progress::Destroyed {
            server: id.to_string(),
        });
        Ok(())
    }

    /// Destroys a server: out of its balancer first, its connections
    /// finished, then stopped.
    fn destroy(&self, id: &str) -> Result<()> {
        let engine = self.engine;
        if let Some(s) = engine.state.server(id)? {
            if s.status == ServerStatus::Running {
                let withdrawn = Instant::now();
                let b = self.balancer(&s.role);
                engine.rebalance(self.env(), &s.role, b, &[id.to_string()])?;
                if let Some(b) = b {
                    self.drain_server(&s, b)?;
                }
                self.outlive_ttl(withdrawn);
            }
        }
        self.destroy_quiet(id)
    }
}

fn first_line(e: &EngineError) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// Where the plan puts a new server: id, slot, address, and on providers
/// with several nodes its node and published ports.
struct Spot<'p> {
    id: &'p str,
    slot: u32,
    address: &'p str,
    node: Option<&'p str>,
    published: &'p BTreeMap<u16, u16>,
}

impl<'p> Spot<'p> {
    fn of_create(c: &'p kiln_model::Create) -> Spot<'p> {
        Spot {
            id: &c.server,
            slot: c.slot,
            address: &c.address,
            node: c.node.as_deref(),
            published: &c.published,
        }
    }

    fn of_replace(r: &'p Replace) -> Spot<'p> {
        Spot {
            id: &r.replacement,
            slot: r.slot,
            address: &r.address,
            node: r.node.as_deref(),
            published: &r.published,
        }
    }
}
