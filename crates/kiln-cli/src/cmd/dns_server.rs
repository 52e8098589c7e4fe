//! `kiln dns-server serve`: an environment's DNS server as a process of its
//! own, started and supervised by kiln like `kiln balancer serve`. All
//! behaviour is in `kiln_dns`; this module only maps flags to its config.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Control directory: `records.json` in; `status.json` and `pid` out.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Address to answer on, over UDP and TCP (repeat for several).
    #[arg(long, required = true, value_name = "ADDR", value_parser = parse_addr)]
    pub listen: Vec<SocketAddr>,
    /// Resolver for names the record set does not hold, tried in order
    /// (repeat for several; port 53 when omitted). None: NXDOMAIN.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub upstream: Vec<SocketAddr>,
    /// Time a forwarded query may take before the client gets SERVFAIL.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub forward_timeout_ms: u64,
    /// UDP sockets (each with its thread) per address [default: one per core, at most 4].
    #[arg(long, value_name = "N")]
    pub udp_sockets: Option<usize>,
}

/// `IP:PORT`, or a bare IP meaning port 53.
fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is neither IP nor IP:PORT"))
}

pub fn serve(args: &ServeArgs) -> Result<ExitCode> {
    let mut config = kiln_dns::Config::new(args.dir.clone(), args.listen.clone());
    config.upstreams = args.upstream.clone();
    config.forward_timeout = Duration::from_millis(args.forward_timeout_ms);
    if let Some(n) = args.udp_sockets {
        config.udp_sockets = n.max(1);
    }
    // UDP has threads of its own; the runtime carries TCP, forwards and
    // the control directory.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(kiln_dns::run(config, kiln_dns::terminated()))
        .with_context(|| format!("dns server for {}", args.dir.display()))?;
    Ok(ExitCode::SUCCESS)
}
