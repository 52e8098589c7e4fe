//! A role's balancer in the balancer's own terms (`kiln_balancer`), for
//! every provider that runs `kiln balancer serve`: the backend set kiln
//! asks for, and the state kiln reads back.

use std::collections::BTreeMap;

use kiln_model::{
    Balancer, BalancerAlgorithm, BalancerCheck, BalancerMode, BalancerTls, HealthCheck,
};

use crate::{Backend, Rotation, Upstream};

/// The backend set (generation left to the writer) and front settings
/// that serve `backends` as `b` declares.
pub fn backend_set(b: &Balancer, backends: &[Upstream]) -> kiln_balancer::Backends {
    let check = b.check.as_ref().and_then(balancer_check);
    // Servers of another release checked otherwise than the role now.
    let checks: BTreeMap<String, Option<kiln_balancer::Check>> = backends
        .iter()
        .map(|u| (u.addr.clone(), u.check.as_ref().and_then(balancer_check)))
        .filter(|(_, c)| *c != check)
        .collect();
    kiln_balancer::Backends {
        generation: 0,
        backends: backends.iter().map(|u| u.addr.clone()).collect(),
        check,
        checks,
        front: front(b),
    }
}

fn front(b: &Balancer) -> kiln_balancer::Front {
    kiln_balancer::Front {
        mode: match b.mode {
            BalancerMode::Http => kiln_balancer::Mode::Http,
            BalancerMode::Tcp => kiln_balancer::Mode::Tcp,
        },
        algorithm: match b.algorithm {
            BalancerAlgorithm::RoundRobin => kiln_balancer::Algorithm::RoundRobin,
            BalancerAlgorithm::LeastRequests => kiln_balancer::Algorithm::LeastRequests,
        },
        tls: b.tls.as_ref().map(|t| match t {
            BalancerTls::Files { cert, key } => kiln_balancer::Tls::Files {
                cert: cert.into(),
                key: key.into(),
            },
            BalancerTls::Acme {
                directory,
                email,
                domains,
                ca,
                renew_before_secs,
            } => kiln_balancer::Tls::Acme(kiln_balancer::Acme {
                directory: directory.clone(),
                email: email.clone(),
                domains: domains.clone(),
                ca: ca.as_ref().map(Into::into),
                renew_before_secs: *renew_before_secs,
                check_interval_ms: 3_600_000,
            }),
        }),
        admin: b.admin.clone(),
        max_requests: b.max_requests,
        queue_timeout_ms: b.queue_timeout_ms,
    }
}

/// The balancer's own active check for a role's health check: HTTP and TCP
/// checks (a command check is kiln's alone).
pub fn balancer_check(c: &BalancerCheck) -> Option<kiln_balancer::Check> {
    let probe = match &c.health {
        HealthCheck::Http { path, port } => kiln_balancer::Probe::Http {
            path: path.clone(),
            port: *port,
        },
        HealthCheck::Tcp { port } => kiln_balancer::Probe::Tcp { port: *port },
        HealthCheck::Command { .. } => return None,
    };
    Some(kiln_balancer::Check {
        probe,
        interval_ms: c.interval_ms,
        fall: c.fall,
        rise: c.rise,
    })
}

/// Each backend's place and counts, from the statuses of one role's
/// balancers (one on a single host; one per node on a swarm), summed over
/// them. A backend is draining if any balancer drains it, failing checks
/// if any has it down. Attempts are connections made plus connections that
/// failed; failures are failed connections plus HTTP 5xx responses.
pub fn backends_of(statuses: &[kiln_balancer::Status]) -> Vec<Backend> {
    let mut out: Vec<Backend> = Vec::new();
    for b in statuses.iter().flat_map(|s| &s.backends) {
        let rotation = if !b.active {
            Rotation::Draining
        } else if !b.healthy {
            Rotation::FailingChecks
        } else {
            Rotation::InRotation
        };
        let (attempts, failures) = (b.total + b.errors, b.errors + b.responses_5xx);
        match out.iter_mut().find(|o| o.addr == b.addr) {
            Some(o) => {
                o.attempts += attempts;
                o.failures += failures;
                o.rotation = o.rotation.max(rotation);
            }
            None => out.push(Backend {
                addr: b.addr.clone(),
                rotation,
                attempts,
                failures,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roles_front_settings_reach_the_balancer() {
        let b = Balancer {
            listen: "127.0.0.1:8000".into(),
            port: 8080,
            drain_timeout_secs: 30,
            check: None,
            mode: BalancerMode::Http,
            algorithm: BalancerAlgorithm::LeastRequests,
            tls: None,
            admin: Some("127.0.0.1:9100".into()),
            max_requests: Some(64),
            queue_timeout_ms: Some(0),
            nodes: Vec::new(),
        };
        let up = Upstream {
            addr: "10.0.0.2:8080".into(),
            port: 8080,
            check: None,
        };
        let set = backend_set(&b, &[up]);
        assert_eq!(set.backends, ["10.0.0.2:8080"]);
        assert_eq!(
            set.front,
            kiln_balancer::Front {
                mode: kiln_balancer::Mode::Http,
                algorithm: kiln_balancer::Algorithm::LeastRequests,
                tls: None,
                admin: Some("127.0.0.1:9100".into()),
                max_requests: Some(64),
                queue_timeout_ms: Some(0),
            }
        );
    }
}
