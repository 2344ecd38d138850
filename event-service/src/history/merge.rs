//! The hand-over from history to live delivery, as pure data: one connection's live events held
//! while its recovery reads the history, and the ids replayed that may still arrive live.
//!
//! The connection's outbound queue owns a [`Hold`] while a recovery runs (and for a short while
//! after): live events go through [`Hold::admit`] first. The sequence is always
//! [`Hold::start`] → the history read → [`Hold::finish`], which returns the held events the
//! history did not already deliver, in arrival order.

use std::{collections::VecDeque, time::Instant};

use crate::connection::Outgoing;

/// What to do with a live event arriving at a connection with a [`Hold`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Deliver it as usual.
    Deliver,
    /// A recovery replayed it already: drop it silently.
    Duplicate,
    /// A recovery is running: hold it (see [`Hold::hold`]).
    Hold,
}

/// Live events held during a recovery, and the replayed ids live delivery must not repeat.
#[derive(Debug, Default)]
pub struct Hold {
    held: Option<VecDeque<(u64, Outgoing)>>,
    held_bytes: usize,
    /// Sorted id hashes the last recovery replayed that may still arrive live.
    replayed: Box<[u64]>,
    replayed_until: Option<Instant>,
}

impl Hold {
    /// Starts holding live events (a recovery begins).
    pub fn start(&mut self) {
        self.held = Some(VecDeque::new());
        self.held_bytes = 0;
    }

    /// Bytes of held events (they count against the connection's outbound bound).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Decides about a live event with id hash `id`.
    pub fn admit(&mut self, id: u64, now: Instant) -> Admit {
        if let Some(until) = self.replayed_until {
            if now >= until {
                self.replayed = Box::default();
                self.replayed_until = None;
            } else if self.replayed.binary_search(&id).is_ok() {
                return Admit::Duplicate;
            }
        }
        if self.held.is_some() {
            Admit::Hold
        } else {
            Admit::Deliver
        }
    }

    /// Holds a live event the caller was told to ([`Admit::Hold`]).
    pub fn hold(&mut self, id: u64, out: Outgoing) {
        if let Some(held) = self.held.as_mut() {
            self.held_bytes += out.frame.len();
            held.push_back((id, out));
        }
    }

    /// Drops the oldest held event (the drop-oldest policy); returns its size, `None` when none.
    pub fn drop_oldest(&mut self) -> Option<usize> {
        let (_, out) = self.held.as_mut()?.pop_front()?;
        self.held_bytes -= out.frame.len();
        Some(out.frame.len())
    }

    /// Discards every held event (the connection closes); returns how many there were.
    pub fn discard(&mut self) -> u64 {
        let n = self.held.take().map_or(0, |h| h.len() as u64);
        self.held_bytes = 0;
        n
    }

    /// Ends the recovery: `replayed` are the id hashes the history delivered. Returns the held
    /// events to deliver now (those not replayed), oldest first. `late` are the replayed ids that
    /// may still arrive live (dropped until `late_until`).
    pub fn finish(
        &mut self,
        replayed: &[u64],
        late: Vec<u64>,
        late_until: Instant,
    ) -> Vec<Outgoing> {
        let mut replayed_sorted = replayed.to_vec();
        replayed_sorted.sort_unstable();
        let held = self.held.take().unwrap_or_default();
        self.held_bytes = 0;
        let out = held
            .into_iter()
            .filter(|(id, _)| replayed_sorted.binary_search(id).is_err())
            .map(|(_, out)| out)
            .collect();
        if !late.is_empty() {
            let mut ids: Vec<u64> = late;
            // A previous recovery's window may still be open: keep both.
            if self.replayed_until.is_some() {
                ids.extend_from_slice(&self.replayed);
            }
            ids.sort_unstable();
            ids.dedup();
            self.replayed = ids.into_boxed_slice();
            self.replayed_until = Some(late_until);
        }
        out
    }

    /// True when the hold has nothing left to do (the queue can drop it).
    pub fn is_idle(&self) -> bool {
        self.held.is_none() && self.replayed_until.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn out(id: u64) -> Outgoing {
        Outgoing {
            frame: format!("e{id}").into(),
            published: None,
        }
    }

    fn frames(v: &[Outgoing]) -> Vec<String> {
        v.iter().map(|o| o.frame.to_string()).collect()
    }

    #[test]
    fn without_a_recovery_everything_is_delivered() {
        let mut hold = Hold::default();
        assert_eq!(hold.admit(1, Instant::now()), Admit::Deliver);
        assert!(hold.is_idle());
    }

    #[test]
    fn held_events_the_history_replayed_are_not_delivered_twice() {
        let now = Instant::now();
        let mut hold = Hold::default();
        hold.start();
        // Live 3, 4, 5 arrive while the history read returns 1..=4.
        for id in [3, 4, 5] {
            assert_eq!(hold.admit(id, now), Admit::Hold);
            hold.hold(id, out(id));
        }
        assert_eq!(hold.held_bytes(), 6);
        let rest = hold.finish(&[1, 2, 3, 4], vec![], now);
        assert_eq!(frames(&rest), ["e5"]);
        assert!(hold.is_idle());
    }

    #[test]
    fn held_events_keep_their_arrival_order() {
        let now = Instant::now();
        let mut hold = Hold::default();
        hold.start();
        for id in [9, 7, 8] {
            hold.hold(id, out(id));
        }
        assert_eq!(frames(&hold.finish(&[], vec![], now)), ["e9", "e7", "e8"]);
    }

    #[test]
    fn replayed_ids_arriving_late_are_dropped_until_the_window_ends() {
        let now = Instant::now();
        let mut hold = Hold::default();
        hold.start();
        let rest = hold.finish(&[1, 2], vec![2], now + Duration::from_secs(5));
        assert!(rest.is_empty());
        assert_eq!(hold.admit(2, now), Admit::Duplicate);
        assert_eq!(hold.admit(3, now), Admit::Deliver);
        assert_eq!(hold.admit(2, now + Duration::from_secs(6)), Admit::Deliver);
        assert!(hold.is_idle());
    }

    #[test]
    fn drop_oldest_and_discard_empty_the_held_events() {
        let mut hold = Hold::default();
        hold.start();
        hold.hold(1, out(1));
        hold.hold(2, out(22));
        assert_eq!(hold.drop_oldest(), Some(2));
        assert_eq!(hold.held_bytes(), 3);
        assert_eq!(hold.discard(), 1);
        assert!(hold.is_idle());
    }

    #[test]
    fn a_second_recovery_keeps_the_first_ones_late_window() {
        let now = Instant::now();
        let mut hold = Hold::default();
        hold.start();
        hold.finish(&[1], vec![1], now + Duration::from_secs(5));
        hold.start();
        assert_eq!(hold.admit(1, now), Admit::Duplicate);
        assert_eq!(hold.admit(5, now), Admit::Hold);
        hold.hold(5, out(5));
        let rest = hold.finish(&[4], vec![4], now + Duration::from_secs(5));
        assert_eq!(frames(&rest), ["e5"]);
        assert_eq!(hold.admit(1, now), Admit::Duplicate);
        assert_eq!(hold.admit(4, now), Admit::Duplicate);
    }
}
