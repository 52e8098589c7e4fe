//! An in-memory provider: servers are map entries, health is scripted.
//! Lets engine tests run without root, containers or networks.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use kiln_model::{Balancer, HealthCheck};

use crate::{Provider, ProviderError, Running, ServerRequest};

#[derive(Debug, Default)]
pub struct Fake {
    pub servers: RefCell<BTreeMap<String, Running>>,
    /// Images (by digest) whose servers never become healthy.
    pub unhealthy_images: RefCell<BTreeSet<String>>,
    /// Servers (by id) that run but fail every health check (hung).
    pub hung: RefCell<BTreeSet<String>>,
    /// Every call, in order: `create app-1234`, `destroy app-1234`.
    pub calls: RefCell<Vec<String>>,
    next_pid: RefCell<i32>,
    digests: RefCell<BTreeMap<String, String>>,
}

impl Provider for Fake {
    fn create(&self, req: &ServerRequest) -> Result<i32, ProviderError> {
        self.calls.borrow_mut().push(format!("create {}", req.id));
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
            },
        );
        self.digests
            .borrow_mut()
            .insert(req.id.clone(), req.image_digest.clone());
        Ok(*pid)
    }

    fn destroy(&self, _env: &str, id: &str) -> Result<(), ProviderError> {
        self.calls.borrow_mut().push(format!("destroy {id}"));
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

    fn probe(&self, req: &ServerRequest, _check: &HealthCheck) -> bool {
        let digest = self
            .digests
            .borrow()
            .get(&req.id)
            .cloned()
            .unwrap_or_default();
        self.servers.borrow().get(&req.id).is_some_and(|s| s.alive)
            && !self.unhealthy_images.borrow().contains(&digest)
            && !self.hung.borrow().contains(&req.id)
    }

    fn log_path(&self, env: &str, id: &str) -> PathBuf {
        PathBuf::from(format!("/nonexistent/{env}/{id}.log"))
    }

    fn balance(
        &self,
        _env: &str,
        role: &str,
        _b: &Balancer,
        backends: &[String],
    ) -> Result<(), ProviderError> {
        self.calls
            .borrow_mut()
            .push(format!("balance {role} [{}]", backends.join(" ")));
        Ok(())
    }

    fn drain(&self, _env: &str, _role: &str, backend: &str, _timeout: std::time::Duration) -> bool {
        self.calls.borrow_mut().push(format!("drain {backend}"));
        true
    }

    fn remove_balancer(&self, _env: &str, role: &str) -> Result<(), ProviderError> {
        self.calls
            .borrow_mut()
            .push(format!("remove balancer {role}"));
        Ok(())
    }
}
