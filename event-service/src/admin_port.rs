//! The admin port, kept off the public Service. Endpoints:
//!
//! - `GET /metrics` — Prometheus text format: every metric of [`crate::service_metrics`], the AMQP
//!   source's broker metrics when it runs, and process metrics. The socket- and outbound-queue
//!   aggregates are folded from each connection's latest samples at scrape time.
//! - `GET /debug/connections` — JSON, one object per open connection: `id`, `peer`, `age_seconds`,
//!   `subscriptions`, `recv_q` and `send_q` (kernel queues, latest sample), `outbound_bytes`.
//!   The `ss` view from inside the process.
//! - `GET /healthz` — liveness of the admin listener itself.

use std::{convert::Infallible, sync::Arc};

use eventrouter_contract::http as paths;
use eventrouter_runtime::http::{
    self as serving, Body, ServeOptions, json, metrics_response, text,
};
use http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// Serves the admin port until `stop` fires.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let options =
        ServeOptions::internal("admin").with_accept_metrics(shared.metrics.accept_metrics());
    serving::serve(listener, options, stop, |_peer| {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(req, &shared)) }
        })
    })
    .await;
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
    metrics_response(&shared.registry)
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
