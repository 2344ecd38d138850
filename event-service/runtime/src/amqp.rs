//! What both AMQP clients of the project (the event service's source and the operator's topology
//! code) need to read out of a `lapin` error.

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

/// Whether the broker closed the channel with reply code 404 (NOT_FOUND): the exchange, queue
/// or binding named in the method is not there. The channel is closed afterwards and must be
/// replaced before the next operation.
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use lapin::protocol::AMQPError;

    fn protocol_error(kind: AMQPErrorKind) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, "reply".into())).into()
    }

    #[test]
    fn a_404_reply_is_not_found() {
        assert!(is_not_found(&protocol_error(AMQPErrorKind::Soft(
            AMQPSoftError::NOTFOUND
        ))));
    }

    #[test]
    fn other_replies_and_errors_are_not() {
        assert!(!is_not_found(&protocol_error(AMQPErrorKind::Soft(
            AMQPSoftError::ACCESSREFUSED
        ))));
        assert!(!is_not_found(&lapin::Error::from(
            ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "basic.publish")
        )));
    }
}
