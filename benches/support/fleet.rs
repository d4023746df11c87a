//! The fleet workload of the worker and replay benchmarks.

use async_nats::Subject;
use bytes::Bytes;

use super::unix_ms;

/// Subject of device `d` is this plus `d<NNNNNN>`.
const SUBJECT_PREFIX: &str = "windrow.telemetry.fleet.";

/// `n` readings of `series` devices, round-robin, made on demand.
///
/// Payloads look like `{"device":"d000042","ts":1764000000000,"temp":21.5}`,
/// the end-to-end tests' format. A device's readings are 1 s apart (less if
/// that would span over 10 minutes) and the last ones a minute old when the
/// fleet is made: inside the worker's default lateness (1 h) and future
/// (5 min) limits.
pub struct Fleet {
    n: usize,
    series: usize,
    base_ms: i64,
    step_ms: i64,
}

impl Fleet {
    /// `n` readings of `series` devices, ending a minute ago.
    pub fn new(n: usize, series: usize) -> Fleet {
        let rounds = n.div_ceil(series) as i64;
        let step_ms = (600_000 / rounds).clamp(1, 1000);
        Fleet {
            n,
            series,
            base_ms: unix_ms() - rounds * step_ms - 60_000,
            step_ms,
        }
    }

    /// Number of readings.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Number of devices.
    pub fn series(&self) -> usize {
        self.series
    }

    /// Subject of device `d`.
    pub fn subject(&self, d: usize) -> Subject {
        Subject::from(format!("{SUBJECT_PREFIX}d{d:06}"))
    }

    /// Payload of reading `i` (of device `i % series`).
    pub fn payload(&self, i: usize) -> Bytes {
        let (d, r) = (i % self.series, (i / self.series) as i64);
        let ts = self.base_ms + r * self.step_ms + d as i64 * self.step_ms / self.series as i64;
        let temp = ((d * 7 + i / self.series * 13) % 1000) as f64 / 10.0 - 20.0;
        Bytes::from(format!(
            r#"{{"device":"d{d:06}","ts":{ts},"temp":{temp:.1}}}"#
        ))
    }

    /// Subject and payload of reading `i`.
    pub fn message(&self, i: usize) -> (Subject, Bytes) {
        (self.subject(i % self.series), self.payload(i))
    }
}
