//! The bridge's error type.

use crate::config::InvalidConfig;

/// Errors that end [`crate::run`]. Per-message and per-connection failures are
/// handled where they occur (logged, counted, retried) and never end up here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; nothing was started.
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// A TLS file for MQTT could not be read.
    #[error("cannot read {path}: {source}")]
    ReadTlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The NATS connection could not be set up.
    #[error(transparent)]
    Nats(#[from] windrow_jetstream::Error),
    /// The operations HTTP server failed.
    #[error(transparent)]
    Ops(#[from] windrow_ops::Error),
}

impl Error {
    /// Whether the error is the operator's to fix in the configuration (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::InvalidConfig(_) | Self::ReadTlsFile { .. })
    }
}
