//! The controller's command line: one clap-derive [`Args`] struct whose every flag has
//! an environment fallback (for Deployment manifests).

use std::path::PathBuf;

use clap::Parser;
use holdfast_core::logging::LogFormat;

/// holdfast controller: serves the CSI Identity and Controller services on a unix
/// socket, creating and deleting volumes as directories under the backend root.
#[derive(Parser, Debug, Clone)]
#[command(name = "holdfast-controller", version)]
pub struct Args {
    /// CSI endpoint to listen on: unix:///path/to/socket. A stale socket file is
    /// replaced at start; the socket is removed at graceful stop (SIGTERM/SIGINT).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,

    /// Shared directory holding every volume (the same path the node plugins use).
    #[arg(long, env = "HOLDFAST_BACKEND_ROOT")]
    pub backend_root: PathBuf,

    /// Log filter: a level (info, debug…) or an EnvFilter directive list.
    #[arg(long, env = "HOLDFAST_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "HOLDFAST_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let args = Args::try_parse_from(["holdfast-controller", "--backend-root", "/srv/holdfast"])
            .unwrap();
        assert_eq!(args.endpoint, "unix:///csi/csi.sock");
        assert_eq!(args.backend_root, PathBuf::from("/srv/holdfast"));
        assert_eq!(args.log_level, "info");
        assert_eq!(args.log_format, LogFormat::Json);
        let args = Args::try_parse_from([
            "holdfast-controller",
            "--backend-root=/b",
            "--endpoint=unix:///tmp/c.sock",
            "--log-format=text",
            "--log-level=debug",
        ])
        .unwrap();
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.endpoint, "unix:///tmp/c.sock");
        assert!(Args::try_parse_from([
            "holdfast-controller",
            "--backend-root=/b",
            "--log-format=xml"
        ])
        .is_err());
    }
}
