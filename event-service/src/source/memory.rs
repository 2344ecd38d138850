//! The embedded bus: what `POST /publish` accepts goes straight to this instance's hub.
//!
//! No queue sits between publisher and hub: `dispatch` only enqueues onto the recipients' own
//! bounded outbound queues, so there is nothing here that can grow. A burst is paced by the
//! recipients: the publisher waits while a dispatch leaves queues more than half full.

use std::sync::Weak;

use super::{EventSink, Origin};
use crate::event::Event;

/// The embedded bus. It holds its sink weakly: the hub owns the source, so a strong reference
/// back would keep the hub alive forever.
#[derive(Clone)]
pub struct MemorySource {
    sink: Weak<dyn EventSink>,
}

impl MemorySource {
    pub fn new(sink: Weak<dyn EventSink>) -> Self {
        Self { sink }
    }

    /// Delivers every event to the hub; returns how many were taken (all of them, or none once
    /// the hub is gone). A large batch is paced: whenever a dispatch leaves recipients with more
    /// than half a queue, the rest waits for them to drain (see [`super::Backlog`]), and the
    /// task yields every [`YIELD_EVERY_DELIVERIES`] deliveries so a burst never holds a runtime
    /// worker for long.
    pub async fn publish(&self, events: Vec<Event>) -> usize {
        let mut since_yield = 0usize;
        let n = events.len();
        for event in events {
            let Some(sink) = self.sink.upgrade() else {
                return 0;
            };
            let dispatched = sink.dispatch(event, Origin::Memory, n == 1);
            since_yield += usize::try_from(dispatched.delivered).unwrap_or(usize::MAX);
            if let Some(backlog) = dispatched.backlog {
                sink.flush();
                drop(sink);
                backlog.drained().await;
                since_yield = 0;
            } else if since_yield >= YIELD_EVERY_DELIVERIES {
                sink.flush();
                drop(sink);
                tokio::task::yield_now().await;
                since_yield = 0;
            }
        }
        if let Some(sink) = self.sink.upgrade() {
            sink.flush();
        }
        n
    }
}

/// Deliveries after which a publishing task yields to the connections' writers.
pub const YIELD_EVERY_DELIVERIES: usize = 20_000;
