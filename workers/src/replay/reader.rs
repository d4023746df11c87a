//! The consumer a replay reads through: an ordered consumer read ahead on
//! a task of its own, or a durable pull consumer read one bounded request
//! at a time, so that what was delivered and not processed can be handed
//! back at the end.

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

use super::ReplayConfig;
use crate::{
    consume::next_before,
    feed::Feed,
    incoming::{ConsumerLimits, Incoming},
    Error,
};

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
pub(super) struct Reader {
    messages: ReaderStream,
    pub(super) initial_pending: u64,
    /// An earlier run of the durable consumer left messages unacknowledged:
    /// they come back after the ack wait, and the run waits for them even
    /// once it is offered messages past its end.
    pub(super) earlier_run_held: bool,
    /// Key of the applied sequences
    /// ([`stream_identity`](crate::incoming::stream_identity)): the live
    /// workers'.
    identity: Arc<str>,
    /// The durable consumer's ack wait (it paces the in-progress acks of held messages).
    pub(super) ack_wait: Duration,
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
    pub(super) async fn open(
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
    pub(super) async fn next(
        &mut self,
        patience: Option<Duration>,
    ) -> Result<Option<Incoming>, Error> {
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

    pub(super) fn is_durable(&self) -> bool {
        matches!(self.messages, ReaderStream::Durable { .. })
    }

    /// The next message if it belongs to the batch in hand: for the ordered
    /// consumer, what arrives within 50 ms; for the durable one, the rest of
    /// the current pull request (never cancelled half-way, which would strand
    /// its messages until the ack wait).
    pub(super) async fn next_in_batch(&mut self) -> Result<Option<Incoming>, Error> {
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
    pub(super) async fn hand_back_buffered(&mut self) {
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
    pub(super) async fn outstanding(&mut self, parked: u64) -> u64 {
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
    pub(super) fn pending_after(&mut self, m: &Incoming, in_range: u64) -> u64 {
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
