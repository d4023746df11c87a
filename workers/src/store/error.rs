//! Store failures and whether retrying them can help.

use std::path::PathBuf;

use heed::MdbError;

/// Why the store could not do what was asked.
///
/// Per-message problems (a series that cannot be a key, a sample too late)
/// are not errors but [`Verdict`](super::Verdict)s; an error means the whole
/// call failed and, for [`Store::apply`](super::Store::apply), that the
/// failing day's transaction was not committed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory operation failed (full disk, permissions).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// LMDB failed on one day's environment.
    #[error("LMDB day {day}: {source}")]
    Lmdb {
        /// The day (`YYYY-MM-DD`).
        day: String,
        /// The cause.
        #[source]
        source: heed::Error,
    },
    /// The day's map is full and already at `max_map_bytes`.
    #[error("LMDB day {day}: map full at max_map_bytes ({map_bytes} bytes); raise max_map_bytes")]
    MapFull {
        /// The day.
        day: String,
        /// The map size reached.
        map_bytes: usize,
    },
    /// A stored value does not decode (wrong length, bad bitmap, unknown format).
    #[error("day {day}: corrupt {what}")]
    Corrupt {
        /// The day.
        day: String,
        /// What did not decode, and where.
        what: String,
    },
    /// Every run slot of the day is taken (see the `runs` module): its next
    /// compaction waits, its windows staying in `recent`, until a merge of
    /// runs frees one.
    #[error(
        "day {day}: every run slot is taken; compaction waits for a merge of runs to free one"
    )]
    NoFreeRunSlot {
        /// The day.
        day: String,
    },
    /// This process opened the day read-only before a worker gave it its
    /// run slots (format version 5): its runs are out of this view's reach.
    #[error("day {day} was upgraded to format version 5 after this reader opened it; open the store again")]
    UpgradedSinceOpened {
        /// The day.
        day: String,
    },
    /// A name cannot be part of a key: it contains 0x00 (the key separator) or
    /// makes the key longer than LMDB allows.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidKey {
        /// Which name (`series`, `field`, `stream`, `pattern`).
        what: &'static str,
        /// The name, shortened to 64 characters.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// The settings are invalid (what [`StoreConfig::problems`](super::StoreConfig::problems) says).
    #[error("invalid store settings: {}", problems.join("; "))]
    InvalidConfig {
        /// One message per problem.
        problems: Vec<String>,
    },
    /// A writer asked for a day that a reader in this process opened with
    /// `MDB_RDONLY`; heed allows one environment per path per process.
    #[error("day {day} is open read-only in this process; drop the StoreReader before writing")]
    OpenReadOnly {
        /// The day.
        day: String,
    },
}

impl StoreError {
    /// Whether retrying the same call later can succeed without an operator.
    ///
    /// `true` for I/O (a full disk can be freed) and transient LMDB failures;
    /// `false` for corruption, bad input and [`StoreError::MapFull`] (only a
    /// larger `max_map_bytes` helps).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io { .. } | Self::OpenReadOnly { .. } | Self::NoFreeRunSlot { .. } => true,
            Self::MapFull { .. }
            | Self::UpgradedSinceOpened { .. }
            | Self::Corrupt { .. }
            | Self::InvalidKey { .. }
            | Self::InvalidConfig { .. } => false,
            Self::Lmdb { source, .. } => match source {
                heed::Error::Io(_) | heed::Error::EnvAlreadyOpened => true,
                heed::Error::Encoding(_) | heed::Error::Decoding(_) => false,
                heed::Error::Mdb(e) => !matches!(
                    e,
                    MdbError::PageNotFound
                        | MdbError::Corrupted
                        | MdbError::Panic
                        | MdbError::VersionMismatch
                        | MdbError::Invalid
                        | MdbError::Incompatible
                        | MdbError::BadValSize
                        | MdbError::TxnFull
                ),
            },
        }
    }

    /// LMDB ran out of map space (the caller grows the map and retries).
    pub(super) fn is_map_full(&self) -> bool {
        matches!(
            self,
            Self::Lmdb {
                source: heed::Error::Mdb(MdbError::MapFull),
                ..
            }
        )
    }
}

/// Maps a heed error to [`StoreError::Lmdb`] for `day`.
pub(super) fn lmdb(day: &str) -> impl Fn(heed::Error) -> StoreError + '_ {
    move |source| StoreError::Lmdb {
        day: day.to_owned(),
        source,
    }
}

/// Maps an I/O error to [`StoreError::Io`] for `path`.
pub(super) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { path, source }
}

/// [`StoreError::Corrupt`] for `day`.
pub(super) fn corrupt(day: &str, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        day: day.to_owned(),
        what: what.into(),
    }
}
