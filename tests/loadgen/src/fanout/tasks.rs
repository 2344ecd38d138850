//! The run's long-lived tasks: the publisher, the progress printer and one task per subscriber.

use super::*;

/// One publisher connection: posts batches until `deadline` (at its share of the rate, or as fast
/// as the service answers), counting what the service accepted; returns its errors by kind.
pub(super) async fn publish(
    p: usize,
    mut client: HttpClient,
    args: FanoutArgs,
    accepted: Arc<AtomicU64>,
    epoch: Instant,
    publish_start: Instant,
    deadline: Instant,
) -> BTreeMap<String, u64> {
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    // Each publisher owns its share of the rate; batches go out at fixed instants so a
    // slow response delays one batch, not the schedule.
    let interval = (args.rate > 0).then(|| {
        Duration::from_secs_f64(args.batch as f64 * args.publishers as f64 / args.rate as f64)
    });
    let mut seq = (p as u64) << 40;
    // Publishers take turns: publisher p starts p/publishers of an interval late. Started
    // together, their batches would reach the service at the same instants, and "one event per
    // publish" would arrive as `publishers` events at once (fanned out in one write each).
    let mut next = publish_start
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(p as f64 / args.publishers as f64)
        });
    while Instant::now() < deadline {
        if let Some(interval) = interval {
            tokio::time::sleep_until(next.into()).await;
            next += interval;
            if next > deadline + interval {
                break;
            }
        }
        let (path, body) = publish_request(
            args.common.peer,
            &args.event,
            args.batch,
            args.payload_bytes,
            seq,
            nanos_since(epoch),
        );
        seq += args.batch as u64;
        match client.post_json(path, Bytes::from(body)).await {
            Ok((status, body)) => {
                let (n, refused) = publish_outcome(args.common.peer, status, &body, args.batch);
                accepted.fetch_add(n, Ordering::Relaxed);
                for (kind, count) in refused {
                    *errors.entry(kind).or_insert(0) += count;
                }
            }
            Err(error) => {
                *errors.entry("io".into()).or_insert(0) += 1;
                tracing::warn!(%error, "publish failed; reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
                match connect_publisher(&args).await {
                    Ok(c) => client = c,
                    Err(_) => break,
                }
            }
        }
    }
    errors
}

/// Prints progress once a second while publishing; returns the deliveries of each second.
pub(super) async fn progress(
    stats: &[SubStats],
    accepted: &AtomicU64,
    received_before: u64,
    publish_start: Instant,
    deadline: Instant,
) -> Vec<f64> {
    let mut per_second = Vec::new();
    let mut last_total = received_before;
    let mut tick = tokio::time::interval_at(
        (publish_start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    while Instant::now() < deadline {
        tick.tick().await;
        let now_total = total(stats);
        let rate = (now_total - last_total) as f64;
        per_second.push(rate);
        last_total = now_total;
        eprintln!(
            "  t={:>3}s published {:>9} delivered {:>11} ({:>10.0}/s)",
            per_second.len(),
            accepted.load(Ordering::Relaxed),
            now_total - received_before,
            rate
        );
    }
    per_second
}

/// One subscriber: reads raw bytes, counts events, answers pings, notes a close.
pub(super) async fn subscriber(
    sub: Subscribed,
    slot: usize,
    stats: Arc<Vec<SubStats>>,
    sampler: Option<Samples>,
    epoch: Instant,
    read_buffer: usize,
) {
    let Subscribed {
        mut stream,
        mut scanner,
        mut protocol,
        messages_after_ack,
    } = sub;
    let me = &stats[slot];
    me.messages.fetch_add(messages_after_ack, Ordering::Relaxed);
    scanner.capture_data = sampler.is_some() || protocol.needs_payloads();
    let mut buf = vec![0u8; read_buffer.max(frame::MAX_HEADER_LEN)];
    let mut replies = Vec::new();
    let mut local_samples = Vec::new();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = me
                    .closed
                    .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed);
                return;
            }
            Ok(n) => n,
        };
        let now_ns = nanos_since(epoch);
        let mut tally = Tally::default();
        let fed = scanner.feed(&buf[..n], |header, payload| {
            protocol.on_frame(header, payload, &mut tally, &mut replies, |event| {
                if sampler.is_some()
                    && let Some(t) = timestamp_of(event)
                {
                    let micros = now_ns.saturating_sub(t) / 1000;
                    local_samples.push(u32::try_from(micros).unwrap_or(u32::MAX));
                }
            });
        });
        me.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if tally.events > 0 {
            me.messages.fetch_add(tally.events, Ordering::Relaxed);
            me.last_message_ns.store(now_ns, Ordering::Relaxed);
        }
        if let Some(sampler) = &sampler
            && !local_samples.is_empty()
            && let Ok(mut all) = sampler.lock()
        {
            all.append(&mut local_samples);
        }
        if fed.is_err() {
            let _ = me
                .closed
                .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed);
            return;
        }
        if let Some(code) = tally.close {
            me.closed.store(u64::from(code) + 1, Ordering::Relaxed);
            return;
        }
        if !replies.is_empty() {
            if stream.write_all(&replies).await.is_err() {
                return;
            }
            replies.clear();
        }
    }
}
