//! Store behaviour on real LMDB files in temporary directories.

use std::path::Path;

use super::*;
use crate::window::{NS_PER_DAY, NS_PER_SEC};

/// 2025-11-25T00:00:00Z.
pub(crate) const T0: i64 = 1_764_028_800 * NS_PER_SEC;
pub(super) const MIN: i64 = 60 * NS_PER_SEC;
const ALL: (i64, i64) = (i64::MIN, i64::MAX);

pub(crate) fn msg(seq: Option<u64>, series: &str, ts_ns: i64, value: f64) -> Message {
    Message {
        stream_seq: seq.map(|s| ("S".into(), s)),
        received_ns: None,
        samples: vec![Sample {
            series: series.into(),
            field: "t".into(),
            ts_ns,
            value,
        }],
    }
}

pub(super) fn open(dir: &Path, clock: &ManualClock) -> Store {
    Store::open(
        StoreConfig {
            dir: dir.to_owned(),
            ..StoreConfig::default()
        },
        Arc::new(clock.clone()),
    )
    .unwrap()
}

pub(super) fn all(s: &StoreReader, pattern: &str, res: u32) -> Vec<WindowRow> {
    s.windows(pattern, None, res, ALL.0, ALL.1).unwrap()
}

#[test]
fn applied_samples_come_back_as_windows_at_every_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut s = open(dir.path(), &clock);
    // Two samples a second for two minutes, plus a second series and field.
    let mut batch: Vec<Message> = (0..240)
        .map(|i| {
            msg(
                Some(i + 1),
                "a/b",
                T0 + 10 * MIN + i as i64 * NS_PER_SEC / 2,
                i as f64,
            )
        })
        .collect();
    batch.push(msg(None, "a/c", T0 + 10 * MIN, 7.0));
    batch.push(Message {
        stream_seq: None,
        received_ns: None,
        samples: vec![Sample {
            series: "a/b".into(),
            field: "rh".into(),
            ts_ns: T0 + 10 * MIN,
            value: 40.0,
        }],
    });
    assert!(s
        .apply(&batch)
        .unwrap()
        .iter()
        .all(|v| *v == Verdict::Applied));

    let secs = s.windows("a/b", Some("t"), 1, ALL.0, ALL.1).unwrap();
    assert_eq!(secs.len(), 120);
    assert!(secs
        .iter()
        .all(|w| w.agg.count == 2 && w.series == "a/b" && w.resolution_secs == 1));
    assert!(secs
        .windows(2)
        .all(|p| p[1].start_ns - p[0].start_ns == NS_PER_SEC));
    let mins = s.windows("a/b", Some("t"), 60, ALL.0, ALL.1).unwrap();
    assert_eq!(
        mins.iter()
            .map(|w| (w.start_ns, w.agg.count))
            .collect::<Vec<_>>(),
        vec![(T0 + 10 * MIN, 120), (T0 + 11 * MIN, 120)]
    );
    let a = mins[1].agg;
    assert_eq!(
        (a.first, a.last, a.min, a.max, a.sum),
        (120.0, 239.0, 120.0, 239.0, (120..240).sum::<i32>() as f64)
    );

    assert_eq!(
        all(&s, "a/b", 60).len(),
        3,
        "both fields of the exact series"
    );
    assert_eq!(all(&s, "a/*", 60).len(), 4, "prefix");
    assert_eq!(all(&s, "*", 60).len(), 4);
    assert!(
        all(&s, "a", 60).is_empty(),
        "an exact series is not a prefix"
    );
    let ranged = s
        .windows("a/*", Some("t"), 60, T0 + 11 * MIN, T0 + 12 * MIN)
        .unwrap();
    assert_eq!(
        ranged.iter().map(|w| w.series.as_str()).collect::<Vec<_>>(),
        vec!["a/b"]
    );
    assert_eq!(
        s.windows(
            "a/b",
            Some("t"),
            1,
            T0 + 10 * MIN,
            T0 + 10 * MIN + 5 * NS_PER_SEC
        )
        .unwrap()
        .len(),
        5
    );

    let latest = s.latest("a/*").unwrap();
    let got: Vec<_> = latest
        .iter()
        .map(|l| (l.series.as_str(), l.field.as_str(), l.value))
        .collect();
    assert_eq!(
        got,
        vec![("a/b", "rh", 40.0), ("a/b", "t", 239.0), ("a/c", "t", 7.0)]
    );
    assert!(matches!(
        s.windows("a\0", None, 60, 0, 1),
        Err(StoreError::InvalidKey { .. })
    ));
}

#[test]
fn applying_the_same_messages_twice_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut s = open(dir.path(), &clock);
    // Sequences straddling a 65,536 chunk boundary.
    let batch: Vec<Message> = (0..100)
        .map(|i| {
            msg(
                Some(65_500 + i),
                &format!("x{}", i % 3),
                T0 + i as i64 * NS_PER_SEC,
                1.0,
            )
        })
        .collect();
    assert!(s
        .apply(&batch)
        .unwrap()
        .iter()
        .all(|v| *v == Verdict::Applied));
    let (windows, latest) = (all(&s, "*", 1), s.latest("*").unwrap());
    assert!(s
        .apply(&batch)
        .unwrap()
        .iter()
        .all(|v| *v == Verdict::Duplicate));
    assert_eq!(
        (all(&s, "*", 1), s.latest("*").unwrap()),
        (windows.clone(), latest)
    );
    assert_eq!(s.applied_count("S").unwrap(), 100);

    let fresh = vec![
        msg(Some(7), "y", T0, 1.0),
        msg(Some(7), "y", T0, 1.0),
        batch[0].clone(),
        msg(Some(8), "y", T0, 2.0),
    ];
    let want = vec![
        Verdict::Applied,
        Verdict::Duplicate,
        Verdict::Duplicate,
        Verdict::Applied,
    ];
    assert_eq!(
        s.apply(&fresh).unwrap(),
        want,
        "duplicates within a batch and of earlier batches"
    );
    assert_eq!(
        s.windows("y", None, 60, ALL.0, ALL.1).unwrap()[0].agg.count,
        2
    );
    assert_eq!(s.applied_count("S").unwrap(), 102);
    assert_eq!(s.applied_count("other").unwrap(), 0);
    assert_eq!(s.stat().unwrap()[0].messages_applied, 102);

    // Core NATS messages have no sequence: each one counts.
    assert_eq!(
        s.apply(&[msg(None, "z", T0, 1.0), msg(None, "z", T0, 1.0)])
            .unwrap(),
        vec![Verdict::Applied; 2]
    );
    assert_eq!(all(&s, "z", 60)[0].agg.count, 2);
}

#[test]
fn late_early_and_invalid_messages_follow_the_clock_and_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let now = T0 + 10 * 60 * MIN;
    let clock = ManualClock::new(now);
    let mut s = open(dir.path(), &clock);
    let named = |series: &str, field: &str, value: f64| Message {
        stream_seq: None,
        received_ns: None,
        samples: vec![Sample {
            series: series.into(),
            field: field.into(),
            ts_ns: now,
            value,
        }],
    };
    let verdicts = s
        .apply(&[
            msg(Some(1), "a", now - 30 * MIN, 1.0),
            msg(None, "a", now - 61 * MIN, 1.0),
            msg(None, "a", now + 6 * MIN, 1.0),
            Message {
                stream_seq: None,
                received_ns: None,
                samples: vec![],
            },
            named("a\0b", "t", 1.0),
            named("a", "t\0", 1.0),
            named(&"x".repeat(500), "t", 1.0),
            named("a", "t", f64::NAN),
            Message {
                stream_seq: Some(("S\0".into(), 1)),
                received_ns: None,
                samples: vec![named("a", "t", 1.0).samples[0].clone()],
            },
        ])
        .unwrap();
    use Verdict::*;
    assert_eq!(
        verdicts,
        vec![Applied, TooLate, TooEarly, Invalid, Invalid, Invalid, Invalid, Invalid, Invalid]
    );

    // A late sample within the lateness merges into its older window.
    assert_eq!(
        s.apply(&[msg(Some(2), "a", now - 30 * MIN + 1, 5.0)])
            .unwrap(),
        vec![Applied]
    );
    let w = s.windows("a", None, 60, ALL.0, ALL.1).unwrap();
    assert_eq!(
        (w.len(), w[0].agg.count, w[0].agg.max, w[0].agg.last),
        (1, 2, 5.0, 5.0)
    );
    assert_eq!(s.latest("a").unwrap()[0].value, 5.0);

    // Redelivered after it became too late: still a duplicate (acked, not dead-lettered).
    clock.advance(45 * MIN);
    assert_eq!(
        s.apply(&[
            msg(Some(1), "a", now - 30 * MIN, 1.0),
            msg(Some(3), "a", now - 30 * MIN, 1.0)
        ])
        .unwrap(),
        vec![Duplicate, TooLate]
    );
    assert_eq!(
        s.windows("a", None, 60, ALL.0, ALL.1).unwrap()[0].agg.count,
        2
    );
}

#[test]
fn days_rotate_and_days_beyond_retention_are_deleted_whole() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + NS_PER_DAY + MIN);
    let mut s = open(dir.path(), &clock);
    let midnight = T0 + NS_PER_DAY;
    s.apply(&[
        msg(Some(1), "a", midnight - NS_PER_SEC, 1.0),
        msg(Some(2), "a", midnight, 2.0),
    ])
    .unwrap();
    assert_eq!(s.days(), vec!["2025-11-25", "2025-11-26"]);
    assert!(
        dir.path().join("2025-11-25/data.mdb").is_file()
            && dir.path().join("2025-11-26/data.mdb").is_file()
    );
    assert_eq!(
        all(&s, "a", 60)
            .iter()
            .map(|w| w.start_ns)
            .collect::<Vec<_>>(),
        vec![midnight - MIN, midnight]
    );
    assert_eq!(
        s.latest("a").unwrap()[0].value,
        2.0,
        "the newest across days"
    );
    assert_eq!(
        s.windows("a", None, 60, midnight, ALL.1).unwrap().len(),
        1,
        "a later range skips the earlier day"
    );
    std::fs::create_dir(dir.path().join("not-a-day")).unwrap();

    // Retention 7: on 2025-12-02 the oldest kept day is 2025-11-25.
    clock.advance(6 * NS_PER_DAY);
    assert!(s.enforce_retention().unwrap().is_empty());
    std::fs::create_dir(dir.path().join("2025-11-24")).unwrap(); // a day that never got a file
    clock.advance(NS_PER_DAY);
    assert_eq!(
        s.enforce_retention().unwrap(),
        vec!["2025-11-24", "2025-11-25"]
    );
    assert!(!dir.path().join("2025-11-25").exists() && dir.path().join("not-a-day").exists());
    assert_eq!(s.days(), vec!["2025-11-26"]);
    assert_eq!(all(&s, "a", 60).len(), 1);
    assert_eq!(s.applied_count("S").unwrap(), 1);
    drop(s);
    assert_eq!(
        open(dir.path(), &clock).days(),
        vec!["2025-11-26"],
        "a reopened store finds the kept days"
    );
}

#[test]
fn invalid_settings_are_refused_before_anything_opens() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        dir: dir.path().join("never"),
        resolutions_secs: vec![0],
        ..StoreConfig::default()
    };
    let err = Store::open(config, Arc::new(ManualClock::new(T0))).unwrap_err();
    assert!(err.to_string().contains("store.resolutions_secs"), "{err}");
    assert!(!err.is_retryable() && !dir.path().join("never").exists());
}

#[test]
fn a_full_map_grows_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let config = StoreConfig {
        dir: dir.path().join("grow"),
        initial_map_bytes: 64 << 10,
        ..StoreConfig::default()
    };
    let mut s = Store::open(config.clone(), Arc::new(clock.clone())).unwrap();
    let batch = |k: u64| -> Vec<Message> {
        (0..5_000)
            .map(|i| {
                msg(
                    Some(k * 5_000 + i + 1),
                    &format!("series-{i:05}"),
                    T0 + (k as i64 * 5_000 + i as i64) * NS_PER_SEC / 10,
                    1.0,
                )
            })
            .collect()
    };
    for k in 0..3 {
        assert!(s
            .apply(&batch(k))
            .unwrap()
            .iter()
            .all(|v| *v == Verdict::Applied));
    }
    let stat = &s.stat().unwrap()[0];
    assert!(
        stat.map_bytes >= 64 << 10 << 4,
        "grew several times: {stat:?}"
    );
    assert_eq!(all(&s, "*", 1).len(), 15_000);
    assert_eq!(
        all(&s, "*", 60).iter().map(|w| w.agg.count).sum::<u64>(),
        15_000
    );
    assert_eq!(s.applied_count("S").unwrap(), 15_000);
    let grown = stat.map_bytes;
    s.close();
    let s = Store::open(config, Arc::new(clock.clone())).unwrap();
    assert!(
        s.stat().unwrap()[0].map_bytes > 64 << 10 && grown > 64 << 10,
        "a grown day reopens grown"
    );

    let small = StoreConfig {
        dir: dir.path().join("small"),
        initial_map_bytes: 64 << 10,
        max_map_bytes: 128 << 10,
        ..StoreConfig::default()
    };
    let mut small = Store::open(small, Arc::new(clock)).unwrap();
    let err = small.apply(&batch(0)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::MapFull {
                map_bytes: 131_072,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(
        small.applied_count("S").unwrap(),
        0,
        "nothing of the failed day was committed"
    );
}
