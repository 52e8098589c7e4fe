//! Choosing what to return to: rollback targets from the releases an
//! environment has had, and the check that a saved plan still matches the
//! declaration it was made from.

use std::fmt;

use kiln_model::{EnvSpec, Outcome, Plan, PlanKind, Release, RoleTarget};

use crate::PlanError;

/// Releases that can be returned to: they succeeded and left servers.
fn usable(r: &Release) -> bool {
    r.outcome == Outcome::Succeeded && r.kind != PlanKind::Destroy && !r.targets.is_empty()
}

/// What a release's targets are, for "does it run something different".
fn identity(targets: &[RoleTarget]) -> Vec<(&str, &str, &str)> {
    let mut v: Vec<_> = targets
        .iter()
        .map(|t| {
            (
                t.role.as_str(),
                t.image.digest.as_str(),
                t.spec_hash.as_str(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The current targets with each role's target replaced by the one `old`
/// had (image, launch and declared spec), keeping today's server count.
/// Roles declared since keep their current target.
fn merge(old: &[RoleTarget], current: &[RoleTarget]) -> Vec<RoleTarget> {
    current
        .iter()
        .map(|t| match old.iter().find(|o| o.role == t.role) {
            Some(o) => RoleTarget {
                servers: t.servers,
                ..o.clone()
            },
            None => t.clone(),
        })
        .collect()
}

/// `kiln rollback [--to N]`: the release to return to and the targets that
/// takes: release `to`, or else the last successful release before the last
/// successful one that ran something different.
pub fn rollback_targets(
    env: &str,
    releases: &[Release],
    to: Option<i64>,
    current: &[RoleTarget],
) -> Result<(i64, Vec<RoleTarget>), PlanError> {
    let no = |reason: String| PlanError::NoRollback {
        env: env.into(),
        reason,
    };
    let pick = match to {
        Some(n) => {
            let r = releases
                .iter()
                .find(|r| r.id == n)
                .ok_or_else(|| no(format!("there is no release #{n}")))?;
            if !usable(r) {
                return Err(no(format!(
                    "release #{n} ({}, {}) left no servers to return to; pick one that succeeded",
                    r.kind, r.outcome
                )));
            }
            r
        }
        None => {
            let ok: Vec<&Release> = releases.iter().filter(|r| usable(r)).collect();
            let latest = ok
                .last()
                .ok_or_else(|| no("no release succeeded yet".into()))?;
            ok.iter()
                .rev()
                .find(|r| identity(&r.targets) != identity(&latest.targets))
                .copied()
                .ok_or_else(|| no("no earlier release runs different images".into()))?
        }
    };
    Ok((pick.id, merge(&pick.targets, current)))
}

/// After a failed apply: the last release that succeeded before it and the
/// targets that return to it, if there is one.
pub fn auto_rollback(
    releases_before: &[Release],
    current: &[RoleTarget],
) -> Option<(i64, Vec<RoleTarget>)> {
    let prev = releases_before.iter().rev().find(|r| usable(r))?;
    Some((prev.id, merge(&prev.targets, current)))
}

/// One way a saved plan no longer matches `kiln.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredChange {
    /// The role, or `None` for an environment setting.
    pub role: Option<String>,
    /// The field that differs: `env`, `size`, `subnet`; `role` when the
    /// role was added or removed.
    pub field: String,
}

impl fmt::Display for DeclaredChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.role, self.field.as_str()) {
            (Some(r), "role") => write!(f, "role `{r}` was added or removed"),
            (Some(r), field) => write!(f, "`{field}` of role `{r}` changed"),
            (None, field) => write!(f, "`{field}` of the environment changed"),
        }
    }
}

/// How the declaration of `env` differs from the role specs `plan` carries:
/// empty when the plan still describes what `kiln.toml` declares. A
/// destroy plan carries no role specs and matches any declaration.
pub fn declared_changes(plan: &Plan, env: &EnvSpec) -> Vec<DeclaredChange> {
    let mut out = Vec::new();
    if plan.target.subnet != env.subnet {
        out.push(DeclaredChange {
            role: None,
            field: "subnet".into(),
        });
    }
    if plan.kind == PlanKind::Destroy {
        return out;
    }
    for t in &plan.targets {
        let Some(declared) = env.roles.get(&t.role) else {
            out.push(DeclaredChange {
                role: Some(t.role.clone()),
                field: "role".into(),
            });
            continue;
        };
        let (a, b) = (
            serde_json::to_value(&t.spec).unwrap_or_default(),
            serde_json::to_value(declared).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            continue;
        };
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            if a.get(k) != b.get(k) {
                out.push(DeclaredChange {
                    role: Some(t.role.clone()),
                    field: k.clone(),
                });
            }
        }
    }
    for r in env.roles.keys() {
        if plan.target(r).is_none() {
            out.push(DeclaredChange {
                role: Some(r.clone()),
                field: "role".into(),
            });
        }
    }
    out
}
