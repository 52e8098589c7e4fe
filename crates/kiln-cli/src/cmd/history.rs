//! `kiln history ENV`: releases (who, what, outcome) and events, in time order.

use std::process::ExitCode;

use anyhow::Result;
use console::style;
use kiln_model::Outcome;

use super::apply::EnvArgs;
use super::print_json;
use crate::Cli;

pub fn run(cli: &Cli, args: &EnvArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    let state = kiln_state::State::open(&store.root().join("state.db"))?;
    let h = kiln_engine::fleet::history(&state, &args.env)?;
    if cli.json {
        print_json(&h)?;
        return Ok(ExitCode::SUCCESS);
    }
    let ts = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    let mut lines: Vec<(i64, String)> = Vec::new();
    for r in &h.releases {
        let outcome = match r.outcome {
            Outcome::Succeeded => style(r.outcome.as_str()).green(),
            Outcome::Failed => style(r.outcome.as_str()).red(),
            Outcome::Running => style(r.outcome.as_str()).yellow(),
        };
        let detail = if r.outcome == Outcome::Failed {
            format!("\n      {}", r.detail.lines().next().unwrap_or(""))
        } else {
            String::new()
        };
        let line = format!(
            "{}  #{:<3} {:<20} by {:<10} {outcome}: {}{detail}",
            ts(r.created),
            r.id,
            r.kind.label(),
            r.actor,
            r.summary
        );
        lines.push((r.created, line));
    }
    for e in &h.events {
        let line = format!(
            "{}  {:<4} {:<20} by {:<10} {}",
            ts(e.time),
            "",
            e.action,
            e.actor,
            e.detail
        );
        lines.push((e.time, line));
    }
    lines.sort_by_key(|l| l.0);
    if lines.is_empty() {
        println!("No history for `{}` yet.", args.env);
    }
    for (_, l) in lines {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}
