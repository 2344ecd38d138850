//! The service's own view, scraped from its admin port's `/metrics`, so every load-generator
//! figure can be cross-checked against what the service counted.
//!
//! The text is read by the test-support crate's Prometheus reader, the one parser of the tests.

use std::net::SocketAddr;

use eventrouter_contract::http::METRICS_PATH;

use crate::http::{HttpClient, HttpError};

pub use eventrouter_test_support::prom::{Scrape, delta_by_label};

/// Fetches and parses `/metrics` from the admin address.
pub async fn scrape(admin: SocketAddr) -> Result<Scrape, HttpError> {
    let mut client = HttpClient::connect(admin).await?;
    let (status, body) = client.get(METRICS_PATH).await?;
    if status != 200 {
        return Err(HttpError::Status {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(Scrape::parse(&String::from_utf8_lossy(&body)))
}
