//! Reading the store: queries over windows and latest values, shared by the writer's
//! [`Store`](super::Store) (through `Deref`), by the query plane's
//! [`SharedReader`] and by [`open_read_only`].

use std::{
    collections::BTreeMap,
    ops::Bound,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use heed::{types::Bytes, Database, RoTxn};
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::{
    codec::{
        parse_latest_key, parse_latest_value, parse_window_key, pattern_prefix,
        put_window_key_of_names, recent_head, recent_parts, window_key, window_key_tail, WindowKey,
        SEP,
    },
    day::{open_for_read, Day, DayEnv},
    day_start_ns,
    error::{corrupt, io, lmdb, StoreError},
    rollup::{self, Rollup},
    runs::RunsState,
};
use crate::window::{Aggregate, NS_PER_DAY};

/// One window of one series and field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowRow {
    /// Series key.
    pub series: String,
    /// Value field.
    pub field: String,
    /// Resolution, seconds.
    pub resolution_secs: u32,
    /// Window start, Unix ns.
    pub start_ns: i64,
    /// The aggregate.
    pub agg: Aggregate,
}

/// The newest sample of one series and field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestRow {
    /// Series key.
    pub series: String,
    /// Value field.
    pub field: String,
    /// Sample time, Unix ns.
    pub ts_ns: i64,
    /// Value.
    pub value: f64,
}

/// Read access to the days of a data directory.
pub struct StoreReader {
    dir: PathBuf,
    pub(super) days: BTreeMap<String, Day>,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader")
            .field("dir", &self.dir)
            .field("days", &self.days())
            .finish()
    }
}

/// Reads a store from threads other than its writer's ([`Store::shared_reader`](super::Store::shared_reader)):
/// the query plane's answers come from here, so that a query, however much it
/// reads, never holds up the batches.
#[derive(Clone)]
pub struct SharedReader {
    dir: PathBuf,
    days: Arc<Mutex<BTreeMap<String, Day>>>,
}

impl SharedReader {
    pub(super) fn new(dir: PathBuf, days: Arc<Mutex<BTreeMap<String, Day>>>) -> Self {
        Self { dir, days }
    }

    /// A reader of the days open now, sharing the writer's environments.
    /// While it is held, a day deleted by retention stays readable to it.
    pub fn snapshot(&self) -> StoreReader {
        let days = self
            .days
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        StoreReader {
            dir: self.dir.clone(),
            days,
        }
    }
}

/// Day directory names under `dir` (exactly `YYYY-MM-DD`; with a `data.mdb`
/// if `with_data`), sorted. Nothing else in `dir` is ever opened or deleted.
pub(super) fn day_dirs(dir: &Path, with_data: bool) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        if day_start_ns(&name).is_some()
            && path.is_dir()
            && (!with_data || path.join("data.mdb").is_file())
        {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Opens every day of `dir` for reading, safe while a worker writes to it: in
/// another process LMDB readers never block the writer and see only committed
/// data; in the writer's own process the reader shares the writer's
/// environments. Days created later are picked up by [`StoreReader::refresh`].
///
/// # Errors
/// [`StoreError`] if the directory or an environment cannot be opened.
pub fn open_read_only(dir: &Path) -> Result<StoreReader, StoreError> {
    let mut reader = StoreReader::new(dir.to_owned());
    reader.refresh()?;
    Ok(reader)
}

/// Entries of a database in key order, as heed's iterators give them.
pub(super) type Entries<'t> = Box<dyn Iterator<Item = heed::Result<(&'t [u8], &'t [u8])>> + 't>;

/// Entries of `db` with keys from `key` on (all for an empty key, which
/// LMDB cannot seek to).
pub(super) fn from_key<'t>(
    db: Database<Bytes, Bytes>,
    txn: &'t RoTxn<'_>,
    key: &[u8],
) -> heed::Result<Entries<'t>> {
    if key.is_empty() {
        Ok(Box::new(db.iter(txn)?))
    } else {
        Ok(Box::new(
            db.range(txn, &(Bound::Included(key), Bound::Unbounded))?,
        ))
    }
}

/// Entries with keys starting with `prefix` (LMDB has no empty key, so an
/// empty prefix is a full scan).
fn scan<'t>(
    db: Database<Bytes, Bytes>,
    rtxn: &'t RoTxn<'_>,
    prefix: &[u8],
) -> heed::Result<Entries<'t>> {
    if prefix.is_empty() {
        Ok(Box::new(db.iter(rtxn)?))
    } else {
        Ok(Box::new(db.prefix_iter(rtxn, prefix)?))
    }
}

/// Calls `f` with the window key and value of every window in the day's
/// `recent` databases whose `recent` key lies in `range`, except what a
/// compaction in progress has written to its run already (below its floor
/// in the frozen database).
///
/// With `roll_up`, only the windows of its fine resolution are taken, each
/// under the key of the coarse window it rolls up into (the floor applies
/// to that key: a compaction merges a fine window and its coarse window in
/// different slices).
pub(super) fn for_each_recent(
    day: &DayEnv,
    rtxn: &RoTxn<'_>,
    range: (Bound<&[u8]>, Bound<&[u8]>),
    roll_up: Option<Rollup>,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let Some(recent) = day.recent else {
        return Ok(());
    };
    let state = day.recent_state(rtxn)?;
    let mut k = Vec::new();
    for (i, db) in recent.into_iter().enumerate() {
        let floor = state.floor(i);
        for entry in db.range(rtxn, &range).map_err(lmdb(&day.name))? {
            let (rk, v) = entry.map_err(lmdb(&day.name))?;
            let parts = recent_parts(rk).ok_or_else(|| corrupt(&day.name, "recent window key"))?;
            let (res, start, names) = parts;
            let (res, start) = match roll_up {
                None => (res, start),
                Some(r) => match rollup::roll_up(r, res, start) {
                    Some(coarse) => (r.coarse, coarse),
                    None => continue,
                },
            };
            k.clear();
            put_window_key_of_names(&mut k, names, res, start);
            if k.as_slice() >= floor {
                f(&k, v)?;
            }
        }
    }
    Ok(())
}

/// Whether the day (which holds windows starting in it) can hold a window
/// starting in `[from_ns, to_ns)`.
fn overlaps(day: &DayEnv, from_ns: i64, to_ns: i64) -> bool {
    let start = day_start_ns(&day.name).unwrap_or(i64::MIN);
    start < to_ns && start.saturating_add(NS_PER_DAY) > from_ns
}

impl StoreReader {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            days: BTreeMap::new(),
        }
    }

    /// Opens days created since, and lets go of days deleted since.
    ///
    /// # Errors
    /// [`StoreError`] if the directory or an environment cannot be opened.
    pub fn refresh(&mut self) -> Result<(), StoreError> {
        let present = day_dirs(&self.dir, true)?;
        self.days.retain(|name, _| present.contains(name));
        for name in present {
            if !self.days.contains_key(&name) {
                if let Some(day) = open_for_read(&self.dir, &name)? {
                    self.days.insert(name, day);
                }
            }
        }
        Ok(())
    }

    /// The days open, oldest first.
    pub fn days(&self) -> Vec<String> {
        self.days.keys().cloned().collect()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Windows of series matching `pattern` (exact series, `prefix*`, or `*`),
    /// optionally of one field, at one resolution, starting in
    /// `[from_ns, to_ns)`; sorted by series, field and start. Parts of one
    /// window in several days (possible only if a message's samples span
    /// midnight) are merged.
    ///
    /// # Errors
    /// [`StoreError::InvalidKey`] for a pattern with 0x00; [`StoreError::Lmdb`]
    /// or [`StoreError::Corrupt`] on a read failure.
    pub fn windows(
        &self,
        pattern: &str,
        field: Option<&str>,
        resolution_secs: u32,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<Vec<WindowRow>, StoreError> {
        let prefix = pattern_prefix(pattern)?;
        let exact = match (pattern.ends_with('*'), field) {
            // One series and field: the range is one contiguous run of keys.
            (false, Some(f)) if !f.as_bytes().contains(&SEP) => Some((
                window_key(pattern, f, resolution_secs, from_ns),
                window_key(pattern, f, resolution_secs, to_ns),
            )),
            _ => None,
        };
        let mut merged: BTreeMap<Vec<u8>, WindowRow> = BTreeMap::new();
        for day in self.days.values().filter(|d| overlaps(d, from_ns, to_ns)) {
            day.read(|rtxn| {
                // `windows` and the runs: the same keys, each read from its
                // floor on (what a merge of runs has moved on is skipped).
                let runs = RunsState::read(day, rtxn)?;
                let mut sorted = vec![(day.windows, &[][..])];
                for (slot, floor) in runs.in_use() {
                    sorted.push((day.run_db(slot)?, floor));
                }
                let mut add = |k: &[u8], v: &[u8]| -> Result<(), StoreError> {
                    let (res, start) =
                        window_key_tail(k).ok_or_else(|| corrupt(&day.name, "window key"))?;
                    if res != resolution_secs || start < from_ns || start >= to_ns {
                        return Ok(());
                    }
                    // A window met before (the fine windows of one coarse
                    // window, rolled up from `recent`) was parsed and its
                    // field checked then: only merged now.
                    if let Some(row) = merged.get_mut(k) {
                        let agg = Aggregate::from_bytes(v)
                            .ok_or_else(|| corrupt(&day.name, "window aggregate"))?;
                        row.agg.merge(&agg);
                        return Ok(());
                    }
                    let key =
                        parse_window_key(k).ok_or_else(|| corrupt(&day.name, "window key"))?;
                    if field.is_some_and(|f| f != key.field) {
                        return Ok(());
                    }
                    let agg = Aggregate::from_bytes(v)
                        .ok_or_else(|| corrupt(&day.name, "window aggregate"))?;
                    let WindowKey {
                        series,
                        field,
                        resolution_secs,
                        start_ns,
                    } = key;
                    merged
                        .entry(k.to_vec())
                        .and_modify(|row| row.agg.merge(&agg))
                        .or_insert(WindowRow {
                            series,
                            field,
                            resolution_secs,
                            start_ns,
                            agg,
                        });
                    Ok(())
                };
                for (db, floor) in sorted {
                    let entries: Entries<'_> = match &exact {
                        Some((lo, hi)) => {
                            let lo = lo.as_slice().max(floor);
                            let range = (Bound::Included(lo), Bound::Excluded(hi.as_slice()));
                            Box::new(db.range(rtxn, &range).map_err(lmdb(&day.name))?)
                        }
                        None => scan(db, rtxn, &prefix).map_err(lmdb(&day.name))?,
                    };
                    for entry in entries {
                        let (k, v) = entry.map_err(lmdb(&day.name))?;
                        if k >= floor {
                            add(k, v)?;
                        }
                    }
                }
                // Windows not yet compacted: `recent` is ordered by time
                // first, so the range is the query's, and the series pattern
                // is a filter. A rolled-up resolution's windows there are its
                // fine resolution's, rolled up as they are read (and any
                // written directly before the day's rule changed, see
                // `rollup::written`).
                let direct = [(resolution_secs, from_ns, to_ns, None)];
                let rolled = day
                    .rollups
                    .iter()
                    .filter(|r| r.coarse == resolution_secs)
                    .map(|r| {
                        let (lo, hi) = rollup::fine_range(*r, from_ns, to_ns);
                        (r.fine, lo, hi, Some(*r))
                    });
                for (res, lo, hi, roll_up) in direct.into_iter().chain(rolled) {
                    let (lo, hi) = (recent_head(res, lo), recent_head(res, hi));
                    let range = (Bound::Included(&lo[..]), Bound::Excluded(&hi[..]));
                    for_each_recent(day, rtxn, range, roll_up, |k, v| {
                        if k.starts_with(&prefix) {
                            add(k, v)?;
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            })?;
        }
        Ok(merged.into_values().collect())
    }

    /// The newest sample per series and field of series matching `pattern`,
    /// across days; sorted by series and field.
    ///
    /// # Errors
    /// As [`StoreReader::windows`].
    pub fn latest(&self, pattern: &str) -> Result<Vec<LatestRow>, StoreError> {
        let prefix = pattern_prefix(pattern)?;
        let mut out: BTreeMap<Vec<u8>, LatestRow> = BTreeMap::new();
        for day in self.days.values() {
            day.read(|rtxn| {
                for entry in scan(day.latest, rtxn, &prefix).map_err(lmdb(&day.name))? {
                    let (k, v) = entry.map_err(lmdb(&day.name))?;
                    let bad = || corrupt(&day.name, "latest entry");
                    let (series, field) = parse_latest_key(k).ok_or_else(bad)?;
                    let (ts_ns, value) = parse_latest_value(v).ok_or_else(bad)?;
                    let row = LatestRow {
                        series,
                        field,
                        ts_ns,
                        value,
                    };
                    match out.get_mut(k) {
                        Some(cur)
                            if !super::codec::is_newer((ts_ns, value), (cur.ts_ns, cur.value)) => {}
                        Some(cur) => *cur = row,
                        None => {
                            out.insert(k.to_vec(), row);
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(out.into_values().collect())
    }

    /// Sequences of `stream` applied, over all days.
    ///
    /// # Errors
    /// [`StoreError`] on a read failure or a bitmap that does not decode.
    pub fn applied_count(&self, stream: &str) -> Result<u64, StoreError> {
        let prefix = [stream.as_bytes(), &[SEP]].concat();
        let mut n = 0;
        for day in self.days.values() {
            n += day.read(|rtxn| {
                let mut n = 0;
                for entry in day
                    .applied
                    .prefix_iter(rtxn, &prefix)
                    .map_err(lmdb(&day.name))?
                {
                    let (_, v) = entry.map_err(lmdb(&day.name))?;
                    let bits = RoaringBitmap::deserialize_from(v)
                        .map_err(|e| corrupt(&day.name, format!("applied bitmap: {e}")))?;
                    n += bits.len();
                }
                Ok(n)
            })?;
        }
        Ok(n)
    }
}
