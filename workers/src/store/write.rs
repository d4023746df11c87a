//! The writable store: batched, idempotent applies, map growth, retention.

use std::{
    collections::{btree_map::Entry, BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use super::{
    batch::{apply_day, Planned},
    codec::{check_names, check_stream},
    compaction::{compaction_step, load_frozen, start_compaction, Buffers, Compaction},
    config::MAP_GRANULE,
    day::{open_for_write, Birth, Day, DayEnv},
    day_name, day_number,
    error::{corrupt, io, StoreError},
    read::{day_dirs, SharedReader, StoreReader},
    rollup,
    runs::{merge_step, start_merges, RUN_FAN_IN},
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
    /// Compactions in progress, by day.
    compactions: HashMap<String, Task>,
    /// Windows written to `recent` since the last [`Store::compact_due`].
    written: usize,
    /// What was written while a compaction's frozen windows loaded.
    backlog: Backlog,
    /// The last finished compaction's buffers, for the next load.
    spare: Buffers,
    /// Complete runs of one level merged into one of the next:
    /// [`RUN_FAN_IN`]; tests lower it to merge sooner.
    pub(super) fan_in: usize,
    /// Tests: every load takes exactly this many steps (and then waits for
    /// its thread), so what is written meanwhile does not depend on how
    /// fast the machine loads.
    #[cfg(test)]
    pub(super) load_steps: Option<usize>,
    /// The open days as [`SharedReader`]s on other threads see them: set
    /// when a day opens, and a day is taken out before it is deleted.
    published: Arc<Mutex<BTreeMap<String, Day>>>,
}

/// Slices over which what was written while a compaction's frozen windows
/// loaded is paid for, a sixteenth each, from the slice after the one that
/// finds the load done: no slice carries much of it, and it is paid within
/// 16 batches (a compaction of the default 1,000,000 windows, paced by the
/// writes alone, would last about 25 batches of 20,000; the minimum slice
/// often ends it sooner, and what is unpaid then is forgotten).
const BACKLOG_SLICES: usize = 16;

/// Windows written while a compaction's frozen windows loaded: `left` not
/// yet paid for by a slice, `share` of them added to each slice (set when
/// the load is done).
#[derive(Default)]
struct Backlog {
    left: usize,
    share: usize,
}

/// A compaction of one day in this process.
enum Task {
    /// Its frozen windows being read and sorted, on a thread of its own;
    /// `steps`: the steps that found it not done.
    Loading {
        handle: std::thread::JoinHandle<Result<Compaction, StoreError>>,
        steps: usize,
    },
    /// Being appended to its run, a slice after each batch (or when idle).
    Merging(Compaction),
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

/// What one [`Store::compact_due`] step did for a day: a slice of a
/// compaction of `recent` into a run, or of a merge of runs.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactionStep {
    /// The day, `YYYY-MM-DD`.
    pub day: String,
    /// Windows written to a run by this step.
    pub windows: usize,
    /// Whether the compaction (or the merge) ended with it.
    pub done: bool,
    /// The writer's time on this step, seconds.
    pub seconds: f64,
    /// Whether it was a slice of a merge of runs.
    pub merge: bool,
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
            compactions: HashMap::new(),
            written: 0,
            backlog: Backlog::default(),
            spare: Buffers::default(),
            fan_in: RUN_FAN_IN,
            #[cfg(test)]
            load_steps: None,
            published: Arc::default(),
        };
        for name in day_dirs(&store.config.dir, true)? {
            store.day(&name)?;
        }
        Ok(store)
    }

    /// A handle that reads this store from other threads while this one
    /// writes: LMDB readers never wait for the writer, nor it for them (a
    /// map resize waits for the read transactions open at that moment).
    /// Each read sees the days open when it starts.
    pub fn shared_reader(&self) -> SharedReader {
        SharedReader::new(self.config.dir.clone(), self.published.clone())
    }

    /// Shows other threads' readers the days open now.
    fn publish(&self) {
        *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.reader.days.clone();
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
            let resolutions = &self.config.resolutions_secs;
            let (out, written) = retry_map_full(&self.config, &day, |day| {
                apply_day(day, resolutions, batch, &plan)
            })?;
            self.written = self.written.saturating_add(written);
            for (p, v) in plan.iter().zip(out) {
                verdicts[p.index] = v;
            }
        }
        Ok(verdicts)
    }

    /// One step of compaction for every day that needs one: a day whose
    /// active `recent` database holds `recent_max_windows` or more starts a
    /// compaction (see [`StoreConfig::recent_max_windows`]), and a day with a
    /// compaction in progress (also one a previous process left) writes its
    /// next `compaction_slice_windows` windows to its run, or 2 × (1 + rollups) times
    /// what the batch since the last call wrote to `recent` (plus a share of
    /// what was written while the compaction's windows loaded) if that is
    /// more, so that compaction outpaces the writes; before it, each merge of
    /// runs in progress (or due) writes as many. Returns per day the slices:
    /// the windows written and whether the compaction or merge is done. The
    /// writer thread calls it after every batch, so the batches in between
    /// wait for one slice of each at most, never for a whole compaction or
    /// merge, and when no batch came for a while, so that a compaction also
    /// ends when traffic stops.
    ///
    /// # Errors
    /// [`StoreError`]; nothing of the failing slice is committed (its windows
    /// stay where readers find them) and the next call redoes it.
    pub fn compact_due(&mut self) -> Result<Vec<CompactionStep>, StoreError> {
        let mut done = Vec::new();
        self.compact_due_into(&mut done)?;
        Ok(done)
    }

    /// [`Store::compact_due`], putting the slices committed into `done`
    /// even when a later one fails. A day's failure does not keep the other
    /// days from their slices; the first error is returned.
    ///
    /// # Errors
    /// As [`Store::compact_due`].
    pub fn compact_due_into(&mut self, done: &mut Vec<CompactionStep>) -> Result<(), StoreError> {
        let days: Vec<Day> = self.reader.days.values().cloned().collect();
        // A window written to `recent` becomes up to one more window to
        // merge per rollup (its coarse windows), hence 1 + rollups per
        // window written, and twice that to outpace the writes: a
        // compaction of F frozen windows (and at most F rolled up per
        // rollup) then ends after about F/2 more are written, before
        // `recent_max_windows` are.
        //
        // What is written while the frozen windows load is paid for too,
        // or a load as long as writing half of `recent_max_windows` would
        // make each compaction larger than the one before. But it is spread
        // over the `BACKLOG_SLICES` slices after the one that finds the load
        // done: added to that one, it made it most of the compaction (a
        // worker at 450k-600k msg/s paused its writer for up to about a
        // second per compaction, and lost messages; BENCHMARKS.md). A step
        // that fails drops its task (the next call loads what is left of
        // it) and the writes it was to pay for.
        let loading = self
            .compactions
            .values()
            .any(|t| matches!(t, Task::Loading { .. }));
        let mut written = std::mem::take(&mut self.written);
        // Merges are paced on the writes alone: a compaction's load and
        // backlog are none of theirs.
        let fresh = written;
        if self.compactions.is_empty() {
            self.backlog = Backlog::default();
        } else if loading {
            self.backlog.left = self.backlog.left.saturating_add(written);
            // Set anew once this load is done (another day's may be paid).
            self.backlog.share = 0;
            written = 0;
        } else {
            if self.backlog.share == 0 {
                self.backlog.share = self.backlog.left.div_ceil(BACKLOG_SLICES);
            }
            let share = self.backlog.share.min(self.backlog.left);
            self.backlog.left -= share;
            written = written.saturating_add(share);
        }
        let rollups = days.iter().map(|d| d.rollups.len()).max().unwrap_or(0);
        let min_slice = usize::try_from(self.config.compaction_slice_windows).unwrap_or(usize::MAX);
        let slice = min_slice.max(written.saturating_mul(2 * (1 + rollups)));
        // For each merge: what the writes bring to a level (each window
        // passes each level once, 1 + rollups per window written), at least
        // half the minimum slice, so merges keep pace with the writes and
        // go on when idle; a merge beside a compaction adds about half as
        // much to the pause.
        let merge_slice = min_slice.div_ceil(2).max(fresh.saturating_mul(1 + rollups));
        let mut failed = None;
        for day in days {
            // Merges first: they free slots, which a compaction needs.
            let result = self.merge_steps(&day, merge_slice, done).and_then(|()| {
                if let Some(step) = self.compaction_step(&day, slice, false)? {
                    done.push(step);
                }
                Ok(())
            });
            if let (Err(e), None) = (result, &failed) {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Starts the day's merges of runs that are due, and merges up to
    /// `slice` windows of each merge in progress (at most a few hundred
    /// thousand: see `runs`), one transaction each.
    ///
    /// Each level merges on its own, at least at the pace the writes feed
    /// it (see [`Store::compact_due_into`]), so a level holds
    /// [`RUN_FAN_IN`] runs being merged and up to about as many new ones
    /// (module `runs`).
    fn merge_steps(
        &mut self,
        day: &Day,
        slice: usize,
        out: &mut Vec<CompactionStep>,
    ) -> Result<(), StoreError> {
        let fan_in = self.fan_in;
        let targets = retry_map_full(&self.config, day, |day| start_merges(day, fan_in))?;
        for target in targets {
            let started = std::time::Instant::now();
            let (windows, done) =
                retry_map_full(&self.config, day, |day| merge_step(day, target, slice))?;
            out.push(CompactionStep {
                day: day.name.clone(),
                windows,
                done,
                seconds: started.elapsed().as_secs_f64(),
                merge: true,
            });
        }
        Ok(())
    }

    /// Compacts every day to the end now, however few windows `recent`
    /// holds, and ends the merges of runs that are due (a benchmark's or
    /// test's end state); the windows moved out of `recent`.
    ///
    /// # Errors
    /// As [`Store::compact_due`].
    pub fn compact_all(&mut self) -> Result<u64, StoreError> {
        let days: Vec<Day> = self.reader.days.values().cloned().collect();
        let mut moved = 0;
        for day in days {
            // Merges first, as in `compact_due`: they free slots.
            self.finish_merges(&day)?;
            // An unfinished compaction first, then one of what is active.
            for _ in 0..2 {
                while let Some(step) = self.compaction_step(&day, usize::MAX, true)? {
                    moved += step.windows as u64;
                    if step.done {
                        break;
                    }
                }
            }
            // And the merges of runs that this makes due.
            self.finish_merges(&day)?;
        }
        Ok(moved)
    }

    /// Ends the day's merges of runs, and those their runs make due.
    fn finish_merges(&mut self, day: &Day) -> Result<(), StoreError> {
        loop {
            let mut steps = Vec::new();
            self.merge_steps(day, usize::MAX, &mut steps)?;
            if steps.is_empty() {
                return Ok(());
            }
        }
    }

    /// The day's next compaction slice, starting or resuming a compaction
    /// if there is none in this process (`force`: whatever `recent` holds,
    /// and without skipping a turn while the frozen windows load).
    fn compaction_step(
        &mut self,
        day: &Day,
        slice: usize,
        force: bool,
    ) -> Result<Option<CompactionStep>, StoreError> {
        if !self.compactions.contains_key(&day.name) {
            let (state, active) = day.recent_status()?;
            let frozen = match state.merged_below {
                // One a previous process left unfinished.
                Some(floor) => Some((1 - state.active, floor)),
                None if force || active >= self.config.recent_max_windows => {
                    retry_map_full(&self.config, day, start_compaction)?
                        .map(|frozen| (frozen, Vec::new()))
                }
                None => None,
            };
            let Some((frozen, floor)) = frozen else {
                return Ok(None);
            };
            // Reading and sorting a million windows takes a few tenths of a
            // second: on a thread of its own, batches go on meanwhile.
            let loading = day.clone();
            let spare = std::mem::take(&mut self.spare);
            let handle = std::thread::Builder::new()
                .name("lmdb-compaction".into())
                .spawn(move || {
                    loading.read(|rtxn| load_frozen(&loading, rtxn, frozen, &floor, spare))
                })
                .map_err(|source| StoreError::Io {
                    path: "lmdb-compaction thread".into(),
                    source,
                })?;
            self.compactions
                .insert(day.name.clone(), Task::Loading { handle, steps: 0 });
        }
        let Some(task) = self.compactions.remove(&day.name) else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        // Dropped on an error: the next call reloads what is left from the
        // day, where `meta` says how far the merge got.
        let mut c = match task {
            Task::Loading { handle, steps } if !force && !self.loaded(&handle, steps) => {
                let steps = steps + 1;
                self.compactions
                    .insert(day.name.clone(), Task::Loading { handle, steps });
                return Ok(None);
            }
            Task::Loading { handle, steps } => {
                tracing::debug!(day = %day.name, steps, "a compaction's frozen windows loaded");
                handle
                    .join()
                    .map_err(|_| corrupt(&day.name, "the compaction's loading thread panicked"))??
            }
            Task::Merging(c) => c,
        };
        let windows = retry_map_full(&self.config, day, |day| compaction_step(day, &mut c, slice))?;
        let done = c.remaining() == 0;
        if done {
            self.spare = c.into_buffers();
        } else {
            self.compactions.insert(day.name.clone(), Task::Merging(c));
        }
        Ok(Some(CompactionStep {
            day: day.name.clone(),
            windows,
            done,
            seconds: started.elapsed().as_secs_f64(),
            merge: false,
        }))
    }

    /// Whether a load found not done by `steps` steps is done.
    fn loaded(
        &self,
        handle: &std::thread::JoinHandle<Result<Compaction, StoreError>>,
        steps: usize,
    ) -> bool {
        #[cfg(test)]
        if let Some(all) = self.load_steps {
            return steps >= all;
        }
        let _ = steps; // read by tests only
        handle.is_finished()
    }

    /// Forgets the day's compaction, waiting for its loading thread (which
    /// holds the day open) if it runs.
    fn forget_compaction(&mut self, name: &str) {
        if let Some(Task::Loading { handle, .. }) = self.compactions.remove(name) {
            let _ = handle.join();
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
        let birth = Birth {
            created_at: &created_at,
            rollups: &rollup::plan(&self.config.resolutions_secs),
        };
        let day = open_for_write(&self.config.dir, name, self.config.initial_map(), &birth)?;
        tracing::info!(day = name, map_bytes = day.map_bytes(), "opened a day");
        self.reader.days.insert(name.to_owned(), day.clone());
        self.publish();
        Ok(day)
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
            self.forget_compaction(&name);
            let day = self.reader.days.remove(&name);
            // Before closing: a published handle would keep the day open.
            self.publish();
            if let Some(day) = day {
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
    /// same directory can be opened again in this process at once; a day a
    /// query of this process still reads ([`Store::shared_reader`]) closes
    /// when that query is done.
    pub fn close(mut self) {
        let loading: Vec<String> = self.compactions.keys().cloned().collect();
        for name in loading {
            self.forget_compaction(&name);
        }
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        for (name, day) in self.reader.days {
            if !DayEnv::close(day) {
                tracing::warn!(day = %name, "a reader in this process still has the day open; it closes when that reader is done");
            }
        }
    }
}

/// `f` on the day, retried after growing the map while it fails for a full
/// one: nothing of a failed transaction was committed, so the retry starts
/// from scratch and nothing is lost to growth.
fn retry_map_full<T>(
    config: &StoreConfig,
    day: &DayEnv,
    mut f: impl FnMut(&DayEnv) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    loop {
        match f(day) {
            Err(e) if e.is_map_full() => grow(config, day)?,
            other => return other,
        }
    }
}

/// Doubles the day's map, up to `max_map_bytes`.
fn grow(config: &StoreConfig, day: &DayEnv) -> Result<(), StoreError> {
    let (current, max) = (day.map_bytes(), config.max_map());
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
