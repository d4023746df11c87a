//! Compaction of a day's frozen `recent` database into a new run (module
//! `runs`): loading and sorting its windows by series (on a thread of its
//! own), then appending them in slices, one transaction each, between
//! batches.

use heed::RoTxn;

use super::{
    batch::{byte_order, prefix8, KeyArena, KeyRef},
    codec::{put_window_key_of_names, recent_parts},
    day::{DayEnv, COMPACTED_BELOW, RECENT_ACTIVE},
    error::{corrupt, lmdb, StoreError},
    rollup,
    runs::{append_windows, Run, RunsState},
};
use crate::window::Aggregate;

/// A compaction in progress: the frozen `recent` database's windows, sorted
/// by window key, and how many of them are in their run already.
///
/// Sorted by series first, the run reads like `windows`: one series' windows
/// next to each other. The run is written in slices, one transaction each,
/// between batches, so the writer never pauses for a whole compaction.
pub(super) struct Compaction {
    bufs: Buffers,
    next: usize,
    frozen: usize,
}

impl Compaction {
    /// Windows still to merge.
    pub fn remaining(&self) -> usize {
        self.bufs.windows.len() - self.next
    }

    /// Its buffers, for the next compaction's load (which empties them).
    pub fn into_buffers(self) -> Buffers {
        self.bufs
    }
}

/// A compaction's buffers: the windows to merge and their keys, and the
/// load's reading and sort order (emptied once the load is done). A
/// finished compaction's are filled again by the next load.
///
/// A compaction of the default million windows fills a few hundred MB of
/// them (about 280 bytes a window). Allocated anew for every compaction,
/// their pages were faulted in and zeroed by the kernel again each time:
/// kept, the compaction thread's page faults over 2,000,000 benchmark
/// messages fell from 185,000 to 100,000 (two compactions in each of two
/// workers). What the largest compaction so far needed stays allocated.
#[derive(Default)]
pub(super) struct Buffers {
    keys: KeyArena,
    windows: Vec<(KeyRef, Aggregate)>,
    read: Vec<Frozen<'static>>,
    order: Vec<(u64, usize)>,
}

/// An emptied vector's allocation, for values that borrow for another
/// lifetime: the standard library collects in place when the layouts
/// match, as they do here, so nothing is allocated.
fn recycle<'a, 'b>(mut v: Vec<Frozen<'a>>) -> Vec<Frozen<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("emptied")).collect()
}

/// `v` emptied, with room for `need` values: its own allocation when that
/// is large enough, else a new one (growing the old one would copy its
/// stale contents).
fn refit<T>(mut v: Vec<T>, need: usize) -> Vec<T> {
    v.clear();
    if v.capacity() < need {
        return Vec::with_capacity(need);
    }
    v
}

/// Reads the windows of `recent` database `frozen`, and the coarse windows
/// the day rolls up from them ([`rollup`]), with window keys from `floor`
/// on, sorted and folded by window key: the compaction to run.
///
/// `recent` holds its windows time first (resolution, start, names), as one
/// run of ascending names per resolution and start; a run wants them
/// names first. Since one name's windows are in the same order either way,
/// a stable sort of the windows by their names alone makes the window-key
/// order, and it merges the runs it finds rather than comparing every key
/// about log2(n) times. What it moves is an index and the names' first
/// eight bytes (which decide most comparisons without reading the names),
/// not the windows. One name's windows, together then, are rolled up and
/// folded by themselves: a fine window and its coarse windows are never
/// sorted as a whole (sorting every window with a copy per rollup, and
/// moving the aggregates, was a sixth of a core-mode worker's time).
pub(super) fn load_frozen(
    day: &DayEnv,
    txn: &RoTxn<'_>,
    frozen: usize,
    floor: &[u8],
    bufs: Buffers,
) -> Result<Compaction, StoreError> {
    let err = lmdb(&day.name);
    let db = day.recent_dbs()?[frozen];
    let n = usize::try_from(db.len(txn).map_err(&err)?).unwrap_or(0);
    let Buffers {
        keys,
        windows,
        read,
        order,
    } = bufs;
    // Borrowed from the map, which the read transaction keeps in place.
    let mut read: Vec<Frozen<'_>> = refit(recycle(read), n);
    for entry in db.iter(txn).map_err(&err)? {
        let (k, v) = entry.map_err(&err)?;
        let parts = recent_parts(k).ok_or_else(|| corrupt(&day.name, "recent window"))?;
        let (res, start_ns, names) = parts;
        read.push(Frozen {
            names,
            res,
            start_ns,
            agg: v,
        });
    }
    let mut order = refit(order, n);
    order.extend(read.iter().enumerate().map(|(i, f)| (prefix8(f.names), i)));
    order.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| byte_order(read[a.1].names, read[b.1].names))
    });
    // About 110 bytes a window (its key and aggregate), which is what
    // `recent_max_windows` documents, and as much again for the windows
    // rolled up from them.
    let rolled = n.saturating_mul(day.rollups.len());
    let mut keys = KeyArena(refit(keys.0, n.saturating_add(rolled).saturating_mul(32)));
    let mut windows = refit(windows, n.saturating_add(rolled));
    // One name's windows and their coarse windows: (resolution, start, aggregate).
    let mut group: Vec<(u32, i64, Aggregate)> = Vec::new();
    let mut at = 0;
    while let Some(&(_, first)) = order.get(at) {
        let names = read[first].names;
        group.clear();
        for &(_, i) in order[at..]
            .iter()
            .take_while(|(_, i)| read[*i].names == names)
        {
            let f = &read[i];
            let agg =
                Aggregate::from_bytes(f.agg).ok_or_else(|| corrupt(&day.name, "recent window"))?;
            group.push((f.res, f.start_ns, agg));
            for r in &day.rollups {
                if let Some(start) = rollup::roll_up(*r, f.res, f.start_ns) {
                    group.push((r.coarse, start, agg));
                }
            }
            at += 1;
        }
        // Stable: a coarse window folds its fine windows in time order.
        group.sort_by_key(|&(res, start, _)| (res, start));
        let mut last = None;
        // The window last met lies below the floor: merged before a
        // restart interrupted the compaction, so left out.
        let mut merged = false;
        for &(res, start, agg) in &group {
            if last == Some((res, start)) {
                if let (false, Some((_, kept))) = (merged, windows.last_mut()) {
                    kept.merge(&agg);
                }
                continue;
            }
            last = Some((res, start));
            let key = keys.push(|k| put_window_key_of_names(k, names, res, start));
            merged = keys.get(key) < floor;
            if merged {
                keys.0.truncate(key.start);
            } else {
                windows.push((key, agg));
            }
        }
    }
    Ok(Compaction {
        bufs: Buffers {
            keys,
            windows,
            read: recycle(read),
            order,
        },
        next: 0,
        frozen,
    })
}

/// A window of a frozen `recent` database, as read ([`load_frozen`]).
struct Frozen<'t> {
    names: &'t [u8],
    res: u32,
    start_ns: i64,
    /// Its aggregate, encoded.
    agg: &'t [u8],
}

/// Starts a compaction: in one transaction, freezes the active `recent`
/// database, makes the other (empty) one active, and takes a free run slot
/// for its windows. Returns the frozen one, or `None` if the active one is
/// empty. Its windows are read afterwards ([`load_frozen`]): nothing writes
/// to it any more.
///
/// # Errors
/// [`StoreError::NoFreeRunSlot`] when fewer than two run slots are free
/// (one stays a merge's): nothing is frozen then.
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
    let mut runs = RunsState::read(day, &w.txn)?;
    runs.claim_filling(day)?;
    runs.write(day, &mut w.txn)?;
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

/// Appends up to `slice` more windows of `c` to its run, in one transaction
/// that also records how far the compaction got (or, with the last slice,
/// empties the frozen database and makes the run complete, of level 0).
/// Returns the windows written. On an error nothing of the slice is
/// committed and the next call redoes it.
///
/// A compaction that a build before format version 5 began (into
/// `windows`) gets its slot here: the windows below its floor stay in
/// `windows`, the rest go to the run, and readers read both.
pub(super) fn compaction_step(
    day: &DayEnv,
    c: &mut Compaction,
    slice: usize,
) -> Result<usize, StoreError> {
    let err = lmdb(&day.name);
    let end = c
        .next
        .saturating_add(slice.max(1))
        .min(c.bufs.windows.len());
    let mut w = day.write_txn()?;
    let mut runs = RunsState::read(day, &w.txn)?;
    // `meta` changes only when the slot is claimed or the run completes.
    let mut changed = runs.filling.is_none();
    let slot = match runs.filling {
        Some(slot) => slot,
        None => runs.claim_filling(day)?,
    };
    let part = c.bufs.windows[c.next..end]
        .iter()
        .map(|(key, agg)| (c.bufs.keys.get(*key), agg));
    append_windows(day, day.run_db(slot)?, &mut w.txn, part)?;
    match c.bufs.windows.get(end) {
        Some((key, _)) => day
            .meta
            .put(&mut w.txn, COMPACTED_BELOW, c.bufs.keys.get(*key))
            .map_err(&err)?,
        None => {
            let frozen = day.recent_dbs()?[c.frozen];
            frozen.clear(&mut w.txn).map_err(&err)?;
            day.meta.delete(&mut w.txn, COMPACTED_BELOW).map_err(&err)?;
            runs.filling = None;
            runs.live.push(Run { slot, level: 0 });
            changed = true;
        }
    }
    if changed {
        runs.write(day, &mut w.txn)?;
    }
    w.commit(&day.name)?;
    let merged = end - c.next;
    c.next = end;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::{recycle, Frozen};

    /// `recycle` keeps the allocation, which is what lets a kept reading
    /// buffer be filled again instead of allocated anew.
    #[test]
    fn a_recycled_reading_buffer_keeps_its_allocation() {
        let names = vec![b'a'; 8];
        let mut borrowed: Vec<Frozen<'_>> = Vec::with_capacity(1000);
        borrowed.push(Frozen {
            names: &names,
            res: 1,
            start_ns: 0,
            agg: &names,
        });
        let at = borrowed.as_ptr() as usize;
        let spare: Vec<Frozen<'static>> = recycle(borrowed);
        assert_eq!(
            (spare.as_ptr() as usize, spare.capacity(), spare.len()),
            (at, 1000, 0)
        );
    }
}
