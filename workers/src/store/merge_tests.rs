//! The writer's cursor walk ([`batch`](super::batch)) against a model: any
//! samples, applied in any batches, give the windows and latest values
//! computed here independently. The cases mix keys next to each other with
//! keys farther apart than the walk goes, new keys before, between and after
//! stored ones, and enough keys to split pages.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::tests::{all, msg, open, MIN, T0};
use super::*;
use crate::window::NS_PER_SEC;

/// count, sum, min, max, first time, last time.
type Model = (u64, f64, f64, f64, i64, i64);

/// Series names of different lengths, so that keys of one device are
/// interleaved with others' in key order and pages fill unevenly.
fn series(i: usize) -> String {
    if i.is_multiple_of(3) {
        format!("dev/{i}")
    } else {
        format!("d{}", "x".repeat(i % 7)) + &i.to_string()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn batches_merge_into_the_store_as_into_a_model(
        samples in prop::collection::vec((0usize..80, 0i64..900, -1000i32..1000), 1..2500),
        cuts in prop::collection::vec(1usize..700, 1..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0 + 60 * MIN);
        let mut store = open(dir.path(), &clock);
        // Distinct times (a nanosecond per message), so first/last/latest
        // have no ties to break.
        let messages: Vec<Message> = samples
            .iter()
            .enumerate()
            .map(|(i, &(s, secs, v))| {
                let ts = T0 + 10 * MIN + secs * NS_PER_SEC + i as i64;
                msg(None, &series(s), ts, f64::from(v))
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
            rest = after;
        }

        for res in [1u32, 60] {
            let mut want: BTreeMap<(String, i64), Model> = BTreeMap::new();
            let width = i64::from(res) * NS_PER_SEC;
            for m in &messages {
                let s = &m.samples[0];
                let start = s.ts_ns - s.ts_ns.rem_euclid(width);
                let e = want
                    .entry((s.series.to_string(), start))
                    .or_insert((0, 0.0, f64::MAX, f64::MIN, i64::MAX, i64::MIN));
                e.0 += 1;
                e.1 += s.value;
                e.2 = e.2.min(s.value);
                e.3 = e.3.max(s.value);
                e.4 = e.4.min(s.ts_ns);
                e.5 = e.5.max(s.ts_ns);
            }
            let got: BTreeMap<(String, i64), Model> = all(&store, "*", res)
                .into_iter()
                .map(|w| {
                    let a = w.agg;
                    let model = (a.count, a.sum, a.min, a.max, a.first_ts_ns, a.last_ts_ns);
                    ((w.series, w.start_ns), model)
                })
                .collect();
            prop_assert_eq!(got, want, "windows of {} s", res);
        }

        let mut want: BTreeMap<String, (i64, f64)> = BTreeMap::new();
        for m in &messages {
            let s = &m.samples[0];
            let e = want.entry(s.series.to_string()).or_insert((i64::MIN, 0.0));
            if s.ts_ns > e.0 {
                *e = (s.ts_ns, s.value);
            }
        }
        let got: BTreeMap<String, (i64, f64)> = store
            .latest("*")
            .unwrap()
            .into_iter()
            .map(|l| (l.series, (l.ts_ns, l.value)))
            .collect();
        prop_assert_eq!(got, want, "latest values");
    }
}
