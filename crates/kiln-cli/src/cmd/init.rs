//! `kiln init [DIR]`: scaffold a project that builds and deploys as is.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::Cli;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to create the project in [default: the working directory].
    pub path: Option<PathBuf>,
    /// Project name [default: the directory's name].
    #[arg(long)]
    pub name: Option<String>,
}

pub fn run(cli: &Cli, args: &InitArgs) -> Result<ExitCode> {
    let base = super::project_dir(cli)?;
    let dir = match &args.path {
        Some(p) => base.join(p),
        None => base,
    };
    if dir.join(kiln_spec::PROJECT_FILE).exists() {
        bail!(
            "{} already has a {}; not overwriting it",
            dir.display(),
            kiln_spec::PROJECT_FILE
        );
    }
    let name = match &args.name {
        Some(n) => n.clone(),
        None => {
            let abs = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
            let raw = abs
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_else(|| "shop".into());
            let cleaned: String = raw
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            if cleaned.starts_with(|c: char| c.is_ascii_lowercase()) {
                cleaned
            } else {
                "shop".into()
            }
        }
    };
    let written = crate::scaffold::write(&dir, &name)
        .with_context(|| format!("cannot scaffold {}", dir.display()))?;
    if cli.json {
        super::print_json(&serde_json::json!({ "dir": dir, "name": name, "files": written }))?;
    } else {
        println!("Created project `{name}` in {}:", dir.display());
        for f in &written {
            println!("  {f}");
        }
        println!("\nNext: kiln image build --all");
    }
    Ok(ExitCode::SUCCESS)
}
