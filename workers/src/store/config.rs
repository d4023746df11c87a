//! Store settings (`[worker.store]`) and their validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Map sizes are kept multiples of this: LMDB needs a multiple of the OS page
/// size, and 64 KiB is one for every page size Linux uses (4, 16, 64 KiB).
pub(super) const MAP_GRANULE: usize = 64 << 10;

/// Store settings (`[worker.store]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Data directory; one LMDB environment per UTC day below it. Default `data`.
    pub dir: PathBuf,
    /// Window resolutions, seconds; each must divide a day. Default `[1, 60]`.
    pub resolutions_secs: Vec<u32>,
    /// Initial LMDB map size of a new day, bytes. Default 64 MiB.
    pub initial_map_bytes: usize,
    /// Largest map size of a day; a full map doubles up to this. Default 64 GiB.
    pub max_map_bytes: usize,
    /// UTC days kept besides today: day directories older than today minus
    /// this are deleted whole. Default 7.
    pub retention_days: u32,
    /// Samples older than now minus this are rejected (dead-lettered), seconds. Default 3600.
    pub allowed_lateness_secs: u64,
    /// Samples newer than now plus this are rejected, seconds. Default 300.
    pub max_future_secs: u64,
    /// Windows a day's `recent` database (where batches write, time first)
    /// collects before the writer compacts them into a run (by series).
    /// Larger: fewer, larger runs (fewer levels for a window to be merged
    /// through), but longer compactions (the writer pauses for them) and about
    /// 110 bytes of memory per window while one runs, and as much again per
    /// coarser resolution rolled up from it (220 with the default
    /// resolutions, whose `recent` holds only the seconds), plus about 64
    /// for loading them; what the largest compaction so far needed stays
    /// allocated for the next one. Default 1,000,000.
    pub recent_max_windows: u64,
    /// Windows a compaction writes per transaction, one such slice after
    /// each batch (or, if more, 2 × (1 + rollups) times the sum of what
    /// the batch before it wrote and, for 16 slices after the load, a
    /// sixteenth of what was written while the compaction's windows
    /// loaded, so that compaction outpaces the writes): about the longest
    /// the writer pauses for compaction between two batches. Each merge of
    /// runs in progress writes half of it per batch, or (1 + rollups)
    /// times what the batch wrote if more, at most 262,144. Default
    /// 100,000.
    pub compaction_slice_windows: u64,
}

fn default_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_resolutions_secs() -> Vec<u32> {
    vec![1, 60]
}
fn default_initial_map_bytes() -> usize {
    64 << 20
}
fn default_max_map_bytes() -> usize {
    // 64 GiB does not fit a 32-bit usize; such targets get the largest granule multiple.
    (64u64 << 30)
        .try_into()
        .unwrap_or(usize::MAX - (MAP_GRANULE - 1))
}
fn default_retention_days() -> u32 {
    7
}
fn default_allowed_lateness_secs() -> u64 {
    3600
}
fn default_max_future_secs() -> u64 {
    300
}
fn default_recent_max_windows() -> u64 {
    1_000_000
}
fn default_compaction_slice_windows() -> u64 {
    100_000
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            dir: default_dir(),
            resolutions_secs: default_resolutions_secs(),
            initial_map_bytes: default_initial_map_bytes(),
            max_map_bytes: default_max_map_bytes(),
            retention_days: default_retention_days(),
            allowed_lateness_secs: default_allowed_lateness_secs(),
            max_future_secs: default_max_future_secs(),
            recent_max_windows: default_recent_max_windows(),
            compaction_slice_windows: default_compaction_slice_windows(),
        }
    }
}

impl StoreConfig {
    /// Problems with these settings, each naming the key under `path` and the bad value.
    pub fn problems(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.dir.as_os_str().is_empty() {
            p.push(format!("{path}.dir: must not be empty, got \"\""));
        }
        if self.resolutions_secs.is_empty() {
            p.push(format!(
                "{path}.resolutions_secs: at least one resolution is required, got []"
            ));
        }
        for r in &self.resolutions_secs {
            // Dividing a day keeps every window inside one day's environment.
            if *r == 0 || 86_400 % *r != 0 {
                p.push(format!(
                    "{path}.resolutions_secs: each must divide 86400 (a day) evenly, got {r}"
                ));
            }
        }
        let mut sorted = self.resolutions_secs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.resolutions_secs.len() {
            p.push(format!(
                "{path}.resolutions_secs: must not repeat, got {:?}",
                self.resolutions_secs
            ));
        }
        if self.initial_map_bytes < MAP_GRANULE
            || !self.initial_map_bytes.is_multiple_of(MAP_GRANULE)
        {
            p.push(format!(
                "{path}.initial_map_bytes: must be a multiple of 65536 and ≥ 65536, got {}",
                self.initial_map_bytes
            ));
        }
        if self.max_map_bytes < self.initial_map_bytes {
            p.push(format!(
                "{path}.max_map_bytes: must be ≥ initial_map_bytes ({}), got {}",
                self.initial_map_bytes, self.max_map_bytes
            ));
        }
        if self.retention_days == 0 {
            p.push(format!("{path}.retention_days: must be ≥ 1, got 0"));
        }
        if self.allowed_lateness_secs > u64::from(self.retention_days) * 86_400 {
            p.push(format!(
                "{path}.allowed_lateness_secs: must not exceed retention_days × 86400 ({}), got {}",
                u64::from(self.retention_days) * 86_400,
                self.allowed_lateness_secs
            ));
        }
        if self.recent_max_windows == 0 {
            p.push(format!("{path}.recent_max_windows: must be ≥ 1, got 0"));
        }
        if self.compaction_slice_windows == 0 {
            p.push(format!(
                "{path}.compaction_slice_windows: must be ≥ 1, got 0"
            ));
        }
        let secs = self.allowed_lateness_secs.max(self.max_future_secs);
        if !i64::try_from(secs).is_ok_and(|s| s <= i64::MAX / 1_000_000_000) {
            p.push(format!(
                "{path}.allowed_lateness_secs/max_future_secs: must fit i64 nanoseconds, got {} and {}",
                self.allowed_lateness_secs, self.max_future_secs
            ));
        }
        p
    }

    /// `initial_map_bytes` rounded up to a map granule (the store also runs
    /// with configs that skipped validation, e.g. in tests).
    pub(super) fn initial_map(&self) -> usize {
        self.initial_map_bytes
            .max(1)
            .div_ceil(MAP_GRANULE)
            .saturating_mul(MAP_GRANULE)
    }

    /// `max_map_bytes` rounded down to a map granule, at least the initial map.
    pub(super) fn max_map(&self) -> usize {
        (self.max_map_bytes / MAP_GRANULE * MAP_GRANULE).max(self.initial_map())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_problems_name_key_and_value() {
        assert_eq!(
            StoreConfig::default().problems("worker.store"),
            Vec::<String>::new()
        );
        let bad = StoreConfig {
            resolutions_secs: vec![7, 60, 60],
            initial_map_bytes: 1000,
            retention_days: 0,
            recent_max_windows: 0,
            ..StoreConfig::default()
        };
        let p = bad.problems("worker.store");
        assert!(
            p.contains(&"worker.store.recent_max_windows: must be ≥ 1, got 0".to_owned()),
            "{p:?}"
        );
        assert!(
            p.contains(
                &"worker.store.resolutions_secs: each must divide 86400 (a day) evenly, got 7"
                    .to_owned()
            ),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("worker.store.resolutions_secs: must not repeat")),
            "{p:?}"
        );
        assert!(
            p.iter().any(
                |m| m.starts_with("worker.store.initial_map_bytes:") && m.ends_with("got 1000")
            ),
            "{p:?}"
        );
        assert!(
            p.contains(&"worker.store.retention_days: must be ≥ 1, got 0".to_owned()),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("worker.store.allowed_lateness_secs:")),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_and_missing_ones_default() {
        let c: StoreConfig = serde_json::from_str(r#"{"retention_days": 3}"#).unwrap();
        assert_eq!((c.retention_days, c.resolutions_secs), (3, vec![1, 60]));
        assert!(serde_json::from_str::<StoreConfig>(r#"{"retention": 3}"#).is_err());
    }

    #[test]
    fn map_sizes_round_to_granules() {
        let c = StoreConfig {
            initial_map_bytes: 100_000,
            max_map_bytes: 1_000_000,
            ..StoreConfig::default()
        };
        assert_eq!((c.initial_map(), c.max_map()), (131_072, 983_040));
    }
}
