//! `kiln-bench --only start`: what Docker's default seccomp filter costs a
//! server's start. The same sandbox as a server's (read-only image root
//! from the store, tmpfs, Docker's default capabilities, cgroup limits,
//! `no_new_privileges`, read-only `/sys/fs/cgroup` and `/proc/sys`), started
//! with the filter and without it, alternately so that a noisy neighbour on
//! the machine hurts both alike; each start is timed from the start call to
//! busybox httpd's first passing HTTP check. The sandbox shares the host's
//! network (httpd on a free loopback port), so the figure leaves out the
//! network namespace and veth that `--only server-start` includes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_sandbox::{Limits, Network, Runtime, SandboxSpec};

use crate::{kiln, ms, percentile, static_web_project, Opts};

/// Starts per variant.
const STARTS: usize = 40;

pub fn run(o: &Opts) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The subnet is only written to kiln.toml; nothing is deployed.
    static_web_project(dir.path(), &[("web", 1)], "10.77.94.0/24")?;
    kiln(o, dir.path(), &["image", "build", "web"])?;
    let store = kiln_image::Store::open(dir.path().join(".kiln"))?;
    let rec = store.current_record("web")?;
    let root = store.root_path(&rec.digest);
    let runtime = Runtime::new(&dir.path().join("runtime"));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..STARTS * 2 {
        let seccomp = i % 2 == 0;
        let took = start(&runtime, &root, dir.path(), i, seccomp)?;
        if seccomp {
            on.push(took);
        } else {
            off.push(took);
        }
    }
    let (p50_on, p50_off) = (percentile(&mut on, 0.5), percentile(&mut off, 0.5));
    println!(
        "| sandbox start → first passing HTTP check, Docker's seccomp filter on | p50 {} · p95 {} · max {} ({STARTS} starts) |",
        ms(p50_on),
        ms(percentile(&mut on, 0.95)),
        ms(percentile(&mut on, 1.0))
    );
    println!(
        "| the same, seccomp filter off | p50 {} · p95 {} · max {} ({STARTS} starts, interleaved) |",
        ms(p50_off),
        ms(percentile(&mut off, 0.95)),
        ms(percentile(&mut off, 1.0))
    );
    println!(
        "| cost of the filter at p50 | {:+.1} ms (load average at start: {}) |",
        (p50_on.as_secs_f64() - p50_off.as_secs_f64()) * 1000.0,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

/// One start to healthy, then the sandbox is deleted.
fn start(runtime: &Runtime, root: &Path, dir: &Path, i: usize, seccomp: bool) -> Result<Duration> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let id = format!("kiln-bench-start-{}-{i}", std::process::id());
    let mut spec = SandboxSpec::readonly(
        &id,
        root,
        [
            "/busybox",
            "httpd",
            "-f",
            "-p",
            &format!("127.0.0.1:{port}"),
            "-h",
            "/www",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
        &dir.join(format!("{id}.log")),
    );
    spec.env = vec!["PATH=/".into()];
    spec.network = Network::Host;
    spec.limits = Some(Limits {
        memory_bytes: Some(64 << 20),
        cpus: Some(0.5),
        pids: None,
    });
    spec.seccomp = seccomp;
    let health: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let t = Instant::now();
    let pid = runtime
        .start(&spec)
        .with_context(|| format!("start {id}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut healthy = false;
    while Instant::now() < deadline {
        if kiln_provider::check::http(health, "/healthz") {
            healthy = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let took = t.elapsed();
    runtime
        .delete(&id)
        .with_context(|| format!("delete {id}"))?;
    // The sandbox's first process is this process's child: reap it.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    anyhow::ensure!(healthy, "{id} never became healthy");
    Ok(took)
}
