//! Replay: read a stream (or part of it) and rebuild a store through the same
//! decode → window → LMDB path as the live workers ([`Processor`]).
//!
//! Without a durable name the stream is read through an ordered consumer (no
//! acknowledgements, read ahead on a task of its own, nothing left on the
//! server); with one, through a durable pull consumer acknowledged after each
//! commit, so an interrupted replay started again continues where it stopped.
//! Either way the store's applied-sequence sets make a second pass over the
//! same messages a no-op, and lateness is judged against each message's stream
//! timestamp, so the rebuilt windows equal what the live fleet computed.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    self,
    consumer::{pull, DeliverPolicy},
};
use futures::{FutureExt, StreamExt};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use windrow_jetstream::subject::consumer_filter;
use windrow_ops::Health;

use crate::{
    config::Config,
    consume::{next_before, Outcome, Pipeline, Processor},
    events::Metrics,
    feed::Feed,
    incoming::{stream_identity, ConsumerLimits, Incoming},
    query::{gather, merge_windows, QueryRequest},
    store::{SystemClock, WindowRow},
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

/// The longest pull request of an ordered replay (the consumer's
/// `max_expires`, which async-nats also takes as its request expiry and
/// halves for the idle heartbeat).
///
/// With async-nats' defaults (30 s requests, 15 s heartbeats), a consumer
/// that stopped delivering was recreated only after about 65 s: async-nats
/// notes a first missed heartbeat window, sends a fresh request 5 s after
/// the last one expired, and recreates the consumer at the second missed
/// window (2 × expiry + 5 s). Seen in the replay benchmark, 3 times in 18
/// rounds with 150,000-message batches within half an hour, each at a
/// multiple of the 500-message pull, and once more in about 70 replays at
/// the default batch, with this setting, where it lasted about 10 s: the
/// cause is not known. With 5 s requests such a stall lasts about 15 s at most. While messages flow, every
/// request is filled long before it expires, so this costs nothing.
const ORDERED_PULL_EXPIRY: Duration = Duration::from_secs(5);

/// The next message of an ordered replay's feed, however long it takes,
/// with a warning for every [`ORDERED_PULL_EXPIRY`] without one: the run
/// waits for a message only while the consumer said it had more, so a quiet
/// consumer is most likely a stall (async-nats recovers from it by
/// recreating the consumer); messages deleted from the stream meanwhile
/// (its limits, a purge) would look the same.
async fn quiet_warning(feed: &mut Feed<pull::Ordered>) -> Option<Incoming> {
    let since = Instant::now();
    let mut warned = false;
    loop {
        let deadline = tokio::time::Instant::now() + ORDERED_PULL_EXPIRY;
        if let Some(item) = next_before(feed, deadline).await {
            if warned && item.is_some() {
                tracing::info!(
                    waited_secs = since.elapsed().as_secs_f64(),
                    "the ordered consumer delivers again"
                );
            }
            return item;
        }
        warned = true;
        tracing::warn!(
            waited_secs = since.elapsed().as_secs_f64(),
            "no message from the ordered consumer for a while, although it had more to deliver; waiting (async-nats recreates the consumer after two missed heartbeats)"
        );
    }
}

/// The consumer a replay reads through.
struct Reader {
    messages: ReaderStream,
    initial_pending: u64,
    /// An earlier run of the durable consumer left messages unacknowledged:
    /// they come back after the ack wait, and the run waits for them even
    /// once it is offered messages past its end.
    earlier_run_held: bool,
    /// Key of the applied sequences ([`stream_identity`]): the live workers'.
    identity: Arc<str>,
    /// The durable consumer's ack wait (it paces the in-progress acks of held messages).
    ack_wait: Duration,
}

// One reader per replay: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
enum ReaderStream {
    /// Ordered consumer: the fast path, nothing to acknowledge. Read ahead on
    /// a task of its own ([`Feed`]), up to two batches in chunks of at most 512.
    Ordered(Feed<pull::Ordered>),
    /// Bounded pull requests one after the other, so that at the end of the
    /// range (or on interruption) what was delivered but not processed can be
    /// handed back completely instead of waiting out the ack wait.
    Durable {
        consumer: jetstream::consumer::Consumer<pull::Config>,
        size: usize,
        batch: Option<Pull>,
        /// Messages the next pull request should bring: the consumer's
        /// undelivered count as of the last delivery or, while waiting for
        /// redeliveries, its unacknowledged count. A request asks for no
        /// more, so that it ends when they are delivered, not at its expiry.
        expected: u64,
    },
}

/// One pull request of a durable consumer, read into `ready` as soon as
/// anything arrives.
///
/// async-nats ends a pull 5 s after its expiry even with delivered messages
/// still in its buffer, and those then come back only after the ack wait: a
/// pull read more slowly than that (a debug build under load; pulls of
/// 200,000) stranded thousands of messages. Moving what arrived into our own
/// queue at once makes the speed of processing irrelevant to the pull.
struct Pull {
    batch: pull::Batch,
    ready: VecDeque<jetstream::Message>,
    ended: bool,
}

impl Pull {
    fn new(batch: pull::Batch) -> Self {
        Self {
            batch,
            ready: VecDeque::new(),
            ended: false,
        }
    }

    /// The next message of this request; `None` once it ended (its last
    /// message, its expiry or an error status, which is logged).
    async fn next(&mut self) -> Option<jetstream::Message> {
        if let Some(m) = self.ready.pop_front() {
            return Some(m);
        }
        if self.ended {
            return None;
        }
        let item = self.batch.next().await;
        let first = self.take(item);
        while first.is_some() && !self.ended {
            let Some(item) = self.batch.next().now_or_never() else {
                break;
            };
            if let Some(m) = self.take(item) {
                self.ready.push_back(m);
            }
        }
        first
    }

    fn take(
        &mut self,
        item: Option<Result<jetstream::Message, async_nats::Error>>,
    ) -> Option<jetstream::Message> {
        match item {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "replay consumer");
                self.ended = true;
                None
            }
            None => {
                self.ended = true;
                None
            }
        }
    }
}

impl Reader {
    async fn open(
        stream: &jetstream::stream::Stream,
        config: &ReplayConfig,
        filter: &str,
        policy: DeliverPolicy,
        identity: Arc<str>,
        end_seq: u64,
    ) -> Result<Reader, Error> {
        let err = |e: &dyn std::fmt::Display| Error::Replay(format!("consumer: {e}"));
        match &config.durable {
            None => {
                let consumer = stream
                    .create_consumer(pull::OrderedConfig {
                        filter_subject: filter.to_owned(),
                        deliver_policy: policy,
                        max_expires: ORDERED_PULL_EXPIRY,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| err(&e))?;
                let initial_pending = consumer.cached_info().num_pending;
                let messages = consumer.messages().await.map_err(|e| err(&e))?;
                Ok(Reader {
                    messages: ReaderStream::Ordered(Feed::start(
                        messages,
                        identity.clone(),
                        Incoming::unacked,
                        config.batch.saturating_mul(2),
                        "replay consumer",
                    )),
                    initial_pending,
                    earlier_run_held: false,
                    identity,
                    ack_wait: Duration::from_secs(30),
                })
            }
            Some(name) => {
                let mut consumer: jetstream::consumer::Consumer<pull::Config> = stream
                    .get_or_create_consumer(
                        name,
                        pull::Config {
                            durable_name: Some(name.clone()),
                            filter_subject: filter.to_owned(),
                            deliver_policy: policy,
                            ack_policy: jetstream::consumer::AckPolicy::Explicit,
                            ack_wait: Duration::from_secs(30),
                            max_ack_pending: i64::try_from(config.batch.saturating_mul(4))
                                .unwrap_or(i64::MAX),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| err(&e))?;
                let info = consumer.info().await.map_err(|e| err(&e))?;
                if info.config.filter_subject != filter || info.config.deliver_policy != policy {
                    tracing::warn!(
                        durable = %name,
                        "the durable consumer exists with another filter or start; it continues where it stopped and the new --since/--from-seq/--subject-filter are ignored"
                    );
                }
                // Undelivered messages up to the end of the range; those past
                // it are left on the consumer for a later run.
                let undelivered = info
                    .num_pending
                    .min(end_seq.saturating_sub(info.delivered.stream_sequence));
                let initial_pending = undelivered + info.num_ack_pending as u64;
                let earlier_run_held = info.num_ack_pending > 0;
                let expected = if undelivered > 0 {
                    undelivered
                } else {
                    info.num_ack_pending as u64
                };
                let ConsumerLimits {
                    ack_wait,
                    batch: size,
                } = ConsumerLimits::of(info, config.batch, "--batch");
                Ok(Reader {
                    messages: ReaderStream::Durable {
                        consumer,
                        size,
                        batch: None,
                        expected,
                    },
                    initial_pending,
                    earlier_run_held,
                    identity,
                    ack_wait,
                })
            }
        }
    }

    /// The next message; transient consumer errors (missed heartbeats) are
    /// logged and skipped, as the consumer recovers by itself.
    ///
    /// With `patience`, `None` when nothing came within it. A durable
    /// consumer's pull request then expires after `patience` and is read to
    /// its end, never cancelled: async-nats drops what a pull still buffers
    /// 5 s after its expiry, so a request left unread while redeliveries
    /// arrive strands them for another ack wait (seen: a resumed replay
    /// waiting for 11,770 redeliveries got none of them, round after round).
    async fn next(&mut self, patience: Option<Duration>) -> Result<Option<Incoming>, Error> {
        loop {
            match &mut self.messages {
                ReaderStream::Ordered(feed) => {
                    let item = match patience {
                        None => quiet_warning(feed).await,
                        Some(p) => match next_before(feed, tokio::time::Instant::now() + p).await {
                            Some(item) => item,
                            None => return Ok(None),
                        },
                    };
                    return item
                        .map(Some)
                        .ok_or_else(|| Error::Replay("the consumer ended".into()));
                }
                ReaderStream::Durable {
                    consumer,
                    size,
                    batch,
                    expected,
                } => {
                    let current = match batch {
                        Some(b) => b,
                        None => {
                            let want = usize::try_from(*expected)
                                .unwrap_or(usize::MAX)
                                .clamp(1, *size);
                            batch.insert(Pull::new(
                                consumer
                                    .batch()
                                    .max_messages(want)
                                    .expires(patience.unwrap_or_else(|| pull_expiry(want)))
                                    .messages()
                                    .await
                                    .map_err(|e| Error::Replay(format!("pull request: {e}")))?,
                            ))
                        }
                    };
                    match current.next().await {
                        Some(m) => return Ok(Some(Incoming::jetstream(m, &self.identity))),
                        None => *batch = None,
                    }
                    if patience.is_some() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn is_durable(&self) -> bool {
        matches!(self.messages, ReaderStream::Durable { .. })
    }

    /// The next message if it belongs to the batch in hand: for the ordered
    /// consumer, what arrives within 50 ms; for the durable one, the rest of
    /// the current pull request (never cancelled half-way, which would strand
    /// its messages until the ack wait).
    async fn next_in_batch(&mut self) -> Result<Option<Incoming>, Error> {
        match &mut self.messages {
            ReaderStream::Ordered(_) => self.next(Some(Duration::from_millis(50))).await,
            ReaderStream::Durable { batch, .. } => {
                let Some(current) = batch.as_mut() else {
                    return Ok(None);
                };
                match current.next().await {
                    Some(m) => Ok(Some(Incoming::jetstream(m, &self.identity))),
                    None => {
                        *batch = None;
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Returns what was delivered but will not be processed, so that the next
    /// run gets it at once rather than after the ack wait.
    async fn hand_back_buffered(&mut self) {
        if let ReaderStream::Durable { batch, .. } = &mut self.messages {
            if let Some(b) = batch.as_mut() {
                // Ends with the request: its last message or its expiry.
                while let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_secs(10), b.next()).await
                {
                    let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
                }
            }
            *batch = None;
        }
    }

    /// Messages delivered to some client of a durable consumer and not yet
    /// acknowledged, less the `parked` ones this run holds past its end.
    ///
    /// Acks are plain (no confirmation), so the server may still be counting
    /// this run's last ones: the count is taken again until it is zero or has
    /// stayed the same for a second.
    async fn outstanding(&mut self, parked: u64) -> u64 {
        let ReaderStream::Durable {
            consumer, expected, ..
        } = &mut self.messages
        else {
            return 0;
        };
        let mut last = None;
        let mut steady_since = Instant::now();
        loop {
            let now = consumer
                .info()
                .await
                .map(|i| (i.num_ack_pending as u64).saturating_sub(parked))
                .unwrap_or(0);
            if now == 0 {
                return 0;
            }
            if last != Some(now) {
                last = Some(now);
                steady_since = Instant::now();
            } else if steady_since.elapsed() >= Duration::from_secs(1) {
                *expected = now;
                return now;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Messages the consumer still has after `m`, at most `in_range`.
    fn pending_after(&mut self, m: &Incoming, in_range: u64) -> u64 {
        let pending = m.pending.unwrap_or(u64::MAX).min(in_range);
        if let ReaderStream::Durable { expected, .. } = &mut self.messages {
            *expected = pending;
        }
        pending
    }
}

/// How long a durable pull request of `messages` stays open: long enough to
/// be served in full on a busy machine (20 µs a message, at least 1 s). It
/// normally ends sooner, when the messages it expects are delivered; the
/// expiry bounds the wait when the server cannot send them all (fewer left,
/// or `max_ack_pending` reached while an earlier run's messages are still
/// unacknowledged).
fn pull_expiry(messages: usize) -> Duration {
    Duration::from_secs(1)
        .max(Duration::from_micros(20).saturating_mul(u32::try_from(messages).unwrap_or(u32::MAX)))
}

/// One difference between the rebuilt store and the live fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub series: String,
    pub field: String,
    pub resolution_secs: u32,
    pub start_ns: i64,
    /// (count, sum, min, max) in the rebuilt store, if present.
    pub rebuilt: Option<(u64, f64, f64, f64)>,
    /// The same from the fleet's merged answer, if present.
    pub live: Option<(u64, f64, f64, f64)>,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// Windows compared (union of both sides), per resolution.
    pub windows: usize,
    /// Nodes of the live fleet that answered fully.
    pub nodes: Vec<String>,
    /// Differences (all of them).
    pub differences: Vec<Difference>,
}

fn same(a: &WindowRow, b: &WindowRow) -> bool {
    let (x, y) = (&a.agg, &b.agg);
    let close = |p: f64, q: f64| (p - q).abs() <= 1e-9 * p.abs().max(q.abs()).max(1.0);
    x.count == y.count
        && close(x.sum, y.sum)
        && x.min == y.min
        && x.max == y.max
        && x.first_ts_ns == y.first_ts_ns
        && x.first == y.first
        && x.last_ts_ns == y.last_ts_ns
        && x.last == y.last
}

/// Compares the store at `worker.store.dir` with the live fleet's merged
/// windows over `[from_ns, to_ns)` at every configured resolution.
///
/// Sums are compared with a relative tolerance of 1e-9 (floating-point sums
/// depend on the order of addition, which differs between one store and
/// merged partials); everything else exactly.
///
/// # Errors
/// Store or NATS errors, or fewer than `expect_nodes` nodes answering fully.
pub async fn verify(
    worker: &Config,
    from_ns: i64,
    to_ns: i64,
    expect_nodes: Option<usize>,
    timeout: Duration,
) -> Result<Verification, Error> {
    let metrics = Metrics::register(&mut Registry::default());
    let (writer, writer_thread) =
        Writer::start(worker.store.clone(), Arc::new(SystemClock), metrics)?;
    let nats =
        windrow_jetstream::connect(&worker.nats, "windrow-replay-verify", |_| async {}).await?;
    let mut out = Verification::default();
    let result = async {
        for &res in &worker.store.resolutions_secs {
            let step = i64::from(res) * 1_000_000_000;
            let request = QueryRequest {
                series: "*".into(),
                field: None,
                resolution_secs: res,
                from_ns: from_ns.div_euclid(step) * step,
                to_ns,
                latest: false,
            };
            let live = gather(
                &nats,
                &worker.query_subject,
                &request,
                expect_nodes,
                timeout,
            )
            .await
            .map_err(|e| Error::Replay(format!("query plane: {e}")))?;
            if let Some(n) = expect_nodes {
                if live.complete.len() < n {
                    return Err(Error::Replay(format!(
                        "expected {n} node(s) to answer, {} did fully",
                        live.complete.len()
                    )));
                }
            }
            if !live.errors.is_empty() {
                return Err(Error::Replay(format!("node errors: {:?}", live.errors)));
            }
            out.nodes = live.complete.clone();
            let rebuilt = match writer.query(request).await {
                Ok(Ok((w, _))) => merge_windows(w),
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => return Err(Error::Replay(e.to_string())),
            };
            let key = |w: &WindowRow| (w.series.clone(), w.field.clone(), w.start_ns);
            let live: std::collections::BTreeMap<_, _> =
                live.windows.into_iter().map(|w| (key(&w), w)).collect();
            let rebuilt: std::collections::BTreeMap<_, _> =
                rebuilt.into_iter().map(|w| (key(&w), w)).collect();
            let keys: std::collections::BTreeSet<_> =
                live.keys().chain(rebuilt.keys()).cloned().collect();
            out.windows += keys.len();
            let brief = |w: &WindowRow| (w.agg.count, w.agg.sum, w.agg.min, w.agg.max);
            for k in keys {
                let (r, l) = (rebuilt.get(&k), live.get(&k));
                let equal = matches!((r, l), (Some(a), Some(b)) if same(a, b));
                if !equal {
                    out.differences.push(Difference {
                        series: k.0.clone(),
                        field: k.1.clone(),
                        resolution_secs: res,
                        start_ns: k.2,
                        rebuilt: r.map(brief),
                        live: l.map(brief),
                    });
                }
            }
        }
        Ok(())
    }
    .await;
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    result.map(|()| out)
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
