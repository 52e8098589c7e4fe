//! `kiln unlock ENV`: break the lock of a dead apply (recorded in history
//! and the audit log).

use std::process::ExitCode;

use anyhow::{bail, Result};

use super::apply::EnvArgs;
use crate::Cli;

pub fn run(cli: &Cli, args: &EnvArgs) -> Result<ExitCode> {
    let c = super::ctx(cli)?;
    let Some(info) = c.state.lock_info(&args.env)? else {
        println!("`{}` is not locked.", args.env);
        return Ok(ExitCode::SUCCESS);
    };
    if info.holder_alive() && !args.yes {
        bail!("the lock on `{}` is held by a live process (pid {} on {}); stop it, or pass --yes to break the lock anyway", args.env, info.pid, info.host);
    }
    c.state.unlock(&args.env, &kiln_state::actor())?;
    let outcome = format!("broke the lock of {} (pid {})", info.holder, info.pid);
    c.engine(&|_| {})
        .audit(&args.env, "unlock", "-", &outcome)?;
    println!(
        "Broke the lock on `{}` held by {} (pid {}) since {}.",
        args.env,
        info.holder,
        info.pid,
        kiln_state::rfc3339(info.since)
    );
    Ok(ExitCode::SUCCESS)
}
