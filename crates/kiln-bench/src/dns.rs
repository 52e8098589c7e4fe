//! `kiln-bench --only dns`: an environment's DNS server (`kiln dns-server
//! serve`, the release binary) against dnsmasq serving the same 100 names
//! from a hosts file, both on loopback, both measured by `dnsperf` with the
//! same query file and arguments.
//!
//! Two measurements per server, alternated over several rounds (the
//! median round is reported, so a noisy neighbour on the machine hurts
//! both alike):
//! - throughput: `dnsperf` with 100 queries outstanding per run for a fixed
//!   time; queries per second, as dnsperf reports it;
//! - latency at a fixed rate below both servers' capacity (`-Q`), from
//!   dnsperf's per-query report (`-v`): p50 and p99 of every query's
//!   round-trip time. At saturation latency only measures the queue
//!   dnsperf keeps full, so it is measured apart.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const NAMES: usize = 100;
const ENV: &str = "bench";
const ROUNDS: usize = 5;
const SECS: u32 = 5;
/// The fixed rate of the latency runs (queries per second).
const LATENCY_QPS: u32 = 10_000;
/// dnsperf's simulated clients: distinct source ports, as many clients
/// of a real environment would have.
const CLIENTS: &str = "8";

struct Figures {
    qps: f64,
    lost: u64,
    p50_us: f64,
    p99_us: f64,
}

pub fn run(kiln: &Path) -> Result<()> {
    for tool in ["dnsperf", "dnsmasq"] {
        if !tool_exists(tool) {
            bail!("{tool} is missing: run scripts/setup.sh");
        }
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let records = write_inputs(dir)?;
    let queries = dir.join("queries");

    let mut kiln_server = KilnDns::start(kiln, &dir.join("kiln-dns"), &records)?;
    let mut dnsmasq = Dnsmasq::start(dir)?;
    for (label, addr) in [("kiln-dns", kiln_server.addr), ("dnsmasq", dnsmasq.addr)] {
        let a = kiln_dns::query(addr, "svc7.bench", Duration::from_secs(2))
            .with_context(|| format!("{label} does not answer"))?;
        if a.addresses.len() != 1 {
            bail!("{label} answered {a:?} for svc7.bench");
        }
    }

    let mut kiln_runs = Vec::new();
    let mut dnsmasq_runs = Vec::new();
    for _ in 0..ROUNDS {
        kiln_runs.push(measure(kiln_server.addr, &queries)?);
        dnsmasq_runs.push(measure(dnsmasq.addr, &queries)?);
    }
    kiln_server.stop();
    dnsmasq.stop();

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "\n## DNS: {NAMES} names, dnsperf -c {CLIENTS} -q 100 for {SECS} s ({ROUNDS} rounds, median; {cores} cores shared by server and dnsperf)\n"
    );
    println!("| server | queries/s | lost | p50 at {LATENCY_QPS} q/s | p99 at {LATENCY_QPS} q/s |");
    println!("| --- | --- | --- | --- | --- |");
    for (label, runs) in [("kiln-dns", &mut kiln_runs), ("dnsmasq", &mut dnsmasq_runs)] {
        let f = median(runs);
        println!(
            "| {label} | {:.0} | {} | {:.0} µs | {:.0} µs |",
            f.qps, f.lost, f.p50_us, f.p99_us
        );
    }
    let k = median(&mut kiln_runs).qps;
    let d = median(&mut dnsmasq_runs).qps;
    println!("\nkiln-dns / dnsmasq queries per second: {:.2}", k / d);
    Ok(())
}

fn tool_exists(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain([Path::new("/usr/sbin").to_path_buf()])
            .any(|d| d.join(tool).is_file())
    })
}

/// The median round by queries per second, with its own latencies.
fn median(runs: &mut [Figures]) -> &Figures {
    runs.sort_by(|a, b| a.qps.total_cmp(&b.qps));
    &runs[runs.len() / 2]
}

/// The record set (kiln's), the same as a hosts file (dnsmasq's), and the
/// query file: every name in both spellings kiln serves.
fn write_inputs(dir: &Path) -> Result<kiln_dns::Records> {
    let mut records = kiln_dns::Records::new(ENV);
    let mut hosts = String::new();
    let mut queries = String::new();
    for i in 0..NAMES {
        let ip = std::net::Ipv4Addr::new(10, 90, (i / 250) as u8, (i % 250 + 2) as u8);
        let short = format!("svc{i}");
        let long = format!("svc{i}.{ENV}");
        hosts.push_str(&format!("{ip} {short} {long}\n"));
        queries.push_str(&format!("{long} A\n{short} A\n"));
        records.names.insert(short, vec![ip]);
        records.names.insert(long, vec![ip]);
    }
    std::fs::write(dir.join("hosts"), hosts)?;
    std::fs::write(dir.join("queries"), queries)?;
    Ok(records)
}

/// A port free on UDP and TCP of 127.0.0.1 right now.
fn free_port() -> Result<u16> {
    for _ in 0..20 {
        let u = UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1")
}

fn stop_child(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct KilnDns {
    child: Child,
    addr: SocketAddr,
}

impl KilnDns {
    fn start(kiln: &Path, dir: &Path, records: &kiln_dns::Records) -> Result<KilnDns> {
        let generation = kiln_dns::set_records(dir, records)?;
        let mut child = Command::new(kiln)
            .args(["dns-server", "serve", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start kiln dns-server")?;
        let start = Instant::now();
        loop {
            if let Some(s) = kiln_dns::running(dir) {
                if s.pid == child.id() && s.generation >= generation {
                    return Ok(KilnDns {
                        child,
                        addr: s.listen[0],
                    });
                }
            }
            if start.elapsed() > Duration::from_secs(10) {
                stop_child(&mut child);
                bail!("kiln dns-server did not start");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(&mut self) {
        stop_child(&mut self.child);
    }
}

impl Drop for KilnDns {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            stop_child(&mut self.child);
        }
    }
}

struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Dnsmasq {
    /// dnsmasq answering from the hosts file only: no upstream, no
    /// /etc/hosts, no config file, the same TTL as kiln's.
    fn start(dir: &Path) -> Result<Dnsmasq> {
        let port = free_port()?;
        let mut child = Command::new("dnsmasq")
            .arg("-k")
            .arg("--conf-file=/dev/null")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg(format!("--addn-hosts={}", dir.join("hosts").display()))
            .arg(format!("--port={port}"))
            .arg("--listen-address=127.0.0.1")
            .arg("--bind-interfaces")
            .arg(format!("--local-ttl={}", kiln_dns::DEFAULT_TTL))
            .arg("--pid-file=")
            .arg("--user=root")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dnsmasq")?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let start = Instant::now();
        while kiln_dns::query(addr, "svc0.bench", Duration::from_millis(200)).is_err() {
            if start.elapsed() > Duration::from_secs(10) || child.try_wait()?.is_some() {
                stop_child(&mut child);
                bail!("dnsmasq did not start on port {port}");
            }
        }
        Ok(Dnsmasq { child, addr })
    }

    fn stop(&mut self) {
        stop_child(&mut self.child);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            stop_child(&mut self.child);
        }
    }
}

/// One throughput run and one latency run against `addr`.
fn measure(addr: SocketAddr, queries: &Path) -> Result<Figures> {
    let port = addr.port().to_string();
    let secs = SECS.to_string();
    let base = |extra: &[&str]| -> Result<String> {
        let out = Command::new("dnsperf")
            .args(["-s", "127.0.0.1", "-p", &port, "-l", &secs, "-c", CLIENTS])
            .arg("-d")
            .arg(queries)
            .args(extra)
            .stderr(Stdio::null())
            .output()
            .context("cannot run dnsperf")?;
        if !out.status.success() {
            bail!("dnsperf failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let rate = base(&["-q", "100"])?;
    let qps = field(&rate, "Queries per second:")?;
    let lost = field(&rate, "Queries lost:")? as u64;
    let qps_limit = LATENCY_QPS.to_string();
    let verbose = base(&["-q", "100", "-Q", &qps_limit, "-v"])?;
    // "> NOERROR svc1.bench A 0.000179": every answered query's time.
    let mut latencies: Vec<f64> = verbose
        .lines()
        .filter_map(|l| l.strip_prefix("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    if latencies.is_empty() {
        bail!("dnsperf -v reported no query");
    }
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize] * 1e6;
    Ok(Figures {
        qps,
        lost,
        p50_us: at(0.50),
        p99_us: at(0.99),
    })
}

/// The number after `label` in dnsperf's statistics.
fn field(report: &str, label: &str) -> Result<f64> {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no {label:?} in dnsperf's report:\n{report}"))
}
