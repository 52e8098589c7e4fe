//! Environment commands: plan, apply, deploy --cold, destroy, server list,
//! logs, history, unlock. They assemble an [`Engine`] over the project, the
//! store, the SQLite state and the local provider, and render its results.

use std::io::{BufRead, IsTerminal, Read, Seek, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use console::style;
use kiln_engine::{Engine, Options, Progress};
use kiln_model::{Action, HealthCheck, Plan};
use kiln_provider::Provider;
use kiln_provider_local::Local;
use kiln_state::State;

use super::{print_json, FOUND};
use crate::Cli;

#[derive(Args, Debug)]
pub struct EnvArgs {
    /// The environment, e.g. `staging`.
    pub env: String,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    pub env: String,
    /// Save the plan to FILE, to apply exactly that later.
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Exit 0 when there is nothing to do, 2 when there are changes, 1 on error.
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Plan the destruction of every server (what `kiln destroy` does).
    #[arg(long, conflicts_with = "cold")]
    pub destroy: bool,
    /// Plan a cold deploy (what `kiln deploy --cold` does).
    #[arg(long)]
    pub cold: bool,
}

#[derive(Args, Debug)]
pub struct ApproveArgs {
    pub env: String,
    /// A plan saved by `kiln plan -o`.
    pub plan: PathBuf,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    pub env: String,
    /// A plan saved by `kiln plan -o`, applied exactly as saved.
    pub plan: Option<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Destroy every server first, then create them afresh (not zero-downtime).
    #[arg(long, required = true)]
    pub cold: bool,
    pub env: String,
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct ServerListArgs {
    /// Only this environment.
    pub env: Option<String>,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub env: String,
    /// Only this server (destroyed servers too).
    pub server: Option<String>,
    /// Keep printing what is appended.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// Everything an environment command works with.
struct Ctx {
    project: kiln_model::Project,
    store: kiln_image::Store,
    state: State,
    local: Local,
}

fn ctx(cli: &Cli) -> Result<Ctx> {
    let project = super::project(cli)?;
    let store = super::store(cli)?;
    let state_path = store.root().join("state.db");
    let state = State::open(&state_path)?;
    let local = Local::new(store.root());
    Ok(Ctx {
        project,
        store,
        state,
        local,
    })
}

/// The clock: wall time, or `KILN_NOW` (epoch seconds) when set, so that
/// TTLs and rollback windows can be exercised with an injected time.
fn now() -> i64 {
    std::env::var("KILN_NOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp())
}

/// 16 random bits from the kernel, for new server ids.
fn random() -> u16 {
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

impl Ctx {
    fn engine<'a>(&'a self, progress: &'a dyn Fn(Progress)) -> Engine<'a> {
        Engine {
            project: &self.project,
            store: &self.store,
            state: &self.state,
            provider: &self.local,
            progress,
            clock: &now,
            options: Options {
                health_timeout: health_timeout(),
                ..Options::default()
            },
        }
    }
}

/// Prints a plan with Terraform's colours: green `+`, yellow `~`, red `-`.
fn print_plan(plan: &Plan) {
    for line in kiln_planner::render(plan).lines() {
        let styled = match line.trim_start().chars().next() {
            Some('+') => style(line).green().to_string(),
            Some('~') => style(line).yellow().to_string(),
            Some('-') => style(line).red().to_string(),
            _ if line.starts_with("Plan:") => style(line).bold().to_string(),
            _ => line.to_string(),
        };
        println!("{styled}");
    }
}

fn confirm(env: &str, yes: bool) -> Result<()> {
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

/// A fresh plan of `env`, signed with its author.
fn make_plan(engine: &Engine, env: &str, cold: bool, destroy: bool) -> Result<Plan> {
    let mut plan = if destroy {
        engine.plan_destroy(env)?
    } else {
        engine.plan(env, cold, &mut random)?
    };
    plan.author = kiln_state::actor();
    Ok(plan)
}

fn read_plan(path: &std::path::Path, env: &str) -> Result<Plan> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read plan {}", path.display()))?;
    let plan: Plan = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a kiln plan", path.display()))?;
    if plan.env != env {
        bail!(
            "{} is a plan for `{}`, not `{}`",
            path.display(),
            plan.env,
            env
        );
    }
    Ok(plan)
}

/// What carrying out a plan is, for locks, approvals and the audit log.
fn kind_of(plan: &Plan) -> &'static str {
    if plan.destroy {
        "destroy"
    } else if plan.cold {
        "deploy --cold"
    } else {
        "apply"
    }
}

pub fn plan(cli: &Cli, args: &PlanArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let engine = c.engine(&|_| {});
    let plan = make_plan(&engine, &args.env, args.cold, args.destroy)?;
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&plan)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if cli.json {
        print_json(&plan)?;
    } else {
        print_plan(&plan);
        if let Some(out) = &args.out {
            println!(
                "\nSaved the plan to {} (plan {}). Apply exactly this plan with: kiln apply {} {}",
                out.display(),
                kiln_engine::plan_hash(&plan),
                args.env,
                out.display()
            );
            let required = c
                .project
                .envs
                .get(&args.env)
                .map(|e| e.approvals)
                .unwrap_or(0);
            if required > 0 && !plan.is_empty() {
                println!("`{}` needs {required} approval(s) first, by someone other than {}: kiln approve {} {}", args.env, plan.author, args.env, out.display());
            }
        }
    }
    Ok(if args.detailed_exitcode && !plan.is_empty() {
        ExitCode::from(FOUND)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn apply(cli: &Cli, args: &ApplyArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let progress = progress_printer(cli.json);
    let engine = c.engine(&progress);
    let plan: Plan = match &args.plan {
        Some(path) => read_plan(path, &args.env)?,
        None => make_plan(&engine, &args.env, false, false)?,
    };
    let code = run_plan(
        cli,
        &c,
        &engine,
        &plan,
        kind_of(&plan),
        args.yes || args.plan.is_some(),
    )?;
    if plan.destroy {
        remove_fronts(&c, &args.env)?;
    }
    Ok(code)
}

/// `kiln approve ENV PLAN`: one approval of a saved plan, in the audit chain.
pub fn approve(cli: &Cli, args: &ApproveArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let engine = c.engine(&|_| {});
    let plan = read_plan(&args.plan, &args.env)?;
    let actor = kiln_state::actor();
    let approvers = engine.approve(&plan, &actor)?;
    let required = c
        .project
        .envs
        .get(&args.env)
        .map(|e| e.approvals)
        .unwrap_or(0);
    let hash = kiln_engine::plan_hash(&plan);
    if cli.json {
        print_json(
            &serde_json::json!({"env": args.env, "plan": hash, "author": plan.author, "approvers": approvers, "required": required, "ready": approvers.len() >= required as usize}),
        )?;
    } else {
        print_plan(&plan);
        println!(
            "\n{} plan {hash} of `{}` (made by {}) as {actor}: {} of {required} approval(s): {}.",
            style("Approved").green().bold(),
            args.env,
            plan.author,
            approvers.len(),
            approvers.join(", ")
        );
        if approvers.len() >= required as usize {
            println!(
                "Apply it with: kiln apply {} {}",
                args.env,
                args.plan.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_plan(
    cli: &Cli,
    c: &Ctx,
    engine: &Engine,
    plan: &Plan,
    kind: &str,
    yes: bool,
) -> Result<ExitCode> {
    if !cli.json {
        print_plan(plan);
    }
    if plan.is_empty() {
        if cli.json {
            print_json(
                &serde_json::json!({"env": plan.env, "changes": 0, "servers": servers_json(c, &plan.env)?}),
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Refused before asking, not after.
    engine.check_approved(plan, kind)?;
    confirm(&plan.env, yes || cli.json)?;
    let applied = if kind == "apply" {
        engine.apply_or_roll_back(plan, kind, &mut random)?
    } else {
        engine.apply(plan, kind)?
    };
    if cli.json {
        print_json(
            &serde_json::json!({"env": plan.env, "release": applied.release, "changes": applied.changes, "servers": servers_json(c, &plan.env)?}),
        )?;
    } else {
        println!(
            "\n{} release #{} of `{}`: {} changes applied.",
            style("Done:").green().bold(),
            applied.release,
            plan.env,
            applied.changes
        );
        print_addresses(c, &plan.env)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_addresses(c: &Ctx, env: &str) -> Result<()> {
    let spec = c.project.envs.get(env);
    for s in c.state.servers(Some(env))? {
        let port = spec
            .and_then(|e| e.roles.get(&s.role))
            .and_then(|r| r.ports.first().copied());
        match port {
            Some(p) => println!(
                "  {} {:<10} http://{}:{}/",
                style("●").green(),
                s.id,
                s.address,
                p
            ),
            None => println!("  {} {:<10} {}", style("●").green(), s.id, s.address),
        }
    }
    Ok(())
}

/// Renders engine progress to stderr: plain lines, plus a spinner while a
/// server's health is awaited when stderr is a terminal.
fn progress_printer(quiet: bool) -> impl Fn(Progress) {
    let spinner: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);
    let tty = crate::output::stderr_is_tty();
    move |p| {
        if quiet {
            return;
        }
        if let Some(bar) = spinner.lock().expect("spinner lock").take() {
            bar.finish_and_clear();
        }
        match p {
            Progress::Converged { detail } => eprintln!("{} {detail}", style("cleanup:").yellow()),
            Progress::Step {
                index,
                total,
                change,
            } => {
                let (mark, verb) = match change.action {
                    Action::Create => (style("+").green(), "creating"),
                    Action::Replace => (style("~").yellow(), "replacing"),
                    Action::Destroy => (style("-").red(), "destroying"),
                };
                let extra = change
                    .replacement
                    .as_ref()
                    .map(|r| format!(" by {r}"))
                    .unwrap_or_default();
                eprintln!(
                    "[{index}/{total}] batch {} {mark} {verb} {}{extra} ({})",
                    change.batch, change.server, change.reason
                );
            }
            Progress::Waiting { server, address } if tty => {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "        {spinner:.cyan} {msg} [{elapsed}]",
                    )
                    .expect("template"),
                );
                bar.set_message(format!("waiting for {server} at {address} to be healthy"));
                bar.enable_steady_tick(Duration::from_millis(80));
                *spinner.lock().expect("spinner lock") = Some(bar);
            }
            Progress::Waiting { server, address } => {
                eprintln!("        waiting for {server} at {address} to be healthy")
            }
            Progress::Healthy {
                server, elapsed, ..
            } => eprintln!(
                "        {} {server} healthy after {} ms",
                style("✓").green(),
                elapsed.as_millis()
            ),
            Progress::Destroyed { server } => {
                eprintln!("        {} {server} destroyed", style("✗").red())
            }
            Progress::Switched { roles, share } => {
                let traffic: Vec<String> = share.iter().filter(|(_, _, total)| *total > 0).map(|(role, new, total)| format!("{role}: {new}/{total} servers on the new image, {}% of new connections", new * 100 / total)).collect();
                eprintln!(
                    "        {} balancer of {} switched to the new servers ({})",
                    style("⇄").cyan(),
                    roles.join(", "),
                    traffic.join("; ")
                );
            }
            Progress::Standby { server, secs } => eprintln!(
                "        {} {server} kept warm out of the balancer for {} (rollback window)",
                style("◐").yellow(),
                kiln_spec::format_duration(secs)
            ),
            Progress::Baking { role, secs } if tty => {
                let bar = indicatif::ProgressBar::new(secs.max(1));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "        {spinner:.cyan} canary of {msg} baking [{bar:20}] {eta} left",
                    )
                    .expect("template"),
                );
                bar.set_message(role);
                bar.enable_steady_tick(Duration::from_millis(200));
                let ticker = bar.clone();
                std::thread::spawn(move || {
                    while !ticker.is_finished() && ticker.position() < ticker.length().unwrap_or(0)
                    {
                        std::thread::sleep(Duration::from_secs(1));
                        ticker.inc(1);
                    }
                });
                *spinner.lock().expect("spinner lock") = Some(bar);
            }
            Progress::Baking { role, secs } => eprintln!(
                "        {} canary of {role} baking for {}",
                style("…").cyan(),
                kiln_spec::format_duration(secs)
            ),
            Progress::RollingBack { to, reason } => eprintln!(
                "{} {reason}\n{} returning to the images of release #{to}",
                style("failed:").red().bold(),
                style("rollback:").yellow().bold()
            ),
        }
    }
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    pub env: String,
    /// The release whose images to return to [default: the previous one].
    #[arg(long, value_name = "RELEASE")]
    pub to: Option<i64>,
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `kiln rollback`: a zero-downtime rollout of a previous release's images.
pub fn rollback(cli: &Cli, args: &RollbackArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let progress = progress_printer(cli.json);
    let engine = c.engine(&progress);
    let (release, targets) = engine.rollback_targets(&args.env, args.to)?;
    if !cli.json {
        println!(
            "Rolling `{}` back to the images of release #{release}:",
            args.env
        );
    }
    let plan = engine.plan_targets(&args.env, targets, false, &mut random)?;
    run_plan(cli, &c, &engine, &plan, "rollback", args.yes)
}

pub fn deploy(cli: &Cli, args: &DeployArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let progress = progress_printer(cli.json);
    let engine = c.engine(&progress);
    let plan = make_plan(&engine, &args.env, args.cold, false)?;
    if !cli.json {
        eprintln!("{} a cold deploy destroys every server of `{}` before creating new ones: it is NOT zero-downtime.", style("warning:").yellow().bold(), args.env);
    }
    run_plan(cli, &c, &engine, &plan, "deploy --cold", args.yes)
}

pub fn destroy(cli: &Cli, args: &EnvArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let progress = progress_printer(cli.json);
    let engine = c.engine(&progress);
    let plan = make_plan(&engine, &args.env, false, true)?;
    let code = run_plan(cli, &c, &engine, &plan, "destroy", args.yes)?;
    remove_fronts(&c, &args.env)?;
    Ok(code)
}

/// The environment's balancers and bridge go with its last server.
fn remove_fronts(c: &Ctx, env: &str) -> Result<()> {
    if c.state.servers(Some(env))?.is_empty() {
        if let Some(spec) = c.project.envs.get(env) {
            for role in spec.roles.keys() {
                c.local.remove_balancer(env, role)?;
            }
        }
        c.local.remove_network(env)?;
    }
    Ok(())
}

fn health_of(c: &Ctx, s: &kiln_model::Server, alive: bool) -> &'static str {
    if s.status != kiln_model::ServerStatus::Running {
        return s.status.as_str();
    }
    if !alive {
        return "down";
    }
    let check = c
        .project
        .envs
        .get(&s.env)
        .and_then(|e| e.roles.get(&s.role))
        .and_then(|r| r.health.clone());
    let ok = match check {
        Some(HealthCheck::Http { path, port }) => {
            kiln_provider_local::http_ok(&s.address, port, &path)
        }
        Some(HealthCheck::Tcp { port }) => s.address.parse().ok().is_some_and(|ip| {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(ip, port),
                Duration::from_millis(300),
            )
            .is_ok()
        }),
        Some(HealthCheck::Command { .. }) | None => true,
    };
    if ok {
        "healthy"
    } else {
        "unhealthy"
    }
}

/// Where a server stands at its role's balancer: `in rotation`, `failing
/// checks` (taken out by the balancer's own health check), `draining`, or
/// nothing when the balancer does not know it (standby, or no balancer).
fn balancer_state(
    c: &Ctx,
    s: &kiln_model::Server,
    fronts: &mut std::collections::BTreeMap<String, Option<kiln_balancer::Status>>,
) -> Option<&'static str> {
    let port = c
        .project
        .envs
        .get(&s.env)
        .and_then(|e| e.roles.get(&s.role))
        .and_then(|r| r.balancer.as_ref())
        .map(|b| b.port)?;
    let status = fronts
        .entry(s.role.clone())
        .or_insert_with(|| kiln_balancer::read_status(&c.local.balancer_dir(&s.env, &s.role)))
        .as_ref()?;
    let me = format!("{}:{port}", s.address);
    let b = status.backends.iter().find(|b| b.addr == me)?;
    Some(if !b.active {
        "draining"
    } else if !b.healthy {
        "failing checks"
    } else {
        "in rotation"
    })
}

fn servers_json(c: &Ctx, env: &str) -> Result<serde_json::Value> {
    let alive: std::collections::BTreeSet<String> = c
        .local
        .inventory(env)?
        .into_iter()
        .filter(|r| r.alive)
        .map(|r| r.id)
        .collect();
    let mut fronts = std::collections::BTreeMap::new();
    let rows: Vec<_> = c
        .state
        .servers(Some(env))?
        .into_iter()
        .map(|s| {
            let ports = c.project.envs.get(env).and_then(|e| e.roles.get(&s.role)).map(|r| r.ports.clone()).unwrap_or_default();
            serde_json::json!({
                "id": s.id, "env": s.env, "role": s.role, "image": s.image, "image_digest": s.image_digest,
                "address": s.address, "ports": ports,
                "created": chrono::DateTime::from_timestamp(s.created, 0).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "health": health_of(c, &s, alive.contains(&s.id)), "pid": s.pid, "status": s.status.as_str(), "release": s.release,
                "balancer": balancer_state(c, &s, &mut fronts),
            })
        })
        .collect();
    Ok(serde_json::Value::Array(rows))
}

pub fn server_list(cli: &Cli, args: &ServerListArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let envs = match &args.env {
        Some(e) => vec![e.clone()],
        None => c.state.envs()?,
    };
    let mut all = Vec::new();
    for e in &envs {
        if let serde_json::Value::Array(rows) = servers_json(&c, e)? {
            all.extend(rows);
        }
    }
    if cli.json {
        print_json(&all)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let created = chrono::DateTime::parse_from_rfc3339(s["created"].as_str().unwrap_or(""))
                .map(|t| t.timestamp())
                .unwrap_or(0);
            let health = s["health"].as_str().unwrap_or("").to_string();
            let health = match health.as_str() {
                "healthy" => style(health).green().to_string(),
                "unhealthy" | "down" => style(health).red().to_string(),
                _ => style(health).yellow().to_string(),
            };
            vec![
                s["id"].as_str().unwrap_or("").into(),
                s["env"].as_str().unwrap_or("").into(),
                s["role"].as_str().unwrap_or("").into(),
                s["image"].as_str().unwrap_or("").into(),
                s["address"].as_str().unwrap_or("").into(),
                kiln_spec::format_duration((now() - created).max(0) as u64),
                health,
                match s["balancer"].as_str() {
                    Some(b @ "in rotation") => style(b).green().to_string(),
                    Some(b @ "failing checks") => style(b).red().to_string(),
                    Some(b) => style(b).yellow().to_string(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    crate::output::table(
        &[
            "ID", "ENV", "ROLE", "IMAGE", "ADDRESS", "AGE", "HEALTH", "BALANCER",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn logs(cli: &Cli, args: &LogsArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let dir = c.store.root().join("logs").join(&args.env);
    // Server logs of the environment (health-probe logs aside), by id; read
    // again on every round when following, so servers created meanwhile (a
    // rollout) join the stream.
    let scan = || -> Vec<(String, PathBuf)> {
        let mut files = Vec::new();
        for i in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = i.file_name().to_string_lossy().to_string();
            if let Some(id) = name.strip_suffix(".log") {
                if !id.ends_with(".health") && args.server.as_deref().is_none_or(|s| s == id) {
                    files.push((id.to_string(), i.path()));
                }
            }
        }
        files.sort();
        files
    };
    if scan().is_empty() {
        match &args.server {
            Some(s) => bail!("no logs for server `{s}` in `{}`", args.env),
            None => bail!("no logs in `{}` yet", args.env),
        }
    }
    let prefix = args.server.is_none();
    let mut offsets: std::collections::BTreeMap<PathBuf, u64> = std::collections::BTreeMap::new();
    loop {
        for (id, path) in scan() {
            let Ok(mut f) = std::fs::File::open(&path) else {
                continue;
            };
            let offset = offsets.entry(path).or_insert(0);
            f.seek(std::io::SeekFrom::Start(*offset))?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)?;
            // While following, a line still being written waits for its end.
            let upto = if args.follow {
                bytes.iter().rposition(|b| *b == b'\n').map_or(0, |n| n + 1)
            } else {
                bytes.len()
            };
            *offset += upto as u64;
            for line in String::from_utf8_lossy(&bytes[..upto]).lines() {
                if prefix {
                    println!("{} {line}", style(format!("{id:<10} |")).dim());
                } else {
                    println!("{line}");
                }
            }
        }
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn history(cli: &Cli, args: &EnvArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let releases = c.state.releases(&args.env)?;
    let events = c.state.events(&args.env)?;
    if cli.json {
        print_json(&serde_json::json!({"env": args.env, "releases": releases, "events": events}))?;
        return Ok(ExitCode::SUCCESS);
    }
    let ts = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    let mut lines: Vec<(i64, String)> = Vec::new();
    for r in &releases {
        let outcome = match r.outcome.as_str() {
            "succeeded" => style(&r.outcome).green().to_string(),
            "failed" => style(&r.outcome).red().to_string(),
            _ => style(&r.outcome).yellow().to_string(),
        };
        let detail = if r.outcome == "failed" {
            format!("\n      {}", r.detail.lines().next().unwrap_or(""))
        } else {
            String::new()
        };
        lines.push((
            r.created,
            format!(
                "{}  #{:<3} {:<14} by {:<10} {outcome}: {}{detail}",
                ts(r.created),
                r.id,
                r.kind,
                r.actor,
                r.summary
            ),
        ));
    }
    for e in &events {
        lines.push((
            e.time,
            format!(
                "{}  {:<4} {:<14} by {:<10} {}",
                ts(e.time),
                "",
                e.action,
                e.actor,
                e.detail
            ),
        ));
    }
    lines.sort_by_key(|l| l.0);
    if lines.is_empty() {
        println!("No history for `{}` yet.", args.env);
    }
    for (_, l) in lines {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unlock(cli: &Cli, args: &EnvArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    match c.state.lock_info(&args.env)? {
        None => {
            println!("`{}` is not locked.", args.env);
            Ok(ExitCode::SUCCESS)
        }
        Some(info) => {
            if info.holder_alive() && !args.yes {
                bail!("the lock on `{}` is held by a live process (pid {} on {}); stop it, or pass --yes to break the lock anyway", args.env, info.pid, info.host);
            }
            c.state.unlock(&args.env, &kiln_state::actor())?;
            c.engine(&|_| {}).audit(
                &args.env,
                "unlock",
                "-",
                &format!("broke the lock of {} (pid {})", info.holder, info.pid),
            )?;
            println!(
                "Broke the lock on `{}` held by {} (pid {}) since {}.",
                args.env,
                info.holder,
                info.pid,
                chrono::DateTime::from_timestamp(info.since, 0)
                    .unwrap_or_default()
                    .to_rfc3339()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Args, Debug)]
pub struct BalancerArgs {
    #[arg(long)]
    pub listen: String,
    #[arg(long)]
    pub dir: PathBuf,
}

/// `kiln balancer serve`: the balancer process itself (started by kiln).
pub fn balancer_serve(args: &BalancerArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(kiln_balancer::run(&args.listen, args.dir.clone()))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct DriftArgs {
    pub env: String,
    /// Re-hash every file, ignoring what the last scan saw unchanged.
    #[arg(long)]
    pub full: bool,
}

/// `kiln drift ENV`: exit 0 when clean, 2 when drift is found, 1 on error.
/// Prints a drift report: red for what someone did to a server (files,
/// processes, unmanaged), yellow for what time did (stale, expired, config).
fn print_drift(report: &kiln_engine::drift::Report) {
    for line in kiln_engine::drift::render(report).lines() {
        let styled = if let Some(rest) = line.strip_prefix("no drift") {
            format!("{}{rest}", style("no drift").green().bold())
        } else if let Some(rest) = line.strip_prefix("DRIFT") {
            format!("{}{rest}", style("DRIFT").red().bold())
        } else if let Some(finding) = line.strip_prefix("    ") {
            let (kind, detail) = finding.split_at(finding.len().min(9));
            let kind = match kind.trim() {
                "files" | "process" | "unmanaged" => style(kind).red(),
                _ => style(kind).yellow(),
            };
            format!("    {kind}{detail}")
        } else {
            style(line).bold().to_string()
        };
        println!("{styled}");
    }
}

pub fn drift(cli: &Cli, args: &DriftArgs) -> Result<ExitCode> {
    let c = ctx(cli)?;
    let engine = c.engine(&|_| {});
    let report = engine.drift(&args.env, args.full)?;
    if cli.json {
        print_json(&report)?;
    } else {
        print_drift(&report);
    }
    Ok(if report.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FOUND)
    })
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// `verify` checks the chain; an environment name filters the log.
    pub what: Option<String>,
}

/// `kiln audit [ENV]` shows the log; `kiln audit verify` checks the chain.
pub fn audit(cli: &Cli, args: &AuditArgs) -> Result<ExitCode> {
    let store = super::store(cli)?;
    let state = State::open(&store.root().join("state.db"))?;
    if args.what.as_deref() == Some("verify") {
        let entries = state.audit(None)?.len();
        return match state.verify_audit()? {
            None => {
                if cli.json {
                    print_json(&serde_json::json!({"ok": true, "entries": entries}))?;
                } else {
                    println!(
                        "{} the audit chain holds ({entries} entries).",
                        style("ok").green().bold()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Some((seq, why)) => {
                if cli.json {
                    print_json(
                        &serde_json::json!({"ok": false, "entries": entries, "first_bad": seq, "reason": why}),
                    )?;
                } else {
                    println!(
                        "{} audit entry #{seq} {why}.",
                        style("TAMPERED").red().bold()
                    );
                }
                Ok(ExitCode::from(FOUND))
            }
        };
    }
    let entries = state.audit(args.what.as_deref())?;
    if cli.json {
        print_json(&entries)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                format!("#{}", e.seq),
                chrono::DateTime::from_timestamp(e.time, 0)
                    .unwrap_or_default()
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
                e.env.clone(),
                if e.pipeline {
                    e.actor.clone()
                } else {
                    style(format!("{} (not a pipeline)", e.actor))
                        .red()
                        .to_string()
                },
                e.action.clone(),
                e.plan_hash.clone(),
                e.outcome.clone(),
            ]
        })
        .collect();
    crate::output::table(
        &["SEQ", "TIME", "ENV", "ACTOR", "ACTION", "PLAN", "OUTCOME"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct ReconcileArgs {
    pub env: String,
    /// Print what would be done, do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep reconciling, every --interval.
    #[arg(long)]
    pub watch: bool,
    #[arg(long, default_value = "60s")]
    pub interval: String,
    /// Do not ask for confirmation on a terminal.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `kiln reconcile ENV`: heal, rotate, replace stale, enforce drift policy.
pub fn reconcile(cli: &Cli, args: &ReconcileArgs) -> Result<ExitCode> {
    let interval = kiln_spec::parse_duration(&args.interval).map_err(anyhow::Error::msg)?;
    loop {
        match reconcile_pass(cli, args) {
            Ok(Some(code)) if !args.watch => return Ok(code),
            Ok(_) => {}
            // A watch loop outlives a failing pass (a lock held by an apply,
            // an image to rebuild, a self-heal that failed and alarmed): it
            // says so and tries again next time.
            Err(e) if args.watch => eprintln!(
                "{} {e:#}\nnext pass in {} ms",
                style("reconcile pass failed:").red().bold(),
                interval.as_millis()
            ),
            Err(e) => return Err(e),
        }
        if !args.watch {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(interval);
    }
}

/// One reconcile pass; `Some(code)` when the command is done with it.
fn reconcile_pass(cli: &Cli, args: &ReconcileArgs) -> Result<Option<ExitCode>> {
    let c = ctx(cli)?;
    let progress = progress_printer(cli.json);
    let engine = c.engine(&progress);
    // On a terminal, show what would be done and ask first (unless --yes or --watch).
    let interactive = !args.yes && !args.watch && !args.dry_run && std::io::stdin().is_terminal();
    if interactive {
        let preview = engine.reconcile(&args.env, true, &mut random)?;
        if preview.plan.is_empty() {
            println!("`{}` needs nothing.", args.env);
            return Ok(Some(ExitCode::SUCCESS));
        }
        print_plan(&preview.plan);
        confirm(&args.env, false)?;
    }
    let pass = engine.reconcile(&args.env, args.dry_run, &mut random)?;
    if cli.json {
        print_json(&pass)?;
    } else {
        for (id, why) in &pass.forced {
            println!("{} {id}: {why}", style("replace").yellow());
        }
        for f in pass
            .report
            .findings
            .iter()
            .filter(|f| !pass.forced.contains_key(&f.server))
        {
            println!(
                "{} {}: {} {}",
                style("found").dim(),
                f.server,
                f.kind,
                f.detail
            );
        }
        for role in &pass.balancers_restarted {
            let what = if args.dry_run {
                "is not running: it would be restarted"
            } else {
                "was not running: restarted"
            };
            println!(
                "{} the balancer of `{role}` {what}",
                style("self-heal").yellow()
            );
        }
        if pass.plan.is_empty() && pass.balancers_restarted.is_empty() {
            println!("`{}` needs nothing.", args.env);
        } else if args.dry_run {
            println!("Would carry out (dry run, nothing changed):");
            print_plan(&pass.plan);
        } else if let Some(r) = pass.release {
            println!(
                "{} reconciled `{}` as release #{r}.",
                style("Done:").green().bold(),
                args.env
            );
        }
    }
    std::io::stdout().flush()?;
    Ok(Some(ExitCode::SUCCESS))
}
