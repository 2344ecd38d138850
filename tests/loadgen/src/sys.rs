//! Raising the load generator's own open-file limit (`RLIMIT_NOFILE`) with the `rlimit` crate:
//! every WebSocket connection is a file descriptor and the soft limit is often 1,024.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let raised = raise_nofile_limit().expect("raise RLIMIT_NOFILE");
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
        assert_eq!(raised, soft);
        assert_eq!(soft, hard);
    }
}
