//! The `kiln` binary: argument parsing, output and exit codes only. All
//! behaviour lives in the library crates; each subcommand is one small
//! module under `cmd/` that translates arguments into library calls.

mod cmd;
mod output;
mod scaffold;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Bake golden images, fire fleets of immutable servers, keep them honest.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Run as if started in DIR (the project directory).
    #[arg(short = 'C', global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Image store directory [default: <project>/.kiln].
    #[arg(long, global = true, env = "KILN_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// No colors (also when NO_COLOR is set).
    #[arg(long, global = true)]
    pub no_color: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Scaffold a project that builds and deploys as is.
    Init(cmd::init::InitArgs),
    /// Bake, list, inspect, verify and collect golden images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Show what would change in an environment, and why.
    Plan(cmd::env::PlanArgs),
    /// Approve a saved plan (environments with `approvals = N` need N, not by its author).
    Approve(cmd::env::ApproveArgs),
    /// Make an environment match its declaration (or apply a saved plan).
    Apply(cmd::env::ApplyArgs),
    /// Destroy every server of an environment, then create it afresh.
    Deploy(cmd::env::DeployArgs),
    /// Destroy every server of an environment.
    Destroy(cmd::env::EnvArgs),
    /// Return an environment to a previous release's images, with zero downtime.
    Rollback(cmd::env::RollbackArgs),
    /// Servers of one or every environment.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Logs of an environment's servers, including destroyed ones.
    Logs(cmd::env::LogsArgs),
    /// What differs from the declaration: files, processes, config, stale, expired, unmanaged.
    Drift(cmd::env::DriftArgs),
    /// Heal crashed servers, rotate expired ones, replace stale and drifted ones.
    Reconcile(cmd::env::ReconcileArgs),
    /// The tamper-evident log of every write; `kiln audit verify` checks it.
    Audit(cmd::env::AuditArgs),
    /// Releases and events of an environment.
    History(cmd::env::EnvArgs),
    /// Break an environment's lock whose holder died.
    Unlock(cmd::env::EnvArgs),
    /// Secrets encrypted with age in the project (`secrets/ENV/NAME.age`).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The balancer process (started and supervised by kiln itself).
    #[command(subcommand, hide = true)]
    Balancer(BalancerCommand),
}

#[derive(Subcommand, Debug)]
pub enum BalancerCommand {
    /// Run a balancer in the foreground.
    Serve(cmd::env::BalancerArgs),
}

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Encrypt a value read from stdin (never echoed) to the environment's recipients.
    Set(cmd::secret::SetArgs),
    /// Names and fingerprints of an environment's secrets, never values.
    List(cmd::secret::ListArgs),
}

#[derive(Subcommand, Debug)]
pub enum ServerCommand {
    /// id, role, image, address, age and health of each server.
    List(cmd::env::ServerListArgs),
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Bake images (parents first; unchanged images come from the cache).
    Build(cmd::image::BuildArgs),
    /// Every version of every image.
    List(cmd::image::ListArgs),
    /// Lineage, layers, seal and build inputs of a version.
    Show(RefArgs),
    /// Re-hash a version on disk and name every file that differs from its seal.
    Verify(RefArgs),
    /// Remove versions nothing uses and the blobs only they used.
    Gc(cmd::image::GcArgs),
    /// The CycloneDX 1.5 bill of materials of a version (`--json`: the document).
    Sbom(RefArgs),
    /// Match a version's packages against the project's OSV advisories now.
    Scan(RefArgs),
    /// Sign a version with an SSH key (as `ssh-keygen -Y sign -n kiln`).
    Sign(cmd::sign::SignArgs),
}

#[derive(Args, Debug)]
pub struct RefArgs {
    /// NAME (its current version) or NAME@VERSION.
    pub reference: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    output::init(cli.no_color);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "warn,libcgroups=error,libcontainer=error".into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_ansi(false)
        .init();
    match cmd::run(&cli) {
        Ok(code) => code,
        Err(e) => {
            output::error(&e);
            ExitCode::from(1)
        }
    }
}
