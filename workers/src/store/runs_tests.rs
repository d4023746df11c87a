//! Runs (module `runs`): every answer is the same at every slice of a merge
//! of runs and across a restart in the middle of one; a compaction that a
//! build before runs began into `windows` ends in a run; a compaction waits
//! for a free slot while merges go on and free some; a merge's transaction
//! holds at most [`MERGE_MAX_SLICE`] windows.

use std::sync::Arc;

use super::recent_tests::{answers, batch, entries, next_step, store};
use super::runs::{merge_step, start_merges, Run, RunsState, MERGE_MAX_SLICE};
use super::tests::{msg, MIN, T0};
use super::*;
use crate::window::NS_PER_SEC;

/// Small compactions and slices: every 30 windows written make a run.
fn small_runs(dir: &std::path::Path, clock: &ManualClock) -> Store {
    let config = StoreConfig {
        dir: dir.to_owned(),
        recent_max_windows: 30,
        compaction_slice_windows: 5,
        ..StoreConfig::default()
    };
    let mut s = Store::open(config, Arc::new(clock.clone())).unwrap();
    s.fan_in = 2;
    s
}

/// The only day's runs as `meta` records them.
fn runs_state(s: &StoreReader) -> RunsState {
    let day = s.days.values().next().unwrap().clone();
    day.read(|rtxn| RunsState::read(&day, rtxn)).unwrap()
}

/// Readings of three series, a few per batch of 5, each batch new windows.
fn readings() -> Vec<Message> {
    (0..600)
        .map(|i| {
            let series = ["a", "b/1", "b/2"][i as usize % 3];
            msg(None, series, T0 + 10 * MIN + i * NS_PER_SEC, i as f64)
        })
        .collect()
}

#[test]
fn a_merge_of_runs_answers_the_same_at_every_slice_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut sliced = small_runs(&dir.path().join("sliced"), &clock);
    let mut plain = store(&dir.path().join("plain"), &clock);
    let messages = readings();
    let mut chunks = messages.chunks(5);
    // Until a merge has written part of its run: stop there.
    let mut merge_slices = 0;
    loop {
        let chunk = chunks.next().expect("a merge in progress");
        sliced.apply(chunk).unwrap();
        plain.apply(chunk).unwrap();
        let steps = sliced.compact_due().unwrap();
        assert_eq!(answers(&sliced), answers(&plain));
        merge_slices += steps.iter().filter(|s| s.merge).count();
        // A merge's slice: what the batch brought to a level, 2 windows
        // (a second and its minute) for each of its 5 messages; the
        // minimum slice's half (3) is less.
        for step in steps.iter().filter(|s| s.merge) {
            assert!(step.windows <= 10, "{step:?}");
        }
        if steps.iter().any(|s| s.merge && !s.done && s.windows > 0) {
            break;
        }
    }
    let state = runs_state(&sliced);
    assert_eq!(state.merges.len(), 1, "{state:?}");
    assert!(!state.merges[0].floor.is_empty(), "part of it merged");
    sliced.close();

    let mut sliced = small_runs(&dir.path().join("sliced"), &clock);
    assert_eq!(answers(&sliced), answers(&plain), "after the restart");
    for chunk in chunks {
        sliced.apply(chunk).unwrap();
        plain.apply(chunk).unwrap();
        merge_slices += sliced
            .compact_due()
            .unwrap()
            .iter()
            .filter(|s| s.merge)
            .count();
        assert_eq!(answers(&sliced), answers(&plain));
    }
    sliced.compact_all().unwrap();
    assert_eq!(answers(&sliced), answers(&plain), "at the end");
    let state = runs_state(&sliced);
    assert!(
        state.merges.is_empty() && state.filling.is_none(),
        "{state:?}"
    );
    // 600 seconds and 10 minutes, in runs of levels that are all different
    // (two of one level would have merged).
    let mut levels: Vec<u8> = state.live.iter().map(|r| r.level).collect();
    levels.sort_unstable();
    levels.dedup();
    assert_eq!(levels.len(), state.live.len(), "{state:?}");
    assert!(levels.len() >= 2 && merge_slices > 10, "{state:?}");
    assert_eq!(entries(&sliced, "recent"), 0);
    assert!(entries(&sliced, "runs") >= 610);
}

/// Rewrites the only day as a build before runs left it in the middle of a
/// compaction: what the compaction had merged is in `windows`, no run slot
/// is taken, and `format_version` is 4.
fn make_version_4_in_the_middle(s: &Store) {
    let day = s.days.values().next().unwrap().clone();
    let mut w = day.write_txn().unwrap();
    let state = RunsState::read(&day, &w.txn).unwrap();
    assert!(
        state.live.is_empty() && state.merges.is_empty(),
        "{state:?}"
    );
    let run = day.run_db(state.filling.expect("a compaction")).unwrap();
    let all: Vec<(Vec<u8>, Vec<u8>)> = run
        .iter(&w.txn)
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect();
    assert!(!all.is_empty(), "part of it merged");
    for (k, v) in all {
        day.windows.put(&mut w.txn, &k, &v).unwrap();
    }
    run.clear(&mut w.txn).unwrap();
    RunsState::default().write(&day, &mut w.txn).unwrap();
    day.meta.delete(&mut w.txn, b"runs").unwrap();
    day.meta.put(&mut w.txn, b"format_version", b"4").unwrap();
    w.commit(&day.name).unwrap();
}

#[test]
fn a_compaction_an_older_build_began_into_windows_ends_in_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let config = StoreConfig {
        dir: dir.path().join("old"),
        recent_max_windows: 90,
        compaction_slice_windows: 25,
        ..StoreConfig::default()
    };
    let mut old = Store::open(config.clone(), Arc::new(clock.clone())).unwrap();
    let mut plain = store(&dir.path().join("plain"), &clock);
    let messages: Vec<Message> = (0..2).flat_map(batch).collect();
    let mut chunks = messages.chunks(10);
    loop {
        let chunk = chunks.next().expect("a compaction in progress");
        old.apply(chunk).unwrap();
        plain.apply(chunk).unwrap();
        let steps = old.compact_due().unwrap();
        if steps.iter().any(|s| !s.merge && !s.done && s.windows > 0) {
            break;
        }
    }
    make_version_4_in_the_middle(&old);
    assert_eq!(answers(&old), answers(&plain), "as the old build left it");
    assert!(entries(&old, "windows") > 0 && entries(&old, "runs") == 0);
    old.close();

    let mut old = Store::open(config, Arc::new(clock.clone())).unwrap();
    assert_eq!(answers(&old), answers(&plain), "reopened");
    while !next_step(&mut old).done {
        assert_eq!(answers(&old), answers(&plain));
    }
    for chunk in chunks {
        old.apply(chunk).unwrap();
        plain.apply(chunk).unwrap();
        old.compact_due().unwrap();
        assert_eq!(answers(&old), answers(&plain));
    }
    old.compact_all().unwrap();
    assert_eq!(answers(&old), answers(&plain), "at the end");
    let state = runs_state(&old);
    assert!(
        state.live.len() >= 2 && state.filling.is_none(),
        "{state:?}"
    );
}

/// Marks `levels.len()` slots as complete (empty) runs of those levels.
fn take_slots(s: &Store, levels: impl Iterator<Item = u8>) {
    let day = s.days.values().next().unwrap().clone();
    let mut w = day.write_txn().unwrap();
    let state = RunsState {
        live: levels
            .zip(0u8..)
            .map(|(level, slot)| Run { slot, level })
            .collect(),
        ..RunsState::default()
    };
    state.write(&day, &mut w.txn).unwrap();
    w.commit(&day.name).unwrap();
}

#[test]
fn a_compaction_waits_for_a_free_slot_and_merges_go_on_and_free_some() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let config = StoreConfig {
        dir: dir.path().join("full"),
        recent_max_windows: 90,
        ..StoreConfig::default()
    };
    let mut s = Store::open(config, Arc::new(clock.clone())).unwrap();
    let mut plain = store(&dir.path().join("plain"), &clock);
    for s in [&mut s, &mut plain] {
        s.apply(&batch(0)).unwrap();
    }
    let before = answers(&s);
    // All but one slot taken, three runs a level: nothing to merge, and a
    // compaction would take the slot a merge needs.
    let slots = u8::try_from(s.days.values().next().unwrap().runs.len()).unwrap();
    take_slots(&s, (0..slots - 1).map(|i| 1 + i / 3));
    let err = s.compact_due().unwrap_err();
    assert!(
        matches!(err, StoreError::NoFreeRunSlot { .. }) && err.is_retryable(),
        "{err}"
    );
    assert_eq!(answers(&s), before, "the windows wait in recent");
    assert_eq!(entries(&s, "recent"), 90);

    // A fourth run of level 1: its merge takes the last slot, frees four,
    // and the compaction then goes ahead.
    take_slots(
        &s,
        (0..slots - 1).map(|i| if i == 3 { 1 } else { 1 + i / 3 }),
    );
    let steps = s.compact_due().unwrap();
    assert!(steps[0].merge && steps[0].done, "{steps:?}");
    while !next_step(&mut s).done {}
    assert_eq!(answers(&s), before);
    assert_eq!(answers(&s), answers(&plain));
    assert_eq!((entries(&s, "recent"), entries(&s, "runs")), (0, 96));
    let state = runs_state(&s);
    assert!(
        state.live.contains(&Run {
            slot: slots - 1,
            level: 2
        }),
        "{state:?}"
    );
}

#[test]
fn a_merge_writes_at_most_its_cap_in_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut s = small_runs(&dir.path().join("capped"), &clock);
    // No merges while the runs are made.
    s.fan_in = usize::MAX;
    let mut plain = store(&dir.path().join("plain"), &clock);
    for chunk in readings().chunks(5) {
        s.apply(chunk).unwrap();
        plain.apply(chunk).unwrap();
        s.compact_due().unwrap();
        if runs_state(&s).live.len() >= 3 {
            break;
        }
    }
    let day = s.days.values().next().unwrap().clone();
    let targets = start_merges(&day, 2).unwrap();
    assert_eq!(targets.len(), 1, "{:?}", runs_state(&s));
    let mut slices = 0;
    loop {
        let (windows, done) = merge_step(&day, targets[0], usize::MAX).unwrap();
        assert!(windows <= MERGE_MAX_SLICE, "{windows}");
        assert_eq!(answers(&s), answers(&plain), "after slice {slices}");
        slices += 1;
        if done {
            break;
        }
    }
    // Three runs of over 30 windows each: more than two capped slices.
    assert!(slices >= 2, "{slices} slices");
    assert_eq!(
        runs_state(&s).live,
        vec![Run {
            slot: targets[0],
            level: 1
        }]
    );
}
