//! `kiln audit [ENV]` shows the log of every write; `kiln audit verify`
//! checks its hash chain (exit 2 when it was tampered with).

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use console::style;
use kiln_state::State;
use serde::Serialize;

use super::{print_json, FOUND};
use crate::Cli;

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// `verify` checks the chain; an environment name filters the log.
    pub what: Option<String>,
}

/// The `kiln audit verify --json` document.
#[derive(Serialize)]
struct Verdict {
    ok: bool,
    entries: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_bad: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

pub fn run(cli: &Cli, args: &AuditArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    let state = State::open(&store.root().join("state.db"))?;
    if args.what.as_deref() == Some("verify") {
        return verify(cli, &state);
    }
    let entries = state.audit(args.what.as_deref())?;
    if cli.json {
        print_json(&entries)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let actor = if e.pipeline {
                e.actor.clone()
            } else {
                style(format!("{} (not a pipeline)", e.actor))
                    .red()
                    .to_string()
            };
            vec![
                format!("#{}", e.seq),
                kiln_state::rfc3339(e.time),
                e.env.clone(),
                actor,
                e.action.clone(),
                e.plan_hash.clone(),
                e.outcome.clone(),
            ]
        })
        .collect();
    crate::output::table(
        &["SEQ", "TIME", "ENV", "ACTOR", "ACTION", "PLAN", "OUTCOME"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(cli: &Cli, state: &State) -> Result<ExitCode> {
    let entries = state.audit(None)?.len();
    let bad = state.verify_audit()?;
    let verdict = Verdict {
        ok: bad.is_none(),
        entries,
        first_bad: bad.as_ref().map(|b| b.0),
        reason: bad.as_ref().map(|b| b.1.clone()),
    };
    if cli.json {
        print_json(&verdict)?;
    } else if let Some((seq, why)) = &bad {
        println!(
            "{} audit entry #{seq} {why}.",
            style("TAMPERED").red().bold()
        );
    } else {
        println!(
            "{} the audit chain holds ({entries} entries).",
            style("ok").green().bold()
        );
    }
    Ok(if verdict.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FOUND)
    })
}
