//! `kiln promote FROM TO [-o FILE]`: plan `TO` with exactly the image
//! digests `FROM` runs, whatever the store's current versions are; apply
//! it (or save it, to have it approved).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::apply::carry_out;
use super::plan::{print_plan, saved};
use super::{print_json, random};
use crate::output::engine_progress;
use crate::Cli;

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The environment whose image digests are promoted, e.g. `staging`.
    pub from: String,
    /// The environment that gets them, e.g. `production`.
    pub to: String,
    /// Save the plan to FILE (to approve and apply it later) instead of applying it.
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[arg(long, short = 'y')]
    pub yes: bool,
}

pub fn run(cli: &Cli, args: &PromoteArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let progress = engine_progress(cli.json);
    let engine = c.engine(&progress);
    let mut plan = engine.plan_promote(&args.from, &args.to, &mut random)?;
    plan.author = kiln_state::actor();
    let Some(out) = &args.out else {
        return carry_out(cli, &engine, &plan, args.yes);
    };
    std::fs::write(out, serde_json::to_vec_pretty(&plan)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    if cli.json {
        print_json(&plan)?;
    } else {
        print_plan(&plan);
        saved(&c, &plan, out);
    }
    Ok(ExitCode::SUCCESS)
}
