//! Process resource limits, through the `rlimit` crate (no `unsafe` of our own).

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
///
/// Every connection is a file descriptor, and the usual soft default (1024) is far below what
/// one instance serves.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The current soft `RLIMIT_NOFILE`: how many file descriptors this process may hold.
pub fn open_files_limit() -> std::io::Result<u64> {
    rlimit::Resource::NOFILE.get().map(|(soft, _hard)| soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let raised = raise_open_files_limit().expect("raise the limit");
        let (soft, hard) = rlimit::Resource::NOFILE.get().expect("read the limit");
        assert_eq!(raised, soft);
        assert_eq!(soft, hard, "the soft limit was raised to the hard limit");
        assert_eq!(open_files_limit().expect("read the limit"), soft);
    }
}
