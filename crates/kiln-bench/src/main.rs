//! `kiln-bench`: measures the figures the issues name and prints them as
//! Markdown rows for BENCHMARKS.md. It drives the real release `kiln`
//! binary (process start included) and the real store; nothing is mocked.
//!
//! Usage: kiln-bench [--kiln PATH] [--tree-mib N] [--only NAME] [--debootstrap]
//! (`--only supply`: SBOM + scan of a Debian image, signature checks;
//! `--only rollout-http`: the rollout figures with the balancer in HTTP mode;
//! `--only start`: server start with the seccomp filter on and off)

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod balancer;
mod dns;
mod start;
mod supply;
mod swarm;

struct Opts {
    kiln: PathBuf,
    tree_mib: u64,
    only: Option<String>,
    debootstrap: bool,
    /// Rounds of the side-by-side figures (`http-balancer`).
    rounds: usize,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        kiln: default_kiln(),
        tree_mib: 1024,
        only: None,
        debootstrap: false,
        rounds: 4,
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--kiln" => o.kiln = args.next().context("--kiln PATH")?.into(),
            "--tree-mib" => o.tree_mib = args.next().context("--tree-mib N")?.parse()?,
            "--only" => o.only = Some(args.next().context("--only NAME")?),
            "--debootstrap" => o.debootstrap = true,
            "--rounds" => o.rounds = args.next().context("--rounds N")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    if !o.kiln.is_file() {
        bail!(
            "no kiln binary at {}; build it with `cargo build --release`",
            o.kiln.display()
        );
    }
    println!(
        "# kiln-bench {}  ({} cores)",
        o.kiln.display(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let want = |n: &str| o.only.as_deref().is_none_or(|x| x == n);
    if want("cache-hit") {
        cache_hit(&o)?;
    }
    if want("seal") {
        seal(&o)?;
    }
    if want("scratch") {
        scratch(&o)?;
    }
    if want("debootstrap") && o.debootstrap {
        debootstrap(&o)?;
    }
    if want("server-start") {
        server_start(&o)?;
    }
    if want("plan") {
        plan_10k()?;
    }
    if want("rebuild") {
        rebuild(&o)?;
    }
    if want("rollout") {
        rollout(&o, "tcp")?;
    }
    if o.only.as_deref() == Some("rollout-http") {
        rollout(&o, "http")?;
    }
    if want("drift") {
        drift(&o)?;
    }
    if want("reconcile") {
        reconcile_cpu(&o)?;
    }
    if want("dns") {
        dns::run(&o.kiln)?;
    }
    if want("dns-withdrawal") {
        dns_withdrawal(&o)?;
    }
    if want("start") {
        start::run(&o)?;
    }
    if want("swarm") {
        swarm::run(&o.kiln)?;
    }
    if want("http-balancer") {
        balancer::run(&o)?;
    }
    // Builds a Debian image with nginx (minutes on a cold machine): only
    // when asked for, like the debootstrap figure.
    if o.only.as_deref() == Some("supply") || o.debootstrap {
        supply::run(&o.kiln)?;
    }
    Ok(())
}

fn default_kiln() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.parent().map(|d| d.join("kiln")).unwrap_or_default()
}

fn kiln(o: &Opts, dir: &Path, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let out = Command::new(&o.kiln)
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("NO_COLOR", "1")
        .output()?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "kiln {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A three-image chain on a busybox rootfs tarball.
fn chain_project(dir: &Path) -> Result<()> {
    let rfs = dir.join("rfs");
    fs::create_dir_all(rfs.join("bin"))?;
    fs::copy("/bin/busybox", rfs.join("bin/busybox")).context("needs busybox-static")?;
    std::os::unix::fs::symlink("busybox", rfs.join("bin/sh"))?;
    fs::create_dir_all(rfs.join("etc"))?;
    let st = Command::new("tar")
        .arg("-C")
        .arg(&rfs)
        .arg("-czf")
        .arg(dir.join("base.tar.gz"))
        .arg(".")
        .status()?;
    anyhow::ensure!(st.success());
    fs::remove_dir_all(&rfs)?;
    fs::write(
        dir.join("kiln.toml"),
        "[project]\nname = \"bench\"\n[images.base]\nfrom = { rootfs = \"base.tar.gz\" }\n[images.app]\nfrom = \"base\"\n[images.worker]\nfrom = \"app\"\n",
    )?;
    for (img, n) in [("app", 200), ("worker", 50)] {
        let files = dir.join(format!("images/{img}/files/srv"));
        fs::create_dir_all(&files)?;
        for i in 0..n {
            fs::write(
                files.join(format!("f{i}.txt")),
                format!("{img} file {i}\n").repeat(20),
            )?;
        }
        let scripts = dir.join(format!("images/{img}/scripts"));
        fs::create_dir_all(&scripts)?;
        fs::write(
            scripts.join("10_setup.sh"),
            format!("#!/bin/sh\necho {img} > /etc/{img}\n"),
        )?;
    }
    Ok(())
}

fn cache_hit(o: &Opts) -> Result<()> {
    let dir = tempfile::tempdir()?;
    chain_project(dir.path())?;
    let cold = kiln(o, dir.path(), &["image", "build", "--all"])?;
    let mut samples: Vec<Duration> = (0..30)
        .map(|_| kiln(o, dir.path(), &["image", "build", "--all"]))
        .collect::<Result<_>>()?;
    println!("| cache-hit `kiln image build --all`, 3-image chain (250 files), wall incl. process start | p50 {} · p95 {} · max {} (30 runs; cold build {}) |", ms(percentile(&mut samples, 0.5)), ms(percentile(&mut samples, 0.95)), ms(percentile(&mut samples, 1.0)), ms(cold));
    Ok(())
}

/// Many small files and a few large ones, about `mib` MiB in all.
fn make_tree(root: &Path, mib: u64) -> Result<(u64, usize)> {
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let total = mib << 20;
    let large = total / 2;
    let mut written = 0u64;
    let mut files = 0usize;
    let chunk: Vec<u8> = (0..(1 << 20))
        .map(|i| (i as u64).wrapping_mul(2654435761) as u8)
        .collect();
    // A few large files: half the bytes.
    for i in 0..4 {
        let p = root.join(format!("large/blob{i}.bin"));
        fs::create_dir_all(p.parent().unwrap())?;
        let mut f = fs::File::create(&p)?;
        let size = large / 4;
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            std::io::Write::write_all(&mut f, &chunk[..n])?;
            std::io::Write::write_all(&mut f, &next().to_le_bytes())?;
            left = left.saturating_sub(n as u64 + 8);
        }
        written += size;
        files += 1;
    }
    // Many small files (1–64 KiB) in nested directories: the other half.
    while written < total {
        let size = 1024 + (next() % (63 * 1024)) as usize;
        let p = root.join(format!("small/d{}/e{}/f{files}.dat", files % 64, files % 7));
        if files.is_multiple_of(64) || !p.parent().unwrap().exists() {
            fs::create_dir_all(p.parent().unwrap())?;
        }
        let mut data = chunk[..size].to_vec();
        data[..8].copy_from_slice(&next().to_le_bytes());
        fs::write(&p, &data)?;
        written += size as u64;
        files += 1;
    }
    Ok((written, files))
}

fn all_files(root: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(root)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            all_files(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

fn seal(o: &Opts) -> Result<()> {
    let dir = tempfile::tempdir_in(
        std::env::var("KILN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )?;
    let (bytes, files) = make_tree(dir.path(), o.tree_mib)?;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    // Warm the page cache once, so every method reads from memory alike.
    let _ = kiln_image::seal::seal_tree(dir.path())?;
    let t = Instant::now();
    let sealed = kiln_image::seal::seal_tree(dir.path())?;
    let seal_t = t.elapsed();
    let t = Instant::now();
    let diffs = kiln_image::seal::verify_tree(dir.path(), &sealed)?;
    let verify_t = t.elapsed();
    anyhow::ensure!(diffs.is_empty());
    let mut list = Vec::new();
    all_files(dir.path(), &mut list)?;
    list.sort();
    let single = |f: &dyn Fn(&[u8]) -> Vec<u8>| -> Result<Duration> {
        let t = Instant::now();
        let mut buf = Vec::new();
        for p in &list {
            buf.clear();
            fs::File::open(p)?.read_to_end(&mut buf)?;
            std::hint::black_box(f(&buf));
        }
        Ok(t.elapsed())
    };
    let sha_t = single(&|b| {
        use sha2::Digest;
        sha2::Sha256::digest(b).to_vec()
    })?;
    let b3_t = single(&|b| blake3::hash(b).as_bytes().to_vec())?;
    let rate = |d: Duration| {
        format!(
            "{:.2} GiB/s ({:.2} s)",
            gib / d.as_secs_f64(),
            d.as_secs_f64()
        )
    };
    println!("| seal of {:.2} GiB tree ({files} files: 4 large, rest 1–64 KiB), parallel walk + BLAKE3 | {} |", gib, rate(seal_t));
    println!(
        "| verify of the same tree against its seal | {} |",
        rate(verify_t)
    );
    println!(
        "| single-threaded sha256sum-style over the same files | {} |",
        rate(sha_t)
    );
    println!(
        "| single-threaded b3sum-style (BLAKE3, one thread) over the same files | {} |",
        rate(b3_t)
    );
    Ok(())
}

fn scratch(o: &Opts) -> Result<()> {
    let mut samples = Vec::new();
    for _ in 0..10 {
        let dir = tempfile::tempdir()?;
        fs::create_dir_all(dir.path().join("images/tiny/files"))?;
        fs::copy("/bin/busybox", dir.path().join("images/tiny/files/busybox"))?;
        fs::write(dir.path().join("kiln.toml"), "[project]\nname = \"b\"\n[images.tiny]\nfrom = \"scratch\"\nentrypoint = [\"/busybox\"]\n")?;
        samples.push(kiln(o, dir.path(), &["image", "build", "tiny"])?);
    }
    let mut with_test = Vec::new();
    for _ in 0..10 {
        let dir = tempfile::tempdir()?;
        fs::create_dir_all(dir.path().join("images/tiny/files"))?;
        fs::copy("/bin/busybox", dir.path().join("images/tiny/files/busybox"))?;
        fs::write(dir.path().join("kiln.toml"), "[project]\nname = \"b\"\n[images.tiny]\nfrom = \"scratch\"\nentrypoint = [\"/busybox\"]\ntest = [[\"/busybox\", \"true\"]]\n")?;
        with_test.push(kiln(o, dir.path(), &["image", "build", "tiny"])?);
    }
    println!("| bake `scratch` + one static binary (busybox, 2 MiB), fresh store, wall | p50 {} · max {} (10 runs) |", ms(percentile(&mut samples, 0.5)), ms(percentile(&mut samples, 1.0)));
    println!(
        "| the same with one image test in a read-only sandbox | p50 {} · max {} (10 runs) |",
        ms(percentile(&mut with_test, 0.5)),
        ms(percentile(&mut with_test, 1.0))
    );
    Ok(())
}

fn debootstrap(o: &Opts) -> Result<()> {
    let dir = tempfile::tempdir()?;
    fs::write(
        dir.path().join("kiln.toml"),
        "[project]\nname = \"d\"\n[images.base]\nfrom = { debootstrap = \"bookworm\" }\n",
    )?;
    fs::create_dir_all(dir.path().join("images/base/files/etc"))?;
    let cold = kiln(o, dir.path(), &["image", "build", "base"])?;
    let mut warm = Vec::new();
    for i in 0..3 {
        fs::write(
            dir.path().join("images/base/files/etc/motd"),
            format!("rev {i}\n"),
        )?;
        warm.push(kiln(o, dir.path(), &["image", "build", "base"])?);
    }
    println!(
        "| bake from `debootstrap` bookworm minbase, cold (debootstrap runs) | {} |",
        ms(cold)
    );
    println!("| bake from `debootstrap` bookworm, base cache warm (one file changed) | p50 {} (3 runs) |", ms(percentile(&mut warm, 0.5)));
    Ok(())
}

/// A scratch image holding only static busybox, serving /www with httpd.
fn static_web_project(dir: &Path, roles: &[(&str, u32)], subnet: &str) -> Result<()> {
    let files = dir.join("images/web/files");
    fs::create_dir_all(files.join("www"))?;
    fs::copy("/bin/busybox", files.join("busybox")).context("needs busybox-static")?;
    fs::write(files.join("www/healthz"), "ok\n")?;
    let mut toml = String::from(
        "[project]\nname = \"bench\"\n[images.web]\nfrom = \"scratch\"\nentrypoint = [\"/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nports = [8080]\nhealth = { http = \"/healthz\", port = 8080 }\n",
    );
    toml.push_str(&format!("[env.bench]\nsubnet = \"{subnet}\"\n"));
    for (role, n) in roles {
        toml.push_str(&format!("[env.bench.roles.{role}]\nimage = \"web\"\nservers = {n}\nsize = {{ cpus = 0.2, memory = \"32M\" }}\n"));
    }
    fs::write(dir.join("kiln.toml"), toml)?;
    Ok(())
}

/// Launch call to first passing HTTP health check, through the local
/// provider (network namespace, veth, libcontainer, busybox httpd).
fn server_start(o: &Opts) -> Result<()> {
    use kiln_provider::Provider;
    let dir = tempfile::tempdir()?;
    static_web_project(dir.path(), &[("web", 1)], "10.77.90.0/24")?;
    kiln(o, dir.path(), &["image", "build", "web"])?;
    let store = kiln_image::Store::open(dir.path().join(".kiln"))?;
    let rec = store.current_record("web")?;
    let local = kiln_provider_local::Local::new(&store);
    let mut samples = Vec::new();
    let argv = ["/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"];
    for i in 0..50 {
        let req = request(
            &format!("web-b{i:03}"),
            "10.77.90.2",
            "10.77.90.0/24",
            &rec,
            &argv,
        );
        let t = Instant::now();
        local.create(&req)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let health: std::net::SocketAddr = format!("{}:8080", req.address).parse()?;
        while !kiln_provider::check::http(health, "/healthz") {
            anyhow::ensure!(Instant::now() < deadline, "server never became healthy");
            std::thread::sleep(Duration::from_micros(500));
        }
        samples.push(t.elapsed());
        local.destroy("bench", &req.id)?;
    }
    local.teardown("bench")?;
    println!(
        "| server start, launch call → first passing HTTP health check (scratch + static busybox httpd, own netns + veth) | p50 {} · p95 {} · max {} (50 starts) |",
        ms(percentile(&mut samples, 0.5)),
        ms(percentile(&mut samples, 0.95)),
        ms(percentile(&mut samples, 1.0))
    );
    Ok(())
}

/// A request for a server of role `web` in environment `bench`.
fn request(
    id: &str,
    address: &str,
    subnet: &str,
    rec: &kiln_image::store::VersionRecord,
    argv: &[&str],
) -> kiln_provider::ServerRequest {
    kiln_provider::ServerRequest {
        env: "bench".into(),
        id: id.into(),
        role: "web".into(),
        release: 1,
        slot: 0,
        address: address.into(),
        node: None,
        published: Default::default(),
        subnet: subnet.parse().expect("a valid subnet"),
        image: image_ref(rec),
        spec_hash: String::new(),
        launch: kiln_model::Launch {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec!["PATH=/".into()],
            workdir: "/".into(),
            user: None,
            secrets: Default::default(),
        },
        size: kiln_model::Size {
            cpus: 0.5,
            memory_bytes: 64 << 20,
        },
        ports: vec![8080],
        volumes: vec![],
        reach: vec![],
        capabilities: kiln_model::Capability::docker_default(),
        secrets: vec![],
    }
}

fn image_ref(rec: &kiln_image::store::VersionRecord) -> kiln_model::ImageRef {
    kiln_model::ImageRef {
        name: rec.name.clone(),
        version: rec.version,
        digest: rec.digest.0.clone(),
    }
}

/// The planner and the state on 10,000 servers.
fn plan_10k() -> Result<()> {
    use kiln_model::{Server, ServerStatus};
    let dir = tempfile::tempdir()?;
    let text = "[project]\nname = \"p\"\n[images.app]\nfrom = \"scratch\"\n[env.big]\nsubnet = \"10.0.0.0/16\"\n[env.big.roles.app]\nimage = \"app\"\nservers = 10000\n";
    let project = kiln_spec::parse(text, Path::new("kiln.toml"), dir.path())?;
    let env = &project.envs["big"];
    let role = &env.roles["app"];
    let hash = kiln_planner::spec_hash(role);
    let state = kiln_state::State::open(&dir.path().join("state.db"))?;
    let t = Instant::now();
    for i in 0..10_000u32 {
        let a = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 2)) + i);
        state.put_server(&Server {
            id: format!("app-{i:04x}"),
            env: "big".into(),
            role: "app".into(),
            slot: i,
            image: "app@1".into(),
            image_digest: "sha256:1".into(),
            spec_hash: hash.clone(),
            address: a.to_string(),
            created: 0,
            status: ServerStatus::Running,
            pid: Some(1),
            release: 1,
            standby_until: None,
            node: None,
            published: Default::default(),
        })?;
    }
    let insert = t.elapsed();
    let mut load = Vec::new();
    let mut plan = Vec::new();
    let mut changes = 0;
    for _ in 0..10 {
        let t = Instant::now();
        let observed = state.servers(Some("big"))?;
        // What `Engine::taken_ids` adds: every id in the state.
        let taken: std::collections::BTreeSet<String> = state.server_ids()?.into_iter().collect();
        load.push(t.elapsed());
        let targets = vec![kiln_model::RoleTarget {
            role: "app".into(),
            image: kiln_model::ImageRef {
                name: "app".into(),
                version: 2,
                digest: "sha256:2".into(),
            },
            spec_hash: hash.clone(),
            servers: 10_000,
            cold: false,
            launch: Default::default(),
            spec: role.clone(),
        }];
        let dead = Default::default();
        let input = kiln_planner::Input {
            env,
            targets: &targets,
            observed: &observed,
            dead: &dead,
            generation: 0,
            now: 0,
            kind: kiln_model::PlanKind::Apply,
            force: &Default::default(),
            taken: &taken,
            strays: &[],
            nodes: &[],
        };
        let mut n = 0u16;
        let t = Instant::now();
        let p = kiln_planner::plan(&input, &mut || {
            n = n.wrapping_add(1);
            n
        })?;
        plan.push(t.elapsed());
        changes = p.changes.len();
    }
    println!("| plan of 10,000 servers (all replaced: {changes} changes): state load from SQLite (servers of the env + every id) + pure planner | load p50 {} + plan p50 {} (10 runs; inserting the rows took {}) |", ms(percentile(&mut load, 0.5)), ms(percentile(&mut plan, 0.5)), ms(insert));
    Ok(())
}

/// `kiln destroy` then `kiln apply` of 3 roles × 10 servers, wall.
fn rebuild(o: &Opts) -> Result<()> {
    let dir = tempfile::tempdir()?;
    static_web_project(
        dir.path(),
        &[("web", 10), ("api", 10), ("worker", 10)],
        "10.77.91.0/24",
    )?;
    kiln(o, dir.path(), &["image", "build", "web"])?;
    let first = kiln(o, dir.path(), &["apply", "bench", "--yes"])?;
    let destroy = kiln(o, dir.path(), &["destroy", "bench", "--yes"])?;
    let apply = kiln(o, dir.path(), &["apply", "bench", "--yes"])?;
    let cold = kiln(o, dir.path(), &["deploy", "--cold", "bench", "--yes"])?;
    kiln(o, dir.path(), &["destroy", "bench", "--yes"])?;
    println!(
        "| rebuild from nothing, 3 roles × 10 servers: `kiln destroy` + `kiln apply` wall | {} ({} + {}; first apply {}; `deploy --cold` {}) |",
        ms(destroy + apply),
        ms(destroy),
        ms(apply),
        ms(first),
        ms(cold)
    );
    Ok(())
}

/// Closed-loop HTTP/1.0 load from `clients` threads; latencies by phase.
struct LoadGen {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    phase: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    handles: Vec<std::thread::JoinHandle<(Vec<Vec<Duration>>, u64)>>,
    started: Instant,
}

fn http_get(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf).is_ok()
        && buf.starts_with(b"HTTP/1.")
        && buf.windows(5).any(|w| w == b" 200 ")
}

/// The body of `GET /` at `addr`.
fn http_body(addr: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

impl LoadGen {
    fn start(addr: &str, clients: usize) -> LoadGen {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let phase = std::sync::Arc::new(AtomicUsize::new(0));
        let handles = (0..clients)
            .map(|_| {
                let (stop, phase, addr) = (stop.clone(), phase.clone(), addr.to_string());
                std::thread::spawn(move || {
                    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); 3];
                    let mut failed = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        if http_get(&addr) {
                            lat[phase.load(Ordering::Relaxed)].push(t.elapsed());
                        } else {
                            failed += 1;
                        }
                    }
                    (lat, failed)
                })
            })
            .collect();
        LoadGen {
            stop,
            phase,
            handles,
            started: Instant::now(),
        }
    }
    fn next_phase(&self) {
        self.phase.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn finish(self) -> (Vec<Vec<Duration>>, u64, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let took = self.started.elapsed();
        let mut lat = vec![Vec::new(); 3];
        let mut failed = 0;
        for h in self.handles {
            let (l, f) = h.join().expect("load thread");
            for (i, v) in l.into_iter().enumerate() {
                lat[i].extend(v);
            }
            failed += f;
        }
        (lat, failed, took)
    }
}

fn lat_summary(v: &mut [Duration]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    format!(
        "p50 {} · p99 {}",
        ms(percentile(v, 0.5)),
        ms(percentile(v, 0.99))
    )
}

/// Requests per second and latency of `secs` of load at `addr`.
fn measure(addr: &str, clients: usize, secs: u64) -> (f64, String, u64) {
    let load = LoadGen::start(addr, clients);
    std::thread::sleep(Duration::from_secs(secs));
    let (mut lat, failed, took) = load.finish();
    let n = lat[0].len();
    (
        n as f64 / took.as_secs_f64(),
        lat_summary(&mut lat[0]),
        failed,
    )
}

/// Blue-green rollout of 10 servers under load, switch latency, balancer overhead.
/// The blue-green rollout, rollback and balancer figures, with the role's
/// balancer in `mode` (`tcp`, or `http` for `--only rollout-http`).
fn rollout(o: &Opts, mode: &str) -> Result<()> {
    println!("balancer mode: {mode}");
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    static_web_project(dir.path(), &[("web", 10)], "10.77.92.0/24")?;
    let toml = fs::read_to_string(dir.path().join("kiln.toml"))?;
    fs::write(dir.path().join("kiln.toml"), format!("{toml}ports = [8080]\nstrategy = {{ kind = \"blue_green\", rollback_window = \"1m\" }}\nbalancer = {{ listen = \"127.0.0.1:{port}\", port = 8080, mode = \"{mode}\" }}\n"))?;
    fs::write(dir.path().join("images/web/files/www/index.html"), "v1\n")?;
    kiln(o, dir.path(), &["image", "build", "web"])?;
    kiln(o, dir.path(), &["apply", "bench", "--yes"])?;
    let front = format!("127.0.0.1:{port}");
    let clients = 8;

    // Overhead: the same load straight at one server, then through the balancer.
    let store = kiln_image::Store::open(dir.path().join(".kiln"))?;
    let state = kiln_state::State::open(&store.root().join("state.db"))?;
    let one = format!("{}:8080", state.servers(Some("bench"))?[0].address);
    let (direct_rps, direct_lat, _) = measure(&one, clients, 3);
    let bdir = store.root().join("balancers/bench-web");
    let wanted = kiln_balancer::read_backends(&bdir).context("balancer backends")?;
    let (all, check) = (wanted.backends, wanted.check);
    let g = kiln_balancer::set_backends(&bdir, std::slice::from_ref(&one), check.as_ref())?;
    kiln_balancer::wait_generation(&bdir, g, Duration::from_secs(5))?;
    let (one_rps, one_lat, _) = measure(&front, clients, 3);
    let g = kiln_balancer::set_backends(&bdir, &all, check.as_ref())?;
    kiln_balancer::wait_generation(&bdir, g, Duration::from_secs(5))?;
    let (lb_rps, lb_lat, _) = measure(&front, clients, 3);
    println!("| balancer overhead, {clients} closed-loop clients, HTTP/1.0 (a connection per request); each server capped at 0.2 CPU | straight to one server: {direct_rps:.0} req/s, {direct_lat} · balancer → that one server: {one_rps:.0} req/s, {one_lat} · balancer → 10 servers: {lb_rps:.0} req/s, {lb_lat} |");

    // Blue-green rollout of all 10 servers under that load.
    fs::write(dir.path().join("images/web/files/www/index.html"), "v2\n")?;
    kiln(o, dir.path(), &["image", "build", "web"])?;
    let load = LoadGen::start(&front, clients);
    std::thread::sleep(Duration::from_secs(2));
    load.next_phase();
    let t = Instant::now();
    kiln(o, dir.path(), &["apply", "bench", "--yes"])?;
    let rollout = t.elapsed();
    load.next_phase();
    std::thread::sleep(Duration::from_secs(2));
    let (mut lat, failed, took) = load.finish();
    let total: usize = lat.iter().map(|v| v.len()).sum();
    println!(
        "| blue-green rollout of 10 servers under load ({clients} clients, {:.0} req/s overall, {total} requests) | {failed} failed · rollout {} · before {} · during {} · after {} |",
        total as f64 / took.as_secs_f64(),
        ms(rollout),
        lat_summary(&mut lat[0]),
        lat_summary(&mut lat[1]),
        lat_summary(&mut lat[2])
    );

    // Switch latency: from writing the new backend set to the balancer
    // serving it (after which every new connection goes to the new set).
    let bdir = store.root().join("balancers/bench-web");
    let wanted = kiln_balancer::read_backends(&bdir).context("balancer backends")?;
    let (current, check) = (wanted.backends, wanted.check);
    let mut samples = Vec::new();
    for i in 0..20 {
        let set: Vec<String> = if i % 2 == 0 {
            current[..5].to_vec()
        } else {
            current.clone()
        };
        let t = Instant::now();
        let g = kiln_balancer::set_backends(&bdir, &set, check.as_ref())?;
        kiln_balancer::wait_generation(&bdir, g, Duration::from_secs(5))?;
        samples.push(t.elapsed());
    }
    println!("| switch decision → balancer serving the new set (all new connections on it) | p50 {} · max {} (20 switches) |", ms(percentile(&mut samples, 0.5)), ms(percentile(&mut samples, 1.0)));

    // Rollback within the blue-green window: a switch back to the ten
    // still-warm v1 servers, under the same load; no server is created.
    let load = LoadGen::start(&front, clients);
    std::thread::sleep(Duration::from_secs(1));
    load.next_phase();
    let t = Instant::now();
    // When the front first answers with v1: the switch as clients see it.
    let watcher = {
        let front = front.clone();
        std::thread::spawn(move || loop {
            if http_body(&front).is_ok_and(|b| b == "v1\n") {
                return t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Duration::MAX;
            }
        })
    };
    kiln(o, dir.path(), &["rollback", "bench", "--yes"])?;
    let back = t.elapsed();
    let switched = watcher.join().expect("watcher");
    load.next_phase();
    std::thread::sleep(Duration::from_secs(1));
    let (_, failed, _) = load.finish();
    let body = http_body(&front)?;
    println!(
        "| `kiln rollback` within the blue-green window under load (10 warm servers) | clients see v1 after {} (process start included) · command done after {} (the v2 set drained and destroyed after the switch) · {failed} failed · serving {:?} after |",
        ms(switched),
        ms(back),
        body.trim()
    );
    kiln(o, dir.path(), &["destroy", "bench", "--yes"])?;
    Ok(())
}

/// Drift scan of 50 servers over 5 image versions totalling about 1 GiB.
fn drift(o: &Opts) -> Result<()> {
    let dir = tempfile::tempdir_in(
        std::env::var("KILN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )?;
    let mut toml = String::from("[project]\nname = \"d\"\n");
    for i in 0..5 {
        let files = dir.path().join(format!("images/v{i}/files"));
        fs::create_dir_all(files.join("www"))?;
        fs::copy("/bin/busybox", files.join("busybox"))?;
        fs::write(files.join("www/healthz"), "ok\n")?;
        make_tree(&files.join("data"), 200)?;
        toml.push_str(&format!("[images.v{i}]\nfrom = \"scratch\"\nentrypoint = [\"/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nhealth = {{ http = \"/healthz\", port = 8080 }}\n"));
    }
    toml.push_str("[env.bench]\nsubnet = \"10.77.98.0/24\"\n");
    for i in 0..5 {
        toml.push_str(&format!("[env.bench.roles.r{i}]\nimage = \"v{i}\"\nservers = 10\nsize = {{ cpus = 0.2, memory = \"32M\" }}\n"));
    }
    fs::write(dir.path().join("kiln.toml"), toml)?;
    kiln(o, dir.path(), &["image", "build", "--all"])?;
    kiln(o, dir.path(), &["apply", "bench", "--yes"])?;
    let store = kiln_image::Store::open(dir.path().join(".kiln"))?;
    let mut bytes = 0u64;
    for i in 0..5 {
        bytes += store.current_record(&format!("v{i}"))?.size;
    }
    let gib = bytes as f64 / (1u64 << 30) as f64;
    // Cold: no stat cache and, when allowed, no page cache either.
    let dropped = fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let cold = kiln_drift(o, dir.path(), &["drift", "bench", "--full"])?;
    let full_warm_cache = kiln_drift(o, dir.path(), &["drift", "bench", "--full"])?;
    let mut warm: Vec<Duration> = (0..5)
        .map(|_| kiln_drift(o, dir.path(), &["drift", "bench"]))
        .collect::<Result<_>>()?;
    println!(
        "| drift scan, 50 servers over 5 image versions ({gib:.2} GiB), cold{} `--full` | {} ({:.2} GiB/s); `--full` with the page cache warm {} ({:.2} GiB/s) |",
        if dropped { " (page cache dropped)" } else { "" },
        ms(cold),
        gib / cold.as_secs_f64(),
        ms(full_warm_cache),
        gib / full_warm_cache.as_secs_f64()
    );
    println!(
        "| drift scan, same fleet, warm (per-file stat cache) | p50 {} (5 runs) |",
        ms(percentile(&mut warm, 0.5))
    );
    if std::env::var_os("KILN_BENCH_KEEP").is_some() {
        // For profiling: the fleet stays up; destroy it with `kiln -C DIR destroy bench --yes`.
        println!("kept the fleet in {}", dir.keep().display());
        return Ok(());
    }
    kiln(o, dir.path(), &["destroy", "bench", "--yes"])?;
    Ok(())
}

/// Runs `kiln drift`, which exits 0 (clean) or 2 (drift): both are fine here.
fn kiln_drift(o: &Opts, dir: &Path, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let out = Command::new(&o.kiln)
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()?;
    anyhow::ensure!(
        matches!(out.status.code(), Some(0 | 2)),
        "kiln drift failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(t.elapsed())
}

fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) else {
        return Duration::ZERO;
    };
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

/// CPU time of one reconcile pass (dry run) with 1,000 servers in the
/// state, on the in-memory provider: the engine's own cost, no containers.
fn reconcile_cpu(o: &Opts) -> Result<()> {
    use kiln_model::{Server, ServerStatus};
    use kiln_provider::Provider;
    let dir = tempfile::tempdir()?;
    fs::create_dir_all(dir.path().join("images/app/files"))?;
    fs::write(dir.path().join("images/app/files/app"), "x")?;
    fs::write(dir.path().join("kiln.toml"), "[project]\nname = \"r\"\n[images.app]\nfrom = \"scratch\"\n[env.big]\nsubnet = \"10.0.0.0/16\"\nttl = \"28d\"\n[env.big.roles.app]\nimage = \"app\"\nservers = 1000\nhealth = { tcp = 8080 }\n")?;
    kiln(o, dir.path(), &["image", "build", "app"])?;
    let project = kiln_spec::load(dir.path())?;
    let store = kiln_image::Store::open(dir.path().join(".kiln"))?;
    let rec = store.current_record("app")?;
    let state = kiln_state::State::open(&store.root().join("state.db"))?;
    let fake = kiln_provider::fake::Fake::default();
    let hash = kiln_planner::spec_hash(&project.envs["big"].roles["app"]);
    for i in 0..1000u32 {
        let a = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 2)) + i)
            .to_string();
        let s = Server {
            id: format!("app-{i:04x}"),
            env: "big".into(),
            role: "app".into(),
            slot: i,
            image: "app@1".into(),
            image_digest: rec.digest.0.clone(),
            spec_hash: hash.clone(),
            address: a.clone(),
            created: 0,
            status: ServerStatus::Running,
            pid: Some(1),
            release: 1,
            standby_until: None,
            node: None,
            published: Default::default(),
        };
        state.put_server(&s)?;
        let mut req = request(&s.id, &a, "10.0.0.0/16", &rec, &[]);
        req.env = "big".into();
        req.role = "app".into();
        fake.create(&req)?;
    }
    let engine = kiln_engine::Engine {
        project: &project,
        store: &store,
        state: &state,
        provider: &fake,
        progress: &|_| {},
        clock: &|| 1_000,
        options: Default::default(),
    };
    let mut samples = Vec::new();
    let mut n = 0u16;
    for _ in 0..10 {
        let t = cpu_time();
        let pass = engine.reconcile("big", true, &mut || {
            n = n.wrapping_add(1);
            n
        })?;
        samples.push(cpu_time() - t);
        anyhow::ensure!(pass.plan.is_empty(), "a healthy fleet needs nothing");
    }
    println!("| reconcile pass (drift + plan, dry run), 1,000 servers in state, in-memory provider, CPU time | p50 {} · max {} (10 passes) — goal < 50 ms |", ms(percentile(&mut samples, 0.5)), ms(percentile(&mut samples, 1.0)));
    Ok(())
}

/// `--only dns-withdrawal`: during a rolling rollout of 4 servers (no
/// balancer: clients find them by name only), the time from each old
/// server's withdrawal from the environment's DNS answers to its stop, as
/// seen from outside: one thread asks the DNS server for the role's name
/// every 5 ms, another connects to every old server's port every 5 ms.
/// The engine promises at least the TTL (1 s here) between the two.
fn dns_withdrawal(o: &Opts) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir()?;
    static_web_project(dir.path(), &[("web", 4)], "10.77.97.0/24")?;
    let toml = fs::read_to_string(dir.path().join("kiln.toml"))?
        .replace("[env.bench]\n", "[env.bench]\ndns = { ttl = \"1s\" }\n");
    fs::write(dir.path().join("kiln.toml"), toml)?;
    fs::write(dir.path().join("images/web/files/www/index.html"), "v1\n")?;
    kiln(o, dir.path(), &["image", "build", "web"])?;
    kiln(o, dir.path(), &["apply", "bench", "--yes"])?;
    let store = kiln_image::Store::open(dir.path().join(".kiln"))?;
    let state = kiln_state::State::open(&store.root().join("state.db"))?;
    let old: Vec<String> = state
        .servers(Some("bench"))?
        .iter()
        .map(|s| s.address.clone())
        .collect();
    let dns: std::net::SocketAddr = "10.77.97.1:53".parse()?;

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // Per old address: the last time an answer named it, the first time
    // its port refused.
    let seen = Arc::new(Mutex::new(vec![None::<Duration>; old.len()]));
    let gone = Arc::new(Mutex::new(vec![None::<Duration>; old.len()]));
    let asker = {
        let (stop, seen, old) = (stop.clone(), seen.clone(), old.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(a) = kiln_dns::client::query(dns, "web", Duration::from_millis(500)) {
                    let now = start.elapsed();
                    let mut seen = seen.lock().unwrap();
                    for (i, addr) in old.iter().enumerate() {
                        if a.addresses.iter().any(|x| x.to_string() == *addr) {
                            seen[i] = Some(now);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let prober = {
        let (stop, gone, old) = (stop.clone(), gone.clone(), old.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (i, addr) in old.iter().enumerate() {
                    if gone.lock().unwrap()[i].is_some() {
                        continue;
                    }
                    let Ok(sa) = format!("{addr}:8080").parse::<std::net::SocketAddr>() else {
                        continue;
                    };
                    if std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(200))
                        .is_err()
                    {
                        gone.lock().unwrap()[i] = Some(start.elapsed());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    fs::write(dir.path().join("images/web/files/www/index.html"), "v2\n")?;
    kiln(o, dir.path(), &["image", "build", "web"])?;
    let rollout = kiln(o, dir.path(), &["apply", "bench", "--yes"])?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let _ = asker.join();
    let _ = prober.join();
    let (seen, gone) = (seen.lock().unwrap().clone(), gone.lock().unwrap().clone());
    let mut gaps: Vec<Duration> = seen
        .iter()
        .zip(&gone)
        .filter_map(|(s, g)| Some(g.as_ref()?.saturating_sub(*s.as_ref()?)))
        .collect();
    kiln(o, dir.path(), &["destroy", "bench", "--yes"])?;
    anyhow::ensure!(
        gaps.len() == old.len(),
        "every old server should have been seen in DNS and then stopped: {seen:?} {gone:?}"
    );
    let min = *gaps.iter().min().context("no servers")?;
    println!(
        "| DNS withdrawal → stop during a rolling rollout of {} servers (TTL 1 s, no balancer; DNS polled every 5 ms, ports every 5 ms) | p50 {} · min {} · max {} (rollout {}) |",
        old.len(),
        ms(percentile(&mut gaps, 0.5)),
        ms(min),
        ms(percentile(&mut gaps, 1.0)),
        ms(rollout)
    );
    Ok(())
}
