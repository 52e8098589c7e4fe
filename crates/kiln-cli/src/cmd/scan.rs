//! `kiln image scan NAME[@N] [--json]`: a version's packages against the
//! project's OSV advisories, now. Exit 2 when findings fail the gate (the
//! image's `scan`, or `fail_on = "high"` when it has none).

use std::process::ExitCode;

use anyhow::{bail, Result};
use console::style;
use kiln_image::{ops, scan};

use super::{print_json, FOUND};
use crate::output;
use crate::{Cli, RefArgs};

pub fn run(cli: &Cli, args: &RefArgs) -> Result<ExitCode> {
    let project = super::project(cli)?;
    let store = super::store(cli)?;
    let Some(source) = &project.vulnerabilities else {
        bail!("the project names no advisories; add `vulnerabilities = {{ osv = \"PATH|URL\" }}` to [project] in kiln.toml");
    };
    let record = ops::resolve(&store, &args.reference)?;
    let policy = scan::policy_for(&project, &record.name);
    let advisories = scan::Advisories::load(source, &store)?;
    let report = scan::scan_version(&store, &record, &advisories, &policy)?;
    for w in &report.warnings {
        eprintln!("{} {w}", style("warning:").yellow().bold());
    }
    for e in &report.expired_ignores {
        eprintln!(
            "{} scan ignore entry expired: {e}",
            style("warning:").yellow().bold()
        );
    }
    if cli.json {
        print_json(&report)?;
    } else {
        println!(
            "{}@{}  {}  {} packages against {} advisories from {}{}",
            report.image,
            report.version,
            report.ecosystem.as_deref().unwrap_or("unknown release"),
            report.packages,
            report.advisories,
            report.source,
            report
                .fetched
                .as_deref()
                .map(|f| format!(" (fetched {f})"))
                .unwrap_or_default()
        );
        if report.findings.is_empty() {
            println!("{} no known vulnerability", style("ok").green().bold());
        } else {
            let rows: Vec<Vec<String>> = report
                .findings
                .iter()
                .map(|f| {
                    let status = if f.blocking {
                        style("FAIL").red().bold().to_string()
                    } else if let Some(i) = &f.ignored {
                        format!("ignored: {}", i.reason)
                    } else {
                        "below fail_on".into()
                    };
                    vec![
                        f.id.clone(),
                        format!(
                            "{}{}",
                            f.severity.as_str(),
                            if matches!(f.severity_basis, scan::SeverityBasis::Assumed) {
                                " (assumed)"
                            } else {
                                ""
                            }
                        ),
                        f.package.clone(),
                        f.installed.clone(),
                        f.fixed.clone().unwrap_or_else(|| "-".into()),
                        status,
                    ]
                })
                .collect();
            output::table(
                &[
                    "ADVISORY",
                    "SEVERITY",
                    "PACKAGE",
                    "INSTALLED",
                    "FIXED",
                    "STATUS",
                ],
                &rows,
            );
            let blocking = report.blocking().count();
            println!(
                "{} findings, {} at or above fail_on = \"{}\"",
                report.findings.len(),
                blocking,
                report.fail_on.as_str()
            );
        }
    }
    Ok(if report.fails() {
        ExitCode::from(FOUND)
    } else {
        ExitCode::SUCCESS
    })
}
