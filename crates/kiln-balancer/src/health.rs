//! Active health checks: every backend of the current set is probed with
//! its HTTP or TCP check (the role's, or its own release's where that
//! differs); one failing `fall` checks in a row leaves
//! rotation, and returns after `rise` passing ones. Also the one HTTP
//! status-line reader that the checks and kiln's own probes share.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::control::{Check, Probe};
use crate::fleet::{Backend, Fleet};

/// The status code of an HTTP/1.x response from its first bytes
/// (`HTTP/1.1 503 ...`), or `None` if they are not a status line. The
/// balancer's checks, its TCP-mode 5xx counting and kiln's own probes all
/// read responses through this.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let code = head.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    (head.get(8) == Some(&b' ') && code.iter().all(u8::is_ascii_digit))
        .then(|| code.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0')))
}

/// A 2xx or 3xx status: what a health check accepts.
pub fn passes(head: &[u8]) -> bool {
    status_code(head).is_some_and(|c| (200..400).contains(&c))
}

/// Probes every backend of the current set, all at once, each with its own
/// check (the role's, or the one its release declared when that differs),
/// every `interval_ms` (the shortest among them), and moves them in and
/// out of rotation (`fall` / `rise`).
pub(crate) async fn check_loop(fleet: Arc<Fleet>) {
    loop {
        let (role, own) = (fleet.check.load_full(), fleet.checks.load_full());
        let planned: Vec<(Arc<Backend>, Check)> = fleet
            .current
            .load_full()
            .iter()
            .filter_map(|b| {
                let check = match own.get(&b.addr) {
                    Some(c) => c.clone(),
                    None => role.as_ref().clone(),
                }?;
                Some((b.clone(), check))
            })
            .collect();
        let Some(interval_ms) = planned.iter().map(|(_, c)| c.interval_ms).min() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let interval = Duration::from_millis(interval_ms.max(10));
        // A check may take up to a second (two for long intervals): a busy
        // machine answering slowly is not a dead backend.
        let timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(2));
        let probes: Vec<_> = planned
            .into_iter()
            .map(|(backend, check)| {
                tokio::spawn(async move {
                    let ok = tokio::time::timeout(timeout, probe(backend.addr, &check.probe))
                        .await
                        .unwrap_or(false);
                    record(&backend, ok, &check);
                })
            })
            .collect();
        for p in probes {
            let _ = p.await;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Counts one check's outcome into the backend's streak and state.
fn record(b: &Backend, ok: bool, check: &Check) {
    if !ok {
        b.m.checks_failed.inc();
    }
    let down = b.down.load(Ordering::SeqCst);
    // The streak counts checks that argue for a change of state.
    if ok == down {
        let streak = b.streak.fetch_add(1, Ordering::SeqCst) + 1;
        let needed = if down { check.rise } else { check.fall }.max(1);
        if streak >= needed {
            b.down.store(!down, Ordering::SeqCst);
            b.streak.store(0, Ordering::SeqCst);
            b.m.up.set(i64::from(down));
            b.queue.changed();
            if down {
                tracing::info!(addr = %b.addr, "backend passes its health check again: back in rotation");
            } else {
                // Its idle connections may be as sick as it is.
                b.pool.clear();
                tracing::warn!(addr = %b.addr, "backend fails its health check: out of rotation");
            }
        }
    } else {
        b.streak.store(0, Ordering::SeqCst);
    }
}

/// One health check against a backend's IP (port 0: the backend's own
/// port, where a provider publishes each server's port elsewhere).
async fn probe(backend: SocketAddr, probe: &Probe) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let at =
        |port: u16| SocketAddr::new(backend.ip(), if port == 0 { backend.port() } else { port });
    match probe {
        Probe::Tcp { port } => TcpStream::connect(at(*port)).await.is_ok(),
        Probe::Http { path, port } => {
            let Ok(mut s) = TcpStream::connect(at(*port)).await else {
                return false;
            };
            let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: kiln-balancer\r\nConnection: close\r\n\r\n", backend.ip());
            if s.write_all(req.as_bytes()).await.is_err() {
                return false;
            }
            // The status line is all that matters: `HTTP/1.x NNN ...`.
            let mut head = [0u8; 16];
            let mut got = 0;
            while got < 12 {
                match s.read(&mut head[got..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            passes(&head[..got])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            status_code(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.0 200 OK"), Some(200));
        assert_eq!(status_code(b"HTTP/1.1 20"), None, "too short");
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert!(passes(b"HTTP/1.1 302 Found") && !passes(b"HTTP/1.1 404 Not Found"));
    }
}
