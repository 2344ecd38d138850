//! The operator's admin HTTP server.
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 while the process runs |
//! | `/readyz` | 200 once the API server answered (leader or standby), else 503 |
//! | `/metrics` | Prometheus text format (see `metrics`) |

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use eventrouter_runtime::http::{self as serving, Body, ServeOptions, metrics_response, text};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A readiness latch: set once the API server is reachable.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

fn route(path: &str, metrics: &Metrics, readiness: &Readiness) -> Response<Body> {
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the API server has not answered yet\n",
        ),
        "/metrics" => metrics_response(&metrics.registry),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serve the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    serving::serve(
        listener,
        ServeOptions::internal("admin"),
        shutdown,
        |_peer| {
            let (metrics, readiness) = (metrics.clone(), readiness.clone());
            service_fn(move |request: Request<Incoming>| {
                let response = route(request.uri().path(), &metrics, &readiness);
                async move { Ok::<_, Infallible>(response) }
            })
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_a_latch_that_gates_readyz() {
        let metrics = Metrics::new();
        let readiness = Readiness::default();
        assert_eq!(
            route("/readyz", &metrics, &readiness).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        readiness.set(true);
        assert_eq!(
            route("/readyz", &metrics, &readiness).status(),
            StatusCode::OK
        );
        assert_eq!(
            route("/healthz", &metrics, &readiness).status(),
            StatusCode::OK
        );
        assert_eq!(
            route("/nope", &metrics, &readiness).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn metrics_are_served_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let metrics = Metrics::new();
        metrics.leader.set(1);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            metrics,
            Readiness::default(),
            shutdown.clone(),
        ));
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        stream.read_to_string(&mut body).await.expect("read");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("eventrouter_operator_leader 1"), "{body}");
        shutdown.cancel();
        server.await.expect("server stops");
    }
}
