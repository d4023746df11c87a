//! Coarser windows derived from the finest instead of written by every batch.
//!
//! A batch used to write each sample's window at every resolution to
//! `recent`. At the default 1 s and 1 min, the minute windows were about a
//! third of the writer's work (one more key per sample to sort, encode and
//! put), although a minute window is nothing but the merge of its sixty
//! one-second windows. Now a day records, when it is created, which
//! resolutions are *rolled up* from the finest one (each coarser resolution
//! that is a multiple of it). Batches write only the finest of those; a
//! compaction merges every fine window into its coarse window too, in
//! the run it writes; a read of a coarse resolution takes what `recent` still holds
//! of the finest and rolls it up as it reads. The answers are the same as
//! with every resolution written (tested against a model, through
//! compactions at any point).
//!
//! The rule is the day's, fixed when the day is created (`meta` `rollups`),
//! not the running configuration's: a day written before (format version 1
//! or 2) has every resolution written and no rule, and keeps it so; and a
//! worker restarted with other resolutions writes a coarse resolution
//! directly whenever the fine one it would be rolled up from is no longer
//! written. Either way every sample reaches a coarse window once: written
//! directly, or rolled up from a fine window, never both.

use crate::window::{window_start, NS_PER_SEC};

/// A coarse resolution rolled up from a fine one (seconds; `coarse` is a
/// multiple of `fine`, so each fine window lies in exactly one coarse one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rollup {
    pub coarse: u32,
    pub fine: u32,
}

/// `meta` key of a day's rollups ([`encode`]); absent in days before them.
pub(super) const META_KEY: &[u8] = b"rollups";

/// The rollups of a new day written with `resolutions`: every resolution
/// that is a multiple of the finest is rolled up from it.
pub(super) fn plan(resolutions: &[u32]) -> Vec<Rollup> {
    let Some(&fine) = resolutions.iter().min() else {
        return Vec::new();
    };
    let mut out: Vec<Rollup> = resolutions
        .iter()
        .filter(|&&r| fine > 0 && r != fine && r.is_multiple_of(fine))
        .map(|&coarse| Rollup { coarse, fine })
        .collect();
    out.sort_by_key(|r| r.coarse);
    out
}

/// The resolutions a batch writes to a day with `rollups` when the worker is
/// configured with `resolutions`: all of them, except a coarse one whose
/// fine one is written (its windows come from the fine ones).
pub(super) fn written(resolutions: &[u32], rollups: &[Rollup]) -> Vec<u32> {
    resolutions
        .iter()
        .copied()
        .filter(|&r| {
            !rollups
                .iter()
                .any(|u| u.coarse == r && resolutions.contains(&u.fine))
        })
        .collect()
}

/// `coarse:fine` pairs separated by commas (`60:1,3600:1`), readable with
/// LMDB's own tools; empty for none.
pub(super) fn encode(rollups: &[Rollup]) -> Vec<u8> {
    rollups
        .iter()
        .map(|r| format!("{}:{}", r.coarse, r.fine))
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

/// Inverse of [`encode`]; `None` if `bytes` is not its output for rollups
/// [`plan`] can make: one fine resolution, each coarse one a multiple of it
/// and named once, in order (two rules for one coarse resolution would count
/// its samples twice, and a chain would miss those of a coarse resolution
/// that is itself rolled up and so never written).
pub(super) fn decode(bytes: &[u8]) -> Option<Vec<Rollup>> {
    let text = std::str::from_utf8(bytes).ok()?;
    if text.is_empty() {
        return Some(Vec::new());
    }
    let rollups = text
        .split(',')
        .map(|pair| {
            let (coarse, fine) = pair.split_once(':')?;
            let r = Rollup {
                coarse: coarse.parse().ok()?,
                fine: fine.parse().ok()?,
            };
            (r.fine > 0 && r.coarse > r.fine && r.coarse.is_multiple_of(r.fine)).then_some(r)
        })
        .collect::<Option<Vec<_>>>()?;
    let fine = rollups.first()?.fine;
    let planned = rollups.iter().all(|r| r.fine == fine)
        && rollups.windows(2).all(|w| w[0].coarse < w[1].coarse);
    planned.then_some(rollups)
}

/// The start of the coarse window of `r` that the window of resolution
/// `res` starting at `start_ns` lies in; `None` if `res` is not `r.fine`.
pub(super) fn roll_up(r: Rollup, res: u32, start_ns: i64) -> Option<i64> {
    (res == r.fine).then(|| window_start(start_ns, i64::from(r.coarse) * NS_PER_SEC))
}

/// The starts of the fine windows that roll up into the coarse windows
/// starting in `[from_ns, to_ns)`: the same half-open range, each end moved
/// up to a coarse window's start (saturating at the ends of time).
pub(super) fn fine_range(r: Rollup, from_ns: i64, to_ns: i64) -> (i64, i64) {
    let step = i64::from(r.coarse) * NS_PER_SEC;
    let up = |t: i64| t.saturating_add((step - t.rem_euclid(step)) % step);
    (up(from_ns), up(to_ns))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::store::codec::WindowKey;

    const R: Rollup = Rollup {
        coarse: 60,
        fine: 1,
    };

    #[test]
    fn plans_roll_up_multiples_of_the_finest() {
        let r = |coarse, fine| Rollup { coarse, fine };
        assert_eq!(plan(&[1, 60]), vec![r(60, 1)]);
        assert_eq!(plan(&[3600, 10, 60, 25]), vec![r(60, 10), r(3600, 10)]);
        assert_eq!(plan(&[60]), vec![]);
        assert_eq!(plan(&[]), vec![]);
        // A restart without the fine resolution writes the coarse one.
        assert_eq!(written(&[1, 60], &[R]), vec![1]);
        assert_eq!(written(&[60], &[R]), vec![60]);
        assert_eq!(written(&[1, 60, 3600], &[R]), vec![1, 3600]);
        assert_eq!(written(&[1, 60], &[]), vec![1, 60]);
        for rollups in [vec![], vec![R], plan(&[3600, 10, 60, 25])] {
            assert_eq!(decode(&encode(&rollups)), Some(rollups));
        }
        assert_eq!(encode(&[R, r(3600, 1)]), b"60:1,3600:1");
        for bad in [
            "60",
            "60:",
            "1:60",
            "60:0",
            "61:2",
            "60:1,",
            "x:1",
            "60:1,60:1",
            "3600:1,60:1",
            "60:1,3600:60",
            "60:1,120:2",
        ] {
            assert_eq!(decode(bad.as_bytes()), None, "{bad}");
        }
    }

    proptest! {
        /// A rolled-up window is the coarse window, and the fine range
        /// selects exactly the fine windows whose coarse window starts in
        /// the queried range.
        #[test]
        fn fine_windows_roll_up_into_their_coarse_window(
            start in -10_000_000i64..10_000_000,
            from in -10_000_000i64..10_000_000,
            len in 0i64..10_000_000,
        ) {
            let ns = |s: i64| s * NS_PER_SEC;
            let coarse_start = roll_up(R, 1, ns(start));
            prop_assert_eq!(coarse_start, Some(ns(start.div_euclid(60) * 60)));
            let coarse = WindowKey {
                series: "dev/1".into(),
                field: "t".into(),
                resolution_secs: R.coarse,
                start_ns: coarse_start.unwrap(),
            };
            // Not a window of the fine resolution: not rolled up.
            prop_assert_eq!(roll_up(R, 10, ns(start)), None);

            let (from, to) = (ns(from) + 1, ns(from + len));
            let (lo, hi) = fine_range(R, from, to);
            let wanted = (from..to).contains(&coarse.start_ns);
            prop_assert_eq!((lo..hi).contains(&ns(start)), wanted);
        }
    }

    #[test]
    fn fine_ranges_saturate_at_the_ends_of_time() {
        assert_eq!(fine_range(R, i64::MIN, i64::MAX).1, i64::MAX);
        let (lo, _) = fine_range(R, i64::MIN, 0);
        assert!(lo > i64::MIN && lo % (60 * NS_PER_SEC) == 0);
        assert_eq!(fine_range(R, 0, 60 * NS_PER_SEC), (0, 60 * NS_PER_SEC));
    }
}
