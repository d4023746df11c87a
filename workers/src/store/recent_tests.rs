//! The `recent` databases and compaction: every answer is the same whether a
//! window's parts are in `recent`, in `windows` or in several of them, at
//! any step of a compaction and across a restart in the middle of one;
//! version 1 days (without `recent`) are read and upgraded.

use std::sync::Arc;

use heed::{types::Bytes, EnvOpenOptions};

use super::codec::{latest_value, put_latest_key, window_key};
use super::tests::{all, msg, MIN, T0};
use super::*;
use crate::window::{Aggregate, NS_PER_SEC};

const ALL: (i64, i64) = (i64::MIN, i64::MAX);

/// The next compaction step of the store's only day, once the frozen
/// windows are loaded (on a thread of their own, so a call may find them not
/// ready yet and do nothing).
pub(super) fn next_step(s: &mut Store) -> CompactionStep {
    for _ in 0..2_000 {
        if let Some(step) = s.compact_due().unwrap().pop() {
            return step;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("no compaction step within 10 s");
}

pub(super) fn store(dir: &std::path::Path, clock: &ManualClock) -> Store {
    let config = StoreConfig {
        dir: dir.to_owned(),
        ..StoreConfig::default()
    };
    Store::open(config, Arc::new(clock.clone())).unwrap()
}

/// Entries per database of the only day (`recent`: both together).
pub(super) fn entries(s: &StoreReader, db: &str) -> u64 {
    let stat = s.stat().unwrap();
    assert_eq!(stat.len(), 1, "{stat:?}");
    let names: &[&str] = match db {
        "recent" => &["recent.0", "recent.1"],
        _ => &[db],
    };
    names
        .iter()
        .map(|db| {
            stat[0]
                .databases
                .iter()
                .find(|(name, _)| name == db)
                .map_or_else(|| panic!("no {db} in {stat:?}"), |(_, n)| *n)
        })
        .sum()
}

/// Everything a reader can be asked, as one comparable value.
pub(super) fn answers(s: &StoreReader) -> (Vec<Vec<WindowRow>>, Vec<LatestRow>, String) {
    let from = T0 + 10 * MIN + 3 * NS_PER_SEC;
    let to = T0 + 11 * MIN + 30 * NS_PER_SEC;
    let windows = vec![
        all(s, "*", 1),
        all(s, "*", 60),
        s.windows("b/*", Some("t"), 1, from, to).unwrap(),
        s.windows("a", Some("t"), 60, ALL.0, ALL.1).unwrap(),
        s.windows("a", None, 1, from, to).unwrap(),
        s.windows("b/1", Some("t"), 1, from, to).unwrap(),
    ];
    let mut dump = Vec::new();
    s.dump(&mut dump).unwrap();
    (
        windows,
        s.latest("*").unwrap(),
        String::from_utf8(dump).unwrap(),
    )
}

/// Messages of three series over two minutes; `round` shifts values and
/// times within the same windows, so rounds merge into each other's windows.
pub(super) fn batch(round: i64) -> Vec<Message> {
    (0..90)
        .map(|i| {
            let series = ["a", "b/1", "b/2"][i as usize % 3];
            let ts = T0 + 10 * MIN + i * NS_PER_SEC + round;
            msg(None, series, ts, (i * 7 + round) as f64)
        })
        .collect()
}

#[test]
fn windows_wait_in_recent_and_compaction_changes_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut compacted = store(&dir.path().join("compacted"), &clock);
    let mut plain = store(&dir.path().join("plain"), &clock);

    for s in [&mut compacted, &mut plain] {
        s.apply(&batch(0)).unwrap();
    }
    // 90 one-second windows, all still in `recent`; the 2 minute windows of
    // each series are rolled up from them.
    assert_eq!(
        (entries(&compacted, "recent"), entries(&compacted, "runs")),
        (90, 0)
    );
    let before = answers(&compacted);
    assert_eq!(before.0[0].len(), 90);
    assert_eq!(before.0[1].iter().map(|w| w.agg.count).sum::<u64>(), 90);
    assert_eq!(before.2.lines().count(), 96 + 3, "{}", before.2);

    // Into a run: the seconds, and the minutes rolled up from them.
    assert_eq!(compacted.compact_all().unwrap(), 96);
    assert_eq!(
        (entries(&compacted, "recent"), entries(&compacted, "runs")),
        (0, 96)
    );
    assert_eq!(answers(&compacted), before, "compaction changed an answer");
    assert_eq!(compacted.compact_all().unwrap(), 0, "nothing left to move");

    // The same windows again: now each has a part in a run and one in
    // `recent` in the compacted store, and both in `recent` in the other.
    for s in [&mut compacted, &mut plain] {
        s.apply(&batch(1)).unwrap();
        s.apply(&batch(2)).unwrap();
    }
    assert_eq!(entries(&compacted, "recent"), 90);
    let split = answers(&compacted);
    assert_eq!(split, answers(&plain), "split windows are merged on read");
    assert_eq!(split.0[1].iter().map(|w| w.agg.count).sum::<u64>(), 270);
    assert_eq!(compacted.compact_all().unwrap(), 96);
    assert_eq!(answers(&compacted), split);
    // Two runs of the same 96 windows, until they are merged.
    assert_eq!(entries(&compacted, "runs"), 2 * 96);
    compacted.fan_in = 2;
    compacted.compact_all().unwrap();
    assert_eq!(answers(&compacted), split, "merging runs changed an answer");
    assert_eq!(entries(&compacted, "runs"), 96);
}

#[test]
fn compaction_runs_once_recent_holds_recent_max_windows() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let config = StoreConfig {
        dir: dir.path().to_owned(),
        recent_max_windows: 100,
        ..StoreConfig::default()
    };
    let mut s = Store::open(config, Arc::new(clock.clone())).unwrap();
    s.apply(&batch(0)).unwrap();
    assert!(s.compact_due().unwrap().is_empty(), "90 < 100");
    s.apply(&[msg(None, "c", T0 + 20 * MIN, 1.0)]).unwrap();
    let ten_more: Vec<Message> = (1..10)
        .map(|i| msg(None, "c", T0 + 20 * MIN + i * NS_PER_SEC, 1.0))
        .collect();
    s.apply(&ten_more).unwrap();
    let day = day_name(T0).unwrap();
    let step = next_step(&mut s);
    // 100 seconds, and 7 minutes rolled up from them.
    assert_eq!((step.day, step.windows, step.done), (day, 107, true));
    assert_eq!((entries(&s, "recent"), entries(&s, "runs")), (0, 107));
}

/// What a day written by a version 1 build holds: four databases, no
/// `recent`, `format_version` 1.
#[allow(unsafe_code)]
fn write_version_1_day(dir: &std::path::Path) {
    let path = dir.join(day_name(T0).unwrap());
    std::fs::create_dir_all(&path).unwrap();
    // SAFETY: a fresh directory, opened once here and closed before the
    // store opens it.
    let env = unsafe {
        EnvOpenOptions::new()
            .map_size(1 << 20)
            .max_dbs(4)
            .open(&path)
            .unwrap()
    };
    let mut w = env.write_txn().unwrap();
    let mut db = |name| {
        env.create_database::<Bytes, Bytes>(&mut w, Some(name))
            .unwrap()
    };
    let (windows, latest, _applied, meta) =
        (db("windows"), db("latest"), db("applied"), db("meta"));
    let ts = T0 + 10 * MIN;
    for (res, start) in [(1, ts), (60, ts)] {
        let agg = Aggregate::of(ts, 5.0).to_bytes();
        windows
            .put(&mut w, &window_key("a", "t", res, start), &agg)
            .unwrap();
    }
    let mut k = Vec::new();
    put_latest_key(&mut k, "a", "t");
    latest.put(&mut w, &k, &latest_value(ts, 5.0)).unwrap();
    meta.put(&mut w, b"format_version", b"1").unwrap();
    meta.put(&mut w, b"messages_applied", &1u64.to_le_bytes())
        .unwrap();
    w.commit().unwrap();
    env.prepare_for_closing().wait();
}

#[test]
fn a_version_1_day_is_read_and_upgraded_when_written() {
    let dir = tempfile::tempdir().unwrap();
    write_version_1_day(dir.path());
    let reader = open_read_only(dir.path()).unwrap();
    let minute = reader.windows("a", None, 60, ALL.0, ALL.1).unwrap();
    assert_eq!((minute.len(), minute[0].agg.sum), (1, 5.0));
    assert!(
        !reader.stat().unwrap()[0]
            .databases
            .iter()
            .any(|(n, _)| n.starts_with("recent")),
        "a version 1 day has no recent database"
    );
    drop(reader);

    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut s = store(dir.path(), &clock);
    s.apply(&[msg(None, "a", T0 + 10 * MIN + 1, 2.0)]).unwrap();
    let minute = all(&s, "a", 60);
    assert_eq!((minute[0].agg.count, minute[0].agg.sum), (2, 7.0));
    let day = s.days.values().next().unwrap().clone();
    let version = day
        .read(|rtxn| {
            Ok(day
                .meta
                .get(rtxn, b"format_version")
                .unwrap()
                .map(<[u8]>::to_vec))
        })
        .unwrap();
    assert_eq!(version.as_deref(), Some(&b"5"[..]));
    assert_eq!(
        entries(&s, "recent"),
        2,
        "a day from before rollups gets every resolution written"
    );
    assert_eq!(s.compact_all().unwrap(), 2);
    assert_eq!(all(&s, "a", 60), minute);
    // Reopened as the version 5 day it now is, it gets short values (here
    // for a new series' one-sample windows), and keeps having no rollups.
    drop(day);
    s.close();
    let mut s = store(dir.path(), &clock);
    s.apply(&[msg(None, "b", T0 + 20 * MIN, 4.0)]).unwrap();
    let (mut lengths, version) = value_lengths(&s);
    lengths.sort_unstable();
    assert_eq!(version, "5");
    // `windows`: the version 1 windows, long; a run: "a"'s two windows
    // written after the upgrade; `recent`: "b"'s two (both resolutions,
    // nothing rolled up), one sample each, so short.
    assert_eq!(lengths, [16, 16, 16, 16, 64, 64]);
}

/// A day keeps the rollups it was created with. Restarted without the fine
/// resolution, the worker writes the coarse one directly, beside what is
/// rolled up from the fine windows already there; with both again, it rolls
/// up again. Every sample counts once, before and after a compaction.
#[test]
fn a_day_keeps_its_rollups_and_other_resolutions_later_count_each_sample_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let open = |resolutions_secs: Vec<u32>| {
        let config = StoreConfig {
            dir: dir.path().to_owned(),
            resolutions_secs,
            ..StoreConfig::default()
        };
        Store::open(config, Arc::new(clock.clone())).unwrap()
    };
    let counts = |s: &Store, res| all(s, "*", res).iter().map(|w| w.agg.count).sum::<u64>();
    let mut s = open(vec![1, 60]);
    s.apply(&batch(0)).unwrap();
    assert_eq!(entries(&s, "recent"), 90, "seconds only");
    s.close();

    let mut s = open(vec![60]);
    s.apply(&batch(1)).unwrap();
    assert_eq!(
        entries(&s, "recent"),
        96,
        "and six minutes written directly"
    );
    assert_eq!((counts(&s, 1), counts(&s, 60)), (90, 180));
    s.close();

    let mut s = open(vec![1, 60]);
    s.apply(&batch(2)).unwrap();
    assert_eq!(entries(&s, "recent"), 96, "the seconds merge into theirs");
    assert_eq!((counts(&s, 1), counts(&s, 60)), (180, 270));
    let before = answers(&s);
    s.compact_all().unwrap();
    assert_eq!(answers(&s), before);
    assert_eq!((counts(&s, 1), counts(&s, 60)), (180, 270));
}

/// A day's databases of window values: `windows`, the runs and both `recent`.
fn window_dbs(day: &super::day::DayEnv) -> impl Iterator<Item = heed::Database<Bytes, Bytes>> + '_ {
    std::iter::once(day.windows)
        .chain(day.runs.iter().copied())
        .chain(day.recent.into_iter().flatten())
}

/// The lengths of the window values of the only day's `windows` and
/// `recent` databases, and its `format_version`.
fn value_lengths(s: &StoreReader) -> (Vec<usize>, String) {
    let day = s.days.values().next().unwrap().clone();
    day.read(|rtxn| {
        let mut lengths = Vec::new();
        for db in window_dbs(&day) {
            for entry in db.iter(rtxn).unwrap() {
                lengths.push(entry.unwrap().1.len());
            }
        }
        let version = day.meta.get(rtxn, b"format_version").unwrap().unwrap();
        Ok((lengths, String::from_utf8(version.to_vec()).unwrap()))
    })
    .unwrap()
}

/// Every window of `db`, decoded.
fn aggregates(
    db: heed::Database<Bytes, Bytes>,
    txn: &heed::RoTxn<'_>,
) -> Vec<(Vec<u8>, Aggregate)> {
    db.iter(txn)
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            (k.to_vec(), Aggregate::from_bytes(v).unwrap())
        })
        .collect()
}

/// Rewrites the only day as a version 3 build wrote it: every window value
/// in its 64-byte form.
fn make_version_3(s: &Store) {
    let day = s.days.values().next().unwrap().clone();
    let mut w = day.write_txn().unwrap();
    // A version 3 build compacted into `windows`: the runs' windows go there.
    for run in day.runs.clone() {
        for (k, mut agg) in aggregates(run, &w.txn) {
            if let Some(old) = day.windows.get(&w.txn, &k).unwrap() {
                agg.merge(&Aggregate::from_bytes(old).unwrap());
            }
            day.windows.put(&mut w.txn, &k, &agg.to_bytes()).unwrap();
        }
        run.clear(&mut w.txn).unwrap();
    }
    for key in [&b"runs"[..], b"run_filling", b"runs_merges"] {
        day.meta.delete(&mut w.txn, key).unwrap();
    }
    for db in window_dbs(&day) {
        for (k, agg) in aggregates(db, &w.txn) {
            db.put(&mut w.txn, &k, &agg.to_bytes()).unwrap();
        }
    }
    day.meta.put(&mut w.txn, b"format_version", b"3").unwrap();
    w.commit(&day.name).unwrap();
}

/// A window of one sample takes 16 bytes from format version 4 on. A
/// version 3 day (every value 64 bytes) is read as it is, becomes version 4
/// when a worker writes to it, and from then on holds both forms, answering
/// exactly as a day written by this build throughout.
#[test]
fn a_version_3_day_is_read_and_gets_short_values_when_written() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    // Seconds that batches 0 and 1 do not touch: one sample each.
    let later: Vec<Message> = (0..30)
        .map(|i| msg(None, "a", T0 + 20 * MIN + i * NS_PER_SEC, i as f64))
        .collect();
    let mut model = store(&dir.path().join("model"), &clock);
    let mut s = store(&dir.path().join("old"), &clock);
    for s in [&mut model, &mut s] {
        s.apply(&batch(0)).unwrap();
        s.compact_all().unwrap();
        s.apply(&batch(2)).unwrap();
    }
    let (lengths, version) = value_lengths(&model);
    assert_eq!(version, "5");
    assert!(
        lengths.contains(&16) && lengths.contains(&64),
        "{lengths:?}"
    );

    make_version_3(&s);
    let (lengths, version) = value_lengths(&s);
    assert_eq!(version, "3");
    assert!(lengths.iter().all(|l| *l == 64), "{lengths:?}");
    s.close();
    let reader = open_read_only(&dir.path().join("old")).unwrap();
    assert_eq!(answers(&reader), answers(&model), "read as it is");
    drop(reader);

    let mut s = store(&dir.path().join("old"), &clock);
    for s in [&mut model, &mut s] {
        s.apply(&batch(1)).unwrap();
        s.apply(&later).unwrap();
    }
    let (lengths, version) = value_lengths(&s);
    assert_eq!(version, "5", "upgraded when written");
    let short = lengths.iter().filter(|l| **l == 16).count();
    assert_eq!(
        short,
        later.len(),
        "only the new one-sample windows are short"
    );
    assert_eq!(answers(&s), answers(&model));
    assert_eq!(all(&s, "a", 1), all(&model, "a", 1));
    s.compact_all().unwrap();
    model.compact_all().unwrap();
    assert_eq!(answers(&s), answers(&model), "and after a compaction");
    assert_eq!(all(&s, "a", 1), all(&model, "a", 1));
}

#[test]
fn a_day_of_an_unknown_version_is_refused_with_the_versions_read() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut s = store(dir.path(), &clock);
    s.apply(&[msg(None, "a", T0 + MIN, 1.0)]).unwrap();
    let day = s.days.values().next().unwrap().clone();
    let mut w = day.write_txn().unwrap();
    day.meta.put(&mut w.txn, b"format_version", b"6").unwrap();
    w.commit(&day.name).unwrap();
    drop(day);
    s.close();
    let err = Store::open(
        StoreConfig {
            dir: dir.path().to_owned(),
            ..StoreConfig::default()
        },
        Arc::new(clock),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("format_version \"6\" (this build reads 1 to 5)"),
        "{err}"
    );
}

/// A store that compacts at 40,000 windows in slices of at least 10, and
/// whose loads take [`LOAD_STEPS`] steps.
fn small_slices(dir: &std::path::Path, clock: &ManualClock) -> Store {
    let config = StoreConfig {
        dir: dir.to_owned(),
        recent_max_windows: 40_000,
        compaction_slice_windows: 10,
        ..StoreConfig::default()
    };
    let mut s = Store::open(config, Arc::new(clock.clone())).unwrap();
    s.load_steps = Some(LOAD_STEPS);
    s
}

/// Steps a load takes in [`small_slices`]: enough that the slices paying a
/// sixteenth of what is written meanwhile, 4 × (1 + 40/16 rounded up) = 16
/// windows, are more than the configured 10 (17 steps would do). Fixed,
/// because how long a load really takes depends on the machine: 181 steps
/// on one, 10 on another, where these tests once failed.
const LOAD_STEPS: usize = 40;

/// 4,000 series, 10 s each from `from`: 40,000 windows.
fn fill_recent(s: &mut Store, from: i64) {
    let fill: Vec<Message> = (0..40_000)
        .map(|i| {
            msg(
                None,
                &format!("s{}", i % 4000),
                from + i / 4000 * NS_PER_SEC,
                1.0,
            )
        })
        .collect();
    s.apply(&fill).unwrap();
}

/// Batches of one new window at `at`, each followed by a compaction step
/// as the writer thread does, until `count` slices of `day` are merged:
/// the windows of each slice. The first call freezes `recent` and starts
/// the load; until the load is done ([`LOAD_STEPS`] calls) there is nothing
/// to merge.
fn slices_after_a_load(s: &mut Store, day: &str, at: i64, count: usize) -> Vec<usize> {
    let (mut while_loading, mut slices) = (0, Vec::new());
    for n in 0..20_000 {
        s.apply(&[msg(None, &format!("other-{n}"), at, 1.0)])
            .unwrap();
        let steps = s.compact_due().unwrap();
        let before = slices.len();
        slices.extend(
            steps
                .iter()
                .filter(|step| step.day == day)
                .map(|step| step.windows),
        );
        if before == 0 && slices.is_empty() {
            while_loading += 1;
        }
        if slices.len() >= count {
            break;
        }
    }
    assert_eq!(slices.len(), count, "{while_loading} calls while loading");
    // The call that starts the load, and those that find it not done.
    assert_eq!(while_loading, LOAD_STEPS);
    slices
}

#[test]
fn what_is_written_while_the_frozen_windows_load_is_paid_for_over_sixteen_slices() {
    // Not in the first slice after the load: that slice once paused a
    // worker's writer for up to a second per compaction, and it lost
    // messages. Nor never: a long load would then make each compaction
    // larger than the one before.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut s = small_slices(dir.path(), &clock);
    fill_recent(&mut s, T0);
    let slices = slices_after_a_load(&mut s, "2025-11-25", T0 + 20 * NS_PER_SEC, 20);
    // The call that finds the load done merges the configured 10 and adds
    // its window to the backlog (one window from each call but the first):
    // `LOAD_STEPS` windows. Each of the next slices merges for its
    // batch's window and a sixteenth of the backlog, until it is paid:
    // max(10, 2 × (1 + 1 rollup) × (1 + share)).
    let mut backlog: usize = LOAD_STEPS;
    let share = backlog.div_ceil(16);
    let mut expected = vec![10];
    while expected.len() < slices.len() {
        let paid = share.min(backlog);
        backlog -= paid;
        expected.push(10.max(4 * (1 + paid)));
    }
    assert_eq!(backlog, 0, "paid within {} slices", slices.len());
    assert_eq!(slices, expected, "after {LOAD_STEPS} calls while loading");
}

#[test]
fn a_days_load_sets_its_own_share_of_the_backlog_while_another_days_compaction_runs() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 30 * MIN);
    let mut s = small_slices(dir.path(), &clock);
    // Yesterday's compaction, its backlog being paid.
    fill_recent(&mut s, T0 - 20 * MIN);
    slices_after_a_load(&mut s, "2025-11-24", T0 - 10 * MIN, 4);
    // Today fills up: the call that ends yesterday's compaction (the
    // fill's windows make its slice large) freezes today's, which loads
    // while yesterday's backlog is left unpaid.
    fill_recent(&mut s, T0);
    let slices = slices_after_a_load(&mut s, "2025-11-25", T0 + 20 * NS_PER_SEC, 20);
    // Both backlogs are paid within the 16 slices after the load: then
    // each slice merges for its batch's one window, the configured 10.
    // (With yesterday's share kept, today's backlog took longer.)
    assert_eq!(slices[17..], [10, 10, 10], "{slices:?}");
}

#[test]
fn a_compaction_in_slices_answers_the_same_at_every_step_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let config = StoreConfig {
        dir: dir.path().join("sliced"),
        recent_max_windows: 90,
        compaction_slice_windows: 25,
        ..StoreConfig::default()
    };
    let mut sliced = Store::open(config.clone(), Arc::new(clock.clone())).unwrap();
    sliced.load_steps = Some(2);
    // Every two runs of a level are merged: merges run beside compactions.
    sliced.fan_in = 2;
    let mut plain = store(&dir.path().join("plain"), &clock);
    let messages: Vec<Message> = (0..4).flat_map(batch).collect();
    let mut chunks = messages.chunks(10);
    let (mut slices, mut compactions, mut merges) = (0, 0, 0);
    // Batches of 10 messages write at most 10 windows, so a compaction of
    // 90 or more (and the minutes rolled up from them) takes several slices with batches in between, which land
    // in the active database while the frozen one is half merged.
    let mut apply = |sliced: &mut Store, plain: &mut Store| -> Option<bool> {
        let chunk = chunks.next()?;
        sliced.apply(chunk).unwrap();
        plain.apply(chunk).unwrap();
        let mut in_the_middle = false;
        for step in sliced.compact_due().unwrap() {
            if step.merge {
                merges += usize::from(step.done);
                continue;
            }
            // 25, or 2 × (1 + 1 rollup) × (the batch's 10 windows and a
            // sixteenth of the batches written while the frozen windows
            // loaded, two batches here, so at most 2): at most 48.
            assert!((1..=48).contains(&step.windows), "{step:?}");
            slices += 1;
            compactions += usize::from(step.done);
            in_the_middle = !step.done;
        }
        assert_eq!(answers(sliced), answers(plain));
        Some(in_the_middle)
    };
    while apply(&mut sliced, &mut plain).is_some() {}
    assert!(
        compactions >= 2 && slices > compactions && merges >= 1,
        "{compactions} compactions in {slices} slices, {merges} merges of runs"
    );

    // A restart in the middle: what is merged stays merged, nothing twice.
    let mut more = messages[..60].to_vec();
    for m in &mut more {
        m.samples[0].value += 1000.0;
    }
    let mut more = more.chunks(10);
    loop {
        let chunk = more.next().expect("a compaction in progress");
        sliced.apply(chunk).unwrap();
        plain.apply(chunk).unwrap();
        let steps = sliced.compact_due().unwrap();
        if steps.iter().any(|s| !s.done) {
            break;
        }
    }
    assert_eq!(answers(&sliced), answers(&plain), "in the middle");
    sliced.close();
    let mut sliced = Store::open(config, Arc::new(clock.clone())).unwrap();
    sliced.fan_in = 2;
    assert_eq!(answers(&sliced), answers(&plain), "after the restart");
    while !next_step(&mut sliced).done {
        assert_eq!(answers(&sliced), answers(&plain));
    }
    assert_eq!(answers(&sliced), answers(&plain));
    sliced.compact_all().unwrap();
    assert_eq!(entries(&sliced, "recent"), 0);
    // A window has a part in each run that holds it, and at most one run
    // per level is left.
    assert!((96..=3 * 96).contains(&entries(&sliced, "runs")));
    assert_eq!(answers(&sliced), answers(&plain), "all in runs");
}
