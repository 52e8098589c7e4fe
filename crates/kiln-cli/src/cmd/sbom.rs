//! `kiln image sbom NAME[@N] [--json]`: a version's bill of materials. With
//! `--json`, the stored CycloneDX 1.5 document itself.

use std::process::ExitCode;

use anyhow::Result;
use kiln_image::{ops, sbom};

use crate::output;
use crate::{Cli, RefArgs};

pub fn run(cli: &Cli, args: &RefArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    let record = ops::resolve(&store, &args.reference)?;
    let stored = sbom::read_or_generate(&store, &record)?;
    if cli.json {
        println!("{}", String::from_utf8_lossy(&stored.json));
        return Ok(ExitCode::SUCCESS);
    }
    let inv = &stored.inventory;
    let release = match (&inv.release.id, &inv.release.version_id) {
        (Some(id), Some(v)) => format!("{id} {v}"),
        (Some(id), None) => id.clone(),
        _ => "unknown release".into(),
    };
    match &inv.packages {
        Some(pkgs) => {
            println!(
                "{}@{}  {}  {} packages  (CycloneDX 1.5, {})",
                record.name,
                record.version,
                release,
                pkgs.len(),
                stored.referrer.digest.short()
            );
            let rows: Vec<Vec<String>> = pkgs
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.version.clone(),
                        p.architecture.clone(),
                        if p.source == p.name && p.source_version == p.version {
                            "-".into()
                        } else if p.source_version == p.version {
                            p.source.clone()
                        } else {
                            format!("{} {}", p.source, p.source_version)
                        },
                    ]
                })
                .collect();
            output::table(&["PACKAGE", "VERSION", "ARCH", "SOURCE"], &rows);
        }
        None => {
            println!(
                "{}@{}  {}  no package database: {} files  (CycloneDX 1.5, {})",
                record.name,
                record.version,
                release,
                inv.files.len(),
                stored.referrer.digest.short()
            );
            let rows: Vec<Vec<String>> = inv
                .files
                .iter()
                .map(|f| {
                    vec![
                        f.path.clone(),
                        f.blake3[..16.min(f.blake3.len())].to_string(),
                    ]
                })
                .collect();
            output::table(&["FILE", "BLAKE3"], &rows);
        }
    }
    Ok(ExitCode::SUCCESS)
}
