//! An in-memory provider for hermetic engine tests: servers are map
//! entries, and everything a real runtime can report is scriptable: health
//! (unhealthy images, hung servers), drift (changed files, foreign
//! processes, files written, changed limits), balancers (backends, request
//! and failure counts, a dead balancer process) and failures to create.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use kiln_model::{Balancer, HealthCheck, ImageRef, Server, Volume};

use crate::{
    Backend, BalancerState, FileCheck, Inspection, LogChunk, Provider, ProviderError, Rotation,
    Running, ServerRequest, Started,
};

/// A fake role balancer.
#[derive(Debug, Clone, Default)]
pub struct FakeBalancer {
    pub alive: bool,
    /// Backends taking new connections.
    pub backends: Vec<String>,
    /// Backends removed whose connections are still open.
    pub draining: Vec<String>,
    /// Scripted counts per backend: (attempts, failures).
    pub counts: BTreeMap<String, (u64, u64)>,
    /// Instances that missed the last switch (a node was away); the next
    /// switch brings them up to date.
    pub behind: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Fake {
    pub servers: RefCell<BTreeMap<String, Running>>,
    /// Images (by digest) whose servers never become healthy.
    pub unhealthy_images: RefCell<BTreeSet<String>>,
    /// Servers (by id) that run but fail every health check (hung).
    pub hung: RefCell<BTreeSet<String>>,
    /// Server ids whose creation fails.
    pub fail_create: RefCell<BTreeSet<String>>,
    /// Image versions (by digest) the runtime cannot get.
    pub fail_prepare: RefCell<BTreeSet<String>>,
    /// What inspecting a server finds, by id.
    pub inspections: RefCell<BTreeMap<String, Inspection>>,
    /// Differences from the seal, by server id.
    pub file_differences: RefCell<BTreeMap<String, Vec<String>>>,
    /// Balancers by `env/role`.
    pub balancers: RefCell<BTreeMap<String, FakeBalancer>>,
    /// Logs by server id (destroyed servers keep theirs).
    pub logs: RefCell<BTreeMap<String, String>>,
    /// Evidence kept by `quarantine`: server id → (env, findings).
    pub quarantined: RefCell<BTreeMap<String, (String, String)>>,
    /// Subnets something else on the host uses, with who.
    pub conflicts: RefCell<BTreeMap<kiln_model::Subnet, String>>,
    /// What each environment's DNS answers, as last published.
    pub names: RefCell<BTreeMap<String, crate::Names>>,
    /// Environments torn down.
    pub torn_down: RefCell<Vec<String>>,
    /// Every create request, in order (what the engine launched servers from).
    pub requests: RefCell<Vec<ServerRequest>>,
    /// Traffic added to a backend's counts at every look at its balancer:
    /// backend → (attempts, failures).
    pub traffic: RefCell<BTreeMap<String, (u64, u64)>>,
    /// Every call, in order: `create app-1234`, `destroy app-1234`.
    pub calls: RefCell<Vec<String>>,
    next_pid: RefCell<i32>,
    digests: RefCell<BTreeMap<String, String>>,
}

fn key(env: &str, role: &str) -> String {
    format!("{env}/{role}")
}

impl Fake {
    fn call(&self, what: String) {
        self.calls.borrow_mut().push(what);
    }

    /// Scripts the counts a role's balancer reports for `backend`.
    pub fn set_counts(&self, env: &str, role: &str, backend: &str, attempts: u64, failures: u64) {
        self.balancers
            .borrow_mut()
            .entry(key(env, role))
            .or_default()
            .counts
            .insert(backend.to_string(), (attempts, failures));
    }

    /// Makes a role's balancer process die.
    pub fn kill_balancer(&self, env: &str, role: &str) {
        if let Some(b) = self.balancers.borrow_mut().get_mut(&key(env, role)) {
            b.alive = false;
        }
    }

    /// Marks an instance of the role's balancer as having missed the last
    /// switch, as a balancer on a node that was down does.
    pub fn leave_behind(&self, env: &str, role: &str, instance: &str) {
        if let Some(b) = self.balancers.borrow_mut().get_mut(&key(env, role)) {
            b.behind.push(instance.to_string());
        }
    }

    /// Adds a backend behind kiln's back.
    pub fn add_backend(&self, env: &str, role: &str, backend: &str) {
        self.balancers
            .borrow_mut()
            .entry(key(env, role))
            .or_default()
            .backends
            .push(backend.to_string());
    }

    /// The backends a role's balancer routes to now.
    pub fn backends(&self, env: &str, role: &str) -> Vec<String> {
        self.balancers
            .borrow()
            .get(&key(env, role))
            .map(|b| b.backends.clone())
            .unwrap_or_default()
    }

    /// Starts a server kiln did not create, labelled with `env` and `role`.
    pub fn start_stray(&self, env: &str, role: &str, id: &str) {
        self.servers.borrow_mut().insert(
            id.to_string(),
            Running {
                id: id.into(),
                env: env.into(),
                role: role.into(),
                release: 0,
                pid: Some(99_999),
                alive: true,
                record: None,
            },
        );
    }

    /// Makes a server's process die.
    pub fn crash(&self, id: &str) {
        if let Some(s) = self.servers.borrow_mut().get_mut(id) {
            s.alive = false;
        }
    }
}

impl Provider for Fake {
    fn nodes(&self, _env: &str) -> Result<Vec<kiln_model::NodeInfo>, ProviderError> {
        // One host: the planner places nothing.
        Ok(Vec::new())
    }

    fn prepare(&self, _env: &str, images: &[ImageRef]) -> Result<(), ProviderError> {
        for i in images {
            self.call(format!("prepare {i}"));
            if self.fail_prepare.borrow().contains(&i.digest) {
                return Err(ProviderError::Prepare {
                    image: i.to_string(),
                    detail: "scripted failure".into(),
                });
            }
        }
        Ok(())
    }

    fn create(&self, req: &ServerRequest) -> Result<Started, ProviderError> {
        self.call(format!("create {}", req.id));
        self.requests.borrow_mut().push(req.clone());
        if self.fail_create.borrow().contains(&req.id) {
            return Err(ProviderError::Create {
                id: req.id.clone(),
                detail: "scripted failure".into(),
            });
        }
        let mut pid = self.next_pid.borrow_mut();
        *pid += 1;
        self.servers.borrow_mut().insert(
            req.id.clone(),
            Running {
                id: req.id.clone(),
                env: req.env.clone(),
                role: req.role.clone(),
                release: req.release,
                pid: Some(*pid),
                alive: true,
                record: Some(Server {
                    id: req.id.clone(),
                    env: req.env.clone(),
                    role: req.role.clone(),
                    slot: req.slot,
                    image: req.image.to_string(),
                    image_digest: req.image.digest.clone(),
                    spec_hash: req.spec_hash.clone(),
                    address: req.address.clone(),
                    created: 0,
                    status: kiln_model::ServerStatus::Running,
                    pid: Some(*pid),
                    release: req.release,
                    standby_until: None,
                    node: None,
                    published: Default::default(),
                }),
            },
        );
        self.digests
            .borrow_mut()
            .insert(req.id.clone(), req.image.digest.clone());
        self.logs.borrow_mut().insert(
            req.id.clone(),
            format!("{} started: {}\n", req.id, req.launch.argv.join(" ")),
        );
        Ok(Started {
            pid: Some(*pid),
            ..Started::default()
        })
    }

    fn destroy(&self, _env: &str, id: &str) -> Result<(), ProviderError> {
        self.call(format!("destroy {id}"));
        self.servers.borrow_mut().remove(id);
        Ok(())
    }

    fn inventory(&self, env: &str) -> Result<Vec<Running>, ProviderError> {
        Ok(self
            .servers
            .borrow()
            .values()
            .filter(|r| r.env == env)
            .cloned()
            .collect())
    }

    fn probe(&self, server: &Server, _check: &HealthCheck) -> bool {
        let digest = self
            .digests
            .borrow()
            .get(&server.id)
            .cloned()
            .unwrap_or_else(|| server.image_digest.clone());
        self.servers
            .borrow()
            .get(&server.id)
            .is_some_and(|s| s.alive)
            && !self.unhealthy_images.borrow().contains(&digest)
            && !self.hung.borrow().contains(&server.id)
    }

    fn log_ids(&self, _env: &str) -> Result<Vec<String>, ProviderError> {
        Ok(self.logs.borrow().keys().cloned().collect())
    }

    fn read_log(&self, _env: &str, id: &str, offset: u64) -> Result<LogChunk, ProviderError> {
        let logs = self.logs.borrow();
        let text = logs.get(id).map(|s| s.as_bytes()).unwrap_or(&[]);
        let from = (offset as usize).min(text.len());
        Ok(LogChunk {
            bytes: text[from..].to_vec(),
            next: text.len() as u64,
        })
    }

    fn balance(
        &self,
        env: &str,
        role: &str,
        _b: &Balancer,
        backends: &[crate::Upstream],
    ) -> Result<(), ProviderError> {
        let backends: Vec<String> = backends.iter().map(|u| u.addr.clone()).collect();
        self.call(format!("balance {role} [{}]", backends.join(" ")));
        let mut all = self.balancers.borrow_mut();
        let b = all.entry(key(env, role)).or_default();
        for gone in b.backends.iter().filter(|a| !backends.contains(a)) {
            if !b.draining.contains(gone) {
                b.draining.push(gone.clone());
            }
        }
        b.draining.retain(|a| !backends.contains(a));
        b.backends = backends;
        b.alive = true;
        b.behind.clear();
        Ok(())
    }

    fn publish(&self, env: &str, names: &crate::Names) -> Result<(), ProviderError> {
        self.names
            .borrow_mut()
            .insert(env.to_string(), names.clone());
        Ok(())
    }

    fn dns_server(&self, _env: &str) -> Option<std::net::SocketAddr> {
        None
    }

    fn drain(&self, env: &str, role: &str, backend: &str, _timeout: std::time::Duration) -> bool {
        self.call(format!("drain {backend}"));
        if let Some(b) = self.balancers.borrow_mut().get_mut(&key(env, role)) {
            b.draining.retain(|a| a != backend);
        }
        true
    }

    fn balancer(&self, env: &str, role: &str) -> Option<BalancerState> {
        let mut all = self.balancers.borrow_mut();
        let b = all.get_mut(&key(env, role))?;
        for (addr, (attempts, failures)) in self.traffic.borrow().iter() {
            let c = b.counts.entry(addr.clone()).or_default();
            c.0 += attempts;
            c.1 += failures;
        }
        let count = |a: &str| b.counts.get(a).copied().unwrap_or((0, 0));
        let mut backends: Vec<Backend> = b
            .backends
            .iter()
            .map(|a| Backend {
                addr: a.clone(),
                rotation: Rotation::InRotation,
                attempts: count(a).0,
                failures: count(a).1,
            })
            .collect();
        backends.extend(b.draining.iter().map(|a| Backend {
            addr: a.clone(),
            rotation: Rotation::Draining,
            attempts: count(a).0,
            failures: count(a).1,
        }));
        Some(BalancerState {
            alive: b.alive,
            backends,
            behind: b.behind.clone(),
        })
    }

    fn remove_balancer(&self, env: &str, role: &str) -> Result<(), ProviderError> {
        self.call(format!("remove balancer {role}"));
        self.balancers.borrow_mut().remove(&key(env, role));
        Ok(())
    }

    fn inspect(&self, server: &Server, _volumes: &[Volume]) -> Inspection {
        self.inspections
            .borrow()
            .get(&server.id)
            .cloned()
            .unwrap_or_else(|| Inspection {
                image_digest: Some(server.image_digest.clone()),
                ..Inspection::default()
            })
    }

    fn verify_files(
        &self,
        image: &ImageRef,
        servers: &[&Server],
        full: bool,
    ) -> Result<FileCheck, ProviderError> {
        self.call(format!("verify {image}"));
        let found = self.file_differences.borrow();
        Ok(FileCheck {
            differences: servers
                .iter()
                .filter_map(|s| found.get(&s.id).map(|d| (s.id.clone(), d.clone())))
                .collect(),
            full,
        })
    }

    fn quarantine(
        &self,
        server: &Server,
        _volumes: &[Volume],
        findings_json: &str,
    ) -> Result<String, ProviderError> {
        self.call(format!("quarantine {}", server.id));
        self.quarantined.borrow_mut().insert(
            server.id.clone(),
            (server.env.clone(), findings_json.to_string()),
        );
        Ok(format!("fake:{}", server.id))
    }

    fn expire_quarantine(&self, env: &str, before: i64) -> Result<Vec<String>, ProviderError> {
        let mut gone = Vec::new();
        self.quarantined.borrow_mut().retain(|id, (e, json)| {
            let at = serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v["quarantined_at"].as_i64())
                .unwrap_or(i64::MAX);
            let keep = e != env || at >= before;
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        Ok(gone)
    }

    fn taken_ids(&self) -> Result<BTreeSet<String>, ProviderError> {
        Ok(BTreeSet::new())
    }

    fn network(&self, _env: &str) -> Option<kiln_model::Subnet> {
        None
    }

    fn network_conflict(
        &self,
        _env: &str,
        subnet: kiln_model::Subnet,
    ) -> Result<Option<String>, ProviderError> {
        Ok(self.conflicts.borrow().get(&subnet).cloned())
    }

    fn teardown(&self, env: &str) -> Result<(), ProviderError> {
        self.call(format!("teardown {env}"));
        self.torn_down.borrow_mut().push(env.to_string());
        Ok(())
    }
}
