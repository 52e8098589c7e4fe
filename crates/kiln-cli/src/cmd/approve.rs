//! `kiln approve ENV PLAN`: one approval of a saved plan, in the audit chain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use console::style;
use serde::Serialize;

use super::plan::{print_plan, read};
use super::print_json;
use crate::Cli;

#[derive(Args, Debug)]
pub struct ApproveArgs {
    pub env: String,
    /// A plan saved by `kiln plan -o`.
    pub plan: PathBuf,
}

/// The `kiln approve --json` document.
#[derive(Serialize)]
struct Approval<'a> {
    env: &'a str,
    plan: String,
    author: &'a str,
    approvers: &'a [String],
    required: u32,
    ready: bool,
}

pub fn run(cli: &Cli, args: &ApproveArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let engine = c.engine(&|_| {});
    let plan = read(&args.plan)?;
    engine.check_saved(&plan, &args.env)?;
    let actor = kiln_state::actor();
    let approvers = engine.approve(&plan, &actor)?;
    let required = engine.env(&args.env)?.approvals;
    let hash = kiln_engine::plan_hash(&plan);
    let ready = approvers.len() >= required as usize;
    if cli.json {
        return print_json(&Approval {
            env: &args.env,
            plan: hash,
            author: &plan.author,
            approvers: &approvers,
            required,
            ready,
        })
        .map(|_| ExitCode::SUCCESS);
    }
    print_plan(&plan);
    println!(
        "\n{} plan {hash} of `{}` (made by {}) as {actor}: {} of {required} approval(s): {}.",
        style("Approved").green().bold(),
        args.env,
        plan.author,
        approvers.len(),
        approvers.join(", ")
    );
    if ready {
        println!(
            "Apply it with: kiln apply {} {}",
            args.env,
            args.plan.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
