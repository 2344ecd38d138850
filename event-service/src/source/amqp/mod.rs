//! RabbitMQ source (lapin). Placeholder until the AMQP source lands: every call reports the
//! broker as unavailable, so nothing pretends to work.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{EventSink, SourceError};
use crate::{config::Config, event::Event};

/// Why the AMQP source could not start (bad configuration only: an unreachable broker is not an
/// error at start, the source keeps retrying and readiness stays false).
#[derive(Debug, thiserror::Error)]
pub enum AmqpStartError {
    #[error("--source amqp needs --amqp-url or --amqp-url-file")]
    MissingUrl,
    #[error("could not read the AMQP URL file {path}: {source}")]
    UrlFile {
        path: String,
        source: std::io::Error,
    },
}

pub struct AmqpSource {
    _private: (),
}

impl AmqpSource {
    /// Starts the connection manager in the background and returns at once.
    pub async fn start(
        _config: &Config,
        _sink: Arc<dyn EventSink>,
        _registry: &prometheus::Registry,
        _shutdown: CancellationToken,
    ) -> Result<Arc<AmqpSource>, AmqpStartError> {
        Err(AmqpStartError::MissingUrl)
    }

    pub async fn bind(&self, _pattern: &str) -> Result<(), SourceError> {
        Err(SourceError::Unavailable(
            "the AMQP source is not built yet".into(),
        ))
    }
    pub async fn unbind(&self, _pattern: &str) -> Result<(), SourceError> {
        Err(SourceError::Unavailable(
            "the AMQP source is not built yet".into(),
        ))
    }
    pub async fn publish(&self, _events: Vec<Event>) -> Result<usize, SourceError> {
        Err(SourceError::Unavailable(
            "the AMQP source is not built yet".into(),
        ))
    }
    pub fn is_up(&self) -> bool {
        false
    }
}
