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
    dyn Fn(
            hyper::http::request::Parts,
            Bytes,
        ) -> std::pin::Pin<Box<dyn Future<Output = (u16, String)> + Send>>
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
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
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
    backend(
        ip,
        0,
        handler(move |_, _| async move { (200, name.to_string()) }),
    )
    .await
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
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Balancer::start_in(tempfile::tempdir().unwrap(), addr, backends, check, front).await
    }

    /// Starts a balancer on `addr` with the control directory `dir`.
    pub async fn start_in(
        dir: tempfile::TempDir,
        addr: SocketAddr,
        backends: &[SocketAddr],
        check: Option<Check>,
        front: Front,
    ) -> Balancer {
        let list: Vec<String> = backends.iter().map(|a| a.to_string()).collect();
        kiln_balancer::set_backends_with(dir.path(), &list, check.as_ref(), &front).unwrap();
        let run_dir = dir.path().to_path_buf();
        let task = tokio::spawn(async move {
            kiln_balancer::run(&addr.to_string(), run_dir)
                .await
                .unwrap();
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
        panic!(
            "{what}: never reached; last status {:?}",
            kiln_balancer::read_status(self.path())
        );
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
    assert!(
        read.is_ok(),
        "the balancer kept the connection open: {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// A keep-alive HTTP/1.1 client connection.
pub async fn connect(front: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(front).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
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

/// A test certificate authority (rcgen).
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kiln test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names` (PEM cert, PEM key, serial hex),
    /// valid now or long expired.
    pub fn leaf(&self, names: &[&str], expired: bool) -> (String, String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let serial: [u8; 8] = std::array::from_fn(|_| rand_byte());
        let mut serial = serial.to_vec();
        serial[0] &= 0x7f;
        serial[0] |= 0x10;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let hex = serial.iter().map(|b| format!("{b:02x}")).collect();
        (cert.pem(), key.serialize_pem(), hex)
    }
}

/// A byte from the kernel's randomness, for serial numbers.
fn rand_byte() -> u8 {
    use std::io::Read;
    let mut b = [0u8; 1];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b[0]
}

/// Writes a file the way an operator's tooling would: whole, by rename.
pub fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS client trusting `roots` (PEM), offering `alpn`.
pub fn tls_client(roots: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut roots.as_bytes()) {
        store.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// What one TLS request saw.
#[derive(Debug)]
pub struct TlsReply {
    pub status: u16,
    pub body: String,
    pub version: hyper::Version,
    /// Serial of the certificate the balancer presented, hex.
    pub serial: String,
}

/// `GET path` over a new TLS connection to `front` for server name `name`,
/// over HTTP/2 if ALPN chose it.
pub async fn tls_get(
    connector: &tokio_rustls::TlsConnector,
    front: SocketAddr,
    name: &str,
    path: &str,
) -> Result<TlsReply, String> {
    let tcp = TcpStream::connect(front).await.map_err(|e| e.to_string())?;
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = connector
        .connect(server, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let serial = {
        let conn = tls.get_ref().1;
        let der = conn.peer_certificates().unwrap()[0].clone();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        x.raw_serial().iter().map(|b| format!("{b:02x}")).collect()
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let req = Request::builder()
        .uri(format!("https://{name}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = if h2 {
        let (mut s, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        s.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.uri = path.parse().unwrap();
        parts
            .headers
            .insert("host", hyper::header::HeaderValue::from_str(name).unwrap());
        s.send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let version = resp.version();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(TlsReply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        version,
        serial,
    })
}
