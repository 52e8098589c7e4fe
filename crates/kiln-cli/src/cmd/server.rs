//! `kiln server list [ENV]`: every server with its image, address, age,
//! health and place at its balancer.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use console::style;
use kiln_engine::fleet::{Health, Place};

use super::{now, print_json};
use crate::Cli;

#[derive(Args, Debug)]
pub struct ServerListArgs {
    /// Only this environment.
    pub env: Option<String>,
}

pub fn list(cli: &Cli, args: &ServerListArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let engine = c.engine(&|_| {});
    let servers = engine.servers(args.env.as_deref())?;
    if cli.json {
        print_json(&servers)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = servers
        .iter()
        .map(|s| {
            let health = match s.health {
                Health::Healthy => style(s.health.as_str()).green(),
                Health::Unhealthy | Health::Down => style(s.health.as_str()).red(),
                _ => style(s.health.as_str()).yellow(),
            };
            let place = match s.balancer {
                Some(p @ Place::InRotation) => style(p.as_str()).green().to_string(),
                Some(p @ Place::FailingChecks) => style(p.as_str()).red().to_string(),
                Some(p) => style(p.as_str()).yellow().to_string(),
                None => "-".into(),
            };
            vec![
                s.id.clone(),
                s.env.clone(),
                s.role.clone(),
                s.image.clone(),
                match (&s.node, s.ports.first()) {
                    (Some(node), Some(&port)) => format!(
                        "{}:{} ({})",
                        s.address,
                        s.published.get(&port).copied().unwrap_or(port),
                        &node[..node.len().min(12)]
                    ),
                    _ => s.address.clone(),
                },
                kiln_spec::format_duration((now() - s.created_at).max(0) as u64),
                health.to_string(),
                place,
            ]
        })
        .collect();
    crate::output::table(
        &[
            "ID", "ENV", "ROLE", "IMAGE", "ADDRESS", "AGE", "HEALTH", "BALANCER",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}
