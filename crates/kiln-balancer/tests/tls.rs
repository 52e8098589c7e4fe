//! TLS termination with certificates of a test CA: HTTP/1.1 and HTTP/2
//! over ALPN (hyper's client and curl), new certificate files picked up
//! under load without a failed request, and bad certificates refused with
//! the previous one kept.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_balancer::{Front, Mode, Tls};
use support::*;

/// Certificate files of the test CA for `localhost`, and a front using them.
struct Pki {
    ca: TestCa,
    dir: tempfile::TempDir,
    serial: String,
}

impl Pki {
    fn new() -> Pki {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, serial) = ca.leaf(&["localhost"], false);
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        replace(&dir.path().join("cert.pem"), &cert);
        replace(&dir.path().join("key.pem"), &key);
        Pki { ca, dir, serial }
    }

    fn front(&self, mode: Mode) -> Front {
        Front {
            mode,
            tls: Some(Tls::Files {
                cert: self.dir.path().join("cert.pem"),
                key: self.dir.path().join("key.pem"),
            }),
            ..Front::default()
        }
    }

    /// Installs a new pair of files: key first, then certificate.
    fn write(&self, cert: &str, key: &str) {
        replace(&self.dir.path().join("key.pem"), key);
        replace(&self.dir.path().join("cert.pem"), cert);
    }
}

async fn echo_proto() -> std::net::SocketAddr {
    backend(
        "127.0.0.1",
        0,
        handler(|p, _| async move {
            let proto = p
                .headers
                .get("x-forwarded-proto")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (200, format!("proto={proto}"))
        }),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_test_ca_serves_http1_and_http2_over_alpn() {
    let pki = Pki::new();
    let lb = Balancer::start(&[echo_proto().await], None, pki.front(Mode::Http)).await;
    let s = lb
        .wait_status(
            |s| s.tls.as_ref().is_some_and(|t| t.loaded == 1),
            "certificate served",
        )
        .await;
    let t = s.tls.unwrap();
    assert_eq!(
        (t.serial.as_str(), t.names.as_slice()),
        (pki.serial.as_str(), &["localhost".to_string()][..])
    );
    assert!(t.error.is_none());

    let h1 = tls_client(&pki.ca.pem, &[b"http/1.1"]);
    let r = tls_get(&h1, lb.addr, "localhost", "/").await.unwrap();
    assert_eq!(
        (r.status, r.body.as_str(), r.version),
        (200, "proto=https", hyper::Version::HTTP_11)
    );

    let h2 = tls_client(&pki.ca.pem, &[b"h2", b"http/1.1"]);
    let r = tls_get(&h2, lb.addr, "localhost", "/").await.unwrap();
    assert_eq!(
        (r.status, r.body.as_str(), r.version),
        (200, "proto=https", hyper::Version::HTTP_2)
    );

    // A client that does not trust the test CA fails its handshake.
    let other = TestCa::new();
    let stranger = tls_client(&other.pem, &[b"http/1.1"]);
    assert!(tls_get(&stranger, lb.addr, "localhost", "/").await.is_err());

    // curl, a client that is not ours, negotiates HTTP/2 too.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "--cacert"])
        .arg(pki.dir.path().join("ca.pem"))
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", lb.addr.port()))
        .args(["-w", " http=%{http_version}"])
        .arg(format!("https://localhost:{}/", lb.addr.port()))
        .output()
        .await
        .expect("curl is installed by scripts/setup.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "proto=https http=2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_certificate_files_are_served_under_load_without_a_failed_request() {
    let pki = Pki::new();
    let lb = Balancer::start(&[echo_proto().await], None, pki.front(Mode::Http)).await;
    lb.wait_status(
        |s| s.tls.as_ref().is_some_and(|t| t.loaded == 1),
        "first certificate",
    )
    .await;
    let front = lb.addr;

    // A keep-alive connection opened before the reload.
    let connector = tls_client(&pki.ca.pem, &[b"h2"]);
    let tcp = tokio::net::TcpStream::connect(front).await.unwrap();
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut long_lived, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);

    // Load: new connections (new handshakes) all along.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let serials = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let (stop, failures, serials) = (stop.clone(), failures.clone(), serials.clone());
            let connector = tls_client(
                &pki.ca.pem,
                if i % 2 == 0 { &[b"h2"] } else { &[b"http/1.1"] },
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match tls_get(&connector, front, "localhost", "/").await {
                        Ok(r) if r.status == 200 => {
                            *serials.lock().unwrap().entry(r.serial).or_default() += 1;
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
    lb.wait_status(|s| s.backends[0].total >= 20, "load running")
        .await;

    let (cert, key, new_serial) = pki.ca.leaf(&["localhost"], false);
    pki.write(&cert, &key);
    lb.wait_status(
        |s| s.tls.as_ref().is_some_and(|t| t.serial == new_serial),
        "new certificate served",
    )
    .await;
    // Keep the load on until clients have seen the new certificate.
    for _ in 0..500 {
        if serials
            .lock()
            .unwrap()
            .get(&new_serial)
            .copied()
            .unwrap_or(0)
            >= 20
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let seen = serials.lock().unwrap().clone();
    assert_eq!(failures.load(Ordering::SeqCst), 0, "{seen:?}");
    assert!(seen.get(&pki.serial).copied().unwrap_or(0) > 0, "{seen:?}");
    assert!(
        seen.get(&new_serial).copied().unwrap_or(0) >= 20,
        "{seen:?}"
    );

    // The connection opened before the reload was not dropped.
    let req = hyper::Request::builder()
        .uri("https://localhost/")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = long_lived.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_refused_and_the_previous_one_is_kept() {
    let pki = Pki::new();
    let lb = Balancer::start(&[echo_proto().await], None, pki.front(Mode::Http)).await;
    lb.wait_status(
        |s| s.tls.as_ref().is_some_and(|t| t.loaded == 1),
        "first certificate",
    )
    .await;
    let client = tls_client(&pki.ca.pem, &[b"http/1.1"]);
    let refused = |what: &'static str| {
        move |s: &kiln_balancer::Status| {
            s.tls
                .as_ref()
                .is_some_and(|t| t.error.as_deref().is_some_and(|e| e.contains(what)))
        }
    };

    // A certificate with another certificate's key.
    let (cert2, _, _) = pki.ca.leaf(&["localhost"], false);
    let (_, key3, _) = pki.ca.leaf(&["localhost"], false);
    pki.write(&cert2, &key3);
    let s = lb
        .wait_status(refused("do not match"), "mismatch refused")
        .await;
    assert_eq!(s.tls.unwrap().serial, pki.serial);
    let r = tls_get(&client, lb.addr, "localhost", "/").await.unwrap();
    assert_eq!((r.status, r.serial.as_str()), (200, pki.serial.as_str()));

    // An expired certificate.
    let (old, old_key, _) = pki.ca.leaf(&["localhost"], true);
    pki.write(&old, &old_key);
    let s = lb.wait_status(refused("expired"), "expired refused").await;
    assert_eq!(s.tls.unwrap().serial, pki.serial);
    let r = tls_get(&client, lb.addr, "localhost", "/").await.unwrap();
    assert_eq!(r.serial, pki.serial);

    // Not a certificate at all.
    pki.write("garbage", "more garbage");
    lb.wait_status(refused("no PEM certificate"), "garbage refused")
        .await;
    assert_eq!(
        tls_get(&client, lb.addr, "localhost", "/")
            .await
            .unwrap()
            .serial,
        pki.serial
    );

    // A good pair again: served, error cleared.
    let (cert4, key4, serial4) = pki.ca.leaf(&["localhost"], false);
    pki.write(&cert4, &key4);
    let s = lb
        .wait_status(
            |s| {
                s.tls
                    .as_ref()
                    .is_some_and(|t| t.serial == serial4 && t.error.is_none())
            },
            "good pair served",
        )
        .await;
    assert_eq!(s.tls.unwrap().loaded, 2);
    assert_eq!(
        tls_get(&client, lb.addr, "localhost", "/")
            .await
            .unwrap()
            .serial,
        serial4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_terminates_tls_too() {
    let pki = Pki::new();
    let lb = Balancer::start(&[echo_proto().await], None, pki.front(Mode::Tcp)).await;
    lb.wait_status(
        |s| s.tls.as_ref().is_some_and(|t| t.loaded == 1),
        "certificate served",
    )
    .await;
    // No ALPN in TCP mode: the client speaks HTTP/1.1 through the tunnel.
    let client = tls_client(&pki.ca.pem, &[]);
    let r = tls_get(&client, lb.addr, "localhost", "/").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "proto="));
}
