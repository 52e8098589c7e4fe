//! The plan as text: one line per change with Terraform-style markers (`+`
//! create, `~` replace, `-` destroy), batch headers saying how each batch
//! switches, and a summary. Colours are the CLI's.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kiln_model::{Action, Change, Plan, PlanKind, ReplaceOrder};

pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    if plan.changes.is_empty() {
        let _ = writeln!(
            out,
            "No changes. Environment `{}` matches its declaration.",
            plan.env
        );
        return out;
    }
    let what = match plan.kind {
        PlanKind::DeployCold => " (cold deploy: NOT zero-downtime)".to_string(),
        PlanKind::Rollback | PlanKind::AutoRollback => match plan.rollback_to {
            Some(r) => format!(" (back to release #{r})"),
            None => String::new(),
        },
        PlanKind::Promote => match &plan.promoted_from {
            Some(from) => format!(" (the images `{from}` runs)"),
            None => String::new(),
        },
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "kiln will make these changes to `{}`{what}:\n",
        plan.env
    );
    let mut sizes: BTreeMap<u32, usize> = BTreeMap::new();
    for c in &plan.changes {
        *sizes.entry(c.batch()).or_default() += 1;
    }
    let mut shown = BTreeSet::new();
    for c in &plan.changes {
        let b = c.batch();
        if sizes[&b] > 1 && shown.insert(b) {
            let _ = writeln!(
                out,
                "  batch {b} ({} servers, {}):",
                sizes[&b],
                batch_kind(plan, c)
            );
        }
        let _ = writeln!(out, "{}", line(c));
    }
    let _ = write!(
        out,
        "\nPlan: {} to create, {} to replace, {} to destroy.\n",
        plan.count(Action::Create),
        plan.count(Action::Replace),
        plan.count(Action::Destroy)
    );
    out
}

/// How a batch is carried out, said once above its changes.
fn batch_kind(plan: &Plan, first: &Change) -> &'static str {
    let group = plan.changes.iter().filter(|o| o.batch() == first.batch());
    let replaces: Vec<_> = group
        .filter_map(|c| match c {
            Change::Replace(r) => Some(r),
            _ => None,
        })
        .collect();
    if replaces.iter().any(|r| r.order == ReplaceOrder::SwitchBack) {
        "switch back in one step"
    } else if replaces.iter().any(|r| r.keep_warm_secs.is_some()) {
        "blue-green: all up and healthy, then one switch"
    } else if replaces.iter().any(|r| r.canary.is_some()) {
        "canary: up, switched, then baked before the rest"
    } else if replaces
        .iter()
        .any(|r| r.order == ReplaceOrder::DestroyFirst)
    {
        "together: destroy-first ones drained and destroyed, then all up and healthy, then one switch"
    } else {
        "together: up and healthy, then one switch"
    }
}

fn line(c: &Change) -> String {
    match c {
        Change::Create(c) => format!(
            "  + {:<10} create   {} at {}{}  ({})",
            c.server,
            c.image,
            c.address,
            placement(c.node.as_deref(), &c.published),
            c.reason
        ),
        Change::Replace(r) => format!(
            "  ~ {:<10} replace  by {} ({} at {}{}){}  ({})",
            r.server,
            r.replacement,
            r.image,
            r.address,
            placement(r.node.as_deref(), &r.published),
            match r.order {
                ReplaceOrder::SwitchBack => ", switch back",
                ReplaceOrder::DestroyFirst => ", destroy first",
                ReplaceOrder::CreateFirst => ", create first",
            },
            r.reason
        ),
        Change::Destroy(d) => format!("  - {:<10} destroy  ({})", d.server, d.reason),
    }
}

/// ` on node N, ports 8080→30000` for a server placed on a node.
fn placement(node: Option<&str>, published: &BTreeMap<u16, u16>) -> String {
    let Some(node) = node else {
        return String::new();
    };
    let ports: Vec<String> = published.iter().map(|(d, p)| format!("{d}→{p}")).collect();
    if ports.is_empty() {
        format!(" on node {node}")
    } else {
        format!(" on node {node}, ports {}", ports.join(" "))
    }
}
