//! The recovery benchmark's figures: built from the clients' reports, the phase instants and the
//! service's counters, printed as a summary and available as one JSON object.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{
    Args, Cpu, Marks, QueueSamples, ServiceCounters, Step,
    client::{Anomaly, LiveReport, Mark, Order, RecoveringReport},
    publisher::{Published, Topic},
    service_counters,
};
use crate::metrics::Scrape;

/// Order statistics of a set of values.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Summary {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let at = |p: f64| -> Option<f64> {
            let last = values.len().checked_sub(1)?;
            let rank = ((p / 100.0) * last as f64).round() as usize;
            values.get(rank.min(last)).copied()
        };
        Self {
            n: values.len(),
            min: values.first().copied(),
            p50: at(50.0),
            p99: at(99.0),
            max: values.last().copied(),
        }
    }
}

/// CPU seconds each process used in one phase.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct CpuWindow {
    pub seconds: f64,
    pub service: Option<f64>,
    pub broker: Option<f64>,
    pub loadgen: Option<f64>,
}

impl CpuWindow {
    fn between(a: &Cpu, b: &Cpu) -> Self {
        let d = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| y - x);
        Self {
            seconds: b.at.duration_since(a.at).as_secs_f64(),
            service: d(a.service, b.service),
            broker: d(a.broker, b.broker),
            loadgen: d(a.loadgen, b.loadgen),
        }
    }
}

/// CPU per phase.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct CpuWindows {
    /// Everyone live (`--warmup`).
    pub warmup: CpuWindow,
    /// Only the live subscribers connected (`--gap`).
    pub gap: CpuWindow,
    /// From the reconnect until every client is caught up (or the wait gave up).
    pub recovery: CpuWindow,
    /// From the reconnect until every client is live (or the wait gave up).
    pub to_live: CpuWindow,
    /// From all live to the end of `--tail`.
    pub tail: CpuWindow,
}

/// The live subscribers' publish → receive latency per phase, in ms.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct LatencyWindows {
    pub warmup: Summary,
    pub gap: Summary,
    /// From the reconnect until every client is live.
    pub recovery: Summary,
    pub tail: Summary,
}

/// CPU per event replayed (everything each process did in the recovery window, live delivery
/// included, divided by the events replayed), in µs.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct PerReplayed {
    pub service: Option<f64>,
    pub broker: Option<f64>,
    pub loadgen: Option<f64>,
}

/// Everything the run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub clients: usize,
    pub live_subscribers: usize,
    pub rate: u64,
    /// Topics the events are spread over; each client is on one.
    pub topics: u64,
    /// Deliveries per second with everyone live: rate × (clients + live subscribers) / topics.
    pub steady_deliveries_per_s: f64,
    pub warmup_s: f64,
    pub gap_s: f64,
    pub tail_s: f64,
    pub body_bytes: usize,
    pub live_lag_ms: f64,
    pub recovery_max_events: u32,
    pub service_args: Vec<String>,
    pub loadgen_threads: usize,
    /// Events published over the whole run, and the rate achieved.
    pub published: u64,
    pub publish_rate: f64,
    pub publisher_max_behind_ms: f64,
    /// Events published before the reconnect instant.
    pub published_at_reconnect: u64,
    /// Per client, events of its topic published after its last one and before the reconnect.
    pub missed: Summary,
    /// Largest minus smallest last sequence number before the drop (with several topics, up to
    /// topics − 1 of it is only the clients being on different topics).
    pub since_spread: u64,
    /// Clients that got an answer `subscribed` after the reconnect.
    pub answered: usize,
    pub recovered: usize,
    pub not_recovered: usize,
    pub busy_retries: u64,
    pub clients_retried: usize,
    /// `subscribed` answers with `recovered: false`, reconnects after a close included.
    pub not_recovered_answers: u64,
    /// Connections the service closed after the reconnect (each followed by a reconnect with
    /// `since`), by close code, and the clients that had any.
    pub closes: BTreeMap<String, u64>,
    pub clients_closed: usize,
    pub failed: usize,
    /// Why clients failed, with how many failed so (recovering clients and live subscribers).
    pub errors: BTreeMap<String, usize>,
    /// Seconds from the reconnect instant, per client.
    pub ack_s: Summary,
    pub caught_up_s: Summary,
    pub live_s: Summary,
    pub all_caught_up_s: Option<f64>,
    pub all_live_s: Option<f64>,
    /// Events received after the reconnect that were published before it, all clients.
    pub replayed: u64,
    /// Ordering of the recovering clients before the drop and from the reconnect to the end.
    pub before: Order,
    pub after: Order,
    /// Clients with a gap, clients with a duplicate, and the first few of either (client index,
    /// what and where).
    pub clients_with_gaps: usize,
    pub clients_with_duplicates: usize,
    pub anomalies: Vec<(usize, Anomaly)>,
    /// Recovered clients whose first event after the reconnect was the one of their topic after
    /// their last.
    pub continued_exactly: usize,
    /// Clients that ended on the last event published on their topic.
    pub complete: usize,
    pub unrecovered_skipped: u64,
    pub unreadable: u64,
    pub live_order: Order,
    /// Live subscribers that ended on the last event published on their topic.
    pub live_complete: usize,
    pub live_failed: usize,
    pub latency_ms: LatencyWindows,
    pub cpu: CpuWindows,
    /// The service's own counters from the drop to the end of the tail.
    pub service: Option<ServiceCounters>,
    pub service_replayed_events: Option<f64>,
    pub cpu_per_replayed_event_us: PerReplayed,
    pub queues: QueueSamples,
    /// Answered, caught-up, live and failed clients once a second after the reconnect.
    pub timeline: Vec<Step>,
}

/// Deliveries per second with everyone live: each event goes to the clients and live
/// subscribers of its topic.
pub(super) fn steady_deliveries_per_s(args: &Args) -> f64 {
    args.rate as f64 * (args.clients + args.live) as f64 / args.topics.max(1) as f64
}

/// Whether a client on `topic` ended on the last event published on it (or, when none was,
/// received nothing and did not fail).
fn ended_on_last(topic: Topic, published: u64, last_seq: Option<u64>, failed: bool) -> bool {
    match topic.last_of(published) {
        Some(last) => last_seq == Some(last),
        None => last_seq.is_none() && !failed,
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn build(
    args: &Args,
    marks: &Marks,
    mark: Mark,
    publish: &Published,
    recovering: &[RecoveringReport],
    live: &[LiveReport],
    queues: QueueSamples,
    timeline: Vec<Step>,
    (scrape_before, scrape_after): (Option<Scrape>, Option<Scrape>),
) -> Report {
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64());
    let lasts: Vec<u64> = recovering
        .iter()
        .filter_map(|r| r.last_before_drop)
        .collect();
    let missed = Summary::of(
        recovering
            .iter()
            .filter_map(|r| {
                let last = r.last_before_drop?;
                Some(r.topic.events_between(last + 1, mark.published) as f64)
            })
            .collect(),
    );
    let mut before = Order::default();
    let mut after = Order::default();
    for r in recovering {
        before.add(&r.before);
        after.add(&r.after);
    }
    let mut live_order = Order::default();
    for l in live {
        live_order.add(&l.order);
    }
    let window_end = marks.all_live.or(marks.all_caught_up).unwrap_or(marks.end);
    let samples: Vec<(u64, u32)> = live
        .iter()
        .flat_map(|l| l.samples.iter().copied())
        .collect();
    let latency = |from: u64, to: u64| {
        Summary::of(
            samples
                .iter()
                .filter(|(at, _)| (from..to).contains(at))
                .map(|(_, lag)| f64::from(*lag) / 1000.0)
                .collect(),
        )
    };
    // Until all were caught up; when they never were, until the wait gave up.
    let recovery = CpuWindow::between(
        &marks.reconnect,
        marks.all_caught_up.as_ref().unwrap_or(&marks.watched),
    );
    let service = match (&scrape_before, &scrape_after) {
        (Some(b), Some(a)) => Some(service_counters(b, a)),
        _ => None,
    };
    let service_replayed_events = service.as_ref().map(|s| s.replayed_events);
    let replayed: u64 = recovering.iter().map(|r| r.replayed).sum();
    let per_event = |cpu: Option<f64>| {
        let events = service_replayed_events.unwrap_or(replayed as f64);
        cpu.filter(|_| events > 0.0).map(|c| c * 1e6 / events)
    };
    Report {
        clients: args.clients,
        live_subscribers: args.live,
        rate: args.rate,
        topics: args.topics,
        steady_deliveries_per_s: steady_deliveries_per_s(args),
        warmup_s: args.warmup.as_secs_f64(),
        gap_s: args.gap.as_secs_f64(),
        tail_s: args.tail.as_secs_f64(),
        body_bytes: super::wire::body(0, super::wire::now_micros(), &"x".repeat(args.pad_bytes))
            .len(),
        live_lag_ms: args.live_lag.as_secs_f64() * 1000.0,
        recovery_max_events: args.recovery_max_events,
        service_args: args.service_args.clone(),
        loadgen_threads: args.threads,
        published: publish.events,
        publish_rate: if publish.seconds > 0.0 {
            publish.events as f64 / publish.seconds
        } else {
            0.0
        },
        publisher_max_behind_ms: publish.max_behind.as_secs_f64() * 1000.0,
        published_at_reconnect: mark.published,
        missed,
        since_spread: lasts
            .iter()
            .max()
            .zip(lasts.iter().min())
            .map_or(0, |(a, b)| a - b),
        answered: recovering.iter().filter(|r| r.ack.is_some()).count(),
        recovered: recovering
            .iter()
            .filter(|r| r.recovered == Some(true))
            .count(),
        not_recovered: recovering
            .iter()
            .filter(|r| r.recovered == Some(false))
            .count(),
        busy_retries: recovering.iter().map(|r| u64::from(r.busy_retries)).sum(),
        clients_retried: recovering.iter().filter(|r| r.busy_retries > 0).count(),
        not_recovered_answers: recovering
            .iter()
            .map(|r| u64::from(r.not_recovered_answers))
            .sum(),
        closes: recovering.iter().flat_map(|r| r.closes.iter()).fold(
            BTreeMap::new(),
            |mut closes, code| {
                let key = code.map_or_else(|| "no_close_frame".to_owned(), |c| c.to_string());
                *closes.entry(key).or_insert(0) += 1;
                closes
            },
        ),
        clients_closed: recovering.iter().filter(|r| r.reconnects > 0).count(),
        failed: recovering.iter().filter(|r| r.error.is_some()).count(),
        errors: recovering
            .iter()
            .filter_map(|r| r.error.as_ref())
            .chain(live.iter().filter_map(|l| l.error.as_ref()))
            .fold(BTreeMap::new(), |mut errors, e| {
                *errors.entry(e.clone()).or_insert(0) += 1;
                errors
            }),
        ack_s: Summary::of(recovering.iter().filter_map(|r| secs(r.ack)).collect()),
        caught_up_s: Summary::of(
            recovering
                .iter()
                .filter_map(|r| secs(r.caught_up))
                .collect(),
        ),
        live_s: Summary::of(recovering.iter().filter_map(|r| secs(r.live)).collect()),
        all_caught_up_s: marks
            .all_caught_up
            .map(|c| c.at.duration_since(marks.reconnect.at).as_secs_f64()),
        all_live_s: marks
            .all_live
            .map(|c| c.at.duration_since(marks.reconnect.at).as_secs_f64()),
        replayed,
        before,
        after,
        clients_with_gaps: recovering.iter().filter(|r| r.after.gaps > 0).count(),
        clients_with_duplicates: recovering.iter().filter(|r| r.after.duplicates > 0).count(),
        anomalies: recovering
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.anomalies.iter().map(move |a| (i, a.clone())))
            .take(256)
            .collect(),
        continued_exactly: recovering
            .iter()
            .filter(|r| {
                r.recovered == Some(true)
                    && r.last_before_drop
                        .zip(r.first_after)
                        .is_some_and(|(last, first)| first == last + r.topic.count)
            })
            .count(),
        complete: recovering
            .iter()
            .filter(|r| ended_on_last(r.topic, publish.events, r.last_seq, r.error.is_some()))
            .count(),
        unrecovered_skipped: recovering.iter().map(|r| r.unrecovered_skipped).sum(),
        unreadable: recovering.iter().map(|r| r.unreadable).sum::<u64>()
            + live.iter().map(|l| l.unreadable).sum::<u64>(),
        live_order,
        live_complete: live
            .iter()
            .filter(|l| ended_on_last(l.topic, publish.events, l.last_seq, l.error.is_some()))
            .count(),
        live_failed: live.iter().filter(|l| l.error.is_some()).count(),
        latency_ms: LatencyWindows {
            warmup: latency(marks.warmup.at_us, marks.drop.at_us),
            gap: latency(marks.drop.at_us, marks.reconnect.at_us),
            recovery: latency(marks.reconnect.at_us, window_end.at_us),
            tail: latency(window_end.at_us, marks.end.at_us),
        },
        cpu: CpuWindows {
            warmup: CpuWindow::between(&marks.warmup, &marks.drop),
            gap: CpuWindow::between(&marks.drop, &marks.reconnect),
            recovery,
            to_live: CpuWindow::between(
                &marks.reconnect,
                marks.all_live.as_ref().unwrap_or(&marks.watched),
            ),
            tail: CpuWindow::between(&window_end, &marks.end),
        },
        service,
        service_replayed_events,
        cpu_per_replayed_event_us: PerReplayed {
            service: per_event(recovery.service),
            broker: per_event(recovery.broker),
            loadgen: per_event(recovery.loadgen),
        },
        queues,
        timeline,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.2}"))
}

fn s(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.2} s"))
}

fn cpu(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.2}"))
}

impl Summary {
    fn line(&self, fmt: fn(Option<f64>) -> String) -> String {
        format!(
            "min {} / p50 {} / p99 {} / max {} (n={})",
            fmt(self.min),
            fmt(self.p50),
            fmt(self.p99),
            fmt(self.max),
            self.n
        )
    }
}

impl CpuWindow {
    fn line(&self) -> String {
        let rate = |v: Option<f64>| {
            v.filter(|_| self.seconds > 0.0)
                .map_or("-".to_owned(), |v| {
                    format!("{v:.2} s ({:.2}/s)", v / self.seconds)
                })
        };
        format!(
            "{:>6.2} s wall: service {}, broker {}, loadgen {}",
            self.seconds,
            rate(self.service),
            rate(self.broker),
            rate(self.loadgen)
        )
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "recovery: {} clients reconnecting at once with since after a {:.0} s gap at {} events/s ({}-byte bodies) over {} topics, {} live subscribers; steady state {:.0} deliveries/s",
            self.clients,
            self.gap_s,
            self.rate,
            self.body_bytes,
            self.topics,
            self.live_subscribers,
            self.steady_deliveries_per_s
        );
        let _ = writeln!(
            o,
            "  published {} events at {:.1}/s (worst {:.1} ms behind schedule); {} before the reconnect",
            self.published,
            self.publish_rate,
            self.publisher_max_behind_ms,
            self.published_at_reconnect
        );
        let _ = writeln!(
            o,
            "  missed per client (its topic's events): {} events; since spread {}",
            self.missed
                .line(|v| v.map_or("-".into(), |v| format!("{v:.0}"))),
            self.since_spread
        );
        let _ = writeln!(
            o,
            "  first answers: {} of {} / recovered {} / recovered:false {} (all answers: {}) / busy retries {} ({} clients) / failed {}",
            self.answered,
            self.clients,
            self.recovered,
            self.not_recovered,
            self.not_recovered_answers,
            self.busy_retries,
            self.clients_retried,
            self.failed
        );
        if !self.closes.is_empty() {
            let _ = writeln!(
                o,
                "  closed by the service after the reconnect (then reconnected with since): {:?} ({} clients)",
                self.closes, self.clients_closed
            );
        }
        for (error, n) in &self.errors {
            let _ = writeln!(o, "  failed ({n}): {error}");
        }
        let _ = writeln!(o, "  subscribed reply: {}", self.ack_s.line(s));
        let _ = writeln!(o, "  caught up:        {}", self.caught_up_s.line(s));
        let _ = writeln!(
            o,
            "  live (≤{:.0} ms):    {}",
            self.live_lag_ms,
            self.live_s.line(s)
        );
        let _ = writeln!(
            o,
            "  ALL caught up after {}, ALL live after {}",
            s(self.all_caught_up_s),
            s(self.all_live_s)
        );
        let _ = writeln!(
            o,
            "  order after reconnect: {} events, {} gaps ({} missing), {} duplicates; continued exactly {}/{}; ended on their topic's last event {}/{}",
            self.after.received,
            self.after.gaps,
            self.after.missing,
            self.after.duplicates,
            self.continued_exactly,
            self.recovered,
            self.complete,
            self.clients
        );
        if !self.anomalies.is_empty() {
            let _ = writeln!(
                o,
                "  clients with gaps {}, with duplicates {}; first ones (client: kind seq after last, connection, events on it before):",
                self.clients_with_gaps, self.clients_with_duplicates
            );
            for (client, a) in self.anomalies.iter().take(12) {
                let _ = writeln!(
                    o,
                    "    {client}: {} {} after {}, connection {}, {} events before",
                    a.kind, a.seq, a.last, a.connection, a.on_connection
                );
            }
        }
        let _ = writeln!(
            o,
            "  before the drop: {} gaps, {} duplicates; replayed (client side) {}, service counted {}; unreadable frames {}",
            self.before.gaps,
            self.before.duplicates,
            self.replayed,
            self.service_replayed_events
                .map_or("-".to_owned(), |v| format!("{v:.0}")),
            self.unreadable
        );
        if let Some(service) = &self.service {
            let _ = writeln!(
                o,
                "  service: recoveries {:?}, disconnects {:?}, drops {:?}; at the end {} recoveries active, {} waiting, {} connections",
                service.recoveries,
                service.disconnects_by_reason,
                service.drops_by_reason,
                service.recoveries_active_at_end,
                service.recoveries_waiting_at_end,
                service.connections_at_end
            );
        }
        let _ = writeln!(
            o,
            "  live subscribers: {} events, {} gaps, {} duplicates, ended on their topic's last event {}/{}",
            self.live_order.received,
            self.live_order.gaps,
            self.live_order.duplicates,
            self.live_complete,
            self.live_subscribers
        );
        let _ = writeln!(
            o,
            "  live latency (ms) warm-up:  {}",
            self.latency_ms.warmup.line(ms)
        );
        let _ = writeln!(
            o,
            "  live latency (ms) gap:      {}",
            self.latency_ms.gap.line(ms)
        );
        let _ = writeln!(
            o,
            "  live latency (ms) recovery: {}",
            self.latency_ms.recovery.line(ms)
        );
        let _ = writeln!(
            o,
            "  live latency (ms) tail:     {}",
            self.latency_ms.tail.line(ms)
        );
        let _ = writeln!(o, "  CPU warm-up   {}", self.cpu.warmup.line());
        let _ = writeln!(o, "  CPU gap       {}", self.cpu.gap.line());
        let _ = writeln!(o, "  CPU recovery  {}", self.cpu.recovery.line());
        let _ = writeln!(o, "  CPU to live   {}", self.cpu.to_live.line());
        let _ = writeln!(o, "  CPU tail      {}", self.cpu.tail.line());
        let _ = writeln!(
            o,
            "  CPU per replayed event (whole recovery window): service {} µs, broker {} µs, loadgen {} µs",
            cpu(self.cpu_per_replayed_event_us.service),
            cpu(self.cpu_per_replayed_event_us.broker),
            cpu(self.cpu_per_replayed_event_us.loadgen)
        );
        let _ = writeln!(
            o,
            "  client Recv-Q during recovery: max {} B, mean {:.0} B; service Send-Q max {} B; live subscribers: Recv-Q max {} B, service Send-Q max {} B ({} samples)",
            self.queues.client_recv_q_max,
            self.queues.client_recv_q_mean,
            self.queues.service_send_q_max,
            self.queues.live_recv_q_max,
            self.queues.live_send_q_max,
            self.queues.samples
        );
        f.write_str(&o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_ends_on_the_last_event_of_its_topic() {
        let topic = Topic {
            index: 3,
            count: 10,
        };
        // 100 events published: the topic's last is 93.
        assert!(ended_on_last(topic, 100, Some(93), false));
        assert!(!ended_on_last(topic, 100, Some(83), false));
        assert!(!ended_on_last(topic, 100, Some(99), false));
        assert!(!ended_on_last(topic, 100, None, false));
        // One topic: the last event published.
        assert!(ended_on_last(Topic::default(), 100, Some(99), false));
        assert!(!ended_on_last(Topic::default(), 100, Some(93), false));
        // Nothing published on the topic: complete when nothing arrived and nothing failed.
        assert!(ended_on_last(topic, 3, None, false));
        assert!(!ended_on_last(topic, 3, None, true));
    }
}
