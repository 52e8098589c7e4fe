//! Reading the fleet: the servers of an environment as `kiln server list`
//! shows them (health, place at the balancer), their logs through the
//! provider, and the image versions `kiln image gc` must keep.

use std::collections::{BTreeMap, BTreeSet};

use kiln_model::{Server, ServerStatus};
use kiln_provider::{BalancerState, Rotation};
use kiln_state::State;
use serde::Serialize;

use crate::{Engine, Result};

/// How a server is doing, as `kiln server list` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// Its process is gone.
    Down,
    Creating,
    Destroying,
    /// Warm, out of the balancer (blue-green rollback window).
    Standby,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Down => "down",
            Health::Creating => "creating",
            Health::Destroying => "destroying",
            Health::Standby => "standby",
        }
    }
}

/// Where a server stands at its role's balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Place {
    #[serde(rename = "in rotation")]
    InRotation,
    #[serde(rename = "failing checks")]
    FailingChecks,
    #[serde(rename = "draining")]
    Draining,
}

impl Place {
    pub fn as_str(self) -> &'static str {
        match self {
            Place::InRotation => "in rotation",
            Place::FailingChecks => "failing checks",
            Place::Draining => "draining",
        }
    }
}

/// One row of `kiln server list --json` (a contract).
#[derive(Debug, Clone, Serialize)]
pub struct ServerView {
    pub id: String,
    pub env: String,
    pub role: String,
    /// `name@version`.
    pub image: String,
    pub image_digest: String,
    /// The server's own address.
    pub address: String,
    pub ports: Vec<u16>,
    /// RFC 3339.
    pub created: String,
    /// Epoch seconds, for ages.
    pub created_at: i64,
    pub health: Health,
    /// Host pid of its first process, where the provider has one.
    pub pid: Option<i32>,
    pub status: ServerStatus,
    pub release: i64,
    /// Its place at the role's balancer, if the balancer knows it.
    pub balancer: Option<Place>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Declared port → the port it is published on at `address`, on
    /// providers that publish ports elsewhere.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub published: std::collections::BTreeMap<u16, u16>,
    /// What resolves to it in the environment's DNS: its id, and its
    /// role's names while it is in rotation.
    pub names: Vec<String>,
}

impl Engine<'_> {
    /// The servers of `env` (or of every environment the state knows).
    pub fn servers(&self, env: Option<&str>) -> Result<Vec<ServerView>> {
        let envs = match env {
            Some(e) => vec![e.to_string()],
            None => self.state.envs()?,
        };
        let mut out = Vec::new();
        for e in &envs {
            out.extend(self.servers_of(e)?);
        }
        Ok(out)
    }

    fn servers_of(&self, env: &str) -> Result<Vec<ServerView>> {
        let spec = self.project.envs.get(env);
        let alive: BTreeSet<String> = self
            .provider
            .inventory(env)?
            .into_iter()
            .filter(|r| r.alive)
            .map(|r| r.id)
            .collect();
        let mut fronts: BTreeMap<String, Option<BalancerState>> = BTreeMap::new();
        let mut out = Vec::new();
        for s in self.state.servers(Some(env))? {
            let role = spec.and_then(|e| e.roles.get(&s.role));
            let health = match s.status {
                ServerStatus::Creating => Health::Creating,
                ServerStatus::Destroying => Health::Destroying,
                ServerStatus::Standby => Health::Standby,
                ServerStatus::Running if !alive.contains(&s.id) => Health::Down,
                ServerStatus::Running => match role.and_then(|r| r.health.as_ref()) {
                    Some(check) if !self.provider.probe(&s, check) => Health::Unhealthy,
                    _ => Health::Healthy,
                },
            };
            let place = role
                .and_then(|r| r.balancer.as_ref())
                .and_then(|b| self.place(env, &s, b.port, &mut fronts));
            let mut names = vec![s.id.clone()];
            if s.status == ServerStatus::Running {
                names.push(s.role.clone());
                names.push(format!("{}.{env}", s.role));
            }
            out.push(ServerView {
                names,
                created: kiln_state::rfc3339(s.created),
                created_at: s.created,
                ports: role.map(|r| r.ports.clone()).unwrap_or_default(),
                health,
                balancer: place,
                id: s.id,
                env: s.env,
                role: s.role,
                image: s.image,
                image_digest: s.image_digest,
                address: s.address,
                pid: s.pid,
                status: s.status,
                release: s.release,
                node: s.node,
                published: s.published,
            });
        }
        Ok(out)
    }

    fn place(
        &self,
        env: &str,
        s: &Server,
        port: u16,
        fronts: &mut BTreeMap<String, Option<BalancerState>>,
    ) -> Option<Place> {
        let front = fronts
            .entry(s.role.clone())
            .or_insert_with(|| self.provider.balancer(env, &s.role))
            .as_ref()?;
        let me = s.endpoint(port);
        let b = front.backends.iter().find(|b| b.addr == me)?;
        Some(match b.rotation {
            Rotation::InRotation => Place::InRotation,
            Rotation::FailingChecks => Place::FailingChecks,
            Rotation::Draining => Place::Draining,
        })
    }

    /// Asks `env`'s DNS server for `name`, the way a server of the
    /// environment would.
    pub fn dns_lookup(&self, env: &str, name: &str) -> Result<Option<kiln_dns::Answer>> {
        self.env(env)?;
        let Some(server) = self.provider.dns_server(env) else {
            return Ok(None);
        };
        kiln_dns::query(server, name, std::time::Duration::from_secs(3))
            .map(Some)
            .map_err(|e| crate::EngineError::Dns {
                env: env.into(),
                detail: e.to_string(),
            })
    }

    /// Server ids of `env` with logs, destroyed servers included.
    pub fn log_ids(&self, env: &str) -> Result<Vec<String>> {
        let mut ids = self.provider.log_ids(env)?;
        ids.sort();
        Ok(ids)
    }

    /// A server's log from byte `offset`: the bytes and the next offset.
    pub fn read_log(&self, env: &str, id: &str, offset: u64) -> Result<kiln_provider::LogChunk> {
        Ok(self.provider.read_log(env, id, offset)?)
    }
}

/// Image digests that environments run, or that their last five releases
/// ran (the rollback window): `kiln image gc` keeps them whatever their age.
pub fn images_in_use(state: &State) -> Result<BTreeSet<String>> {
    let mut out: BTreeSet<String> = state
        .servers(None)?
        .into_iter()
        .map(|s| s.image_digest)
        .collect();
    for env in state.envs()? {
        for r in state.releases(&env)?.iter().rev().take(5) {
            out.extend(r.targets.iter().map(|t| t.image.digest.clone()));
        }
    }
    Ok(out)
}

/// One release as `kiln history --json` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseView {
    pub id: i64,
    pub created: i64,
    pub finished: Option<i64>,
    pub actor: String,
    pub kind: kiln_model::PlanKind,
    pub plan_hash: String,
    pub summary: String,
    /// What each role ran after it: role → `name@version`.
    pub images: BTreeMap<String, String>,
    pub outcome: kiln_model::Outcome,
    pub detail: String,
}

/// The `kiln history --json` document: releases and events, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct History {
    pub env: String,
    pub releases: Vec<ReleaseView>,
    pub events: Vec<kiln_state::Event>,
}

/// What happened to `env`.
pub fn history(state: &State, env: &str) -> Result<History> {
    let releases = state
        .releases(env)?
        .into_iter()
        .map(|r| ReleaseView {
            images: r
                .targets
                .iter()
                .map(|t| (t.role.clone(), t.image.to_string()))
                .collect(),
            id: r.id,
            created: r.created,
            finished: r.finished,
            actor: r.actor,
            kind: r.kind,
            plan_hash: r.plan_hash,
            summary: r.summary,
            outcome: r.outcome,
            detail: r.detail,
        })
        .collect();
    Ok(History {
        env: env.to_string(),
        releases,
        events: state.events(env)?,
    })
}
