//! The embedded bus: what `POST /publish` accepts goes straight to this instance's hub.
//!
//! No queue sits between publisher and hub: `dispatch` only enqueues onto the recipients' own
//! bounded outbound queues, so there is nothing here that can grow.

use std::sync::Arc;

use super::{EventSink, Origin};
use crate::event::Event;

#[derive(Clone)]
pub struct MemorySource {
    sink: Arc<dyn EventSink>,
}

impl MemorySource {
    pub fn new(sink: Arc<dyn EventSink>) -> Self {
        Self { sink }
    }

    /// Delivers every event to the hub; returns how many were taken (all of them).
    pub fn publish(&self, events: Vec<Event>) -> usize {
        let n = events.len();
        for event in events {
            self.sink.dispatch(event, Origin::Memory);
        }
        n
    }
}
