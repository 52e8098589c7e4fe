//! What the balancer's tests share: real backends (small hyper servers on
//! loopback addresses), a balancer started in-process on a free port, raw
//! and hyper clients, and polling with a deadline.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kiln_balancer::{Check, Front, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend's counters, seen by the test.
#[derive(Default)]
pub struct Seen {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
}

impl Seen {
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// What a backend answers: the request (body read) → status and body.
pub type Handler = Arc<
    dyn Fn(hyper::http::request::Parts, Bytes) -> std::pin::Pin<Box<dyn Future<Output = (u16, String)> + Send>>
        + Send
        + Sync,
>;

pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(hyper::http::request::Parts, Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (u16, String)> + Send + 'static,
{
    Arc::new(move |p, b| Box::pin(f(p, b)))
}

/// A keep-alive HTTP/1.1 backend on `ip` (port 0 = any).
pub async fn backend(ip: &str, port: u16, h: Handler) -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind((ip, port)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = l.accept().await else {
                return;
            };
            s.connections.fetch_add(1, Ordering::SeqCst);
            let (s, h) = (s.clone(), h.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (s, h) = (s.clone(), h.clone());
                    async move {
                        s.requests.fetch_add(1, Ordering::SeqCst);
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let (status, text) = h(parts, body).await;
                        let mut resp = Response::new(Full::new(Bytes::from(text)));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A backend answering `200 name` to everything.
pub async fn named(ip: &str, name: &'static str) -> (SocketAddr, Arc<Seen>) {
    backend(ip, 0, handler(move |_, _| async move { (200, name.to_string()) })).await
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A balancer running in this process.
pub struct Balancer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    pub async fn start(backends: &[SocketAddr], check: Option<Check>, front: Front) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let list: Vec<String> = backends.iter().map(|a| a.to_string()).collect();
        kiln_balancer::set_backends_with(dir.path(), &list, check.as_ref(), &front).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let run_dir = dir.path().to_path_buf();
        let task = tokio::spawn(async move {
            kiln_balancer::run(&addr.to_string(), run_dir).await.unwrap();
        });
        let b = Balancer { addr, dir, task };
        b.wait_status(|s| s.generation >= 1, "first status").await;
        b
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn status(&self) -> Status {
        kiln_balancer::read_status(self.path()).expect("status.json")
    }

    /// Polls status.json until `ok` holds (bounded).
    pub async fn wait_status(&self, ok: impl Fn(&Status) -> bool, what: &str) -> Status {
        for _ in 0..1500 {
            if let Some(s) = kiln_balancer::read_status(self.path()) {
                if ok(&s) {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: never reached; last status {:?}", kiln_balancer::read_status(self.path()));
    }

    /// A backend's counters from the status.
    pub fn backend(&self, addr: SocketAddr) -> kiln_balancer::BackendStatus {
        self.status()
            .backends
            .into_iter()
            .find(|b| b.addr == addr.to_string())
            .unwrap_or_else(|| panic!("{addr} not in status"))
    }

    pub async fn switch(&self, backends: &[SocketAddr]) {
        let list: Vec<String> = backends.iter().map(|a| a.to_string()).collect();
        let g = kiln_balancer::set_backends(self.path(), &list, None).unwrap();
        self.wait_status(|s| s.generation >= g, "switch").await;
    }
}

pub fn http_front() -> Front {
    Front {
        mode: kiln_balancer::Mode::Http,
        ..Front::default()
    }
}

/// Sends raw bytes and reads until the balancer closes (bounded).
pub async fn raw(front: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(front).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the balancer kept the connection open: {:?}", String::from_utf8_lossy(&out));
    String::from_utf8_lossy(&out).into_owned()
}

/// A keep-alive HTTP/1.1 client connection.
pub async fn connect(front: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(front).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// One request on a client connection: status and body.
pub async fn call(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, hyper::HeaderMap) {
    c.ready().await.unwrap();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "front.test")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

/// `GET path` on a fresh connection.
pub async fn get(front: SocketAddr, path: &str) -> (u16, String, hyper::HeaderMap) {
    let mut c = connect(front).await;
    call(&mut c, "GET", path, "").await
}

pub fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
