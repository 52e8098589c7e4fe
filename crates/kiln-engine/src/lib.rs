//! The engine: resolves what each role should run (from the project and the
//! image store), asks the pure planner for plans, and carries a plan out
//! exactly, step by step, through a [`Provider`].
//!
//! Invariants:
//! - the engine executes the plan's changes in order and decides nothing
//!   the plan did not (ids, slots, addresses, batches, order are the
//!   plan's), and launches servers from what the plan carries alone: a
//!   saved plan is never completed from `kiln.toml`;
//! - every write takes the environment's lock and checks the plan's
//!   generation first: a stale plan is refused, nothing half-done;
//! - a server row is written before its sandbox exists (`creating`) and
//!   marked `destroying` before it is torn down; every step is journaled
//!   before and after. A crash therefore leaves rows that say what to
//!   finish, and [`Engine::converge_runtime`] (run before every apply)
//!   removes half-created servers, finishes destroys and kills strays, so
//!   a re-run converges with no orphan and no duplicate;
//! - an image whose unpacked root no longer matches its seal is refused
//!   before any server is launched from it;
//! - the engine knows no provider's layout: logs, volumes, evidence and
//!   balancer files are behind the [`Provider`] trait.

mod alarm;
mod apply;
mod converge;
pub mod drift;
pub mod fleet;
pub mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_image::Store;
use kiln_model::{
    Change, EnvSpec, ImageRef, Launch, Plan, PlanKind, Project, RoleTarget, Server, UnmanagedPolicy,
};
use kiln_planner::{DeclaredChange, Input};
use kiln_provider::Provider;
use kiln_state::State;

pub use apply::Applied;

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
    /// The plan file is of a format this kiln does not read.
    #[error(
        "the plan has format {found}; this kiln reads format {known}: plan again with this kiln"
    )]
    Format { found: u32, known: u32 },
    /// The plan is of a kind that cannot be applied from a file.
    #[error("a `{kind}` plan cannot be applied from a file; only plans saved by `kiln plan` or `kiln promote` can")]
    NotSavable { kind: PlanKind },
    /// The plan names a role the plan itself does not describe.
    #[error("the plan changes role `{role}`, which it carries no target for")]
    UnknownRole { role: String },
    /// `kiln.toml` changed since the plan was made.
    #[error(
        "the plan no longer matches kiln.toml: {}; plan again (and have it approved again)",
        list(changes)
    )]
    Changed { changes: Vec<DeclaredChange> },
    /// An image the plan launches is not the version it names.
    #[error("image {image} of the plan is not in the store as {digest}; rebuild or plan again")]
    Missing { image: String, digest: String },
    /// An image failed verification and cannot be launched.
    #[error("image {image} does not match its seal ({count} differences, first: {first}); rebuild it with `kiln image build --no-cache {name}`")]
    Tampered {
        image: String,
        name: String,
        count: usize,
        first: String,
    },
    /// A role's `user` is not defined in its image.
    #[error("role `{role}` runs as a user image {image} does not define: {detail}")]
    User {
        role: String,
        image: String,
        detail: String,
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
    /// The environment's DNS server did not answer.
    #[error("the DNS server of `{env}` did not answer: {detail}")]
    Dns { env: String, detail: String },
    /// The state knows nothing of an environment whose servers run.
    #[error("`{env}` runs {} server(s) the state does not know ({}), and the state has no record of `{env}`: was the state database lost or reset? Adopt them into the state with `kiln apply {env} --adopt`, or destroy them with `--forget`", ids.len(), ids.join(", "))]
    LostState { env: String, ids: Vec<String> },
    /// The environment's subnet is used by something else on the host.
    #[error(
        "subnet {subnet} of `{env}` is in use by {user}; declare another `subnet` for `{env}`"
    )]
    SubnetInUse {
        env: String,
        subnet: String,
        user: String,
    },
    /// `kiln promote` has nothing to take.
    #[error("cannot promote `{from}` to `{to}`: {reason}")]
    NoPromote {
        from: String,
        to: String,
        reason: String,
    },
    /// The environment trusts signers, and the image version carries no
    /// valid signature by any of them.
    #[error(
        "`{env}` runs only images signed by a key it trusts: refused {image} for role `{role}`"
    )]
    Untrusted {
        env: String,
        role: String,
        image: String,
        #[source]
        source: Box<kiln_image::sign::TrustError>,
    },
    /// A role's secrets could not be decrypted or fingerprinted.
    #[error("cannot read the secrets of role `{role}` in `{env}`")]
    Secrets {
        env: String,
        role: String,
        #[source]
        source: Box<kiln_secrets::SecretError>,
    },
    /// A secret's value changed after the plan was made (its fingerprint,
    /// never its value, is compared).
    #[error("secret `{name}` of `{env}` changed since the plan was made (fingerprint {planned} in the plan, {current} now); plan again")]
    SecretChanged {
        env: String,
        name: String,
        planned: String,
        current: String,
    },
    /// The apply failed and the environment was returned to a previous release.
    #[error("{cause}\nrolled back automatically to release #{to} (as release #{release})")]
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

fn list(changes: &[DeclaredChange]) -> String {
    changes
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// A plan's identity in the audit chain and for approvals: the first 16 hex
/// digits of the BLAKE3 hash of its JSON. Any edit to a saved plan changes it.
pub fn plan_hash(plan: &Plan) -> String {
    let json = serde_json::to_vec(plan).unwrap_or_default();
    blake3::hash(&json).to_hex()[..16].to_string()
}

/// What the engine reports while it works, for progress display.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Cleanup before applying: what was found and done.
    Converged { detail: String },
    /// Step `index` of `total` starts.
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
    /// Plan to destroy the servers of an environment the state has no
    /// record of (`--forget`), instead of refusing.
    pub forget: bool,
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
            forget: false,
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

impl<'a> Engine<'a> {
    pub fn env(&self, name: &str) -> Result<&'a EnvSpec> {
        self.project
            .envs
            .get(name)
            .ok_or_else(|| EngineError::UnknownEnv(name.to_string()))
    }

    /// What each role should run: the image store's current version of its
    /// image, launched as its OCI config and the role declare.
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
                let image = ImageRef {
                    name: rec.name.clone(),
                    version: rec.version,
                    digest: rec.digest.0.clone(),
                };
                self.target(env, r, image)
            })
            .collect()
    }

    /// The target of role `r` of `env` running `image`: refused if `env`
    /// trusts signers and none of them signed `image`. The role's secrets
    /// join it as names and keyed fingerprints (never values), in the
    /// launch and in the spec hash.
    pub fn target(
        &self,
        env: &EnvSpec,
        r: &kiln_model::RoleSpec,
        image: ImageRef,
    ) -> Result<RoleTarget> {
        self.check_trust(env, &r.name, &image)?;
        let secrets = self.secret_fingerprints(&env.name, r)?;
        let mut launch = self.launch(&image, r)?;
        launch.secrets = secrets.clone();
        Ok(RoleTarget {
            role: r.name.clone(),
            launch,
            image,
            spec_hash: kiln_planner::spec_hash_with_secrets(r, &secrets),
            servers: r.servers,
            cold: r.cold_only || !r.volumes.is_empty(),
            spec: r.clone(),
        })
    }

    /// Refuses `image` for `role` unless `env` trusts no signers or one of
    /// them signed this exact version (manifest digest and seal root).
    pub fn check_trust(&self, env: &EnvSpec, role: &str, image: &ImageRef) -> Result<()> {
        let Some(trust) = &env.trust else {
            return Ok(());
        };
        let rec = kiln_image::ops::resolve(self.store, &image.to_string())?;
        if rec.digest.0 != image.digest {
            return Err(EngineError::Missing {
                image: image.to_string(),
                digest: image.digest.clone(),
            });
        }
        kiln_image::sign::verify_signature(self.store, &rec, &trust.signers)
            .map(|_| ())
            .map_err(|source| EngineError::Untrusted {
                env: env.name.clone(),
                role: role.into(),
                image: image.to_string(),
                source: Box::new(source),
            })
    }

    /// Keyed fingerprints of `role`'s secrets in `env`, by name (empty for
    /// a role without secrets; otherwise `$KILN_AGE_IDENTITY` is needed).
    pub fn secret_fingerprints(
        &self,
        env: &str,
        role: &kiln_model::RoleSpec,
    ) -> Result<BTreeMap<String, String>> {
        if role.secrets.is_empty() {
            return Ok(BTreeMap::new());
        }
        let fail = |source| EngineError::Secrets {
            env: env.into(),
            role: role.name.clone(),
            source: Box::new(source),
        };
        let identity = kiln_secrets::Identity::required().map_err(fail)?;
        kiln_secrets::fingerprints(&self.project.dir, env, &role.secrets, &identity).map_err(fail)
    }

    /// How servers of `role` start from `image`: its OCI config, with the
    /// role's environment over the image's.
    fn launch(&self, image: &ImageRef, role: &kiln_model::RoleSpec) -> Result<Launch> {
        let rec = kiln_image::ops::resolve(self.store, &image.to_string())?;
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
        // The role's user over the image's, resolved in the image itself.
        let user = match &role.user {
            Some(spec) => {
                let root = self.store.root_path(&rec.digest);
                let resolved =
                    kiln_image::resolve_user(&root, spec).map_err(|e| EngineError::User {
                        role: role.name.clone(),
                        image: image.to_string(),
                        detail: e.to_string(),
                    })?;
                if let Some(home) = &resolved.home {
                    vars.insert("HOME".into(), home.clone());
                }
                Some(resolved)
            }
            None => rec.user.clone(),
        };
        vars.extend(role.env.clone());
        Ok(Launch {
            argv,
            env: vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            workdir: conf.working_dir().clone().unwrap_or_else(|| "/".into()),
            user: user.filter(|u| u.uid != 0 || u.gid != 0 || !u.additional_gids.is_empty()),
            secrets: BTreeMap::new(),
        })
    }

    /// The environment as it is planned. A subnet derived from names (none
    /// declared) keeps the network the environment has; if it has none and
    /// something else on the host uses the derived one, the next free /24 of
    /// the default pool is taken. A declared subnet in use elsewhere is
    /// refused, naming both.
    pub fn planned_env(&self, name: &str) -> Result<EnvSpec> {
        let env = self.env(name)?;
        let mut out = env.clone();
        if !env.subnet_declared {
            if let Some(current) = self.provider.network(name) {
                out.subnet = current;
                return Ok(out);
            }
        }
        let Some(user) = self.provider.network_conflict(name, env.subnet)? else {
            return Ok(out);
        };
        let in_use = || EngineError::SubnetInUse {
            env: name.into(),
            subnet: env.subnet.to_string(),
            user: user.clone(),
        };
        let start = match env.subnet.pool_index() {
            Some(i) if !env.subnet_declared => i,
            _ => return Err(in_use()),
        };
        let others: Vec<kiln_model::Subnet> = self
            .project
            .envs
            .values()
            .filter(|e| e.name != name)
            .map(|e| e.subnet)
            .collect();
        for i in 1..kiln_model::DEFAULT_POOL {
            let candidate = kiln_model::Subnet::default_pool(start + i);
            if others.iter().any(|o| o.overlaps(&candidate)) {
                continue;
            }
            if self.provider.network_conflict(name, candidate)?.is_none() {
                out.subnet = candidate;
                return Ok(out);
            }
        }
        Err(in_use())
    }

    /// Servers the state records for `env`, and which of them are not alive.
    pub fn observe(&self, env: &str) -> Result<(Vec<Server>, BTreeSet<String>)> {
        let (servers, dead, _) = self.observe_all(env)?;
        Ok((servers, dead))
    }

    /// Servers the state records for `env`, the ids of those not alive, and
    /// the servers the runtime runs for `env` that the state does not know
    /// (id, role).
    #[allow(clippy::type_complexity)]
    pub fn observe_all(
        &self,
        env: &str,
    ) -> Result<(Vec<Server>, BTreeSet<String>, Vec<(String, String)>)> {
        let servers = self.state.servers(Some(env))?;
        let running = self.provider.inventory(env)?;
        let alive: BTreeSet<&str> = running
            .iter()
            .filter(|r| r.alive)
            .map(|r| r.id.as_str())
            .collect();
        let dead = servers
            .iter()
            .filter(|s| !alive.contains(s.id.as_str()))
            .map(|s| s.id.clone())
            .collect();
        let strays = running
            .iter()
            .filter(|r| !servers.iter().any(|s| s.id == r.id))
            .map(|r| (r.id.clone(), r.role.clone()))
            .collect();
        Ok((servers, dead, strays))
    }

    /// Server ids new servers must not take: every server the state knows
    /// in any environment, and whatever the provider's host already uses.
    pub fn taken_ids(&self) -> Result<BTreeSet<String>> {
        let mut out = self.provider.taken_ids()?;
        out.extend(self.state.server_ids()?);
        Ok(out)
    }

    /// Plans `env` towards its declaration: `Apply`, or `DeployCold`.
    pub fn plan(
        &self,
        env_name: &str,
        kind: PlanKind,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Plan> {
        if kind == PlanKind::Destroy {
            return self.plan_destroy(env_name);
        }
        let targets = self.targets(self.env(env_name)?)?;
        self.plan_targets(env_name, targets, kind, &BTreeMap::new(), random)
    }

    /// Plans `env` towards the given role targets.
    pub fn plan_targets(
        &self,
        env_name: &str,
        targets: Vec<RoleTarget>,
        kind: PlanKind,
        force: &BTreeMap<String, String>,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Plan> {
        let env = &self.planned_env(env_name)?;
        let (observed, dead, mut strays) = self.observe_all(env_name)?;
        self.check_known(env_name, &observed, &strays)?;
        if kind == PlanKind::Reconcile {
            // Reconcile removes what nobody declared only where the policy says so.
            strays.retain(|(_, role)| unmanaged_policy(env, role) == UnmanagedPolicy::Kill);
        }
        let generation = self.state.generation(env_name)?;
        let taken = self.taken_ids()?;
        let nodes = self.provider.nodes(env_name)?;
        let input = Input {
            env,
            targets: &targets,
            observed: &observed,
            dead: &dead,
            generation,
            now: (self.clock)(),
            kind,
            force,
            taken: &taken,
            strays: &strays,
            nodes: &nodes,
        };
        Ok(kiln_planner::plan(&input, random)?)
    }

    /// Refuses to plan an environment whose servers run while the state
    /// has no record of it at all (a lost or reset database): destroying
    /// them as strays would take the fleet down. `--forget` says to.
    fn check_known(
        &self,
        env: &str,
        observed: &[Server],
        strays: &[(String, String)],
    ) -> Result<()> {
        if strays.is_empty() || !observed.is_empty() || self.options.forget {
            return Ok(());
        }
        if !self.state.releases(env)?.is_empty() {
            return Ok(());
        }
        Err(EngineError::LostState {
            env: env.into(),
            ids: strays.iter().map(|s| s.0.clone()).collect(),
        })
    }

    /// Takes servers that run for `env` but that the state does not know
    /// into the state, from what the runtime recorded when it created them
    /// (`kiln apply --adopt` after a lost state). Returns the ids adopted.
    pub fn adopt(&self, env: &str) -> Result<Vec<String>> {
        let _lock = self.lock(env, "adopt")?;
        let known: BTreeSet<String> = self.state.server_ids()?.into_iter().collect();
        let mut adopted = Vec::new();
        for r in self.provider.inventory(env)? {
            let Some(record) = r.record.filter(|_| r.alive && !known.contains(&r.id)) else {
                continue;
            };
            self.state.put_server(&record)?;
            let detail = format!(
                "adopted server {} ({} of `{}`, slot {}) into the state",
                record.id, record.image, record.role, record.slot
            );
            self.state
                .record_event(env, &kiln_state::actor(), "adopt", &detail)?;
            adopted.push(record.id);
        }
        if !adopted.is_empty() {
            self.audit(
                env,
                "adopt",
                "-",
                &format!("adopted {}", adopted.join(", ")),
            )?;
        }
        Ok(adopted)
    }

    /// A plan that destroys every server of `env`.
    pub fn plan_destroy(&self, env_name: &str) -> Result<Plan> {
        let env = &self.planned_env(env_name)?;
        let (observed, _, strays) = self.observe_all(env_name)?;
        self.check_known(env_name, &observed, &strays)?;
        let generation = self.state.generation(env_name)?;
        Ok(kiln_planner::plan_destroy(
            env,
            &observed,
            &strays,
            generation,
            (self.clock)(),
        ))
    }

    /// `kiln rollback`: a plan back to release `to` (or the previous
    /// release that ran something different).
    pub fn plan_rollback(
        &self,
        env_name: &str,
        to: Option<i64>,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Plan> {
        let releases = self.state.releases(env_name)?;
        let current = self.targets(self.env(env_name)?)?;
        let (release, targets) = kiln_planner::rollback_targets(env_name, &releases, to, &current)?;
        let env = self.env(env_name)?;
        for t in &targets {
            self.check_trust(env, &t.role, &t.image)?;
            if kiln_image::ops::resolve(self.store, &t.image.to_string())
                .map(|r| r.digest.0 != t.image.digest)
                .unwrap_or(true)
            {
                return Err(kiln_planner::PlanError::NoRollback {
                    env: env_name.into(),
                    reason: format!(
                        "image {} of release #{release} is no longer in the store",
                        t.image
                    ),
                }
                .into());
            }
        }
        let mut plan = self.plan_targets(
            env_name,
            targets,
            PlanKind::Rollback,
            &BTreeMap::new(),
            random,
        )?;
        plan.rollback_to = Some(release);
        Ok(plan)
    }

    /// `kiln promote FROM TO`: a plan of `to` with exactly the image
    /// digests `from` runs (its last successful release), whatever the
    /// store's current versions are.
    pub fn plan_promote(
        &self,
        from: &str,
        to: &str,
        random: &mut dyn FnMut() -> u16,
    ) -> Result<Plan> {
        self.env(from)?;
        let dest = self.env(to)?;
        let runs = self
            .state
            .releases(from)?
            .into_iter()
            .rev()
            .find(|r| {
                r.outcome == kiln_model::Outcome::Succeeded
                    && r.kind != PlanKind::Destroy
                    && !r.targets.is_empty()
            })
            .ok_or_else(|| EngineError::NoPromote {
                from: from.into(),
                to: to.into(),
                reason: "it has no successful release".into(),
            })?;
        let mut targets = Vec::new();
        for r in dest.roles.values() {
            // The same role if `from` has it, else any role of the same image.
            let image = runs
                .targets
                .iter()
                .find(|t| t.role == r.name && t.spec.image == r.image)
                .or_else(|| runs.targets.iter().find(|t| t.spec.image == r.image))
                .map(|t| t.image.clone())
                .ok_or_else(|| EngineError::NoPromote {
                    from: from.into(),
                    to: to.into(),
                    reason: format!(
                        "it runs no version of image `{}` (role `{}`)",
                        r.image, r.name
                    ),
                })?;
            targets.push(self.target(dest, r, image)?);
        }
        let mut plan =
            self.plan_targets(to, targets, PlanKind::Promote, &BTreeMap::new(), random)?;
        plan.promoted_from = Some(from.to_string());
        Ok(plan)
    }

    /// Checks a plan read from a file before anything runs: its format, its
    /// environment, its kind, that every change's role has a target, and
    /// that `kiln.toml` still declares what the plan was made from.
    pub fn check_saved(&self, plan: &Plan, env_name: &str) -> Result<()> {
        if plan.format != kiln_planner::PLAN_FORMAT {
            return Err(EngineError::Format {
                found: plan.format,
                known: kiln_planner::PLAN_FORMAT,
            });
        }
        if plan.env != env_name {
            return Err(EngineError::WrongEnv {
                plan: plan.env.clone(),
                env: env_name.into(),
            });
        }
        if !plan.kind.can_be_saved() {
            return Err(EngineError::NotSavable { kind: plan.kind });
        }
        let env = &self.planned_env(env_name)?;
        for c in &plan.changes {
            let creates = !matches!(c, Change::Destroy(_));
            if creates && plan.target(c.role()).is_none() {
                return Err(EngineError::UnknownRole {
                    role: c.role().to_string(),
                });
            }
        }
        let changes = kiln_planner::declared_changes(plan, env);
        if !changes.is_empty() {
            return Err(EngineError::Changed { changes });
        }
        Ok(())
    }

    /// Records `actor`'s approval of a saved plan, as an entry of the audit
    /// chain (so approvals are as tamper-evident as the writes they allow).
    /// Returns everyone who has approved it so far.
    pub fn approve(&self, plan: &Plan, actor: &str) -> Result<Vec<String>> {
        self.check_saved(plan, &plan.env)?;
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
        let detail = format!(
            "approved plan {hash} by {} ({} of {required})",
            plan.author,
            approvers.len()
        );
        self.state
            .record_event(&plan.env, actor, "approve", &detail)?;
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

    /// Whether a plan may be carried out: environments with `approvals = N`
    /// need N approvals for the kinds that carry a human's new intent
    /// ([`PlanKind::needs_approval`]). Rollbacks (to a release that was
    /// itself approved) and reconcile (the policies of the reviewed
    /// kiln.toml) need none: they must work when nobody is awake, and are
    /// never read from a file.
    pub fn check_approved(&self, plan: &Plan) -> Result<()> {
        let required = self.env(&plan.env)?.approvals;
        if required == 0 || !plan.kind.needs_approval() || plan.is_empty() {
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
        let ids = self
            .project
            .envs
            .get(env)
            .map(|e| e.pipeline_identities.clone())
            .unwrap_or_default();
        let pipeline = ids.is_empty() || ids.iter().any(|i| i == actor);
        let entry = self
            .state
            .append_audit(env, actor, action, plan_hash, outcome, pipeline)?;
        if !pipeline {
            self.alarm(
                env,
                "non_pipeline_write",
                serde_json::to_value(&entry).unwrap_or_default(),
            );
        }
        Ok(())
    }

    /// Takes the environment's lock; taking over a dead holder's lock (a
    /// killed kiln) is audited, so a re-run converges without `kiln unlock`
    /// and the record says why it could.
    pub fn lock(&self, env: &str, op: &str) -> Result<kiln_state::EnvLock<'a>> {
        let lock = self.state.lock(env, op)?;
        if let Some(old) = lock.took_over() {
            let outcome = format!(
                "took over the lock of {} (pid {} on {}, gone) held since {} for {}",
                old.holder,
                old.pid,
                old.host,
                kiln_state::rfc3339(old.since),
                old.op
            );
            self.audit(env, "lock takeover", "-", &outcome)?;
        }
        Ok(lock)
    }

    /// The last `n` lines of a server's log (empty if there is none).
    pub fn log_tail(&self, env: &str, id: &str, n: usize) -> String {
        let Ok(chunk) = self.provider.read_log(env, id, 0) else {
            return String::new();
        };
        let text = String::from_utf8_lossy(&chunk.bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The `unmanaged` policy for something labelled with `role`: the role's,
/// or, for a role nobody declares, `kill` only if every role says so.
pub fn unmanaged_policy(env: &EnvSpec, role: &str) -> UnmanagedPolicy {
    match env.roles.get(role) {
        Some(r) => r.unmanaged,
        None if !env.roles.is_empty()
            && env
                .roles
                .values()
                .all(|r| r.unmanaged == UnmanagedPolicy::Kill) =>
        {
            UnmanagedPolicy::Kill
        }
        None => UnmanagedPolicy::Alarm,
    }
}

#[cfg(test)]
mod tests;
