//! The writer's cursor walk ([`batch`](super::batch)) against a model: any
//! samples, applied in any batches, give the windows and latest values
//! computed here independently. The cases mix keys next to each other with
//! keys farther apart than the walk goes, new keys before, between and after
//! stored ones, and enough keys to split pages. Series and field names that
//! are prefixes of others, and messages with two fields, check that the
//! writer's order is the keys' byte order across fields as well as series.
//! Compactions after some batches (as the writer thread runs them) leave
//! windows split between runs of several levels, merges of runs in
//! progress and `recent`, which reads must merge.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::tests::{all, msg, open, MIN, T0};
use super::*;
use crate::window::NS_PER_SEC;

/// count, sum, min, max, (first time, value), (last time, value).
type Model = (u64, f64, f64, f64, (i64, f64), (i64, f64));

/// Field names, some prefixes of others.
const FIELDS: [&str; 3] = ["t", "te", "temp"];

/// Series names of different lengths (some prefixes of others, e.g. `dev/3`
/// and `dev/30`), so that keys of one device are interleaved with others' in
/// key order and pages fill unevenly; some longer than 16 bytes and alike in
/// their first 16, which the writer's sort cannot order by its integer
/// prefixes alone.
fn series(i: usize) -> String {
    if i.is_multiple_of(3) {
        format!("dev/{i}")
    } else if i % 3 == 1 && i % 2 == 1 {
        format!("site-01/line-02/{i}")
    } else {
        format!("d{}", "x".repeat(i % 7)) + &i.to_string()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn batches_merge_into_the_store_as_into_a_model(
        samples in prop::collection::vec(
            (0usize..80, 0usize..FIELDS.len(), 0i64..900, -1000i32..1000),
            1..2500,
        ),
        cuts in prop::collection::vec(1usize..700, 1..8),
        // Small ones in half the cases: many compactions, runs of several levels.
        recent_max in prop_oneof![1u64..200, 1u64..4000],
        slice in 1u64..3000,
        resolutions in prop_oneof![
            Just(vec![1u32, 60]),
            // Two rollups; a fine resolution other than a second; one that
            // is not a multiple of the finest (written directly); none.
            Just(vec![3600, 1, 60]),
            Just(vec![10, 60]),
            Just(vec![2, 60, 25]),
            Just(vec![60]),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0 + 60 * MIN);
        let config = StoreConfig {
            dir: dir.path().to_owned(),
            recent_max_windows: recent_max,
            compaction_slice_windows: slice,
            resolutions_secs: resolutions.clone(),
            ..StoreConfig::default()
        };
        let mut store = Store::open(config, std::sync::Arc::new(clock.clone())).unwrap();
        // Every two runs of a level merge: several levels and merges in
        // slices beside the compactions.
        store.fan_in = 2;
        // Distinct times (a nanosecond per message), so first/last/latest
        // have no ties to break. Every fourth message carries a second
        // field of the same series (its value negated).
        let messages: Vec<Message> = samples
            .iter()
            .enumerate()
            .map(|(i, &(s, f, secs, v))| {
                let ts = T0 + 10 * MIN + secs * NS_PER_SEC + i as i64;
                let mut m = msg(None, &series(s), ts, f64::from(v));
                m.samples[0].field = FIELDS[f].into();
                if i % 4 == 0 {
                    let mut other = m.samples[0].clone();
                    other.field = FIELDS[(f + 1) % FIELDS.len()].into();
                    other.value = -other.value;
                    m.samples.push(other);
                }
                m
            })
            .collect();
        let mut rest = &messages[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (batch, after) = rest.split_at((*cut).min(rest.len()));
            let verdicts = store.apply(batch).unwrap();
            prop_assert!(verdicts.iter().all(|v| *v == Verdict::Applied));
            store.compact_due().unwrap();
            rest = after;
        }

        // As the batches left the store, and then with every compaction
        // and every merge of runs that it makes due done.
        for (round, res) in [0, 1].into_iter().flat_map(|r| resolutions.iter().map(move |s| (r, *s))) {
            if round == 1 && res == resolutions[0] {
                store.compact_all().unwrap();
            }
            let mut want: BTreeMap<(String, String, i64), Model> = BTreeMap::new();
            let width = i64::from(res) * NS_PER_SEC;
            for s in messages.iter().flat_map(|m| &m.samples) {
                let start = s.ts_ns - s.ts_ns.rem_euclid(width);
                let e = want
                    .entry((s.series.to_string(), s.field.to_string(), start))
                    .or_insert((0, 0.0, f64::MAX, f64::MIN, (i64::MAX, 0.0), (i64::MIN, 0.0)));
                e.0 += 1;
                e.1 += s.value;
                e.2 = e.2.min(s.value);
                e.3 = e.3.max(s.value);
                if s.ts_ns < e.4 .0 {
                    e.4 = (s.ts_ns, s.value);
                }
                if s.ts_ns > e.5 .0 {
                    e.5 = (s.ts_ns, s.value);
                }
            }
            let model = |rows: Vec<WindowRow>| -> BTreeMap<(String, String, i64), Model> {
                rows.into_iter()
                    .map(|w| {
                        let a = w.agg;
                        let first = (a.first_ts_ns, a.first);
                        let model = (a.count, a.sum, a.min, a.max, first, (a.last_ts_ns, a.last));
                        ((w.series, w.field, w.start_ns), model)
                    })
                    .collect()
            };
            // A range whose ends are not window starts: minutes rolled up
            // from seconds must be selected by their own start too.
            let (from, to) = (T0 + 10 * MIN + 150 * NS_PER_SEC + 7, T0 + 10 * MIN + 610 * NS_PER_SEC);
            let part = model(store.windows("*", None, res, from, to).unwrap());
            let mut want_part = want.clone();
            want_part.retain(|(_, _, start), _| (from..to).contains(start));
            prop_assert_eq!(part, want_part.clone(), "windows of {} s in a range, round {}", res, round);
            // One series and field: `windows` is read as a key range.
            let one = model(store.windows(&series(3), Some("t"), res, from, to).unwrap());
            want_part.retain(|(s, f, _), _| *s == series(3) && f == "t");
            prop_assert_eq!(one, want_part, "one series' windows of {} s in a range", res);
            prop_assert_eq!(model(all(&store, "*", res)), want, "windows of {} s, round {}", res, round);
        }

        let mut want: BTreeMap<(String, String), (i64, f64)> = BTreeMap::new();
        for s in messages.iter().flat_map(|m| &m.samples) {
            let key = (s.series.to_string(), s.field.to_string());
            let e = want.entry(key).or_insert((i64::MIN, 0.0));
            if s.ts_ns > e.0 {
                *e = (s.ts_ns, s.value);
            }
        }
        let got: BTreeMap<(String, String), (i64, f64)> = store
            .latest("*")
            .unwrap()
            .into_iter()
            .map(|l| ((l.series, l.field), (l.ts_ns, l.value)))
            .collect();
        prop_assert_eq!(got, want, "latest values");
    }
}

/// The walk's edges, which random cases reach without saying so: a key
/// exactly [`WALK`](super::batch) entries on (found by walking), one more
/// (a fresh cursor), and new keys inserted one after the other at the very
/// end of the database.
#[test]
fn keys_at_the_walks_reach_just_beyond_it_and_at_the_end_merge_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 60 * MIN);
    let mut store = open(dir.path(), &clock);
    let at = |sec: i64| T0 + 10 * MIN + sec * NS_PER_SEC;
    // 40 one-second windows of "a": entries 0..39 of the windows database,
    // then its minute window.
    let first: Vec<Message> = (0..40).map(|s| msg(None, "a", at(s), 1.0)).collect();
    store.apply(&first).unwrap();
    // From window 0, window 16 is 16 steps on and window 33 is 17 steps on
    // from there; "zz" sorts after everything, so its windows and latest
    // value are inserted at the end, one after the other.
    let second = vec![
        msg(None, "a", at(0) + 1, 10.0),
        msg(None, "a", at(16) + 1, 20.0),
        msg(None, "a", at(33) + 1, 30.0),
        msg(None, "zz", at(1), 5.0),
        msg(None, "zz", at(2), 6.0),
    ];
    store.apply(&second).unwrap();
    let seconds = all(&store, "a", 1);
    assert_eq!(seconds.len(), 40);
    for w in &seconds {
        let sec = (w.start_ns - at(0)) / NS_PER_SEC;
        let (count, sum) = match sec {
            0 => (2, 11.0),
            16 => (2, 21.0),
            33 => (2, 31.0),
            _ => (1, 1.0),
        };
        assert_eq!((w.agg.count, w.agg.sum), (count, sum), "window at {sec} s");
    }
    let minute = all(&store, "a", 60);
    assert_eq!(
        (minute.len(), minute[0].agg.count, minute[0].agg.sum),
        (1, 43, 100.0)
    );
    let zz: Vec<(u64, f64)> = all(&store, "zz", 1)
        .iter()
        .map(|w| (w.agg.count, w.agg.sum))
        .collect();
    assert_eq!(zz, vec![(1, 5.0), (1, 6.0)]);
    let latest: Vec<(String, f64)> = store
        .latest("*")
        .unwrap()
        .into_iter()
        .map(|l| (l.series, l.value))
        .collect();
    assert_eq!(latest, vec![("a".to_owned(), 1.0), ("zz".to_owned(), 6.0)]);
}
