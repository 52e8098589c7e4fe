//! `kiln-bench --only http-balancer`: kiln's balancer in HTTP mode against
//! HAProxy 2.6 (Debian's package, `mode http`, `balance roundrobin`), in
//! front of the same three busybox httpd servers started by kiln, loaded
//! by `wrk` at 32 and 256 connections; then the same with TLS terminated
//! by both, with the same certificate. Prints Markdown rows.
//!
//! The servers get a whole CPU each (no 0.2 cap as in the rollout
//! figures) so that the fronts, not the servers' cgroups, are compared.
//! wrk, both fronts and the servers share the machine's cores.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{kiln, Opts};

/// Seconds of load per measurement.
const SECS: u64 = 5;

/// A process killed when the bench is done with it.
pub(crate) struct Running(Child);

/// `kiln balancer serve` on `127.0.0.1:port` with the control directory
/// `dir` (its backends already written there); stopped when dropped.
pub(crate) fn serve_balancer(kiln: &Path, port: u16, dir: &Path) -> Result<Running> {
    let child = Command::new(kiln)
        .args([
            "balancer",
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Running(child))
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CPU time (user + system, in clock ticks) process `pid` has used.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is the first, utime the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        Ok(fields.get(i).context("a short /proc stat line")?.parse()?)
    };
    Ok(field(11)? + field(12)?)
}

/// What wrk measured.
struct Load {
    rps: f64,
    requests: u64,
    p50: String,
    p99: String,
    errors: String,
}

pub fn run(o: &Opts) -> Result<()> {
    for tool in ["haproxy", "wrk"] {
        if Command::new(tool)
            .arg(if tool == "haproxy" { "-v" } else { "--version" })
            .output()
            .is_err()
        {
            bail!("{tool} is not installed; run scripts/setup.sh");
        }
    }
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    web_project(dir.path(), port)?;
    kiln(o, dir.path(), &["image", "build", "web"])?;
    kiln(o, dir.path(), &["apply", "bench", "--yes"])?;
    let result = measure_all(o, dir.path(), port);
    kiln(o, dir.path(), &["destroy", "bench", "--yes"])?;
    result
}

fn measure_all(o: &Opts, project: &Path, port: u16) -> Result<()> {
    let store = project.join(".kiln");
    let role_front = store.join("balancers/bench-web");
    let backends = kiln_balancer::read_backends(&role_front)
        .context("the role's balancer")?
        .backends;
    anyhow::ensure!(backends.len() == 3, "expected 3 servers, got {backends:?}");

    // The same certificate for both TLS fronts.
    let pki = project.join("pki");
    fs::create_dir_all(&pki)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])?.self_signed(&key)?;
    fs::write(pki.join("cert.pem"), cert.pem())?;
    fs::write(pki.join("key.pem"), key.serialize_pem())?;
    fs::write(
        pki.join("both.pem"),
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;

    // kiln's fronts as the bench starts HAProxy: `kiln balancer serve` on
    // the same servers, one plain, one with TLS (the role's own balancer,
    // started by `kiln apply`, is measured too).
    let plain = kiln_balancer::read_backends(&role_front).context("the role's balancer")?;
    anyhow::ensure!(
        plain.front.mode == kiln_balancer::Mode::Http,
        "the role's balancer is not in HTTP mode"
    );
    let kiln_exe = std::env::current_exe()?
        .parent()
        .map(|d| d.join("kiln"))
        .context("kiln next to kiln-bench")?;
    let serve = |name: &str, tls: bool| -> Result<(u16, Running)> {
        let port = free_port()?;
        let dir = project.join(name);
        fs::create_dir_all(&dir)?;
        let front = kiln_balancer::Front {
            tls: tls.then(|| kiln_balancer::Tls::Files {
                cert: pki.join("cert.pem"),
                key: pki.join("key.pem"),
            }),
            ..plain.front.clone()
        };
        kiln_balancer::set_backends_with(&dir, &backends, plain.check.as_ref(), &front)?;
        Ok((port, serve_balancer(&kiln_exe, port, &dir)?))
    };
    let (kiln_plain_port, _kiln_plain) = serve("plain-front", false)?;
    let (kiln_tls_port, _kiln_tls) = serve("tls-front", true)?;

    let (hp, hps) = (free_port()?, free_port()?);
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server s{i} {b}\n"))
        .collect();
    let cfg = format!(
        "global\n  maxconn 4096\n  nbthread 2\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
         frontend plain\n  bind 127.0.0.1:{hp}\n  default_backend web\n\
         frontend tls\n  bind 127.0.0.1:{hps} ssl crt {} alpn h2,http/1.1\n  default_backend web\n\
         backend web\n  balance roundrobin\n{servers}",
        pki.join("both.pem").display()
    );
    fs::write(project.join("haproxy.cfg"), cfg)?;
    let _haproxy = Running(
        Command::new("haproxy")
            .arg("-f")
            .arg(project.join("haproxy.cfg"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    for p in [port, kiln_plain_port, kiln_tls_port, hp, hps] {
        wait_listening(p)?;
    }
    let version = Command::new("haproxy").arg("-v").output()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    println!("| front (3 busybox httpd servers, 1 CPU each; wrk -t2 --latency, {SECS} s) | connections | req/s | p50 | p99 | errors | front's CPU per request |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let role_pid: u32 = fs::read_to_string(role_front.join("pid"))
        .context("the role's balancer pid")?
        .trim()
        .parse()?;
    let (plain_pid, tls_pid, haproxy_pid) = (_kiln_plain.0.id(), _kiln_tls.0.id(), _haproxy.0.id());
    let fronts = [
        (
            "http",
            vec![
                ("kiln balancer", kiln_plain_port, plain_pid),
                (
                    "kiln balancer (the role's, started by kiln apply)",
                    port,
                    role_pid,
                ),
                (version.as_str(), hp, haproxy_pid),
            ],
        ),
        (
            "https",
            vec![
                ("kiln balancer", kiln_tls_port, tls_pid),
                (version.as_str(), hps, haproxy_pid),
            ],
        ),
    ];
    let rounds = o.rounds.max(1);
    let mut summary = Vec::new();
    for (scheme, fronts) in &fronts {
        for conns in [32, 256] {
            // Every front once per round, the order rotated each round, so
            // neither drift in the machine's load nor going first or last
            // favours one.
            let mut runs: Vec<Vec<Run>> = fronts.iter().map(|_| Vec::new()).collect();
            for round in 0..rounds {
                for k in 0..fronts.len() {
                    let i = (round + k) % fronts.len();
                    let (name, p, pid) = &fronts[i];
                    let run = measure(scheme, *p, *pid, conns)?;
                    println!(
                        "| {name} {scheme} (round {}) | {conns} | {:.0} | {} | {} | {} | {:.1} µs |",
                        round + 1,
                        run.load.rps,
                        run.load.p50,
                        run.load.p99,
                        run.load.errors,
                        run.cpu_us
                    );
                    runs[i].push(run);
                }
            }
            summary.push((*scheme, conns, fronts.clone(), runs));
        }
    }
    print_summary(&summary, rounds);
    Ok(())
}

/// One wrk run against one front, with the front's CPU time per request.
struct Run {
    load: Load,
    cpu_us: f64,
}

fn measure(scheme: &str, port: u16, pid: u32, conns: u32) -> Result<Run> {
    let url = format!("{scheme}://127.0.0.1:{port}/");
    let before = cpu_ticks(pid)?;
    let load = wrk(&url, conns)?;
    let ticks = cpu_ticks(pid)? - before;
    // Clock ticks are 10 ms (USER_HZ 100 on Linux).
    let cpu_us = ticks as f64 * 10_000.0 / load.requests.max(1) as f64;
    Ok(Run { load, cpu_us })
}

type Fronts<'a> = Vec<(&'a str, u16, u32)>;

/// Medians over the rounds, and each front against the last (HAProxy):
/// the ratio of median req/s, and in how many rounds it answered more
/// requests than HAProxy did in the same round.
fn print_summary(summary: &[(&str, u32, Fronts<'_>, Vec<Vec<Run>>)], rounds: usize) {
    println!("\nMedians of {rounds} rounds; \"ahead\": rounds in which the front answered more requests per second than HAProxy in the same round.\n");
    println!(
        "| front | connections | req/s | vs HAProxy | ahead | p99 | front's CPU per request |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (scheme, conns, fronts, runs) in summary {
        let Some(peer) = runs.last() else { continue };
        let peer_rps = median(peer.iter().map(|r| r.load.rps));
        for (i, ((name, _, _), runs)) in fronts.iter().zip(runs).enumerate() {
            let rps = median(runs.iter().map(|r| r.load.rps));
            let (ratio, ahead) = if i + 1 == fronts.len() {
                ("—".to_string(), "—".to_string())
            } else {
                let ahead = runs
                    .iter()
                    .zip(peer)
                    .filter(|(a, b)| a.load.rps > b.load.rps)
                    .count();
                (
                    format!("{:.3}×", rps / peer_rps.max(1.0)),
                    format!("{ahead} of {}", runs.len()),
                )
            };
            let p99 = median(runs.iter().filter_map(|r| latency_ms(&r.load.p99)));
            let cpu = median(runs.iter().map(|r| r.cpu_us));
            println!(
                "| {name} {scheme} | {conns} | {rps:.0} | {ratio} | {ahead} | {p99:.0} ms | {cpu:.1} µs |"
            );
        }
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// wrk's latency ("850.00us", "12.34ms", "1.01s") in milliseconds.
fn latency_ms(text: &str) -> Option<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(n / 1000.0),
        "ms" => Some(n),
        "s" => Some(n * 1000.0),
        "m" => Some(n * 60_000.0),
        _ => None,
    }
}

/// A scratch image holding static busybox serving /www, three servers of
/// one role behind a balancer on `port` (HTTP mode: its check is HTTP).
fn web_project(dir: &Path, port: u16) -> Result<()> {
    let files = dir.join("images/web/files");
    fs::create_dir_all(files.join("www"))?;
    fs::copy("/bin/busybox", files.join("busybox")).context("needs busybox-static")?;
    fs::write(files.join("www/healthz"), "ok\n")?;
    fs::write(files.join("www/index.html"), "hello from kiln\n")?;
    fs::write(
        dir.join("kiln.toml"),
        format!(
            "[project]\nname = \"bench\"\n[images.web]\nfrom = \"scratch\"\n\
             entrypoint = [\"/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             ports = [8080]\nhealth = {{ http = \"/healthz\", port = 8080 }}\n\
             [env.bench]\nsubnet = \"10.77.99.0/24\"\n\
             [env.bench.roles.web]\nimage = \"web\"\nservers = 3\nsize = {{ cpus = 1.0, memory = \"64M\" }}\n\
             balancer = {{ listen = \"127.0.0.1:{port}\", port = 8080 }}\n"
        ),
    )?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_listening(port: u16) -> Result<()> {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}

/// One wrk run: `-t2 -c conns -d SECS --latency`.
fn wrk(url: &str, conns: u32) -> Result<Load> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{SECS}s"),
            "--latency",
            url,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk {url}: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    };
    let rps: f64 = field("Requests/sec:")
        .context("wrk printed no Requests/sec")?
        .parse()?;
    // Non-2xx/3xx responses and socket errors, as wrk reports them.
    let errors = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Non-2xx") || l.starts_with("Socket errors"))
        .collect::<Vec<_>>()
        .join("; ");
    // "  123456 requests in 5.00s, ..."
    let requests = text
        .lines()
        .map(str::trim)
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("wrk printed no request count")?;
    Ok(Load {
        rps,
        requests,
        p50: field("50%").unwrap_or_default(),
        p99: field("99%").unwrap_or_default(),
        errors: if errors.is_empty() {
            "0".into()
        } else {
            errors
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_latencies_read_in_milliseconds() {
        assert_eq!(latency_ms("850.00us"), Some(0.85));
        assert_eq!(latency_ms("12.50ms"), Some(12.5));
        assert_eq!(latency_ms("1.01s"), Some(1010.0));
        assert_eq!(latency_ms(""), None);
        assert_eq!(latency_ms("12.5"), None);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }
}
