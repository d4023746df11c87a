//! Sorted runs: where compaction puts a day's windows (format version 5).
//!
//! Merging each compaction into the one large `windows` B-tree inserted
//! every window in the middle of its series' page: a search or a walk, a
//! shift of half a page, splits, and every page touched copied and written
//! again. Over 8,000,000 benchmark messages that was most of the LMDB
//! writer thread's time (BENCHMARKS.md, tenth session). Instead a
//! compaction now writes its windows, sorted by window key, into an empty
//! slot by appending (LMDB's `MDB_APPEND`: no search, no shifting, full
//! pages, nothing written twice): a *run*.
//!
//! Runs are merged in tiers, as a log-structured merge tree's are: once
//! [`RUN_FAN_IN`] complete runs of one level exist, they are merged, again
//! by appending, into one run of the next level in a free slot, and their
//! slots are cleared (LMDB frees a cleared database's pages without reading
//! its leaves). A window is so written once per level: a day of 1,000
//! compactions has 5 levels. Each level merges on its own, in slices like a
//! compaction's, so a long merge high up never holds back the level below.
//! Readers read every slot in use (free slots are empty); a slot that is a
//! merge's source only from the merge's floor on (what is below is in the
//! merge's target already). A merge frees its sources only when it ends, so
//! while one runs, the windows it merges take their space twice.
//!
//! `meta` records the slots (one byte each):
//! - `runs`: the complete runs, as (slot, level) pairs;
//! - `run_filling`: the slot a compaction of a frozen `recent` database
//!   appends to (its windows below `compacted_below`);
//! - `runs_merges`: the merges in progress, each as its target slot, the
//!   target's level, the count of its sources, the sources, and the window
//!   key (length in 2 bytes big-endian, then the key) below which the
//!   sources are merged into the target.
//!
//! A day has [`RUN_SLOTS`] slots, created with it. At [`RUN_FAN_IN`] 4, a
//! level holds 4 runs being merged, up to about 4 new ones and the merge's
//! target while the merges keep pace: 128 slots serve about 14 levels,
//! 4^14 compactions. A compaction takes a slot only while another
//! stays free, which a merge can take: merges always go on, and free slots
//! as they end. With no slot to spare a compaction waits (its windows stay
//! in `recent`, where readers find them).

use heed::{types::Bytes, Database, PutFlags, RoTxn, RwTxn};

use super::{
    day::DayEnv,
    error::{corrupt, lmdb, StoreError},
    read::{from_key, Entries},
};
use crate::window::Aggregate;

/// Run slots per day (named databases `run.0` to `run.127`).
pub(super) const RUN_SLOTS: usize = 128;

/// Complete runs of one level that are merged into one of the next.
pub(super) const RUN_FAN_IN: usize = 4;

/// Most windows a merge writes in one transaction (they are read into
/// memory first, up to a few tens of MB): a merge's slice follows the
/// writes' pace like a compaction's, but its sources are not bounded by
/// `recent_max_windows`. (A merge's slice is what a batch brings to a
/// level; with batches bringing more than this, merges take more batches
/// than the compactions they follow.)
#[cfg(not(test))]
pub(super) const MERGE_MAX_SLICE: usize = 1 << 18;
/// Small in tests, so that slices of a merge hit it.
#[cfg(test)]
pub(super) const MERGE_MAX_SLICE: usize = 50;

const LIVE: &[u8] = b"runs";
const FILLING: &[u8] = b"run_filling";
const MERGES: &[u8] = b"runs_merges";

/// The named database of slot `i`.
pub(super) fn slot_name(i: usize) -> String {
    format!("run.{i}")
}

/// A complete run: its slot and level (0: written by a compaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub slot: u8,
    pub level: u8,
}

/// A merge of runs in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RunsMerge {
    /// The slot it appends to.
    pub target: u8,
    /// The level of the run it makes.
    pub level: u8,
    /// The runs merged (complete runs, in `live` until the merge ends).
    pub sources: Vec<u8>,
    /// Window keys below this are in `target` already; readers skip them in
    /// the sources.
    pub floor: Vec<u8>,
}

/// Where a day's runs stand (`meta`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct RunsState {
    pub live: Vec<Run>,
    pub filling: Option<u8>,
    pub merges: Vec<RunsMerge>,
}

impl RunsState {
    /// Reads the state from `meta` (empty in a day without runs).
    ///
    /// # Errors
    /// [`StoreError::UpgradedSinceOpened`] for a day this process opened
    /// read-only before a worker gave it its run slots; as ever for a read
    /// failure or a corrupt value.
    pub fn read(day: &DayEnv, txn: &RoTxn<'_>) -> Result<Self, StoreError> {
        let err = lmdb(&day.name);
        let bad = |what: &str| corrupt(&day.name, format!("meta {what}"));
        let slots = day.runs.len();
        if slots == 0 && day.meta.get(txn, LIVE).map_err(&err)?.is_some() {
            return Err(StoreError::UpgradedSinceOpened {
                day: day.name.clone(),
            });
        }
        let slot = |s: u8, what: &str| {
            if usize::from(s) < slots {
                Ok(s)
            } else {
                Err(bad(what))
            }
        };
        let mut state = RunsState::default();
        if let Some(v) = day.meta.get(txn, LIVE).map_err(&err)? {
            if v.len() % 2 != 0 {
                return Err(bad("runs"));
            }
            for p in v.chunks_exact(2) {
                state.live.push(Run {
                    slot: slot(p[0], "runs")?,
                    level: p[1],
                });
            }
        }
        state.filling = match day.meta.get(txn, FILLING).map_err(&err)? {
            None => None,
            Some(&[s]) => Some(slot(s, "run_filling")?),
            Some(_) => return Err(bad("run_filling")),
        };
        if let Some(mut v) = day.meta.get(txn, MERGES).map_err(&err)? {
            while !v.is_empty() {
                let (&[target, level, n], rest) =
                    v.split_first_chunk().ok_or(bad("runs_merges"))?;
                let (sources, rest) = rest
                    .split_at_checked(usize::from(n))
                    .ok_or(bad("runs_merges"))?;
                let (len, rest) = rest.split_first_chunk().ok_or(bad("runs_merges"))?;
                let (floor, rest) = rest
                    .split_at_checked(usize::from(u16::from_be_bytes(*len)))
                    .ok_or(bad("runs_merges"))?;
                state.merges.push(RunsMerge {
                    target: slot(target, "runs_merges")?,
                    level,
                    sources: sources
                        .iter()
                        .map(|s| slot(*s, "runs_merges"))
                        .collect::<Result<_, _>>()?,
                    floor: floor.to_vec(),
                });
                v = rest;
            }
        }
        Ok(state)
    }

    /// Writes the state to `meta`.
    pub fn write(&self, day: &DayEnv, txn: &mut RwTxn<'_>) -> Result<(), StoreError> {
        let err = lmdb(&day.name);
        let live: Vec<u8> = self.live.iter().flat_map(|r| [r.slot, r.level]).collect();
        day.meta.put(txn, LIVE, &live).map_err(&err)?;
        match self.filling {
            Some(s) => day.meta.put(txn, FILLING, &[s]).map_err(&err)?,
            None => {
                day.meta.delete(txn, FILLING).map_err(&err)?;
            }
        }
        let mut merges = Vec::new();
        for m in &self.merges {
            let n = u8::try_from(m.sources.len())
                .map_err(|_| corrupt(&day.name, "a merge of more than 255 runs"))?;
            let len = u16::try_from(m.floor.len())
                .map_err(|_| corrupt(&day.name, "a window key over 65,535 bytes"))?;
            merges.extend([m.target, m.level, n]);
            merges.extend_from_slice(&m.sources);
            merges.extend(len.to_be_bytes());
            merges.extend_from_slice(&m.floor);
        }
        if merges.is_empty() {
            day.meta.delete(txn, MERGES).map_err(&err)?;
        } else {
            day.meta.put(txn, MERGES, &merges).map_err(&err)?;
        }
        Ok(())
    }

    /// The lowest slot holding nothing: no run, none being filled, no
    /// merge's target.
    fn free_slot(&self, slots: usize) -> Option<u8> {
        self.free_slots(slots).next()
    }

    /// The slots holding nothing, lowest first.
    fn free_slots(&self, slots: usize) -> impl Iterator<Item = u8> + '_ {
        (0..slots).filter_map(|s| u8::try_from(s).ok()).filter(|s| {
            !self.live.iter().any(|r| r.slot == *s)
                && self.filling != Some(*s)
                && !self.merges.iter().any(|m| m.target == *s)
        })
    }

    /// Takes a free slot for a compaction to fill, if another stays free:
    /// that one is a merge's, so that merges, which free slots, never wait
    /// for a compaction, which takes one.
    ///
    /// # Errors
    /// [`StoreError::NoFreeRunSlot`] when fewer than two slots are free;
    /// [`StoreError::Corrupt`] when a slot is being filled already (its
    /// windows would be lost to readers).
    pub fn claim_filling(&mut self, day: &DayEnv) -> Result<u8, StoreError> {
        if let Some(slot) = self.filling {
            return Err(corrupt(
                &day.name,
                format!("meta run_filling: slot {slot} is being filled already"),
            ));
        }
        let two = {
            let mut free = self.free_slots(day.runs.len());
            (free.next(), free.next())
        };
        let (Some(slot), Some(_spare)) = two else {
            return Err(StoreError::NoFreeRunSlot {
                day: day.name.clone(),
            });
        };
        self.filling = Some(slot);
        Ok(slot)
    }

    /// The slots that may hold windows, with the window key from which
    /// readers take a slot's windows: the complete runs, the one a
    /// compaction fills and the merges' targets. The others are empty.
    pub fn in_use(&self) -> impl Iterator<Item = (u8, &[u8])> {
        let live = self.live.iter().map(|r| (r.slot, self.floor(r.slot)));
        let filling = self.filling.map(|s| (s, &[][..]));
        let targets = self.merges.iter().map(|m| (m.target, &[][..]));
        live.chain(filling).chain(targets)
    }

    /// The window keys of `slot` that readers take: from this one on.
    pub fn floor(&self, slot: u8) -> &[u8] {
        self.merges
            .iter()
            .find(|m| m.sources.contains(&slot))
            .map_or(&[], |m| &m.floor)
    }

    /// Starts the merges due: of every level with `fan_in` or more complete
    /// runs not being merged, while a slot is free. Whether any started.
    fn start_due(&mut self, slots: usize, fan_in: usize) -> bool {
        let mut started = false;
        loop {
            let merging = |slot: u8| self.merges.iter().any(|m| m.sources.contains(&slot));
            let mut levels: Vec<u8> = self
                .live
                .iter()
                .filter(|r| !merging(r.slot))
                .map(|r| r.level)
                .collect();
            levels.sort_unstable();
            let due = levels
                .chunk_by(|a, b| a == b)
                .find(|l| l.len() >= fan_in.max(2))
                .map(|l| l[0]);
            let (Some(level), Some(target)) = (due, self.free_slot(slots)) else {
                return started;
            };
            let sources = self
                .live
                .iter()
                .filter(|r| r.level == level && !merging(r.slot))
                .map(|r| r.slot)
                .collect();
            self.merges.push(RunsMerge {
                target,
                level: level.saturating_add(1),
                sources,
                floor: Vec::new(),
            });
            started = true;
        }
    }
}

/// One window of [`Merged`]: as stored, when only one source had it, or its
/// parts folded.
pub(super) enum Window<'t> {
    Stored(&'t [u8]),
    Folded(Aggregate),
}

impl Window<'_> {
    /// The window's aggregate.
    pub fn aggregate(&self, day: &str) -> Result<Aggregate, StoreError> {
        match self {
            Window::Stored(v) => {
                Aggregate::from_bytes(v).ok_or_else(|| corrupt(day, "window aggregate"))
            }
            Window::Folded(agg) => Ok(*agg),
        }
    }
}

/// Several sources of windows, each in window key order, read as one in
/// window key order, the parts of a window in several sources folded.
pub(super) struct Merged<'t> {
    day: String,
    sources: Vec<Entries<'t>>,
    heads: Vec<Option<(&'t [u8], &'t [u8])>>,
}

impl<'t> Merged<'t> {
    /// Reads the first window of each source.
    pub fn new(day: &str, mut sources: Vec<Entries<'t>>) -> Result<Self, StoreError> {
        let heads = sources
            .iter_mut()
            .map(|s| s.next().transpose())
            .collect::<heed::Result<_>>()
            .map_err(lmdb(day))?;
        Ok(Merged {
            day: day.to_owned(),
            sources,
            heads,
        })
    }

    /// The key of the next window.
    pub fn peek_key(&self) -> Option<&'t [u8]> {
        self.heads.iter().flatten().map(|(k, _)| *k).min()
    }

    /// The next window and its key.
    pub fn next_window(&mut self) -> Result<Option<(&'t [u8], Window<'t>)>, StoreError> {
        let Some(key) = self.peek_key() else {
            return Ok(None);
        };
        let mut window: Option<Window<'t>> = None;
        for (head, source) in self.heads.iter_mut().zip(&mut self.sources) {
            let Some((k, v)) = *head else { continue };
            if k != key {
                continue;
            }
            window = Some(match window {
                None => Window::Stored(v),
                Some(w) => {
                    let mut agg = w.aggregate(&self.day)?;
                    agg.merge(&Window::Stored(v).aggregate(&self.day)?);
                    Window::Folded(agg)
                }
            });
            *head = source.next().transpose().map_err(lmdb(&self.day))?;
        }
        Ok(window.map(|w| (key, w)))
    }
}

/// Appends windows, in ascending key order and above every key the run
/// holds, to run `db`.
pub(super) fn append_windows<'k>(
    day: &DayEnv,
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn<'_>,
    windows: impl Iterator<Item = (&'k [u8], &'k Aggregate)>,
) -> Result<(), StoreError> {
    let err = lmdb(&day.name);
    for (key, agg) in windows {
        db.put_with_flags(
            txn,
            PutFlags::APPEND,
            key,
            agg.encode(day.short_values).as_ref(),
        )
        .map_err(&err)?;
    }
    Ok(())
}

/// Starts the day's merges that are due ([`RUN_FAN_IN`], or `fan_in` in
/// tests), in one transaction. Returns the merges in progress.
pub(super) fn start_merges(day: &DayEnv, fan_in: usize) -> Result<Vec<u8>, StoreError> {
    let state = day.read(|rtxn| RunsState::read(day, rtxn))?;
    let mut due = state.clone();
    if !due.start_due(day.runs.len(), fan_in) {
        return Ok(state.merges.iter().map(|m| m.target).collect());
    }
    let mut w = day.write_txn()?;
    // Read again in the transaction: nothing else writes, but the state
    // written must be the one this transaction saw.
    let mut state = RunsState::read(day, &w.txn)?;
    state.start_due(day.runs.len(), fan_in);
    state.write(day, &mut w.txn)?;
    w.commit(&day.name)?;
    Ok(state.merges.iter().map(|m| m.target).collect())
}

/// Merges up to `slice` more windows of the merge whose target is `target`,
/// in one transaction that also records how far it got (or, with the last
/// slice, clears the sources and makes the target a complete run). Returns
/// the windows written and whether the merge ended. On an error nothing of
/// the slice is committed and the next call redoes it.
pub(super) fn merge_step(
    day: &DayEnv,
    target: u8,
    slice: usize,
) -> Result<(usize, bool), StoreError> {
    let err = lmdb(&day.name);
    let mut w = day.write_txn()?;
    let mut state = RunsState::read(day, &w.txn)?;
    let Some(at) = state.merges.iter().position(|m| m.target == target) else {
        return Ok((0, true));
    };
    // Read first, then write: the sources' iterators borrow the
    // transaction that the appends need.
    let (mut keys, mut values, mut ends) = (Vec::new(), Vec::new(), Vec::new());
    let next = {
        let m = &state.merges[at];
        let sources = m
            .sources
            .iter()
            .map(|s| from_key(day.run_db(*s)?, &w.txn, &m.floor).map_err(&err))
            .collect::<Result<Vec<_>, _>>()?;
        let mut merged = Merged::new(&day.name, sources)?;
        while ends.len() < slice.clamp(1, MERGE_MAX_SLICE) {
            let Some((key, window)) = merged.next_window()? else {
                break;
            };
            keys.extend_from_slice(key);
            match window {
                Window::Stored(v) => values.extend_from_slice(v),
                Window::Folded(agg) => {
                    values.extend_from_slice(agg.encode(day.short_values).as_ref());
                }
            }
            ends.push((keys.len(), values.len()));
        }
        merged.peek_key().map(<[u8]>::to_vec)
    };
    let db = day.run_db(target)?;
    let (mut k, mut v) = (0, 0);
    for &(k_end, v_end) in &ends {
        db.put_with_flags(
            &mut w.txn,
            PutFlags::APPEND,
            &keys[k..k_end],
            &values[v..v_end],
        )
        .map_err(&err)?;
        (k, v) = (k_end, v_end);
    }
    let done = match next {
        Some(floor) => {
            state.merges[at].floor = floor;
            false
        }
        None => {
            let m = state.merges.remove(at);
            for s in &m.sources {
                day.run_db(*s)?.clear(&mut w.txn).map_err(&err)?;
            }
            state.live.retain(|r| !m.sources.contains(&r.slot));
            state.live.push(Run {
                slot: m.target,
                level: m.level,
            });
            true
        }
    };
    state.write(day, &mut w.txn)?;
    w.commit(&day.name)?;
    Ok((ends.len(), done))
}

#[cfg(test)]
mod tests {
    use super::{Run, RunsMerge, RunsState};

    fn state(levels: &[u8]) -> RunsState {
        RunsState {
            live: levels
                .iter()
                .enumerate()
                .map(|(i, &level)| Run {
                    slot: u8::try_from(i).unwrap(),
                    level,
                })
                .collect(),
            ..RunsState::default()
        }
    }

    /// A level is merged once it holds `fan_in` runs; runs being merged are
    /// not counted again, and the merge's target is a free slot.
    #[test]
    fn merges_start_per_level_at_the_fan_in() {
        let mut s = state(&[0, 0, 0]);
        assert!(!s.start_due(64, 4));
        s.live.push(Run { slot: 3, level: 0 });
        s.filling = Some(4);
        assert!(s.start_due(64, 4));
        assert_eq!(
            s.merges,
            vec![RunsMerge {
                target: 5,
                level: 1,
                sources: vec![0, 1, 2, 3],
                floor: Vec::new(),
            }]
        );
        // Four more of level 0 while the first merge runs: a second merge.
        s.live.extend((6..10).map(|slot| Run { slot, level: 0 }));
        assert!(s.start_due(64, 4));
        assert_eq!(s.merges[1].sources, vec![6, 7, 8, 9]);
        assert_eq!(s.merges[1].target, 10);
        assert!(!s.start_due(64, 4), "nothing more is due");
        assert_eq!(s.floor(7), &[] as &[u8]);
        s.merges[1].floor = b"k".to_vec();
        assert_eq!(s.floor(7), b"k");
        assert_eq!(s.floor(5), &[] as &[u8], "a target is read whole");
    }

    /// With every slot taken there is no merge to start and no slot to fill.
    #[test]
    fn no_free_slot_means_no_merge() {
        let mut s = state(&[0, 0, 1, 1]);
        assert!(!s.start_due(4, 2));
        assert_eq!(s.free_slot(4), None);
        assert_eq!(s.free_slot(5), Some(4));
    }
}
