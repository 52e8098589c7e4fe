//! `kiln image build | list | show | verify | gc`.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use console::style;
use kiln_image::bake::Baker;
use kiln_image::ops::{self, Status};

use super::{print_json, FOUND};
use crate::output::{self, BuildProgress};
use crate::{Cli, RefArgs};

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Images to build (with their parents).
    pub names: Vec<String>,
    /// Build every image of the project.
    #[arg(long, conflicts_with = "names")]
    pub all: bool,
    /// Rebuild the named images even if the cache has them (repairs a
    /// tampered root; parents still come from the cache).
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// NAME (its current version) or NAME@VERSION.
    pub reference: String,
    /// First rewrite every blob of the version whose content no longer
    /// matches its digest, from the roots in the store, kiln.toml and the
    /// sources of imported bases.
    #[arg(long)]
    pub repair: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this image's versions.
    pub name: Option<String>,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Previous successful versions kept per image for rollback.
    #[arg(long, default_value_t = 1)]
    pub keep: usize,
}

pub fn build(cli: &Cli, args: &BuildArgs) -> Result<ExitCode> {
    let project = super::project(cli)?;
    let store = super::store(cli)?;
    let names: Vec<String> = if args.all {
        project.images.keys().cloned().collect()
    } else if args.names.is_empty() {
        bail!("name the images to build, or pass --all");
    } else {
        args.names.clone()
    };
    let progress = BuildProgress::new();
    let events = |e| progress.event(e);
    let mut baker = Baker::new(&project, &store, &events);
    baker.no_cache = args.no_cache;
    baker.secrets = super::secret::bake_check(&project.dir)?;
    let built = baker.build(&names).inspect_err(|_| progress.abandon())?;
    if cli.json {
        let rows: Vec<_> = built
            .iter()
            .map(|b| serde_json::json!({ "name": b.record.name, "version": b.record.version, "digest": b.record.digest, "cached": b.cached, "seal_root": b.record.seal_root }))
            .collect();
        print_json(&rows)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(cli: &Cli, args: &ListArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    let items = ops::list(&store, args.name.as_deref())?;
    if cli.json {
        print_json(&items)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            let status = match i.status {
                Status::Current => style("current").green().to_string(),
                Status::Previous => style("previous").dim().to_string(),
                Status::Failed => style("failed").red().to_string(),
            };
            vec![
                i.name.clone(),
                i.version.to_string(),
                i.digest.short().to_string(),
                i.parent.clone().unwrap_or_else(|| "-".into()),
                i.created.clone(),
                output::bytes(i.size),
                status,
            ]
        })
        .collect();
    output::table(
        &[
            "NAME", "VERSION", "DIGEST", "PARENT", "CREATED", "SIZE", "STATUS",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn show(cli: &Cli, args: &RefArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    let s = ops::show(&store, &args.reference)?;
    if cli.json {
        print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} {}@{}  {:?}",
        style("image").bold(),
        s.name,
        s.version,
        s.status
    );
    println!("  digest     {}", s.digest);
    println!("  lineage    {}", s.lineage.join(" → "));
    println!(
        "  created    {}  (built in {:.1}s)",
        s.created,
        s.build_ms as f64 / 1000.0
    );
    println!("  size       {}", output::bytes(s.size));
    println!("  seal root  {} ({} entries)", s.seal_root, s.files_sealed);
    println!("  layers");
    for l in &s.layers {
        println!("    {}  {}", l.digest, output::bytes(l.size));
    }
    println!("  inputs");
    println!("    source   {}", s.inputs.source);
    println!(
        "    files    {}",
        if s.inputs.files.is_empty() {
            "-".into()
        } else {
            s.inputs.files.join(", ")
        }
    );
    println!(
        "    scripts  {}",
        if s.inputs.scripts.is_empty() {
            "-".into()
        } else {
            s.inputs.scripts.join(", ")
        }
    );
    println!("    tests    {}", s.inputs.tests);
    println!("    cache    {}", s.inputs.cache_key);
    if let Some(e) = &s.error {
        println!("  {} {e}", style("failed:").red());
    }
    println!(
        "  sbom       {}",
        s.sbom.as_ref().map(|d| d.0.as_str()).unwrap_or("-")
    );
    for signer in &s.signatures {
        println!("  signed by  {signer}");
    }
    for (title, files) in [
        ("setuid/setgid", &s.setuid),
        ("world-writable", &s.world_writable),
    ] {
        println!("  {title} ({})", files.len());
        for f in files {
            println!("    {} {}  {}:{}", f.mode, f.path, f.uid, f.gid);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(cli: &Cli, args: &VerifyArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    if args.repair {
        let project = super::project(cli)?;
        let quiet = |_| {};
        let baker = Baker::new(&project, &store, &quiet);
        let (record, repaired) = kiln_image::repair::repair_reference(&baker, &args.reference)?;
        for d in &repaired.rewritten {
            eprintln!("repaired blob {d} of {}@{}", record.name, record.version);
        }
        for (d, why) in &repaired.unrepairable {
            eprintln!(
                "cannot repair blob {d} of {}@{}: {why}",
                record.name, record.version
            );
        }
    }
    let v = ops::verify(&store, &args.reference)?;
    if cli.json {
        print_json(&v)?;
    } else if v.ok() {
        println!(
            "{} {}@{} matches its seal ({} entries, {})",
            style("ok").green().bold(),
            v.name,
            v.version,
            v.entries,
            output::bytes(v.bytes)
        );
    } else {
        println!(
            "{} {}@{} differs from its seal:",
            style("TAMPERED").red().bold(),
            v.name,
            v.version
        );
        for d in &v.differences {
            println!("  {d}");
        }
        for b in &v.corrupt_blobs {
            println!("  corrupt blob {b}");
        }
    }
    Ok(if v.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FOUND)
    })
}

pub fn gc(cli: &Cli, args: &GcArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    let in_use = in_use(&store)?;
    let collected = ops::gc(&store, args.keep, &in_use)?;
    if cli.json {
        print_json(&collected)?;
    } else {
        println!(
            "removed {} versions ({}), {} blobs, {} roots, {} retired roots; freed {}",
            collected.versions.len(),
            if collected.versions.is_empty() {
                "-".into()
            } else {
                collected.versions.join(", ")
            },
            collected.blobs,
            collected.roots,
            collected.retired,
            output::bytes(collected.bytes)
        );
        if collected.retired_in_use > 0 {
            println!("kept {} retired roots that running servers still use (replace them: `kiln reconcile ENV`)", collected.retired_in_use);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Image digests that environments run, or that their last releases ran
/// (the rollback window): gc keeps them whatever their age.
fn in_use(store: &kiln_image::Store) -> Result<BTreeSet<kiln_image::Digest>> {
    let path = store.root().join("state.db");
    if !path.exists() {
        return Ok(BTreeSet::new());
    }
    let state = kiln_state::State::open(&path)?;
    let digests = kiln_engine::fleet::images_in_use(&state)?;
    Ok(digests.into_iter().map(kiln_image::Digest).collect())
}
