//! One day's part of a batch: duplicates looked up and windows, latest
//! values and applied bitmaps updated in memory, then written in one
//! transaction.

use std::ops::Bound;

use heed::{types::Bytes, Database, PutFlags, RoTxn, RwTxn};
use roaring::RoaringBitmap;

use super::{
    codec::{
        applied_key, applied_low, is_newer, latest_value, parse_latest_value, put_latest_key,
        put_recent_key, put_window_key_of_recent,
    },
    day::{DayEnv, COMPACTED_BELOW, RECENT_ACTIVE},
    error::{corrupt, io, lmdb, StoreError},
    Message, Verdict,
};
use crate::window::{window_start, Aggregate, NS_PER_SEC};

/// What to do with one message of a day's part of a batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Planned {
    /// Index in the batch.
    pub index: usize,
    /// Too late to apply; still looked up, since a redelivery of a message
    /// applied before it became late is a duplicate, not a dead letter.
    pub late: bool,
}

/// One day's part of a batch in one write transaction; committed only if
/// something was applied. Returns a verdict per planned message and the
/// windows written to `recent`.
pub(super) fn apply_day(
    day: &DayEnv,
    resolutions: &[u32],
    batch: &[Message],
    plan: &[Planned],
) -> Result<(Vec<Verdict>, usize), StoreError> {
    let mut w = day.write_txn()?;
    let mut pending = Pending::with_capacity(plan.len(), resolutions.len());
    let mut out = Vec::with_capacity(plan.len());
    for p in plan {
        let m = &batch[p.index];
        if let Some((stream, seq)) = &m.stream_seq {
            let chunk = pending.chunk(day, &w.txn, stream, *seq)?;
            if chunk.bits.contains(applied_low(*seq)) {
                out.push(Verdict::Duplicate);
                continue;
            }
            if p.late {
                out.push(Verdict::TooLate);
                continue;
            }
            chunk.bits.insert(applied_low(*seq));
            chunk.dirty = true;
        }
        pending.add(m, resolutions);
        out.push(Verdict::Applied);
    }
    let applied = out.iter().filter(|v| **v == Verdict::Applied).count() as u64;
    let mut windows = 0;
    if applied > 0 {
        windows = pending.write(day, &mut w.txn, applied)?;
        w.commit(&day.name)?;
    }
    Ok((out, windows))
}

/// A day's changes, gathered in memory so each key is read and written once
/// per commit, and written in key order (LMDB's cheapest).
///
/// Keys live in one arena and the entries are sorted once at the end: a map
/// keyed by an allocated key per sample spent more of the writer's time in
/// the allocator and in rebalancing than LMDB spent on the puts.
struct Pending {
    /// The applied chunks touched, a handful per batch (one per 65,536
    /// sequences of a stream), so a scan finds them without hashing.
    chunks: Vec<Chunk>,
    keys: KeyArena,
    windows: Vec<(KeyRef, Aggregate)>,
    latest: Vec<(KeyRef, (i64, f64))>,
}

struct Chunk {
    stream: String,
    /// `seq >> 16` of the sequences it holds.
    high: u64,
    bits: RoaringBitmap,
    dirty: bool,
}

/// Where a key lies in the [`KeyArena`].
#[derive(Clone, Copy)]
struct KeyRef {
    start: usize,
    end: usize,
}

struct KeyArena(Vec<u8>);

impl KeyArena {
    fn push(&mut self, key: impl FnOnce(&mut Vec<u8>)) -> KeyRef {
        let start = self.0.len();
        key(&mut self.0);
        KeyRef {
            start,
            end: self.0.len(),
        }
    }

    fn get(&self, k: KeyRef) -> &[u8] {
        &self.0[k.start..k.end]
    }

    /// Sorts `entries` by key and folds the entries of each key into one.
    fn sort_and_fold<V>(&self, entries: &mut Vec<(KeyRef, V)>, fold: impl Fn(&mut V, &V)) {
        entries.sort_unstable_by(|a, b| byte_order(self.get(a.0), self.get(b.0)));
        entries.dedup_by(|next, kept| {
            let same = self.get(next.0) == self.get(kept.0);
            if same {
                fold(&mut kept.1, &next.1);
            }
            same
        });
    }
}

/// The byte order of two keys (what LMDB sorts by), compared eight bytes at a
/// time. The keys of a batch are 20–40 bytes with long common prefixes (the
/// same resolution and start, series names alike up to their last digits),
/// and a `memcmp` call per comparison was a fifth of the writer's time.
fn byte_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let (mut a8, mut b8) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in a8.by_ref().zip(b8.by_ref()) {
        let (x, y) = (
            u64::from_be_bytes(x.try_into().unwrap_or_default()),
            u64::from_be_bytes(y.try_into().unwrap_or_default()),
        );
        if x != y {
            return x.cmp(&y);
        }
    }
    // Equal so far: the rest of both (shorter than 8 bytes, or the longer
    // key's remaining chunks) decides.
    let done = a.len().min(b.len()) / 8 * 8;
    a[done..].cmp(&b[done..])
}

impl Pending {
    /// Room for `messages` of one sample each, so a batch's keys and entries
    /// are not copied again and again as they grow.
    fn with_capacity(messages: usize, resolutions: usize) -> Self {
        /// A typical key: series, field, resolution and start.
        const KEY_BYTES: usize = 40;
        let windows = messages.saturating_mul(resolutions);
        Self {
            chunks: Vec::new(),
            keys: KeyArena(Vec::with_capacity(
                windows.saturating_add(messages).saturating_mul(KEY_BYTES),
            )),
            windows: Vec::with_capacity(windows),
            latest: Vec::with_capacity(messages),
        }
    }

    /// The applied chunk holding `seq`, read from the day on first use.
    fn chunk(
        &mut self,
        day: &DayEnv,
        txn: &RoTxn<'_>,
        stream: &str,
        seq: u64,
    ) -> Result<&mut Chunk, StoreError> {
        let high = seq >> 16;
        // Most recent first: consecutive messages share a chunk.
        let found = self
            .chunks
            .iter()
            .rposition(|c| c.high == high && c.stream == stream);
        let i = match found {
            Some(i) => i,
            None => self.load_chunk(day, txn, stream, seq)?,
        };
        Ok(&mut self.chunks[i])
    }

    /// Reads the applied chunk holding `seq` (empty if new); its index.
    fn load_chunk(
        &mut self,
        day: &DayEnv,
        txn: &RoTxn<'_>,
        stream: &str,
        seq: u64,
    ) -> Result<usize, StoreError> {
        let key = applied_key(stream, seq);
        let bits = match day.applied.get(txn, &key).map_err(lmdb(&day.name))? {
            Some(bytes) => RoaringBitmap::deserialize_from(bytes).map_err(|err| {
                corrupt(
                    &day.name,
                    format!("applied bitmap of {stream} near {seq}: {err}"),
                )
            })?,
            None => RoaringBitmap::new(),
        };
        self.chunks.push(Chunk {
            stream: stream.to_owned(),
            high: seq >> 16,
            bits,
            dirty: false,
        });
        Ok(self.chunks.len() - 1)
    }

    fn add(&mut self, m: &Message, resolutions: &[u32]) {
        for s in &m.samples {
            let one = Aggregate::of(s.ts_ns, s.value);
            for &res in resolutions {
                let start = window_start(s.ts_ns, i64::from(res) * NS_PER_SEC);
                let key = self
                    .keys
                    .push(|k| put_recent_key(k, &s.series, &s.field, res, start));
                self.windows.push((key, one));
            }
            let key = self.keys.push(|k| put_latest_key(k, &s.series, &s.field));
            self.latest.push((key, (s.ts_ns, s.value)));
        }
    }

    /// Merges into what the day holds and puts everything, in key order
    /// through one cursor per database ([`upsert_sorted`]); windows go to
    /// `recent`, time first.
    /// Returns the windows written.
    fn write(
        mut self,
        day: &DayEnv,
        txn: &mut RwTxn<'_>,
        applied: u64,
    ) -> Result<usize, StoreError> {
        let err = lmdb(&day.name);
        let recent = day.recent_dbs()?[day.recent_state(txn)?.active];
        let keys = &self.keys;
        keys.sort_and_fold(&mut self.windows, |kept, next| kept.merge(next));
        keys.sort_and_fold(&mut self.latest, |kept, next| {
            if is_newer(*next, *kept) {
                *kept = *next;
            }
        });
        let windows = self
            .windows
            .iter()
            .map(|(key, delta)| (keys.get(*key), delta));
        merge_windows(day, recent, txn, windows)?;
        let latest = self
            .latest
            .iter()
            .map(|(key, sample)| (keys.get(*key), sample));
        let fresh = |sample: &(i64, f64)| latest_value(sample.0, sample.1);
        upsert_sorted(day, day.latest, txn, latest, fresh, |sample, old| {
            let old = parse_latest_value(old).ok_or_else(|| corrupt(&day.name, "latest value"))?;
            Ok(is_newer(*sample, old).then(|| latest_value(sample.0, sample.1)))
        })?;
        let mut buf = Vec::new();
        for chunk in self.chunks.iter_mut().filter(|c| c.dirty) {
            // Run containers: a chunk of sequential sequences is a few bytes.
            chunk.bits.optimize();
            buf.clear();
            chunk.bits.serialize_into(&mut buf).map_err(io(&day.path))?;
            let key = applied_key(&chunk.stream, chunk.high << 16);
            day.applied.put(txn, &key, &buf).map_err(&err)?;
        }
        let count = day.messages_applied(txn)?;
        day.meta
            .put(txn, b"messages_applied", &(count + applied).to_le_bytes())
            .map_err(&err)?;
        Ok(self.windows.len())
    }
}

/// Merges window deltas, in ascending key order, into `db` (`windows` or
/// `recent`).
fn merge_windows<'k>(
    day: &DayEnv,
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn<'_>,
    windows: impl Iterator<Item = (&'k [u8], &'k Aggregate)>,
) -> Result<(), StoreError> {
    let fresh = |delta: &Aggregate| delta.to_bytes();
    upsert_sorted(day, db, txn, windows, fresh, |delta, old| {
        let mut merged =
            Aggregate::from_bytes(old).ok_or_else(|| corrupt(&day.name, "window aggregate"))?;
        merged.merge(delta);
        Ok(Some(merged.to_bytes()))
    })
}

/// A compaction in progress: the frozen `recent` database's windows, sorted
/// by window key, and how many of them are merged into `windows` already.
///
/// Sorted by series first, a series' new windows land next to each other in
/// `windows`, so the pages rewritten are about one per series and resolution
/// per compaction instead of one per series and resolution per batch. The
/// merge runs in slices, one transaction each, between batches, so the
/// writer never pauses for a whole compaction.
pub(super) struct Compaction {
    keys: KeyArena,
    windows: Vec<(KeyRef, Aggregate)>,
    next: usize,
    frozen: usize,
}

impl Compaction {
    /// Windows still to merge.
    pub fn remaining(&self) -> usize {
        self.windows.len() - self.next
    }
}

/// Reads the windows of `recent` database `frozen` with window keys from
/// `floor` on, sorted by window key: the compaction to run.
pub(super) fn load_frozen(
    day: &DayEnv,
    txn: &RoTxn<'_>,
    frozen: usize,
    floor: &[u8],
) -> Result<Compaction, StoreError> {
    let err = lmdb(&day.name);
    let db = day.recent_dbs()?[frozen];
    // Sized once: about 110 bytes a window (its key and aggregate), which is
    // what `recent_max_windows` documents.
    let n = usize::try_from(db.len(txn).map_err(&err)?).unwrap_or(0);
    let mut keys = KeyArena(Vec::with_capacity(n.saturating_mul(32)));
    let mut windows = Vec::with_capacity(n);
    for entry in db.iter(txn).map_err(&err)? {
        let (k, v) = entry.map_err(&err)?;
        let mut valid = false;
        let key = keys.push(|buf| valid = put_window_key_of_recent(buf, k));
        let agg = Aggregate::from_bytes(v).filter(|_| valid);
        let agg = agg.ok_or_else(|| corrupt(&day.name, "recent window"))?;
        if keys.get(key) < floor {
            // Merged before a restart interrupted the compaction.
            keys.0.truncate(key.start);
        } else {
            windows.push((key, agg));
        }
    }
    // Distinct `recent` keys are distinct window keys: nothing to fold.
    keys.sort_and_fold(&mut windows, |kept, next| kept.merge(next));
    Ok(Compaction {
        keys,
        windows,
        next: 0,
        frozen,
    })
}

/// Starts a compaction: in one transaction, freezes the active `recent`
/// database and makes the other (empty) one active. Returns the frozen one,
/// or `None` if the active one is empty. Its windows are read afterwards
/// ([`load_frozen`]): nothing writes to it any more.
pub(super) fn start_compaction(day: &DayEnv) -> Result<Option<usize>, StoreError> {
    let err = lmdb(&day.name);
    let mut w = day.write_txn()?;
    let state = day.recent_state(&w.txn)?;
    if state.merged_below.is_some() {
        return Err(corrupt(&day.name, "a compaction is already in progress"));
    }
    if day.recent_dbs()?[state.active]
        .is_empty(&w.txn)
        .map_err(&err)?
    {
        return Ok(None);
    }
    let active: &[u8] = if state.active == 0 { b"1" } else { b"0" };
    day.meta
        .put(&mut w.txn, RECENT_ACTIVE, active)
        .map_err(&err)?;
    day.meta
        .put(&mut w.txn, COMPACTED_BELOW, b"")
        .map_err(&err)?;
    w.commit(&day.name)?;
    Ok(Some(state.active))
}

/// Merges up to `slice` more windows of `c` into `windows`, in one
/// transaction that also records how far the merge got (or, with the last
/// slice, empties the frozen database and ends the compaction). Returns the
/// windows merged. On an error nothing of the slice is committed and the
/// next call redoes it.
pub(super) fn compaction_step(
    day: &DayEnv,
    c: &mut Compaction,
    slice: usize,
) -> Result<usize, StoreError> {
    let err = lmdb(&day.name);
    let end = c.next.saturating_add(slice.max(1)).min(c.windows.len());
    let mut w = day.write_txn()?;
    let part = c.windows[c.next..end]
        .iter()
        .map(|(key, agg)| (c.keys.get(*key), agg));
    merge_windows(day, day.windows, &mut w.txn, part)?;
    match c.windows.get(end) {
        Some((key, _)) => day
            .meta
            .put(&mut w.txn, COMPACTED_BELOW, c.keys.get(*key))
            .map_err(&err)?,
        None => {
            let frozen = day.recent_dbs()?[c.frozen];
            frozen.clear(&mut w.txn).map_err(&err)?;
            day.meta.delete(&mut w.txn, COMPACTED_BELOW).map_err(&err)?;
        }
    }
    w.commit(&day.name)?;
    let merged = end - c.next;
    c.next = end;
    Ok(merged)
}

/// How far a cursor walks forward to the next key of a batch before it is
/// placed there by a search from the root instead. A step within a page is a
/// few comparisons; a search from the root of a large store is several pages
/// of binary search and cache misses, about as much as a dozen steps.
const WALK: usize = 16;

/// Merges a batch's entries, in ascending key order, into one database
/// through one cursor: a new key gets `fresh(entry)`, an existing one what
/// `update(entry, stored)` makes of its value (`None`: keep it).
///
/// The next key of a batch usually lies a few entries after the one before
/// (the next window of the same series, the next device's values). The cursor
/// walks there instead of searching the B-tree from its root for every key:
/// that search was 44 % of the writer's time. It overwrites an existing value
/// in place, or inserts a new key where it stands; LMDB then searches only
/// the cursor's page, unless the key falls at the page's edge. A key further
/// away than [`WALK`] entries gets a fresh cursor, placed by one search.
///
/// heed 0.22 has no way to move an open cursor to a key, so walking forward
/// (its range iterator) is how the cursor is reused.
#[allow(unsafe_code)]
fn upsert_sorted<'k, E: Copy, V: AsRef<[u8]>>(
    day: &DayEnv,
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn<'_>,
    entries: impl Iterator<Item = (&'k [u8], E)>,
    fresh: impl Fn(E) -> V,
    mut update: impl FnMut(E, &[u8]) -> Result<Option<V>, StoreError>,
) -> Result<(), StoreError> {
    let err = lmdb(&day.name);
    let mut entries = entries.peekable();
    while let Some(&(first, _)) = entries.peek() {
        let mut cursor = db
            .range_mut(txn, &(Bound::Included(first), Bound::Unbounded))
            .map_err(&err)?;
        // A fresh cursor's first step lands on or past `first`, so each
        // cursor takes at least one entry.
        'walk: while let Some(&(key, _)) = entries.peek() {
            let mut steps = 0;
            let stored = loop {
                if steps == WALK {
                    // Too far: the next cursor is placed at `key` by a search.
                    break 'walk;
                }
                steps += 1;
                match cursor.next().transpose().map_err(&err)? {
                    Some((found, _)) if found < key => continue,
                    Some((found, old)) if found == key => break Some(old),
                    // Past the key, or at the end of the database: `key` is new.
                    _ => break None,
                }
            };
            let Some((key, entry)) = entries.next() else {
                break;
            };
            match stored {
                // The stored value is only read here, turned into an owned
                // one by `update` before anything is written.
                Some(old) => {
                    let Some(value) = update(entry, old)? else {
                        continue;
                    };
                    // SAFETY: heed's condition for writing through a cursor:
                    // no value borrowed from the database is alive (`old` was
                    // consumed by `update`). The cursor stands on `key`, as
                    // MDB_CURRENT requires, and the values of both databases
                    // have a fixed size, so the write is in place.
                    let written =
                        unsafe { cursor.put_current(key, value.as_ref()) }.map_err(&err)?;
                    if !written {
                        return Err(corrupt(&day.name, "an entry vanished under the cursor"));
                    }
                }
                // Always written: the cursor stands past `key` (or at the
                // end), and only the put brings it back to `key`, so that the
                // next step sees the entry it stood on again.
                None => {
                    let value = fresh(entry);
                    // SAFETY: as above; a plain cursor put, which places
                    // `key` itself and leaves the cursor on it.
                    unsafe {
                        cursor.put_current_with_options::<Bytes>(
                            PutFlags::empty(),
                            key,
                            value.as_ref(),
                        )
                    }
                    .map_err(&err)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::byte_order;

    proptest! {
        #[test]
        fn byte_order_is_the_slices_order(
            prefix in prop::collection::vec(any::<u8>(), 0..24),
            a in prop::collection::vec(0u8..3, 0..20),
            b in prop::collection::vec(0u8..3, 0..20),
        ) {
            // A shared prefix of any length, then tails of few distinct
            // bytes: equal keys, prefixes of each other, and differences in
            // and after the eight-byte chunks.
            let (a, b) = ([&prefix[..], &a].concat(), [&prefix[..], &b].concat());
            prop_assert_eq!(byte_order(&a, &b), a.cmp(&b));
            prop_assert_eq!(byte_order(&b, &a), b.cmp(&a));
            prop_assert_eq!(byte_order(&a, &a), std::cmp::Ordering::Equal);
        }
    }
}
