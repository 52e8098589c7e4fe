//! The control channel over HTTP (`kiln balancer serve --control ADDR`),
//! for a balancer whose control directory kiln cannot write: one running
//! as a Swarm service on another machine. It carries exactly what the
//! directory carries, and writes through the same files, so the balancer
//! itself works the same either way:
//!
//! - `PUT /backends`: a [`Backends`] document; stored as the next
//!   generation (the document's own is ignored), answered with
//!   `{"generation": N}`. kiln then waits on `/status` until N is served.
//! - `GET /status`: `status.json` as the balancer last wrote it.
//! - `GET /metrics`: the Prometheus text of the admin listener.
//!
//! Every request must carry `Authorization: Bearer TOKEN`, the token kiln
//! gave the balancer (`KILN_BALANCER_TOKEN`): whoever can switch backends
//! can send a role's traffic anywhere.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::control::{self, Backends};
use crate::metrics::Metrics;

/// The largest `Backends` document accepted (thousands of backends fit).
const MAX_BODY: usize = 1 << 20;

/// Serves the control channel on `listener` until the task is aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    dir: PathBuf,
    token: Arc<str>,
    metrics: Arc<Metrics>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (dir, token, metrics) = (dir.clone(), token.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (dir, token, metrics) = (dir.clone(), token.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(answer(req, &dir, &token, &metrics).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(code: StatusCode, kind: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    resp
}

fn text(code: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    reply(code, "text/plain", format!("{msg}\n").into_bytes())
}

/// Whether the request carries the token. The comparison looks at every
/// byte whatever the first difference, so its time says nothing of the token.
fn authorized(req: &Request<hyper::body::Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    dir: &std::path::Path,
    token: &str,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if !authorized(&req, token) {
        return text(StatusCode::UNAUTHORIZED, "a bearer token is required");
    }
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/status") => match std::fs::read(control::status_path(dir)) {
            Ok(b) => reply(StatusCode::OK, "application/json", b),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "no status written yet"),
        },
        (Method::GET, "/metrics") => {
            reply(StatusCode::OK, "text/plain; version=0.0.4", metrics.text())
        }
        (Method::PUT, "/backends") => put_backends(req, dir).await,
        _ => text(
            StatusCode::NOT_FOUND,
            "see PUT /backends, GET /status or GET /metrics",
        ),
    }
}

async fn put_backends(
    req: Request<hyper::body::Incoming>,
    dir: &std::path::Path,
) -> Response<Full<Bytes>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
    };
    let backends: Backends = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("not a backend set: {e}")),
    };
    match control::store_backends(dir, backends) {
        Ok(generation) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::json!({ "generation": generation })
                .to_string()
                .into_bytes(),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &kiln_model::error_chain(&e),
        ),
    }
}
