//! RabbitMQ topology over AMQP (lapin): the router's durable topic exchange, its durable fanout
//! control exchange (the pods' load heartbeats), its upstream exchange-to-exchange bindings and
//! its history stream (a durable queue of type `stream` bound to the exchange).
//!
//! AMQP cannot list bindings, so the caller records what `sync` declared (in the EventRouter's
//! status) and hands that record back to `sync` (to unbind what is no longer wanted) and to
//! `remove` (the finalizer). Every operation is idempotent and "already gone" counts as done.
//!
//! AMQP cannot change a queue's arguments either: RabbitMQ refuses a declaration whose arguments
//! differ from the existing queue's (`PRECONDITION_FAILED`, closing the channel). For the history
//! stream that refusal is not a failure of the topology: the stream exists, keeps its retention
//! and is bound as usual, and `sync` hands RabbitMQ's words back for the status to report.

use std::time::Duration;

use eventrouter_runtime::amqp::is_not_found;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use tracing::{debug, info, warn};

use crate::crd::{RecordedBinding, RecordedTopology, StreamArguments};
use crate::status::Reason;
use crate::topology::{DesiredHistory, DesiredTopology, stale_history};

/// How long connecting (TCP, TLS, AMQP handshake) may take before the broker counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one AMQP method may take (the same bound as the event service's).
const OPERATION_TIMEOUT: Duration = eventrouter_contract::amqp::OPERATION_TIMEOUT;

/// Why the broker could not be brought to the desired state.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(#[source] lapin::Error),
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "upstream exchange {source_exchange:?} does not exist; create it or remove it from spec.rabbitmq.upstreams"
    )]
    UpstreamMissing { source_exchange: String },
    #[error("RabbitMQ refused {operation} on {target:?}: {source}")]
    Refused {
        operation: &'static str,
        target: String,
        #[source]
        source: lapin::Error,
    },
}

impl BrokerError {
    /// The `BrokerReady` condition's reason (and the Event's) for this failure.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Connect(_) | Self::Timeout(_) => Reason::BrokerUnreachable,
            Self::UpstreamMissing { .. } => Reason::UpstreamExchangeMissing,
            Self::Refused { .. } => Reason::BrokerRefused,
        }
    }
}

/// Whether RabbitMQ refused a declaration with reply code 406 (PRECONDITION_FAILED): the queue
/// exists with other arguments. The channel is closed afterwards.
fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
    )
}

/// The broker's reply text of a protocol error (`PRECONDITION_FAILED - inequivalent arg ...`),
/// else the error as displayed.
fn reply_text(error: &lapin::Error) -> String {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        _ => error.to_string(),
    }
}

/// The arguments of a history stream's `queue.declare`.
fn stream_arguments(arguments: &StreamArguments) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    table.insert(
        "x-max-age".into(),
        AMQPValue::LongString(LongString::from(arguments.max_age.as_str())),
    );
    table.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(arguments.max_bytes),
    );
    if let Some(segment) = arguments.max_segment_bytes {
        table.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(segment),
        );
    }
    table
}

/// What `sync` declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    /// The record to write to status.
    pub record: RecordedTopology,
    /// RabbitMQ holds the history stream with other arguments than the desired ones: its
    /// refusal (`PRECONDITION_FAILED - inequivalent arg 'x-max-age' ...`).
    pub stream_arguments_differ: Option<String>,
}

async fn timed<T>(
    fut: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<Result<T, lapin::Error>, BrokerError> {
    tokio::time::timeout(OPERATION_TIMEOUT, fut)
        .await
        .map_err(|_| BrokerError::Timeout(OPERATION_TIMEOUT))
}

/// One AMQP connection used for a single reconcile, closed when dropped or by `close`.
pub struct Broker {
    connection: Connection,
    channel: Channel,
}

impl Broker {
    /// Connect with the URL from the router's Secret.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let props =
            ConnectionProperties::default().with_connection_name("eventrouter-operator".into());
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props))
            .await
            .map_err(|_| BrokerError::Timeout(CONNECT_TIMEOUT))?
            .map_err(BrokerError::Connect)?;
        let channel = timed(connection.create_channel())
            .await?
            .map_err(BrokerError::Connect)?;
        Ok(Self {
            connection,
            channel,
        })
    }

    /// A channel closed by a 404 must be replaced before the next operation.
    async fn reopen(&mut self) -> Result<(), BrokerError> {
        self.channel = timed(self.connection.create_channel())
            .await?
            .map_err(BrokerError::Connect)?;
        Ok(())
    }

    /// Declare `desired`, then unbind (and, if the exchange changed or history was turned off,
    /// and `delete_stale_exchange`, delete) whatever `recorded` has that `desired` no longer has.
    /// Returns the new record.
    pub async fn sync(
        &mut self,
        desired: &DesiredTopology,
        recorded: Option<&RecordedTopology>,
        delete_stale_exchange: bool,
    ) -> Result<Synced, BrokerError> {
        self.declare_exchange(&desired.exchange, ExchangeKind::Topic)
            .await?;
        self.declare_exchange(&desired.control_exchange, ExchangeKind::Fanout)
            .await?;

        for binding in &desired.bindings {
            let result = timed(self.channel.exchange_bind(
                desired.exchange.as_str().into(),
                binding.source.as_str().into(),
                binding.routing_key.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            ))
            .await?;
            match result {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => {
                    return Err(BrokerError::UpstreamMissing {
                        source_exchange: binding.source.clone(),
                    });
                }
                Err(source) => {
                    return Err(BrokerError::Refused {
                        operation: "exchange.bind",
                        target: binding.source.clone(),
                        source,
                    });
                }
            }
        }

        let mut stream_arguments_differ = None;
        if let Some(history) = &desired.history {
            stream_arguments_differ = self.declare_stream(history).await?;
            for pattern in &history.patterns {
                self.bind_stream(&history.stream, &desired.exchange, pattern)
                    .await?;
            }
        }

        if let Some(recorded) = recorded {
            if recorded.exchange != desired.exchange {
                // The router moved to another exchange: the old one's bindings (and its control
                // exchange) go with it.
                if delete_stale_exchange {
                    self.remove(recorded).await?;
                }
            } else {
                for stale in recorded
                    .bindings
                    .iter()
                    .filter(|b| !desired.bindings.contains(b))
                {
                    self.unbind(&recorded.exchange, stale).await?;
                }
                if let Some(control) = &recorded.control_exchange
                    && *control != desired.control_exchange
                    && delete_stale_exchange
                {
                    self.delete_exchange(control).await?;
                }
                let stale = stale_history(
                    desired.history.as_ref(),
                    recorded.history.as_ref(),
                    delete_stale_exchange,
                );
                for (stream, pattern) in &stale.unbind {
                    self.unbind_stream(stream, &recorded.exchange, pattern)
                        .await?;
                }
                if let Some(stream) = &stale.delete {
                    self.delete_queue(stream).await?;
                }
            }
        }
        debug!(
            exchange = %desired.exchange,
            control_exchange = %desired.control_exchange,
            bindings = desired.bindings.len(),
            history_stream = desired.history.as_ref().map(|h| h.stream.as_str()).unwrap_or_default(),
            "topology in sync"
        );
        let record = match &stream_arguments_differ {
            None => desired.record(),
            Some(_) => desired.record_with_differing_stream_arguments(),
        };
        Ok(Synced {
            record,
            stream_arguments_differ,
        })
    }

    /// Declare the durable history stream with its retention arguments. `Some(refusal)` when
    /// RabbitMQ holds it with other arguments (it cannot change them in place): the stream is
    /// there all the same, so the caller goes on and reports the refusal.
    async fn declare_stream(
        &mut self,
        history: &DesiredHistory,
    ) -> Result<Option<String>, BrokerError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let result = timed(self.channel.queue_declare(
            history.stream.as_str().into(),
            options,
            stream_arguments(&history.arguments),
        ))
        .await?;
        match result {
            Ok(_) => Ok(None),
            Err(error) if is_precondition_failed(&error) => {
                let refusal = reply_text(&error);
                warn!(stream = %history.stream, %refusal, "the history stream's arguments differ from the spec");
                self.reopen().await?;
                Ok(Some(refusal))
            }
            Err(source) => Err(BrokerError::Refused {
                operation: "queue.declare",
                target: history.stream.clone(),
                source,
            }),
        }
    }

    /// Bind the history stream to the router's exchange with `pattern`.
    async fn bind_stream(
        &mut self,
        stream: &str,
        exchange: &str,
        pattern: &str,
    ) -> Result<(), BrokerError> {
        timed(self.channel.queue_bind(
            stream.into(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await?
        .map_err(|source| BrokerError::Refused {
            operation: "queue.bind",
            target: stream.to_string(),
            source,
        })
    }

    /// Remove the binding of the history stream to `exchange` with `pattern`; a stream or
    /// exchange already gone counts as unbound.
    async fn unbind_stream(
        &mut self,
        stream: &str,
        exchange: &str,
        pattern: &str,
    ) -> Result<(), BrokerError> {
        let result = timed(self.channel.queue_unbind(
            stream.into(),
            exchange.into(),
            pattern.into(),
            FieldTable::default(),
        ))
        .await?;
        match result {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => self.reopen().await,
            Err(source) => Err(BrokerError::Refused {
                operation: "queue.unbind",
                target: stream.to_string(),
                source,
            }),
        }
    }

    /// Delete queue (stream) `name` with whatever it holds; one already gone counts as deleted.
    async fn delete_queue(&mut self, name: &str) -> Result<(), BrokerError> {
        let result = timed(
            self.channel
                .queue_delete(name.into(), QueueDeleteOptions::default()),
        )
        .await?;
        match result {
            Ok(_) => Ok(()),
            Err(error) if is_not_found(&error) => self.reopen().await,
            Err(source) => Err(BrokerError::Refused {
                operation: "queue.delete",
                target: name.to_string(),
                source,
            }),
        }
    }

    /// Declare a durable exchange of `kind` (idempotent while its type and flags agree).
    async fn declare_exchange(
        &mut self,
        name: &str,
        kind: ExchangeKind,
    ) -> Result<(), BrokerError> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        timed(
            self.channel
                .exchange_declare(name.into(), kind, options, FieldTable::default()),
        )
        .await?
        .map_err(|source| BrokerError::Refused {
            operation: "exchange.declare",
            target: name.to_string(),
            source,
        })
    }

    /// Delete exchange `name`; one already gone counts as deleted.
    async fn delete_exchange(&mut self, name: &str) -> Result<(), BrokerError> {
        let result = timed(
            self.channel
                .exchange_delete(name.into(), ExchangeDeleteOptions::default()),
        )
        .await?;
        match result {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => self.reopen().await,
            Err(source) => Err(BrokerError::Refused {
                operation: "exchange.delete",
                target: name.to_string(),
                source,
            }),
        }
    }

    async fn unbind(
        &mut self,
        destination: &str,
        binding: &RecordedBinding,
    ) -> Result<(), BrokerError> {
        let result = timed(self.channel.exchange_unbind(
            destination.into(),
            binding.source.as_str().into(),
            binding.routing_key.as_str().into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        match result {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => self.reopen().await,
            Err(source) => Err(BrokerError::Refused {
                operation: "exchange.unbind",
                target: binding.source.clone(),
                source,
            }),
        }
    }

    /// Remove exactly what `recorded` lists: its bindings, then its exchange, its control
    /// exchange and its history stream (whose bindings go with it).
    pub async fn remove(&mut self, recorded: &RecordedTopology) -> Result<(), BrokerError> {
        for binding in &recorded.bindings {
            self.unbind(&recorded.exchange, binding).await?;
        }
        self.delete_exchange(&recorded.exchange).await?;
        if let Some(control) = &recorded.control_exchange {
            self.delete_exchange(control).await?;
        }
        if let Some(history) = &recorded.history {
            self.delete_queue(&history.stream).await?;
        }
        info!(
            exchange = %recorded.exchange,
            control_exchange = recorded.control_exchange.as_deref().unwrap_or_default(),
            bindings = recorded.bindings.len(),
            history_stream = recorded.history.as_ref().map(|h| h.stream.as_str()).unwrap_or_default(),
            "topology removed"
        );
        Ok(())
    }

    /// Close the connection politely (dropping it also closes it, less politely).
    pub async fn close(self) {
        let _ = tokio::time::timeout(OPERATION_TIMEOUT, self.connection.close(200, "done".into()))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;

    use super::*;

    fn protocol_error(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn the_stream_is_declared_with_its_type_and_retention() {
        let mut arguments = StreamArguments {
            max_age: "7D".into(),
            max_bytes: 1_073_741_824,
            max_segment_bytes: None,
        };
        let table = stream_arguments(&arguments);
        let entries: Vec<(String, AMQPValue)> = table
            .inner()
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        assert_eq!(
            entries,
            [
                ("x-max-age".into(), AMQPValue::LongString("7D".into())),
                (
                    "x-max-length-bytes".into(),
                    AMQPValue::LongLongInt(1_073_741_824)
                ),
                (
                    "x-queue-type".into(),
                    AMQPValue::LongString("stream".into())
                ),
            ]
        );
        arguments.max_segment_bytes = Some(104_857_600);
        assert_eq!(
            stream_arguments(&arguments)
                .inner()
                .get("x-stream-max-segment-size-bytes"),
            Some(&AMQPValue::LongLongInt(104_857_600))
        );
    }

    #[test]
    fn a_406_is_a_refused_declaration_and_its_text_is_kept() {
        let refusal = "PRECONDITION_FAILED - inequivalent arg 'x-max-age' for queue 'chat.history' in vhost '/': received '48h' but current is '24h'";
        let error = protocol_error(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            refusal,
        );
        assert!(is_precondition_failed(&error));
        assert_eq!(reply_text(&error), refusal);
        let not_found = protocol_error(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND), "gone");
        assert!(!is_precondition_failed(&not_found));
        let closed = lapin::Error::from(ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closed,
            "queue.declare",
        ));
        assert!(!is_precondition_failed(&closed));
        assert_eq!(reply_text(&closed), closed.to_string());
    }
}
