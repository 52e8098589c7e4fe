//! The planner: a pure function from (desired environment, resolved role
//! targets, observed servers, clock, randomness) to a [`Plan`].
//!
//! Invariants: no I/O, no clock or random source of its own (both are
//! arguments), deterministic for the same inputs. Everything execution
//! needs is decided here: new server ids, slots and addresses, so the
//! engine makes no choices.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use kiln_model::{
    Action, Change, EnvSpec, Plan, RoleSpec, RoleTarget, Server, ServerStatus, Strategy,
};

/// Version of the plan file format written by this planner.
pub const PLAN_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The environment's subnet cannot hold the servers it declares.
    #[error("subnet {subnet} of environment `{env}` has no free address for another server")]
    SubnetFull { env: String, subnet: String },
    /// The subnet is not an IPv4 CIDR.
    #[error("subnet `{subnet}` of environment `{env}` is not an IPv4 network like 10.88.1.0/24")]
    BadSubnet { env: String, subnet: String },
    /// A role has no resolved target (its image was not built).
    #[error("role `{role}` has no target; its image must be built first")]
    NoTarget { role: String },
}

/// Everything the planner looks at.
pub struct Input<'a> {
    pub env: &'a EnvSpec,
    /// One per role of `env`, resolved from the image store.
    pub targets: &'a [RoleTarget],
    /// Every server the state records for this environment, any status.
    pub observed: &'a [Server],
    /// Ids of observed servers that are not actually running (crashed).
    pub dead: &'a BTreeSet<String>,
    pub generation: i64,
    pub now: i64,
    /// `kiln deploy --cold`: destroy everything, then create afresh.
    pub cold: bool,
    /// Servers to replace although their image and spec are current, with
    /// why (reconcile: drift policy, TTL).
    pub force: &'a BTreeMap<String, String>,
    /// Server ids in use outside this environment (other environments,
    /// other projects on the same host): new ids avoid them.
    pub taken: &'a BTreeSet<String>,
}

/// Roles in start order: every role after the roles it depends on, ties by name.
pub fn role_order(env: &EnvSpec) -> Vec<String> {
    fn visit(r: &str, env: &EnvSpec, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
        if !seen.insert(r.to_string()) {
            return;
        }
        for d in &env.roles[r].depends_on {
            visit(d, env, seen, out);
        }
        out.push(r.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for r in env.roles.keys() {
        visit(r, env, &mut seen, &mut out);
    }
    out
}

/// Hash of what a role's servers are made of, besides the image: size,
/// ports, volumes and environment. Count, strategy and policies are not in
/// it: changing them does not make existing servers wrong.
pub fn spec_hash(role: &RoleSpec) -> String {
    let v = serde_json::json!({
        "cpus": role.size.cpus,
        "memory": role.size.memory_bytes,
        "ports": role.ports,
        "volumes": role.volumes,
        "env": role.env,
    });
    blake3::hash(v.to_string().as_bytes()).to_hex()[..16].to_string()
}

/// `10.88.1.0/24` → (network, prefix).
pub fn parse_subnet(cidr: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = cidr.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok()?;
    if !(8..=30).contains(&prefix) {
        return None;
    }
    let mask = u32::MAX << (32 - prefix);
    Some((Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

/// Makes the plan. `random` supplies the 16-bit suffixes of new server ids.
pub fn plan(input: &Input, random: &mut dyn FnMut() -> u16) -> Result<Plan, PlanError> {
    let env = input.env;
    let order = role_order(env);
    let (net, prefix) = parse_subnet(&env.subnet).ok_or_else(|| PlanError::BadSubnet {
        env: env.name.clone(),
        subnet: env.subnet.clone(),
    })?;
    let mut ids: BTreeSet<String> = input
        .observed
        .iter()
        .map(|s| s.id.clone())
        .chain(input.taken.iter().cloned())
        .collect();
    let mut used: BTreeSet<Ipv4Addr> = input
        .observed
        .iter()
        .filter_map(|s| s.address.parse().ok())
        .collect();
    let hosts = (1u32 << (32 - prefix)) - 2;
    // .1 is the gateway; servers take the lowest free address from .2. The
    // cursor only moves forward: addresses are handed out in one pass.
    let mut cursor = 2u32;
    let mut next_addr = || -> Result<String, PlanError> {
        while cursor <= hosts {
            let a = Ipv4Addr::from(u32::from(net) + cursor);
            cursor += 1;
            if used.insert(a) {
                return Ok(a.to_string());
            }
        }
        Err(PlanError::SubnetFull {
            env: env.name.clone(),
            subnet: env.subnet.clone(),
        })
    };
    let had_slot: BTreeSet<(&str, u32)> = input
        .observed
        .iter()
        .map(|s| (s.role.as_str(), s.slot))
        .collect();
    let mut new_id = |role: &str| -> String {
        loop {
            let id = format!("{role}-{:04x}", random());
            if ids.insert(id.clone()) {
                return id;
            }
        }
    };
    let targets: BTreeMap<&str, &RoleTarget> =
        input.targets.iter().map(|t| (t.role.as_str(), t)).collect();
    // Only running, live servers count as present; the engine cleans up
    // the rest (half-created, half-destroyed, crashed) before it executes.
    let live: Vec<&Server> = input
        .observed
        .iter()
        .filter(|s| s.status == ServerStatus::Running && !input.dead.contains(&s.id))
        .collect();
    let mut changes = Vec::new();

    let mut batch = 0u32;
    if input.cold {
        for role in order.iter().rev() {
            for s in live.iter().filter(|s| &s.role == role) {
                let mut d = destroy(s, "cold deploy: every server is destroyed first");
                d.batch = next(&mut batch);
                changes.push(d);
            }
        }
        for s in live.iter().filter(|s| !env.roles.contains_key(&s.role)) {
            let mut d = destroy(s, "role removed from the environment");
            d.batch = next(&mut batch);
            changes.push(d);
        }
    }

    for role in &order {
        let t = targets
            .get(role.as_str())
            .ok_or_else(|| PlanError::NoTarget { role: role.clone() })?;
        let spec = &env.roles[role];
        let mut by_slot: BTreeMap<u32, &Server> = BTreeMap::new();
        let mut extra = Vec::new();
        if !input.cold {
            let mut mine: Vec<&&Server> = live.iter().filter(|s| &s.role == role).collect();
            mine.sort_by_key(|s| (s.slot, s.created, s.id.clone()));
            for s in mine {
                if s.slot < t.servers && !by_slot.contains_key(&s.slot) {
                    by_slot.insert(s.slot, s);
                } else {
                    extra.push(*s);
                }
            }
        }
        // Warm standby servers of a blue-green rollout: destroyed once their
        // window is over, otherwise available for an instant switch back.
        let mut standby: Vec<&Server> = Vec::new();
        for s in input.observed.iter().filter(|s| {
            &s.role == role && s.status == ServerStatus::Standby && !input.dead.contains(&s.id)
        }) {
            if input.cold || s.standby_until.is_none_or(|u| u <= input.now) {
                let mut d = destroy(s, "blue-green rollback window is over");
                d.batch = next(&mut batch);
                changes.push(d);
            } else {
                standby.push(s);
            }
        }
        let mut replaces = Vec::new();
        for slot in 0..t.servers {
            match by_slot.get(&slot) {
                None => {
                    let id = new_id(role);
                    let had = had_slot.contains(&(role.as_str(), slot));
                    let reason = if input.cold {
                        "cold deploy".to_string()
                    } else if had {
                        format!("slot {slot} has no running server")
                    } else {
                        "new server".to_string()
                    };
                    let mut c = Change::new(Action::Create, role, &id, slot, &reason);
                    c.address = Some(next_addr()?);
                    c.image = Some(t.image.clone());
                    c.batch = next(&mut batch);
                    changes.push(c);
                }
                Some(s) => {
                    let reason = if s.image_digest != t.image_digest {
                        Some(format!("image changed ({} → {})", s.image, t.image))
                    } else if s.spec_hash != t.spec_hash {
                        Some("spec changed".to_string())
                    } else {
                        input.force.get(&s.id).cloned()
                    };
                    if let Some(reason) = reason {
                        let mut c = Change::new(Action::Replace, role, &s.id, slot, &reason);
                        c.image = Some(t.image.clone());
                        c.cold = t.cold;
                        if t.cold {
                            c.reason = format!(
                                "{reason}; cold-only: destroyed before its replacement starts"
                            );
                        }
                        replaces.push(c);
                    }
                }
            }
        }
        // Batches of replacements, by strategy.
        let strategy = if t.cold {
            Strategy::Rolling {
                max_surge: 1,
                max_unavailable: 0,
                min_healthy_secs: 0,
            }
        } else {
            spec.strategy.clone()
        };
        let promotable: Vec<&Server> = standby
            .iter()
            .copied()
            .filter(|s| s.image_digest == t.image_digest && s.spec_hash == t.spec_hash)
            .collect();
        match strategy {
            Strategy::BlueGreen {
                rollback_window_secs,
            } if !replaces.is_empty() => {
                let b = next(&mut batch);
                let switch_back = promotable.len() >= replaces.len();
                for (i, mut c) in replaces.into_iter().enumerate() {
                    c.batch = b;
                    if switch_back {
                        let s = promotable[i];
                        c.replacement = Some(s.id.clone());
                        c.address = Some(s.address.clone());
                        c.promote = true;
                        c.reason =
                            format!("{}; blue-green: switch back to warm {}", c.reason, s.id);
                    } else {
                        c.replacement = Some(new_id(role));
                        c.address = Some(next_addr()?);
                        c.keep_warm_secs = Some(rollback_window_secs);
                        c.reason = format!(
                            "{}; blue-green: new set, one switch, old set warm for {}s",
                            c.reason, rollback_window_secs
                        );
                    }
                    changes.push(c);
                }
                // Standby servers that are not switched back to are of no further use.
                if !switch_back {
                    for s in &standby {
                        let mut d = destroy(s, "superseded standby server");
                        d.batch = b;
                        changes.push(d);
                    }
                }
            }
            Strategy::Canary {
                share_percent,
                bake_secs,
                max_error_rate,
            } if !replaces.is_empty() => {
                let first =
                    ((replaces.len() as u64 * share_percent as u64).div_ceil(100)).max(1) as usize;
                let b = next(&mut batch);
                for (i, mut c) in replaces.into_iter().enumerate() {
                    c.replacement = Some(new_id(role));
                    c.address = Some(next_addr()?);
                    if i < first {
                        c.batch = b;
                        c.bake_secs = Some(bake_secs);
                        c.max_error_rate = Some(max_error_rate);
                        c.reason = format!(
                            "{}; canary ({share_percent}%), baked {bake_secs}s",
                            c.reason
                        );
                    } else {
                        c.batch = next(&mut batch);
                    }
                    changes.push(c);
                }
            }
            Strategy::Rolling {
                max_surge,
                max_unavailable,
                ..
            } => {
                // Kubernetes' reading: a batch replaces `max_surge +
                // max_unavailable` servers; `max_unavailable` of them are
                // destroyed before their replacements start (capacity may
                // drop by that much), the rest are surged (created first).
                let (surge, unavailable) = if t.cold {
                    (1, 0)
                } else {
                    (max_surge as usize, max_unavailable as usize)
                };
                let size = (surge + unavailable).max(1);
                for (i, mut c) in replaces.into_iter().enumerate() {
                    if i % size < unavailable && !c.cold {
                        c.cold = true;
                        c.reason = format!("{}; max_unavailable = {unavailable}: destroyed before its replacement starts", c.reason);
                    }
                    c.replacement = Some(new_id(role));
                    c.address = Some(next_addr()?);
                    if i % size == 0 {
                        next(&mut batch);
                    }
                    c.batch = batch;
                    changes.push(c);
                }
            }
            _ => {}
        }
        for s in extra {
            let mut d = destroy(s, &format!("scaled down to {} servers", t.servers));
            d.batch = next(&mut batch);
            changes.push(d);
        }
    }
    if !input.cold {
        for s in input.observed.iter().filter(|s| {
            !env.roles.contains_key(&s.role)
                && !input.dead.contains(&s.id)
                && matches!(s.status, ServerStatus::Running | ServerStatus::Standby)
        }) {
            let mut d = destroy(s, "role removed from the environment");
            d.batch = next(&mut batch);
            changes.push(d);
        }
    }
    Ok(Plan {
        format: PLAN_FORMAT,
        env: env.name.clone(),
        generation: input.generation,
        created: input.now,
        order,
        targets: input.targets.to_vec(),
        changes,
        cold: input.cold,
        destroy: false,
        author: String::new(),
    })
}

fn destroy(s: &Server, reason: &str) -> Change {
    Change::new(Action::Destroy, &s.role, &s.id, s.slot, reason)
}

fn next(batch: &mut u32) -> u32 {
    *batch += 1;
    *batch
}

/// The plan as text, one line per change, Terraform-style markers (`+`
/// create, `~` replace, `-` destroy) and a summary. Colours are the CLI's.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    if plan.changes.is_empty() {
        out.push_str(&format!(
            "No changes. Environment `{}` matches its declaration.\n",
            plan.env
        ));
        return out;
    }
    out.push_str(&format!(
        "kiln will make these changes to `{}`{}:\n\n",
        plan.env,
        if plan.cold {
            " (cold deploy: NOT zero-downtime)"
        } else {
            ""
        }
    ));
    let mut sizes: BTreeMap<u32, usize> = BTreeMap::new();
    for c in &plan.changes {
        *sizes.entry(c.batch).or_default() += 1;
    }
    let mut shown = BTreeSet::new();
    for c in &plan.changes {
        if sizes[&c.batch] > 1 && shown.insert(c.batch) {
            let what = if c.promote {
                "switch back in one step"
            } else if c.keep_warm_secs.is_some() {
                "blue-green: all up and healthy, then one switch"
            } else if c.bake_secs.is_some() {
                "canary: up, switched, then baked before the rest"
            } else if plan.changes.iter().any(|o| o.batch == c.batch && o.cold) {
                "together: destroy-first ones drained and destroyed, then all up and healthy, then one switch"
            } else {
                "together: up and healthy, then one switch"
            };
            out.push_str(&format!(
                "  batch {} ({} servers, {what}):\n",
                c.batch, sizes[&c.batch]
            ));
        }
        let line = match c.action {
            Action::Create => format!(
                "  + {:<10} create   {} at {}  ({})",
                c.server,
                c.image.as_deref().unwrap_or("?"),
                c.address.as_deref().unwrap_or("?"),
                c.reason
            ),
            Action::Replace => format!(
                "  ~ {:<10} replace  by {} ({} at {}){}  ({})",
                c.server,
                c.replacement.as_deref().unwrap_or("?"),
                c.image.as_deref().unwrap_or("?"),
                c.address.as_deref().unwrap_or("?"),
                if c.promote {
                    ", switch back"
                } else if c.cold {
                    ", destroy first"
                } else {
                    ", create first"
                },
                c.reason
            ),
            Action::Destroy => format!("  - {:<10} destroy  ({})", c.server, c.reason),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!(
        "\nPlan: {} to create, {} to replace, {} to destroy.\n",
        plan.count(Action::Create),
        plan.count(Action::Replace),
        plan.count(Action::Destroy)
    ));
    out
}

#[cfg(test)]
mod tests;
