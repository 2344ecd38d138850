//! How many WebSocket connections the open-files limit can hold.
//!
//! Every connection is a file descriptor. A `--max-connections` the process cannot open files
//! for is a promise it cannot keep: once `accept` fails with EMFILE, new clients would wait in
//! the kernel's accept queue instead of getting the documented 503 at the limit. At start the
//! server compares `--max-connections` with the soft `RLIMIT_NOFILE` (the binary raises it to the
//! hard limit first) less [`FD_HEADROOM`], and serves at most that many, saying so loudly.

/// Descriptors kept for everything that is not an upgraded WebSocket connection: standard
/// input, output and error; the two listeners and the accept loops' two reserve descriptors; the
/// runtime's and the AMQP client's polling and wake-up descriptors; the RabbitMQ connection;
/// files read for the process metrics; and the HTTP connections not counted as WebSocket
/// connections (admin scrapes and probes, `POST /publish`, clients still in their handshake or
/// in a lingering close). Past that, the accept loops answer 503 from their reserve.
pub const FD_HEADROOM: u64 = 128;

/// Why the open-files limit leaves no room for connections.
#[derive(Debug, thiserror::Error)]
#[error(
    "the open-files limit ({limit}) leaves no room for connections: {FD_HEADROOM} descriptors are \
     kept for the process itself; raise the limit (ulimit -n, the container runtime's nofile)"
)]
pub struct NoRoom {
    pub limit: u64,
}

/// The connections an open-files limit of `open_files` holds next to [`FD_HEADROOM`], at most
/// `configured`.
pub fn max_connections_for(configured: usize, open_files: u64) -> Result<usize, NoRoom> {
    let room = open_files.saturating_sub(FD_HEADROOM);
    if room == 0 {
        return Err(NoRoom { limit: open_files });
    }
    Ok(usize::try_from(room).map_or(configured, |room| configured.min(room)))
}

/// The `--max-connections` to serve with: `configured`, clamped (with a warning) to what the
/// current open-files limit holds.
pub fn effective_max_connections(configured: usize) -> Result<usize, NoRoom> {
    let limit = match eventrouter_runtime::limits::open_files_limit() {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "could not read the open-files limit; --max-connections unchecked");
            return Ok(configured);
        }
    };
    let effective = max_connections_for(configured, limit)?;
    if effective < configured {
        tracing::warn!(
            configured,
            effective,
            open_files_limit = limit,
            headroom = FD_HEADROOM,
            "--max-connections {configured} does not fit the open-files limit {limit}; \
             serving at most {effective} connections"
        );
    } else {
        tracing::debug!(
            open_files_limit = limit,
            max_connections = configured,
            "connections fit the open-files limit"
        );
    }
    Ok(effective)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_the_limit_less_the_headroom() {
        assert_eq!(max_connections_for(10_000, 1_048_576).ok(), Some(10_000));
        assert_eq!(
            max_connections_for(200_000, 20_000).ok(),
            Some(20_000 - FD_HEADROOM as usize)
        );
        assert_eq!(max_connections_for(5, u64::MAX).ok(), Some(5));
        assert!(max_connections_for(10, FD_HEADROOM).is_err());
        assert!(max_connections_for(10, 3).is_err());
    }
}
