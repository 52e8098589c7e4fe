//! The balancer's counters as Prometheus metrics, and the admin listener
//! that serves them. These are the only counters: `status.json` (read by
//! `kiln server list` and the canary gate) is written from the same
//! atomics, so the two never disagree.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::BalancerError;

/// Every metric family of one balancer, in its own registry (not the
/// process-wide default, so several balancers can share a test process).
pub(crate) struct Metrics {
    pub registry: Registry,
    pub responses: IntCounterVec,
    pub errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub hedges: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub limit: IntGaugeVec,
    pub connections: IntCounterVec,
    pub open: IntGaugeVec,
    pub up: IntGaugeVec,
    pub checks_failed: IntCounterVec,
    pub duration: HistogramVec,
    pub client_connections: IntGauge,
    pub rejected: IntCounter,
    pub failed_open: IntCounter,
    pub bad_requests: IntCounter,
    pub queued: IntGauge,
    pub queue_timeouts: IntCounter,
    pub generation: IntGauge,
    pub cert_not_after: IntGauge,
}

/// The status classes responses are counted by, in `responses` order.
pub(crate) const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let cv = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let gv = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let c = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let g = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "kiln_balancer_response_seconds",
                "Time from sending a request to a backend to its response head",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["backend"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique");
        Arc::new(Metrics {
            responses: cv(
                "kiln_balancer_responses_total",
                "Responses from a backend, by status class",
                &["backend", "class"],
            ),
            errors: cv(
                "kiln_balancer_backend_errors_total",
                "Attempts that failed at the transport level (refused, timed out, reset before a response)",
                &["backend"],
            ),
            retries: cv(
                "kiln_balancer_retries_total",
                "Requests that failed on a backend and were sent to another",
                &["backend"],
            ),
            hedges: cv(
                "kiln_balancer_connect_hedges_total",
                "Extra connection attempts started because a connect was slow (a dropped SYN)",
                &["backend"],
            ),
            in_flight: gv(
                "kiln_balancer_in_flight_requests",
                "HTTP requests in flight on a backend",
                &["backend"],
            ),
            limit: gv(
                "kiln_balancer_backend_limit",
                "HTTP requests a backend is given at once, learnt from its full accept queue (0: no limit)",
                &["backend"],
            ),
            connections: cv(
                "kiln_balancer_backend_connections_total",
                "TCP mode: client connections relayed to a backend",
                &["backend"],
            ),
            open: gv(
                "kiln_balancer_backend_open_connections",
                "TCP mode: client connections relayed to a backend right now",
                &["backend"],
            ),
            up: gv(
                "kiln_balancer_backend_up",
                "1 while a backend passes its health checks and is in the served set",
                &["backend"],
            ),
            checks_failed: cv(
                "kiln_balancer_checks_failed_total",
                "Active health checks a backend failed",
                &["backend"],
            ),
            duration,
            client_connections: g(
                "kiln_balancer_client_connections",
                "Client connections open right now",
            ),
            rejected: c(
                "kiln_balancer_rejected_total",
                "Requests (HTTP) or connections (TCP) that found no backend up",
            ),
            failed_open: c(
                "kiln_balancer_failed_open_total",
                "TCP connections sent to failing backends because every backend was down",
            ),
            bad_requests: c(
                "kiln_balancer_bad_requests_total",
                "Malformed client requests answered with an error and closed",
            ),
            queued: g(
                "kiln_balancer_queued_requests",
                "HTTP requests waiting for room on a backend (every backend at its learnt limit)",
            ),
            queue_timeouts: c(
                "kiln_balancer_queue_timeouts_total",
                "HTTP requests answered 503 after waiting too long for room on a backend",
            ),
            generation: g(
                "kiln_balancer_generation",
                "Generation of the backend set being served",
            ),
            cert_not_after: g(
                "kiln_balancer_certificate_not_after_seconds",
                "Expiry of the served TLS certificate, seconds since the Unix epoch",
            ),
            registry,
        })
    }

    /// The per-backend handles, looked up once per backend instead of once
    /// per request.
    pub fn backend(&self, addr: &str) -> BackendMetrics {
        BackendMetrics {
            responses: CLASSES.map(|class| self.responses.with_label_values(&[addr, class])),
            errors: self.errors.with_label_values(&[addr]),
            retries: self.retries.with_label_values(&[addr]),
            hedges: self.hedges.with_label_values(&[addr]),
            in_flight: self.in_flight.with_label_values(&[addr]),
            limit: self.limit.with_label_values(&[addr]),
            connections: self.connections.with_label_values(&[addr]),
            open: self.open.with_label_values(&[addr]),
            up: self.up.with_label_values(&[addr]),
            checks_failed: self.checks_failed.with_label_values(&[addr]),
            duration: self.duration.with_label_values(&[addr]),
        }
    }

    /// Drops a forgotten backend's series.
    pub fn forget(&self, addr: &str) {
        for class in CLASSES {
            let _ = self.responses.remove_label_values(&[addr, class]);
        }
        let _ = self.errors.remove_label_values(&[addr]);
        let _ = self.retries.remove_label_values(&[addr]);
        let _ = self.hedges.remove_label_values(&[addr]);
        let _ = self.in_flight.remove_label_values(&[addr]);
        let _ = self.limit.remove_label_values(&[addr]);
        let _ = self.connections.remove_label_values(&[addr]);
        let _ = self.open.remove_label_values(&[addr]);
        let _ = self.up.remove_label_values(&[addr]);
        let _ = self.checks_failed.remove_label_values(&[addr]);
        let _ = self.duration.remove_label_values(&[addr]);
    }

    pub fn text(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// One backend's metric handles (each an `Arc` around atomics).
#[derive(Clone)]
pub(crate) struct BackendMetrics {
    pub responses: [IntCounter; 5],
    pub errors: IntCounter,
    pub retries: IntCounter,
    pub hedges: IntCounter,
    pub in_flight: IntGauge,
    pub limit: IntGauge,
    pub connections: IntCounter,
    pub open: IntGauge,
    pub up: IntGauge,
    pub checks_failed: IntCounter,
    pub duration: Histogram,
}

impl BackendMetrics {
    /// Counts one response by its status code.
    pub fn response(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[class].inc();
    }
}

/// Serves `/metrics` (Prometheus text format) and `/status` (the last
/// `status.json`) on `listener` until the task is aborted.
pub(crate) async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    status: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, status) = (metrics.clone(), status.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, status) = (metrics.clone(), status.clone());
                async move {
                    let (code, kind, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics.text()),
                        "/status" => (StatusCode::OK, "application/json", status()),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            b"see /metrics or /status\n".to_vec(),
                        ),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = code;
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(kind),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the admin listener.
pub(crate) async fn bind_admin(addr: &str) -> Result<TcpListener, BalancerError> {
    let parsed: SocketAddr = addr.parse().map_err(|_| BalancerError::Listen {
        addr: addr.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not IP:PORT"),
    })?;
    TcpListener::bind(parsed)
        .await
        .map_err(|source| BalancerError::Listen {
            addr: addr.to_string(),
            source,
        })
}
