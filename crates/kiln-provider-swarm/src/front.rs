//! A swarm environment's role balancers, run on the swarm itself: traffic
//! never depends on the machine kiln runs on.
//!
//! Each role gets one balancer service per node it names (every node when
//! it names none), pinned there, publishing the role's `listen` port in
//! host mode: clients reach `NODE_IP:PORT` of any of them. Each is `kiln
//! balancer serve` from the image kiln bakes from its own binary
//! ([`crate::balancer`]), with its control directory on a node-local
//! volume and its control channel published on a port of the node. kiln
//! switches backends through that channel (`PUT /backends`, then waits on
//! `GET /status` until the new generation is served), exactly as it
//! writes a local balancer's control file: the service is never updated,
//! so a switch restarts nothing and drops no connection. Every request
//! carries a token kiln generated for the role (kept in `DIR/balancers/`,
//! 0600).
//!
//! The running balancers listed by a process's first switch of a role are
//! reused by its later switches and drains (a rollout makes dozens); a
//! control request that fails lists and ensures them again.
//!
//! A balancer whose node is down is skipped. When its node returns it
//! serves the set it last had (health-checked) and is reported `behind`
//! the last switch (kept in `DIR/balancers/ENV-ROLE.json`): drift says
//! so, and reconcile (or any switch) brings it up to date.
//!
//! An existing balancer is kept as it runs when kiln's own binary changes:
//! replacing it would drop its connections. `kiln destroy` (or removing the
//! role) removes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use kiln_image::Digest;
use kiln_model::{error_chain, Balancer};
use kiln_provider::{BalancerState, ProviderError};

use crate::balancer::{self, Placement, CONTROL_PORT};
use crate::cluster::{Cluster, Node, NodeHealth};
use crate::provider::Swarm;
use crate::server::{Server, LABEL_ROLE};

/// The service label marking a balancer (servers do not carry it).
pub const LABEL_KIND: &str = "dev.kiln.kind";
pub const KIND_BALANCER: &str = "balancer";

/// How long a new balancer may take to run (its image pull included).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one control request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a balancer may take to serve a new backend set.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Control channel ports are taken from here down, below the servers' range.
const CONTROL_PORTS_TOP: u16 = 29999;

/// Whether a service found on the swarm is one of kiln's balancers.
pub fn is_balancer(s: &Server) -> bool {
    s.label(LABEL_KIND) == Some(KIND_BALANCER)
}

/// Whether `s` is a balancer of `role` (of any role: None).
fn is_balancer_of(s: &Server, role: Option<&str>) -> bool {
    is_balancer(s) && role.is_none_or(|r| s.label(LABEL_ROLE) == Some(r))
}

/// One running balancer of a role, as kiln reaches it.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    server: String,
    /// `http://NODE_IP:PORT` of its control channel.
    control: String,
}

fn fail(env: &str, role: &str, detail: impl Into<String>) -> ProviderError {
    ProviderError::Other {
        what: format!("balancer of {env}/{role}"),
        detail: detail.into(),
    }
}

/// One client for every control channel: its connections are kept alive
/// between a switch and the status reads that follow it.
fn agent() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| kiln_provider::check::client(CONTROL_TIMEOUT, "kiln"))
}

impl Swarm {
    /// Switches the role's balancers to `backends`: creates the missing
    /// ones first, then gives each running one the set and waits until it
    /// serves it.
    pub(crate) fn switch_balancers(
        &self,
        env: &str,
        role: &str,
        b: &Balancer,
        set: &kiln_balancer::Backends,
    ) -> Result<(), ProviderError> {
        let token = self.balancer_token(env, role)?;
        // The balancers listed by this process's first switch (which also
        // created missing ones); listed and ensured again if one fails.
        let cached = self.cached_fronts(env, role);
        let pushed = match &cached {
            Some(live) => self.push_all(env, role, live, &token, set),
            None => Err(fail(env, role, "not listed yet")),
        };
        if pushed.is_err() {
            let cluster = self.cluster()?;
            let live = self.ensure_balancers(&cluster, env, role, b)?;
            if live.is_empty() {
                return Err(fail(
                    env,
                    role,
                    "no balancer runs: every node it may run on is down",
                ));
            }
            self.remember_fronts(env, role, Some(live.clone()));
            self.push_all(env, role, &live, &token, set)?;
        }
        self.keep_set(env, role, set)
            .map_err(|e| fail(env, role, format!("keeping the backend set: {e}")))
    }

    /// Gives every balancer in `live` the set and waits until each serves it.
    fn push_all(
        &self,
        env: &str,
        role: &str,
        live: &[Live],
        token: &str,
        set: &kiln_balancer::Backends,
    ) -> Result<(), ProviderError> {
        let agent = agent();
        for l in live {
            let generation = put_backends(agent, l, token, set)
                .map_err(|e| fail(env, role, format!("{}: {e}", l.server)))?;
            kiln_balancer::wait_generation_with(
                || get_status(agent, l, token),
                generation,
                SWITCH_TIMEOUT,
            )
            .ok_or_else(|| {
                fail(
                    env,
                    role,
                    format!(
                        "{} did not serve backend set {generation} within {}s",
                        l.server,
                        SWITCH_TIMEOUT.as_secs()
                    ),
                )
            })?;
        }
        Ok(())
    }

    fn cached_fronts(&self, env: &str, role: &str) -> Option<Vec<Live>> {
        let g = self.fronts.lock().unwrap_or_else(|e| e.into_inner());
        g.get(&(env.to_string(), role.to_string())).cloned()
    }

    fn remember_fronts(&self, env: &str, role: &str, live: Option<Vec<Live>>) {
        let mut g = self.fronts.lock().unwrap_or_else(|e| e.into_inner());
        let key = (env.to_string(), role.to_string());
        match live {
            Some(l) => g.insert(key, l),
            None => g.remove(&key),
        };
    }

    fn set_path(&self, env: &str, role: &str) -> PathBuf {
        self.dir
            .join("balancers")
            .join(format!("{env}-{role}.json"))
    }

    /// Records the set of the last switch: a balancer that missed it (its
    /// node was down) is found behind by it.
    fn keep_set(
        &self,
        env: &str,
        role: &str,
        set: &kiln_balancer::Backends,
    ) -> std::io::Result<()> {
        let path = self.set_path(env, role);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(set)?)?;
        std::fs::rename(&tmp, &path)
    }

    fn last_set(&self, env: &str, role: &str) -> Option<kiln_balancer::Backends> {
        serde_json::from_slice(&std::fs::read(self.set_path(env, role)).ok()?).ok()
    }

    /// Waits (bounded) until no running balancer of the role has anything
    /// open to `backend`.
    pub(crate) fn drain_balancers(
        &self,
        env: &str,
        role: &str,
        backend: &str,
        timeout: Duration,
    ) -> bool {
        let live = match self.cached_fronts(env, role) {
            Some(l) => Ok(l),
            None => self.live_balancers(env, role),
        };
        let (Ok(live), Ok(token)) = (live, self.balancer_token(env, role)) else {
            return false;
        };
        let agent = agent();
        let deadline = std::time::Instant::now() + timeout;
        // One that stopped answering since it was listed has nothing open.
        live.iter()
            .filter(|l| get_status(agent, l, &token).is_some())
            .all(|l| {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                kiln_balancer::wait_drained_with(|| get_status(agent, l, &token), backend, left)
            })
    }

    /// The role's balancers as one: alive if any runs; each backend's
    /// counts summed over them.
    pub(crate) fn balancer_state(&self, env: &str, role: &str) -> Option<BalancerState> {
        let cluster = self.cluster().ok()?;
        let found = self.balancer_services(&cluster, env, Some(role)).ok()?;
        if found.is_empty() {
            return None;
        }
        let token = self.balancer_token(env, role).ok()?;
        let agent = agent();
        let last = self.last_set(env, role);
        let mut behind = Vec::new();
        let mut statuses = Vec::new();
        for l in found.iter().filter_map(live_of) {
            let Some(status) = get_status(agent, &l, &token) else {
                continue;
            };
            let serves: BTreeSet<&str> = status
                .backends
                .iter()
                .filter(|b| b.active)
                .map(|b| b.addr.as_str())
                .collect();
            if last
                .as_ref()
                .is_some_and(|set| serves != set.backends.iter().map(String::as_str).collect())
            {
                behind.push(l.server.clone());
            }
            statuses.push(status);
        }
        Some(BalancerState {
            alive: !statuses.is_empty(),
            backends: kiln_provider::front::backends_of(&statuses),
            behind,
        })
    }

    /// Removes every balancer of the role (or of the environment, `role`
    /// None), their volumes stay on their nodes (Docker keeps named
    /// volumes), and the token.
    pub(crate) fn remove_balancers(
        &self,
        env: &str,
        role: Option<&str>,
    ) -> Result<(), ProviderError> {
        let cluster = self.cluster()?;
        for s in self.balancer_services(&cluster, env, role)? {
            let r = s.label(LABEL_ROLE).unwrap_or_default();
            self.rt
                .block_on(cluster.remove_server(env, &s.inventory_id(), Duration::from_secs(60)))
                .map_err(|e| fail(env, r, error_chain(&e)))?;
            self.remember_fronts(env, r, None);
            let _ = std::fs::remove_file(self.token_path(env, r));
            let _ = std::fs::remove_file(self.set_path(env, r));
        }
        Ok(())
    }

    /// The environment's balancer services of `role` (of every role: None).
    fn balancer_services(
        &self,
        cluster: &Cluster,
        env: &str,
        role: Option<&str>,
    ) -> Result<Vec<Server>, ProviderError> {
        Ok(self
            .rt
            .block_on(cluster.servers(Some(env)))
            .map_err(|e| fail(env, role.unwrap_or("*"), error_chain(&e)))?
            .into_iter()
            .filter(|s| is_balancer_of(s, role))
            .collect())
    }

    fn live_balancers(&self, env: &str, role: &str) -> Result<Vec<Live>, ProviderError> {
        let cluster = self.cluster()?;
        Ok(self
            .balancer_services(&cluster, env, Some(role))?
            .iter()
            .filter_map(live_of)
            .collect())
    }

    /// Creates the balancers the role lacks (and removes those on nodes it
    /// no longer names); returns the running ones.
    fn ensure_balancers(
        &self,
        cluster: &Cluster,
        env: &str,
        role: &str,
        b: &Balancer,
    ) -> Result<Vec<Live>, ProviderError> {
        let err = |e: crate::SwarmError| fail(env, role, error_chain(&e));
        let nodes = self.rt.block_on(cluster.nodes()).map_err(err)?;
        let wanted = wanted_nodes(&nodes, &b.nodes).map_err(|d| fail(env, role, d))?;
        let all = self.rt.block_on(cluster.servers(None)).map_err(err)?;
        let mine: Vec<&Server> = all
            .iter()
            .filter(|s| is_balancer_of(s, Some(role)))
            .filter(|s| s.label(crate::server::LABEL_ENV) == Some(env))
            .collect();
        let port = listen_port(&b.listen).map_err(|d| fail(env, role, d))?;
        let mut taken = taken_ports(&all);
        let mut live = Vec::new();
        for s in &mine {
            let node = s.spec.as_ref().and_then(|sp| sp.node.clone());
            let published = s
                .spec
                .as_ref()
                .and_then(|sp| sp.ports.first().map(|p| p.published));
            let keep = node.as_ref().is_some_and(|n| wanted.contains(n)) && published == Some(port);
            if !keep {
                self.rt
                    .block_on(cluster.remove_server(
                        env,
                        &s.inventory_id(),
                        Duration::from_secs(60),
                    ))
                    .map_err(err)?;
            } else if let Some(l) = live_of(s) {
                live.push(l);
            }
        }
        let have: BTreeSet<String> = mine
            .iter()
            .filter_map(|s| s.spec.as_ref()?.node.clone())
            .collect();
        let missing: Vec<&Node> = nodes
            .iter()
            .filter(|n| wanted.contains(&n.id) && !have.contains(&n.id))
            .filter(|n| n.health == NodeHealth::Ready)
            .collect();
        if missing.is_empty() {
            return Ok(live);
        }
        let image = self.balancer_image().map_err(|d| fail(env, role, d))?;
        let token = self.balancer_token(env, role)?;
        // All created first, then waited on: their nodes pull at once.
        let mut created = Vec::new();
        for n in missing {
            let used = taken.entry(n.id.clone()).or_default();
            let control = (1024..=CONTROL_PORTS_TOP)
                .rev()
                .find(|p| !used.contains(p) && *p != port)
                .ok_or_else(|| fail(env, role, format!("no free port on node {}", n.hostname)))?;
            used.insert(control);
            let at = Placement {
                node: n.id.clone(),
                published: port,
                control,
            };
            let spec = balancer::spec(env, role, &image, port, &at, &token);
            let mut service = spec.to_service().map_err(err)?;
            service
                .labels
                .get_or_insert_with(Default::default)
                .insert(LABEL_KIND.into(), KIND_BALANCER.into());
            let docker = cluster.engine().docker().clone();
            self.rt
                .block_on(docker.create_service(service, None))
                .map_err(|e| fail(env, role, error_chain(&e)))?;
            created.push(spec.server);
        }
        for server in created {
            let up = self
                .rt
                .block_on(cluster.wait_running(env, &server, START_TIMEOUT))
                .map_err(err)?;
            let l = live_of(&up).ok_or_else(|| fail(env, role, "started without an address"))?;
            wait_control(&l, &token).map_err(|d| fail(env, role, d))?;
            live.push(l);
        }
        Ok(live)
    }

    /// `REPO@sha256:...` of the balancer image: kiln's own binary on
    /// `scratch`, baked into the store (a cache hit while the binary is the
    /// same) and pushed to the environment's registry.
    fn balancer_image(&self) -> Result<String, String> {
        let mut cached = self
            .balancer_image
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cached.as_ref() {
            return Ok(r.clone());
        }
        let exe = std::env::var_os("KILN_EXE")
            .map(PathBuf::from)
            .or_else(|| std::env::current_exe().ok())
            .ok_or("cannot find kiln's own executable")?;
        let work = self.dir.join("balancer-image");
        let files = work.join("images").join(balancer::IMAGE_NAME).join("files");
        // Stage again only when the binary changed.
        let meta = std::fs::metadata(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        let stamp = format!(
            "{} {} {:?}",
            exe.display(),
            meta.len(),
            meta.modified().ok()
        );
        let stamp_file = work.join("staged");
        if std::fs::read_to_string(&stamp_file).ok().as_deref() != Some(stamp.as_str()) {
            let _ = std::fs::remove_dir_all(&files);
            balancer::stage(&exe, &files).map_err(|e| error_chain(&e))?;
            std::fs::write(&stamp_file, &stamp).map_err(|e| e.to_string())?;
        }
        let toml_path = work.join("kiln.toml");
        let project = kiln_spec::parse(&balancer::project_toml(), &toml_path, &work)
            .map_err(|e| e.to_string())?;
        let events = |_| {};
        let baked = kiln_image::bake::Baker::new(&project, &self.store, &events)
            .build(&[balancer::IMAGE_NAME.to_string()])
            .map_err(|e| format!("baking the balancer image: {}", error_chain(&e)))?;
        let digest: Digest = baked
            .last()
            .ok_or("baking the balancer image made nothing")?
            .record
            .digest
            .clone();
        let registry = self.registry().map_err(|e| e.to_string())?;
        let pushed = self
            .rt
            .block_on(registry.push(&self.store, &digest))
            .map_err(|e| format!("pushing the balancer image: {}", error_chain(&e)))?;
        *cached = Some(pushed.reference.clone());
        Ok(pushed.reference)
    }

    fn token_path(&self, env: &str, role: &str) -> PathBuf {
        self.dir
            .join("balancers")
            .join(format!("{env}-{role}.token"))
    }

    /// The role's control token, made on first use (32 random bytes, hex).
    fn balancer_token(&self, env: &str, role: &str) -> Result<String, ProviderError> {
        let path = self.token_path(env, role);
        if let Ok(t) = std::fs::read_to_string(&path) {
            if !t.trim().is_empty() {
                return Ok(t.trim().to_string());
            }
        }
        let io = |e: std::io::Error| fail(env, role, format!("{}: {e}", path.display()));
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(io)?,
            &mut bytes,
        )
        .map_err(io)?;
        let token = hex::encode(bytes);
        std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(io)?;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        std::io::Write::write_all(&mut f, token.as_bytes()).map_err(io)?;
        Ok(token)
    }
}

/// The nodes a role's balancers run on: those `named` (ids or hostnames),
/// or every node.
fn wanted_nodes(nodes: &[Node], named: &[String]) -> Result<BTreeSet<String>, String> {
    if named.is_empty() {
        return Ok(nodes.iter().map(|n| n.id.clone()).collect());
    }
    named
        .iter()
        .map(|want| {
            nodes
                .iter()
                .find(|n| &n.id == want || &n.hostname == want)
                .map(|n| n.id.clone())
                .ok_or_else(|| {
                    format!("the balancer names node `{want}`, which the swarm does not have")
                })
        })
        .collect()
}

/// Host ports kiln's services (servers and balancers) publish, by node id:
/// where its task runs, else the node it is pinned to.
pub(crate) fn taken_ports(all: &[Server]) -> BTreeMap<String, BTreeSet<u16>> {
    let mut out: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for s in all {
        let Some(spec) = &s.spec else { continue };
        let node = s
            .current()
            .map(|t| t.node_id.clone())
            .filter(|n| !n.is_empty())
            .or_else(|| spec.node.clone());
        if let Some(node) = node {
            out.entry(node)
                .or_default()
                .extend(spec.ports.iter().map(|p| p.published));
        }
    }
    out
}

fn listen_port(listen: &str) -> Result<u16, String> {
    listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| format!("listen address `{listen}` has no port"))
}

/// A running balancer's control channel.
fn live_of(s: &Server) -> Option<Live> {
    if !s.alive() {
        return None;
    }
    Some(Live {
        server: s.inventory_id(),
        control: format!("http://{}", s.address(CONTROL_PORT)?),
    })
}

/// Waits until a new balancer's control channel answers.
fn wait_control(l: &Live, token: &str) -> Result<(), String> {
    let agent = agent();
    let start = std::time::Instant::now();
    while start.elapsed() < SWITCH_TIMEOUT {
        if get_status(agent, l, token).is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "{}: its control channel at {} did not answer within {}s",
        l.server,
        l.control,
        SWITCH_TIMEOUT.as_secs()
    ))
}

fn put_backends(
    agent: &ureq::Agent,
    l: &Live,
    token: &str,
    set: &kiln_balancer::Backends,
) -> Result<u64, String> {
    let body = serde_json::to_string(set).map_err(|e| e.to_string())?;
    let mut resp = agent
        .put(format!("{}/backends", l.control))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(|e| format!("control channel {}: {e}", l.control))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        return Err(format!(
            "control channel answered {status}: {}",
            text.trim()
        ));
    }
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("generation")?.as_u64())
        .ok_or_else(|| format!("control channel answered without a generation: {text}"))
}

fn get_status(agent: &ureq::Agent, l: &Live, token: &str) -> Option<kiln_balancer::Status> {
    let mut resp = agent
        .get(format!("{}/status", l.control))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .ok()?;
    if resp.status().as_u16() != 200 {
        return None;
    }
    let text = resp.body_mut().read_to_string().ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Availability;

    fn node(id: &str, host: &str) -> Node {
        Node {
            id: id.into(),
            hostname: host.into(),
            addr: "10.0.0.1".into(),
            health: NodeHealth::Ready,
            availability: Availability::Active,
            manager: false,
            labels: BTreeMap::new(),
            nano_cpus: 0,
            memory_bytes: 0,
        }
    }

    #[test]
    fn balancers_run_on_the_named_nodes_or_on_every_node() {
        let nodes = [node("aaa", "one"), node("bbb", "two")];
        assert_eq!(wanted_nodes(&nodes, &[]).unwrap().len(), 2);
        let named = wanted_nodes(&nodes, &["two".into()]).unwrap();
        assert_eq!(named.into_iter().collect::<Vec<_>>(), ["bbb"]);
        let e = wanted_nodes(&nodes, &["three".into()]).unwrap_err();
        assert!(e.contains("`three`"), "{e}");
    }

    #[test]
    fn the_listen_port_is_the_published_one() {
        assert_eq!(listen_port("0.0.0.0:8080"), Ok(8080));
        assert!(listen_port("nowhere").is_err());
    }
}
