//! Against a real two-node swarm (kiln-testcluster, shared by the tests of
//! this binary): pushes by digest, servers on both nodes reached over HTTP
//! from the host, labels, removal, exec sessions, drift behind kiln's back,
//! filesystem export against the seal, and the errors kiln must make clear.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::StreamExt as _;
use kiln_provider_swarm::server::{LABEL_ENV, LABEL_ROLE, LABEL_SERVER};
use kiln_provider_swarm::{
    config_drift, Cluster, Endpoint, Engine, LogChunk, NodeEngine, NodeHealth, Registry,
    RegistryOptions, SpecField, SwarmError,
};
use kiln_testcluster::Cluster as TestCluster;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn test_cluster() -> &'static TestCluster {
    TestCluster::shared()
}

/// Runs `f` on a fresh runtime, the shared cluster started first: starting
/// it blocks on a runtime of its own, which cannot happen inside another.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    test_cluster();
    rt().block_on(f)
}

fn registry(repo: &str) -> Registry {
    Registry::new(
        &format!("{}/{repo}", test_cluster().registry()),
        RegistryOptions {
            insecure: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// `REGISTRY/swarmtest/web@sha256:...`, pushed once for the binary.
fn web_ref() -> &'static str {
    static REF: OnceLock<String> = OnceLock::new();
    REF.get_or_init(|| {
        let img = web_image();
        block_on(registry("swarmtest/web").push(&img.store, &img.digest))
            .unwrap()
            .reference
    })
}

async fn manager() -> Cluster {
    Cluster::connect(&Endpoint::new(test_cluster().manager_endpoint()))
        .await
        .unwrap()
}

/// The node engine of swarm node `id`.
async fn node_engine(id: &str) -> NodeEngine {
    let n = test_cluster()
        .nodes()
        .into_iter()
        .find(|n| n.id == id)
        .unwrap();
    NodeEngine::connect(&Endpoint::new(n.endpoint))
        .await
        .unwrap()
}

#[test]
fn push_keeps_kilns_digest_and_skips_what_the_registry_has() {
    let img = web_image();
    let reg = registry("push/web");
    let rt = rt();
    let first = rt.block_on(reg.push(&img.store, &img.digest)).unwrap();
    eprintln!("first push: {first:?}");
    assert_eq!(first.reference, format!("{}@{}", reg.repo(), img.digest));
    assert_eq!(first.blobs_skipped, 0);
    assert!(first.blobs_pushed >= 2, "{first:?}"); // config + layer
    let served = rt.block_on(reg.digest_of(&first.reference)).unwrap();
    assert_eq!(served, img.digest.0);
    let again = rt.block_on(reg.push(&img.store, &img.digest)).unwrap();
    assert_eq!(again.blobs_pushed, 0);
    assert_eq!(again.blobs_skipped, first.blobs_pushed);
}

#[test]
fn a_push_to_an_unreachable_registry_is_an_error_naming_it() {
    let img = web_image();
    // Nothing listens on port 1 of the cluster's own host address.
    let host = test_cluster().registry().replace(":5000", ":1");
    let reg = Registry::new(
        &format!("{host}/x"),
        RegistryOptions {
            insecure: true,
            ..Default::default()
        },
    )
    .unwrap();
    let e = rt()
        .block_on(reg.push(&img.store, &img.digest))
        .unwrap_err();
    assert!(
        e.to_string().starts_with(&format!("registry {host}/x: ")),
        "{e}"
    );
}

#[test]
fn servers_run_on_both_nodes_by_digest_and_serve_http_from_the_host() {
    let image = web_ref();
    let rt = rt();
    rt.block_on(async {
        let c = manager().await;
        let nodes = c.nodes().await.unwrap();
        assert_eq!(nodes.len(), 2);
        assert!(nodes.iter().all(|n| n.schedulable()), "{nodes:?}");
        let mut specs = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let mut s = spec("http", &format!("web-{i}"), image, 31000 + i as u16);
            s.node = Some(n.id.clone());
            s.slot = i as u32;
            c.create_server(&s).await.unwrap();
            specs.push(s);
        }
        let mut seen_nodes = BTreeSet::new();
        for s in &specs {
            let up = c.wait_running("http", &s.server, WAIT).await.unwrap();
            let t = up.current().unwrap();
            assert_eq!(Some(&t.node_id), s.node.as_ref());
            seen_nodes.insert(t.node_id.clone());
            let addr = up.address(8080).unwrap();
            let body = wait_for(&format!("HTTP from {addr}"), WAIT, || http_get(&addr));
            assert_eq!(body, PAGE);
            // Pinned by digest: the container runs exactly the pushed manifest.
            let spec = up.spec.as_ref().unwrap();
            assert_eq!(&spec.image, image);
            assert!(
                config_drift(s, &up.raw).is_empty(),
                "{:?}",
                config_drift(s, &up.raw)
            );
        }
        assert_eq!(seen_nodes.len(), 2);

        // Listing by labels finds exactly these, with role and server labels.
        let listed = c.servers(Some("http")).await.unwrap();
        let names: Vec<&str> = listed.iter().map(|s| s.service_name.as_str()).collect();
        assert_eq!(names, ["kiln-http-web-0", "kiln-http-web-1"]);
        for s in &listed {
            assert_eq!(s.label(LABEL_ENV), Some("http"));
            assert_eq!(s.label(LABEL_ROLE), Some("web"));
            assert!(s.label(LABEL_SERVER).unwrap().starts_with("web-"));
            assert!(s.alive());
        }
        assert!(c.servers(Some("no-such-env")).await.unwrap().is_empty());

        // Removal leaves no service, no task and no container on any node.
        for s in &specs {
            c.remove_server("http", &s.server, WAIT).await.unwrap();
            c.remove_server("http", &s.server, WAIT).await.unwrap(); // idempotent
        }
        assert!(c.servers(Some("http")).await.unwrap().is_empty());
        for n in &nodes {
            let e = node_engine(&n.id).await;
            let left = wait_for_async(|| containers_of(&e, "http")).await;
            assert!(left, "containers of env http left on {}", n.id);
        }
    });
}

/// Whether `env` has no container on the node (polled: containers go
/// shortly after their tasks).
async fn containers_of(e: &NodeEngine, env: &str) -> bool {
    let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_ENV}={env}")])]);
    let list = e
        .engine()
        .docker()
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap();
    list.is_empty()
}

async fn wait_for_async<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[test]
fn exec_sessions_show_up_as_logins() {
    let image = web_ref();
    block_on(async {
        let c = manager().await;
        let s = spec("exec", "web-x", image, 31010);
        c.create_server(&s).await.unwrap();
        let up = c.wait_running("exec", "web-x", WAIT).await.unwrap();
        let t = up.current().unwrap();
        let container = t.container_id.clone().unwrap();
        let node = node_engine(&t.node_id).await;
        let before = node.exec_sessions(&container).await.unwrap();
        assert!(!before.any(), "{before:?}");
        // What `docker exec` does: one finished command, one still running.
        let d = node.engine().docker();
        for cmd in [vec!["/busybox", "true"], vec!["/busybox", "sleep", "60"]] {
            let exec = d
                .create_exec(
                    &container,
                    bollard::exec::CreateExecOptions {
                        cmd: Some(cmd),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            d.start_exec(
                &exec.id,
                Some(bollard::exec::StartExecOptions {
                    detach: true,
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
        }
        let seen = node.exec_sessions(&container).await.unwrap();
        eprintln!("exec sessions: {seen:?}");
        assert!(!seen.open.is_empty(), "{seen:?}");
        let cmds: Vec<&str> = seen.started.iter().map(|s| s.1.as_str()).collect();
        assert!(cmds.contains(&"/busybox true"), "{seen:?}");
        assert!(cmds.contains(&"/busybox sleep 60"), "{seen:?}");
        c.remove_server("exec", "web-x", WAIT).await.unwrap();
    });
}

#[test]
fn changes_behind_kilns_back_are_config_drift_and_files_are_checked_against_the_seal() {
    let image = web_ref();
    let img = web_image();
    block_on(async {
        let c = manager().await;
        let s = spec("drift", "web-d", image, 31020);
        c.create_server(&s).await.unwrap();
        let up = c.wait_running("drift", "web-d", WAIT).await.unwrap();
        assert!(config_drift(&s, &up.raw).is_empty());

        // The export of a pristine server matches the seal.
        let t = up.current().unwrap().clone();
        let node = node_engine(&t.node_id).await;
        let container = t.container_id.clone().unwrap();
        let diffs = node
            .verify_export(&container, &img.seal, &["/tmp", "/run"])
            .await
            .unwrap();
        assert!(diffs.is_empty(), "{diffs:?}");

        // `docker service update --limit-memory 1g --read-only=false`, by hand.
        let d = c.engine().docker();
        let current = d.inspect_service(&s.service_name(), None).await.unwrap();
        let mut raw = current.spec.clone().unwrap();
        let task = raw.task_template.as_mut().unwrap();
        task.container_spec.as_mut().unwrap().read_only = Some(false);
        task.resources
            .as_mut()
            .unwrap()
            .limits
            .as_mut()
            .unwrap()
            .memory_bytes = Some(1 << 30);
        d.update_service(
            &s.service_name(),
            raw,
            bollard::query_parameters::UpdateServiceOptions {
                version: current.version.unwrap().index.unwrap() as i32,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
        let now = c.server("drift", "web-d").await.unwrap().unwrap();
        let fields: Vec<SpecField> = config_drift(&s, &now.raw)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(fields, [SpecField::Memory, SpecField::ReadOnly]);
        assert!(now.version > up.version);

        // The replacement task has a writable root: a file written there is
        // found by the export.
        let t2 = wait_for_async_value(|| async {
            let s = c.server("drift", "web-d").await.ok()??;
            let t = s.current()?.clone();
            (t.alive() && t.id != t_id(&up)).then_some(t)
        })
        .await;
        let node = node_engine(&t2.node_id).await;
        let container = t2.container_id.clone().unwrap();
        let nd = node.engine().docker();
        let exec = nd
            .create_exec(
                &container,
                bollard::exec::CreateExecOptions {
                    cmd: Some(vec!["/busybox", "sh", "-c", "echo x > /evil"]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        nd.start_exec(
            &exec.id,
            Some(bollard::exec::StartExecOptions {
                detach: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        let diffs = wait_for_async_value(|| async {
            let d = node
                .verify_export(&container, &img.seal, &["/tmp", "/run"])
                .await
                .ok()?;
            (!d.is_empty()).then_some(d)
        })
        .await;
        let paths: Vec<&str> = diffs.iter().map(|d| d.path()).collect();
        assert_eq!(paths, ["evil"], "{diffs:?}");
        c.remove_server("drift", "web-d", WAIT).await.unwrap();
    });
}

fn t_id(s: &kiln_provider_swarm::Server) -> String {
    s.current().unwrap().id.clone()
}

async fn wait_for_async_value<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "not after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn logs_come_through_the_manager() {
    let img = bake(
        "talker",
        "[\"/busybox\", \"sh\", \"-c\", \"echo out-line; echo err-line >&2; exec /busybox sleep 600\"]",
    );
    let reg = registry("swarmtest/talker");
    block_on(async {
        let image = reg.push(&img.store, &img.digest).await.unwrap().reference;
        let c = manager().await;
        let mut s = spec("logs", "talker-1", &image, 31030);
        s.ports.clear();
        c.create_server(&s).await.unwrap();
        c.wait_running("logs", "talker-1", WAIT).await.unwrap();
        let (out, err) = wait_for_async_value(|| async {
            let chunks: Vec<LogChunk> = c
                .logs("logs", "talker-1", false, None)
                .filter_map(|r| async move { r.ok() })
                .collect()
                .await;
            let mut out = String::new();
            let mut err = String::new();
            for ch in chunks {
                match ch {
                    LogChunk::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
                    LogChunk::Stderr(b) => err.push_str(&String::from_utf8_lossy(&b)),
                }
            }
            (out.contains("out-line") && err.contains("err-line")).then_some((out, err))
        })
        .await;
        assert!(!out.contains("err-line"), "{out}");
        assert!(!err.contains("out-line"), "{err}");
        c.remove_server("logs", "talker-1", WAIT).await.unwrap();
    });
}

#[test]
fn a_server_with_no_room_anywhere_is_a_clear_error() {
    let image = web_ref();
    block_on(async {
        let c = manager().await;
        let mut s = spec("room", "web-big", image, 31040);
        s.reserve = true;
        s.memory_bytes = 1 << 50;
        c.create_server(&s).await.unwrap();
        let e = c.wait_running("room", "web-big", WAIT).await.unwrap_err();
        eprintln!("{e}");
        match &e {
            SwarmError::Task { state, message, .. } => {
                assert_eq!(state, "pending");
                assert!(message.contains("no suitable node"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        c.remove_server("room", "web-big", WAIT).await.unwrap();
    });
}

#[test]
fn engines_that_cannot_serve_kiln_are_clear_errors() {
    block_on(async {
        // A worker is not a manager.
        let worker = test_cluster().nodes()[1].endpoint.clone();
        let e = Cluster::connect(&Endpoint::new(&worker)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Docker engine at {worker} is not a swarm manager (node state: worker); point kiln at a manager")
        );
        // Nothing listening.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let e = Engine::connect(&Endpoint::new(format!("tcp://127.0.0.1:{port}")))
            .await
            .unwrap_err();
        assert!(matches!(e, SwarmError::Unreachable { .. }), "{e:?}");
        // Accepts and never answers: a timeout, not a hang.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let t0 = std::time::Instant::now();
        let e = Engine::connect_with_timeout(
            &Endpoint::new(format!("tcp://{addr}")),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, SwarmError::Unreachable { .. }), "{e:?}");
        eprintln!("silent engine refused after {:?}", t0.elapsed());
        hold.abort();
        // An engine whose API is too old (it says so on /version).
        let old = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = old.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut s, _)) = old.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = r#"{"ApiVersion":"1.30","MinAPIVersion":"1.12","Version":"17.06.0-ce"}"#;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let e = Engine::connect(&Endpoint::new(format!("tcp://{addr}")))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Docker engine at tcp://{addr} speaks API 1.30; kiln needs 1.41 or later (Docker 20.10)")
        );
        serve.abort();
        // The real manager negotiates 1.41 (Debian's docker.io 20.10).
        let m = manager().await;
        assert_eq!(m.engine().api_version, "1.41");
        let nodes = m.nodes().await.unwrap();
        assert!(nodes.iter().all(|n| n.health == NodeHealth::Ready));
    });
}

#[test]
fn the_balancer_runs_on_the_swarm_from_kilns_own_binary() {
    // Stage kiln (and, if it is dynamic, its shared objects) as a scratch
    // image's files and bake it with kiln itself.
    let dir = tempfile::Builder::new()
        .prefix("kiln-swarm-lb-")
        .tempdir()
        .unwrap();
    let files = dir.path().join("images/balancer/files");
    kiln_provider_swarm::balancer::stage(&kiln_bin(), &files).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "[project]\nname = \"lb\"\n[images.balancer]\nfrom = \"scratch\"\nentrypoint = [\"/kiln\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(kiln_bin())
        .args(["image", "build", "balancer"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = kiln_image::Store::open(dir.path().join(".kiln")).unwrap();
    let digest = store.current_record("balancer").unwrap().digest;
    block_on(async {
        let image = registry("swarmtest/balancer")
            .push(&store, &digest)
            .await
            .unwrap()
            .reference;
        let c = manager().await;
        let at = kiln_provider_swarm::balancer::Placement {
            node: c.node_id.clone(),
            published: 31050,
            control: 31051,
        };
        let s = kiln_provider_swarm::balancer::spec("lb", "web", &image, 8000, &at, "s3cret");
        c.create_server(&s).await.unwrap();
        let up = c.wait_running("lb", &s.server, WAIT).await.unwrap();
        let addr = up.address(8000).unwrap();
        let control = format!(
            "http://{}",
            up.address(kiln_provider_swarm::balancer::CONTROL_PORT)
                .unwrap()
        );
        // It accepts connections on its node's published port and keeps running.
        wait_for(&format!("balancer at {addr}"), WAIT, || {
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(500))
                .ok()
        });
        // Its control channel switches backends, for the token only.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let set = r#"{"generation":0,"backends":["10.9.9.9:80"]}"#;
        let denied = agent
            .put(format!("{control}/backends"))
            .header("Authorization", "Bearer wrong")
            .send(set)
            .unwrap();
        assert_eq!(denied.status().as_u16(), 401);
        let mut ok = agent
            .put(format!("{control}/backends"))
            .header("Authorization", "Bearer s3cret")
            .send(set)
            .unwrap();
        assert_eq!(ok.status().as_u16(), 200);
        assert_eq!(
            ok.body_mut().read_to_string().unwrap(),
            r#"{"generation":1}"#
        );
        let served = wait_for("the new set served", WAIT, || {
            let mut r = agent
                .get(format!("{control}/status"))
                .header("Authorization", "Bearer s3cret")
                .call()
                .ok()?;
            let status: kiln_balancer::Status =
                serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
            (status.generation == 1).then_some(status)
        });
        assert_eq!(served.backends[0].addr, "10.9.9.9:80");
        assert!(c.server("lb", &s.server).await.unwrap().unwrap().alive());
        c.remove_server("lb", &s.server, WAIT).await.unwrap();
    });
}
