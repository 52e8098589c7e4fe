//! Swarm figures on a real two-node swarm (kiln-testcluster): cluster start
//! and teardown, a push by digest, one server from create to running to
//! answering HTTP, and Swarm's own rolling update of a 10-replica service
//! (`docker service update --update-order start-first --update-parallelism
//! 1`, through the API) for the side-by-side with kiln's rollout. Both
//! run under the same steady load through the same kind of front (kiln's
//! balancer in HTTP mode): kiln's is the role's own balancer on the swarm,
//! Swarm's follows its tasks from the API (see [`NativeFront`]).

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bollard::models::{
    ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, ServiceSpecUpdateConfig,
    ServiceSpecUpdateConfigFailureActionEnum, ServiceSpecUpdateConfigOrderEnum, TaskSpec,
    TaskSpecContainerSpec, TaskState,
};
use kiln_provider_swarm::{
    Cluster, Endpoint, PortMap, Registry, RegistryOptions, Restart, ServerSpec,
};
use kiln_testcluster::{Cluster as TestCluster, Options};

pub fn run(kiln: &Path) -> Result<()> {
    let t = Instant::now();
    let tc = TestCluster::start(Options::default()).context("start the test cluster")?;
    let start = t.elapsed();
    let p = tc.timings();
    println!(
        "| test cluster start: registry + 2 dockerd in netns + swarm init/join | {:.2} s (network {:.0} ms, registry {:.0} ms, daemons {:.0} ms, swarm {:.0} ms) |",
        start.as_secs_f64(),
        p.network.as_secs_f64() * 1e3,
        p.registry.as_secs_f64() * 1e3,
        p.daemons.as_secs_f64() * 1e3,
        p.swarm.as_secs_f64() * 1e3
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(measure(&tc, kiln));
    let t = tc.teardown();
    println!(
        "| test cluster teardown (daemons stopped, netns/links/cgroups gone, firewall checked) | {:.2} s{} |",
        t.elapsed.as_secs_f64(),
        if t.leftovers.is_empty() { String::new() } else { format!(" LEFT {:?}", t.leftovers) }
    );
    result
}

async fn measure(tc: &TestCluster, kiln: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (v1, v2) = bake_two_versions(kiln, dir.path())?;
    let store = kiln_image::Store::open(dir.path().join(".kiln"))?;
    let reg = Registry::new(
        &format!("{}/bench/web", tc.registry()),
        RegistryOptions {
            insecure: true,
            ..Default::default()
        },
    )?;
    let size: u64 = store
        .version("web", v1.0)?
        .layers
        .iter()
        .map(|l| l.size)
        .sum();
    let first = reg.push(&store, &v1.1).await?;
    let again = reg.push(&store, &v1.1).await?;
    let second = reg.push(&store, &v2.1).await?;
    println!(
        "| push by digest, static busybox image ({:.1} MiB layer): new / already there / next version | {:.0} ms / {:.0} ms / {:.0} ms |",
        size as f64 / (1 << 20) as f64,
        first.elapsed.as_secs_f64() * 1e3,
        again.elapsed.as_secs_f64() * 1e3,
        second.elapsed.as_secs_f64() * 1e3
    );

    let c = Cluster::connect(&Endpoint::new(tc.manager_endpoint())).await?;
    let nodes = c.nodes().await?;
    let (mut running, mut http) = (Vec::new(), Vec::new());
    for i in 0..6 {
        let node = &nodes[i % nodes.len()];
        let s = server(
            &format!("web-{i}"),
            &first.reference,
            32000 + i as u16,
            &node.id,
        );
        let t = Instant::now();
        c.create_server(&s).await?;
        let up = c
            .wait_running("bench", &s.server, Duration::from_secs(60))
            .await?;
        running.push(t.elapsed());
        let addr = up.address(8080).context("address")?;
        loop {
            if http_ok(&addr) {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{addr} never answered");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        http.push(t.elapsed());
        c.remove_server("bench", &s.server, Duration::from_secs(60))
            .await?;
    }
    running.sort();
    http.sort();
    println!(
        "| swarm server: create service → task running → HTTP 200 from the host (6 runs, both nodes) | running p50 {:.0} ms · HTTP p50 {:.0} ms (max {:.0} ms) |",
        running[running.len() / 2].as_secs_f64() * 1e3,
        http[http.len() / 2].as_secs_f64() * 1e3,
        http[http.len() - 1].as_secs_f64() * 1e3
    );

    let n = native_update(&c, kiln, &first.reference, &second.reference).await?;
    println!(
        "| Swarm's own rolling update of a 10-replica service (start-first, parallelism 1, CLI defaults: delay 0, monitor 5 s) under steady load through a front following its tasks | {:.1} s, {} requests, {} failed |",
        n.wall.as_secs_f64(),
        n.ok + n.failed,
        n.failed
    );
    // The same image, the same nodes, in the same run: kiln's own rollout.
    let k = tokio::task::block_in_place(|| kiln_rollout(tc, kiln))?;
    println!(
        "| kiln apply of 10 servers on the swarm from nothing (push, 10 services placed over 2 nodes, health-gated, balancer) | {:.1} s |",
        k.apply.as_secs_f64()
    );
    println!(
        "| kiln's rolling replacement of the 10 servers (env change; create-first, one at a time, health gate, switch, drain) under steady load through its balancer | {:.1} s, {} requests, {} failed |",
        k.rollout.as_secs_f64(),
        k.ok + k.failed,
        k.failed
    );
    println!(
        "| kiln apply of 20 servers on the swarm from nothing (same image already in the registry; 20 services over 2 nodes, health-gated, balancer) | {:.1} s |",
        k.apply20.as_secs_f64()
    );
    Ok(())
}

struct KilnRollout {
    apply: Duration,
    apply20: Duration,
    rollout: Duration,
    ok: u64,
    failed: u64,
}

/// `kiln apply` of 10 `web` servers on the swarm, then a rolling
/// replacement (the role's environment changes) under 2 clients of steady
/// load through the balancer, then `kiln destroy`; then an apply of 20
/// servers from nothing, and `kiln destroy`.
fn kiln_rollout(tc: &TestCluster, kiln: &Path) -> Result<KilnRollout> {
    let dir = tempfile::tempdir()?;
    let files = dir.path().join("images/web/files");
    fs::create_dir_all(files.join("www"))?;
    fs::copy("/bin/busybox", files.join("busybox")).context("needs busybox-static")?;
    fs::write(files.join("www/index.html"), "v1\n")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let toml = |version: u32, servers: u32| {
        format!(
            "[project]\nname = \"benchk\"\n[images.web]\nfrom = \"scratch\"\nentrypoint = [\"/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nhealth = {{ http = \"/index.html\", port = 8080 }}\n[env.bench]\nprovider = {{ swarm = \"{}\", registry = \"http://{}/benchk\" }}\n[env.bench.roles.web]\nimage = \"web\"\nservers = {servers}\nports = [8080]\nenv = {{ VERSION = \"{version}\" }}\nbalancer = {{ listen = \"0.0.0.0:{port}\", port = 8080, drain_timeout = \"5s\" }}\n",
            tc.manager_endpoint(),
            tc.registry()
        )
    };
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new(kiln)
            .arg("-C")
            .arg(dir.path())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "kiln {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    fs::write(dir.path().join("kiln.toml"), toml(1, 10))?;
    run(&["image", "build", "web"])?;
    let t = Instant::now();
    let applied = run(&["apply", "bench", "--yes"]);
    let apply = t.elapsed();
    let result = applied.and_then(|_| {
        fs::write(dir.path().join("kiln.toml"), toml(2, 10))?;
        // Through the role's balancer on the first node (a swarm service).
        let load = SteadyLoad::start(format!("{}:{port}", tc.nodes()[0].ip), 2);
        let t = Instant::now();
        let rolled = run(&["apply", "bench", "--yes"]);
        let rollout = t.elapsed();
        let (ok, failed) = load.finish();
        rolled?;
        run(&["destroy", "bench", "--yes"])?;
        fs::write(dir.path().join("kiln.toml"), toml(2, 20))?;
        let t = Instant::now();
        run(&["apply", "bench", "--yes"])?;
        let apply20 = t.elapsed();
        Ok(KilnRollout {
            apply,
            apply20,
            rollout,
            ok,
            failed,
        })
    });
    let destroyed = run(&["destroy", "bench", "--yes", "--forget"]);
    let k = result?;
    destroyed?;
    Ok(k)
}

/// Two versions of `web` (the second changes one file).
fn bake_two_versions(
    kiln: &Path,
    dir: &Path,
) -> Result<((u32, kiln_image::Digest), (u32, kiln_image::Digest))> {
    let files = dir.join("images/web/files");
    fs::create_dir_all(files.join("www"))?;
    fs::copy("/bin/busybox", files.join("busybox")).context("needs busybox-static")?;
    fs::write(
        dir.join("kiln.toml"),
        "[project]\nname = \"bench\"\n[images.web]\nfrom = \"scratch\"\nentrypoint = [\"/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )?;
    let mut out = Vec::new();
    for v in ["v1\n", "v2\n"] {
        fs::write(files.join("www/index.html"), v)?;
        let st = std::process::Command::new(kiln)
            .arg("-C")
            .arg(dir)
            .args(["image", "build", "web"])
            .output()?;
        if !st.status.success() {
            bail!("kiln image build: {}", String::from_utf8_lossy(&st.stderr));
        }
        let store = kiln_image::Store::open(dir.join(".kiln"))?;
        let rec = store.current_record("web")?;
        out.push((rec.version, rec.digest));
    }
    let v2 = out.pop().context("v2")?;
    let v1 = out.pop().context("v1")?;
    Ok((v1, v2))
}

fn server(id: &str, image: &str, published: u16, node: &str) -> ServerSpec {
    ServerSpec {
        env: "bench".into(),
        role: "web".into(),
        release: 1,
        slot: 0,
        server: id.into(),
        image: image.into(),
        argv: vec![],
        env_vars: vec![],
        workdir: None,
        user: None,
        cpus: 0.2,
        memory_bytes: 32 << 20,
        reserve: false,
        cap_add: vec![],
        cap_drop: vec![],
        ports: vec![PortMap {
            target: 8080,
            published,
        }],
        constraints: vec![],
        node: Some(node.into()),
        volumes: vec![],
        tmpfs_bytes: 0,
        restart: Restart::Never,
        stop_grace: Duration::from_secs(2),
    }
}

fn http_ok(addr: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(sa) = addr.parse() else { return false };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if write!(s, "GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
}

/// What Swarm's own update measured: its wall time, and the requests of 2
/// steady clients through the front that follows its tasks.
struct Native {
    wall: Duration,
    ok: u64,
    failed: u64,
}

/// The front a Swarm user runs without the routing mesh (it needs IPVS):
/// kiln's balancer in HTTP mode (as a role's: same retries, same health
/// check) on this host, its backends the service's running tasks at
/// `NODE_IP:PORT` of each task's host-mode port, re-read from the API
/// every 100 ms, as Docker-aware proxies do.
struct NativeFront {
    port: u16,
    // Fields drop in order: the process stops before its directory goes.
    _process: crate::balancer::Running,
    _dir: tempfile::TempDir,
    follow: tokio::task::JoinHandle<()>,
}

impl Drop for NativeFront {
    fn drop(&mut self) {
        self.follow.abort();
    }
}

/// `NODE_IP:PORT` of every task of `service` that runs and is meant to.
async fn task_backends(d: &bollard::Docker, service: &str) -> Result<Vec<String>> {
    let nodes: HashMap<String, String> = d
        .list_nodes(None::<bollard::query_parameters::ListNodesOptions>)
        .await?
        .into_iter()
        .filter_map(|n| Some((n.id?, n.status?.addr?)))
        .collect();
    let tasks = d
        .list_tasks(Some(bollard::query_parameters::ListTasksOptions {
            filters: Some(HashMap::from([(
                "service".to_string(),
                vec![service.to_string()],
            )])),
        }))
        .await?;
    let mut out: Vec<String> = tasks
        .iter()
        .filter(|t| {
            t.desired_state == Some(TaskState::RUNNING)
                && t.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING)
        })
        .filter_map(|t| {
            let addr = nodes.get(t.node_id.as_ref()?)?;
            let port = t
                .status
                .as_ref()?
                .port_status
                .as_ref()?
                .ports
                .as_ref()?
                .first()?
                .published_port?;
            Some(format!("{addr}:{port}"))
        })
        .collect();
    out.sort();
    Ok(out)
}

async fn native_front(
    kiln: &Path,
    d: bollard::Docker,
    service: &'static str,
) -> Result<NativeFront> {
    let dir = tempfile::tempdir()?;
    let front = kiln_balancer::Front {
        mode: kiln_balancer::Mode::Http,
        ..Default::default()
    };
    let check = kiln_balancer::Check {
        probe: kiln_balancer::Probe::Http {
            path: "/index.html".into(),
            port: 0,
        },
        interval_ms: 1000,
        fall: 2,
        rise: 2,
    };
    let first = task_backends(&d, service).await?;
    kiln_balancer::set_backends_with(dir.path(), &first, Some(&check), &front)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let front_process = crate::balancer::serve_balancer(kiln, port, dir.path())?;
    let control = dir.path().to_path_buf();
    let follow = tokio::spawn(async move {
        let mut last = first;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Ok(now) = task_backends(&d, service).await else {
                continue;
            };
            if now != last && !now.is_empty() {
                let _ = kiln_balancer::set_backends_with(&control, &now, Some(&check), &front);
                last = now;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_ok(&format!("127.0.0.1:{port}")) {
        if Instant::now() > deadline {
            bail!("the native service's front never answered");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(NativeFront {
        port,
        _process: front_process,
        _dir: dir,
        follow,
    })
}

/// `clients` threads asking `addr` for `/` until stopped; (ok, failed).
struct SteadyLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl SteadyLoad {
    fn start(addr: String, clients: usize) -> SteadyLoad {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let clients = (0..clients)
            .map(|_| {
                let (stop, ok, failed, addr) =
                    (stop.clone(), ok.clone(), failed.clone(), addr.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if http_ok(&addr) {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        SteadyLoad {
            stop,
            ok,
            failed,
            clients,
        }
    }

    fn finish(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            let _ = c.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Creates a 10-replica service on `v1` (each task publishing 8080 on a
/// host port of its node), waits for it, updates it to `v2` the way
/// `docker service update --image V2 --update-order start-first
/// --update-parallelism 1` does, under 2 clients of steady load through
/// [`NativeFront`], and returns the update's wall time (until every
/// running task runs v2) and the requests.
async fn native_update(c: &Cluster, kiln: &Path, v1: &str, v2: &str) -> Result<Native> {
    let d = c.engine().docker();
    let name = "bench-native";
    let spec = |image: &str| ServiceSpec {
        name: Some(name.into()),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(image.into()),
                read_only: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(10) }),
            ..Default::default()
        }),
        update_config: Some(ServiceSpecUpdateConfig {
            parallelism: Some(1),
            delay: Some(0),
            failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::PAUSE),
            monitor: Some(5_000_000_000),
            max_failure_ratio: Some(0.0),
            order: Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST),
        }),
        endpoint_spec: Some(bollard::models::EndpointSpec {
            mode: Some(bollard::models::EndpointSpecModeEnum::DNSRR),
            ports: Some(vec![bollard::models::EndpointPortConfig {
                protocol: Some(bollard::models::EndpointPortConfigProtocolEnum::TCP),
                target_port: Some(8080),
                // No published port: Docker picks one per task.
                publish_mode: Some(bollard::models::EndpointPortConfigPublishModeEnum::HOST),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    };
    d.create_service(spec(v1), None).await?;
    let running_on = |image: String| async move {
        let tasks = d
            .list_tasks(Some(bollard::query_parameters::ListTasksOptions {
                filters: Some(HashMap::from([(
                    "service".to_string(),
                    vec![name.to_string()],
                )])),
            }))
            .await?;
        Ok::<usize, bollard::errors::Error>(
            tasks
                .iter()
                .filter(|t| {
                    t.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING)
                        && t.desired_state == Some(TaskState::RUNNING)
                        && t.spec
                            .as_ref()
                            .and_then(|s| s.container_spec.as_ref())
                            .and_then(|c| c.image.as_deref())
                            == Some(image.as_str())
                })
                .count(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while running_on(v1.to_string()).await? < 10 {
        if Instant::now() > deadline {
            bail!("10 replicas of v1 never ran");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let front = native_front(kiln, d.clone(), name).await?;
    let load = SteadyLoad::start(format!("127.0.0.1:{}", front.port), 2);
    let current = d.inspect_service(name, None).await?;
    let t = Instant::now();
    d.update_service(
        name,
        spec(v2),
        bollard::query_parameters::UpdateServiceOptions {
            version: current.version.and_then(|v| v.index).unwrap_or_default() as i32,
            ..Default::default()
        },
        None,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = d
            .inspect_service(name, None)
            .await?
            .update_status
            .and_then(|u| u.state)
            .is_some_and(|s| s == bollard::models::ServiceUpdateStatusStateEnum::COMPLETED);
        if done && running_on(v2.to_string()).await? == 10 && running_on(v1.to_string()).await? == 0
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the native update did not finish");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = t.elapsed();
    let (ok, failed) = load.finish();
    drop(front);
    d.delete_service(name).await?;
    Ok(Native { wall, ok, failed })
}
