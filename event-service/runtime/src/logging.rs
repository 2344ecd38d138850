//! Log output: the `--log-format` choice and the global `tracing` subscriber.

use tracing_subscriber::EnvFilter;

/// Log output format (a clap value: `text` or `json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global log subscriber is already installed")]
    AlreadySet(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Installs the global subscriber: `filter` in `EnvFilter` syntax (e.g. `info,kube=warn`).
pub fn init(filter: &str, format: LogFormat) -> Result<(), LoggingError> {
    let env_filter = parse_filter(filter)?;
    let builder = tracing_subscriber::fmt().with_env_filter(env_filter);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(LoggingError::AlreadySet)
}

fn parse_filter(filter: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::try_new(filter).map_err(|source| LoggingError::Filter {
        filter: filter.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_is_an_error_naming_it() {
        let error = parse_filter("info,=[").expect_err("not a filter");
        assert!(error.to_string().contains("info,=["), "{error}");
        assert!(parse_filter("info,kube=warn").is_ok());
    }
}
