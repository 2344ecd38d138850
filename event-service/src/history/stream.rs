//! RabbitMQ's history: the router's stream.
use std::time::Instant;

use super::{Lookup, ReadLimits};

pub struct StreamHistory {}

impl StreamHistory {
    pub async fn read_after(
        &self,
        _since: &str,
        _wanted: &(dyn Fn(&str) -> bool + Sync),
        _limits: ReadLimits,
        _bound_at: Instant,
    ) -> Lookup {
        Lookup::Unavailable("not yet".into())
    }
}
