//! Bringing the runtime and the state into agreement before an apply:
//! finishing what a crashed run left half-done, removing servers whose
//! process died, and resetting every balancer to the live servers. Strays
//! (sandboxes the state does not know) are the plan's to destroy.

use std::collections::BTreeSet;

use kiln_model::{RoleTarget, ServerStatus};

use crate::{Engine, Progress, Result};

impl Engine<'_> {
    /// Converges `env` (the caller holds its lock). `targets` say which
    /// roles have balancers. Returns what was done, one line each; every
    /// line is also an event of the environment.
    pub fn converge_runtime(&self, env: &str, targets: &[RoleTarget]) -> Result<Vec<String>> {
        let actor = kiln_state::actor();
        let mut done = Vec::new();
        let mut record = |detail: String| -> Result<()> {
            self.state.record_event(env, &actor, "cleanup", &detail)?;
            (self.progress)(Progress::Converged {
                detail: detail.clone(),
            });
            done.push(detail);
            Ok(())
        };
        let running = self.provider.inventory(env)?;
        let alive: BTreeSet<&str> = running
            .iter()
            .filter(|r| r.alive)
            .map(|r| r.id.as_str())
            .collect();
        let servers = self.state.servers(Some(env))?;
        for s in &servers {
            let why = match s.status {
                ServerStatus::Creating => "half-created by an interrupted apply",
                ServerStatus::Destroying => "half-destroyed by an interrupted apply",
                _ if !alive.contains(s.id.as_str()) => "its process is gone",
                _ => continue,
            };
            self.provider.destroy(env, &s.id)?;
            self.state.remove_server(&s.id)?;
            record(format!("removed server {} ({why})", s.id))?;
        }
        // Whatever happened before, balancers route only to live servers.
        let servers = self.state.servers(Some(env))?;
        let fronts = crate::drift::fronts(targets.iter().map(|t| &t.spec));
        for (role, addr) in self.unknown_backends(env, &servers, &fronts) {
            record(format!(
                "removed backend {addr} from the balancer of `{role}` (no server of the state)"
            ))?;
        }
        for (role, b) in &fronts {
            self.rebalance(env, role, Some(b), &[])?;
        }
        Ok(done)
    }
}
