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
}

pub fn serve(args: &BalancerArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(kiln_balancer::run(&args.listen, args.dir.clone()))?;
    Ok(ExitCode::SUCCESS)
}
