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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
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
