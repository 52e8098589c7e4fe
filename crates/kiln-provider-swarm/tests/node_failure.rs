//! A node going down, on a cluster of its own (stopping a node would
//! disturb the other tests' shared cluster): what Swarm reports for the
//! servers it ran, how fast, and that a node coming back brings back no
//! server kiln has removed meanwhile.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kiln_provider_swarm::server::LABEL_ENV;
use kiln_provider_swarm::{
    Cluster, Endpoint, NodeEngine, NodeHealth, Registry, RegistryOptions, Restart, TaskPhase,
};
use kiln_testcluster::{Cluster as TestCluster, Options};
use support::*;

const WAIT: Duration = Duration::from_secs(90);

#[test]
fn a_stopped_node_takes_its_servers_down_and_brings_none_back() {
    let tc = TestCluster::start(Options {
        heartbeat: Duration::from_secs(1),
    })
    .unwrap();
    let img = web_image();
    let reg = Registry::new(
        &format!("{}/swarmtest/web", tc.registry()),
        RegistryOptions {
            insecure: true,
            ..Default::default()
        },
    )
    .unwrap();
    let nodes = tc.nodes();
    let n2 = nodes[1].id.clone();
    rt().block_on(async {
        let image = reg.push(&img.store, &img.digest).await.unwrap().reference;
        let c = Cluster::connect(&Endpoint::new(tc.manager_endpoint()))
            .await
            .unwrap();
        // Three servers on node 2: pinned (as for a volume), free with
        // restart none (kiln's default), free with restart on-failure. The
        // free ones land on node 2 because node 1 is paused meanwhile.
        let mut pinned = spec("nf", "pinned", &image, 31101);
        pinned.node = Some(n2.clone());
        let free = spec("nf", "free", &image, 31102);
        let mut restarting = spec("nf", "restarting", &image, 31103);
        restarting.restart = Restart::OnFailure { max_attempts: 3 };
        set_availability(&c, &nodes[0].id, bollard::models::NodeSpecAvailabilityEnum::PAUSE).await;
        for s in [&pinned, &free, &restarting] {
            c.create_server(s).await.unwrap();
        }
        for s in [&pinned, &free, &restarting] {
            let up = c.wait_running("nf", &s.server, WAIT).await.unwrap();
            assert_eq!(up.current().unwrap().node_id, n2);
        }
        set_availability(&c, &nodes[0].id, bollard::models::NodeSpecAvailabilityEnum::ACTIVE).await;

        let t0 = Instant::now();
        tc.stop_node(1).unwrap();
        let stopped = t0.elapsed();
        // Swarm notices after missed heartbeats.
        let mut node_down = None;
        let mut not_alive = None;
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            let health = c
                .nodes()
                .await
                .unwrap()
                .into_iter()
                .find(|n| n.id == n2)
                .unwrap()
                .health;
            if health != NodeHealth::Ready && node_down.is_none() {
                node_down = Some(t0.elapsed());
            }
            let servers = c.servers(Some("nf")).await.unwrap();
            let report: Vec<String> = servers
                .iter()
                .map(|s| {
                    let Some(t) = s.current() else {
                        return format!("{}: no task", s.service_name);
                    };
                    format!(
                        "{}: {:?}/{:?} on {} ({} tasks)",
                        s.service_name,
                        t.phase,
                        t.desired,
                        t.node_id.get(..6).unwrap_or("(unassigned)"),
                        s.tasks.len()
                    )
                })
                .collect();
            let line = format!("{health:?} {report:?}");
            if line != last {
                eprintln!("{:>6.2}s {line}", t0.elapsed().as_secs_f64());
                last = line;
            }
            if servers.iter().all(|s| !s.alive()) && not_alive.is_none() {
                not_alive = Some(t0.elapsed());
            }
            // Watch a while longer: whatever Swarm does on its own, it does by then.
            if node_down.is_some() && not_alive.is_some() && t0.elapsed() > Duration::from_secs(15) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "dockerd stopped in {stopped:?}; node seen down after {node_down:?}; no server alive after {not_alive:?}"
        );
        assert!(node_down.is_some(), "node 2 never seen down");
        assert!(not_alive.is_some(), "servers of node 2 still seen alive");
        // What Swarm did with each, once the node was down.
        for s in c.servers(Some("nf")).await.unwrap() {
            let tasks: Vec<String> = s
                .tasks
                .iter()
                .map(|t| format!("{:?}/{:?} on {} ({})", t.phase, t.desired, t.node_id.get(..6).unwrap_or("(unassigned)"), t.message))
                .collect();
            eprintln!("{}: {tasks:?}", s.service_name);
            match s.service_name.as_str() {
                // Restart none (pinned or not): Swarm shuts the lost task
                // down and starts no other; replacing it is kiln's call.
                "kiln-nf-pinned" | "kiln-nf-free" => {
                    assert!(!s.alive(), "{s:?}");
                    assert_eq!(s.tasks.len(), 1, "{s:?}");
                    assert_eq!(s.tasks[0].desired, TaskPhase::Shutdown, "{s:?}");
                }
                // Restart on-failure: Swarm reschedules on the surviving node.
                _ => {
                    // Its node is asserted once it runs (below): the new
                    // task may not be assigned to a node yet.
                    let t = s.current().unwrap();
                    assert_eq!(t.desired, TaskPhase::Running, "{s:?}");
                }
            }
        }
        let moved = c.wait_running("nf", "restarting", WAIT).await.unwrap();
        eprintln!("on-failure server running again on node 1 after {:?}", t0.elapsed());
        assert_eq!(moved.current().unwrap().node_id, nodes[0].id);

        // kiln replaces the lost servers: it removes them (their node is
        // down, so the swarm cannot confirm their tasks' end yet).
        for s in [&pinned, &free, &restarting] {
            let _ = c.remove_server("nf", &s.server, Duration::from_secs(2)).await;
        }
        let t1 = Instant::now();
        tokio::task::block_in_place(|| tc.start_node(1)).unwrap();
        wait_for_async(|| async {
            c.nodes()
                .await
                .unwrap()
                .iter()
                .all(|n| n.health == NodeHealth::Ready)
        })
        .await;
        eprintln!("node 2 ready again after {:?}", t1.elapsed());
        // The node comes back with none of them: no container of env nf runs there.
        let e = NodeEngine::connect(&Endpoint::new(&nodes[1].endpoint))
            .await
            .unwrap();
        let gone = wait_for_async(|| async {
            let filters =
                HashMap::from([("label".to_string(), vec![format!("{LABEL_ENV}=nf")])]);
            e.engine()
                .docker()
                .list_containers(Some(bollard::query_parameters::ListContainersOptions {
                    all: false,
                    filters: Some(filters),
                    ..Default::default()
                }))
                .await
                .map(|l| l.is_empty())
                .unwrap_or(false)
        })
        .await;
        assert!(gone, "stale servers run again on the node that came back");
        assert!(c.servers(Some("nf")).await.unwrap().is_empty());
    });
    let t = tc.teardown();
    assert!(t.leftovers.is_empty(), "{:?}", t.leftovers);
}

async fn wait_for_async<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn set_availability(c: &Cluster, id: &str, a: bollard::models::NodeSpecAvailabilityEnum) {
    let d = c.engine().docker();
    let n = d.inspect_node(id).await.unwrap();
    let mut spec = n.spec.unwrap();
    spec.availability = Some(a);
    d.update_node(
        id,
        spec,
        bollard::query_parameters::UpdateNodeOptions {
            version: n.version.unwrap().index.unwrap() as i64,
        },
    )
    .await
    .unwrap();
}
