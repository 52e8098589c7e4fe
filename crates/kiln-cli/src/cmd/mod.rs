//! One module per subcommand; `run` dispatches and maps results to exit codes:
//! 0 success, 1 error, 2 "found something" (differences, changes, drift).

pub mod env;
pub mod image;
pub mod init;
pub mod sbom;
pub mod scan;
pub mod secret;
pub mod sign;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::{BalancerCommand, Cli, Command, ImageCommand, SecretCommand, ServerCommand};

/// Exit status for "the command worked and found differences".
pub const FOUND: u8 = 2;

pub fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Init(a) => init::run(cli, a),
        Command::Image(ImageCommand::Build(a)) => image::build(cli, a),
        Command::Image(ImageCommand::List(a)) => image::list(cli, a),
        Command::Image(ImageCommand::Show(a)) => image::show(cli, a),
        Command::Image(ImageCommand::Verify(a)) => image::verify(cli, a),
        Command::Image(ImageCommand::Gc(a)) => image::gc(cli, a),
        Command::Image(ImageCommand::Sbom(a)) => sbom::run(cli, a),
        Command::Image(ImageCommand::Scan(a)) => scan::run(cli, a),
        Command::Image(ImageCommand::Sign(a)) => sign::run(cli, a),
        Command::Secret(SecretCommand::Set(a)) => secret::set(cli, a),
        Command::Secret(SecretCommand::List(a)) => secret::list(cli, a),
        Command::Plan(a) => env::plan(cli, a),
        Command::Apply(a) => env::apply(cli, a),
        Command::Approve(a) => env::approve(cli, a),
        Command::Deploy(a) => env::deploy(cli, a),
        Command::Destroy(a) => env::destroy(cli, a),
        Command::Rollback(a) => env::rollback(cli, a),
        Command::Server(ServerCommand::List(a)) => env::server_list(cli, a),
        Command::Logs(a) => env::logs(cli, a),
        Command::History(a) => env::history(cli, a),
        Command::Drift(a) => env::drift(cli, a),
        Command::Audit(a) => env::audit(cli, a),
        Command::Reconcile(a) => env::reconcile(cli, a),
        Command::Unlock(a) => env::unlock(cli, a),
        Command::Balancer(BalancerCommand::Serve(a)) => env::balancer_serve(a),
    }
}

/// The project directory: `-C DIR` or the working directory.
pub fn project_dir(cli: &Cli) -> Result<PathBuf> {
    match &cli.dir {
        Some(d) => Ok(d.clone()),
        None => std::env::current_dir().context("cannot read the working directory"),
    }
}

/// Loads and validates the project's `kiln.toml`.
pub fn project(cli: &Cli) -> Result<kiln_model::Project> {
    let dir = project_dir(cli)?;
    Ok(kiln_spec::load(&dir)?)
}

/// Opens the project's image store.
pub fn store(cli: &Cli) -> Result<kiln_image::Store> {
    let path = match &cli.store {
        Some(s) => s.clone(),
        None => project_dir(cli)?.join(kiln_image::store::DEFAULT_DIR),
    };
    kiln_image::Store::open(&path)
        .with_context(|| format!("cannot open the image store at {}", path.display()))
}

pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
