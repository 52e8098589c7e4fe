//! `kiln reconcile ENV [--dry-run] [--watch]`: heal, rotate, replace stale
//! and drifted servers, restart dead balancers.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use console::style;

use super::plan::print_plan;
use super::{confirm, print_json, random};
use crate::output::engine_progress;
use crate::Cli;

#[derive(Args, Debug)]
pub struct ReconcileArgs {
    pub env: String,
    /// Print what would be done, do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep reconciling, every --interval.
    #[arg(long)]
    pub watch: bool,
    #[arg(long, default_value = "60s")]
    pub interval: String,
    /// Do not ask for confirmation on a terminal.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

pub fn run(cli: &Cli, args: &ReconcileArgs) -> Result<ExitCode> {
    let interval = kiln_spec::parse_duration(&args.interval).map_err(anyhow::Error::msg)?;
    loop {
        match pass(cli, args) {
            Ok(code) if !args.watch => return Ok(code),
            Ok(_) => {}
            // A watch loop outlives a failing pass (a lock held by an apply,
            // an image to rebuild, a self-heal that failed and alarmed): it
            // says so and tries again next time.
            Err(e) if args.watch => eprintln!(
                "{} {e:#}\nnext pass in {} ms",
                style("reconcile pass failed:").red().bold(),
                interval.as_millis()
            ),
            Err(e) => return Err(e),
        }
        std::thread::sleep(interval);
    }
}

/// One reconcile pass.
fn pass(cli: &Cli, args: &ReconcileArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let progress = engine_progress(cli.json);
    let engine = c.engine(&progress);
    // On a terminal, show what would be done and ask first (unless --yes or --watch).
    let interactive = !args.yes && !args.watch && !args.dry_run && std::io::stdin().is_terminal();
    if interactive {
        let preview = engine.reconcile(&args.env, true, &mut random)?;
        if preview.plan.is_empty() && preview.balancers_restarted.is_empty() {
            println!("`{}` needs nothing.", args.env);
            return Ok(ExitCode::SUCCESS);
        }
        print_plan(&preview.plan);
        confirm(&args.env, false)?;
    }
    let pass = engine.reconcile(&args.env, args.dry_run, &mut random)?;
    if cli.json {
        print_json(&pass)?;
        return Ok(ExitCode::SUCCESS);
    }
    for (id, why) in &pass.forced {
        println!("{} {id}: {why}", style("replace").yellow());
    }
    let unforced = pass
        .report
        .findings
        .iter()
        .filter(|f| !pass.forced.contains_key(&f.server));
    for f in unforced {
        println!(
            "{} {}: {} {}",
            style("found").dim(),
            f.server,
            f.kind,
            f.detail
        );
    }
    for role in &pass.balancers_restarted {
        let what = if args.dry_run {
            "is not running: it would be restarted"
        } else {
            "was not running: restarted"
        };
        println!(
            "{} the balancer of `{role}` {what}",
            style("self-heal").yellow()
        );
    }
    if pass.plan.is_empty() && pass.balancers_restarted.is_empty() {
        println!("`{}` needs nothing.", args.env);
    } else if args.dry_run {
        println!("Would carry out (dry run, nothing changed):");
        print_plan(&pass.plan);
    } else if let Some(r) = pass.release {
        println!(
            "{} reconciled `{}` as release #{r}.",
            style("Done:").green().bold(),
            args.env
        );
    }
    std::io::stdout().flush()?;
    Ok(ExitCode::SUCCESS)
}
