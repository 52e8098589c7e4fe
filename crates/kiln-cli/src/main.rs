//! The `kiln` binary: argument parsing, output and exit codes only. All
//! behaviour lives in the library crates; each subcommand is one small
//! module under `cmd/` that translates arguments into library calls.

mod cmd;
mod output;
mod providers;
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
    Plan(cmd::plan::PlanArgs),
    /// Approve a saved plan (environments with `approvals = N` need N, not by its author).
    Approve(cmd::approve::ApproveArgs),
    /// Make an environment match its declaration (or apply a saved plan).
    Apply(cmd::apply::ApplyArgs),
    /// Destroy every server of an environment, then create it afresh.
    Deploy(cmd::apply::DeployArgs),
    /// Destroy every server of an environment.
    Destroy(cmd::apply::DestroyArgs),
    /// Return an environment to a previous release, with zero downtime.
    Rollback(cmd::apply::RollbackArgs),
    /// Plan (and apply) an environment with exactly the image digests another runs.
    Promote(cmd::promote::PromoteArgs),
    /// Servers of one or every environment.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Logs of an environment's servers, including destroyed ones.
    Logs(cmd::logs::LogsArgs),
    /// What differs from the declaration: files, processes, config, stale, expired, unmanaged.
    Drift(cmd::drift::DriftArgs),
    /// Heal crashed servers, rotate expired ones, replace stale and drifted ones.
    Reconcile(cmd::reconcile::ReconcileArgs),
    /// The tamper-evident log of every write; `kiln audit verify` checks it.
    Audit(cmd::audit::AuditArgs),
    /// Releases and events of an environment.
    History(cmd::apply::EnvArgs),
    /// What servers of an environment resolve a name to (its DNS, asked from the host).
    Dns(cmd::dns::DnsArgs),
    /// Break an environment's lock whose holder died.
    Unlock(cmd::apply::EnvArgs),
    /// Secrets encrypted with age in the project (`secrets/ENV/NAME.age`).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The balancer process (started and supervised by kiln itself).
    #[command(subcommand, hide = true)]
    Balancer(BalancerCommand),
    /// An environment's DNS server process (started and supervised by kiln itself).
    #[command(subcommand, hide = true)]
    DnsServer(DnsServerCommand),
}

#[derive(Subcommand, Debug)]
pub enum DnsServerCommand {
    /// Run an environment's DNS server in the foreground.
    Serve(cmd::dns_server::ServeArgs),
}

#[derive(Subcommand, Debug)]
pub enum BalancerCommand {
    /// Run a balancer in the foreground.
    Serve(cmd::balancer::BalancerArgs),
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
    List(cmd::server::ServerListArgs),
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
    Verify(cmd::image::VerifyArgs),
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
    if !matches!(cli.command, Command::Balancer(_) | Command::DnsServer(_)) {
        // A command whose output is cut short (`| head`) ends quietly, the
        // way Unix tools do, instead of panicking in `println!`. Servers
        // (the balancer) keep Rust's default: a closed socket is an error
        // to handle, not a reason to die.
        restore_sigpipe();
    }
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

/// Puts SIGPIPE back to its default action (terminate), which Rust's
/// runtime sets to "ignore" before `main`.
fn restore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called at the start of `main`, before any thread exists;
    // SIG_DFL installs no handler of ours, so there is no handler code
    // that could be unsafe to run asynchronously.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
