//! Discovery by name, end to end: each environment's DNS server answers a
//! role's servers in rotation under `ROLE` and `ROLE.ENV`, each server
//! under its id, and forwards the rest; a client that resolves the role's
//! name before every request loses nothing during a rolling rollout.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 80, 1);

fn resolve(name: &str) -> Vec<Ipv4Addr> {
    let dns = SocketAddr::from((GATEWAY, 53));
    kiln_dns::query(dns, name, Duration::from_secs(2))
        .map(|a| {
            a.addresses
                .into_iter()
                .filter_map(|a| match a {
                    std::net::IpAddr::V4(v4) => Some(v4),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One HTTP/1.0 GET of `/` at `addr:8080`; the body.
fn get(addr: Ipv4Addr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &SocketAddr::from((addr, 8080)),
        Duration::from_secs(2),
    )
    .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.split_whitespace().nth(1) == Some("200") => Ok(body.to_string()),
        _ => Err(format!("{addr}: {}", out.lines().next().unwrap_or(""))),
    }
}

#[test]
fn names_follow_the_rotation_and_a_resolving_client_loses_nothing() {
    let p = web_fleet("10.77.80.0/24", 3, "dns = { ttl = \"1s\" }", "");
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let servers = p.servers();
    let mut want: Vec<Ipv4Addr> = servers
        .iter()
        .map(|s| s["address"].as_str().unwrap().parse().unwrap())
        .collect();
    want.sort();
    let mut got = resolve("web");
    got.sort();
    assert_eq!(got, want);
    let mut full = resolve("WEB.staging.");
    full.sort();
    assert_eq!(full, want, "ROLE.ENV, in any case, with the final dot");
    let id = servers[0]["id"].as_str().unwrap();
    assert_eq!(
        resolve(id),
        vec![want
            .iter()
            .copied()
            .find(|a| a.to_string() == servers[0]["address"].as_str().unwrap())
            .unwrap()]
    );
    let cli = p.kiln(&["--json", "dns", "staging", "web"]).ok().json();
    assert_eq!(cli["addresses"].as_array().unwrap().len(), 3);
    assert_eq!(cli["local"], true);
    assert!(servers[0]["names"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n == "web.staging"));
    // An unknown name is answered (forwarded or NXDOMAIN), never a hang.
    let unknown = p.kiln(&["dns", "staging", "no-such-role.invalid"]);
    assert_eq!(unknown.code, 2, "{}", unknown.stdout);

    // Steady load from a client that resolves `web` before every request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, ok, failed, errors) =
                (stop.clone(), ok.clone(), failed.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let addrs = resolve("web");
                    n += 1;
                    let result = match addrs.get(n % addrs.len().max(1)) {
                        Some(a) => get(*a),
                        None => Err("`web` resolved to nothing".into()),
                    };
                    match result {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    wait_until("the client's first answers", || {
        ok.load(Ordering::Relaxed) > 20
    });
    p.write("images/web/files/srv/www/index.html", "v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let served = ok.load(Ordering::Relaxed);
    wait_until("more answers after the rollout", || {
        ok.load(Ordering::Relaxed) > served + 20
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests: {:?}",
        errors.lock().unwrap()
    );
    // Only the new servers are named now.
    let mut now = resolve("web");
    now.sort();
    let mut want: Vec<Ipv4Addr> = p
        .servers()
        .iter()
        .map(|s| s["address"].as_str().unwrap().parse().unwrap())
        .collect();
    want.sort();
    assert_eq!(now, want);
    assert!(get(now[0]).unwrap().contains("v2"));
}
