//! Which provider runs each environment: `local` (sandboxes on this host)
//! or a swarm, as its `provider` says. [`Providers`] is one `Provider` that
//! routes every call by environment, so the engine, and commands that touch
//! two environments (`kiln promote` from `local` to `swarm`), see a single
//! runtime. Swarm providers connect on first use only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use kiln_model::{Balancer, HealthCheck, ImageRef, NodeInfo, Project, ProviderSpec, Server};
use kiln_model::{Subnet, Volume};
use kiln_provider::{
    BalancerState, FileCheck, Inspection, LogChunk, Names, Provider, ProviderError, Running,
    ServerRequest, Started,
};
use kiln_provider_local::Local;
use kiln_provider_swarm::Swarm;

pub struct Providers {
    local: Local,
    /// By environment name.
    swarms: BTreeMap<String, Swarm>,
}

impl Providers {
    pub fn new(project: &Project, store: &kiln_image::Store) -> Providers {
        let swarms = project
            .envs
            .iter()
            .filter_map(|(name, env)| match &env.provider {
                ProviderSpec::Swarm(s) => Some((
                    name.clone(),
                    // The balancers and DNS of a swarm environment run on
                    // this host for now (see kiln_provider_swarm::provider).
                    Swarm::new(s.clone(), store.clone(), Box::new(Local::new(store))),
                )),
                ProviderSpec::Local => None,
            })
            .collect();
        Providers {
            local: Local::new(store),
            swarms,
        }
    }

    fn of(&self, env: &str) -> &dyn Provider {
        match self.swarms.get(env) {
            Some(s) => s,
            None => &self.local,
        }
    }
}

impl Provider for Providers {
    fn prepare(&self, env: &str, images: &[ImageRef]) -> Result<(), ProviderError> {
        self.of(env).prepare(env, images)
    }
    fn nodes(&self, env: &str) -> Result<Vec<NodeInfo>, ProviderError> {
        self.of(env).nodes(env)
    }
    fn create(&self, req: &ServerRequest) -> Result<Started, ProviderError> {
        self.of(&req.env).create(req)
    }
    fn destroy(&self, env: &str, id: &str) -> Result<(), ProviderError> {
        self.of(env).destroy(env, id)
    }
    fn inventory(&self, env: &str) -> Result<Vec<Running>, ProviderError> {
        self.of(env).inventory(env)
    }
    fn probe(&self, server: &Server, check: &HealthCheck) -> bool {
        self.of(&server.env).probe(server, check)
    }
    fn log_ids(&self, env: &str) -> Result<Vec<String>, ProviderError> {
        self.of(env).log_ids(env)
    }
    fn read_log(&self, env: &str, id: &str, offset: u64) -> Result<LogChunk, ProviderError> {
        self.of(env).read_log(env, id, offset)
    }
    fn balance(
        &self,
        env: &str,
        role: &str,
        balancer: &Balancer,
        backends: &[kiln_provider::Upstream],
    ) -> Result<(), ProviderError> {
        self.of(env).balance(env, role, balancer, backends)
    }
    fn publish(&self, env: &str, names: &Names) -> Result<(), ProviderError> {
        self.of(env).publish(env, names)
    }
    fn dns_server(&self, env: &str) -> Option<SocketAddr> {
        self.of(env).dns_server(env)
    }
    fn drain(&self, env: &str, role: &str, backend: &str, timeout: Duration) -> bool {
        self.of(env).drain(env, role, backend, timeout)
    }
    fn balancer(&self, env: &str, role: &str) -> Option<BalancerState> {
        self.of(env).balancer(env, role)
    }
    fn remove_balancer(&self, env: &str, role: &str) -> Result<(), ProviderError> {
        self.of(env).remove_balancer(env, role)
    }
    fn inspect(&self, server: &Server, volumes: &[Volume]) -> Inspection {
        self.of(&server.env).inspect(server, volumes)
    }
    fn verify_files(
        &self,
        image: &ImageRef,
        servers: &[&Server],
        full: bool,
    ) -> Result<FileCheck, ProviderError> {
        // The engine groups by image; one image's servers may still sit in
        // several environments' providers, so each answers for its own.
        let mut by_env: BTreeMap<&str, Vec<&Server>> = BTreeMap::new();
        for s in servers {
            by_env.entry(s.env.as_str()).or_default().push(s);
        }
        let mut out = FileCheck {
            differences: BTreeMap::new(),
            full,
        };
        for (env, on) in by_env {
            let check = self.of(env).verify_files(image, &on, full)?;
            out.full &= check.full;
            out.differences.extend(check.differences);
        }
        Ok(out)
    }
    fn quarantine(
        &self,
        server: &Server,
        volumes: &[Volume],
        findings_json: &str,
    ) -> Result<String, ProviderError> {
        self.of(&server.env)
            .quarantine(server, volumes, findings_json)
    }
    fn expire_quarantine(&self, env: &str, before: i64) -> Result<Vec<String>, ProviderError> {
        self.of(env).expire_quarantine(env, before)
    }
    fn taken_ids(&self) -> Result<BTreeSet<String>, ProviderError> {
        // Only the local host's ids: a swarm's services are named per
        // environment (`kiln-ENV-ID`), so its ids never collide across them.
        self.local.taken_ids()
    }
    fn network(&self, env: &str) -> Option<Subnet> {
        self.of(env).network(env)
    }
    fn network_conflict(&self, env: &str, subnet: Subnet) -> Result<Option<String>, ProviderError> {
        self.of(env).network_conflict(env, subnet)
    }
    fn teardown(&self, env: &str) -> Result<(), ProviderError> {
        self.of(env).teardown(env)
    }
}
