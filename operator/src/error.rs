//! The reconciler's error type: one enum, each variant with a bounded `metric_label`.

use crate::broker::BrokerError;

/// Why one reconcile of one EventRouter failed. Each variant says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed while {action}: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("RabbitMQ topology not in sync: {0}")]
    Broker(#[from] BrokerError),
    #[error("finalizer step failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the EventRouter has no {0}; the API server always sets it")]
    MissingField(&'static str),
}

impl Error {
    /// The `reason` label of `eventrouter_operator_reconcile_errors_total` (a fixed set).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube_api",
            Self::Broker(e) => match e {
                BrokerError::Connect(_) | BrokerError::Timeout(_) => "broker_unreachable",
                BrokerError::UpstreamMissing { .. } => "upstream_missing",
                BrokerError::Refused { .. } => "broker_refused",
            },
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Self::Serialize { .. } => "serialize",
            Self::MissingField(_) => "missing_field",
        }
    }

    /// Shorthand for wrapping a kube error with what was being done.
    pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| Self::Kube { action, source }
    }
}

/// Whether the API server answered 404 Not Found (the object or the API is not there).
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_finalizer_errors_keep_the_inner_label() {
        let inner = Error::MissingField("namespace");
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::CleanupFailed(
            inner,
        )));
        assert_eq!(wrapped.metric_label(), "missing_field");
        let broker = Error::Broker(BrokerError::Timeout(std::time::Duration::from_secs(1)));
        assert_eq!(broker.metric_label(), "broker_unreachable");
    }
}
