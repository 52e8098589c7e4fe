//! ACME end to end against Pebble (Debian's `pebble`, Let's Encrypt's test
//! server), with real TLS-ALPN-01 validation: `pebble-challtestsrv`
//! answers Pebble's DNS lookups with 127.0.0.1, and Pebble validates on
//! the balancer's own TLS listener. The balancer obtains a certificate,
//! serves it, renews it under load without a failed request, and keeps
//! its account and certificate in files of mode 0600. An unreachable
//! directory is refused with the reason while the previous certificate is
//! served.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_balancer::{Acme, Front, Mode, Tls};
use support::*;

/// A child process killed (and reaped) when the test ends, whatever happens.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pebble and its DNS, on free loopback ports, validating TLS-ALPN-01 on
/// `tls_port`.
struct Pebble {
    _dns: Running,
    _pebble: Running,
    directory: String,
    management: SocketAddr,
    /// The test CA that signed Pebble's own HTTPS certificate.
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl Pebble {
    async fn start(tls_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (cert, key, _) = ca.leaf(&["127.0.0.1", "localhost"], false);
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        let (acme_port, mgmt_port, dns_port, chall_port, http_port) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
        let log = |name: &str| Stdio::from(std::fs::File::create(dir.path().join(name)).unwrap());
        let dns = Running(
            Command::new("pebble-challtestsrv")
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{chall_port}")])
                .stdout(log("dns.log"))
                .stderr(log("dns.err"))
                .spawn()
                .expect("pebble-challtestsrv is installed by scripts/setup.sh"),
        );
        let pebble = Running(
            Command::new("pebble")
                .arg("-config")
                .arg(dir.path().join("pebble.json"))
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log("pebble.log"))
                .stderr(log("pebble.err"))
                .spawn()
                .expect("pebble is installed by scripts/setup.sh"),
        );
        let p = Pebble {
            _dns: dns,
            _pebble: pebble,
            directory: format!("https://127.0.0.1:{acme_port}/dir"),
            management: format!("127.0.0.1:{mgmt_port}").parse().unwrap(),
            ca,
            dir,
        };
        for port in [acme_port, mgmt_port, dns_port] {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut up = false;
            for _ in 0..500 {
                // The DNS port is UDP; its management port says it is up.
                let probe = if port == dns_port {
                    format!("127.0.0.1:{chall_port}").parse().unwrap()
                } else {
                    addr
                };
                if tokio::net::TcpStream::connect(probe).await.is_ok() {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(up, "pebble did not start: {}", p.logs());
        }
        p
    }

    /// The root that signs the certificates Pebble issues (new each run).
    async fn issuing_root(&self) -> String {
        let client = tls_client(&self.ca.pem, &[b"http/1.1"]);
        let r = tls_get(&client, self.management, "127.0.0.1", "/roots/0")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    fn logs(&self) -> String {
        ["pebble.log", "pebble.err", "dns.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn acme_front(directory: &str, ca: &Path, renew_before_secs: u64) -> Front {
    Front {
        mode: Mode::Http,
        tls: Some(Tls::Acme(Acme {
            directory: directory.to_string(),
            email: "ops@shop.test".into(),
            domains: vec!["shop.test".into()],
            ca: Some(ca.to_path_buf()),
            renew_before_secs,
            check_interval_ms: 200,
        })),
        ..Front::default()
    }
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_obtained_served_and_renewed_from_pebble() {
    let (app, _) = named("127.0.0.1", "shop").await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let pebble = Pebble::start(listen.port()).await;
    // Renew whenever less than 100 years are left: every check renews.
    let front = acme_front(
        &pebble.directory,
        &pebble.dir.path().join("ca.pem"),
        100 * 365 * 86_400,
    );
    let lb = Balancer::start_in(tempfile::tempdir().unwrap(), listen, &[app], None, front).await;
    let mut first = None;
    for _ in 0..3000 {
        let s = lb.status();
        if let Some(t) = s.tls.filter(|t| t.loaded >= 1) {
            first = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first =
        first.unwrap_or_else(|| panic!("no certificate: {:?}\n{}", lb.status(), pebble.logs()));
    assert_eq!(first.names, vec!["shop.test".to_string()]);
    assert_eq!(first.source, "acme");

    // Served, and trusted by a client that knows Pebble's root.
    let root = pebble.issuing_root().await;
    let client = tls_client(&root, &[b"h2", b"http/1.1"]);
    let r = tls_get(&client, lb.addr, "shop.test", "/").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "shop"));

    // Renewals under load: no request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let serials = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failures, serials, client) = (
                stop.clone(),
                failures.clone(),
                serials.clone(),
                client.clone(),
            );
            let front = lb.addr;
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match tls_get(&client, front, "shop.test", "/").await {
                        Ok(r) if r.status == 200 => {
                            serials.lock().unwrap().insert(r.serial);
                        }
                        other => {
                            eprintln!("failed: {other:?}");
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    let mut renewed = false;
    for _ in 0..3000 {
        if serials.lock().unwrap().len() >= 3 {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert!(
        renewed,
        "clients saw {:?}; {:?}\n{}",
        serials.lock().unwrap(),
        lb.status(),
        pebble.logs()
    );
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    // status.json is written every 20 ms: it catches up.
    lb.wait_status(
        |s| s.tls.as_ref().is_some_and(|t| t.loaded >= 3),
        "renewals counted",
    )
    .await;

    // The account key and the certificate are the balancer's secrets.
    let store = lb.path().join("acme");
    assert_eq!(mode_of(&store), 0o700);
    for f in ["account.json", "cert.pem", "key.pem"] {
        assert_eq!(mode_of(&store.join(f)), 0o600, "{f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_directory_is_refused_and_the_previous_certificate_kept() {
    let (app, _) = named("127.0.0.1", "shop").await;
    // A certificate obtained earlier is in the state directory.
    let ca = TestCa::new();
    let (cert, key, serial) = ca.leaf(&["shop.test"], false);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("acme")).unwrap();
    std::fs::write(dir.path().join("acme/cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("acme/key.pem"), key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    // Nothing listens there; and the certificate (valid until the year
    // 4096) is due for renewal.
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let front = acme_front(
        &directory,
        &dir.path().join("ca.pem"),
        10_000 * 365 * 86_400,
    );
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let lb = Balancer::start_in(dir, listen, &[app], None, front).await;
    let s = lb
        .wait_status(
            |s| s.tls.as_ref().is_some_and(|t| t.error.is_some()),
            "the order fails",
        )
        .await;
    let t = s.tls.unwrap();
    let error = t.error.unwrap();
    assert!(error.contains(&directory), "{error}");
    assert_eq!(t.serial, serial, "the previous certificate is served");
    let client = tls_client(&ca.pem, &[b"http/1.1"]);
    let r = tls_get(&client, lb.addr, "shop.test", "/").await.unwrap();
    assert_eq!((r.status, r.serial.as_str()), (200, serial.as_str()));
}
