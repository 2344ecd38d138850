//! The part of a client connection other tasks can see: its bounded outbound queue, its latest
//! socket-queue samples and its close requests; plus the registry of open connections.
//!
//! The hub pushes shared event frames into [`ConnShared`]'s queue from whatever task dispatches
//! the event; the connection's own task (`session`) takes everything queued at once and writes it
//! as one batch. The queue sits behind a mutex touched by exactly those two parties, so a
//! delivery costs one uncontended lock, a refcount bump and — only when the queue was empty — one
//! task wake-up. The bound is counted in bytes of encoded frames, including the batch the writer
//! has taken but not yet handed to the socket.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use std::os::fd::RawFd;

use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Utf8Bytes;

mod frames;

use frames::Frames;

use crate::{
    config::SlowConsumerPolicy,
    direct::{self, Sent},
    history::{
        Kept, Turn, id_hash,
        merge::{Admit, Hold},
    },
    rebalance::Candidate,
};

/// Locks a std mutex, carrying on if a panicking holder poisoned it (the data stays consistent:
/// every critical section here is a few field updates).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// Where a group writer copies several frames for one `send` (see `direct`).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One frame waiting to be written.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The encoded text frame, shared by every recipient of the same event.
    pub frame: Utf8Bytes,
    /// When the event was published (`None` for control replies); feeds the latency histogram.
    pub published: Option<SystemTime>,
}

/// The configured bound and what to do when it is hit.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub max_bytes: usize,
    pub policy: SlowConsumerPolicy,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; `dropped_oldest` older frames were dropped to make room.
    Queued { dropped_oldest: u64 },
    /// Not queued: the frame alone is larger than the bound (drop-oldest policy).
    DroppedNew { dropped_oldest: u64 },
    /// The bound was hit under the disconnect policy: the queue (`discarded` frames, the new one
    /// included) was cleared and the connection asked to close as a slow consumer.
    Overflow { discarded: u64 },
    /// The connection is closing; nothing more is queued.
    Closed,
    /// Not queued: a recovery already delivered this event to the connection.
    Duplicate,
    /// Queued for the group writer (see `direct`): the caller hands the connection to
    /// [`crate::direct::Writers::mark`].
    ForWriter,
}

/// Why the server wants a connection closed (set by other tasks, acted on by the session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseRequest {
    Drain,
    SlowConsumer,
    /// This instance holds more than its share of the fleet's connections: reconnect elsewhere.
    Rebalance,
}

const CLOSE_NONE: u8 = 0;
const CLOSE_DRAIN: u8 = 1;
const CLOSE_SLOW: u8 = 2;
const CLOSE_REBALANCE: u8 = 3;

#[derive(Default)]
struct OutQueue {
    frames: Frames,
    /// Bytes of `frames` plus the batch the writer took and has not yet written.
    bytes: usize,
    closed: bool,
    /// Set while a recovery runs on this connection (and shortly after); boxed, as almost no
    /// connection ever has one.
    hold: Option<Box<Hold>>,
    /// Missed events the writer takes before the frames queued after the recovery finished.
    replay: Option<Box<Replay>>,
    /// The socket, while the connection's task is parked with nothing buffered: frames are then
    /// written into it by its group writer (see `direct`). `None` whenever the task is running.
    direct: Option<RawFd>,
    /// What a direct write left unwritten; the task writes it before anything else (a boxed
    /// slice: the inline frame of `frames` took the room of a `Vec`).
    partial: Option<Box<[u8]>>,
    /// On its group writer's list (see `direct`).
    marked: bool,
    /// A group writer is writing frames it took from this queue into the socket.
    writing: bool,
}

/// Replayed events taken by the writer a slice at a time (see [`ConnShared::finish_hold`]).
struct Replay {
    events: Vec<Arc<Kept>>,
    /// The recovery's turn (`--recovery-max-concurrent`): it lasts until the writer has taken
    /// the last replayed event, so at most that many replays drain at once.
    _turn: Option<Turn>,
    /// The next event to take.
    next: usize,
    /// Frames at the queue's front that were queued before the replay (they go first).
    before: usize,
}

/// Replayed events the writer takes at a time.
pub const REPLAY_SLICE: usize = 256;

/// The latest samples of one connection's queues, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueSample {
    pub recv_q: u64,
    pub send_q: u64,
    pub outbound: u64,
}

/// Shared state of one WebSocket connection.
pub struct ConnShared {
    pub id: u64,
    pub peer: SocketAddr,
    pub opened: Instant,
    queue: Mutex<OutQueue>,
    waker: AtomicWaker,
    outbound_bytes: AtomicU64,
    recv_q: AtomicU32,
    send_q: AtomicU32,
    close: AtomicU8,
    /// Set when a publisher gave up waiting for this connection to drain; cleared once it has.
    stalled: AtomicBool,
    /// Canonical patterns this connection holds (kept by the hub under its per-pattern locks).
    pub(crate) patterns: Mutex<Vec<Box<str>>>,
}

impl std::fmt::Debug for ConnShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnShared")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ConnShared {
    pub fn new(id: u64, peer: SocketAddr) -> Self {
        Self {
            id,
            peer,
            opened: Instant::now(),
            queue: Mutex::new(OutQueue::default()),
            waker: AtomicWaker::new(),
            outbound_bytes: AtomicU64::new(0),
            recv_q: AtomicU32::new(0),
            send_q: AtomicU32::new(0),
            close: AtomicU8::new(CLOSE_NONE),
            stalled: AtomicBool::new(false),
            patterns: Mutex::new(Vec::new()),
        }
    }

    /// Queues `out` under `limits`; wakes the connection's task when the queue was empty. For
    /// control replies and replayed events: a recovery's hold does not apply to them.
    pub fn push(&self, out: Outgoing, limits: QueueLimits) -> Pushed {
        let mut q = lock(&self.queue);
        let (pushed, wake) = self.push_locked(&mut q, out, limits, false);
        drop(q);
        if wake {
            self.waker.wake();
        }
        pushed
    }

    /// Queues a live event with id hash `id`: like [`ConnShared::push`], except that while a
    /// recovery runs the event is held for it (counted against the same bound), and an event the
    /// last recovery already replayed is dropped as a duplicate.
    pub fn push_event(&self, out: Outgoing, id: u64, limits: QueueLimits) -> Pushed {
        self.push_event_with(out, id, limits, false)
    }

    /// [`ConnShared::push_event`]; with `direct`, a parked connection's frame is left to its
    /// group writer ([`Pushed::ForWriter`]: the caller marks the connection) instead of waking
    /// the connection's task.
    pub(crate) fn push_event_with(
        &self,
        out: Outgoing,
        id: u64,
        limits: QueueLimits,
        direct: bool,
    ) -> Pushed {
        let mut q = lock(&self.queue);
        if let Some(hold) = q.hold.as_mut() {
            match hold.admit(id, Instant::now()) {
                Admit::Deliver => {
                    if hold.is_idle() {
                        q.hold = None;
                    }
                }
                Admit::Duplicate => return Pushed::Duplicate,
                Admit::Hold => return self.hold_locked(&mut q, id, out, limits),
            }
        }
        let (pushed, wake) = self.push_locked(&mut q, out, limits, direct);
        drop(q);
        if wake {
            self.waker.wake();
        }
        pushed
    }

    fn hold_locked(
        &self,
        q: &mut MutexGuard<'_, OutQueue>,
        id: u64,
        out: Outgoing,
        limits: QueueLimits,
    ) -> Pushed {
        if q.closed {
            return Pushed::Closed;
        }
        let len = out.frame.len();
        let mut dropped_oldest = 0u64;
        let held = |q: &OutQueue| q.hold.as_ref().map_or(0, |h| h.held_bytes());
        if q.bytes + held(q) > 0 && q.bytes + held(q) + len > limits.max_bytes {
            match limits.policy {
                SlowConsumerPolicy::Disconnect => {
                    let discarded =
                        q.frames.len() as u64 + q.hold.as_mut().map_or(0, |h| h.discard()) + 1;
                    self.overflow(q);
                    return Pushed::Overflow { discarded };
                }
                SlowConsumerPolicy::DropOldest => {
                    while q.bytes + held(q) + len > limits.max_bytes {
                        if q.hold.as_mut().and_then(|h| h.drop_oldest()).is_none() {
                            break;
                        }
                        dropped_oldest += 1;
                    }
                    if q.bytes + held(q) > 0 && q.bytes + held(q) + len > limits.max_bytes {
                        return Pushed::DroppedNew { dropped_oldest };
                    }
                }
            }
        }
        if let Some(hold) = q.hold.as_mut() {
            hold.hold(id, out);
        }
        Pushed::Queued { dropped_oldest }
    }

    /// Clears the queue and asks the connection to close as a slow consumer.
    fn overflow(&self, q: &mut MutexGuard<'_, OutQueue>) {
        q.direct = None;
        q.bytes -= q.frames.bytes();
        q.frames = Frames::default();
        q.replay = None;
        q.closed = true;
        self.outbound_bytes.store(q.bytes as u64, Ordering::Relaxed);
        self.request_close(CloseRequest::SlowConsumer);
    }

    /// Returns what happened and whether the connection's task must be woken.
    fn push_locked(
        &self,
        q: &mut MutexGuard<'_, OutQueue>,
        out: Outgoing,
        limits: QueueLimits,
        direct: bool,
    ) -> (Pushed, bool) {
        let len = out.frame.len();
        if q.closed {
            return (Pushed::Closed, false);
        }
        let mut dropped_oldest = 0u64;
        // The bound limits the backlog: one frame always fits into an empty queue, so an event
        // as large as the bound still reaches clients that keep up.
        if q.bytes > 0 && q.bytes + len > limits.max_bytes {
            match limits.policy {
                SlowConsumerPolicy::Disconnect => {
                    let discarded = q.frames.len() as u64 + 1;
                    self.overflow(q);
                    return (Pushed::Overflow { discarded }, false);
                }
                SlowConsumerPolicy::DropOldest => {
                    while q.bytes + len > limits.max_bytes {
                        let Some(old) = q.frames.pop_front() else {
                            break;
                        };
                        q.bytes -= old.frame.len();
                        dropped_oldest += 1;
                    }
                    if q.bytes > 0 && q.bytes + len > limits.max_bytes {
                        // What is left is the batch being written; it cannot be dropped.
                        self.outbound_bytes.store(q.bytes as u64, Ordering::Relaxed);
                        return (Pushed::DroppedNew { dropped_oldest }, false);
                    }
                }
            }
        }
        let was_empty = q.frames.is_empty();
        q.frames.push_back(out);
        q.bytes += len;
        self.outbound_bytes.store(q.bytes as u64, Ordering::Relaxed);
        if q.direct.is_some() && q.replay.is_none() && q.partial.is_none() {
            // The task is parked with nothing buffered: the group writer writes this.
            if direct && !q.marked {
                q.marked = true;
                return (Pushed::ForWriter, false);
            }
            if direct {
                return (Pushed::Queued { dropped_oldest }, false);
            }
        }
        (Pushed::Queued { dropped_oldest }, was_empty)
    }

    /// A recovery begins: live events are held from now on (see [`Hold`]).
    pub(crate) fn start_hold(&self) {
        let mut q = lock(&self.queue);
        q.hold.get_or_insert_with(Box::default).start();
    }

    /// A recovery ends. Queues `reply` (the `subscribed` answer), then hands the writer `replay`
    /// (the missed events, written after every frame queued so far and before anything queued
    /// later), then queues the held events the replay does not contain (under the bound, in
    /// arrival order), and drops `late` replayed ids arriving live until `late_until`. Returns
    /// what each push did, for the caller's counters. `turn` is kept until the writer has taken
    /// the last replayed event (released at once when nothing is replayed).
    ///
    /// The replay is not copied into the queue: the writer takes it a slice at a time straight
    /// from the shared history entries (8 bytes per event here), so a long replay neither
    /// counts against `--send-queue-bytes` nor needs pacing, and live events queue behind it
    /// under the usual bound.
    pub(crate) fn finish_hold(
        &self,
        reply: Option<Outgoing>,
        replay: Vec<Arc<Kept>>,
        late: Vec<u64>,
        late_until: Instant,
        limits: QueueLimits,
        turn: Option<Turn>,
    ) -> Vec<Pushed> {
        let replayed: Vec<u64> = replay.iter().map(|e| id_hash(&e.id)).collect();
        let mut q = lock(&self.queue);
        let mut wake = false;
        let mut pushed = Vec::new();
        if let Some(reply) = reply {
            let (p, w) = self.push_locked(&mut q, reply, limits, false);
            wake |= w;
            pushed.push(p);
        }
        if !replay.is_empty() && !q.closed {
            let before = q.frames.len();
            q.replay = Some(Box::new(Replay {
                events: replay,
                _turn: turn,
                next: 0,
                before,
            }));
            wake = true;
        }
        let rest = match q.hold.as_mut() {
            Some(hold) => {
                let rest = hold.finish(&replayed, late, late_until);
                if hold.is_idle() {
                    q.hold = None;
                }
                rest
            }
            None => Vec::new(),
        };
        for out in rest {
            let (p, w) = self.push_locked(&mut q, out, limits, false);
            wake |= w;
            pushed.push(p);
        }
        drop(q);
        if wake {
            self.waker.wake();
        }
        pushed
    }

    /// The group writer's turn (see `direct`): writes what is queued straight into the socket
    /// while the task is parked; wakes the task when the socket did not take it all.
    pub(crate) fn write_direct(&self, latency: &prometheus::local::LocalHistogram) {
        let (fd, mut frames) = {
            let mut q = lock(&self.queue);
            q.marked = false;
            let Some(fd) = q.direct else {
                // The task took over; it writes what is queued.
                return;
            };
            if q.frames.is_empty() || q.replay.is_some() || q.closed || q.writing {
                return;
            }
            // Written outside the lock (fan-out keeps pushing meanwhile); `writing` keeps the
            // task off the socket until this write is accounted for.
            q.writing = true;
            (fd, std::mem::take(&mut q.frames))
        };
        let sent = SCRATCH.with_borrow_mut(|scratch| {
            direct::send_texts(
                fd,
                frames.len(),
                |i| frames.get(i).map_or(&[], |o| o.frame.as_bytes()),
                scratch,
            )
        });
        let (whole, rest) = match sent {
            Sent::Frames(n) => (n, None),
            Sent::Partial(n, rest) => (n, Some(rest)),
        };
        let mut written = 0usize;
        let cut = whole + usize::from(rest.is_some());
        let mut oldest: Option<SystemTime> = None;
        for out in (0..cut).map_while(|_| frames.pop_front()) {
            written += out.frame.len();
            if let Some(t) = out.published {
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
        }
        if let Some(t) = oldest {
            // Like the task's writer: once per write, for its oldest event.
            let age = SystemTime::now().duration_since(t).unwrap_or_default();
            latency.observe(age.as_secs_f64());
        }
        let mut q = lock(&self.queue);
        q.writing = false;
        if let Some(rest) = rest {
            // The rest of the cut frame is the task's to write first; it counts until taken.
            q.bytes += rest.len();
            q.partial = Some(rest.into_boxed_slice());
        }
        q.bytes = q.bytes.saturating_sub(written);
        if !frames.is_empty() {
            // Not taken by the socket: back in front of what was queued meanwhile.
            frames.append(std::mem::take(&mut q.frames));
            q.frames = frames;
        }
        // Otherwise the drained `frames` is freed here: an idle connection keeps no queue
        // allocation (the next event allocates one, a small cost beside the write).
        self.outbound_bytes.store(q.bytes as u64, Ordering::Relaxed);
        if q.bytes == 0 {
            self.stalled.store(false, Ordering::Relaxed);
        }
        if q.partial.is_some() || q.direct.is_none() || (!q.frames.is_empty() && !q.marked) {
            // The socket is full, or the task wants it back, or frames queued meanwhile have
            // no writer coming: the task writes the rest.
            q.direct = None;
            drop(q);
            self.waker.wake();
        }
    }

    /// The connection's task parks with nothing buffered: its group writer may write frames into
    /// `fd` until [`ConnShared::stop_direct`]. Refused (false) when frames are queued or a
    /// replay is pending (the task has more to write: it was woken for that).
    pub(crate) fn start_direct(&self, fd: RawFd) -> bool {
        let mut q = lock(&self.queue);
        if q.closed || !q.frames.is_empty() || q.replay.is_some() || q.partial.is_some() {
            return false;
        }
        q.direct = Some(fd);
        true
    }

    /// The connection's task is about to use its socket: no more direct writes. `Err(())`
    /// while a group writer is still writing: the task must not touch the socket yet, and is
    /// woken when the writer is done. Otherwise returns what a direct write left unwritten (to
    /// write before anything else); its bytes count as written.
    #[allow(clippy::result_unit_err)]
    pub(crate) fn stop_direct(&self) -> Result<Option<Vec<u8>>, ()> {
        let mut q = lock(&self.queue);
        q.direct = None;
        if q.writing {
            return Err(());
        }
        let Some(rest) = q.partial.take() else {
            return Ok(None);
        };
        q.bytes = q.bytes.saturating_sub(rest.len());
        self.outbound_bytes.store(q.bytes as u64, Ordering::Relaxed);
        Ok(Some(rest.into_vec()))
    }

    /// [`ConnShared::stop_direct`] for a task that is going away: waits out a write in progress
    /// (one non-blocking `sendmsg`), so the socket is never closed under it.
    pub(crate) fn stop_direct_for_good(&self) {
        while self.stop_direct().is_err() {
            std::thread::yield_now();
        }
    }

    /// Bytes queued plus bytes a recovery holds.
    #[cfg(test)]
    pub(crate) fn queued_and_held_bytes(&self) -> usize {
        let q = lock(&self.queue);
        q.bytes + q.hold.as_ref().map_or(0, |h| h.held_bytes())
    }

    /// Events of a replay not yet taken by the writer.
    #[cfg(test)]
    pub(crate) fn replay_left(&self) -> usize {
        lock(&self.queue)
            .replay
            .as_ref()
            .map_or(0, |r| r.events.len() - r.next)
    }

    /// Moves every queued frame into `batch` (which the writer owns). The bytes stay counted
    /// until [`ConnShared::written`] reports them handed to the socket. During a replay it takes
    /// the frames queued before the replay, then at most [`REPLAY_SLICE`] replayed events, and
    /// returns true while more of the replay is left (take again once the batch is written).
    pub(crate) fn take_all(&self, batch: &mut VecDeque<Outgoing>) -> bool {
        let mut q = lock(&self.queue);
        let Some(mut replay) = q.replay.take() else {
            q.frames.move_all_into(batch);
            return false;
        };
        q.frames.move_front_into(replay.before, batch);
        replay.before = 0;
        let end = (replay.next + REPLAY_SLICE).min(replay.events.len());
        let mut bytes = 0;
        for event in &replay.events[replay.next..end] {
            bytes += event.frame.len();
            batch.push_back(Outgoing {
                frame: event.frame.clone(),
                published: None,
            });
        }
        replay.next = end;
        q.bytes += bytes;
        self.outbound_bytes.store(q.bytes as u64, Ordering::Relaxed);
        if replay.next < replay.events.len() {
            q.replay = Some(replay);
            true
        } else {
            // The replay is done: what was queued after it follows in the same batch (nothing
            // else would wake the writer for frames queued while the replay was pending).
            q.frames.move_all_into(batch);
            false
        }
    }

    /// The writer handed `bytes` of taken frames to the socket.
    pub(crate) fn written(&self, bytes: usize) {
        let mut q = lock(&self.queue);
        q.bytes = q.bytes.saturating_sub(bytes);
        self.outbound_bytes.store(q.bytes as u64, Ordering::Relaxed);
        if q.bytes == 0 {
            // Caught up: publishers wait for this connection again.
            self.stalled.store(false, Ordering::Relaxed);
        }
    }

    /// True while publishers do not wait for this connection (it stopped draining; see
    /// `source::Backlog`).
    pub(crate) fn is_closing(&self) -> bool {
        self.close_requested().is_some() || lock(&self.queue).closed
    }

    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Refuses further frames and empties the queue; returns how many frames were discarded.
    pub(crate) fn close_queue(&self) -> u64 {
        let mut q = lock(&self.queue);
        q.closed = true;
        q.direct = None;
        q.partial = None;
        let n = q.frames.len() as u64
            + q.hold.take().map_or(0, |mut h| h.discard())
            + q.replay
                .take()
                .map_or(0, |r| (r.events.len() - r.next) as u64);
        q.frames = Frames::default();
        q.bytes = 0;
        self.outbound_bytes.store(0, Ordering::Relaxed);
        n
    }

    pub(crate) fn register_waker(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Asks the connection's task to close the connection (first request wins); true when this
    /// request is the one that took effect.
    pub fn request_close(&self, why: CloseRequest) -> bool {
        let v = match why {
            CloseRequest::Drain => CLOSE_DRAIN,
            CloseRequest::SlowConsumer => CLOSE_SLOW,
            CloseRequest::Rebalance => CLOSE_REBALANCE,
        };
        let first = self
            .close
            .compare_exchange(CLOSE_NONE, v, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.waker.wake();
        }
        first
    }

    pub(crate) fn close_requested(&self) -> Option<CloseRequest> {
        match self.close.load(Ordering::Acquire) {
            CLOSE_DRAIN => Some(CloseRequest::Drain),
            CLOSE_SLOW => Some(CloseRequest::SlowConsumer),
            CLOSE_REBALANCE => Some(CloseRequest::Rebalance),
            _ => None,
        }
    }

    pub(crate) fn store_socket_sample(&self, recv_q: u32, send_q: u32) {
        self.recv_q.store(recv_q, Ordering::Relaxed);
        self.send_q.store(send_q, Ordering::Relaxed);
    }

    /// The latest socket samples and the current outbound queue size.
    pub fn sample(&self) -> QueueSample {
        QueueSample {
            recv_q: u64::from(self.recv_q.load(Ordering::Relaxed)),
            send_q: u64::from(self.send_q.load(Ordering::Relaxed)),
            outbound: self.outbound_bytes.load(Ordering::Relaxed),
        }
    }

    pub fn subscription_count(&self) -> usize {
        lock(&self.patterns).len()
    }
}

impl crate::source::Drainable for ConnShared {
    fn pending_bytes(&self) -> u64 {
        self.outbound_bytes.load(Ordering::Relaxed)
    }

    fn is_closed(&self) -> bool {
        self.close_requested().is_some() || lock(&self.queue).closed
    }

    fn mark_stalled(&self) {
        self.stalled.store(true, Ordering::Relaxed);
    }
}

/// Every open connection, by id: for metrics aggregation, `/debug/connections` and drain.
#[derive(Default)]
pub struct ConnRegistry {
    conns: Mutex<HashMap<u64, Arc<ConnShared>>>,
}

impl ConnRegistry {
    pub fn insert(&self, conn: Arc<ConnShared>) {
        lock(&self.conns).insert(conn.id, conn);
    }

    pub fn remove(&self, id: u64) {
        lock(&self.conns).remove(&id);
    }

    pub fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn for_each(&self, mut f: impl FnMut(&ConnShared)) {
        for c in lock(&self.conns).values() {
            f(c);
        }
    }

    /// A snapshot of the open connections (for drain, which must not hold the lock while waiting).
    pub fn snapshot(&self) -> Vec<Arc<ConnShared>> {
        lock(&self.conns).values().cloned().collect()
    }

    /// What rebalancing decides on: the connections not already asked to close, and the `n` of
    /// them open longest (oldest first). One pass over the registry, keeping
    /// a bounded heap of `n`. A connection asked to close stays registered until its close
    /// handshake ends; counting it would make the next decision shed past the target.
    pub fn movable(&self, n: usize) -> Movable {
        let mut open = 0usize;
        let mut heap = std::collections::BinaryHeap::with_capacity(n + 1);
        for c in lock(&self.conns).values() {
            if c.close_requested().is_some() {
                continue;
            }
            open += 1;
            if n == 0 {
                continue;
            }
            // Max-heap on (opened, id): the top is the youngest kept, dropped when one older comes.
            heap.push((c.opened, c.id));
            if heap.len() > n {
                heap.pop();
            }
        }
        let mut oldest: Vec<Candidate> = heap
            .into_iter()
            .map(|(accepted, id)| Candidate { id, accepted })
            .collect();
        oldest.sort_by_key(|c| (c.accepted, c.id));
        Movable { open, oldest }
    }

    /// Asks connection `id` to close; false when it is gone or already closing for another reason.
    pub fn request_close(&self, id: u64, why: CloseRequest) -> bool {
        lock(&self.conns)
            .get(&id)
            .is_some_and(|conn| conn.request_close(why))
    }
}

/// See [`ConnRegistry::movable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movable {
    /// Open connections not asked to close.
    pub open: usize,
    /// The oldest of them, oldest first.
    pub oldest: Vec<Candidate>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection allocates its shared state once (`Arc`: 16 bytes of counts; glibc adds
    /// 8 and rounds to 16): up to 248 bytes it takes a 272-byte chunk, part of the idle
    /// connection's budget (BENCHMARKS.md, memory per idle connection).
    #[test]
    fn the_shared_state_stays_within_its_memory_budget() {
        let size = std::mem::size_of::<ConnShared>();
        assert!(size <= 248, "ConnShared is {size} bytes; the budget is 248");
    }

    fn out(s: &'static str) -> Outgoing {
        Outgoing {
            frame: Utf8Bytes::from_static(s),
            published: None,
        }
    }

    fn conn() -> ConnShared {
        ConnShared::new(1, "127.0.0.1:1".parse().expect("addr"))
    }

    #[test]
    fn held_events_count_against_the_bound_under_either_policy() {
        let limits = |policy| QueueLimits {
            max_bytes: 10,
            policy,
        };
        // Disconnect: queued (4) + held (4) + 4 more is over 10: the connection is closed.
        let c = conn();
        c.push(out("rply"), limits(SlowConsumerPolicy::Disconnect));
        c.start_hold();
        assert_eq!(
            c.push_event(out("ev01"), 1, limits(SlowConsumerPolicy::Disconnect)),
            Pushed::Queued { dropped_oldest: 0 }
        );
        assert_eq!(c.queued_and_held_bytes(), 8);
        assert_eq!(
            c.push_event(out("ev02"), 2, limits(SlowConsumerPolicy::Disconnect)),
            Pushed::Overflow { discarded: 3 }
        );
        assert_eq!(c.close_requested(), Some(CloseRequest::SlowConsumer));

        // Drop-oldest: the oldest held event makes room; what the writer holds stays.
        let c = conn();
        c.push(out("rply"), limits(SlowConsumerPolicy::DropOldest));
        c.start_hold();
        c.push_event(out("ev01"), 1, limits(SlowConsumerPolicy::DropOldest));
        assert_eq!(
            c.push_event(out("ev02"), 2, limits(SlowConsumerPolicy::DropOldest)),
            Pushed::Queued { dropped_oldest: 1 }
        );
        let rest = c.finish_hold(
            None,
            Vec::new(),
            Vec::new(),
            Instant::now(),
            limits(SlowConsumerPolicy::DropOldest),
            None,
        );
        assert_eq!(rest, [Pushed::Queued { dropped_oldest: 0 }]);
        let mut batch = VecDeque::new();
        c.take_all(&mut batch);
        let frames: Vec<&str> = batch.iter().map(|o| o.frame.as_str()).collect();
        assert_eq!(frames, ["rply", "ev02"]);
    }

    #[tokio::test]
    async fn a_recovery_keeps_its_turn_until_the_writer_took_its_last_replayed_event() {
        let registry = prometheus::Registry::new();
        let metrics = crate::service_metrics::ServiceMetrics::register(&registry).expect("metrics");
        let recovery = crate::history::Recovery::new(
            crate::history::ReadLimits {
                max_events: 10_000,
                max_bytes: 1 << 20,
            },
            1,
        );
        let limits = QueueLimits {
            max_bytes: 1 << 20,
            policy: SlowConsumerPolicy::Disconnect,
        };
        let replay: Vec<Arc<Kept>> = (0..REPLAY_SLICE + 1)
            .map(|i| {
                Arc::new(Kept {
                    name: "a".into(),
                    id: format!("e{i}").into(),
                    time: std::time::SystemTime::now(),
                    frame: "e".into(),
                })
            })
            .collect();
        let c = conn();
        c.start_hold();
        let turn = recovery.turn(&metrics).await.expect("a turn");
        c.finish_hold(None, replay, Vec::new(), Instant::now(), limits, Some(turn));
        assert_eq!(metrics.recoveries_active.get(), 1);
        let mut batch = VecDeque::new();
        assert!(c.take_all(&mut batch), "one slice taken, one event left");
        assert_eq!(
            recovery.available(),
            0,
            "the turn is held while the replay drains"
        );
        batch.clear();
        assert!(!c.take_all(&mut batch));
        assert_eq!(batch.len(), 1);
        assert_eq!(
            recovery.available(),
            1,
            "the last event taken ends the turn"
        );
        assert_eq!(metrics.recoveries_active.get(), 0);

        // Nothing replayed: the turn ends with the recovery; a closed connection ends it too.
        let turn = recovery.turn(&metrics).await.expect("a turn");
        conn().finish_hold(
            None,
            Vec::new(),
            Vec::new(),
            Instant::now(),
            limits,
            Some(turn),
        );
        assert_eq!(recovery.available(), 1);
        let c = conn();
        c.start_hold();
        let turn = recovery.turn(&metrics).await.expect("a turn");
        let one = vec![Arc::new(Kept {
            name: "a".into(),
            id: "one".into(),
            time: std::time::SystemTime::now(),
            frame: "one".into(),
        })];
        c.finish_hold(None, one, Vec::new(), Instant::now(), limits, Some(turn));
        assert_eq!(recovery.available(), 0);
        c.close_queue();
        assert_eq!(recovery.available(), 1);
    }

    #[test]
    fn a_replayed_event_arriving_live_later_is_not_delivered_again() {
        let limits = QueueLimits {
            max_bytes: 1 << 20,
            policy: SlowConsumerPolicy::Disconnect,
        };
        let c = conn();
        c.start_hold();
        let seven = Arc::new(Kept {
            name: "a".into(),
            id: "seven".into(),
            time: std::time::SystemTime::now(),
            frame: "seven".into(),
        });
        c.finish_hold(
            None,
            vec![seven],
            vec![id_hash("seven")],
            Instant::now() + std::time::Duration::from_secs(10),
            limits,
            None,
        );
        assert_eq!(c.replay_left(), 1);
        assert_eq!(
            c.push_event(out("seven"), id_hash("seven"), limits),
            Pushed::Duplicate
        );
        assert_eq!(
            c.push_event(out("eight"), 8, limits),
            Pushed::Queued { dropped_oldest: 0 }
        );
    }

    #[test]
    fn movable_lists_the_oldest_connections_not_already_closing() {
        let registry = ConnRegistry::default();
        for id in 1..=5 {
            registry.insert(Arc::new(ConnShared::new(
                id,
                "127.0.0.1:1".parse().expect("addr"),
            )));
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let ids = |m: Movable| m.oldest.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(registry.movable(3)), [1, 2, 3]);
        assert_eq!(registry.movable(10).oldest.len(), 5);
        assert!(registry.movable(0).oldest.is_empty());
        assert_eq!(registry.movable(0).open, 5);
        assert!(registry.request_close(2, CloseRequest::Rebalance));
        assert!(
            !registry.request_close(2, CloseRequest::Rebalance),
            "already closing"
        );
        assert!(!registry.request_close(9, CloseRequest::Rebalance));
        let after = registry.movable(3);
        assert_eq!(after.open, 4, "a closing connection no longer counts");
        assert_eq!(ids(after), [1, 3, 4]);
        let two = registry.snapshot().into_iter().find(|c| c.id == 2);
        assert_eq!(
            two.and_then(|c| c.close_requested()),
            Some(CloseRequest::Rebalance)
        );
    }

    #[test]
    fn disconnect_policy_clears_and_requests_close() {
        let c = conn();
        let limits = QueueLimits {
            max_bytes: 10,
            policy: SlowConsumerPolicy::Disconnect,
        };
        assert_eq!(
            c.push(out("12345"), limits),
            Pushed::Queued { dropped_oldest: 0 }
        );
        assert_eq!(
            c.push(out("12345"), limits),
            Pushed::Queued { dropped_oldest: 0 }
        );
        assert_eq!(c.push(out("1"), limits), Pushed::Overflow { discarded: 3 });
        assert_eq!(c.close_requested(), Some(CloseRequest::SlowConsumer));
        assert_eq!(c.sample().outbound, 0);
        assert_eq!(c.push(out("1"), limits), Pushed::Closed);
    }

    #[test]
    fn drop_oldest_policy_keeps_the_newest_within_the_bound() {
        let c = conn();
        let limits = QueueLimits {
            max_bytes: 10,
            policy: SlowConsumerPolicy::DropOldest,
        };
        c.push(out("aaaa"), limits);
        c.push(out("bbbb"), limits);
        assert_eq!(
            c.push(out("cccc"), limits),
            Pushed::Queued { dropped_oldest: 1 }
        );
        assert_eq!(c.sample().outbound, 8);
        // Larger than the bound: everything older goes, the big frame alone is queued.
        assert_eq!(
            c.push(out("this frame is too big"), limits),
            Pushed::Queued { dropped_oldest: 2 }
        );
        let mut batch = VecDeque::new();
        c.take_all(&mut batch);
        assert_eq!(batch.len(), 1);
        // While that frame is being written, a new one that does not fit is the one dropped.
        assert_eq!(
            c.push(out("x"), limits),
            Pushed::DroppedNew { dropped_oldest: 0 }
        );
        assert_eq!(c.close_requested(), None);
    }

    #[test]
    fn one_frame_larger_than_the_bound_fits_an_empty_queue() {
        let c = conn();
        let limits = QueueLimits {
            max_bytes: 4,
            policy: SlowConsumerPolicy::Disconnect,
        };
        assert_eq!(
            c.push(out("123456"), limits),
            Pushed::Queued { dropped_oldest: 0 }
        );
        assert_eq!(c.push(out("1"), limits), Pushed::Overflow { discarded: 2 });
    }

    #[test]
    fn taken_bytes_count_until_written() {
        let c = conn();
        let limits = QueueLimits {
            max_bytes: 10,
            policy: SlowConsumerPolicy::Disconnect,
        };
        c.push(out("12345678"), limits);
        let mut batch = VecDeque::new();
        c.take_all(&mut batch);
        assert_eq!(batch.len(), 1);
        assert_eq!(
            c.sample().outbound,
            8,
            "still counted while in the writer's hands"
        );
        c.written(8);
        assert_eq!(c.sample().outbound, 0);
    }
}
