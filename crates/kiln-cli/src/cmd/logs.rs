//! `kiln logs ENV [SERVER] [-f]`: servers' stdout and stderr, destroyed
//! servers' too, read through the provider.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use console::style;

use crate::Cli;

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub env: String,
    /// Only this server (destroyed servers too).
    pub server: Option<String>,
    /// Keep printing what is appended.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

pub fn run(cli: &Cli, args: &LogsArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let engine = c.engine(&|_| {});
    engine.env(&args.env)?;
    // The servers with logs are listed again on every round when
    // following, so servers created meanwhile (a rollout) join the stream.
    let scan = || -> Result<Vec<String>> {
        let ids = engine.log_ids(&args.env)?;
        Ok(ids
            .into_iter()
            .filter(|id| args.server.as_deref().is_none_or(|s| s == id))
            .collect())
    };
    if scan()?.is_empty() {
        match &args.server {
            Some(s) => bail!("no logs for server `{s}` in `{}`", args.env),
            None => bail!("no logs in `{}` yet", args.env),
        }
    }
    let prefix = args.server.is_none();
    let mut offsets: BTreeMap<String, u64> = BTreeMap::new();
    let mut out = std::io::stdout().lock();
    loop {
        for id in scan()? {
            let offset = offsets.entry(id.clone()).or_insert(0);
            let chunk = engine.read_log(&args.env, &id, *offset)?;
            // While following, a line still being written waits for its end.
            let upto = if args.follow {
                chunk
                    .bytes
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |n| n + 1)
            } else {
                chunk.bytes.len()
            };
            *offset += upto as u64;
            for line in String::from_utf8_lossy(&chunk.bytes[..upto]).lines() {
                if prefix {
                    writeln!(out, "{} {line}", style(format!("{id:<10} |")).dim())?;
                } else {
                    writeln!(out, "{line}")?;
                }
            }
        }
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(200));
    }
}
