//! The test cluster itself: it starts, both nodes are in the swarm and
//! reach the registry, and teardown leaves nothing behind.

use std::process::Command;

use kiln_testcluster::{leftovers, Cluster, Options};

#[test]
fn starts_a_two_node_swarm_and_leaves_nothing_behind() {
    assert!(!docker_on_host(), "a dockerd already runs on the host");
    let c = Cluster::start(Options::default()).expect("cluster starts");
    let t = c.timings();
    eprintln!("started: {t:?}");
    let nodes = c.nodes();
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().all(|n| !n.id.is_empty()), "{nodes:?}");
    // The registry answers from inside both nodes' namespaces.
    for i in 0..2 {
        let out = c
            .in_node(
                i,
                Command::new("curl").args([
                    "-sf",
                    "-m",
                    "5",
                    &format!("http://{}/v2/", c.registry()),
                ]),
            )
            .unwrap();
        assert!(out.status.success(), "node {i}: {out:?}");
    }
    // The daemons changed their own namespaces' firewall, not the host's
    // (compared by Docker's chains: other programs on this host may change
    // other rules meanwhile).
    assert!(!docker_on_host());
    let inside = c
        .in_node(0, Command::new("iptables").args(["-S", "FORWARD"]))
        .unwrap();
    assert!(
        String::from_utf8_lossy(&inside.stdout).contains("-P FORWARD DROP"),
        "{inside:?}"
    );
    let slot = c.slot();
    let report = c.teardown();
    eprintln!("teardown: {report:?}");
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
    assert!(leftovers(slot).is_empty());
    assert!(!report.firewall_restored);
    assert!(!docker_on_host());
    // Idempotent.
    assert!(c.teardown().leftovers.is_empty());
}

/// Whether the host's firewall has Docker's chains.
fn docker_on_host() -> bool {
    let out = Command::new("iptables-save").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with(":DOCKER"))
}
