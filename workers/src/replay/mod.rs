//! Replay: read a stream (or part of it) and rebuild a store through the same
//! decode → window → LMDB path as the live workers (`consume::Processor`).
//!
//! Without a durable name the stream is read through an ordered consumer (no
//! acknowledgements, read ahead on a task of its own, nothing left on the
//! server); with one, through a durable pull consumer acknowledged after each
//! commit, so an interrupted replay started again continues where it stopped.
//! Either way the store's applied-sequence sets make a second pass over the
//! same messages a no-op, and lateness is judged against each message's stream
//! timestamp, so the rebuilt windows equal what the live fleet computed.
//!
//! Layout: this module runs a replay; `reader` holds the consumer it reads
//! through, and `verify` compares a rebuilt store with the live fleet.

mod reader;
mod verify;

pub use verify::{verify, Difference, Verification};

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use windrow_jetstream::subject::consumer_filter;
use windrow_ops::Health;

use self::reader::Reader;
use crate::{
    config::Config,
    consume::{Outcome, Pipeline, Processor},
    events::Metrics,
    incoming::{stream_identity, Incoming},
    store::SystemClock,
    writer::Writer,
    Error,
};

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The stream's first message.
    All,
    /// This stream sequence.
    Sequence(u64),
    /// Messages stored at or after this time (Unix ns).
    Time(i64),
}

/// Where a replay ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The stream's last sequence when the replay started.
    Current,
    /// This stream sequence (inclusive).
    Sequence(u64),
    /// Before messages stored at or after this time (Unix ns).
    Time(i64),
}

/// What to replay and where to.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// The worker configuration: NATS, subject prefix, decoding, store (its
    /// `store.dir` is the store to build).
    pub worker: Config,
    /// Stream to read.
    pub stream: String,
    /// Subject filter (default: the worker's filter).
    pub filter: Option<String>,
    /// First message.
    pub start: Start,
    /// Last message.
    pub end: End,
    /// Durable consumer name: resumable when set.
    pub durable: Option<String>,
    /// Messages per pull request and per commit.
    pub batch: usize,
}

/// Progress of a running replay.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Messages read so far in this run.
    pub done: u64,
    /// Messages left to the end (an estimate from the consumer's pending count).
    pub remaining: u64,
    /// Messages per second since the start of this run.
    pub rate: f64,
}

impl Progress {
    /// Estimated time to the end at the current rate.
    pub fn eta(&self) -> Option<Duration> {
        (self.rate > 0.0).then(|| Duration::from_secs_f64(self.remaining as f64 / self.rate))
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Messages read in this run.
    pub messages: u64,
    /// Applied to the store for the first time.
    pub applied: u64,
    /// Already in the store (an earlier or overlapping replay).
    pub duplicates: u64,
    /// Not storable (bad payload, beyond lateness): counted, not dead-lettered again.
    pub rejected: u64,
    /// Lowest and highest stream sequence read (a durable consumer may
    /// deliver out of order after redeliveries).
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Sample times covered, Unix ns.
    pub min_ts_ns: Option<i64>,
    pub max_ts_ns: Option<i64>,
    /// Wall time.
    pub elapsed: Duration,
    /// Interrupted (shutdown) before the end.
    pub interrupted: bool,
}

impl Summary {
    /// Counts a processed batch's outcome; false (and `interrupted` set) if
    /// the batch was interrupted instead.
    fn settle(&mut self, outcome: Option<Outcome>) -> bool {
        match outcome {
            Some(o) => {
                self.add(o);
                true
            }
            None => {
                self.interrupted = true;
                false
            }
        }
    }

    fn add(&mut self, o: Outcome) {
        self.applied += o.applied;
        self.duplicates += o.duplicates;
        self.rejected += o.rejected;
        if let Some(t) = o.min_ts_ns {
            self.min_ts_ns = Some(self.min_ts_ns.map_or(t, |m| m.min(t)));
        }
        if let Some(t) = o.max_ts_ns {
            self.max_ts_ns = Some(self.max_ts_ns.map_or(t, |m| m.max(t)));
        }
    }
}

/// Where one message stands against the end of the range.
fn past_end(end: End, last_seq: u64, seq: u64, stored_ns: i64) -> bool {
    match end {
        End::Current => seq > last_seq,
        End::Sequence(s) => seq > s,
        End::Time(t) => stored_ns >= t || seq > last_seq,
    }
}

/// Whether a message lies before the range's start. The consumer starts
/// there, but async-nats recreates an ordered consumer that stalls before
/// delivering anything from the stream's first message (and one that
/// stalls later from the message after the last one it delivered).
fn before_start(start: Start, seq: u64, stored_ns: i64) -> bool {
    match start {
        Start::All => false,
        Start::Sequence(s) => seq < s,
        Start::Time(t) => stored_ns < t,
    }
}

fn deliver_policy(start: Start) -> Result<DeliverPolicy, Error> {
    Ok(match start {
        Start::All => DeliverPolicy::All,
        Start::Sequence(s) => DeliverPolicy::ByStartSequence { start_sequence: s },
        Start::Time(ns) => DeliverPolicy::ByStartTime {
            start_time: OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
                .map_err(|e| Error::Replay(format!("start time: {e}")))?,
        },
    })
}

/// Replays into `config.worker.store.dir`, calling `progress` about once a second.
///
/// Stops at the end of the range, or at `shutdown` after committing the batch
/// in hand (then [`Summary::interrupted`] is set; with a durable consumer the
/// next run continues from there).
///
/// # Errors
/// Store, NATS or stream errors; a failing commit is retried until `shutdown`.
pub async fn replay(
    config: ReplayConfig,
    mut progress: impl FnMut(Progress) + Send,
    shutdown: CancellationToken,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let mut worker = config.worker.clone();
    // Already dead-lettered by the live fleet when it first saw them.
    worker.dead_letter = false;
    // A durable pull of `batch` messages lands in one subscription: one that
    // holds fewer makes the client drop the rest (back only after the ack
    // wait). Room for the request's status messages too.
    worker.nats.subscription_capacity = worker
        .nats
        .subscription_capacity
        .max(config.batch.saturating_add(64));
    // Replay serves no /metrics: its counters go nowhere; its compactions log.
    let metrics = Metrics::register(&mut Registry::default());
    let (writer, writer_thread) =
        Writer::start(worker.store.clone(), Arc::new(SystemClock), metrics.clone())?;
    let nats = windrow_jetstream::connect(&worker.nats, "windrow-replay", |_| async {}).await?;
    let js = jetstream::new(nats.clone());
    let filter = config.filter.clone().unwrap_or_else(|| worker.filter());
    let mut stream = js
        .get_stream(&config.stream)
        .await
        .map_err(|e| Error::Replay(format!("stream {}: {e}", config.stream)))?;
    let info = stream
        .info()
        .await
        .map_err(|e| Error::Replay(format!("stream {}: {e}", config.stream)))?;
    let last_seq = info.state.last_sequence;
    let policy = deliver_policy(config.start)?;
    let processor = Arc::new(Processor {
        config: Arc::new(worker),
        writer: writer.clone(),
        nats: nats.clone(),
        metrics,
        health: Health::new(),
        double_ack: false,
    });
    let mut summary = Summary::default();
    let identity = stream_identity(info);
    let consumer_filter = consumer_filter(&info.config.subjects, &filter);
    let end_seq = last_in_range(config.end, last_seq);
    let mut reader = Reader::open(
        &stream,
        &config,
        &consumer_filter,
        policy,
        identity,
        end_seq,
    )
    .await?;
    tracing::info!(
        stream = %config.stream,
        %filter,
        last_seq,
        durable = config.durable.as_deref().unwrap_or("(ordered)"),
        into = %config.worker.store.dir.display(),
        "replay started"
    );
    let mut last_report = Instant::now();
    let mut remaining = reader.initial_pending;
    let hard_stop = shutdown.clone();
    // Reading and decoding the next batch overlaps the commit of the one
    // before: at most one batch is being committed at a time.
    let mut pipeline = Pipeline::new(processor.clone(), reader.ack_wait, hard_stop.clone());
    // Messages past the end delivered while an earlier run's messages are
    // still to come back: held unacknowledged (so that the consumer does not
    // offer them again and again) and handed back when the run ends. Keyed
    // by stream sequence: the latest delivery of each.
    let mut parked: std::collections::BTreeMap<u64, Incoming> = Default::default();
    let mut skipped_before_start = 0_u64;
    loop {
        // Waiting for messages an earlier run held: give up waiting now and
        // then to count them again (acks still on their way lower the count).
        let mut patience = None;
        if remaining == 0 {
            if !summary.settle(pipeline.finish().await) {
                break;
            }
            // A durable consumer may still hold messages delivered to an
            // earlier, killed run: they come back after the ack wait. What
            // this run parked past the end is unacknowledged too.
            remaining = reader.outstanding(parked.len() as u64).await;
            if remaining == 0 {
                break;
            }
            tracing::info!(
                unacknowledged = remaining,
                "waiting for messages an earlier run received but did not acknowledge (redelivered after the ack wait)"
            );
            patience = Some(Duration::from_secs(5));
        }
        let first = tokio::select! {
            () = shutdown.cancelled() => {
                summary.interrupted = true;
                break;
            }
            m = reader.next(patience) => m?,
        };
        let Some(first) = first else {
            remaining = 0; // count again
            continue;
        };
        let mut batch = Vec::with_capacity(config.batch);
        let mut next = Some(first);
        let mut reached_end = false;
        while let Some(m) = next.take() {
            let Some(stored) = m.stored.as_ref() else {
                continue;
            };
            // Only the ordered consumer: a durable one keeps the start of
            // its first run, and a later run's start is ignored.
            if !reader.is_durable() && before_start(config.start, stored.seq, stored.at_ns) {
                skipped_before_start += 1;
                next = reader.next_in_batch().await?;
                continue;
            }
            if past_end(config.end, last_seq, stored.seq, stored.at_ns) {
                if reader.earlier_run_held {
                    // Not this run's, but the end of the range is no reason
                    // to stop waiting for an earlier run's messages: parked,
                    // and the waiting below decides.
                    parked.insert(stored.seq, m);
                    remaining = 0;
                    next = reader.next_in_batch().await?;
                    continue;
                }
                m.hand_back(&nats).await;
                reached_end = true;
                break;
            }
            summary.first_seq = Some(summary.first_seq.map_or(stored.seq, |s| s.min(stored.seq)));
            let highest = summary.last_seq.map_or(stored.seq, |s| s.max(stored.seq));
            summary.last_seq = Some(highest);
            // Never more than the sequences left in the range after the
            // highest one read (a redelivery's own is lower): a pull then
            // stops at the end instead of bringing messages to hand back.
            remaining = reader.pending_after(&m, end_seq.saturating_sub(highest));
            batch.push(m);
            // A durable pull runs to its end (the rest of it may be
            // redeliveries, which the consumer's pending count leaves out);
            // the ordered consumer stops waiting once nothing is pending.
            if batch.len() >= config.batch || (remaining == 0 && !reader.is_durable()) {
                break;
            }
            // Take what is already here without waiting long for more.
            next = reader.next_in_batch().await?;
        }
        summary.messages += batch.len() as u64;
        if !summary.settle(pipeline.submit(batch).await) {
            break;
        }
        if reached_end {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress(Progress {
                done: summary.messages,
                remaining,
                rate: summary.messages as f64 / started.elapsed().as_secs_f64(),
            });
        }
    }
    // Hand back first: a pull left unread while the last commit runs is ended
    // by async-nats 5 s after its expiry, and what it still buffered would
    // come back only after the ack wait.
    reader.hand_back_buffered().await;
    for m in parked.into_values() {
        m.hand_back(&nats).await;
    }
    summary.settle(pipeline.finish().await);
    if skipped_before_start > 0 {
        tracing::warn!(
            messages = skipped_before_start,
            "skipped messages before the start of the range, delivered by an ordered consumer that async-nats recreated from the stream's start"
        );
    }
    summary.elapsed = started.elapsed();
    progress(Progress {
        done: summary.messages,
        remaining: 0,
        rate: summary.messages as f64 / summary.elapsed.as_secs_f64().max(1e-9),
    });
    drop(reader);
    let _ = tokio::time::timeout(Duration::from_secs(5), nats.flush()).await;
    drop(pipeline);
    drop(processor);
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    Ok(summary)
}

/// The highest stream sequence the range can hold: the end sequence, or the
/// stream's last one when the replay started (an end time lies before it).
fn last_in_range(end: End, last_seq: u64) -> u64 {
    match end {
        End::Sequence(s) => s,
        End::Current | End::Time(_) => last_seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_messages_before_the_ranges_start_are_before_it() {
        assert!(!before_start(Start::All, 1, 0));
        assert!(before_start(Start::Sequence(10), 9, i64::MAX));
        assert!(!before_start(Start::Sequence(10), 10, 0));
        assert!(before_start(Start::Time(1_000), 99, 999));
        assert!(!before_start(Start::Time(1_000), 1, 1_000));
    }
}
