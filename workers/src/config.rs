//! Worker configuration (`[worker]` in the config file).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use windrow_jetstream::{subject, NatsConfig};

use crate::{decode::DecodeConfig, store::StoreConfig};

/// How the worker consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A member of a core NATS queue group: at-most-once (a slow worker is
    /// dropped messages by the client or server).
    #[default]
    Core,
    /// A pull consumer on one durable consumer shared by all replicas: each
    /// message is acknowledged only after the LMDB commit holding its effect.
    Jetstream,
}

/// Everything the worker needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection (the top-level `[nats]` section).
    pub nats: NatsConfig,
    /// `core` (queue group) or `jetstream` (durable pull consumer). Default `core`.
    pub mode: Mode,
    /// Subject filter to consume. Default `<nats.subject_prefix>.>`.
    pub subject_filter: Option<String>,
    /// Queue group of core mode. Default `windrow-workers`.
    pub queue_group: String,
    /// Stream of jetstream mode. Default `TELEMETRY`.
    pub stream: String,
    /// Durable consumer shared by all replicas in jetstream mode. Default `windrow-workers`.
    pub durable: String,
    /// Seconds JetStream waits for an ack before redelivering. Default 30.
    pub ack_wait_secs: u64,
    /// Deliveries before JetStream gives up on a message. Default 10.
    pub max_deliver: i64,
    /// Unacknowledged messages per consumer before JetStream pauses delivery. Default 50000.
    pub max_ack_pending: i64,
    /// Payload decoding.
    pub decode: DecodeConfig,
    /// The LMDB store.
    pub store: StoreConfig,
    /// Messages per LMDB commit (and per JetStream fetch), at most. Default 20000.
    pub batch_max_messages: usize,
    /// Longest wait before a partial batch is committed, in milliseconds. Default 100.
    pub batch_max_wait_ms: u64,
    /// Publish undecodable, too late or invalid messages to `dead_letter_subject`. Default true.
    pub dead_letter: bool,
    /// Dead-letter subject. Default `windrow.deadletter.worker`.
    pub dead_letter_subject: String,
    /// Subject every worker answers queries on. Default `windrow.query`.
    pub query_subject: String,
    /// This worker's name in query replies. Default `$POD_NAME`, else `$HOSTNAME`, else `windrow-worker`.
    pub node_id: String,
    /// Nodes whose data this node's store already holds (a store rebuilt by
    /// `windrow replay` put into service): while they still answer, queries
    /// leave their partials out of the merge instead of counting them twice.
    /// Default none.
    pub supersedes: Vec<String>,
    /// Address of `/metrics`, `/healthz`, `/readyz`. Default `0.0.0.0:9465`.
    pub http_listen: SocketAddr,
    /// Upper bound on the drain after SIGTERM, in seconds. Default 30.
    pub shutdown_timeout_secs: u64,
    /// Interval between retention checks, in seconds. Default 60.
    pub retention_check_secs: u64,
    /// Threads of the worker's async runtime. Default 1: the NATS client,
    /// the loop that decodes and batches, the query responder and `/metrics`
    /// share the main thread, so a message goes from the socket into a batch
    /// without waking another thread; with N > 1 everything but the loop runs
    /// on N threads beside it. (The LMDB writer, compaction, query reads and
    /// reply encoding have threads of their own either way.) On a shared
    /// 2-core machine one thread took less CPU per message than two for
    /// about the same rate (BENCHMARKS.md). While a batch is decoded the NATS
    /// client reads nothing: with batches of hundreds of thousands of
    /// messages, use 2.
    pub threads: usize,
}

fn default_node_id() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "windrow-worker".to_owned())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            mode: Mode::Core,
            subject_filter: None,
            queue_group: "windrow-workers".to_owned(),
            stream: "TELEMETRY".to_owned(),
            durable: "windrow-workers".to_owned(),
            ack_wait_secs: 30,
            max_deliver: 10,
            max_ack_pending: 50_000,
            decode: DecodeConfig::default(),
            store: StoreConfig::default(),
            batch_max_messages: 20_000,
            batch_max_wait_ms: 100,
            dead_letter: true,
            dead_letter_subject: "windrow.deadletter.worker".to_owned(),
            query_subject: "windrow.query".to_owned(),
            node_id: default_node_id(),
            supersedes: Vec::new(),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 9465)),
            shutdown_timeout_secs: 30,
            retention_check_secs: 60,
            threads: 1,
        }
    }
}

/// Configuration problems, each naming the full key and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct InvalidConfig(pub Vec<String>);

impl Config {
    /// The subject filter in effect.
    pub fn filter(&self) -> String {
        self.subject_filter
            .clone()
            .unwrap_or_else(|| format!("{}.>", self.nats.subject_prefix))
    }

    /// Checks every option before anything connects.
    ///
    /// # Errors
    /// [`InvalidConfig`] listing each bad key under `worker.`.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let mut p = self.nats.problems("worker.nats");
        p.extend(self.decode.problems("worker.decode"));
        p.extend(self.store.problems("worker.store"));
        if let Some(f) = &self.subject_filter {
            if f.is_empty() || f.split('.').any(str::is_empty) {
                p.push(format!(
                    "worker.subject_filter: not a NATS subject filter: {f:?}"
                ));
            }
        }
        for (key, v) in [
            ("queue_group", &self.queue_group),
            ("stream", &self.stream),
            ("durable", &self.durable),
            ("node_id", &self.node_id),
        ] {
            if v.is_empty() || v.contains(['.', '*', '>', ' ']) {
                p.push(format!(
                    "worker.{key}: must be non-empty without '.', '*', '>' or spaces, got {v:?}"
                ));
            }
        }
        for (i, s) in self.supersedes.iter().enumerate() {
            if s.is_empty() || s.contains(['.', '*', '>', ' ']) || *s == self.node_id {
                p.push(format!(
                    "worker.supersedes[{i}]: must be another node's id, non-empty without '.', '*', '>' or spaces, got {s:?}"
                ));
            }
        }
        if self.ack_wait_secs == 0 {
            p.push("worker.ack_wait_secs: must be ≥ 1, got 0".into());
        }
        if self.max_deliver == 0 || self.max_deliver < -1 {
            p.push(format!(
                "worker.max_deliver: must be ≥ 1 or -1 (unlimited), got {}",
                self.max_deliver
            ));
        }
        if self.max_ack_pending < 1 {
            p.push(format!(
                "worker.max_ack_pending: must be ≥ 1, got {}",
                self.max_ack_pending
            ));
        }
        if !(1..=1_000_000).contains(&self.batch_max_messages) {
            p.push(format!(
                "worker.batch_max_messages: must be 1 to 1000000, got {}",
                self.batch_max_messages
            ));
        }
        if self.mode == Mode::Jetstream && self.batch_max_messages as i64 > self.max_ack_pending {
            p.push(format!(
                "worker.batch_max_messages: must be ≤ worker.max_ack_pending ({}) in jetstream mode, got {}",
                self.max_ack_pending, self.batch_max_messages
            ));
        }
        if self.mode == Mode::Jetstream
            && self.max_ack_pending > self.nats.subscription_capacity as i64
        {
            // The server may deliver max_ack_pending messages before the
            // worker acknowledges any; what the subscription cannot hold, the
            // client drops, and it comes back only after the ack wait.
            p.push(format!(
                "worker.max_ack_pending: must be ≤ nats.subscription_capacity ({}) in jetstream mode, got {}",
                self.nats.subscription_capacity, self.max_ack_pending
            ));
        }
        if self.batch_max_wait_ms == 0 {
            p.push("worker.batch_max_wait_ms: must be ≥ 1, got 0".into());
        }
        if !(1..=256).contains(&self.threads) {
            p.push(format!(
                "worker.threads: must be 1 to 256, got {}",
                self.threads
            ));
        }
        for (key, s) in [
            ("dead_letter_subject", &self.dead_letter_subject),
            ("query_subject", &self.query_subject),
        ] {
            if !subject::is_valid_subject(s) {
                p.push(format!("worker.{key}: not a literal NATS subject: {s:?}"));
            }
        }
        if self.shutdown_timeout_secs == 0 {
            p.push("worker.shutdown_timeout_secs: must be ≥ 1, got 0".into());
        }
        if self.retention_check_secs == 0 {
            p.push("worker.retention_check_secs: must be ≥ 1, got 0".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(InvalidConfig(p))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(c: &Config) -> Vec<String> {
        c.validate().err().map(|e| e.0).unwrap_or_default()
    }

    #[test]
    fn jetstream_limits_must_fit_the_batch_and_the_subscription() {
        let mut c = Config {
            mode: Mode::Jetstream,
            ..Config::default()
        };
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        c.max_ack_pending = 600_000;
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with(
                "worker.max_ack_pending: must be ≤ nats.subscription_capacity (524288)"
            ),
            "{p:?}"
        );
        c.nats.subscription_capacity = 600_000;
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        c.batch_max_messages = 700_000;
        let p = problems(&c);
        assert!(
            p.iter()
                .any(|m| m
                    .starts_with("worker.batch_max_messages: must be ≤ worker.max_ack_pending")),
            "{p:?}"
        );
        // Core mode has no acknowledgements to wait for.
        c.mode = Mode::Core;
        c.batch_max_messages = 5000;
        c.nats.subscription_capacity = 1000;
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
    }

    #[test]
    fn threads_are_one_to_256() {
        let mut c = Config::default();
        assert_eq!(c.threads, 1);
        for ok in [1, 256] {
            c.threads = ok;
            assert!(problems(&c).is_empty(), "{ok}: {:?}", problems(&c));
        }
        for bad in [0, 257] {
            c.threads = bad;
            assert_eq!(
                problems(&c),
                vec![format!("worker.threads: must be 1 to 256, got {bad}")]
            );
        }
    }
}
