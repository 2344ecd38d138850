//! Human-readable summaries of the scenario reports (the JSON form is the report structs).

use std::fmt::Write as _;

use crate::{fanout::FanoutReport, idle::IdleReport};

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0} {unit}"))
}

/// The idle report as text.
pub fn idle(r: &IdleReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== idle connections ({}) ==", r.peer.as_str());
    let _ = writeln!(
        out,
        "established          {} of {} in {:.1}s; failures {:?}",
        r.established, r.requested, r.open_seconds, r.failures
    );
    for s in &r.snapshots {
        let _ = write!(out, "[{:<11}]", s.label);
        if let Some(m) = s.service_memory {
            let _ = write!(
                out,
                " service VmRSS {} KiB (RssAnon {} KiB, HWM {} KiB)",
                m.vm_rss_kib, m.rss_anon_kib, m.vm_hwm_kib
            );
        }
        if let Some(k) = s.sockstat {
            let _ = write!(
                out,
                "; TCP sockets {} (buffers {} pages)",
                k.inuse, k.mem_pages
            );
        }
        if let Some(slab) = s.slab_unreclaimable_kib {
            let _ = write!(out, "; SUnreclaim {slab} KiB");
        }
        if let Some(q) = s.queues {
            let _ = write!(
                out,
                "; server side {} sockets Recv-Q {} B (max {}) Send-Q {} B; client side Recv-Q {} B Send-Q {} B",
                q.server_side.sockets,
                q.server_side.recv_q,
                q.server_side.max_recv_q,
                q.server_side.send_q,
                q.client_side.recv_q,
                q.client_side.send_q
            );
        }
        if let Some(c) = s.service_connections {
            let _ = write!(out, "; service says {c} connections");
        }
        if let Some(k) = s.service_kernel_buffered_bytes {
            let _ = write!(out, ", {k} kernel-buffered bytes");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "RSS per connection   {} (RssAnon {})",
        opt(r.rss_per_connection_bytes, "B"),
        opt(r.rss_anon_per_connection_bytes, "B")
    );
    let _ = writeln!(
        out,
        "kernel slab          {} per connection, both ends (outside RSS; system-wide SUnreclaim)",
        opt(r.kernel_slab_per_connection_pair_bytes, "B")
    );
    let _ = writeln!(
        out,
        "while held           {} pings received, {} pongs sent, {} unexpected messages, {} closed by server, {} read errors",
        r.pings_received, r.pongs_sent, r.unexpected_messages, r.closed_by_server, r.read_errors
    );
    out
}

/// The fan-out report as text.
pub fn fanout(r: &FanoutReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== fan-out ({}) ==", r.peer.as_str());
    let _ = writeln!(
        out,
        "subscribers          {} of {}; connect failures {:?}",
        r.subscribers, r.subscribers_requested, r.connect_failures
    );
    let _ = writeln!(
        out,
        "published            {} events accepted in {:.2}s = {:.0}/s (target {}/s, batch {}, {} publisher(s), data {} B); errors {:?}",
        r.published_accepted,
        r.publish_seconds,
        r.publish_rate,
        r.target_rate,
        r.batch,
        r.publishers,
        r.payload_bytes,
        r.publish_errors
    );
    let _ = writeln!(
        out,
        "received             {} of {} expected (missing {}) in {:.2}s, mean frame {:.0} B",
        r.received, r.expected, r.missing, r.delivery_seconds, r.mean_frame_bytes
    );
    let _ = writeln!(
        out,
        "deliveries/s         {:.0} overall; steady (median of per-second rates) {}",
        r.deliveries_per_second,
        opt(r.steady_deliveries_per_second, "/s")
    );
    let _ = writeln!(
        out,
        "per subscriber       min {} max {}; {} missing some; closed by server {:?}",
        r.per_subscriber_min,
        r.per_subscriber_max,
        r.subscribers_missing_some,
        r.subscribers_closed
    );
    let ms = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2} ms"));
    let _ = writeln!(
        out,
        "latency              p50 {} p99 {} max {} ({} samples, publish→receive)",
        ms(r.latency_p50_ms),
        ms(r.latency_p99_ms),
        ms(r.latency_max_ms),
        r.latency_samples
    );
    if let Some(s) = &r.service {
        let _ = writeln!(
            out,
            "service counted      {:.0} events, {:.0} deliveries, {:.0} drops {:?}, disconnects {:?}, {} connections at end",
            s.events_received,
            s.deliveries,
            s.drops,
            s.drops_by_reason,
            s.disconnects_by_reason,
            s.connections_at_end
        );
        let _ = writeln!(
            out,
            "service latency      p50 {} p99 {} (its own histogram: publish→written, per socket write)",
            ms(s.latency_p50_ms),
            ms(s.latency_p99_ms)
        );
    }
    let _ = writeln!(
        out,
        "CPU                  service {} s ({} µs per delivery), loadgen {} s",
        r.service_cpu_seconds
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}")),
        r.service_cpu_us_per_delivery
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}")),
        r.loadgen_cpu_seconds
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"))
    );
    out
}
