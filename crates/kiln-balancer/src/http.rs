//! HTTP mode, on hyper: keep-alive with clients (HTTP/1.1, and HTTP/2 when
//! TLS negotiates it), a backend chosen per request, pooled HTTP/1.1
//! connections to backends that keep them alive, retries, forwarding
//! headers, every response counted by status class and backend, and
//! protocol upgrades (WebSocket) tunnelled.
//!
//! Retries: a request goes to another backend when its connection could
//! not be made or was found dead before the request was written (any
//! method: nothing reached the backend), and, for an idempotent request
//! without a body, when the connection fails or resets before any
//! response byte. A request whose body was (even partly) sent is never
//! sent again: the body streams through and is not kept.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::admit::{Refused, Slot};
use crate::dial::Close;
use crate::fleet::{Backend, Fleet};
use crate::head::{
    append, connection_has, strip_hop_by_hop, Seen, X_FORWARDED_FOR, X_FORWARDED_PROTO,
};

/// Idle connections kept per backend.
const MAX_IDLE: usize = 256;
/// How long a backend may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head a client may send (431 beyond).
const MAX_HEAD: usize = 64 * 1024;

/// One client connection's context, shared by its requests.
struct Client {
    fleet: Arc<Fleet>,
    /// The client's IP, for `X-Forwarded-For`.
    ip: HeaderValue,
    /// `for=...;proto=...`, for `Forwarded`.
    forwarded: HeaderValue,
    proto: HeaderValue,
}

/// Serves one client connection until it closes. `h2` when TLS
/// negotiated HTTP/2 over ALPN.
pub(crate) async fn serve<S>(stream: S, peer: SocketAddr, https: bool, h2: bool, fleet: Arc<Fleet>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ip = peer.ip().to_string();
    let proto = if https { "https" } else { "http" };
    let node = if peer.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.clone()
    };
    let client = Arc::new(Client {
        ip: HeaderValue::from_str(&ip).expect("an IP is a valid header value"),
        forwarded: HeaderValue::from_str(&format!("for={node};proto={proto}"))
            .expect("valid header value"),
        proto: HeaderValue::from_static(proto),
        fleet: fleet.clone(),
    });
    let service = hyper::service::service_fn(move |req| handle(req, client.clone()));
    let io = TokioIo::new(stream);
    let result = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_buf_size(MAX_HEAD)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        // hyper has answered 400 (or 431 for an oversized head) and closed.
        if e.is_parse() || e.is_parse_too_large() {
            fleet.metrics.bad_requests.inc();
            tracing::debug!(%peer, "malformed request: {e}");
        }
    }
}

async fn handle(
    mut req: Request<Incoming>,
    client: Arc<Client>,
) -> Result<Response<RespBody>, Infallible> {
    let fleet = &client.fleet;
    let seen = Seen::of(req.headers());
    if seen.smuggling() {
        fleet.metrics.bad_requests.inc();
        return Ok(local(StatusCode::BAD_REQUEST, "bad request\n", true));
    }
    let version = req.version();
    let upgrade = seen.upgrade
        && version == Version::HTTP_11
        && connection_has(req.headers(), &seen, "upgrade");
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    prepare(&mut parts, &client, upgrade, &seen);

    let set = fleet.current.load_full();
    let algorithm = fleet.front.load().algorithm;
    let Some(first) = fleet.pick(&set, algorithm) else {
        fleet.metrics.rejected.inc();
        return Ok(unavailable());
    };
    let (set, first, slot) = match fleet.queue.admit(&fleet.current, set, first).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            match refused {
                Refused::NoBackend => fleet.metrics.rejected.inc(),
                Refused::Timeout => fleet.metrics.queue_timeouts.inc(),
            }
            return Ok(unavailable());
        }
    };
    let mut slot = Some(slot);
    let empty = body.is_end_stream();
    let retriable = empty && idempotent(&parts.method) && !upgrade;
    let template = retriable.then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let body_failed = (!empty).then(|| Arc::new(AtomicBool::new(false)));
    let body = match &body_failed {
        None => ReqBody::Empty,
        Some(failed) => ReqBody::Client {
            inner: body,
            failed: failed.clone(),
        },
    };
    let mut pending = Some(Request::from_parts(parts, body));
    let mut failed_on: Option<&Arc<Backend>> = None;
    let mut reached = false;
    for k in 0..set.len() {
        let backend = &set[(first + k) % set.len()];
        if !backend.is_up() {
            continue;
        }
        let req = match pending.take() {
            Some(r) => r,
            None => match &template {
                Some((method, uri, headers)) => {
                    let mut r = Request::new(ReqBody::Empty);
                    *r.method_mut() = method.clone();
                    *r.uri_mut() = uri.clone();
                    *r.headers_mut() = headers.clone();
                    r
                }
                None => break,
            },
        };
        if let Some(prev) = failed_on.take() {
            prev.m.retries.inc();
        }
        // The room admitted for this backend, if it is still the one tried
        // (not if it went down meanwhile); a retry's room is taken anyway.
        let slot = match slot.take() {
            Some(s) if Arc::ptr_eq(&s.backend, backend) => s,
            _ => Slot::force(backend.clone()),
        };
        let lease = Lease::new(slot);
        let started = Instant::now();
        match send(backend, req, upgrade).await {
            Ok((resp, sender)) => {
                backend.m.duration.observe(started.elapsed().as_secs_f64());
                return Ok(respond(resp, sender, lease, client_upgrade, version));
            }
            Err(Failure::NotSent(req)) => {
                backend.m.errors.inc();
                failed_on = Some(backend);
                pending = Some(*req);
            }
            Err(Failure::Sent(e)) => {
                if body_failed
                    .as_ref()
                    .is_some_and(|f| f.load(Ordering::SeqCst))
                {
                    // The client's body was malformed (bad chunking) or
                    // cut short: not the backend's fault.
                    fleet.metrics.bad_requests.inc();
                    return Ok(local(StatusCode::BAD_REQUEST, "bad request\n", true));
                }
                tracing::debug!(addr = %backend.addr, "request failed: {e}");
                backend.m.errors.inc();
                reached = true;
                if template.is_none() {
                    return Ok(local(StatusCode::BAD_GATEWAY, "bad gateway\n", false));
                }
                failed_on = Some(backend);
            }
        }
    }
    if reached {
        Ok(local(StatusCode::BAD_GATEWAY, "bad gateway\n", false))
    } else {
        fleet.metrics.rejected.inc();
        Ok(unavailable())
    }
}

/// Turns the client's request into the backend's: HTTP/1.1 in origin
/// form, with a Host, without hop-by-hop headers, with forwarding headers.
fn prepare(parts: &mut hyper::http::request::Parts, client: &Client, upgrade: bool, seen: &Seen) {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, seen);
    if seen.expect {
        headers.remove(header::EXPECT);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if seen.upgrade {
        headers.remove(header::UPGRADE);
    }
    if !seen.host {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        if let Ok(uri) = pq.parse::<Uri>() {
            parts.uri = uri;
        }
    }
    parts.version = Version::HTTP_11;
    headers.reserve(3);
    append(headers, X_FORWARDED_FOR, &client.ip, seen.forwarded_for);
    headers.insert(X_FORWARDED_PROTO, client.proto.clone());
    append(
        headers,
        header::FORWARDED,
        &client.forwarded,
        seen.forwarded,
    );
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A response the balancer makes itself.
fn local(status: StatusCode, text: &'static str, close: bool) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::Local(Some(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// No backend to send the request to: try again in a moment.
fn unavailable() -> Response<RespBody> {
    let mut resp = local(
        StatusCode::SERVICE_UNAVAILABLE,
        "no backend is available\n",
        false,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

enum Failure {
    /// Nothing reached the backend; the request comes back whole.
    NotSent(Box<Request<ReqBody>>),
    /// The request was (at least partly) written.
    Sent(hyper::Error),
}

/// Sends a request on a pooled or new connection to `backend`.
async fn send(
    backend: &Backend,
    mut req: Request<ReqBody>,
    upgrade: bool,
) -> Result<(Response<Incoming>, Option<SendRequest<ReqBody>>), Failure> {
    // Bounded: each pass takes one idle connection away, or connects.
    for _ in 0..=MAX_IDLE {
        let pooled = if upgrade {
            None
        } else {
            backend.pool.take().await
        };
        let from_pool = pooled.is_some();
        let mut sender = match pooled {
            Some(s) => s,
            None => match connect(backend, upgrade).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(addr = %backend.addr, "cannot connect: {e}");
                    return Err(Failure::NotSent(Box::new(req)));
                }
            },
        };
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok((resp, Some(sender))),
            Err(mut e) => match e.take_message() {
                // A pooled connection the backend closed meanwhile.
                Some(r) if from_pool => req = r,
                Some(r) => return Err(Failure::NotSent(Box::new(r))),
                None => return Err(Failure::Sent(e.into_error())),
            },
        }
    }
    Err(Failure::NotSent(Box::new(req)))
}

/// A new connection to `backend`. Closed with a reset, as HAProxy closes
/// server connections: kiln only closes one once its response has been
/// read whole (or the client is gone), and a FIN would leave it in
/// TIME_WAIT on this host for a minute; backends that answer HTTP/1.0 (a
/// connection per request) would then run the host out of ports to them at
/// about 470 new connections per second each. An upgrade (a tunnel) may
/// rely on half-closes, so it keeps the normal close.
async fn connect(backend: &Backend, upgrade: bool) -> std::io::Result<SendRequest<ReqBody>> {
    let close = if upgrade { Close::Normal } else { Close::Reset };
    let (stream, slow) = crate::dial::connect(
        backend.addr,
        CONNECT_TIMEOUT,
        &backend.connect_time,
        &backend.m.hedges,
        close,
    )
    .await?;
    if slow {
        backend.limit.congested();
    }
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(BackendIo {
            stream,
            graceful: close == Close::Normal,
            nodelay: false,
            wrote: false,
        }))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Writes up to this size go out whole without `TCP_NODELAY`.
const SMALL_WRITE: usize = 1024;

/// A backend connection whose shutdown (hyper's FIN before it drops a
/// connection) can be skipped, so that the drop resets it instead.
///
/// `TCP_NODELAY` is set only when Nagle's algorithm could hold a write
/// back: a write that follows another with no read between (a streamed
/// body, a tunnel) or one too large for a segment. A request head written
/// in one go, the usual case, goes out at once anyway (nothing of the
/// connection is unacknowledged then: the last response acknowledged the
/// last request), and a connection per request saves the system call.
struct BackendIo {
    stream: TcpStream,
    graceful: bool,
    nodelay: bool,
    /// Written since the last read.
    wrote: bool,
}

impl BackendIo {
    fn before_write(&mut self, len: usize) {
        if !self.nodelay && (self.wrote || len > SMALL_WRITE) {
            let _ = self.stream.set_nodelay(true);
            self.nodelay = true;
        }
    }

    fn after_write(&mut self, polled: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = polled {
            self.wrote |= *n > 0;
        }
    }
}

impl AsyncRead for BackendIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.wrote = false;
        }
        polled
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.before_write(buf.len());
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.after_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.before_write(bufs.iter().map(|b| b.len()).sum());
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.after_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.graceful {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

/// The backend's response, counted, with its connection returned to the
/// pool once its body has been relayed.
fn respond(
    resp: Response<Incoming>,
    sender: Option<SendRequest<ReqBody>>,
    mut lease: Lease,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    client_version: Version,
) -> Response<RespBody> {
    let backend = lease.slot.backend.clone();
    let status = resp.status();
    backend.m.response(status.as_u16());
    backend.answered.fetch_add(1, Ordering::Relaxed);
    backend.limit.answered();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            return tunnel(resp, client_upgrade, lease);
        }
    }
    let seen = Seen::of(resp.headers());
    let keep_alive =
        resp.version() == Version::HTTP_11 && !connection_has(resp.headers(), &seen, "close");
    let (mut parts, body) = resp.into_parts();
    // The client's connection has its own version and keep-alive: an
    // HTTP/1.0 backend must not make hyper close a client's HTTP/1.1
    // connection after each response.
    parts.version = client_version;
    strip_hop_by_hop(&mut parts.headers, &seen);
    if seen.upgrade {
        parts.headers.remove(header::UPGRADE);
    }
    lease.sender = sender.filter(|_| keep_alive);
    let lease = if body.is_end_stream() {
        // Nothing to relay: the connection is free now.
        drop(lease);
        None
    } else {
        Some(lease)
    };
    Response::from_parts(parts, RespBody::Backend { inner: body, lease })
}

/// A 101 from the backend: both sides switch protocols and the bytes are
/// relayed until either closes; the request stays in flight meanwhile.
fn tunnel(
    mut resp: Response<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    lease: Lease,
) -> Response<RespBody> {
    let backend_upgrade = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let mut lease = lease;
        // A tunnel says nothing about the backend's accept queue.
        lease.slot.release();
        if let (Ok(c), Ok(b)) = tokio::join!(client_upgrade, backend_upgrade) {
            let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
            let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
        }
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, RespBody::Local(None))
}

/// A request in flight on a backend: counted while it lives, and the
/// connection it used, returned to the pool when the response is done.
pub(crate) struct Lease {
    /// Given back after `drop` has returned the connection to the pool,
    /// so the request that gets the room finds the connection idle.
    slot: Slot,
    sender: Option<SendRequest<ReqBody>>,
}

impl Lease {
    fn new(slot: Slot) -> Lease {
        slot.backend.m.in_flight.inc();
        Lease { slot, sender: None }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let backend = &self.slot.backend;
        backend.m.in_flight.dec();
        if let Some(sender) = self.sender.take() {
            if backend.active.load(Ordering::Relaxed) && backend.is_up() {
                backend.pool.put(sender);
            }
        }
    }
}

/// Idle HTTP/1.1 connections to one backend, most recently used first.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<SendRequest<ReqBody>>>,
}

impl Pool {
    /// An idle connection ready for a request, if one is left.
    async fn take(&self) -> Option<SendRequest<ReqBody>> {
        loop {
            let mut s = self.idle.lock().expect("pool").pop()?;
            if s.is_ready() {
                return Some(s);
            }
            if s.is_closed() {
                continue;
            }
            // The response that freed it has just ended; the connection
            // is about to be ready again.
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), s.ready()).await {
                return Some(s);
            }
        }
    }

    fn put(&self, s: SendRequest<ReqBody>) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool");
        if idle.len() < MAX_IDLE {
            idle.push(s);
        }
    }

    /// Closes every idle connection (a backend leaving or failing).
    pub fn clear(&self) {
        self.idle.lock().expect("pool").clear();
    }
}

/// The body of a request sent to a backend.
pub(crate) enum ReqBody {
    Empty,
    /// The client's body, streamed; `failed` is set if reading it fails.
    Client {
        inner: Incoming,
        failed: Arc<AtomicBool>,
    },
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Client { inner, failed } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &polled {
                    failed.store(true, Ordering::SeqCst);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}

/// The body of a response to a client.
pub(crate) enum RespBody {
    /// Made by the balancer.
    Local(Option<Bytes>),
    /// Relayed from a backend; the lease ends with it.
    Backend {
        inner: Incoming,
        lease: Option<Lease>,
    },
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RespBody::Backend { inner, lease } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => {
                        // The last frame: hyper may not poll again.
                        lease.take();
                    }
                    Poll::Ready(None) => {
                        // Done: the connection goes back to the pool.
                        lease.take();
                    }
                    Poll::Ready(Some(Err(_))) => {
                        // Cut short: the connection is not reusable.
                        if let Some(l) = lease.as_mut() {
                            l.sender = None;
                        }
                        lease.take();
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Local(data) => data.is_none(),
            RespBody::Backend { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Local(Some(d)) => SizeHint::with_exact(d.len() as u64),
            RespBody::Local(None) => SizeHint::with_exact(0),
            RespBody::Backend { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        // Dropped before its end (the client went away): the backend
        // connection is mid-response and cannot be reused.
        if let RespBody::Backend {
            lease: Some(lease), ..
        } = self
        {
            lease.sender = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (BackendIo, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (peer, _) = l.accept().await.unwrap();
        let io = BackendIo {
            stream,
            graceful: true,
            nodelay: false,
            wrote: false,
        };
        (io, peer)
    }

    #[tokio::test]
    async fn nagle_stays_on_for_one_write_per_exchange() {
        let (mut io, mut peer) = pair().await;
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let n = peer.read(&mut buf).await.unwrap();
            peer.write_all(&buf[..n]).await.unwrap();
            io.read_exact(&mut buf[..n]).await.unwrap();
        }
        assert!(!io.stream.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_second_write_before_any_read_turns_nagle_off() {
        let (mut io, _peer) = pair().await;
        io.write_all(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n")
            .await
            .unwrap();
        assert!(!io.stream.nodelay().unwrap());
        io.write_all(b"ok").await.unwrap();
        assert!(io.stream.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_large_write_turns_nagle_off() {
        let (mut io, mut peer) = pair().await;
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = peer.read_to_end(&mut sink).await;
        });
        io.write_all(&[b'x'; SMALL_WRITE + 1]).await.unwrap();
        assert!(io.stream.nodelay().unwrap());
        drop(io);
        reader.await.unwrap();
    }
}
