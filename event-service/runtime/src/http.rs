//! One way to run a hyper HTTP/1.1 server: the accept loop, per-connection serving with a
//! header-read deadline and graceful shutdown, and the response helpers every port shares.
//!
//! Accept errors (EMFILE when out of file descriptors, ECONNABORTED, ...) are logged and followed
//! by a short pause: retrying at once would spin a core while the condition lasts. Out of file
//! descriptors, clients would otherwise wait in the kernel's accept queue with no answer; the
//! loop keeps one descriptor in reserve (an open `/dev/null`), and when `accept` fails with
//! EMFILE or ENFILE it closes the reserve, accepts one waiting client, answers it
//! `503 Service Unavailable` with `Retry-After: 1` and `Connection: close`, closes it and reopens
//! the reserve (a few clients per pause, see [`SHED_BURST`]).

use std::{
    convert::Infallible,
    fs::File,
    future::Future,
    io::{self, Read, Write},
    net::SocketAddr,
    pin::pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, IntCounter, Registry, TextEncoder, proto::MetricFamily};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The response body of every port: a complete buffer.
pub type Body = Full<Bytes>;

/// How long the accept loop waits after a failed `accept` before trying again.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Most waiting clients answered 503 after one `accept` failed for lack of file descriptors,
/// before the loop pauses [`ACCEPT_ERROR_PAUSE`].
pub const SHED_BURST: usize = 64;

/// What a client gets when the process is out of file descriptors.
pub const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Retry-After: 1\r\n\
Connection: close\r\n\
Content-Length: 43\r\n\
\r\n\
server out of file descriptors; retry soon\n";

/// Counters of the accept loop, for a server that exports them (see [`ServeOptions`]).
#[derive(Clone, Debug)]
pub struct AcceptMetrics {
    /// `accept` failed because the process or the system is out of file descriptors.
    pub errors_no_fd: IntCounter,
    /// `accept` failed for another reason.
    pub errors_other: IntCounter,
    /// Clients answered 503 and closed because the process was out of file descriptors.
    pub shed: IntCounter,
}

/// How a server treats its connections.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Names the server in logs (`main`, `admin`).
    pub name: &'static str,
    /// A client that has not sent its request headers within this long is dropped.
    pub header_read_timeout: Duration,
    /// Disable Nagle's algorithm on accepted sockets (for ports that write their own batches).
    pub nodelay: bool,
    /// Where the accept loop counts failed accepts and shed clients (none: only logged).
    pub accept_metrics: Option<AcceptMetrics>,
}

impl ServeOptions {
    /// Defaults for a small internal port: a 10 s header deadline, Nagle left on, no counters.
    pub const fn internal(name: &'static str) -> Self {
        Self {
            name,
            header_read_timeout: Duration::from_secs(10),
            nodelay: false,
            accept_metrics: None,
        }
    }

    /// The same options, counting failed accepts and shed clients in `metrics`.
    pub fn with_accept_metrics(mut self, metrics: AcceptMetrics) -> Self {
        self.accept_metrics = Some(metrics);
        self
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
    // Both callbacks below use it; they never run at the same time.
    let reserve = std::sync::Mutex::new(Reserve::open(options.name));
    let accept_metrics = options.accept_metrics.clone();
    let (name, header_read_timeout, nodelay) =
        (options.name, options.header_read_timeout, options.nodelay);
    accept_loop(
        move || listener.accept(),
        name,
        &stop,
        |error: &io::Error| {
            let no_fd = is_out_of_fds(error);
            if let Some(m) = &accept_metrics {
                if no_fd {
                    &m.errors_no_fd
                } else {
                    &m.errors_other
                }
                .inc();
            }
            if no_fd {
                let shed = lock(&reserve).shed(listener, SHED_BURST);
                if let Some(m) = &accept_metrics {
                    m.shed.inc_by(shed as u64);
                }
                tracing::warn!(
                    server = name,
                    shed,
                    "out of file descriptors: waiting clients answered 503"
                );
            }
        },
        |(stream, peer): (TcpStream, SocketAddr)| {
            if nodelay {
                let _ = stream.set_nodelay(true);
            }
            lock(&reserve).refill();
            tokio::spawn(serve_connection(
                stream,
                peer,
                name,
                header_read_timeout,
                stop.clone(),
                make_service(peer),
            ));
        },
    )
    .await;
}

fn lock(reserve: &std::sync::Mutex<Reserve>) -> std::sync::MutexGuard<'_, Reserve> {
    reserve
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// EMFILE (this process) or ENFILE (the whole system): no descriptor for the new connection.
fn is_out_of_fds(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One descriptor kept open for the moment `accept` fails for lack of them (see the module).
struct Reserve {
    name: &'static str,
    file: Option<File>,
}

impl Reserve {
    const PATH: &'static str = "/dev/null";

    fn open(name: &'static str) -> Self {
        let mut reserve = Self { name, file: None };
        reserve.refill();
        if reserve.file.is_none() {
            tracing::warn!(
                server = name,
                "could not open the reserve descriptor; clients will not be answered 503 when out of file descriptors"
            );
        }
        reserve
    }

    /// Reopens the reserve if it was lost (taken by someone else while it was given back).
    fn refill(&mut self) {
        if self.file.is_none() {
            self.file = File::open(Self::PATH).ok();
        }
    }

    /// Answers up to `max` clients waiting in the accept queue with 503, one reserve descriptor
    /// at a time; returns how many. Never waits: stops when the queue is empty.
    fn shed(&mut self, listener: &TcpListener, max: usize) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        let mut shed = 0;
        while shed < max {
            // Give the reserve back so the accept below has a descriptor to take.
            self.file = None;
            let accepted = match listener.poll_accept(&mut cx) {
                Poll::Ready(Ok((stream, peer))) => {
                    if let Err(error) = answer_unavailable(stream) {
                        tracing::debug!(server = self.name, %peer, %error, "503 not delivered");
                    }
                    shed += 1;
                    true
                }
                // Nobody waiting, or still no descriptor (another thread took the reserve's).
                Poll::Ready(Err(_)) | Poll::Pending => false,
            };
            self.refill();
            if !accepted || self.file.is_none() {
                break;
            }
        }
        shed
    }
}

/// Writes [`SHED_RESPONSE`] and closes. Whatever the client already sent (its request) is read
/// first, so the close is a FIN rather than a reset that could discard the answer. Nothing here
/// waits: the descriptor is needed back at once.
fn answer_unavailable(stream: TcpStream) -> io::Result<()> {
    // Plain non-blocking syscalls: a freshly registered tokio stream does not know yet that it
    // is writable.
    let mut stream = stream.into_std()?;
    let mut buf = [0u8; 4096];
    let mut drain = |stream: &mut std::net::TcpStream| {
        for _ in 0..16 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    drain(&mut stream);
    let written = stream.write_all(SHED_RESPONSE);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    drain(&mut stream);
    written
}

/// Accepts until `stop` fires; after each failed accept calls `on_error` (counting, shedding)
/// and pauses [`ACCEPT_ERROR_PAUSE`].
async fn accept_loop<A, Fut, T>(
    mut accept: A,
    name: &'static str,
    stop: &CancellationToken,
    mut on_error: impl FnMut(&io::Error),
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
                on_error(&error);
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
    name: &'static str,
    header_read_timeout: Duration,
    stop: CancellationToken,
    service: S,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let mut conn = pin!(
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
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
        tracing::debug!(server = name, %peer, %error, "http connection ended with an error");
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
            |_| {},
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
    fn the_shed_response_is_well_formed() {
        let text = std::str::from_utf8(SHED_RESPONSE).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nRetry-After: 1\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
        assert!(
            head.ends_with(&format!("\r\nContent-Length: {}", body.len())),
            "{head}"
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
