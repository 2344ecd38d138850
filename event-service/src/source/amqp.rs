//! RabbitMQ source (lapin). Placeholder until the AMQP source lands: every call reports the
//! broker as unavailable, so nothing pretends to work.

use super::SourceError;
use crate::event::Event;

pub struct AmqpSource {
    _private: (),
}

impl AmqpSource {
    pub async fn bind(&self, _pattern: &str) -> Result<(), SourceError> {
        Err(SourceError::Unavailable("the AMQP source is not built yet".into()))
    }
    pub async fn unbind(&self, _pattern: &str) -> Result<(), SourceError> {
        Err(SourceError::Unavailable("the AMQP source is not built yet".into()))
    }
    pub async fn publish(&self, _events: Vec<Event>) -> Result<usize, SourceError> {
        Err(SourceError::Unavailable("the AMQP source is not built yet".into()))
    }
    pub fn is_up(&self) -> bool {
        false
    }
}
