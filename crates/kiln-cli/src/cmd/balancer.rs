//! `kiln balancer serve`: the balancer process itself (started by the
//! local provider, hidden from help).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct BalancerArgs {
    #[arg(long)]
    pub listen: String,
    #[arg(long)]
    pub dir: PathBuf,
    /// Also serve the control channel over HTTP on this `IP:PORT` (a
    /// balancer kiln runs on a swarm); requests must carry the bearer
    /// token in `KILN_BALANCER_TOKEN`.
    #[arg(long)]
    pub control: Option<String>,
}

pub fn serve(args: &BalancerArgs) -> Result<ExitCode> {
    let rt = runtime()?;
    let control = match &args.control {
        Some(addr) => {
            let token = std::env::var("KILN_BALANCER_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--control needs a token in KILN_BALANCER_TOKEN"))?;
            Some(kiln_balancer::Control {
                addr: addr.clone(),
                token,
            })
        }
        None => None,
    };
    std::fs::create_dir_all(&args.dir)?;
    rt.block_on(kiln_balancer::run_with(
        &args.listen,
        args.dir.clone(),
        control,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// The balancer's runtime: one event loop on a machine of up to two
/// cores, a worker per core (at most 8) beyond. Where the balancer shares
/// two cores with its servers and clients, one loop batches more events
/// per wake-up: behind servers that take a connection per request it made
/// 1.0–1.7 context switches per request against 2.2–2.8 for two workers,
/// and used 8–15% less CPU per request (BENCHMARKS.md). One loop is one
/// core, ≈ 7,500 such requests per second; larger machines get workers.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores <= 2 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores.min(8))
            .enable_all()
            .build()
    }
}
