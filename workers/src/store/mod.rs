//! The per-node LMDB store: one environment per UTC day of the sample time.
//!
//! Layout: `<dir>/YYYY-MM-DD/data.mdb`, each with these named databases:
//! - `run.0` to `run.127` (format version 5): sorted runs of windows, keyed
//!   series 0x00 field 0x00 resolution (u32 BE) start (u64 BE, sign bit
//!   flipped so negative times sort first): order preserving, one series is
//!   a prefix and a time range a contiguous run → the
//!   [`Aggregate`](crate::window::Aggregate) of the window: 64 bytes, or 16
//!   (time and value) for a window of one sample, from format version 4 on.
//!   Each compaction writes one run by appending; runs of one level merge
//!   into one of the next (module `runs`, which says why);
//! - `windows`: the same keys, in one B-tree: where compaction merged
//!   before format version 5. A day written by an older build keeps what
//!   it holds there; nothing is written to it any more;
//! - `recent.0` and `recent.1`: the same windows keyed time first
//!   (resolution, start, series 0x00 field), where each batch writes them to
//!   the active one: a batch's windows are neighbours there, so a commit
//!   rewrites a few pages instead of a page per series. Once the active one
//!   holds `recent_max_windows`, the writer freezes it, makes the other one
//!   active, and appends the frozen one, sorted by window key, to a new run
//!   in slices of `compaction_slice_windows`, one transaction each, between
//!   batches or when no batch comes (compaction, module `compaction`);
//!   `meta` `recent_active` and `compacted_below` record where it stands, so
//!   readers skip what is in the run already and a restart resumes. A
//!   window may have parts in `windows`, in several runs and in `recent`;
//!   every read merges them. Batches write only the finest resolution of
//!   those the day rolls up (module `rollup`): its coarser windows (default:
//!   the minutes) are made from the fine ones by compaction, and rolled up
//!   on reading `recent`;
//! - `latest`: series 0x00 field → time and value of the newest sample;
//! - `applied`: stream 0x00 (seq >> 16) → roaring bitmap of the low 16 bits of
//!   the JetStream sequences applied in this day. It is written in the same
//!   transaction as the windows the messages changed, which is what makes
//!   applying idempotent: a redelivery after a crash between commit and ack
//!   finds its sequence and changes nothing;
//! - `meta`: `format_version` (5; versions 1 to 4 are read, and become 5
//!   when opened for writing: a version 1 day gets its `recent` databases,
//!   every older day its run slots; days of versions 1 and 2 have no
//!   rollups, and values written before version 4 are 64 bytes),
//!   `created_at`, `rollups` (e.g. `60:1`: the minutes are rolled up from
//!   the seconds; fixed when the day is created), `messages_applied`, and
//!   the runs' slots (`runs`, `run_filling`, `runs_merges`; module `runs`).
//!
//! Why a day per environment: retention deletes a whole directory (no per-key
//! deletes, no free-page churn, the file shrinks at once), a day's map grows
//! independently, and a backup of a finished day never changes again.
//!
//! One writer (the worker's writer thread) owns a [`Store`]; readers, in this
//! process or another, use a [`StoreReader`] ([`open_read_only`]); a [`Store`]
//! derefs to the [`StoreReader`] of its own days, so both share the query code.

mod batch;
mod codec;
mod compaction;
mod config;
mod day;
mod error;
mod read;
mod rollup;
mod runs;
mod stat;
mod write;

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc,
};

use time::{format_description::well_known::Iso8601, Date, OffsetDateTime};

pub use self::{
    config::StoreConfig,
    error::StoreError,
    read::{open_read_only, LatestRow, SharedReader, StoreReader, WindowRow},
    stat::DayStat,
    write::{CompactionStep, Store},
};
use crate::window::{Sample, NS_PER_DAY};

/// The store's notion of now, injectable so tests can drive lateness,
/// rotation and retention without sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix nanoseconds.
    fn now_ns(&self) -> i64;
}

/// The system clock (UTC).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> i64 {
        let ns = OffsetDateTime::now_utc().unix_timestamp_nanos();
        i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
    }
}

/// A clock tests set and move by hand; clones share the time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock at `ns` (Unix nanoseconds).
    pub fn new(ns: i64) -> Self {
        Self(Arc::new(AtomicI64::new(ns)))
    }

    /// Sets the time.
    pub fn set(&self, ns: i64) {
        self.0.store(ns, Ordering::SeqCst);
    }

    /// Moves the time by `ns` (negative moves it back).
    pub fn advance(&self, ns: i64) {
        self.0.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// One NATS message's samples.
///
/// All samples of a message share one time; the store files the whole message
/// under the UTC day of the first sample (and checks lateness against it).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// JetStream stream name and sequence, for idempotency; `None` for core NATS.
    pub stream_seq: Option<(Arc<str>, u64)>,
    /// When the message entered the system (the stream's timestamp), Unix ns.
    /// Lateness is judged against it when set, so that a replay long after the
    /// fact accepts and rejects exactly what the live worker did; `None` (core
    /// NATS) judges against the clock.
    pub received_ns: Option<i64>,
    /// The samples.
    pub samples: Vec<Sample>,
}

/// What [`Store::apply`] did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Committed.
    Applied,
    /// Its (stream, sequence) was applied before (or earlier in the batch);
    /// nothing changed.
    Duplicate,
    /// Older than the allowed lateness, or its day is beyond retention.
    TooLate,
    /// Newer than now plus `max_future_secs`.
    TooEarly,
    /// No samples, a non-finite value, or a series, field or stream that
    /// cannot be a key (contains 0x00, or too long for LMDB).
    Invalid,
}

/// The UTC day of a time, `YYYY-MM-DD`: the name of its environment.
pub fn day_name(ts_ns: i64) -> Option<String> {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ns)).ok()?;
    t.date().format(&Iso8601::DATE).ok()
}

/// Days since the Unix epoch (UTC): groups and orders times like
/// [`day_name`], without formatting a date (the writer's per-message test).
pub fn day_number(ts_ns: i64) -> i64 {
    ts_ns.div_euclid(NS_PER_DAY)
}

/// Start (Unix ns, midnight UTC) of a day named by [`day_name`]; `None` if
/// `name` is not exactly such a name (so stray directories are never deleted).
pub fn day_start_ns(name: &str) -> Option<i64> {
    let date = Date::parse(name, &Iso8601::DATE).ok()?;
    if date.format(&Iso8601::DATE).ok()? != name {
        return None;
    }
    i64::try_from(date.midnight().assume_utc().unix_timestamp_nanos()).ok()
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod merge_tests;

#[cfg(test)]
mod reader_tests;

#[cfg(test)]
mod size_tests;

#[cfg(test)]
mod recent_tests;

#[cfg(test)]
mod runs_tests;

#[cfg(test)]
mod day_name_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn day_names_are_utc_dates_and_round_trip() {
        assert_eq!(day_name(0).as_deref(), Some("1970-01-01"));
        assert_eq!(day_name(-1).as_deref(), Some("1969-12-31"));
        assert_eq!(
            day_name(1_764_028_800_000_000_000).as_deref(),
            Some("2025-11-25")
        );
        assert_eq!(day_name(i64::MIN).as_deref(), Some("1677-09-21"));
        assert_eq!(day_name(i64::MAX).as_deref(), Some("2262-04-11"));
        assert_eq!(day_start_ns("1970-01-02"), Some(NS_PER_DAY));
        assert_eq!(day_start_ns("2025-11-25"), Some(1_764_028_800_000_000_000));
        for bad in ["20251125", "2025-11-25x", "2025-13-01", "lost+found", ""] {
            assert_eq!(day_start_ns(bad), None, "{bad}");
        }
    }

    proptest! {
        /// The writer groups batches and judges retention by day number: it
        /// must group and order times exactly as their day names do.
        #[test]
        fn day_numbers_group_and_order_like_day_names(a in any::<i64>(), b in any::<i64>()) {
            let (na, nb) = (day_name(a).unwrap(), day_name(b).unwrap());
            prop_assert_eq!(day_number(a).cmp(&day_number(b)), na.cmp(&nb));
        }

        #[test]
        fn day_numbers_agree_near_midnight(day in -100_000i64..100_000, offset in -1i64..=1) {
            let t = (day * NS_PER_DAY).saturating_add(offset);
            let t_name = day_name(t).unwrap();
            prop_assert_eq!(day_number(t) == day, t_name == day_name(day * NS_PER_DAY).unwrap());
        }
    }
}
