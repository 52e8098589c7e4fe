//! `kiln secret set ENV NAME` (value on stdin, never echoed) and `kiln
//! secret list ENV` (names and fingerprints, never values).

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use console::style;
use kiln_secrets::{Identity, SecretValue};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

use super::print_json;
use crate::{output, Cli};

#[derive(Args, Debug)]
pub struct SetArgs {
    /// The environment whose recipients the value is encrypted to.
    pub env: String,
    /// The secret's name (`/run/secrets/NAME` in servers).
    pub name: String,
    /// Keep a trailing newline (by default one final newline is dropped,
    /// so `echo value | kiln secret set` stores `value`).
    #[arg(long)]
    pub keep_newline: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    pub env: String,
}

fn recipients(cli: &Cli, env: &str) -> Result<(std::path::PathBuf, Vec<String>)> {
    let project = super::project(cli)?;
    let Some(spec) = project.envs.get(env) else {
        bail!(
            "unknown environment `{env}`; kiln.toml declares: {}",
            project.envs.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    let Some(secrets) = &spec.secrets else {
        bail!("environment `{env}` declares no `secrets = {{ recipients = [\"age1...\"] }}` in kiln.toml");
    };
    Ok((project.dir.clone(), secrets.recipients.clone()))
}

pub fn set(cli: &Cli, args: &SetArgs) -> Result<ExitCode> {
    kiln_secrets::check_name(&args.name)?;
    let (dir, recipients) = recipients(cli, &args.env)?;
    let mut value = read_value()?;
    if !args.keep_newline {
        let v = value.expose();
        let cut = if v.ends_with(b"\r\n") {
            2
        } else if v.ends_with(b"\n") {
            1
        } else {
            0
        };
        if cut > 0 {
            value = SecretValue::new(v[..v.len() - cut].to_vec());
        }
    }
    let path = kiln_secrets::set(&dir, &args.env, &args.name, value.expose(), &recipients)?;
    eprintln!(
        "{} {} ({} bytes, encrypted to {} recipients)",
        style("wrote").green().bold(),
        path.strip_prefix(&dir).unwrap_or(&path).display(),
        value.len(),
        recipients.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The value from stdin; on a terminal, with echo turned off.
fn read_value() -> Result<SecretValue> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut buf = Vec::new();
        stdin
            .lock()
            .read_to_end(&mut buf)
            .context("cannot read the value from stdin")?;
        return Ok(SecretValue::new(buf));
    }
    eprint!("value (not echoed): ");
    let _echo = NoEcho::new();
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .context("cannot read the value from the terminal")?;
    eprintln!();
    Ok(SecretValue::new(line.into_bytes()))
}

/// Turns terminal echo off on stdin while alive (a value typed at a
/// terminal is never shown); stdin that is not a terminal is left alone.
struct NoEcho(Option<Termios>);

impl NoEcho {
    fn new() -> NoEcho {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return NoEcho(None);
        };
        let mut t = saved.clone();
        t.local_flags &= !(LocalFlags::ECHO | LocalFlags::ECHONL);
        t.local_flags |= LocalFlags::ICANON;
        if termios::tcsetattr(&stdin, SetArg::TCSANOW, &t).is_err() {
            return NoEcho(None);
        }
        NoEcho(Some(saved))
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, t);
        }
    }
}

pub fn list(cli: &Cli, args: &ListArgs) -> Result<ExitCode> {
    let (dir, _) = recipients(cli, &args.env)?;
    let names = kiln_secrets::names(&dir, &args.env)?;
    let identity = Identity::from_env()?;
    let key = match &identity {
        Some(id) if !names.is_empty() => {
            Some(kiln_secrets::FingerprintKey::load(&dir, &args.env, id)?)
        }
        _ => None,
    };
    let mut rows = Vec::new();
    for n in &names {
        let fp = match (&key, &identity) {
            (Some(k), Some(id)) => {
                Some(k.fingerprint(&kiln_secrets::decrypt(&dir, &args.env, n, id)?))
            }
            _ => None,
        };
        rows.push((n.clone(), fp));
    }
    if cli.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, f)| serde_json::json!({ "name": n, "fingerprint": f }))
            .collect();
        print_json(&v)?;
    } else {
        output::table(
            &["NAME", "FINGERPRINT"],
            &rows
                .iter()
                .map(|(n, f)| vec![n.clone(), f.clone().unwrap_or_else(|| "-".into())])
                .collect::<Vec<_>>(),
        );
        if identity.is_none() && !names.is_empty() {
            eprintln!("fingerprints need the identity: set $KILN_AGE_IDENTITY");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `kiln image build` checks images against: every secret of the
/// project, decrypted with `$KILN_AGE_IDENTITY`. Without an identity (or
/// for secrets it cannot decrypt) the check is skipped, and said loudly.
pub fn bake_check(project_dir: &std::path::Path) -> Result<kiln_image::leak::SecretCheck> {
    use kiln_image::leak::{Needle, SecretCheck};
    if !kiln_secrets::any(project_dir)? {
        return Ok(SecretCheck::None);
    }
    let loud = |what: &str| {
        eprintln!(
            "{} {what}",
            style("WARNING: SECRET CHECK SKIPPED:").red().bold()
        )
    };
    let Some(identity) = Identity::from_env()? else {
        loud("the project has secrets but $KILN_AGE_IDENTITY is not set; images are NOT checked for secret values");
        return Ok(SecretCheck::Skipped {
            reason: "no identity".into(),
        });
    };
    let mut needles = Vec::new();
    for env in kiln_secrets::envs(project_dir)? {
        for name in kiln_secrets::names(project_dir, &env)? {
            match kiln_secrets::decrypt(project_dir, &env, &name, &identity) {
                Ok(v) => needles.push(Needle {
                    name: format!("{env}/{name}"),
                    value: v.expose().to_vec(),
                }),
                Err(kiln_secrets::SecretError::NotForThisIdentity { .. }) => loud(&format!(
                    "secret {env}/{name} is not encrypted to this identity; images are NOT checked for it"
                )),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(SecretCheck::Values(needles))
}
