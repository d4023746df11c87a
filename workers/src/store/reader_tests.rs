//! Readers on real LMDB files: in the writer's process, in another process,
//! and on a backup; dump and backup carry the same rows.

use std::path::Path;

use super::{
    tests::{all, msg, open, MIN, T0},
    *,
};
use crate::window::NS_PER_DAY;

#[test]
fn a_reader_in_the_writers_process_shares_its_environments() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + NS_PER_DAY + MIN);
    let mut s = open(dir.path(), &clock);
    s.apply(&[msg(Some(1), "a", T0 + NS_PER_DAY - 10 * MIN, 1.0)])
        .unwrap();
    // heed allows one Env per path per process; the registry hands the reader
    // the writer's, so it sees each commit at once.
    let mut reader = open_read_only(dir.path()).unwrap();
    s.apply(&[
        msg(Some(2), "a", T0 + NS_PER_DAY - 10 * MIN + 1, 2.0),
        msg(Some(3), "b", T0 + NS_PER_DAY, 3.0),
    ])
    .unwrap();
    assert_eq!(all(&reader, "a", 60)[0].agg.count, 2);
    assert!(
        all(&reader, "b", 60).is_empty(),
        "a day created later needs a refresh"
    );
    reader.refresh().unwrap();
    assert_eq!(all(&reader, "b", 60).len(), 1);
    drop(s);
    assert_eq!(
        all(&reader, "*", 60).len(),
        2,
        "the reader keeps the environments open"
    );
    drop(reader);

    // A reader opened first holds the days with MDB_RDONLY: a writer must wait.
    let reader = open_read_only(dir.path()).unwrap();
    let err = Store::open(
        StoreConfig {
            dir: dir.path().to_owned(),
            ..StoreConfig::default()
        },
        Arc::new(clock.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::OpenReadOnly { .. }), "{err}");
    drop(reader);
    assert_eq!(all(&open(dir.path(), &clock), "*", 60).len(), 2);
}

/// The real use: `windrow store` in another process while the worker writes.
/// Re-runs this test binary as the reader (`child_reader`), which opens the
/// store, waits while this process commits enough to grow the file past the
/// child's map (LMDB then answers MDB_MAP_RESIZED), and reads.
#[test]
fn a_reader_in_another_process_sees_committed_data() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let config = StoreConfig {
        dir: dir.path().to_owned(),
        initial_map_bytes: 64 << 10,
        ..StoreConfig::default()
    };
    let mut s = Store::open(config, Arc::new(clock)).unwrap();
    let batch = |from: u64, n: u64| -> Vec<Message> {
        (from..from + n)
            .map(|i| msg(Some(i + 1), &format!("p{i}"), T0 + i as i64, 1.0))
            .collect()
    };
    s.apply(&batch(0, 10)).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::reader_tests::child_reader",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WINDROW_STORE_CHILD_DIR", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    // libtest prints "test … ... " before the child's first line, on the same line.
    let mut next = || {
        lines
            .find_map(|l| l.split_once("child windows: ").map(|(_, n)| n.to_owned()))
            .expect("the child's count")
    };
    assert_eq!(next(), "10");
    let before = std::fs::metadata(dir.path().join("2025-11-25/data.mdb"))
        .unwrap()
        .len();
    s.apply(&batch(10, 30_000)).unwrap();
    let after = std::fs::metadata(dir.path().join("2025-11-25/data.mdb"))
        .unwrap()
        .len();
    assert!(
        after > (before.max(1 << 20)).next_power_of_two(),
        "grew past the child's map: {before} → {after}"
    );
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(next(), "30010");
    assert!(child.wait().unwrap().success());
}

#[test]
fn child_reader() {
    use std::io::BufRead;
    let Some(dir) = std::env::var_os("WINDROW_STORE_CHILD_DIR") else {
        return;
    };
    let reader = open_read_only(Path::new(&dir)).unwrap();
    println!("child windows: {}", all(&reader, "*", 60).len());
    // Wait for the parent's commit, but never forever (the parent then sees EOF).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(std::io::stdin().lock().lines().next()));
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("the parent's go");
    println!("child windows: {}", all(&reader, "*", 60).len());
}

#[test]
fn dump_and_backup_carry_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + NS_PER_DAY + 30 * MIN); // all 60 minutes count: 30 on each day
    let mut s = open(&dir.path().join("data"), &clock);
    let batch: Vec<Message> = (0..60)
        .map(|i| {
            msg(
                Some(i + 1),
                &format!("d{}", i % 5),
                T0 + NS_PER_DAY - 30 * MIN + i as i64 * MIN,
                i as f64,
            )
        })
        .collect();
    s.apply(&batch).unwrap();
    let (windows, latest) = ((all(&s, "*", 1), all(&s, "*", 60)), s.latest("*").unwrap());

    let backup = dir.path().join("backup");
    s.backup(&backup).unwrap();
    let restored = open_read_only(&backup).unwrap();
    assert_eq!(restored.days(), vec!["2025-11-25", "2025-11-26"]);
    assert_eq!(restored.days(), s.days());
    assert_eq!(
        (
            (all(&restored, "*", 1), all(&restored, "*", 60)),
            restored.latest("*").unwrap()
        ),
        (windows.clone(), latest.clone())
    );

    let (mut from_store, mut from_backup) = (Vec::new(), Vec::new());
    let lines = s.dump(&mut from_store).unwrap();
    assert_eq!(restored.dump(&mut from_backup).unwrap(), lines);
    assert_eq!(from_store, from_backup);
    let rows: Vec<serde_json::Value> = from_store
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let stat = s.stat().unwrap();
    assert!(stat
        .iter()
        .all(|d| d.used_bytes <= d.file_bytes && d.page_size >= 4096));
    assert_eq!(stat.iter().map(|d| d.messages_applied).sum::<u64>(), 60);
    let entries = |kind: &str| -> u64 {
        stat.iter()
            .flat_map(|d| &d.databases)
            .filter(|(db, _)| db.starts_with(kind))
            .map(|(_, n)| n)
            .sum()
    };
    // Every window (those of one minute rolled up from the seconds in
    // `recent` as well) once, and each day's latest values.
    assert_eq!(
        (entries("windows"), entries("recent."), entries("latest")),
        (0, 60, 10),
        "only the seconds are written, to recent"
    );
    let window_rows = rows.iter().filter(|r| r["db"] == "windows").count();
    assert_eq!(window_rows, windows.0.len() + windows.1.len());
    assert_eq!(rows.len() as u64, window_rows as u64 + entries("latest"));
    assert_eq!(rows.len() as u64, lines);
    let w = rows
        .iter()
        .find(|r| r["db"] == "windows" && r["resolution_secs"] == 60)
        .unwrap();
    for key in [
        "day",
        "series",
        "field",
        "start_ns",
        "count",
        "sum",
        "min",
        "max",
        "first",
        "first_ts_ns",
        "last",
        "last_ts_ns",
    ] {
        assert!(w.get(key).is_some(), "{key} in {w}");
    }
    let want = &windows.1[0];
    let row = rows
        .iter()
        .find(|r| {
            r["db"] == "windows"
                && r["resolution_secs"] == 60
                && r["series"] == want.series.as_str()
                && r["start_ns"] == want.start_ns
        })
        .unwrap();
    assert_eq!(row["count"], want.agg.count);
}

/// The map size and page size are read under the same guard as
/// transactions: a resize unmaps and maps the file again, and
/// `mdb_env_stat` reads the meta page through the map. Threads asking for
/// them while another resizes the map over and over must neither crash nor
/// see a size that was never set.
#[test]
fn map_and_page_sizes_are_read_safely_while_the_map_is_resized() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + MIN);
    let mut s = open(dir.path(), &clock);
    s.apply(&[msg(Some(1), "a", T0, 1.0)]).unwrap();
    let day = s.days.values().next().unwrap().clone();
    let sizes = [day.map_bytes(), day.map_bytes() * 4];
    let page = day.page_size();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(day.page_size(), page);
                    let map = day.map_bytes();
                    assert!(sizes.contains(&map), "{map}");
                }
            });
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut i = 0;
        while std::time::Instant::now() < until {
            day.resize(sizes[i % 2]).unwrap();
            i += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    drop(day);
    assert_eq!(all(&s, "a", 60)[0].agg.count, 1);
}
