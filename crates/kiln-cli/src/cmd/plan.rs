//! `kiln plan ENV [-o FILE]`: what would change and why, saved to apply
//! exactly that later.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use console::style;
use kiln_model::{Plan, PlanKind};

use super::{print_json, random, FOUND};
use crate::Cli;

#[derive(Args, Debug)]
pub struct PlanArgs {
    pub env: String,
    /// Save the plan to FILE, to apply exactly that later.
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Exit 0 when there is nothing to do, 2 when there are changes, 1 on error.
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Plan the destruction of every server (what `kiln destroy` does).
    #[arg(long, conflicts_with = "cold")]
    pub destroy: bool,
    /// Plan a cold deploy (what `kiln deploy --cold` does).
    #[arg(long)]
    pub cold: bool,
}

/// Prints a plan with Terraform's colours: green `+`, yellow `~`, red `-`.
pub fn print_plan(plan: &Plan) {
    for line in kiln_planner::render(plan).lines() {
        let styled = match line.trim_start().chars().next() {
            Some('+') => style(line).green().to_string(),
            Some('~') => style(line).yellow().to_string(),
            Some('-') => style(line).red().to_string(),
            _ if line.starts_with("Plan:") => style(line).bold().to_string(),
            _ => line.to_string(),
        };
        println!("{styled}");
    }
}

/// A fresh plan of `env`, signed with its author.
pub fn make(engine: &kiln_engine::Engine, env: &str, kind: PlanKind) -> Result<Plan> {
    let mut plan = engine.plan(env, kind, &mut random)?;
    plan.author = kiln_state::actor();
    Ok(plan)
}

/// Reads a saved plan: its format first (so a plan of another kiln is named
/// as such rather than failing to parse), then the whole document.
pub fn read(path: &Path) -> Result<Plan> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read plan {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a kiln plan (not JSON)", path.display()))?;
    let format = value.get("format").and_then(|f| f.as_u64());
    match format {
        Some(f) if f == u64::from(kiln_planner::PLAN_FORMAT) => {}
        Some(f) => bail!(
            "{} is a plan of format {f}; this kiln reads format {}: plan again with this kiln",
            path.display(),
            kiln_planner::PLAN_FORMAT
        ),
        None => bail!("{} is not a kiln plan (no format)", path.display()),
    }
    serde_json::from_value(value).with_context(|| format!("{} is not a kiln plan", path.display()))
}

pub fn run(cli: &Cli, args: &PlanArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let engine = c.engine(&|_| {});
    let kind = if args.destroy {
        PlanKind::Destroy
    } else if args.cold {
        PlanKind::DeployCold
    } else {
        PlanKind::Apply
    };
    let plan = make(&engine, &args.env, kind)?;
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&plan)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if cli.json {
        print_json(&plan)?;
    } else {
        print_plan(&plan);
        if let Some(out) = &args.out {
            saved(&c, &plan, out);
        }
    }
    Ok(if args.detailed_exitcode && !plan.is_empty() {
        ExitCode::from(FOUND)
    } else {
        ExitCode::SUCCESS
    })
}

/// Says how to apply (and, where needed, approve) a saved plan.
pub fn saved(c: &super::Ctx, plan: &Plan, out: &Path) {
    println!(
        "\nSaved the plan to {} (plan {}). Apply exactly this plan with: kiln apply {} {}",
        out.display(),
        kiln_engine::plan_hash(plan),
        plan.env,
        out.display()
    );
    let required = c.project.envs.get(&plan.env).map_or(0, |e| e.approvals);
    if required > 0 && !plan.is_empty() {
        println!(
            "`{}` needs {required} approval(s) first, by someone other than {}: kiln approve {} {}",
            plan.env,
            plan.author,
            plan.env,
            out.display()
        );
    }
}
