//! TCP mode: one backend connection per client connection, bytes relayed
//! untouched. For roles that do not speak HTTP (a database). A backend
//! that refuses is skipped for that connection; when every backend fails
//! its checks the balancer fails open and uses them all.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fleet::{Backend, Fleet};
use crate::health::status_code;

pub(crate) async fn proxy<S>(mut client: S, fleet: Arc<Fleet>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let set = fleet.current.load_full();
    if set.is_empty() {
        fleet.metrics.rejected.inc();
        return;
    }
    let algorithm = fleet.front.load().algorithm;
    // Backends failing their health checks are skipped, unless all are.
    let first = match fleet.pick(&set, algorithm) {
        Some(i) => i,
        None => {
            fleet.metrics.failed_open.inc();
            0
        }
    };
    let fail_open = !set[first].is_up();
    for i in 0..set.len() {
        let backend = &set[(first + i) % set.len()];
        if !fail_open && !backend.is_up() {
            continue;
        }
        let dialed = crate::dial::connect(
            backend.addr,
            Duration::from_secs(2),
            &backend.connect_time,
            &backend.m.hedges,
            // Relayed bytes may still be unread when kiln closes.
            crate::dial::Close::Normal,
        );
        match dialed.await {
            Ok((mut upstream, _)) => {
                let _ = upstream.set_nodelay(true);
                backend.m.open.inc();
                backend.m.connections.inc();
                relay(&mut client, &mut upstream, backend).await;
                backend.m.open.dec();
                return;
            }
            Err(_) => backend.m.errors.inc(),
        }
    }
    fleet.metrics.rejected.inc();
}

/// Relays a connection both ways (each side shut down when the other
/// ends) and looks at the first bytes the backend sends: an HTTP status
/// line is counted by class, so a 5xx counts as a failed response for the
/// canary gate. Only the first response of a connection is seen (HTTP mode
/// sees them all); the bytes themselves pass untouched.
async fn relay<S>(client: &mut S, upstream: &mut TcpStream, backend: &Backend)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (mut from_backend, mut to_backend) = upstream.split();
    let up = async {
        let _ = tokio::io::copy(&mut from_client, &mut to_backend).await;
        let _ = to_backend.shutdown().await;
    };
    let down = async {
        let mut head = [0u8; 4096];
        let n = from_backend.read(&mut head).await?;
        if n > 0 {
            if let Some(code) = status_code(&head[..n]) {
                backend.m.response(code);
            }
            to_client.write_all(&head[..n]).await?;
            tokio::io::copy(&mut from_backend, &mut to_client).await?;
        }
        to_client.shutdown().await
    };
    let _ = tokio::join!(up, down);
}
