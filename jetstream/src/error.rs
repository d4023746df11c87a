//! Errors of the NATS contract crate.

use std::path::PathBuf;

/// Errors from connecting to NATS.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A credentials, certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection could not be set up.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The server list.
        url: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
}
