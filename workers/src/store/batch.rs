//! One day's part of a batch: duplicates looked up and windows, latest
//! values and applied bitmaps updated in memory, then written in one
//! transaction.

use std::{cmp::Ordering, ops::Bound};

use heed::{types::Bytes, Database, PutFlags, RoTxn, RwTxn};
use roaring::RoaringBitmap;

use super::{
    codec::{
        applied_key, applied_low, is_newer, latest_value, parse_latest_value, put_latest_key,
        put_recent_key, recent_head, RECENT_HEAD,
    },
    day::DayEnv,
    error::{corrupt, io, lmdb, StoreError},
    rollup, Message, Verdict,
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
    let mut pending = Pending::with_capacity(plan.len());
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
        pending.add(m);
        out.push(Verdict::Applied);
    }
    let applied = out.iter().filter(|v| **v == Verdict::Applied).count() as u64;
    let mut windows = 0;
    if applied > 0 {
        let written = rollup::written(resolutions, &day.rollups);
        windows = pending.write(day, &written, &mut w.txn, applied)?;
        w.commit(&day.name)?;
    }
    Ok((out, windows))
}

/// A day's changes, gathered in memory so each key is read and written once
/// per commit, and written in key order (LMDB's cheapest).
///
/// Each applied sample's names (`series 0x00 field`, the latest key) are
/// encoded once, into one arena. At the end the samples are sorted by their
/// names, once, and each distinct name gets a rank; a window is then the
/// integer `(resolution, start, rank)`, and its sort compares integers. A
/// sort of every window's and latest value's byte key (three per sample,
/// each comparison two lookups in the arena) was a third of the writer's
/// time. A map keyed by an allocated key per sample spent more of it in the
/// allocator and in rebalancing than LMDB spent on the puts.
struct Pending {
    /// The applied chunks touched, a handful per batch (one per 65,536
    /// sequences of a stream), so a scan finds them without hashing.
    chunks: Vec<Chunk>,
    names: KeyArena,
    samples: Vec<Added>,
}

/// One applied sample.
struct Added {
    names: KeyRef,
    ts_ns: i64,
    value: f64,
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
pub(super) struct KeyRef {
    pub(super) start: usize,
    pub(super) end: usize,
}

#[derive(Default)]
pub(super) struct KeyArena(pub(super) Vec<u8>);

impl KeyArena {
    pub(super) fn push(&mut self, key: impl FnOnce(&mut Vec<u8>)) -> KeyRef {
        let start = self.0.len();
        key(&mut self.0);
        KeyRef {
            start,
            end: self.0.len(),
        }
    }

    pub(super) fn get(&self, k: KeyRef) -> &[u8] {
        &self.0[k.start..k.end]
    }

    /// The first 16 bytes of `k`, zero-padded, as an integer: comparing two
    /// of them orders the keys as their bytes do, or ties, and only a tie
    /// needs the keys themselves (a zero byte of padding sorts like the end
    /// of a key).
    fn prefix(&self, k: KeyRef) -> u128 {
        let key = self.get(k);
        let mut p = [0u8; 16];
        let n = key.len().min(16);
        p[..n].copy_from_slice(&key[..n]);
        u128::from_be_bytes(p)
    }
}

/// The byte order of two keys (what LMDB sorts by), compared eight bytes at a
/// time. The keys of a batch are 20–40 bytes with long common prefixes (the
/// same resolution and start, series names alike up to their last digits),
/// and a `memcmp` call per comparison was a fifth of the writer's time.
pub(super) fn byte_order(a: &[u8], b: &[u8]) -> Ordering {
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
    // Equal so far: the next eight bytes of both, zero-padded, and then the
    // length decide. The shorter key has fewer than eight left, so if they
    // tie it is a prefix of the longer one, which sorts after it. (A slice
    // comparison here was a `memcmp` call per comparison again.)
    let done = a.len().min(b.len()) / 8 * 8;
    prefix8(&a[done..])
        .cmp(&prefix8(&b[done..]))
        .then(a.len().cmp(&b.len()))
}

/// The first eight bytes of `key`, zero-padded, as an integer: comparing two
/// of them orders the keys as their bytes do, or ties (see
/// [`KeyArena::prefix`]).
/// (Copied byte by byte: a copy of a variable length is a `memcpy` call,
/// and [`byte_order`] runs this in every comparison that ties.)
pub(super) fn prefix8(key: &[u8]) -> u64 {
    let mut p = [0u8; 8];
    for (to, from) in p.iter_mut().zip(key) {
        *to = *from;
    }
    u64::from_be_bytes(p)
}

/// The bytes of typical names (series and field), to size a batch's arenas.
const NAME_BYTES: usize = 28;

/// A window of a batch as one integer: its `recent` key's head
/// ([`recent_head`]: resolution and start, 12 bytes) and the rank of its
/// names among the batch's (4 bytes), big-endian, so that the integers sort
/// as the `recent` keys do.
fn window_slot(head: &[u8; RECENT_HEAD], rank: u32) -> u128 {
    let mut b = [0u8; 16];
    b[..RECENT_HEAD].copy_from_slice(head);
    b[RECENT_HEAD..].copy_from_slice(&rank.to_be_bytes());
    u128::from_be_bytes(b)
}

impl Pending {
    /// Room for `messages` of one sample each, so a batch's names and
    /// samples are not copied again and again as they grow.
    fn with_capacity(messages: usize) -> Self {
        Self {
            chunks: Vec::new(),
            names: KeyArena(Vec::with_capacity(messages.saturating_mul(NAME_BYTES))),
            samples: Vec::with_capacity(messages),
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

    fn add(&mut self, m: &Message) {
        for s in &m.samples {
            let names = self.names.push(|k| put_latest_key(k, &s.series, &s.field));
            self.samples.push(Added {
                names,
                ts_ns: s.ts_ns,
                value: s.value,
            });
        }
    }

    /// Merges into what the day holds and puts everything, in key order
    /// through one cursor per database ([`upsert_sorted`]); windows go to
    /// `recent`, time first.
    /// Returns the windows written.
    fn write(
        self,
        day: &DayEnv,
        resolutions: &[u32],
        txn: &mut RwTxn<'_>,
        applied: u64,
    ) -> Result<usize, StoreError> {
        let err = lmdb(&day.name);
        let recent = day.recent_dbs()?[day.recent_state(txn)?.active];
        let Pending {
            chunks,
            names,
            samples,
        } = self;
        // The samples in the order of their names; each distinct name's
        // rank, and the newest sample of each (the latest value).
        let mut by_name: Vec<(u128, u32)> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| (names.prefix(s.names), i as u32))
            .collect();
        by_name.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| {
                    let (x, y) = (samples[a.1 as usize].names, samples[b.1 as usize].names);
                    byte_order(names.get(x), names.get(y))
                })
                .then(a.1.cmp(&b.1))
        });
        // One entry per distinct name, in order: its index is the name's rank.
        let mut rank_of = vec![0u32; samples.len()];
        let mut latest: Vec<(KeyRef, (i64, f64))> = Vec::new();
        for &(_, i) in &by_name {
            let s = &samples[i as usize];
            let newest = (s.ts_ns, s.value);
            match latest.last_mut() {
                Some((kept, value)) if names.get(*kept) == names.get(s.names) => {
                    if is_newer(newest, *value) {
                        *value = newest;
                    }
                }
                _ => latest.push((s.names, newest)),
            }
            rank_of[i as usize] = (latest.len() - 1) as u32;
        }
        // Each sample's window at each resolution, sorted as `recent` keys;
        // equal slots (a series' samples in one window) are folded. The
        // sample index in the sort makes the fold's order, and so a float
        // sum's last bits, the same for the same batch.
        let mut slots: Vec<(u128, u32)> = Vec::with_capacity(samples.len() * resolutions.len());
        for (i, s) in samples.iter().enumerate() {
            for &res in resolutions {
                let start = window_start(s.ts_ns, i64::from(res) * NS_PER_SEC);
                slots.push((window_slot(&recent_head(res, start), rank_of[i]), i as u32));
            }
        }
        slots.sort_unstable();
        let mut keys = KeyArena(Vec::with_capacity(slots.len() * (RECENT_HEAD + NAME_BYTES)));
        let mut windows: Vec<(KeyRef, Aggregate)> = Vec::with_capacity(slots.len());
        let mut last_slot = None;
        for &(slot, i) in &slots {
            let s = &samples[i as usize];
            let one = Aggregate::of(s.ts_ns, s.value);
            if last_slot == Some(slot) {
                if let Some((_, agg)) = windows.last_mut() {
                    agg.merge(&one);
                }
                continue;
            }
            last_slot = Some(slot);
            let bytes = slot.to_be_bytes();
            let mut head = [0u8; RECENT_HEAD];
            head.copy_from_slice(&bytes[..RECENT_HEAD]);
            let rank = u32::from_be_bytes(bytes[RECENT_HEAD..].try_into().unwrap_or_default());
            let key = keys.push(|k| {
                put_recent_key(k, &head, names.get(latest[rank as usize].0));
            });
            windows.push((key, one));
        }
        merge_windows(
            day,
            recent,
            txn,
            windows.iter().map(|(key, delta)| (keys.get(*key), delta)),
        )?;
        let fresh = |sample: &(i64, f64)| latest_value(sample.0, sample.1);
        upsert_sorted(
            day,
            day.latest,
            txn,
            latest.iter().map(|(key, sample)| (names.get(*key), sample)),
            fresh,
            |sample, old| {
                let old =
                    parse_latest_value(old).ok_or_else(|| corrupt(&day.name, "latest value"))?;
                Ok(is_newer(*sample, old).then(|| latest_value(sample.0, sample.1)))
            },
        )?;
        let mut buf = Vec::new();
        for mut chunk in chunks.into_iter().filter(|c| c.dirty) {
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
        Ok(windows.len())
    }
}

/// Merges window deltas, in ascending key order, into `db` (a `recent`
/// database).
fn merge_windows<'k>(
    day: &DayEnv,
    db: Database<Bytes, Bytes>,
    txn: &mut RwTxn<'_>,
    windows: impl Iterator<Item = (&'k [u8], &'k Aggregate)>,
) -> Result<(), StoreError> {
    let fresh = |delta: &Aggregate| delta.encode(day.short_values);
    upsert_sorted(day, db, txn, windows, fresh, |delta, old| {
        let mut merged =
            Aggregate::from_bytes(old).ok_or_else(|| corrupt(&day.name, "window aggregate"))?;
        merged.merge(delta);
        Ok(Some(merged.encode(day.short_values)))
    })
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
/// Once the walk reaches the end of the database, the rest are appended.
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
    // Past the database's last key: every entry from here on is new and
    // goes after everything stored.
    let mut at_end = false;
    while let Some(&(first, _)) = entries.peek() {
        let mut cursor = db
            .range_mut(txn, &(Bound::Included(first), Bound::Unbounded))
            .map_err(&err)?;
        // A fresh cursor's first step lands on or past `first`, so each
        // cursor takes at least one entry.
        'walk: while let Some(&(key, _)) = entries.peek() {
            let mut steps = 0;
            let stored = loop {
                if at_end {
                    break None;
                }
                if steps == WALK {
                    // Too far: the next cursor is placed at `key` by a search.
                    break 'walk;
                }
                steps += 1;
                match cursor.next().transpose().map_err(&err)? {
                    Some((found, old)) => match byte_order(found, key) {
                        Ordering::Less => continue,
                        Ordering::Equal => break Some(old),
                        // Past the key: `key` is new.
                        Ordering::Greater => break None,
                    },
                    // At the end of the database: `key` is new.
                    None => {
                        at_end = true;
                        break None;
                    }
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
                    // MDB_CURRENT requires. A value of the same size is
                    // written in place; a window growing from its short
                    // form to the long one is re-inserted by LMDB on the
                    // same page (or split), leaving the cursor on `key`, as
                    // after a plain put.
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
                    // At the end, an append: LMDB then skips the search for
                    // the key (it only checks that it sorts after the last),
                    // and a full last page splits by starting a new one
                    // instead of moving half of its entries (so pages filled
                    // in order stay full). Most of a batch's `recent` windows
                    // are appended: their seconds are newer than any stored.
                    let flags = if at_end {
                        PutFlags::APPEND
                    } else {
                        PutFlags::empty()
                    };
                    // SAFETY: as above; a plain cursor put, which places
                    // `key` itself and leaves the cursor on it. An append
                    // of a key that does not sort last fails (MDB_KEYEXIST);
                    // it cannot happen, the keys come in ascending order.
                    unsafe { cursor.put_current_with_options::<Bytes>(flags, key, value.as_ref()) }
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

    use super::{byte_order, KeyArena};

    proptest! {
        #[test]
        fn byte_order_is_the_slices_order_and_prefixes_agree(
            prefix in prop::collection::vec(any::<u8>(), 0..24),
            a in prop::collection::vec(0u8..3, 0..20),
            b in prop::collection::vec(0u8..3, 0..20),
        ) {
            // A shared prefix of any length, then tails of few distinct
            // bytes: equal keys, prefixes of each other, and differences in
            // and after the eight-byte chunks and the 16-byte prefixes.
            let (a, b) = ([&prefix[..], &a].concat(), [&prefix[..], &b].concat());
            prop_assert_eq!(byte_order(&a, &b), a.cmp(&b));
            prop_assert_eq!(byte_order(&b, &a), b.cmp(&a));
            prop_assert_eq!(byte_order(&a, &a), std::cmp::Ordering::Equal);
            // The integer prefixes order the keys as their bytes do, or tie.
            let mut arena = KeyArena(Vec::new());
            let ka = arena.push(|k| k.extend_from_slice(&a));
            let kb = arena.push(|k| k.extend_from_slice(&b));
            let by_prefix = arena.prefix(ka).cmp(&arena.prefix(kb));
            if by_prefix != std::cmp::Ordering::Equal {
                prop_assert_eq!(by_prefix, a.cmp(&b));
            }
        }
    }
}
