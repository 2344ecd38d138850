//! One way to run a hyper HTTP/1.1 server: the accept loop, per-connection serving with a
//! header-read deadline and graceful shutdown, and the response helpers every port shares.
//!
//! Accept errors (EMFILE when out of file descriptors, ECONNABORTED, ...) are logged and followed
//! by a short pause: retrying at once would spin a core while the condition lasts.

use std::{convert::Infallible, future::Future, io, net::SocketAddr, pin::pin, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder, proto::MetricFamily};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The response body of every port: a complete buffer.
pub type Body = Full<Bytes>;

/// How long the accept loop waits after a failed `accept` before trying again.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How a server treats its connections.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Names the server in logs (`main`, `admin`).
    pub name: &'static str,
    /// A client that has not sent its request headers within this long is dropped.
    pub header_read_timeout: Duration,
    /// Disable Nagle's algorithm on accepted sockets (for ports that write their own batches).
    pub nodelay: bool,
}

impl ServeOptions {
    /// Defaults for a small internal port: a 10 s header deadline, Nagle left on.
    pub const fn internal(name: &'static str) -> Self {
        Self {
            name,
            header_read_timeout: Duration::from_secs(10),
            nodelay: false,
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `stop` fires.
///
/// `make_service` builds the service of one connection from the peer address. Upgrades
/// (`101 Switching Protocols`) are allowed. When `stop` fires the listener is no longer polled
/// and every open connection finishes its in-flight request and closes; this returns at once
/// without waiting for them.
pub async fn serve<F, S>(
    listener: TcpListener,
    options: ServeOptions,
    stop: CancellationToken,
    make_service: F,
) where
    F: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let listener = &listener;
    accept_loop(
        move || listener.accept(),
        options.name,
        &stop,
        |(stream, peer): (TcpStream, SocketAddr)| {
            if options.nodelay {
                let _ = stream.set_nodelay(true);
            }
            tokio::spawn(serve_connection(
                stream,
                peer,
                options,
                stop.clone(),
                make_service(peer),
            ));
        },
    )
    .await;
}

/// Accepts until `stop` fires, pausing [`ACCEPT_ERROR_PAUSE`] after each failed accept.
async fn accept_loop<A, Fut, T>(
    mut accept: A,
    name: &'static str,
    stop: &CancellationToken,
    mut handle: impl FnMut(T),
) where
    A: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accept() => accepted,
        };
        match accepted {
            Ok(connection) => handle(connection),
            Err(error) => {
                tracing::warn!(server = name, %error, "accept failed; pausing before the next");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
}

async fn serve_connection<S>(
    stream: TcpStream,
    peer: SocketAddr,
    options: ServeOptions,
    stop: CancellationToken,
    service: S,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let mut conn = pin!(
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
    );
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(server = options.name, %peer, %error, "http connection ended with an error");
    }
}

/// A `text/plain` response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    with_content_type(
        status,
        body.into(),
        HeaderValue::from_static("text/plain; charset=utf-8"),
    )
}

fn with_content_type(status: StatusCode, body: Bytes, content_type: HeaderValue) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// An `application/json` response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    with_content_type(
        status,
        Bytes::from(value.to_string()),
        HeaderValue::from_static("application/json"),
    )
}

/// `GET /metrics`: everything in `registry` in the Prometheus text format.
pub fn metrics_response(registry: &Registry) -> Response<Body> {
    encode_metrics(&registry.gather())
}

/// Encodes metric families; a failure is a 500 naming it (never an empty 200, which a scraper
/// would take as "no metrics").
pub fn encode_metrics(families: &[MetricFamily]) -> Response<Body> {
    let encoder = TextEncoder::new();
    let mut out = Vec::with_capacity(16 * 1024);
    match encoder.encode(families, &mut out) {
        Ok(()) => match HeaderValue::from_str(encoder.format_type()) {
            Ok(content_type) => with_content_type(StatusCode::OK, out.into(), content_type),
            Err(_) => text(StatusCode::OK, out),
        },
        Err(error) => {
            tracing::error!(%error, "could not encode metrics");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("could not encode metrics: {error}\n"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn accept_errors_pause_instead_of_spinning() {
        let stop = CancellationToken::new();
        let calls = Arc::new(AtomicU32::new(0));
        let started = tokio::time::Instant::now();
        let (counter, stopper) = (calls.clone(), stop.clone());
        accept_loop(
            move || {
                if counter.fetch_add(1, Ordering::Relaxed) + 1 == 5 {
                    stopper.cancel();
                }
                std::future::ready(Err::<(), _>(io::Error::other("EMFILE")))
            },
            "test",
            &stop,
            |()| {},
        )
        .await;
        assert_eq!(calls.load(Ordering::Relaxed), 5);
        assert!(
            started.elapsed() >= ACCEPT_ERROR_PAUSE * 4,
            "five failed accepts took only {:?}: no pause between them",
            started.elapsed()
        );
    }

    #[test]
    fn a_metrics_encoding_failure_is_a_500_with_the_reason() {
        // A family without metrics is refused by the text encoder.
        let mut family = MetricFamily::default();
        family.set_name("eventrouter_test_empty".into());
        let response = encode_metrics(&[family]);
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn metrics_are_encoded_with_the_prometheus_content_type() {
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("eventrouter_test_total", "test").expect("new");
        registry
            .register(Box::new(counter.clone()))
            .expect("register");
        counter.inc();
        let response = metrics_response(&registry);
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .expect("ascii");
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    #[tokio::test]
    async fn serves_until_stopped_then_refuses() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            ServeOptions::internal("test"),
            stop.clone(),
            |peer: SocketAddr| {
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = format!("{} from {}\n", req.uri().path(), peer.ip());
                    async move { Ok::<_, Infallible>(text(StatusCode::OK, body)) }
                })
            },
        ));
        let answer = get(addr, "/hello").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("/hello from 127.0.0.1\n"), "{answer}");
        stop.cancel();
        server.await.expect("the server returns once stopped");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed after stop"
        );
    }
}
