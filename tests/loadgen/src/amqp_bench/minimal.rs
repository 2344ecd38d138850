//! The minimal consumer: AMQP 0-9-1 spoken directly on a blocking TCP socket, with the
//! `amq-protocol` crate (the codec lapin itself uses) for parsing and generating frames, and no
//! other machinery — no I/O thread, no runtime, no channel between threads, no per-delivery
//! object beyond what the codec builds. What it costs per message is the floor of any client
//! that parses every frame with this codec: a comparison point for the lapin consumer.
//!
//! It gets the same workload as the lapin consumer: the same queue arguments, binding, prefetch
//! and ack policy (`multiple` every quarter prefetch, and after [`ACK_IDLE`] with nothing
//! ready). It runs on the process's only thread and blocks in `read()`: when nothing is buffered,
//! one `read()` both waits for data and takes it (a non-blocking socket under a runtime would
//! need a failed `read()`, an `epoll_wait()` and a second `read()` per wake-up), and the socket's
//! receive timeout is the 5 ms ack timer, so no timer is needed either.

use std::{
    io::{Read, Write},
    net::TcpStream,
    str::FromStr,
    time::{Duration, Instant},
};

use amq_protocol::{
    frame::{AMQPFrame, WriteContext, gen_frame, parse_frame},
    protocol::{AMQPClass, basic, channel, connection, queue},
    types::{FieldTable, LongString, ShortString},
    uri::AMQPUri,
};
use anyhow::{Context, anyhow, bail};

use super::{ACK_IDLE, IDLE_END, Received, now_micros, receivers::queue_args, sent_micros};

/// The consumer's channel (channel 0 is the connection's).
const CHANNEL: u16 = 1;
/// Bytes read per `read()` at most (grown when a single frame is larger).
const READ_BUFFER: usize = 256 * 1024;

/// One AMQP connection with one channel, on a blocking socket.
struct Conn {
    stream: TcpStream,
    /// Received bytes; `buf[start..end]` is not parsed yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Reused for every frame sent.
    out: Vec<u8>,
    /// The receive timeout currently set on the socket.
    timeout: Option<Duration>,
}

impl Conn {
    fn send(&mut self, frame: &AMQPFrame) -> anyhow::Result<()> {
        let out = std::mem::take(&mut self.out);
        let ctx = gen_frame(frame)(WriteContext::from(out)).map_err(|e| anyhow!("{e}"))?;
        self.out = ctx.write;
        let result = self.stream.write_all(&self.out);
        self.out.clear();
        result.context("writing to the broker")
    }

    fn send_method(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<()> {
        self.send(&AMQPFrame::Method(channel, method))
    }

    fn set_timeout(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if self.timeout != Some(timeout) {
            self.stream.set_read_timeout(Some(timeout))?;
            self.timeout = Some(timeout);
        }
        Ok(())
    }

    /// The next frame, or `None` when nothing arrived within the socket's receive timeout.
    fn next_frame(&mut self) -> anyhow::Result<Option<AMQPFrame>> {
        loop {
            if self.start < self.end {
                match parse_frame(&self.buf[self.start..self.end]) {
                    Ok((rest, frame)) => {
                        self.start = self.end - rest.len();
                        return Ok(Some(frame));
                    }
                    Err(e) if e.is_incomplete() => {}
                    Err(e) => bail!("an unparsable frame from the broker: {e}"),
                }
            }
            // Keep the partial frame, at the front of the buffer.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => bail!("the broker closed the connection"),
                Ok(n) => self.end += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading from the broker"),
            }
        }
    }

    /// Waits for the method `expect` picks out (other frames in between are an error: during the
    /// handshake the broker sends nothing else).
    fn expect<T>(
        &mut self,
        what: &str,
        expect: impl Fn(AMQPClass) -> Result<T, AMQPClass>,
    ) -> anyhow::Result<T> {
        let frame = self
            .next_frame()?
            .with_context(|| format!("no {what} from the broker within {IDLE_END:?}"))?;
        match frame {
            AMQPFrame::Method(_, method) => match expect(method) {
                Ok(t) => Ok(t),
                Err(AMQPClass::Connection(connection::AMQPMethod::Close(c))) => bail!(
                    "the broker closed the connection waiting for {what}: {} {}",
                    c.reply_code,
                    c.reply_text
                ),
                Err(AMQPClass::Channel(channel::AMQPMethod::Close(c))) => bail!(
                    "the broker closed the channel waiting for {what}: {} {}",
                    c.reply_code,
                    c.reply_text
                ),
                Err(other) => bail!("expected {what}, got {other:?}"),
            },
            other => bail!("expected {what}, got {other}"),
        }
    }
}

/// Connects, opens a channel, declares and binds a queue the way the service does, sets the
/// prefetch and starts consuming.
fn open(amqp_url: &str, exchange: &str, prefetch: u16) -> anyhow::Result<Conn> {
    let uri = AMQPUri::from_str(amqp_url).map_err(|e| anyhow!("bad AMQP URL: {e}"))?;
    let stream = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
        .with_context(|| format!("connecting to {}", uri.authority.host))?;
    stream.set_nodelay(true)?;
    let mut conn = Conn {
        stream,
        buf: vec![0; READ_BUFFER],
        start: 0,
        end: 0,
        out: Vec::with_capacity(512),
        timeout: None,
    };
    conn.set_timeout(IDLE_END)?;
    conn.stream
        .write_all(b"AMQP\x00\x00\x09\x01")
        .context("sending the protocol header")?;

    conn.expect("connection.start", |m| match m {
        AMQPClass::Connection(connection::AMQPMethod::Start(s)) => Ok(s),
        other => Err(other),
    })?;
    let user = &uri.authority.userinfo;
    let response = format!("\0{}\0{}", user.username, user.password);
    conn.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: ShortString::from("PLAIN"),
            response: LongString::from(response.into_bytes()),
            locale: ShortString::from("en_US"),
        })),
    )?;
    let tune = conn.expect("connection.tune", |m| match m {
        AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => Ok(t),
        other => Err(other),
    })?;
    // No heartbeats: a run lasts seconds, and the socket is read all the time anyway.
    conn.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        })),
    )?;
    conn.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: ShortString::from(uri.vhost.as_str()),
        })),
    )?;
    conn.expect("connection.open-ok", |m| match m {
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => Ok(()),
        other => Err(other),
    })?;
    conn.send_method(
        CHANNEL,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )?;
    conn.expect("channel.open-ok", |m| match m {
        AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => Ok(()),
        other => Err(other),
    })?;
    conn.send_method(
        CHANNEL,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: ShortString::from(""),
            passive: false,
            durable: false,
            exclusive: true,
            auto_delete: true,
            nowait: false,
            arguments: queue_args(),
        })),
    )?;
    let declared = conn.expect("queue.declare-ok", |m| match m {
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(d)) => Ok(d),
        other => Err(other),
    })?;
    conn.send_method(
        CHANNEL,
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: declared.queue.clone(),
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from("bench.#"),
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )?;
    conn.expect("queue.bind-ok", |m| match m {
        AMQPClass::Queue(queue::AMQPMethod::BindOk(_)) => Ok(()),
        other => Err(other),
    })?;
    conn.send_method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: prefetch,
            global: false,
        })),
    )?;
    conn.expect("basic.qos-ok", |m| match m {
        AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => Ok(()),
        other => Err(other),
    })?;
    conn.send_method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: declared.queue,
            consumer_tag: ShortString::from(""),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )?;
    conn.expect("basic.consume-ok", |m| match m {
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)) => Ok(()),
        other => Err(other),
    })?;
    Ok(conn)
}

/// A consumer ready to run: the connection is open and the broker is delivering.
pub(super) struct MinimalConsumer {
    conn: Conn,
    ack_every: u64,
    latency: bool,
}

impl MinimalConsumer {
    pub(super) fn connect(
        amqp_url: &str,
        exchange: &str,
        prefetch: u16,
        latency: bool,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            conn: open(amqp_url, exchange, prefetch)?,
            ack_every: u64::from(prefetch / 4).max(1),
            latency,
        })
    }

    fn ack(&mut self, delivery_tag: u64) -> anyhow::Result<()> {
        self.conn.send_method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag,
                multiple: true,
            })),
        )
    }

    /// Counts messages until nothing arrived for [`IDLE_END`].
    pub(super) fn run(mut self) -> anyhow::Result<Received> {
        let mut got = Received::default();
        let mut pending = 0;
        let mut last_tag = 0;
        // Body bytes still expected for the message being received.
        let mut body_left: u64 = 0;
        loop {
            self.conn
                .set_timeout(if pending > 0 { ACK_IDLE } else { IDLE_END })?;
            let Some(frame) = self.conn.next_frame()? else {
                if pending == 0 {
                    break;
                }
                pending = 0;
                self.ack(last_tag)?;
                continue;
            };
            let complete = match frame {
                AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                    last_tag = d.delivery_tag;
                    false
                }
                AMQPFrame::Header(_, header) => {
                    body_left = header.body_size;
                    body_left == 0
                }
                AMQPFrame::Body(_, data) => {
                    body_left = body_left.saturating_sub(data.len() as u64);
                    if self.latency
                        && let Some(sent) = std::str::from_utf8(&data).ok().and_then(sent_micros)
                    {
                        got.latencies_us.push(now_micros().saturating_sub(sent));
                    }
                    body_left == 0
                }
                AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    bail!(
                        "the broker closed the connection: {} {}",
                        c.reply_code,
                        c.reply_text
                    )
                }
                AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                    bail!(
                        "the broker closed the channel: {} {}",
                        c.reply_code,
                        c.reply_text
                    )
                }
                _ => false,
            };
            if complete {
                got.note(Instant::now());
                pending += 1;
                if pending >= self.ack_every {
                    pending = 0;
                    self.ack(last_tag)?;
                }
            }
        }
        // Best effort: the process exits right after, which closes the socket anyway.
        let _ = self.conn.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: ShortString::from("done"),
                class_id: 0,
                method_id: 0,
            })),
        );
        Ok(got)
    }
}
