//! RabbitMQ topology over AMQP (lapin): the router's durable topic exchange, its durable fanout
//! control exchange (the pods' load heartbeats) and its upstream exchange-to-exchange bindings.
//!
//! AMQP cannot list bindings, so the caller records what `sync` declared (in the EventRouter's
//! status) and hands that record back to `sync` (to unbind what is no longer wanted) and to
//! `remove` (the finalizer). Every operation is idempotent and "already gone" counts as done.

use std::time::Duration;

use eventrouter_runtime::amqp::is_not_found;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tracing::{debug, info};

use crate::crd::{RecordedBinding, RecordedTopology};
use crate::status::Reason;
use crate::topology::DesiredTopology;

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

    /// Declare `desired`, then unbind (and, if the exchange changed and `delete_stale_exchange`,
    /// delete) whatever `recorded` has that `desired` no longer has. Returns the new record.
    pub async fn sync(
        &mut self,
        desired: &DesiredTopology,
        recorded: Option<&RecordedTopology>,
        delete_stale_exchange: bool,
    ) -> Result<RecordedTopology, BrokerError> {
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
            }
        }
        debug!(
            exchange = %desired.exchange,
            control_exchange = %desired.control_exchange,
            bindings = desired.bindings.len(),
            "topology in sync"
        );
        Ok(desired.record())
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

    /// Remove exactly what `recorded` lists: its bindings, then its exchange and its control
    /// exchange.
    pub async fn remove(&mut self, recorded: &RecordedTopology) -> Result<(), BrokerError> {
        for binding in &recorded.bindings {
            self.unbind(&recorded.exchange, binding).await?;
        }
        self.delete_exchange(&recorded.exchange).await?;
        if let Some(control) = &recorded.control_exchange {
            self.delete_exchange(control).await?;
        }
        info!(
            exchange = %recorded.exchange,
            control_exchange = recorded.control_exchange.as_deref().unwrap_or_default(),
            bindings = recorded.bindings.len(),
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
