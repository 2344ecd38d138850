//! The embedded bus: what `POST /publish` accepts goes straight to this instance's hub.
//!
//! No queue sits between publisher and hub: `dispatch` only enqueues onto the recipients' own
//! bounded outbound queues, so there is nothing here that can grow.

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
    /// the hub is gone).
    pub fn publish(&self, events: Vec<Event>) -> usize {
        let Some(sink) = self.sink.upgrade() else {
            return 0;
        };
        let n = events.len();
        for event in events {
            sink.dispatch(event, Origin::Memory);
        }
        n
    }
}
