//! `kiln dns ENV NAME`: what servers of ENV resolve NAME to, asked of the
//! environment's own DNS server from the host (exit 2 when it does not
//! resolve).

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use console::style;
use serde::Serialize;

use super::{print_json, FOUND};
use crate::Cli;

#[derive(Args, Debug)]
pub struct DnsArgs {
    pub env: String,
    /// A role (`app`), a role in its environment (`app.staging`), a server
    /// id, or any name the environment forwards to the host's resolvers.
    pub name: String,
}

/// The `kiln dns --json` document.
#[derive(Serialize)]
struct Resolved {
    env: String,
    name: String,
    rcode: String,
    addresses: Vec<String>,
    ttl: Option<u32>,
    /// Answered by kiln itself, not forwarded.
    local: bool,
}

pub fn run(cli: &Cli, args: &DnsArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let engine = c.engine(&|_| {});
    let Some(answer) = engine.dns_lookup(&args.env, &args.name)? else {
        bail!(
            "`{}` has no DNS server yet (it starts with the environment's first server)",
            args.env
        );
    };
    let found = !answer.addresses.is_empty();
    let out = Resolved {
        env: args.env.clone(),
        name: args.name.clone(),
        rcode: answer.rcode.to_string(),
        addresses: answer.addresses.iter().map(|a| a.to_string()).collect(),
        ttl: answer.ttl,
        local: answer.authoritative,
    };
    if cli.json {
        print_json(&out)?;
    } else if found {
        let from = if out.local { "kiln" } else { "forwarded" };
        for a in &out.addresses {
            println!("{} {a}", style(&out.name).bold());
        }
        println!(
            "{}",
            style(format!("ttl {}s, answered by {from}", out.ttl.unwrap_or(0))).dim()
        );
    } else {
        println!(
            "{} {} ({})",
            style(&out.name).bold(),
            style("does not resolve").red(),
            out.rcode
        );
    }
    Ok(if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FOUND)
    })
}
