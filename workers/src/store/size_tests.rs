//! The store's size per million messages, for the README (printed, not asserted).
//!
//! `cargo test -p windrow-workers --lib store::size_tests -- --nocapture`

use super::{
    tests::{msg, open, T0},
    ManualClock, Message, Verdict,
};
use crate::window::NS_PER_SEC;

/// 10,000 series × 100 messages (one a second each), one field, resolutions
/// 1 s and 60 s, sequential JetStream sequences, committed 10,000 messages a
/// transaction (a second of traffic).
#[test]
fn store_size_per_million_messages() {
    const SERIES: u64 = 10_000;
    const ROUNDS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 3_600 * NS_PER_SEC);
    let mut s = open(dir.path(), &clock);
    let started = std::time::Instant::now();
    for round in 0..ROUNDS {
        let batch: Vec<Message> = (0..SERIES)
            .map(|d| {
                let ts = T0 + 600 * NS_PER_SEC + round as i64 * NS_PER_SEC + d as i64 * 1_000;
                msg(
                    Some(round * SERIES + d + 1),
                    &format!("site-{}/dev-{d:05}", d % 100),
                    ts,
                    20.0 + (round % 7) as f64,
                )
            })
            .collect();
        assert!(s
            .apply(&batch)
            .unwrap()
            .iter()
            .all(|v| *v == Verdict::Applied));
    }
    let elapsed = started.elapsed();
    let messages = SERIES * ROUNDS;
    assert_eq!(s.applied_count("S").unwrap(), messages);
    let per_million = |b: u64| b * 1_000_000 / messages;
    // As the batches left it (every window in `recent`), then compacted into
    // `windows` (where a day's windows end up).
    for state in ["windows in recent", "after compaction"] {
        if state == "after compaction" {
            s.compact_all().unwrap();
        }
        let stat = s.stat().unwrap();
        let day = &stat[0];
        let backup = dir.path().join(format!("backup {state}"));
        s.backup(&backup).unwrap();
        let copied = std::fs::metadata(backup.join(&day.day).join("data.mdb"))
            .unwrap()
            .len();
        eprintln!(
            "store size per 1,000,000 messages, {state} ({SERIES} series × {ROUNDS} at 1 Hz, 1 field, \
             resolutions 1 s + 60 s, sequential seqs, {SERIES} messages a commit): data.mdb {} bytes \
             ({:.1} MiB), B-tree pages {} bytes, compacted backup {} bytes ({:.1} MiB); {:?}; page {} B, \
             map {} B; applied in {:.1} s in this (debug) build",
            per_million(day.file_bytes),
            per_million(day.file_bytes) as f64 / f64::from(1 << 20),
            per_million(day.used_bytes),
            per_million(copied),
            per_million(copied) as f64 / f64::from(1 << 20),
            day.databases,
            day.page_size,
            day.map_bytes,
            elapsed.as_secs_f64(),
        );
    }
}
