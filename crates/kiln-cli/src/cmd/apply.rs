//! The commands that carry out a plan: `kiln apply ENV [PLAN]`, `kiln
//! deploy --cold ENV`, `kiln destroy ENV` and `kiln rollback ENV [--to N]`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use console::style;
use kiln_engine::fleet::ServerView;
use kiln_engine::Engine;
use kiln_model::{Plan, PlanKind};
use serde::Serialize;

use super::plan::{make, print_plan, read};
use super::{confirm, print_json, random};
use crate::output::engine_progress;
use crate::Cli;

#[derive(Args, Debug)]
pub struct ApplyArgs {
    pub env: String,
    /// A plan saved by `kiln plan -o`, applied exactly as saved.
    pub plan: Option<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub lost: LostStateArgs,
}

/// What to do with servers that run for an environment the state has no
/// record of (a lost or reset state database).
#[derive(Args, Debug)]
pub struct LostStateArgs {
    /// Take them into the state, as the runtime recorded them, first.
    #[arg(long, conflicts_with = "forget")]
    pub adopt: bool,
    /// Plan to destroy them as strays.
    #[arg(long)]
    pub forget: bool,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Destroy every server first, then create them afresh (not zero-downtime).
    #[arg(long, required = true)]
    pub cold: bool,
    pub env: String,
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct EnvArgs {
    /// The environment, e.g. `staging`.
    pub env: String,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct DestroyArgs {
    pub env: String,
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Also destroy servers of an environment the state has no record of.
    #[arg(long)]
    pub forget: bool,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    pub env: String,
    /// The release whose targets to return to [default: the previous one].
    #[arg(long, value_name = "RELEASE")]
    pub to: Option<i64>,
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// The `--json` document of the commands that apply a plan.
#[derive(Serialize)]
struct Done<'a> {
    env: &'a str,
    /// The release made (none when there was nothing to do).
    release: Option<i64>,
    changes: usize,
    servers: Vec<ServerView>,
}

pub fn apply(cli: &Cli, args: &ApplyArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let progress = engine_progress(cli.json);
    let mut engine = c.engine(&progress);
    engine.options.forget = args.lost.forget;
    if args.lost.adopt {
        let adopted = engine.adopt(&args.env)?;
        if !cli.json {
            eprintln!(
                "{} {} server(s) into the state: {}",
                style("adopted").yellow().bold(),
                adopted.len(),
                adopted.join(", ")
            );
        }
    }
    let plan = match &args.plan {
        Some(path) => {
            let plan = read(path)?;
            engine.check_saved(&plan, &args.env)?;
            plan
        }
        None => make(&engine, &args.env, PlanKind::Apply)?,
    };
    carry_out(cli, &engine, &plan, args.yes || args.plan.is_some())
}

pub fn deploy(cli: &Cli, args: &DeployArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let progress = engine_progress(cli.json);
    let engine = c.engine(&progress);
    let plan = make(&engine, &args.env, PlanKind::DeployCold)?;
    if !cli.json {
        eprintln!("{} a cold deploy destroys every server of `{}` before creating new ones: it is NOT zero-downtime.", style("warning:").yellow().bold(), args.env);
    }
    carry_out(cli, &engine, &plan, args.yes)
}

pub fn destroy(cli: &Cli, args: &DestroyArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let progress = engine_progress(cli.json);
    let mut engine = c.engine(&progress);
    engine.options.forget = args.forget;
    let plan = make(&engine, &args.env, PlanKind::Destroy)?;
    carry_out(cli, &engine, &plan, args.yes)
}

/// `kiln rollback`: a zero-downtime rollout back to a previous release.
pub fn rollback(cli: &Cli, args: &RollbackArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let progress = engine_progress(cli.json);
    let engine = c.engine(&progress);
    let mut plan = engine.plan_rollback(&args.env, args.to, &mut random)?;
    plan.author = kiln_state::actor();
    carry_out(cli, &engine, &plan, args.yes)
}

/// Shows `plan`, checks it may run, asks, and carries it out.
pub fn carry_out(cli: &Cli, engine: &Engine, plan: &Plan, yes: bool) -> Result<ExitCode> {
    if !cli.json {
        print_plan(plan);
    }
    if plan.is_empty() {
        if cli.json {
            print_json(&Done {
                env: &plan.env,
                release: None,
                changes: 0,
                servers: engine.servers(Some(&plan.env))?,
            })?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Refused before asking, not after.
    engine.check_approved(plan)?;
    confirm(&plan.env, yes || cli.json)?;
    let applied = engine.run(plan, &mut random)?;
    if cli.json {
        print_json(&Done {
            env: &plan.env,
            release: Some(applied.release),
            changes: applied.changes,
            servers: engine.servers(Some(&plan.env))?,
        })?;
    } else {
        println!(
            "\n{} release #{} of `{}`: {} changes applied.",
            style("Done:").green().bold(),
            applied.release,
            plan.env,
            applied.changes
        );
        addresses(engine, &plan.env)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn addresses(engine: &Engine, env: &str) -> Result<()> {
    for s in engine.servers(Some(env))? {
        match s.ports.first() {
            Some(p) => println!(
                "  {} {:<10} http://{}:{p}/",
                style("●").green(),
                s.id,
                s.address
            ),
            None => println!("  {} {:<10} {}", style("●").green(), s.id, s.address),
        }
    }
    Ok(())
}
