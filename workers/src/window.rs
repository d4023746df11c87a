//! Window maths: tumbling windows and their mergeable aggregates.
//!
//! Pure and deterministic. An [`Aggregate`] is a commutative monoid under
//! [`Aggregate::merge`] (first/last by timestamp, ties broken by value so the
//! result does not depend on arrival order), which is what lets late samples,
//! several workers' partials and a replay all combine into the same answer.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// One numeric sample of one series and value field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Series key (e.g. `site-1/d42`); inline up to 24 bytes.
    pub series: CompactString,
    /// Value field name (e.g. `temp`; `value` for plain numeric payloads).
    pub field: CompactString,
    /// Sample time, Unix nanoseconds.
    pub ts_ns: i64,
    /// The value.
    pub value: f64,
}

/// count/sum/min/max/first/last of the samples in one window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Number of samples.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Time of the earliest sample (Unix ns).
    pub first_ts_ns: i64,
    /// Value of the earliest sample.
    pub first: f64,
    /// Time of the latest sample (Unix ns).
    pub last_ts_ns: i64,
    /// Value of the latest sample.
    pub last: f64,
}

/// Encoded size of an [`Aggregate`] in bytes.
pub const AGGREGATE_BYTES: usize = 64;

/// Encoded size of an aggregate of one sample in its short form
/// ([`Aggregate::encode`]): the sample's time and value.
pub const ONE_SAMPLE_BYTES: usize = 16;

/// An encoded [`Aggregate`]: 64 bytes, or 16 for one sample in the short
/// form. Its bytes are `as_ref()`.
#[derive(Debug, Clone, Copy)]
pub struct Encoded {
    bytes: [u8; AGGREGATE_BYTES],
    len: usize,
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Aggregate {
    /// The aggregate of one sample.
    pub fn of(ts_ns: i64, value: f64) -> Self {
        Self {
            count: 1,
            sum: value,
            min: value,
            max: value,
            first_ts_ns: ts_ns,
            first: value,
            last_ts_ns: ts_ns,
            last: value,
        }
    }

    /// Folds `other` into `self`.
    pub fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if (other.first_ts_ns, other.first.to_bits()) < (self.first_ts_ns, self.first.to_bits()) {
            self.first_ts_ns = other.first_ts_ns;
            self.first = other.first;
        }
        if (other.last_ts_ns, other.last.to_bits()) > (self.last_ts_ns, self.last.to_bits()) {
            self.last_ts_ns = other.last_ts_ns;
            self.last = other.last;
        }
    }

    /// Mean of the values.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }

    /// The 64-byte little-endian form of [`Aggregate::encode`].
    pub fn to_bytes(&self) -> [u8; AGGREGATE_BYTES] {
        let mut b = [0u8; AGGREGATE_BYTES];
        b[0..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..16].copy_from_slice(&self.sum.to_le_bytes());
        b[16..24].copy_from_slice(&self.min.to_le_bytes());
        b[24..32].copy_from_slice(&self.max.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_ts_ns.to_le_bytes());
        b[40..48].copy_from_slice(&self.first.to_le_bytes());
        b[48..56].copy_from_slice(&self.last_ts_ns.to_le_bytes());
        b[56..64].copy_from_slice(&self.last.to_le_bytes());
        b
    }

    /// The encoding a day stores: with `short`, an aggregate of exactly one
    /// sample (what [`Aggregate::of`] makes) is its time and value, 16 bytes
    /// (little-endian); anything else is [`Aggregate::to_bytes`].
    ///
    /// Why: at one reading per second and series, nearly every 1 s window
    /// holds one sample, and the 64-byte form made its values two thirds of
    /// the store. The short form is exact: it is used only when the other
    /// six fields are bit for bit what the time and value give back.
    pub fn encode(&self, short: bool) -> Encoded {
        let mut bytes = [0u8; AGGREGATE_BYTES];
        if short && self.is_one_sample() {
            bytes[0..8].copy_from_slice(&self.first_ts_ns.to_le_bytes());
            bytes[8..16].copy_from_slice(&self.first.to_le_bytes());
            return Encoded {
                bytes,
                len: ONE_SAMPLE_BYTES,
            };
        }
        Encoded {
            bytes: self.to_bytes(),
            len: AGGREGATE_BYTES,
        }
    }

    /// Whether this is exactly `Aggregate::of(first_ts_ns, first)`.
    fn is_one_sample(&self) -> bool {
        let bits = self.first.to_bits();
        self.count == 1
            && self.last_ts_ns == self.first_ts_ns
            && [self.sum, self.min, self.max, self.last]
                .iter()
                .all(|v| v.to_bits() == bits)
    }

    /// Decodes either form of [`Aggregate::encode`]; `None` if the length
    /// is neither.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        if b.len() == ONE_SAMPLE_BYTES {
            return Some(Self::of(u(0) as i64, f64::from_bits(u(8))));
        }
        if b.len() != AGGREGATE_BYTES {
            return None;
        }
        Some(Self {
            count: u(0),
            sum: f64::from_bits(u(8)),
            min: f64::from_bits(u(16)),
            max: f64::from_bits(u(24)),
            first_ts_ns: u(32) as i64,
            first: f64::from_bits(u(40)),
            last_ts_ns: u(48) as i64,
            last: f64::from_bits(u(56)),
        })
    }
}

/// Start (Unix ns) of the tumbling window of `resolution_ns` holding `ts_ns`.
pub fn window_start(ts_ns: i64, resolution_ns: i64) -> i64 {
    ts_ns.div_euclid(resolution_ns) * resolution_ns
}

/// Nanoseconds per second.
pub const NS_PER_SEC: i64 = 1_000_000_000;
/// Nanoseconds per UTC day.
pub const NS_PER_DAY: i64 = 86_400 * NS_PER_SEC;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn windows_are_tumbling_and_floor_negative_times() {
        assert_eq!(window_start(1_500_000_000, NS_PER_SEC), NS_PER_SEC);
        assert_eq!(window_start(-1, NS_PER_SEC), -NS_PER_SEC);
        assert_eq!(
            window_start(61 * NS_PER_SEC, 60 * NS_PER_SEC),
            60 * NS_PER_SEC
        );
    }

    #[test]
    fn bytes_round_trip() {
        let mut a = Aggregate::of(5, 1.5);
        a.merge(&Aggregate::of(-3, -2.0));
        assert_eq!(Aggregate::from_bytes(&a.to_bytes()), Some(a));
        assert_eq!(Aggregate::from_bytes(&[0; 3]), None);
        assert_eq!(Aggregate::from_bytes(&[0; 17]), None);
    }

    /// The short form is taken for one sample only, and gives back every
    /// field bit for bit (signed zeros and NaN payloads included); the long
    /// form is kept for days that must not get the short one.
    #[test]
    fn one_sample_encodes_short_and_exactly() {
        for (ts, v) in [
            (5, 1.5),
            (-7, -0.0),
            (0, 0.0),
            (i64::MAX, f64::from_bits(0x7ff8_dead_beef_0001)),
        ] {
            let one = Aggregate::of(ts, v);
            let short = one.encode(true);
            assert_eq!(short.as_ref().len(), ONE_SAMPLE_BYTES);
            let back = Aggregate::from_bytes(short.as_ref()).unwrap();
            assert_eq!(back.to_bytes(), one.to_bytes(), "{ts} {v}");
            assert_eq!(one.encode(false).as_ref(), &one.to_bytes()[..]);
        }
        let mut two = Aggregate::of(5, 1.5);
        two.merge(&Aggregate::of(6, 2.5));
        assert_eq!(two.encode(true).as_ref(), &two.to_bytes()[..]);
        // One sample's count but fields that are not one sample's (as no
        // merge makes, but a corrupted or hand-made value might): long.
        let one = Aggregate::of(5, 1.5);
        for odd in [
            Aggregate { sum: 9.0, ..one },
            Aggregate { min: 1.0, ..one },
            Aggregate { max: 2.0, ..one },
            Aggregate { last: 2.0, ..one },
            Aggregate {
                last_ts_ns: 6,
                ..one
            },
        ] {
            assert_eq!(odd.encode(true).as_ref().len(), AGGREGATE_BYTES, "{odd:?}");
        }
        // Two samples whose sum has the bits of each (zeros at one time):
        // only the count tells them from one.
        let mut zeros = Aggregate::of(5, 0.0);
        zeros.merge(&Aggregate::of(5, 0.0));
        assert_eq!(zeros.encode(true).as_ref().len(), AGGREGATE_BYTES);
        assert_eq!(
            Aggregate::from_bytes(zeros.encode(true).as_ref()),
            Some(zeros)
        );
    }

    proptest! {
        #[test]
        fn merge_order_does_not_matter(samples in prop::collection::vec((0i64..1000, -1e6f64..1e6), 1..50), cut in 0usize..50) {
            let all: Vec<Aggregate> = samples.iter().map(|(t, v)| Aggregate::of(*t, *v)).collect();
            let mut forward = all[0];
            for a in &all[1..] { forward.merge(a); }
            let mut backward = *all.last().unwrap();
            for a in all[..all.len() - 1].iter().rev() { backward.merge(a); }
            let cut = cut.min(all.len() - 1);
            let mut left = all[0];
            for a in &all[1..=cut] { left.merge(a); }
            if let Some((head, rest)) = all[cut + 1..].split_first() {
                let mut right = *head;
                for a in rest { right.merge(a); }
                left.merge(&right);
            }
            prop_assert_eq!(forward.count, backward.count);
            prop_assert_eq!((forward.min, forward.max), (backward.min, backward.max));
            prop_assert_eq!((forward.first_ts_ns, forward.first), (backward.first_ts_ns, backward.first));
            prop_assert_eq!((forward.last_ts_ns, forward.last), (backward.last_ts_ns, backward.last));
            prop_assert_eq!((left.count, left.first, left.last), (forward.count, forward.first, forward.last));
            prop_assert!((forward.sum - backward.sum).abs() < 1e-3);
        }
    }
}
