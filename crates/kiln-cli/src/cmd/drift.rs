//! `kiln drift ENV [--full]`: exit 0 when clean, 2 when drift is found, 1
//! on error.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use console::style;
use kiln_engine::drift::{FindingKind, Report};

use super::{print_json, FOUND};
use crate::Cli;

#[derive(Args, Debug)]
pub struct DriftArgs {
    pub env: String,
    /// Re-hash every file, ignoring what the last scan saw unchanged.
    #[arg(long)]
    pub full: bool,
}

/// Prints a drift report: red for what someone did to a server (files,
/// processes, unmanaged), yellow for what time did (stale, expired, config).
fn print(report: &Report) {
    let text = kiln_engine::drift::render(report);
    let mut kinds = report.findings.iter().map(|f| f.kind);
    for line in text.lines() {
        let styled = if let Some(rest) = line.strip_prefix("no drift") {
            format!("{}{rest}", style("no drift").green().bold())
        } else if let Some(rest) = line.strip_prefix("DRIFT") {
            format!("{}{rest}", style("DRIFT").red().bold())
        } else if let Some(finding) = line.strip_prefix("    ") {
            let (kind, detail) = finding.split_at(finding.len().min(9));
            let kind = match kinds.next() {
                Some(FindingKind::Files | FindingKind::Process | FindingKind::Unmanaged) => {
                    style(kind).red()
                }
                _ => style(kind).yellow(),
            };
            format!("    {kind}{detail}")
        } else {
            style(line).bold().to_string()
        };
        println!("{styled}");
    }
}

pub fn run(cli: &Cli, args: &DriftArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let engine = c.engine(&|_| {});
    let report = engine.drift(&args.env, args.full)?;
    if cli.json {
        print_json(&report)?;
    } else {
        print(&report);
    }
    Ok(if report.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FOUND)
    })
}
