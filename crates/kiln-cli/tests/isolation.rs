//! Isolation on one host, end to end: environments of one project and of
//! two projects never share a subnet; a server reaches its own
//! environment, its gateway's DNS and balancer ports and what its role
//! declares in `reach`, and nothing else: not another environment's
//! servers, not a host service bound to 0.0.0.0.

mod support;

use std::net::TcpListener;
use std::process::Command;

use support::*;

/// Whether a TCP connection to `addr` succeeds from inside `server`'s
/// network namespace (what the server itself would see).
fn reaches(server: &str, addr: &str) -> bool {
    let (host, port) = addr.rsplit_once(':').unwrap();
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/kiln-{server}"))
        .args([
            "python3",
            "-c",
            &format!("import socket; socket.create_connection(('{host}', {port}), 1)"),
        ])
        .output()
        .unwrap()
        .status
        .success()
}

/// A host service on all addresses, accepting connections for the rest of
/// the test binary's life; returns its port.
fn host_service() -> u16 {
    let l = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in l.incoming() {});
    port
}

#[test]
fn environments_and_host_services_are_out_of_reach() {
    let port = host_service();
    let granted = host_service();
    let p = web_fleet(
        "10.77.70.0/24",
        2,
        "",
        &format!("reach = [\"host:{granted}\"]"),
    );
    // A second environment of the same project, on its own subnet.
    let spec = std::fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    p.write(
        "kiln.toml",
        &format!("{spec}\n[env.prod]\nsubnet = \"10.77.71.0/24\"\n[env.prod.roles.web]\nimage = \"web\"\nports = [8080]\n"),
    );
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    p.kiln(&["apply", "prod", "--yes"]).ok();
    let staging = p.ids();
    let prod = p.kiln(&["--json", "server", "list", "prod"]).ok().json();
    let prod_addr = format!("{}:8080", prod[0]["address"].as_str().unwrap());
    let peer = p.servers()[1]["address"].as_str().unwrap().to_string();
    // Within the environment: yes.
    assert!(reaches(&staging[0], &format!("{peer}:8080")));
    // Another environment's server: no.
    assert!(!reaches(&staging[0], &prod_addr), "staging reached prod");
    // A host service on 0.0.0.0, through the gateway: no; the declared one: yes.
    assert!(
        !reaches(&staging[0], &format!("10.77.70.1:{port}")),
        "host service exposed"
    );
    assert!(
        reaches(&staging[0], &format!("10.77.70.1:{granted}")),
        "declared reach refused"
    );
    // The host still reaches every server (health checks, balancers).
    assert!(std::net::TcpStream::connect(&prod_addr).is_ok());
    p.kiln(&["destroy", "prod", "--yes"]).ok();
}

#[test]
fn overlapping_subnets_are_refused_naming_both() {
    let a = web_fleet("10.77.72.0/24", 1, "", "");
    let _ta = Teardown(&a);
    a.kiln(&["apply", "staging", "--yes"]).ok();
    // Another project on the same host declares an overlapping subnet.
    let b = web_fleet("10.77.72.0/23", 1, "", "");
    let refused = b.kiln(&["plan", "staging"]).expect(1);
    assert!(
        refused
            .stderr
            .contains("subnet 10.77.72.0/23 of `staging` is in use by kiln environment")
            && refused
                .stderr
                .contains(&a.store().canonicalize().unwrap().display().to_string()),
        "{}",
        refused.stderr
    );
    // Without a declared subnet, two projects' environments never collide.
    let c = web_fleet("10.77.74.0/24", 1, "", "");
    let spec = std::fs::read_to_string(c.path().join("kiln.toml"))
        .unwrap()
        .replace("subnet = \"10.77.74.0/24\"", "");
    c.write("kiln.toml", &spec);
    let _tc = Teardown(&c);
    c.kiln(&["apply", "staging", "--yes"]).ok();
    let d = web_fleet("10.77.75.0/24", 1, "", "");
    d.write("kiln.toml", &spec);
    let _td = Teardown(&d);
    d.kiln(&["apply", "staging", "--yes"]).ok();
    let subnet = |p: &Project| {
        let plan = p.kiln(&["--json", "plan", "staging"]).ok().json();
        plan["target"]["subnet"].as_str().unwrap().to_string()
    };
    assert_ne!(subnet(&c), subnet(&d), "same names, different subnets");
    assert!(p_serves(&c) && p_serves(&d));
}

fn p_serves(p: &Project) -> bool {
    let s = p.servers();
    let addr = format!("{}:8080", s[0]["address"].as_str().unwrap());
    std::net::TcpStream::connect(addr).is_ok()
}

#[test]
fn inherited_environments_get_their_own_subnets() {
    let p = web_fleet("10.77.76.0/24", 1, "", "");
    let spec = std::fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    p.write(
        "kiln.toml",
        &format!("{spec}\n[env.production]\ninherit = \"staging\"\n"),
    );
    let plan = |env: &str| {
        let plan = p.kiln(&["--json", "plan", env]).ok().json();
        plan["target"]["subnet"].as_str().unwrap().to_string()
    };
    assert_eq!(plan("staging"), "10.77.76.0/24");
    assert_ne!(plan("production"), "10.77.76.0/24");
}
