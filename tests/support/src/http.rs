//! The one HTTP client of the tests: hyper's pooled client on plain HTTP (every test server is
//! on loopback), with a deadline on every exchange. Synchronous tests (the chart tests) use the
//! `blocking_*` forms, which drive the same client on a runtime of their own.

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::Request;

pub use http::Method;
pub use http::header::{CONTENT_TYPE, HeaderName};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Longest a request may take before the test fails; Prometheus queries over a fresh TSDB are
/// the slowest callers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A finished exchange.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    /// The body as text (lossy: tests print it).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON (status {}): {}", self.status, self.text()))
    }
}

/// Sends one request with `headers` and `body` and reads the whole answer. Fails on a
/// connection error or after [`REQUEST_TIMEOUT`]; any status is returned, not judged.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(HeaderName, &str)],
    body: Bytes,
) -> anyhow::Result<Response> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut builder = Request::builder().method(method.clone()).uri(url);
    for (name, value) in headers {
        builder = builder.header(name, *value);
    }
    let request = builder
        .body(Full::new(body))
        .with_context(|| format!("building {method} {url}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .with_context(|| format!("{method} {url}: is the server running?"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer to {method} {url}"))?
            .to_bytes();
        Ok::<_, anyhow::Error>(Response { status, body })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .with_context(|| format!("{method} {url} took longer than {REQUEST_TIMEOUT:?}"))?
}

/// `GET url`.
pub async fn get(url: &str) -> anyhow::Result<Response> {
    request(Method::GET, url, &[], Bytes::new()).await
}

/// `POST url` with a JSON body.
pub async fn post_json(url: &str, body: impl Into<Bytes>) -> anyhow::Result<Response> {
    request(
        Method::POST,
        url,
        &[(CONTENT_TYPE, "application/json")],
        body.into(),
    )
    .await
}

/// Runs `future` to completion on a fresh single-threaded runtime, for synchronous tests.
/// Must not be called from inside a runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|error| panic!("cannot build a tokio runtime: {error}"))
        .block_on(future)
}

/// [`get`] for synchronous tests.
pub fn blocking_get(url: &str) -> anyhow::Result<Response> {
    block_on(get(url))
}

/// [`post_json`] for synchronous tests.
pub fn blocking_post_json(url: &str, body: impl Into<Bytes>) -> anyhow::Result<Response> {
    block_on(post_json(url, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A one-shot server that answers every request with `answer` and returns what it read.
    async fn one_shot(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0; 4096];
            let n = stream.read(&mut buf).await.expect("read");
            stream.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (url, served)
    }

    #[tokio::test]
    async fn posts_json_and_reads_status_and_body() {
        let (url, served) =
            one_shot("HTTP/1.1 202 Accepted\r\ncontent-length: 11\r\n\r\n{\"ok\":true}").await;
        let response = post_json(&format!("{url}/publish"), "{}")
            .await
            .expect("answer");
        assert_eq!(response.status, 202);
        assert_eq!(response.json().expect("JSON")["ok"], true);
        let request = served.await.expect("served");
        assert!(request.starts_with("POST /publish HTTP/1.1"), "{request}");
        assert!(
            request.contains("content-type: application/json"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error() {
        let port = crate::free_port().expect("a free port");
        let error = get(&format!("http://127.0.0.1:{port}/"))
            .await
            .expect_err("nothing listens");
        assert!(
            error.to_string().contains("is the server running"),
            "{error}"
        );
    }
}
