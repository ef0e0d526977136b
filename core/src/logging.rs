//! Process-wide log setup for holdfast's binaries.
//!
//! One call to [`init`] at the top of `main` installs a `tracing` subscriber that
//! writes to stderr (where kubelet and `kubectl logs` pick it up), as plain text for
//! people or JSON for log pipelines. The level is an `EnvFilter` directive, so
//! `info` and `info,holdfast_core::lease=debug` both work.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("invalid log level {level:?}: {source}")]
pub struct LoggingError {
    level: String,
    source: tracing_subscriber::filter::ParseError,
}

/// Installs the global subscriber. A second call (tests, embedded use) keeps the
/// first subscriber and still returns `Ok`; only a bad `level` is an error.
pub fn init(level: &str, format: LogFormat) -> Result<(), LoggingError> {
    let filter = EnvFilter::builder()
        .parse(level)
        .map_err(|source| LoggingError {
            level: level.to_owned(),
            source,
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Err here only means a subscriber is already installed, which is fine.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn init_twice_is_fine_and_bad_levels_are_refused() {
        // "off" first: the subscriber is global to this test binary, and other
        // tests' log lines must not spill onto its stderr.
        init("off", LogFormat::Text).unwrap();
        init("debug,holdfast_core=trace", LogFormat::Json).unwrap();
        let err = init("info,holdfast_core=loud", LogFormat::Text).unwrap_err();
        assert!(err.to_string().contains("invalid log level"), "{err}");
    }

    #[test]
    fn formats_parse_from_the_command_line() {
        assert_eq!(LogFormat::from_str("json", true).unwrap(), LogFormat::Json);
        assert_eq!(LogFormat::from_str("text", true).unwrap(), LogFormat::Text);
        assert!(LogFormat::from_str("xml", true).is_err());
    }
}
