//! Telemetry of the worker: each event logs and counts in one place.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The worker's metrics.
#[derive(Clone)]
pub struct Metrics {
    consumed: Counter,
    applied: Counter,
    duplicates: Counter,
    dead_lettered: Family<ReasonLabel, Counter>,
    slow_consumer: Counter,
    given_up: Counter,
    store_errors: Counter,
    batch_size: Histogram,
    commit_seconds: Histogram,
    compacted_windows: Counter,
    compactions: Counter,
    compaction_errors: Counter,
    compaction_slice_seconds: Histogram,
    merged_run_windows: Counter,
    run_merges: Counter,
    /// Messages in the durable consumer not yet delivered (jetstream mode).
    pub consumer_pending: Gauge,
    /// Messages delivered and not yet acknowledged (jetstream mode).
    pub consumer_ack_pending: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            consumed: Counter::default(),
            applied: Counter::default(),
            duplicates: Counter::default(),
            dead_lettered: Family::default(),
            slow_consumer: Counter::default(),
            given_up: Counter::default(),
            store_errors: Counter::default(),
            batch_size: Histogram::new([
                1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
            ]),
            commit_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
            compacted_windows: Counter::default(),
            compactions: Counter::default(),
            compaction_errors: Counter::default(),
            compaction_slice_seconds: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            merged_run_windows: Counter::default(),
            run_merges: Counter::default(),
            consumer_pending: Gauge::default(),
            consumer_ack_pending: Gauge::default(),
        };
        registry.register(
            "windrow_worker_consumed_messages",
            "Messages received from NATS",
            m.consumed.clone(),
        );
        registry.register(
            "windrow_worker_applied_messages",
            "Messages whose samples were committed to LMDB",
            m.applied.clone(),
        );
        registry.register(
            "windrow_worker_duplicates_skipped",
            "Messages already applied (redelivery or overlapping replay), skipped",
            m.duplicates.clone(),
        );
        registry.register(
            "windrow_worker_dead_lettered_messages",
            "Messages sent to the dead-letter subject, by reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "windrow_worker_slow_consumer_events",
            "Slow-consumer events: the NATS client dropped messages for this worker (core mode loses them)",
            m.slow_consumer.clone(),
        );
        registry.register(
            "windrow_worker_given_up_messages",
            "JetStream messages received before this process stood still past the pause limit, given up unapplied for redelivery",
            m.given_up.clone(),
        );
        registry.register(
            "windrow_worker_store_errors",
            "Failed LMDB commits (the batch is retried, not dropped)",
            m.store_errors.clone(),
        );
        registry.register(
            "windrow_worker_batch_messages",
            "Messages per LMDB commit",
            m.batch_size.clone(),
        );
        registry.register(
            "windrow_worker_commit_latency_seconds",
            "Time to apply and commit one batch",
            m.commit_seconds.clone(),
        );
        registry.register(
            "windrow_worker_compacted_windows",
            "Windows moved from the time-ordered recent database into a series-ordered run",
            m.compacted_windows.clone(),
        );
        registry.register(
            "windrow_worker_compactions",
            "Compactions of recent windows finished",
            m.compactions.clone(),
        );
        registry.register(
            "windrow_worker_compaction_errors",
            "Compaction steps that failed (retried after the next batch; nothing is lost)",
            m.compaction_errors.clone(),
        );
        registry.register(
            "windrow_worker_compaction_slice_seconds",
            "Time the LMDB writer spent on one slice of a compaction or of a merge of runs between two batches",
            m.compaction_slice_seconds.clone(),
        );
        registry.register(
            "windrow_worker_merged_run_windows",
            "Windows written by merges of runs (a level's runs into one of the next)",
            m.merged_run_windows.clone(),
        );
        registry.register(
            "windrow_worker_run_merges",
            "Merges of runs finished",
            m.run_merges.clone(),
        );
        registry.register(
            "windrow_worker_consumer_pending_messages",
            "JetStream messages not yet delivered to the durable consumer (lag)",
            m.consumer_pending.clone(),
        );
        registry.register(
            "windrow_worker_consumer_ack_pending_messages",
            "JetStream messages delivered and awaiting acknowledgement",
            m.consumer_ack_pending.clone(),
        );
        m
    }

    /// A batch of `n` messages arrived.
    pub fn consumed(&self, n: usize) {
        self.consumed.inc_by(n as u64);
    }

    /// A batch was committed.
    pub fn committed(&self, size: usize, applied: usize, duplicates: usize, seconds: f64) {
        self.applied.inc_by(applied as u64);
        self.duplicates.inc_by(duplicates as u64);
        self.batch_size.observe(size as f64);
        self.commit_seconds.observe(seconds);
    }

    /// A message went to the dead-letter subject.
    pub fn dead_lettered(&self, reason: &'static str, subject: &str, detail: &str) {
        self.dead_lettered
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::warn!(reason, subject, detail, "message dead-lettered");
    }

    /// The NATS client reported a slow consumer.
    pub fn slow_consumer(&self) {
        self.slow_consumer.inc();
        tracing::warn!(
            "slow consumer: NATS dropped messages for this worker (core mode is at-most-once)"
        );
    }

    /// `n` messages received before this process stood still were dropped,
    /// neither applied nor acknowledged (see `crate::pause`).
    pub fn given_up(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.given_up.inc_by(n as u64);
        tracing::warn!(
            messages = n,
            "gave up messages received before this process stood still: JetStream redelivers them (if it has not already), and applying them here too would count them twice"
        );
    }

    /// A compaction step wrote `windows` to its run in `seconds` (of the
    /// writer's time, between two batches); `done` if it ended its
    /// compaction.
    pub fn compacted(&self, day: &str, windows: usize, seconds: f64, done: bool) {
        self.compacted_windows.inc_by(windows as u64);
        self.compaction_slice_seconds.observe(seconds);
        tracing::debug!(day, windows, seconds, "merged a slice of recent windows");
        if done {
            self.compactions.inc();
            tracing::info!(day, "compaction of recent windows done");
        }
    }

    /// A slice of a merge of runs was committed.
    pub fn merged_runs(&self, day: &str, windows: usize, seconds: f64, done: bool) {
        self.merged_run_windows.inc_by(windows as u64);
        self.compaction_slice_seconds.observe(seconds);
        tracing::debug!(day, windows, seconds, "merged a slice of runs");
        if done {
            self.run_merges.inc();
            tracing::info!(day, "merge of runs done");
        }
    }

    /// A compaction step failed; the next batch's step tries again.
    pub fn compaction_failed(&self, error: &dyn std::fmt::Display) {
        self.compaction_errors.inc();
        tracing::warn!(%error, "compaction failed; its windows stay in recent, where reads find them, and the writer retries it after the next batch or when idle");
    }

    /// A commit failed; the batch will be retried.
    pub fn store_error(&self, error: &dyn std::fmt::Display) {
        self.store_errors.inc();
        tracing::error!(%error, "LMDB commit failed; not acknowledging, retrying the batch");
    }
}
