//! `kiln image sign NAME[@N] --key PATH | --signature FILE | --payload`:
//! sign a version with an SSH key (the format of `ssh-keygen -Y sign -n
//! kiln`), attach a signature made elsewhere, or print what is signed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use console::style;
use kiln_image::{ops, sign};

use super::print_json;
use crate::Cli;

#[derive(Args, Debug)]
pub struct SignArgs {
    /// NAME (its current version) or NAME@VERSION.
    pub reference: String,
    /// An unencrypted OpenSSH private key to sign with.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["signature", "payload"], conflicts_with_all = ["signature", "payload"])]
    pub key: Option<PathBuf>,
    /// Attach a signature made with `ssh-keygen -Y sign -n kiln` over `--payload`.
    #[arg(long, value_name = "FILE", conflicts_with = "payload")]
    pub signature: Option<PathBuf>,
    /// Print the exact bytes to sign, and nothing else.
    #[arg(long)]
    pub payload: bool,
}

pub fn run(cli: &Cli, args: &SignArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    let record = ops::resolve(&store, &args.reference)?;
    if args.payload {
        std::io::stdout().write_all(&sign::payload(&record))?;
        return Ok(ExitCode::SUCCESS);
    }
    let _lock = store.lock()?;
    let signed = match (&args.key, &args.signature) {
        (Some(key), _) => sign::sign(&store, &record, key)?,
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            sign::attach(&store, &record, &text)?
        }
        (None, None) => unreachable!("clap requires one"),
    };
    if cli.json {
        print_json(&serde_json::json!({
            "name": record.name,
            "version": record.version,
            "digest": record.digest,
            "signer": signed.signer,
            "artifact": signed.artifact,
            "signature": signed.armored,
        }))?;
    } else {
        println!(
            "{} {}@{} ({}) by {}",
            style("signed").green().bold(),
            record.name,
            record.version,
            record.digest.short(),
            signed.signer
        );
    }
    Ok(ExitCode::SUCCESS)
}
