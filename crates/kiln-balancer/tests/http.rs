//! HTTP mode against real backends on loopback: keep-alive, retries,
//! counting, draining, forwarding headers, 503 and malformed requests.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_balancer::{Algorithm, Check, Front, Mode, Probe};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Reads from `s` up to the end of a message head (`\r\n\r\n`); `None` if
/// the connection ends or fails first.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// The canary gate's error rate for one backend, as the local provider
/// computes it from status.json: failures / attempts.
fn error_rate(b: &kiln_balancer::BackendStatus) -> f64 {
    let attempts = b.total + b.errors;
    (b.errors + b.responses_5xx) as f64 / attempts.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_reused_on_both_sides() {
    let (a, seen) = named("127.0.0.1", "a").await;
    let lb = Balancer::start(&[a], None, http_front()).await;
    let mut c = connect(lb.addr).await;
    for _ in 0..20 {
        let (status, body, _) = call(&mut c, "GET", "/", "").await;
        assert_eq!((status, body.as_str()), (200, "a"));
    }
    // One client connection carried all 20; the pooled backend connection
    // was reused too.
    assert_eq!(seen.requests(), 20);
    assert_eq!(seen.connections(), 1, "backend connections");
    let status = lb
        .wait_status(
            |s| s.backends.first().is_some_and(|b| b.total == 20),
            "20 responses",
        )
        .await;
    assert_eq!(status.connections, 1, "{status:?}");
    assert_eq!(status.backends[0].responses_2xx, 20);
}

/// A backend that accepts connections, reads a request and resets the
/// connection without answering.
async fn resetting(ip: &str, read_body: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Read the head (and the body if asked) before resetting.
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        if !read_body || got.len() >= end + 4 + 4 {
                            break;
                        }
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                // SO_LINGER 0: close with a reset, not a FIN.
                let _ = socket2_linger(&s);
                drop(s);
            });
        }
    });
    (addr, hits)
}

/// Makes the next close of `s` a reset.
fn socket2_linger(s: &tokio::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized struct.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_is_retried_after_a_reset() {
    let (bad, resets) = resetting("127.0.0.1", false).await;
    let (good, seen) = named("127.0.0.1", "good").await;
    let lb = Balancer::start(&[bad, good], None, http_front()).await;
    for _ in 0..10 {
        let (status, body, _) = get(lb.addr, "/").await;
        assert_eq!((status, body.as_str()), (200, "good"));
    }
    assert!(
        resets.load(Ordering::SeqCst) >= 1,
        "the resetting backend was tried"
    );
    assert_eq!(seen.requests(), 10);
    let b = lb
        .wait_status(
            |s| {
                s.backends
                    .iter()
                    .any(|b| b.addr == bad.to_string() && b.retries >= 1)
            },
            "retries counted",
        )
        .await;
    let bad = b
        .backends
        .iter()
        .find(|b| b.addr == bad.to_string())
        .unwrap();
    assert_eq!(bad.errors, bad.retries, "{bad:?}");
    assert_eq!(bad.total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_whose_body_was_sent_is_not_retried() {
    let (bad, resets) = resetting("127.0.0.1", true).await;
    let (good, seen) = named("127.0.0.1", "good").await;
    // A fresh balancer sends its first request to the first backend.
    let lb = Balancer::start(&[bad, good], None, http_front()).await;
    let mut c = connect(lb.addr).await;
    let (status, _, _) = call(&mut c, "POST", "/orders", "pay!").await;
    assert_eq!(status, 502, "a failed POST is answered, not repeated");
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    assert_eq!(seen.requests(), 0, "the POST never reached another backend");
    let s = lb
        .wait_status(
            |s| s.backends.iter().any(|b| b.errors == 1),
            "error counted",
        )
        .await;
    let b = s
        .backends
        .iter()
        .find(|b| b.addr == bad.to_string())
        .unwrap();
    assert_eq!((b.errors, b.retries), (1, 0), "{b:?}");
    // A GET on the same connection still works (and goes to `good`, or
    // is retried there).
    let (status, body, _) = call(&mut c, "GET", "/", "").await;
    assert_eq!((status, body.as_str()), (200, "good"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_on_the_second_request_of_a_connection_fails_the_canary_gate() {
    let (canary, _) = backend(
        "127.0.0.1",
        0,
        handler(|p, _| async move {
            if p.uri.path() == "/fail" {
                (500, "boom".into())
            } else {
                (200, "ok".into())
            }
        }),
    )
    .await;
    let lb = Balancer::start(&[canary], None, http_front()).await;
    let mut c = connect(lb.addr).await;
    assert_eq!(call(&mut c, "GET", "/", "").await.0, 200);
    assert_eq!(call(&mut c, "GET", "/fail", "").await.0, 500);
    let s = lb
        .wait_status(|s| s.backends[0].total == 2, "two responses counted")
        .await;
    let b = &s.backends[0];
    assert_eq!((b.responses_2xx, b.responses_5xx, b.errors), (1, 1, 0));
    // The gate sees one failure in two attempts: above any sane limit.
    assert!(error_rate(b) > 0.05, "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_finishes_during_a_drain() {
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let (old, _) = backend(
        "127.0.0.1",
        0,
        handler(move |_, _| {
            let r = r.clone();
            async move {
                r.notified().await;
                (200, "slow and complete".into())
            }
        }),
    )
    .await;
    let (new, new_seen) = named("127.0.0.1", "new").await;
    let lb = Balancer::start(&[old], None, http_front()).await;
    let front = lb.addr;
    let slow = tokio::spawn(async move { get(front, "/report").await });
    lb.wait_status(|s| s.backends[0].in_flight == 1, "request in flight")
        .await;

    // Switch away from `old` while its request runs: new requests go to
    // `new`, and `old` is not drained until its request is done.
    lb.switch(&[new]).await;
    assert_eq!(get(lb.addr, "/").await.1, "new");
    assert_eq!(new_seen.requests(), 1);
    let dir = lb.path().to_path_buf();
    let drained = tokio::task::spawn_blocking(move || {
        kiln_balancer::wait_drained(&dir, &old.to_string(), Duration::from_secs(20))
    });
    // Still in flight (the backend has not answered): not drained.
    lb.wait_status(|s| s.seq > 5, "a few more status writes")
        .await;
    let s = lb.status();
    let o = s
        .backends
        .iter()
        .find(|b| b.addr == old.to_string())
        .unwrap();
    assert!(!o.active && o.open == 1, "{o:?}");
    assert!(!drained.is_finished());
    release.notify_one();
    let (status, body, _) = slow.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slow and complete"));
    assert!(
        drained.await.unwrap(),
        "drained once the response was relayed"
    );
    let s = lb.status();
    assert!(s
        .backends
        .iter()
        .all(|b| b.addr != old.to_string() || b.open == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_added() {
    let (echo, _) = backend(
        "127.0.0.1",
        0,
        handler(|p, _| async move {
            let h = |n: &str| {
                p.headers
                    .get_all(n)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join("|")
            };
            (
                200,
                format!(
                    "xff={} proto={} fwd={} host={} conn={}",
                    h("x-forwarded-for"),
                    h("x-forwarded-proto"),
                    h("forwarded"),
                    h("host"),
                    h("connection")
                ),
            )
        }),
    )
    .await;
    let lb = Balancer::start(&[echo], None, http_front()).await;
    let reply = raw(
        lb.addr,
        b"GET / HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 10.1.2.3\r\nConnection: close, x-secret\r\nX-Secret: hop\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.ends_with(
            "xff=10.1.2.3, 127.0.0.1 proto=http fwd=for=127.0.0.1;proto=http host=shop.test conn="
        ),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_down_is_a_503_with_retry_after() {
    // Nothing listens on this port of either address.
    let port = free_port();
    let dead: Vec<SocketAddr> = ["127.0.0.5", "127.0.0.6"]
        .iter()
        .map(|ip| format!("{ip}:{port}").parse().unwrap())
        .collect();
    let lb = Balancer::start(&dead, None, http_front()).await;
    let (status, _, headers) = get(lb.addr, "/").await;
    assert_eq!(status, 503);
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    let s = lb
        .wait_status(
            |s| s.backends.iter().all(|b| b.errors >= 1),
            "connect errors",
        )
        .await;
    assert_eq!(s.rejected, 1);

    // Failing their health checks: 503 without trying them (no fail-open
    // in HTTP mode).
    let check = Check {
        probe: Probe::Tcp { port },
        interval_ms: 20,
        fall: 1,
        rise: 1,
    };
    let lb = Balancer::start(&dead, Some(check), http_front()).await;
    lb.wait_status(|s| s.backends.iter().all(|b| !b.healthy), "all down")
        .await;
    let (status, _, headers) = get(lb.addr, "/").await;
    assert_eq!((status, headers.contains_key("retry-after")), (503, true));
    assert!(lb.status().backends.iter().all(|b| b.errors == 0));

    // No backend at all.
    let lb = Balancer::start(&[], None, http_front()).await;
    assert_eq!(get(lb.addr, "/").await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_avoids_the_busy_backend() {
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let (busy, busy_seen) = backend(
        "127.0.0.1",
        0,
        handler(move |_, _| {
            let r = r.clone();
            async move {
                r.notified().await;
                (200, "busy".into())
            }
        }),
    )
    .await;
    let (idle, _) = named("127.0.0.1", "idle").await;
    let front = Front {
        mode: Mode::Http,
        algorithm: Algorithm::LeastRequests,
        ..Front::default()
    };
    let lb = Balancer::start(&[busy, idle], None, front).await;
    let addr = lb.addr;
    // Until one request is stuck on `busy`, requests may land anywhere.
    let mut stuck = Vec::new();
    for _ in 0..50 {
        if busy_seen.requests() >= 1 {
            break;
        }
        stuck.push(tokio::spawn(async move { get(addr, "/").await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(busy_seen.requests() >= 1);
    lb.wait_status(
        |s| {
            s.backends
                .iter()
                .any(|b| b.addr == busy.to_string() && b.in_flight >= 1)
        },
        "busy has a request in flight",
    )
    .await;
    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.1, "idle");
    }
    release.notify_waiters();
    for _ in 0..100 {
        release.notify_waiters();
        if stuck.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `req` raw; the balancer must answer `status` and close.
async fn refused(front: SocketAddr, req: &[u8], status: &str) {
    let reply = raw(front, req).await;
    assert!(
        reply.starts_with(&format!("HTTP/1.1 {status}")),
        "expected {status} for {:?}, got {reply:?}",
        String::from_utf8_lossy(req)
    );
    // One response only: what followed the bad request was not parsed as
    // a second request.
    assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_smuggling_requests_get_400_and_a_closed_connection() {
    let paths = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let p = paths.clone();
    let (a, seen) = backend(
        "127.0.0.1",
        0,
        handler(move |parts, body| {
            p.lock().unwrap().push(format!(
                "{} {} cl={:?} body={:?}",
                parts.method,
                parts.uri.path(),
                parts.headers.get("content-length"),
                String::from_utf8_lossy(&body)
            ));
            async move { (200, "a".to_string()) }
        }),
    )
    .await;
    let lb = Balancer::start(&[a], None, http_front()).await;
    // Content-Length and Transfer-Encoding together (both orders): hyper
    // frames the request by Transfer-Encoding alone, drops Content-Length
    // before it reaches the backend, and closes the connection after the
    // response (RFC 9112 6.1), so the smuggled request is never parsed.
    for req in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"[..],
    ] {
        let reply = raw(lb.addr, req).await;
        assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "one response, then closed: {reply}");
    }
    assert_eq!(
        *paths.lock().unwrap(),
        vec!["POST / cl=None body=\"\"".to_string(); 2],
        "the backend saw each POST once, chunked, and never /admin"
    );
    paths.lock().unwrap().clear();
    let before = seen.requests();
    // Two different lengths.
    refused(
        lb.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
        "400",
    )
    .await;
    // A transfer coding that is not chunked last.
    refused(
        lb.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "400",
    )
    .await;
    // Whitespace between a header name and its colon.
    refused(
        lb.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "400",
    )
    .await;
    assert_eq!(
        seen.requests(),
        before,
        "no malformed request reached the backend"
    );

    // Invalid chunked encoding in the body.
    refused(
        lb.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "400",
    )
    .await;
    // An oversized head: 431, the 4xx made for it.
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        big.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(64)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    refused(lb.addr, &big, "431").await;
    // Not HTTP at all.
    refused(lb.addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n", "400").await;

    // Still serving, and counted.
    assert_eq!(get(lb.addr, "/").await.1, "a");
    let s = lb
        .wait_status(|s| s.bad_requests >= 6, "bad requests counted")
        .await;
    assert_eq!(s.bad_requests, 6, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_style_upgrades_are_tunnelled() {
    // A backend that switches protocols and then echoes bytes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        read_head(&mut s).await.expect("a request head");
        let mut buf = [0u8; 1024];
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
    });
    let lb = Balancer::start(&[b], None, http_front()).await;
    let mut c = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut c).await.expect("a response head");
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    c.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    c.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_prometheus_metrics() {
    let (a, _) = named("127.0.0.1", "a").await;
    let admin = format!("127.0.0.1:{}", free_port());
    let front = Front {
        mode: Mode::Http,
        admin: Some(admin.clone()),
        ..Front::default()
    };
    let lb = Balancer::start(&[a], None, front).await;
    for _ in 0..3 {
        assert_eq!(get(lb.addr, "/").await.0, 200);
    }
    let admin: SocketAddr = admin.parse().unwrap();
    let mut text = String::new();
    for _ in 0..100 {
        match tokio::net::TcpStream::connect(admin).await {
            Ok(_) => {
                text = get(admin, "/metrics").await.1;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let line = format!("kiln_balancer_responses_total{{backend=\"{a}\",class=\"2xx\"}} 3");
    assert!(text.contains(&line), "{text}");
    assert!(
        text.contains("kiln_balancer_response_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("kiln_balancer_client_connections"), "{text}");
    let status = get(admin, "/status").await.1;
    let status: kiln_balancer::Status = serde_json::from_str(&status).unwrap();
    assert_eq!(status.mode, Mode::Http);
}

/// An HTTP/1.0 backend like busybox httpd: one connection per request,
/// answered with `response`, then its end kept open for `hold` and closed.
/// Counts the connections it accepted.
async fn http10_backend(response: &'static [u8], hold: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                let _ = s.write_all(response).await;
                tokio::time::sleep(hold).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_backend_that_closes_does_not_close_the_client_connection() {
    // Like busybox httpd: HTTP/1.0 responses, one connection per request.
    let (b, accepted) = http10_backend(
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nold",
        Duration::ZERO,
    )
    .await;
    let lb = Balancer::start(&[b], None, http_front()).await;
    let mut c = connect(lb.addr).await;
    for _ in 0..5 {
        let (status, body, _) = call(&mut c, "GET", "/", "").await;
        assert_eq!((status, body.as_str()), (200, "old"));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        5,
        "a backend connection per request"
    );
    // One client connection carried all five, and is still open.
    lb.wait_status(
        |s| s.connections == 1 && s.backends[0].total == 5,
        "one open client connection",
    )
    .await;
}

/// Sockets in TIME_WAIT on this host whose remote port is `port`
/// (`/proc/net/tcp`: `rem_address` is `HEXIP:HEXPORT`, state `06`).
fn time_wait_to(port: u16) -> usize {
    let hex = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[2].ends_with(&hex) && cols[3] == "06"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_backends_leave_no_time_wait_behind() {
    // An HTTP/1.0 backend that answers and keeps its end open a moment, so
    // the balancer is the one to close each connection (a FIN from it then
    // ends in TIME_WAIT once the backend closes too).
    let (b, _) = http10_backend(
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        Duration::from_millis(200),
    )
    .await;
    let lb = Balancer::start(&[b], None, http_front()).await;
    let mut c = connect(lb.addr).await;
    for _ in 0..5 {
        let (status, body, _) = call(&mut c, "GET", "/", "").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    lb.wait_status(|s| s.backends[0].total == 5, "five responses")
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Each connection was closed by a reset: a FIN would have left five
    // sockets in TIME_WAIT for a minute, and ports run out that way.
    assert_eq!(time_wait_to(b.port()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backend_is_checked_as_its_own_release_declares() {
    // Mid-rollout: the old server answers its health check at `/old`
    // only, the new one at `/new` only.
    let path_only = |ok: &'static str| {
        handler(move |p, _| async move {
            if p.uri.path() == ok || p.uri.path() == "/" {
                (200, ok.to_string())
            } else {
                (404, "no".to_string())
            }
        })
    };
    let (old, _) = backend("127.0.0.1", 0, path_only("/old")).await;
    let (new, _) = backend("127.0.0.1", 0, path_only("/new")).await;
    let (unchecked, _) = backend("127.0.0.1", 0, path_only("/none")).await;
    let check = |path: &str| Check {
        probe: Probe::Http {
            path: path.into(),
            port: 0,
        },
        interval_ms: 20,
        fall: 1,
        rise: 1,
    };
    let lb = Balancer::start(&[], None, http_front()).await;
    let list: Vec<String> = [old, new, unchecked]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let own = [
        (old.to_string(), Some(check("/old"))),
        (unchecked.to_string(), None),
    ]
    .into_iter()
    .collect();
    let g = kiln_balancer::set_backends_checked(
        lb.path(),
        &list,
        Some(&check("/new")),
        &own,
        &http_front(),
    )
    .unwrap();
    lb.wait_status(|s| s.generation >= g, "switch").await;
    // Many check rounds later, all three are still in rotation.
    lb.wait_status(
        |s| s.backends.len() == 3 && s.backends.iter().all(|b| b.checks_failed == 0),
        "three backends",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = lb.status();
    assert!(
        status
            .backends
            .iter()
            .all(|b| b.healthy && b.checks_failed == 0),
        "{status:?}"
    );
    // The role's check (`/new`) applied to the old server would fail:
    // the same set under it alone takes the old one out.
    let g = kiln_balancer::set_backends_with(lb.path(), &list, Some(&check("/new")), &http_front())
        .unwrap();
    lb.wait_status(|s| s.generation >= g, "switch").await;
    lb.wait_status(
        |s| {
            s.backends
                .iter()
                .any(|b| b.addr == old.to_string() && !b.healthy)
        },
        "old server out under the role's check",
    )
    .await;
}

/// One request to a control channel with `token`: status and body.
async fn control(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String) {
    use http_body_util::BodyExt as _;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "control.test")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_switches_backends_for_its_token_only() {
    let (a, _) = named("127.0.0.1", "a").await;
    let (b, _) = named("127.0.0.1", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ctl: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let run_dir = dir.path().to_path_buf();
    let task = tokio::spawn(async move {
        let control = kiln_balancer::Control {
            addr: ctl.to_string(),
            token: "s3cret".into(),
        };
        kiln_balancer::run_with(&front.to_string(), run_dir, Some(control))
            .await
            .unwrap();
    });
    let set = |addr: SocketAddr| {
        serde_json::to_string(&kiln_balancer::Backends {
            backends: vec![addr.to_string()],
            front: http_front(),
            ..Default::default()
        })
        .unwrap()
    };
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(ctl).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the control channel listens");
    // No token, a wrong one: refused, nothing switched.
    assert_eq!(
        control(ctl, "PUT", "/backends", "wrong", &set(a)).await.0,
        401
    );
    assert_eq!(control(ctl, "GET", "/status", "", "").await.0, 401);
    assert!(kiln_balancer::read_backends(dir.path()).is_none());
    // Garbage is refused with the reason.
    let (code, why) = control(ctl, "PUT", "/backends", "s3cret", "{nope").await;
    assert_eq!(code, 400, "{why}");
    // With the token: the next generation, served.
    for (want, addr, generation) in [("a", a, 1), ("b", b, 2)] {
        let (code, body) = control(ctl, "PUT", "/backends", "s3cret", &set(addr)).await;
        assert_eq!(
            (code, body),
            (200, format!(r#"{{"generation":{generation}}}"#))
        );
        let mut served = false;
        for _ in 0..200 {
            let (code, status) = control(ctl, "GET", "/status", "s3cret", "").await;
            let status: Option<kiln_balancer::Status> = serde_json::from_str(&status).ok();
            if code == 200 && status.is_some_and(|s| s.generation == generation) {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(served, "generation {generation} served");
        assert_eq!(get(front, "/").await.1, want);
    }
    let metrics = control(ctl, "GET", "/metrics", "s3cret", "").await.1;
    assert!(
        metrics.contains("kiln_balancer_responses_total"),
        "{metrics}"
    );
    task.abort();
}

/// A backend that serves one connection at a time (HTTP/1.0, `hold`
/// per response) and listens with the smallest accept queue: any more
/// connections than it holds have their SYNs dropped.
async fn one_at_a_time(hold: Duration) -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = socket.listen(1).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = read_head(&mut s).await;
            tokio::time::sleep(hold).await;
            let _ = s
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_accept_queue_overflows_gets_a_limit_and_requests_wait_for_it() {
    let b = one_at_a_time(Duration::from_millis(5)).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let front = Front {
        admin: Some(admin.clone()),
        ..http_front()
    };
    let lb = Balancer::start(&[b], None, front).await;
    // 16 clients at once on a backend that holds 1 and queues 2.
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let front = lb.addr;
            tokio::spawn(async move {
                let mut c = connect(front).await;
                let mut statuses = Vec::new();
                for _ in 0..8 {
                    statuses.push(call(&mut c, "GET", "/", "").await.0);
                }
                statuses
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.await.unwrap(), vec![200; 8], "every request answered");
    }
    let admin: SocketAddr = admin.parse().unwrap();
    let text = get(admin, "/metrics").await.1;
    let limit = text
        .lines()
        .find(|l| l.starts_with("kiln_balancer_backend_limit{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no limit metric in {text}"));
    assert!(
        (8..16).contains(&limit),
        "the full queue gave the backend a limit below the 16 clients: {limit}\n{text}"
    );
    assert!(
        text.contains("kiln_balancer_queue_timeouts_total 0"),
        "{text}"
    );
}

/// The metric line `name{...} value` (or `name value`), as a number.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn max_requests_and_a_queue_timeout_of_zero_answer_503_at_once() {
    // Long enough for the second request to find the first still there
    // on a loaded machine.
    let b = one_at_a_time(Duration::from_millis(800)).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let front = Front {
        admin: Some(admin.clone()),
        max_requests: Some(1),
        queue_timeout_ms: Some(0),
        ..http_front()
    };
    let lb = Balancer::start(&[b], None, front).await;
    let admin: SocketAddr = admin.parse().unwrap();
    let metrics = || async move { get(admin, "/metrics").await.1 };
    assert_eq!(
        metric(&metrics().await, "kiln_balancer_backend_limit"),
        Some(1.0)
    );
    let front = lb.addr;
    let first = tokio::spawn(async move { get(front, "/").await.0 });
    let mut in_flight = false;
    for _ in 0..200 {
        if metric(&metrics().await, "kiln_balancer_in_flight_requests") == Some(1.0) {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(in_flight, "the first request never reached the backend");
    // The backend has its one request: the next finds no room, and no
    // queue to wait in.
    let second = raw(
        front,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(second.starts_with("HTTP/1.1 503"), "{second}");
    assert!(
        second.to_ascii_lowercase().contains("retry-after: 1"),
        "{second}"
    );
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(get(front, "/").await.0, 200, "room again once answered");
    let text = metrics().await;
    assert_eq!(
        metric(&text, "kiln_balancer_queue_timeouts_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "kiln_balancer_queued_requests"), Some(0.0));
}
