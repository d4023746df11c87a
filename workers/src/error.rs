//! The worker's error type.

/// Errors that end [`crate::run()`]; per-message problems are dead-lettered instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; nothing was started.
    #[error(transparent)]
    InvalidConfig(#[from] crate::config::InvalidConfig),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The NATS connection could not be set up.
    #[error(transparent)]
    Nats(#[from] windrow_jetstream::Error),
    /// The operations HTTP server failed.
    #[error(transparent)]
    Ops(#[from] windrow_ops::Error),
    /// A replay could not read its stream or verify its result.
    #[error("replay: {0}")]
    Replay(String),
}

impl Error {
    /// Whether the operator must fix the configuration (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::InvalidConfig(_))
    }
}
