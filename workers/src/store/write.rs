//! The writable store: batched, idempotent applies, map growth, retention.

use std::{
    collections::{btree_map::Entry, BTreeMap},
    sync::Arc,
};

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use super::{
    batch::{apply_day, compact_day, Planned},
    codec::{check_names, check_stream},
    config::MAP_GRANULE,
    day::{open_for_write, Day, DayEnv},
    day_name, day_number,
    error::{io, StoreError},
    read::{day_dirs, StoreReader},
    Clock, Message, StoreConfig, Verdict,
};
use crate::window::{NS_PER_DAY, NS_PER_SEC};

/// The writable store; one per data directory, owned by the writer thread.
///
/// Derefs to the [`StoreReader`] of its days, so the writer answers queries
/// with the same code as `windrow store`.
pub struct Store {
    config: StoreConfig,
    clock: Arc<dyn Clock>,
    reader: StoreReader,
}

impl std::ops::Deref for Store {
    type Target = StoreReader;
    fn deref(&self) -> &StoreReader {
        &self.reader
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.config.dir)
            .field("days", &self.reader.days())
            .finish_non_exhaustive()
    }
}

/// What lateness, the future limit and retention allow, fixed once per batch.
struct Limits {
    oldest_ns: i64,
    newest_ns: i64,
    /// For messages with their own reception time.
    lateness_ns: i64,
    future_ns: i64,
    /// Days before this one ([`day_number`]) are beyond retention.
    first_day: i64,
}

impl Store {
    /// Opens the store in `config.dir` (created if missing) and every day in it.
    ///
    /// # Errors
    /// [`StoreError::InvalidConfig`] if [`StoreConfig::problems`] finds any;
    /// [`StoreError`] if the directory or an environment cannot be opened.
    pub fn open(config: StoreConfig, clock: Arc<dyn Clock>) -> Result<Store, StoreError> {
        // A zero resolution would divide by zero in the middle of a batch.
        let problems = config.problems("store");
        if !problems.is_empty() {
            return Err(StoreError::InvalidConfig { problems });
        }
        std::fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
        let mut store = Store {
            reader: StoreReader::new(config.dir.clone()),
            config,
            clock,
        };
        for name in day_dirs(&store.config.dir, true)? {
            store.day(&name)?;
        }
        Ok(store)
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The read side of this store (what `Deref` gives).
    pub fn reader(&self) -> &StoreReader {
        &self.reader
    }

    /// Applies a batch: one write transaction per day touched, committed before
    /// returning; a verdict per message, in order.
    ///
    /// A full map is grown (doubled, up to `max_map_bytes`) and the day's part
    /// retried from scratch, so nothing of a batch is lost to growth.
    ///
    /// # Errors
    /// [`StoreError`]; nothing of the failing day's transaction is committed.
    /// Days committed earlier in the call stay committed, and a retry of the
    /// batch finds their JetStream messages as [`Verdict::Duplicate`].
    pub fn apply(&mut self, batch: &[Message]) -> Result<Vec<Verdict>, StoreError> {
        let limits = self.limits();
        let mut verdicts = Vec::with_capacity(batch.len());
        // Keyed by day number; each day is named once per batch.
        let mut by_day: BTreeMap<i64, (String, Vec<Planned>)> = BTreeMap::new();
        for (index, m) in batch.iter().enumerate() {
            let (mut verdict, day) = self.classify(m, &limits);
            if let Some(ts_ns) = day {
                let plan = match by_day.entry(day_number(ts_ns)) {
                    Entry::Occupied(e) => Some(&mut e.into_mut().1),
                    Entry::Vacant(e) => {
                        day_name(ts_ns).map(|name| &mut e.insert((name, Vec::new())).1)
                    }
                };
                match plan {
                    Some(plan) => plan.push(Planned {
                        index,
                        late: verdict == Verdict::TooLate,
                    }),
                    None => verdict = Verdict::Invalid,
                }
            }
            verdicts.push(verdict);
        }
        for (name, plan) in by_day.into_values() {
            let day = self.day(&name)?;
            let out = loop {
                match apply_day(&day, &self.config.resolutions_secs, batch, &plan) {
                    Err(e) if e.is_map_full() => self.grow(&day)?,
                    other => break other?,
                }
            };
            for (p, v) in plan.iter().zip(out) {
                verdicts[p.index] = v;
            }
        }
        Ok(verdicts)
    }

    /// Compacts every day whose `recent` database holds
    /// `recent_max_windows` or more (see [`StoreConfig::recent_max_windows`]);
    /// the days compacted and the windows moved. The writer calls it between
    /// batches.
    ///
    /// # Errors
    /// [`StoreError`]; the failing day's windows stay in `recent`, where
    /// readers find them, and the next call tries again.
    pub fn compact_due(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut done = Vec::new();
        let days: Vec<Day> = self.reader.days.values().cloned().collect();
        for day in days {
            if day.recent_windows()? >= self.config.recent_max_windows {
                done.push((day.name.clone(), self.compact(&day)?));
            }
        }
        Ok(done)
    }

    /// Compacts every day now, however few windows `recent` holds (a
    /// benchmark's or test's end state, or before retiring a store).
    ///
    /// # Errors
    /// As [`Store::compact_due`].
    pub fn compact_all(&mut self) -> Result<u64, StoreError> {
        let days: Vec<Day> = self.reader.days.values().cloned().collect();
        let mut moved = 0;
        for day in days {
            moved += self.compact(&day)?;
        }
        Ok(moved)
    }

    /// One day's compaction, growing a full map as [`Store::apply`] does.
    fn compact(&self, day: &DayEnv) -> Result<u64, StoreError> {
        loop {
            match compact_day(day) {
                Err(e) if e.is_map_full() => self.grow(day)?,
                other => return other,
            }
        }
    }

    fn limits(&self) -> Limits {
        let now = self.clock.now_ns();
        let ns = |secs: u64| {
            i64::try_from(secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(NS_PER_SEC)
        };
        Limits {
            oldest_ns: now.saturating_sub(ns(self.config.allowed_lateness_secs)),
            newest_ns: now.saturating_add(ns(self.config.max_future_secs)),
            lateness_ns: ns(self.config.allowed_lateness_secs),
            future_ns: ns(self.config.max_future_secs),
            first_day: day_number(self.first_kept_ns(now)),
        }
    }

    /// The oldest day retention keeps: today minus `retention_days`.
    fn first_kept_day(&self, now: i64) -> String {
        day_name(self.first_kept_ns(now)).unwrap_or_default()
    }

    /// A time in [`Self::first_kept_day`].
    fn first_kept_ns(&self, now: i64) -> i64 {
        now.saturating_sub(i64::from(self.config.retention_days).saturating_mul(NS_PER_DAY))
    }

    /// A message's verdict before the day's transaction, and a time in the
    /// day whose transaction must see it (which turns `Applied` into
    /// `Duplicate` if seen).
    fn classify(&self, m: &Message, limits: &Limits) -> (Verdict, Option<i64>) {
        let Some(first) = m.samples.first() else {
            return (Verdict::Invalid, None);
        };
        if let Err(e) = storable(m) {
            tracing::debug!(error = %e, "message cannot be stored");
            return (Verdict::Invalid, None);
        }
        let (oldest_ns, newest_ns) = match m.received_ns {
            Some(at) => (
                at.saturating_sub(limits.lateness_ns),
                at.saturating_add(limits.future_ns),
            ),
            None => (limits.oldest_ns, limits.newest_ns),
        };
        if first.ts_ns > newest_ns {
            return (Verdict::TooEarly, None);
        }
        if first.ts_ns < oldest_ns || day_number(first.ts_ns) < limits.first_day {
            let look = m.stream_seq.is_some()
                && day_name(first.ts_ns).is_some_and(|name| self.reader.days.contains_key(&name));
            return (Verdict::TooLate, look.then_some(first.ts_ns));
        }
        (Verdict::Applied, Some(first.ts_ns))
    }

    /// The day's environment, opened (and created) on first use.
    fn day(&mut self, name: &str) -> Result<Day, StoreError> {
        if let Some(day) = self.reader.days.get(name) {
            return Ok(day.clone());
        }
        let now = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.clock.now_ns()));
        let created_at = now
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        let day = open_for_write(
            &self.config.dir,
            name,
            self.config.initial_map(),
            &created_at,
        )?;
        tracing::info!(day = name, map_bytes = day.map_bytes(), "opened a day");
        self.reader.days.insert(name.to_owned(), day.clone());
        Ok(day)
    }

    /// Doubles the day's map, up to `max_map_bytes`.
    fn grow(&self, day: &DayEnv) -> Result<(), StoreError> {
        let (current, max) = (day.map_bytes(), self.config.max_map());
        if current >= max {
            return Err(StoreError::MapFull {
                day: day.name.clone(),
                map_bytes: current,
            });
        }
        let next = current
            .saturating_mul(2)
            .div_ceil(MAP_GRANULE)
            .saturating_mul(MAP_GRANULE)
            .min(max);
        tracing::info!(day = %day.name, from = current, to = next, "LMDB map full; growing it and retrying the day");
        day.resize(next)
    }

    /// Deletes day directories older than today minus `retention_days`,
    /// whole, closing their environments first; returns the days removed.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the directory cannot be listed or a day removed.
    pub fn enforce_retention(&mut self) -> Result<Vec<String>, StoreError> {
        let first = self.first_kept_day(self.clock.now_ns());
        let mut removed = Vec::new();
        for name in day_dirs(&self.config.dir, false)? {
            if name >= first {
                continue;
            }
            if let Some(day) = self.reader.days.remove(&name) {
                if !DayEnv::close(day) {
                    // Unlinked files stay valid for that reader until it drops them.
                    tracing::warn!(day = %name, "a reader in this process still has the day open; deleting it anyway");
                }
            }
            let path = self.config.dir.join(&name);
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
            tracing::info!(day = %name, "deleted a day beyond retention");
            removed.push(name);
        }
        Ok(removed)
    }

    /// Closes every environment and waits until LMDB released them, so the
    /// same directory can be opened again in this process at once.
    pub fn close(self) {
        for (_, day) in self.reader.days {
            DayEnv::close(day);
        }
    }
}

/// Checks everything that would make a message fail its day's transaction.
fn storable(m: &Message) -> Result<(), StoreError> {
    if let Some((stream, _)) = &m.stream_seq {
        check_stream(stream)?;
    }
    for s in &m.samples {
        check_names(&s.series, &s.field)?;
        if !s.value.is_finite() {
            // NaN would poison a window's sum for good.
            return Err(StoreError::InvalidKey {
                what: "value",
                value: s.value.to_string(),
                reason: "not finite",
            });
        }
    }
    Ok(())
}
