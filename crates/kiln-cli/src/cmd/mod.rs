//! One module per subcommand; `run` dispatches and maps results to exit codes:
//! 0 success, 1 error, 2 "found something" (differences, changes, drift).
//! Modules translate arguments into library calls and render results;
//! behaviour lives in the library crates.

pub mod apply;
pub mod approve;
pub mod audit;
pub mod balancer;
pub mod dns;
pub mod dns_server;
pub mod drift;
pub mod history;
pub mod image;
pub mod init;
pub mod logs;
pub mod plan;
pub mod promote;
pub mod reconcile;
pub mod sbom;
pub mod scan;
pub mod secret;
pub mod server;
pub mod sign;
pub mod unlock;

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_engine::{Engine, Options, Progress};
use kiln_state::State;

use crate::{
    BalancerCommand, Cli, Command, DnsServerCommand, ImageCommand, SecretCommand, ServerCommand,
};

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
        Command::Plan(a) => plan::run(cli, a),
        Command::Apply(a) => apply::apply(cli, a),
        Command::Approve(a) => approve::run(cli, a),
        Command::Deploy(a) => apply::deploy(cli, a),
        Command::Destroy(a) => apply::destroy(cli, a),
        Command::Rollback(a) => apply::rollback(cli, a),
        Command::Promote(a) => promote::run(cli, a),
        Command::Server(ServerCommand::List(a)) => server::list(cli, a),
        Command::Logs(a) => logs::run(cli, a),
        Command::History(a) => history::run(cli, a),
        Command::Drift(a) => drift::run(cli, a),
        Command::Audit(a) => audit::run(cli, a),
        Command::Reconcile(a) => reconcile::run(cli, a),
        Command::Unlock(a) => unlock::run(cli, a),
        Command::Dns(a) => dns::run(cli, a),
        Command::Balancer(BalancerCommand::Serve(a)) => balancer::serve(a),
        Command::DnsServer(DnsServerCommand::Serve(a)) => dns_server::serve(a),
    }
}

/// The project directory: `-C DIR` (relative to the working directory) or
/// the working directory, made absolute once so that nothing derived from
/// it (bundles, bridge names) depends on where kiln was started.
pub fn project_dir(cli: &Cli) -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let dir = match &cli.dir {
        Some(d) => cwd.join(d),
        None => cwd,
    };
    std::fs::canonicalize(&dir)
        .with_context(|| format!("cannot use {} as the project directory", dir.display()))
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

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Everything an environment command works with.
pub struct Ctx {
    pub project: kiln_model::Project,
    pub store: kiln_image::Store,
    pub state: State,
    pub providers: crate::providers::Providers,
}

pub fn ctx(cli: &Cli) -> Result<Ctx> {
    let project = project(cli)?;
    let store = store(cli)?;
    let state = State::open(&store.root().join("state.db"))?;
    let providers = crate::providers::Providers::new(&project, &store);
    Ok(Ctx {
        project,
        store,
        state,
        providers,
    })
}

impl Ctx {
    pub fn engine<'a>(&'a self, progress: &'a dyn Fn(Progress)) -> Engine<'a> {
        Engine {
            project: &self.project,
            store: &self.store,
            state: &self.state,
            provider: &self.providers,
            progress,
            clock: &now,
            options: Options {
                health_timeout: health_timeout(),
                ..Options::default()
            },
        }
    }
}

/// The clock: wall time, or `KILN_NOW` (epoch seconds) when set, so that
/// TTLs and rollback windows can be exercised with an injected time.
pub fn now() -> i64 {
    std::env::var("KILN_NOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp())
}

/// 16 random bits from the kernel, for new server ids.
pub fn random() -> u16 {
    let mut b = [0u8; 2];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return (n ^ std::process::id()) as u16;
    }
    u16::from_le_bytes(b)
}

fn health_timeout() -> Duration {
    std::env::var("KILN_HEALTH_TIMEOUT")
        .ok()
        .and_then(|s| kiln_spec::parse_duration(&s).ok())
        .unwrap_or(Duration::from_secs(30))
}

/// Asks before changing `env` on a terminal; refuses without `--yes` elsewhere.
pub fn confirm(env: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("refusing to change `{env}` without confirmation; pass --yes");
    }
    print!("\nDo you want to perform these actions on `{env}`? Only 'yes' will be accepted: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        bail!("cancelled; nothing was changed");
    }
    Ok(())
}
