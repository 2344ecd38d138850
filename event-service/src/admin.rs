//! The admin port, kept off the public Service. Endpoints:
//!
//! - `GET /metrics` — Prometheus text format: every metric of [`crate::metrics`], the AMQP
//!   source's broker metrics when it runs, and process metrics. The socket- and outbound-queue
//!   aggregates are folded from each connection's latest samples at scrape time.
//! - `GET /debug/connections` — JSON, one object per open connection: `id`, `peer`, `age_seconds`,
//!   `subscriptions`, `recv_q` and `send_q` (kernel queues, latest sample), `outbound_bytes`.
//!   The `ss` view from inside the process.
//! - `GET /healthz` — liveness of the admin listener itself.

use std::{convert::Infallible, sync::Arc, time::Duration};

use eventrouter_contract::http as paths;
use http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    http::{Body, json, text},
    server::Shared,
};

/// Serves the admin port until `stop` fires.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, paths::METRICS_PATH) => metrics(shared),
        (&Method::GET, paths::DEBUG_CONNECTIONS_PATH) => connections(shared),
        (&Method::GET, paths::HEALTHZ_PATH) => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn metrics(shared: &Shared) -> Response<Body> {
    shared
        .metrics
        .refresh_queue_gauges(&shared.conns, shared.config.queue_alert_threshold_bytes);
    let encoder = TextEncoder::new();
    let mut out = Vec::with_capacity(16 * 1024);
    match encoder.encode(&shared.registry.gather(), &mut out) {
        Ok(()) => {
            let mut r = text(StatusCode::OK, out);
            if let Ok(ct) = http::HeaderValue::from_str(encoder.format_type()) {
                r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
            }
            r
        }
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode metrics: {error}\n"),
        ),
    }
}

fn connections(shared: &Shared) -> Response<Body> {
    let mut list = Vec::new();
    shared.conns.for_each(|c| {
        let s = c.sample();
        list.push(serde_json::json!({
            "id": c.id,
            "peer": c.peer.to_string(),
            "age_seconds": c.opened.elapsed().as_secs_f64(),
            "subscriptions": c.subscription_count(),
            "recv_q": s.recv_q,
            "send_q": s.send_q,
            "outbound_bytes": s.outbound,
        }));
    });
    json(StatusCode::OK, &serde_json::Value::Array(list))
}
