//! One day's part of a batch: duplicates looked up and windows, latest
//! values and applied bitmaps updated in memory, then written in one
//! transaction.

use std::collections::{btree_map, hash_map, BTreeMap, HashMap};

use heed::{RoTxn, RwTxn};
use roaring::RoaringBitmap;

use super::{
    codec::{
        applied_key, applied_low, is_newer, latest_key, latest_value, parse_latest_value,
        window_key,
    },
    day::DayEnv,
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
/// something was applied.
pub(super) fn apply_day(
    day: &DayEnv,
    resolutions: &[u32],
    batch: &[Message],
    plan: &[Planned],
) -> Result<Vec<Verdict>, StoreError> {
    let mut w = day.write_txn()?;
    let mut pending = Pending::default();
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
    if applied > 0 {
        pending.write(day, &mut w.txn, applied)?;
        w.commit(&day.name)?;
    }
    Ok(out)
}

/// A day's changes, gathered in memory so each key is read and written once
/// per commit, and written in key order (LMDB's cheapest).
#[derive(Default)]
struct Pending {
    chunks: HashMap<Vec<u8>, Chunk>,
    windows: BTreeMap<Vec<u8>, Aggregate>,
    latest: BTreeMap<Vec<u8>, (i64, f64)>,
}

struct Chunk {
    bits: RoaringBitmap,
    dirty: bool,
}

impl Pending {
    /// The applied chunk holding `seq`, read from the day on first use.
    fn chunk(
        &mut self,
        day: &DayEnv,
        txn: &RoTxn<'_>,
        stream: &str,
        seq: u64,
    ) -> Result<&mut Chunk, StoreError> {
        Ok(match self.chunks.entry(applied_key(stream, seq)) {
            hash_map::Entry::Occupied(e) => e.into_mut(),
            hash_map::Entry::Vacant(e) => {
                let bits = match day.applied.get(txn, e.key()).map_err(lmdb(&day.name))? {
                    Some(bytes) => RoaringBitmap::deserialize_from(bytes).map_err(|err| {
                        corrupt(
                            &day.name,
                            format!("applied bitmap of {stream} near {seq}: {err}"),
                        )
                    })?,
                    None => RoaringBitmap::new(),
                };
                e.insert(Chunk { bits, dirty: false })
            }
        })
    }

    fn add(&mut self, m: &Message, resolutions: &[u32]) {
        for s in &m.samples {
            let one = Aggregate::of(s.ts_ns, s.value);
            for &res in resolutions {
                let start = window_start(s.ts_ns, i64::from(res) * NS_PER_SEC);
                match self
                    .windows
                    .entry(window_key(&s.series, &s.field, res, start))
                {
                    btree_map::Entry::Occupied(mut e) => e.get_mut().merge(&one),
                    btree_map::Entry::Vacant(e) => {
                        e.insert(one);
                    }
                }
            }
            let sample = (s.ts_ns, s.value);
            let latest = self
                .latest
                .entry(latest_key(&s.series, &s.field))
                .or_insert(sample);
            if is_newer(sample, *latest) {
                *latest = sample;
            }
        }
    }

    /// Merges into what the day holds and puts everything.
    ///
    /// Most keys are new (at 1 Hz a series opens a 1 s window per message),
    /// so each is put if absent in one B-tree descent (`get_or_put`), and
    /// only a key that exists costs a second descent to store the merge.
    fn write(self, day: &DayEnv, txn: &mut RwTxn<'_>, applied: u64) -> Result<(), StoreError> {
        let err = lmdb(&day.name);
        for (key, delta) in self.windows {
            let existing = day
                .windows
                .get_or_put(txn, &key, &delta.to_bytes())
                .map_err(&err)?
                .map(|bytes| {
                    Aggregate::from_bytes(bytes)
                        .ok_or_else(|| corrupt(&day.name, "window aggregate"))
                })
                .transpose()?;
            if let Some(mut merged) = existing {
                merged.merge(&delta);
                day.windows
                    .put(txn, &key, &merged.to_bytes())
                    .map_err(&err)?;
            }
        }
        for (key, sample) in self.latest {
            let value = latest_value(sample.0, sample.1);
            let existing = day
                .latest
                .get_or_put(txn, &key, &value)
                .map_err(&err)?
                .map(|bytes| {
                    parse_latest_value(bytes).ok_or_else(|| corrupt(&day.name, "latest value"))
                })
                .transpose()?;
            if existing.is_some_and(|old| is_newer(sample, old)) {
                day.latest.put(txn, &key, &value).map_err(&err)?;
            }
        }
        let mut buf = Vec::new();
        for (key, mut chunk) in self.chunks.into_iter().filter(|(_, c)| c.dirty) {
            // Run containers: a chunk of sequential sequences is a few bytes.
            chunk.bits.optimize();
            buf.clear();
            chunk.bits.serialize_into(&mut buf).map_err(io(&day.path))?;
            day.applied.put(txn, &key, &buf).map_err(&err)?;
        }
        let count = day.messages_applied(txn)?;
        day.meta
            .put(txn, b"messages_applied", &(count + applied).to_le_bytes())
            .map_err(&err)
    }
}
