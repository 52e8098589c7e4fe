//! The `swarm` provider end to end, on a real two-node swarm
//! (kiln-testcluster: a second dockerd in its own network namespace and a
//! registry), through the real `kiln` binary: plan and apply place servers
//! on both nodes (the plan says where), each serves over HTTP at
//! `NODE_IP:PORT`; a rolling replacement under steady load through the
//! balancer loses no request; a hand-made service with kiln's labels is
//! unmanaged and removed under `unmanaged = "kill"`; a `docker exec` is
//! an interactive session, replaced under `drift = "kill"`; `kiln promote`
//! from a `local` environment runs the same digest on the swarm; a
//! blue-green rollout and a rollback inside its window lose no request;
//! logs outlive servers; destroy leaves no
//! service. One cluster for the whole binary, torn down at the end (with
//! the host's firewall as it was).

mod support;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::time::Duration;

use support::load::Load;
use support::*;

/// `staging` on the swarm: `servers` `web` servers behind a balancer on
/// `port`, `version` in the role's environment.
fn kiln_toml(cluster: &kiln_testcluster::Cluster, port: u16, servers: u32, version: u32) -> String {
    let engines: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("\"{}\" = \"{}\"", n.id, n.endpoint))
        .collect();
    format!(
        r#"
[project]
name = "fleet"
[images.web]
from = "scratch"
entrypoint = ["/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
health = {{ http = "/index.html", port = 8080 }}
[env.staging]
provider = {{ swarm = "{manager}", registry = "http://{registry}/fleet", engines = {{ {engines} }} }}
[env.staging.roles.web]
image = "web"
servers = {servers}
ports = [8080]
env = {{ VERSION = "{version}" }}
balancer = {{ listen = "0.0.0.0:{port}", port = 8080, drain_timeout = "5s" }}
"#,
        manager = cluster.manager_endpoint(),
        registry = cluster.registry(),
        engines = engines.join(", "),
    )
}

fn http_get(addr: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect_timeout(
        &addr.parse().map_err(|e| format!("{addr}: {e}"))?,
        Duration::from_secs(2),
    )
    .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if out.starts_with("HTTP/1.") && out.contains(" 200 ") {
        Ok(out)
    } else {
        Err(format!("bad response: {out:?}"))
    }
}

/// Runs `f` with a connection to the cluster's manager, on a runtime of
/// its own (the tests themselves are synchronous, like the CLI).
fn with_manager<T, F, Fut>(cluster: &kiln_testcluster::Cluster, f: F) -> T
where
    F: FnOnce(kiln_provider_swarm::Cluster) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ep = kiln_provider_swarm::Endpoint::new(cluster.manager_endpoint());
        f(kiln_provider_swarm::Cluster::connect(&ep).await.unwrap()).await
    })
}

/// Services on the swarm labelled with kiln's environment `env`, the
/// role balancers included, as the manager lists them.
fn env_services(
    cluster: &kiln_testcluster::Cluster,
    env: &str,
) -> Vec<kiln_provider_swarm::Server> {
    with_manager(
        cluster,
        |c| async move { c.servers(Some(env)).await.unwrap() },
    )
}

/// Services on the swarm labelled with kiln's environment `env`, the
/// role balancers aside.
fn services(cluster: &kiln_testcluster::Cluster, env: &str) -> Vec<String> {
    env_services(cluster, env)
        .into_iter()
        .filter(|s| !kiln_provider_swarm::front::is_balancer(s))
        .map(|s| s.service_name)
        .collect()
}

/// The nodes where a balancer of `env` runs.
fn balancer_nodes(cluster: &kiln_testcluster::Cluster, env: &str) -> BTreeSet<String> {
    env_services(cluster, env)
        .into_iter()
        .filter(|s| kiln_provider_swarm::front::is_balancer(s) && s.alive())
        .filter_map(|s| Some(s.current()?.node_id.clone()))
        .collect()
}

/// Every service of `env`, balancers included.
fn all_services(cluster: &kiln_testcluster::Cluster, env: &str) -> usize {
    env_services(cluster, env).len()
}

/// The role's front on node `i` (0 or 1): its balancer's published port.
fn front(cluster: &kiln_testcluster::Cluster, i: usize, port: u16) -> String {
    format!("{}:{port}", cluster.nodes()[i].ip)
}

/// Adds `EDITED=1` to a service's environment, as `docker service update
/// --env-add` would.
fn update_env(cluster: &kiln_testcluster::Cluster, service: &str) {
    with_manager(cluster, |c| async move {
        let d = c.engine().docker();
        let s = d.inspect_service(service, None).await.unwrap();
        let mut spec = s.spec.unwrap();
        let cs = spec
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
            .unwrap();
        cs.env.get_or_insert_with(Vec::new).push("EDITED=1".into());
        d.update_service(
            service,
            spec,
            bollard::query_parameters::UpdateServiceOptions {
                version: s.version.and_then(|v| v.index).unwrap() as i32,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    });
}

/// A service started by hand with kiln's env and role labels (but not
/// kiln's name or its other labels), running the same image as `like`.
fn start_stray(cluster: &kiln_testcluster::Cluster, like: &str, name: &str) {
    with_manager(cluster, |c| async move {
        let d = c.engine().docker();
        let template = d.inspect_service(like, None).await.unwrap().spec.unwrap();
        let image = template
            .task_template
            .and_then(|t| t.container_spec)
            .and_then(|c| c.image)
            .unwrap();
        let spec = bollard::models::ServiceSpec {
            name: Some(name.into()),
            labels: Some(
                [
                    (
                        kiln_provider_swarm::server::LABEL_ENV.to_string(),
                        "staging".to_string(),
                    ),
                    (
                        kiln_provider_swarm::server::LABEL_ROLE.to_string(),
                        "web".to_string(),
                    ),
                ]
                .into(),
            ),
            task_template: Some(bollard::models::TaskSpec {
                container_spec: Some(bollard::models::TaskSpecContainerSpec {
                    image: Some(image),
                    command: Some(vec!["/busybox".into(), "sleep".into(), "300".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        d.create_service(spec, None).await.unwrap();
    });
}

/// What `docker exec -d SERVICE_CONTAINER sleep 60` does, on the node
/// where `env`'s server `id` runs.
fn exec_into(cluster: &kiln_testcluster::Cluster, env: &str, id: &str) {
    with_manager(cluster, |c| async move {
        let server = c
            .server(env, id)
            .await
            .unwrap()
            .expect("the server's service");
        let task = server.current().expect("a task").clone();
        let node = cluster
            .nodes()
            .into_iter()
            .find(|n| n.id == task.node_id)
            .expect("the task's node");
        let engine = kiln_provider_swarm::Engine::connect(&kiln_provider_swarm::Endpoint::new(
            node.endpoint,
        ))
        .await
        .unwrap();
        let d = engine.docker();
        let container = task.container_id.expect("a container");
        let exec = d
            .create_exec(
                &container,
                bollard::exec::CreateExecOptions {
                    cmd: Some(vec!["/busybox", "sleep", "60"]),
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
    });
}

/// Destroys an environment of the project when dropped.
struct DestroyEnv<'a>(&'a Project, &'static str);

impl Drop for DestroyEnv<'_> {
    fn drop(&mut self) {
        let _ = self.0.kiln(&["destroy", self.1, "--yes", "--forget"]);
    }
}

/// The image digests `env`'s running servers run.
fn digests(p: &Project, env: &str) -> BTreeSet<String> {
    p.kiln(&["server", "list", env, "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "running")
        .map(|s| s["image_digest"].as_str().unwrap().to_string())
        .collect()
}

/// What the swarm runs for `env`, one line per service (for failures).
fn describe(cluster: &kiln_testcluster::Cluster, env: &str) -> String {
    env_services(cluster, env)
        .iter()
        .map(|s| {
            let ports: Vec<u16> = s
                .spec
                .as_ref()
                .map(|p| p.ports.iter().map(|p| p.published).collect())
                .unwrap_or_default();
            let tasks: Vec<String> = s
                .tasks
                .iter()
                .map(|t| {
                    format!(
                        "{:?}/{:?} on {} {:?} {}",
                        t.phase,
                        t.desired,
                        t.node_id.get(..6).unwrap_or(""),
                        t.error,
                        t.message
                    )
                })
                .collect();
            format!("{} ports {ports:?}: {}\n", s.service_name, tasks.join("; "))
        })
        .collect()
}

/// Nodes the manager sees ready.
fn ready_nodes(cluster: &kiln_testcluster::Cluster) -> usize {
    with_manager(cluster, |c| async move {
        c.nodes()
            .await
            .unwrap()
            .iter()
            .filter(|n| n.health == kiln_provider_swarm::NodeHealth::Ready)
            .count()
    })
}

/// Tears the cluster down even when the test panics, and checks that
/// nothing is left (daemons, namespaces, links, firewall).
struct Down<'a>(&'a kiln_testcluster::Cluster);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let t = self.0.teardown();
        if !std::thread::panicking() {
            assert!(t.leftovers.is_empty(), "left behind: {:?}", t.leftovers);
        }
    }
}

/// A web project on the cluster, its image built (busybox on scratch).
fn project(cluster: &kiln_testcluster::Cluster, port: u16) -> Project {
    let p = Project::new();
    std::fs::create_dir_all(p.path().join("images/web/files/www")).unwrap();
    std::fs::copy(BUSYBOX, p.path().join("images/web/files/busybox")).unwrap();
    p.write("images/web/files/www/index.html", "kiln on swarm\n");
    p.write("kiln.toml", &kiln_toml(cluster, port, 4, 1));
    p.kiln(&["image", "build", "web"]).ok();
    p
}

#[test]
fn a_swarm_environment_is_planned_applied_rolled_and_destroyed() {
    let cluster = kiln_testcluster::Cluster::start(Default::default()).unwrap();
    let _down = Down(&cluster);
    let node_ids: BTreeSet<String> = cluster.nodes().into_iter().map(|n| n.id).collect();
    let port = free_port();
    let p = project(&cluster, port);
    let _destroy = Teardown(&p);

    // The plan says where each server goes: node and published port.
    let plan = p.kiln(&["plan", "staging"]).ok().stdout;
    assert_eq!(plan.matches(" on node ").count(), 4, "{plan}");
    for id in &node_ids {
        assert!(
            plan.contains(&format!("on node {id}")),
            "{id} unused:\n{plan}"
        );
    }

    p.kiln(&["apply", "staging", "--yes"]).ok();
    let servers = p.servers();
    assert_eq!(servers.len(), 4);
    let used: BTreeSet<String> = servers
        .iter()
        .map(|s| s["node"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(used, node_ids, "servers are spread over both nodes");
    let first: Vec<String> = p.ids();
    assert_eq!(services(&cluster, "staging").len(), 4);
    // Each serves at NODE_IP:PUBLISHED, straight from the host.
    for s in &servers {
        let addr = s["address"].as_str().unwrap();
        let published = s["published"]["8080"].as_u64().expect("published port");
        http_get(&format!("{addr}:{published}")).unwrap();
    }
    // The role's balancer runs on the swarm, one per node, and serves
    // there once kiln has exited.
    assert_eq!(balancer_nodes(&cluster, "staging"), node_ids);
    http_get(&front(&cluster, 0, port)).unwrap();
    http_get(&front(&cluster, 1, port)).unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on kiln's own host"
    );

    // A rolling replacement under load through the balancer loses nothing.
    p.write("kiln.toml", &kiln_toml(&cluster, port, 4, 2));
    let load = Load::start(front(&cluster, 1, port), "/", 4);
    let out = p.kiln(&["apply", "staging", "--yes"]).ok();
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{failed} of {} failed: {errors:?}", ok + failed);
    assert!(ok > 20, "only {ok} requests were sent:\n{}", out.stdout);
    let second = p.ids();
    assert_eq!(second.len(), 4);
    assert!(
        second.iter().all(|id| !first.contains(id)),
        "{first:?} → {second:?}"
    );
    let used: BTreeSet<String> = p
        .servers()
        .iter()
        .map(|s| s["node"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(used, node_ids, "still spread after the rollout");

    // Nothing to do now and nothing drifted: files (exported once per node
    // and version) match the seal, and every service is as kiln made it.
    let plan = p.kiln(&["plan", "staging"]).ok().stdout;
    assert!(plan.contains("No changes"), "{plan}");
    p.kiln(&["drift", "staging"]).ok();

    // A service made by hand with kiln's labels is unmanaged: reported,
    // left alone by default, removed by reconcile under `unmanaged = "kill"`.
    start_stray(
        &cluster,
        &format!("kiln-staging-{}", second[1]),
        "stray-web",
    );
    let drift = p.kiln(&["drift", "staging"]).expect(2).stdout;
    assert!(
        drift.contains("stray-web") && drift.contains("unmanaged"),
        "{drift}"
    );
    p.kiln(&["reconcile", "staging", "--yes"]).ok();
    assert!(services(&cluster, "staging").contains(&"stray-web".to_string()));
    let toml = kiln_toml(&cluster, port, 4, 2);
    p.write(
        "kiln.toml",
        &toml.replace("[env.staging]\n", "[env.staging]\nunmanaged = \"kill\"\n"),
    );
    p.kiln(&["reconcile", "staging", "--yes"]).ok();
    let left = services(&cluster, "staging");
    assert!(!left.contains(&"stray-web".to_string()), "{left:?}");
    assert_eq!(left.len(), 4, "{left:?}");
    assert_eq!(p.ids(), second, "kiln's own servers untouched");
    p.kiln(&["drift", "staging"]).ok();

    // `docker exec` into a server is an interactive session: drift says so,
    // and under `drift = "kill"` reconcile quarantines and replaces it.
    let victim = second[1].clone();
    exec_into(&cluster, "staging", &victim);
    let drift = p.kiln(&["drift", "staging"]).expect(2).stdout;
    assert!(
        drift.contains(&victim) && drift.contains("interactive session"),
        "{drift}"
    );
    p.write(
        "kiln.toml",
        &toml.replace(
            "[env.staging]\n",
            "[env.staging]\nunmanaged = \"kill\"\ndrift = \"kill\"\n",
        ),
    );
    let load = Load::start(front(&cluster, 0, port), "/", 4);
    let out = p.kiln(&["reconcile", "staging", "--yes"]).ok();
    eprintln!("reconcile:\n{}\n{}", out.stdout, out.stderr);
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{failed} of {} failed: {errors:?}", ok + failed);
    let now = p.ids();
    assert_eq!(now.len(), 4, "{now:?}");
    assert!(
        !now.contains(&victim),
        "{victim} still runs:\n{}",
        out.stdout
    );
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert!(history.contains("reconcile"), "{history}");
    p.kiln(&["drift", "staging"]).ok();
    // Promotion across providers: `dev` runs on this host (`local`); what
    // it runs goes to the swarm by digest, whatever the store's current
    // version is by then.
    let with_dev = format!(
        "{}\n[env.dev]\nsubnet = \"10.77.62.0/24\"\n[env.dev.roles.web]\nimage = \"web\"\nservers = 1\nports = [8080]\nenv = {{ VERSION = \"2\" }}\n",
        toml.replace(
            "[env.staging]\n",
            "[env.staging]\nunmanaged = \"kill\"\ndrift = \"kill\"\n"
        )
        .replace(
            "[env.staging.roles.web]\n",
            "[env.staging.roles.web]\nstrategy = { kind = \"blue_green\", rollback_window = \"10m\" }\n",
        )
    );
    p.write("kiln.toml", &with_dev);
    let _dev = DestroyEnv(&p, "dev");
    p.write("images/web/files/www/index.html", "promoted\n");
    p.kiln(&["image", "build", "web"]).ok();
    p.kiln(&["apply", "dev", "--yes"]).ok();
    let dev = digests(&p, "dev");
    assert_eq!(dev.len(), 1);
    assert_ne!(dev, digests(&p, "staging"));
    p.write("images/web/files/www/index.html", "newer, not promoted\n");
    p.kiln(&["image", "build", "web"]).ok();
    eprintln!("before promote:\n{}", describe(&cluster, "staging"));
    p.kiln(&["promote", "dev", "staging", "--yes"]).ok();
    assert_eq!(digests(&p, "staging"), dev, "staging runs what dev runs");
    let body = http_get(&front(&cluster, 0, port)).unwrap();
    assert!(body.ends_with("promoted\n"), "{body}");
    p.kiln(&["destroy", "dev", "--yes"]).ok();

    // Blue-green (staging's strategy since the promotion) on the swarm under
    // load, to the store's newer version built above: the new set comes up
    // beside the old, one switch; a rollback inside the window switches back to the
    // very same warm servers. No request fails.
    let blue = p.ids_with("staging", "running");
    let load = Load::start(front(&cluster, 1, port), "/", 4);
    let run = p.kiln(&["apply", "staging", "--yes"]).ok();
    assert_eq!(
        run.stderr.matches("switched to the new servers").count(),
        1,
        "one switch: {}",
        run.stderr
    );
    assert_eq!(p.ids_with("staging", "standby"), blue, "blue is warm");
    let run = p.kiln(&["rollback", "staging", "--yes"]).ok();
    assert!(run.stdout.contains("switch back"), "{}", run.stdout);
    assert!(!run.stderr.contains("creating"), "{}", run.stderr);
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{failed} of {} failed: {errors:?}", ok + failed);
    assert!(ok > 20, "only {ok} requests were sent");
    assert_eq!(p.ids_with("staging", "running"), blue, "blue serves again");

    // Last (Swarm rolls the edited service for a while): a change behind
    // kiln's back (`docker service update --env-add`) is drift.
    update_env(&cluster, &format!("kiln-staging-{}", blue[0]));
    let drift = p.kiln(&["drift", "staging"]).expect(2).stdout;
    assert!(drift.contains(&blue[0]), "{drift}");
    // The replaced servers' logs are kept.
    p.kiln(&["logs", "staging", &first[0]]).ok();

    p.kiln(&["destroy", "staging", "--yes"]).ok();
    assert!(p.servers().is_empty());
    assert_eq!(all_services(&cluster, "staging"), 0, "balancers included");
}

#[test]
fn a_lost_node_is_replaced_by_reconcile_and_brings_nothing_back() {
    // A cluster of its own: stopping a node would disturb the other test.
    let cluster = kiln_testcluster::Cluster::start(kiln_testcluster::Options {
        heartbeat: Duration::from_secs(1),
    })
    .unwrap();
    let _down = Down(&cluster);
    let nodes = cluster.nodes();
    let (n1, n2) = (nodes[0].id.clone(), nodes[1].id.clone());
    let port = free_port();
    let p = project(&cluster, port);
    let _destroy = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let on_n2: Vec<String> = p
        .servers()
        .iter()
        .filter(|s| s["node"] == n2.as_str())
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(on_n2.len(), 2, "spread: {:?}", p.servers());

    cluster.stop_node(1).unwrap();
    // Once the swarm has seen the node go, drift reports its servers gone.
    wait_until("the lost servers reported", || {
        let out = p.kiln(&["drift", "staging"]);
        on_n2.iter().all(|id| out.stdout.contains(id.as_str()))
            && out.stdout.contains("process is gone")
    });
    let out = p.kiln(&["reconcile", "staging", "--yes"]).ok();
    eprintln!("reconcile:\n{}\n{}", out.stdout, out.stderr);
    let servers = p.servers();
    assert_eq!(servers.len(), 4, "{servers:?}");
    assert!(
        servers.iter().all(|s| s["node"] == n1.as_str()),
        "all on the surviving node: {servers:?}"
    );
    assert!(p.ids().iter().all(|id| !on_n2.contains(id)));
    // The surviving node's balancer serves the replacements.
    http_get(&front(&cluster, 0, port)).unwrap();
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert!(history.contains("reconcile"), "{history}");

    // The node comes back with none of the lost servers.
    cluster.start_node(1).unwrap();
    wait_until("node 2 ready again", || ready_nodes(&cluster) == 2);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(services(&cluster, "staging").len(), 4);
    assert_eq!(p.servers().len(), 4);
    // Its balancer comes back with the set it had (it missed the switch):
    // drift says so, reconcile brings it up to date, and it serves.
    wait_until("node 2's balancer back", || {
        balancer_nodes(&cluster, "staging").contains(&n2)
    });
    let drift = p.kiln(&["drift", "staging"]).expect(2).stdout;
    assert!(drift.contains("serves another backend set"), "{drift}");
    let out = p.kiln(&["reconcile", "staging", "--yes"]).ok();
    assert!(out.stdout.contains("balancer"), "{}", out.stdout);
    p.kiln(&["drift", "staging"]).ok();
    http_get(&front(&cluster, 1, port)).unwrap();
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert!(history.contains("up to date"), "{history}");
}

/// Each kiln server service of `env` and its environment variables.
fn server_envs(
    cluster: &kiln_testcluster::Cluster,
    env: &str,
) -> std::collections::BTreeMap<String, Vec<String>> {
    env_services(cluster, env)
        .into_iter()
        .filter(|s| !kiln_provider_swarm::front::is_balancer(s))
        .map(|s| {
            let vars = s.spec.as_ref().map(|sp| sp.env_vars.clone());
            (s.inventory_id(), vars.unwrap_or_default())
        })
        .collect()
}

#[test]
fn a_kill_at_every_boundary_of_a_swarm_rollout_converges() {
    let cluster = kiln_testcluster::Cluster::start(Default::default()).unwrap();
    let _down = Down(&cluster);
    let port = free_port();
    let p = project(&cluster, port);
    let _destroy = Teardown(&p);
    p.write("kiln.toml", &kiln_toml(&cluster, port, 2, 0));
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let covered = crash_everywhere(
        &p,
        &["apply", "staging", "--yes"],
        |round| {
            p.write("kiln.toml", &kiln_toml(&cluster, port, 2, round));
        },
        |round| {
            // The swarm runs exactly the servers the state knows: no
            // orphan service, no duplicate, all of this round.
            let ids: BTreeSet<String> = p.ids().into_iter().collect();
            let running = server_envs(&cluster, "staging");
            assert_eq!(ids.len(), 2, "boundary {round}: {ids:?}");
            assert_eq!(
                running.keys().cloned().collect::<BTreeSet<_>>(),
                ids,
                "boundary {round}:\n{}",
                describe(&cluster, "staging")
            );
            let version = format!("VERSION={round}");
            assert!(
                running.values().all(|vars| vars.contains(&version)),
                "boundary {round}: {running:?}"
            );
            // No balancer routes to a server that is gone, none is behind.
            p.kiln(&["drift", "staging"]).ok();
            http_get(&front(&cluster, 0, port)).unwrap();
        },
    );
    assert!(covered >= 6, "boundaries covered: {covered}");

    // A lost state database: refused until `--adopt`, which takes the
    // swarm's servers back from their services' labels; nothing replaced.
    let before = p.ids();
    for f in ["state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(p.store().join(f));
    }
    std::fs::write(p.store().join("state.db"), "").unwrap();
    let refused = p.kiln(&["apply", "staging", "--yes"]).expect(1);
    assert!(refused.stderr.contains("--adopt"), "{}", refused.stderr);
    p.kiln(&["apply", "staging", "--adopt", "--yes"]).ok();
    assert_eq!(p.ids(), before, "the same servers, adopted");
    let plan = p.kiln(&["plan", "staging"]).ok().stdout;
    assert!(plan.contains("No changes"), "{plan}");
    p.kiln(&["drift", "staging"]).ok();
}
