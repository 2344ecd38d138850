//! A keep-alive HTTP/1.1 client on one TCP connection (hyper's low-level client), used to post
//! event batches to `/publish` and to scrape `/metrics`.
//!
//! One connection per publisher keeps requests in order and makes the publisher's rate easy to
//! reason about; there is no pool to hide reconnects.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{client::conn::http1, header};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;

/// Why an HTTP exchange with the service failed.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("connecting to {addr}: {source} (is the service running there?)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP exchange failed: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("unexpected status {status}: {body}")]
    Status { status: u16, body: String },
}

/// One HTTP/1.1 connection.
pub struct HttpClient {
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
    /// A header sent with every request: `Authorization` with a publish key, or Centrifugo's
    /// `X-API-Key`.
    credential: Option<(header::HeaderName, header::HeaderValue)>,
}

impl HttpClient {
    /// Connects and performs the HTTP/1.1 handshake; the connection task runs in the background
    /// until the client is dropped.
    pub async fn connect(addr: SocketAddr) -> Result<Self, HttpError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| HttpError::Connect { addr, source })?;
        // Requests are small and latency matters more than packet count on loopback.
        stream
            .set_nodelay(true)
            .map_err(|source| HttpError::Connect { addr, source })?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended");
            }
        });
        Ok(Self {
            addr,
            sender,
            credential: None,
        })
    }

    /// Sends `Authorization: Bearer <key>` with every request from now on.
    pub fn set_bearer(&mut self, key: &str) -> Result<(), HttpError> {
        self.set_credential(header::AUTHORIZATION, &format!("Bearer {key}"))
    }

    /// Sends `X-API-Key: <key>` (Centrifugo's HTTP API key) with every request from now on.
    pub fn set_api_key(&mut self, key: &str) -> Result<(), HttpError> {
        self.set_credential(header::HeaderName::from_static("x-api-key"), key)
    }

    fn set_credential(&mut self, name: header::HeaderName, value: &str) -> Result<(), HttpError> {
        let value =
            header::HeaderValue::from_str(value).map_err(|e| HttpError::Request(e.into()))?;
        self.credential = Some((name, value));
        Ok(())
    }

    async fn send(
        &mut self,
        method: hyper::Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(u16, Bytes), HttpError> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string());
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        if let Some((name, value)) = &self.credential {
            builder = builder.header(name, value.clone());
        }
        let request = builder.body(Full::new(body))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// `GET path`: status and body.
    pub async fn get(&mut self, path: &str) -> Result<(u16, Bytes), HttpError> {
        self.send(hyper::Method::GET, path, None, Bytes::new())
            .await
    }

    /// `POST path` with a JSON body: status and body.
    pub async fn post_json(&mut self, path: &str, body: Bytes) -> Result<(u16, Bytes), HttpError> {
        self.send(hyper::Method::POST, path, Some("application/json"), body)
            .await
    }
}
