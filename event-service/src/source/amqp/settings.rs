//! What the AMQP source needs from the configuration, resolved and checked once at start.
//!
//! Pure: no I/O except reading `--amqp-url-file`. Everything a bad value could break (the URL, the
//! queue name, the queue arguments) is refused here, so the background connection manager only
//! ever fails for reasons that retrying can fix.

use std::time::Duration;

use lapin::{
    types::{AMQPValue, FieldTable, LongString, ShortString},
    uri::AMQPUri,
};

use super::AmqpStartError;
use crate::config::Config;

/// Heartbeat asked of the broker when the URL does not say: a dead TCP peer is noticed within two
/// intervals instead of the broker's 60 s default, so readiness drops quickly.
pub(crate) const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Longest queue or exchange name RabbitMQ accepts (an AMQP short string).
const MAX_NAME_BYTES: usize = 255;

/// The AMQP source's settings, checked.
#[derive(Clone, Debug)]
pub(crate) struct AmqpSettings {
    /// Where to connect (with the heartbeat filled in).
    pub uri: AMQPUri,
    /// `host:port (vhost "…")` of the broker: safe to log (no credentials).
    pub endpoint: String,
    pub exchange: String,
    pub declare_exchange: bool,
    /// This instance's queue.
    pub queue: String,
    pub queue_max_length: u32,
    pub queue_message_ttl: Duration,
    pub queue_expires: Duration,
    pub prefetch: u16,
    /// Largest message body accepted from the queue; larger is counted as malformed and dropped.
    pub max_message_bytes: usize,
    /// Name shown for the connection in the broker's management UI.
    pub connection_name: String,
    /// This instance's name (the pod name): its queue's suffix and its heartbeats' key.
    pub instance: String,
    /// The control exchange heartbeats go over; `None` when rebalancing is off.
    pub control_exchange: Option<String>,
    /// The stream recoveries read; `None`: no recovery from RabbitMQ.
    pub history_stream: Option<String>,
    /// The stream's `x-max-age` when this service declares it (`--declare-exchange`).
    pub history_max_age: Duration,
}

/// The stream's `x-max-length-bytes` when the service declares it itself (local use; in a
/// cluster the operator declares it from `spec.history.maxBytes`).
pub(crate) const DECLARED_STREAM_MAX_BYTES: i64 = 1 << 30;

/// The stream's segment size when the service declares it: small enough that retention, which
/// removes whole segments, can act on a stream of [`DECLARED_STREAM_MAX_BYTES`].
pub(crate) const DECLARED_STREAM_SEGMENT_BYTES: i64 = 64 << 20;

impl AmqpSettings {
    /// Resolves the configuration: reads the URL (the file wins over the flag), names the queue.
    pub(crate) fn from_config(config: &Config) -> Result<Self, AmqpStartError> {
        let url = match (&config.amqp_url_file, &config.amqp_url) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|source| AmqpStartError::UrlFile {
                    path: path.display().to_string(),
                    source,
                })?
                .trim()
                .to_owned(),
            (None, Some(url)) => url.trim().to_owned(),
            (None, None) => return Err(AmqpStartError::MissingUrl),
        };
        if url.is_empty() {
            return Err(AmqpStartError::MissingUrl);
        }
        let mut uri: AMQPUri =
            url.parse()
                .map_err(|reason: String| AmqpStartError::InvalidUrl {
                    // The reason never echoes the URL (it may hold a password).
                    reason,
                })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
        }
        let endpoint = format!(
            "{}:{} (vhost {:?})",
            uri.authority.host, uri.authority.port, uri.vhost
        );

        check_name("exchange", &config.exchange)?;
        let control_exchange = if config.rebalance {
            let name = config.control_exchange();
            check_name("control exchange", &name)?;
            if name == config.exchange {
                return Err(AmqpStartError::InvalidSetting {
                    setting: "--control-exchange",
                    reason: "must differ from --exchange: a client subscribed to `#` would \
                             receive every heartbeat"
                        .into(),
                });
            }
            Some(name)
        } else {
            None
        };
        let instance = match &config.pod_name {
            Some(pod) if !pod.trim().is_empty() => pod.trim().to_owned(),
            _ => format!("instance-{:08x}", rand::random::<u32>()),
        };
        let queue = queue_name(&config.exchange, &instance);
        check_name("queue", &queue)?;
        if config.queue_expires.is_zero() {
            return Err(AmqpStartError::InvalidSetting {
                setting: "--queue-expires",
                reason: "must be longer than zero (RabbitMQ refuses x-expires = 0)".into(),
            });
        }
        let history_stream = match &config.history_stream {
            Some(name) if !name.trim().is_empty() => {
                let name = name.trim().to_owned();
                check_name("history stream", &name)?;
                Some(name)
            }
            _ => None,
        };
        if history_stream.is_some() && config.history_max_age.as_secs() == 0 {
            return Err(AmqpStartError::InvalidSetting {
                setting: "--history-max-age",
                reason: "must be at least one second (the stream's x-max-age)".into(),
            });
        }
        if config.prefetch == 0 {
            return Err(AmqpStartError::InvalidSetting {
                setting: "--prefetch",
                reason: "must be at least 1 (0 would mean unlimited in-flight messages)".into(),
            });
        }

        Ok(Self {
            uri,
            endpoint,
            exchange: config.exchange.clone(),
            declare_exchange: config.declare_exchange,
            queue,
            queue_max_length: config.queue_max_length,
            queue_message_ttl: config.queue_message_ttl,
            queue_expires: config.queue_expires,
            prefetch: config.prefetch,
            // The same bound as an event accepted by `POST /publish`, so an event the service
            // published itself is never dropped as too large on the way back.
            max_message_bytes: config.max_publish_bytes,
            connection_name: format!("event-service {instance}"),
            instance,
            control_exchange,
            history_stream,
            history_max_age: config.history_max_age,
        })
    }

    /// The arguments the service declares the history stream with (`--declare-exchange`).
    pub(crate) fn stream_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{}s", self.history_max_age.as_secs()).into()),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(DECLARED_STREAM_MAX_BYTES),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(DECLARED_STREAM_SEGMENT_BYTES),
        );
        args
    }

    /// The arguments of this instance's queue: bounded length (the oldest is dropped first, so a
    /// stalled instance keeps the newest events), a message TTL and an expiry.
    pub(crate) fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(self.queue_max_length)),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("drop-head")),
        );
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(millis(self.queue_message_ttl)),
        );
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(millis(self.queue_expires)),
        );
        args
    }

    pub(crate) fn exchange_name(&self) -> ShortString {
        // Checked in `from_config`: never over the short-string limit.
        ShortString::from(self.exchange.as_str())
    }

    pub(crate) fn queue_name(&self) -> ShortString {
        ShortString::from(self.queue.as_str())
    }
}

/// `<exchange>.<instance>`: the broker's queue list then reads as "which router, which pod".
pub(crate) fn queue_name(exchange: &str, instance: &str) -> String {
    format!("{exchange}.{instance}")
}

fn check_name(what: &'static str, name: &str) -> Result<(), AmqpStartError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(AmqpStartError::InvalidSetting {
            setting: match what {
                "exchange" => "--exchange",
                "control exchange" => "--control-exchange",
                _ => "--pod-name",
            },
            reason: format!(
                "the {what} name must be 1 to {MAX_NAME_BYTES} bytes, not {}",
                name.len()
            ),
        });
    }
    if name.starts_with("amq.") && what == "queue" {
        return Err(AmqpStartError::InvalidSetting {
            setting: "--exchange",
            reason: "queue names starting with 'amq.' are reserved by RabbitMQ".into(),
        });
    }
    Ok(())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> Config {
        let mut cfg = Config::for_tests();
        cfg.amqp_url = Some(url.into());
        cfg
    }

    #[test]
    fn names_the_queue_after_the_pod_under_the_exchange() {
        let mut cfg = config("amqp://guest:guest@127.0.0.1:5672/%2f");
        cfg.pod_name = Some("router-7d9f-abc".into());
        let s = AmqpSettings::from_config(&cfg).expect("valid settings");
        assert_eq!(s.queue, "eventrouter.router-7d9f-abc");
        assert_eq!(s.endpoint, r#"127.0.0.1:5672 (vhost "/")"#);
        assert_eq!(s.uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
    }

    #[test]
    fn a_missing_pod_name_gets_a_random_suffix() {
        let cfg = config("amqp://127.0.0.1");
        let a = AmqpSettings::from_config(&cfg)
            .expect("valid settings")
            .queue;
        let b = AmqpSettings::from_config(&cfg)
            .expect("valid settings")
            .queue;
        assert!(a.starts_with("eventrouter.instance-"), "{a}");
        assert_ne!(
            a, b,
            "two instances without a pod name must not share a queue"
        );
    }

    #[test]
    fn keeps_a_heartbeat_given_in_the_url() {
        let s = AmqpSettings::from_config(&config("amqp://127.0.0.1:5672/%2f?heartbeat=3"))
            .expect("valid settings");
        assert_eq!(s.uri.query.heartbeat, Some(3));
    }

    #[test]
    fn the_url_file_wins_and_is_trimmed() {
        let dir = std::env::temp_dir().join(format!("amqp-url-{}", rand::random::<u64>()));
        std::fs::write(&dir, "amqp://u:p@broker.example:5673/prod\n").expect("write temp file");
        let mut cfg = config("amqp://127.0.0.1");
        cfg.amqp_url_file = Some(dir.clone());
        let s = AmqpSettings::from_config(&cfg).expect("valid settings");
        std::fs::remove_file(&dir).expect("remove temp file");
        assert_eq!(s.endpoint, r#"broker.example:5673 (vhost "prod")"#);
        assert_eq!(s.uri.authority.userinfo.password, "p");
    }

    #[test]
    fn refuses_what_retrying_cannot_fix() {
        let mut cfg = Config::for_tests();
        assert!(matches!(
            AmqpSettings::from_config(&cfg),
            Err(AmqpStartError::MissingUrl)
        ));
        cfg.amqp_url_file = Some("/nonexistent/amqp-url".into());
        assert!(matches!(
            AmqpSettings::from_config(&cfg),
            Err(AmqpStartError::UrlFile { .. })
        ));
        assert!(matches!(
            AmqpSettings::from_config(&config("http://secret@host")),
            Err(AmqpStartError::InvalidUrl { .. })
        ));
        let mut cfg = config("amqp://127.0.0.1");
        cfg.queue_expires = Duration::ZERO;
        assert!(matches!(
            AmqpSettings::from_config(&cfg),
            Err(AmqpStartError::InvalidSetting {
                setting: "--queue-expires",
                ..
            })
        ));
        let mut cfg = config("amqp://127.0.0.1");
        cfg.pod_name = Some("p".repeat(300));
        assert!(matches!(
            AmqpSettings::from_config(&cfg),
            Err(AmqpStartError::InvalidSetting { .. })
        ));
    }

    #[test]
    fn queue_arguments_bound_length_drop_oldest_and_expire() {
        let mut cfg = config("amqp://127.0.0.1");
        cfg.queue_max_length = 500;
        cfg.queue_message_ttl = Duration::from_secs(30);
        cfg.queue_expires = Duration::from_secs(300);
        let args = AmqpSettings::from_config(&cfg)
            .expect("valid settings")
            .queue_arguments();
        let args = args.inner();
        assert_eq!(args.get("x-max-length"), Some(&AMQPValue::LongLongInt(500)));
        assert_eq!(
            args.get("x-overflow"),
            Some(&AMQPValue::LongString("drop-head".into()))
        );
        assert_eq!(
            args.get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(30_000))
        );
        assert_eq!(
            args.get("x-expires"),
            Some(&AMQPValue::LongLongInt(300_000))
        );
    }
}
