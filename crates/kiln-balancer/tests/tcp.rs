//! TCP mode (the default for non-HTTP roles): health checks move backends
//! in and out of rotation, every-backend-down fails open, and the first
//! response of each connection is counted by status class.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kiln_balancer::{Check, Front, Probe};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.0 backend on `ip:port` that answers every request with
/// `name`, with status 500 while `sick` is set, and closes.
async fn backend10(ip: &str, port: u16, name: &'static str, sick: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind((ip, port)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let sick = sick.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let status = if sick.load(Ordering::SeqCst) {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.0 {status}\r\nContent-Length: {}\r\n\r\n{name}",
                            name.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

async fn get10(front: SocketAddr) -> String {
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backends_leave_rotation_and_come_back() {
    let (a_sick, b_sick) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    // Two "servers" on one port at two loopback addresses, like a role's
    // servers on the bridge.
    let a = backend10("127.0.0.2", 0, "a", a_sick.clone()).await;
    let b = backend10("127.0.0.3", a.port(), "b", b_sick.clone()).await;
    let check = Check {
        probe: Probe::Http {
            path: "/healthz".into(),
            port: a.port(),
        },
        interval_ms: 20,
        fall: 2,
        rise: 2,
    };
    let lb = Balancer::start(&[a, b], Some(check), Front::default()).await;
    let healthy = |addr: SocketAddr, up: bool| {
        move |s: &kiln_balancer::Status| {
            s.backends
                .iter()
                .any(|x| x.addr == addr.to_string() && x.healthy == up)
        }
    };
    lb.wait_status(healthy(b, true), "b healthy").await;

    // `b` fails its checks: out of rotation, every request goes to `a`.
    b_sick.store(true, Ordering::SeqCst);
    lb.wait_status(healthy(b, false), "b down").await;
    for _ in 0..20 {
        let reply = get10(lb.addr).await;
        assert!(
            reply.starts_with("HTTP/1.0 200") && reply.ends_with("\r\n\r\na"),
            "{reply:?}"
        );
    }
    assert!(lb.backend(b).checks_failed >= 2);

    // Both fail: the balancer fails open instead of refusing everyone.
    a_sick.store(true, Ordering::SeqCst);
    lb.wait_status(healthy(a, false), "a down").await;
    for _ in 0..4 {
        assert!(get10(lb.addr).await.starts_with("HTTP/1.0 500"));
    }

    // `b` recovers: back in rotation after `rise` passing checks.
    b_sick.store(false, Ordering::SeqCst);
    lb.wait_status(healthy(b, true), "b back").await;
    for _ in 0..20 {
        assert!(get10(lb.addr).await.ends_with("\r\n\r\nb"));
    }
    let status = lb.status();
    assert!(status.failed_open >= 4, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_responses_are_counted_by_class_per_backend() {
    let sick = Arc::new(AtomicBool::new(true));
    let b = backend10("127.0.0.4", 0, "b", sick.clone()).await;
    let lb = Balancer::start(&[b], None, Front::default()).await;
    // Relayed untouched, and counted.
    for _ in 0..5 {
        assert!(get10(lb.addr)
            .await
            .starts_with("HTTP/1.0 500 Internal Server Error\r\n"));
    }
    sick.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        assert!(get10(lb.addr).await.ends_with("\r\n\r\nb"));
    }
    let s = lb
        .wait_status(
            |s| {
                s.backends
                    .first()
                    .is_some_and(|x| x.total == 8 && x.responses_5xx == 5)
            },
            "8 connections, 5 server errors",
        )
        .await;
    assert_eq!(s.backends[0].responses_2xx, 3);
    assert_eq!(s.mode, kiln_balancer::Mode::Tcp);
}
