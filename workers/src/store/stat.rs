//! Inspecting a store: per-day sizes, JSON-lines dump and backup (what
//! `windrow store stat|dump|backup` print).

use std::{
    collections::BTreeMap,
    io::Write,
    ops::Bound,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    codec::{parse_latest_key, parse_latest_value, parse_window_key, recent_head, WindowKey},
    error::{corrupt, io, lmdb, StoreError},
    read::{for_each_recent, from_key},
    runs::{Merged, RunsState},
    LatestRow, StoreReader,
};
use crate::window::Aggregate;

/// Size and contents of one day.
#[derive(Debug, Clone, Serialize)]
pub struct DayStat {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Its directory.
    pub path: PathBuf,
    /// LMDB map size of this process's view, bytes.
    pub map_bytes: usize,
    /// `data.mdb` size on disk, bytes (LMDB never shrinks it; free pages are reused).
    pub file_bytes: u64,
    /// Bytes in the B-trees' pages (the rest of the file is free pages).
    pub used_bytes: u64,
    /// LMDB page size, bytes.
    pub page_size: u32,
    /// Messages applied in this day (`meta`).
    pub messages_applied: u64,
    /// Entries per named database; `runs`: of all run slots together.
    pub databases: Vec<(String, u64)>,
}

impl StoreReader {
    /// Per-day sizes and entry counts, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on a read failure.
    pub fn stat(&self) -> Result<Vec<DayStat>, StoreError> {
        let mut out = Vec::with_capacity(self.days.len());
        for day in self.days.values() {
            let (databases, used_bytes, messages_applied) = day.read(|rtxn| {
                let err = lmdb(&day.name);
                let (mut databases, mut pages) = (Vec::new(), 0);
                let recent = day
                    .recent
                    .into_iter()
                    .flat_map(|[a, b]| [("recent.0", a), ("recent.1", b)]);
                let dbs = [
                    ("windows", day.windows),
                    ("latest", day.latest),
                    ("applied", day.applied),
                    ("meta", day.meta),
                ];
                for (name, db) in dbs.into_iter().chain(recent) {
                    let s = db.stat(rtxn).map_err(&err)?;
                    pages += s.branch_pages + s.leaf_pages + s.overflow_pages;
                    databases.push((name.to_owned(), s.entries as u64));
                }
                // The run slots as one (a window being merged counts in its
                // source and in the target).
                if !day.runs.is_empty() {
                    let mut entries = 0;
                    for db in &day.runs {
                        let s = db.stat(rtxn).map_err(&err)?;
                        pages += s.branch_pages + s.leaf_pages + s.overflow_pages;
                        entries += s.entries as u64;
                    }
                    databases.push(("runs".to_owned(), entries));
                }
                let applied = day.messages_applied(rtxn)?;
                Ok((databases, pages as u64, applied))
            })?;
            let page_size = day.page_size();
            out.push(DayStat {
                day: day.name.clone(),
                path: day.path.clone(),
                map_bytes: day.map_bytes(),
                file_bytes: day.file_bytes()?,
                used_bytes: used_bytes * u64::from(page_size),
                page_size,
                messages_applied,
                databases,
            });
        }
        Ok(out)
    }

    /// Every window and latest value as JSON lines (`{"day", "db": "windows",
    /// "series", "field", "resolution_secs", "start_ns", <aggregate fields>}`
    /// and `{"day", "db": "latest", "series", "field", "ts_ns", "value"}`);
    /// returns the lines written. Windows still in `recent` are merged in, in
    /// key order: the dump is the same before and after a compaction (up to
    /// the rounding of a window's floating-point `sum`, which depends on the
    /// order its parts are added in).
    ///
    /// # Errors
    /// [`StoreError`] on a read failure or when `out` fails.
    pub fn dump(&self, out: &mut dyn Write) -> Result<u64, StoreError> {
        let mut lines = 0;
        for day in self.days.values() {
            day.read(|rtxn| {
                let name = day.name.as_str();
                // `recent` is bounded by about `recent_max_windows` (more
                // only while compaction cannot keep up): held in memory by
                // window key, merged into the walk over `windows` and the
                // runs.
                let mut recent = BTreeMap::<Vec<u8>, Aggregate>::new();
                // Also the windows the day rolls up from them: a scan of
                // each fine resolution's part of `recent` per rollup.
                let roll_ups = std::iter::once(None).chain(day.rollups.iter().copied().map(Some));
                for roll_up in roll_ups {
                    let heads = roll_up
                        .map(|r| (recent_head(r.fine, i64::MIN), recent_head(r.fine, i64::MAX)));
                    let range = match &heads {
                        Some((lo, hi)) => (Bound::Included(&lo[..]), Bound::Excluded(&hi[..])),
                        None => (Bound::Unbounded, Bound::Unbounded),
                    };
                    for_each_recent(day, rtxn, range, roll_up, |k, v| {
                        let agg = Aggregate::from_bytes(v)
                            .ok_or_else(|| corrupt(name, "recent window"))?;
                        recent
                            .entry(k.to_vec())
                            .and_modify(|a| a.merge(&agg))
                            .or_insert(agg);
                        Ok(())
                    })?;
                }
                let mut recent = recent.into_iter().peekable();
                let mut line = |k: &[u8], agg: &Aggregate| -> Result<(), StoreError> {
                    let key = parse_window_key(k).ok_or_else(|| corrupt(name, "window key"))?;
                    lines += 1;
                    write_line(
                        out,
                        &DumpWindow {
                            day: name,
                            db: "windows",
                            key: &key,
                            agg,
                        },
                    )
                };
                // `windows` and the runs, each from its floor on.
                let runs = RunsState::read(day, rtxn)?;
                let mut sorted = vec![from_key(day.windows, rtxn, &[]).map_err(lmdb(name))?];
                for (slot, floor) in runs.in_use() {
                    sorted.push(from_key(day.run_db(slot)?, rtxn, floor).map_err(lmdb(name))?);
                }
                let mut sorted = Merged::new(name, sorted)?;
                while let Some((k, window)) = sorted.next_window()? {
                    let mut agg = window.aggregate(name)?;
                    while let Some((rk, ragg)) = recent.next_if(|(rk, _)| rk.as_slice() <= k) {
                        if rk.as_slice() == k {
                            agg.merge(&ragg);
                        } else {
                            line(&rk, &ragg)?;
                        }
                    }
                    line(k, &agg)?;
                }
                for (rk, ragg) in recent {
                    line(&rk, &ragg)?;
                }
                for entry in day.latest.iter(rtxn).map_err(lmdb(name))? {
                    let (k, v) = entry.map_err(lmdb(name))?;
                    let (series, field) =
                        parse_latest_key(k).ok_or_else(|| corrupt(name, "latest key"))?;
                    let (ts_ns, value) =
                        parse_latest_value(v).ok_or_else(|| corrupt(name, "latest value"))?;
                    let row = LatestRow {
                        series,
                        field,
                        ts_ns,
                        value,
                    };
                    write_line(
                        out,
                        &DumpLatest {
                            day: name,
                            db: "latest",
                            row: &row,
                        },
                    )?;
                    lines += 1;
                }
                Ok(())
            })?;
        }
        out.flush().map_err(io("<dump output>"))?;
        Ok(lines)
    }

    /// A consistent, compacted copy of every day into `to/<day>/data.mdb`
    /// (each day copied within one read transaction; the writer continues).
    ///
    /// # Errors
    /// [`StoreError`] if a directory cannot be created or a copy fails.
    pub fn backup(&self, to: &Path) -> Result<(), StoreError> {
        for day in self.days.values() {
            let dir = to.join(&day.name);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            day.copy_to(&dir.join("data.mdb"))?;
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct DumpWindow<'a> {
    day: &'a str,
    db: &'static str,
    #[serde(flatten)]
    key: &'a WindowKey,
    #[serde(flatten)]
    agg: &'a Aggregate,
}

#[derive(Serialize)]
struct DumpLatest<'a> {
    day: &'a str,
    db: &'static str,
    #[serde(flatten)]
    row: &'a LatestRow,
}

fn write_line(out: &mut dyn Write, line: &impl Serialize) -> Result<(), StoreError> {
    let to_io = io("<dump output>");
    serde_json::to_writer(&mut *out, line).map_err(|e| StoreError::Io {
        path: "<dump output>".into(),
        source: e.into(),
    })?;
    out.write_all(b"\n").map_err(to_io)
}
