//! What a worker or a replay takes in: a message from either consumption
//! mode (or a replay), where its stream stored it, the stream's identity,
//! and what a durable consumer allows.

use std::{sync::Arc, time::Duration};

use async_nats::{
    jetstream::{self, AckKind},
    HeaderMap,
};
use bytes::Bytes;
use windrow_jetstream::delivery::parse_delivery;

/// One message from either consumption mode, or from a replay.
///
/// Kept small (a batch holds up to a million of them, moved as they are
/// pushed): a JetStream message is taken apart, and of its acknowledgement
/// handle only the reply subject is kept. A whole `jetstream::Message` made
/// this 576 bytes, most of it the client's context, and copying batches of
/// it cost a tenth of the receiving thread.
pub(crate) struct Incoming {
    /// Shares the client's buffer: no copy per message.
    pub subject: async_nats::Subject,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    /// Where the stream stored it (JetStream): the key of idempotency.
    pub stored: Option<Stored>,
    /// Where to acknowledge it after the commit (explicit-ack consumers).
    pub reply: Option<async_nats::Subject>,
    /// Messages the consumer still had for this client after this one (JetStream).
    pub pending: Option<u64>,
}

/// A JetStream message's place and time in its stream.
pub(crate) struct Stored {
    /// The stream's identity ([`stream_identity`]), shared by every message.
    pub stream: Arc<str>,
    pub seq: u64,
    /// The stream's timestamp, Unix ns: lateness is judged against it.
    pub at_ns: i64,
}

impl Incoming {
    pub fn core(m: async_nats::Message) -> Self {
        Self {
            subject: m.subject,
            headers: m.headers,
            payload: m.payload,
            stored: None,
            reply: None,
            pending: None,
        }
    }

    /// From an explicit-ack consumer of the stream `identity`
    /// ([`stream_identity`]): acknowledged after its commit.
    pub fn jetstream(m: jetstream::Message, identity: &Arc<str>) -> Self {
        let (stored, pending) = stored(&m, identity);
        let m = m.message;
        Self {
            subject: m.subject,
            headers: m.headers,
            payload: m.payload,
            stored,
            reply: m.reply,
            pending,
        }
    }

    /// From a consumer without acknowledgements (an ordered replay).
    pub fn unacked(m: jetstream::Message, identity: &Arc<str>) -> Self {
        let mut incoming = Self::jetstream(m, identity);
        incoming.reply = None;
        incoming
    }

    /// Negatively acknowledges a durable consumer's message, so that it is
    /// redelivered at once rather than after the ack wait.
    pub async fn hand_back(self, nats: &async_nats::Client) {
        if let Some(reply) = self.reply {
            let _ = nats.publish(reply, AckKind::Nak(None).into()).await;
        }
    }
}

/// Where and when the stream stored `m`, and what its consumer still had
/// for this client, from the reply subject's metadata.
fn stored(m: &jetstream::Message, identity: &Arc<str>) -> (Option<Stored>, Option<u64>) {
    match m.reply.as_deref().and_then(parse_delivery) {
        Some(d) => (
            Some(Stored {
                stream: identity.clone(),
                seq: d.stream_seq,
                at_ns: d.stored_ns,
            }),
            Some(d.pending),
        ),
        None => (None, None),
    }
}

/// What the store records applied sequences under: the stream's name and
/// creation time. A stream deleted and created again (`windrow streams apply
/// --recreate`) numbers its messages from 1 again; keyed by name alone, its new
/// messages would be taken for ones already applied and silently skipped.
pub(crate) fn stream_identity(info: &jetstream::stream::Info) -> Arc<str> {
    format!(
        "{}@{}",
        info.config.name,
        info.created.unix_timestamp_nanos()
    )
    .into()
}

/// What a worker or a replay takes from a durable consumer as the server has
/// it, which may differ from what they asked for (declared in `[jetstream]`,
/// created by another role, or created before a setting changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConsumerLimits {
    /// The consumer's ack wait: the in-progress acks of held messages are
    /// paced by it.
    pub ack_wait: Duration,
    /// Messages per pull request: the wanted batch, at most half the
    /// consumer's `max_ack_pending`. A larger request is served only up to
    /// that limit and then waits for acks that come only after the batch is
    /// complete; up to half, the next batch is delivered while one commits.
    pub batch: usize,
}

impl ConsumerLimits {
    /// `batch_key` names the setting behind `wanted_batch` in the warning.
    pub fn of(info: &jetstream::consumer::Info, wanted_batch: usize, batch_key: &str) -> Self {
        let ack_wait = if info.config.ack_wait.is_zero() {
            Duration::from_secs(30) // the server's default
        } else {
            info.config.ack_wait
        };
        let mut batch = wanted_batch;
        if let Ok(limit) = usize::try_from(info.config.max_ack_pending) {
            let room = (limit / 2).max(1);
            if limit > 0 && room < batch {
                tracing::warn!(
                    durable = %info.name,
                    max_ack_pending = limit,
                    wanted = batch,
                    pulling = room,
                    "the consumer's max_ack_pending leaves room for less than two batches of {batch_key}; pulling half of max_ack_pending at a time, so that the next batch arrives while one commits"
                );
                batch = room;
            }
        }
        ConsumerLimits { ack_wait, batch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer as the server describes it, with these limits.
    fn consumer(max_ack_pending: i64, ack_wait_ns: u64) -> jetstream::consumer::Info {
        serde_json::from_value(serde_json::json!({
            "stream_name": "TELEMETRY",
            "name": "workers",
            "created": "2026-11-29T00:00:00Z",
            "config": {
                "durable_name": "workers",
                "deliver_policy": "all",
                "ack_policy": "explicit",
                "ack_wait": ack_wait_ns,
                "max_ack_pending": max_ack_pending,
                "replay_policy": "instant",
            },
            "delivered": { "consumer_seq": 0, "stream_seq": 0 },
            "ack_floor": { "consumer_seq": 0, "stream_seq": 0 },
            "num_ack_pending": 0,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": 0,
        }))
        .expect("a consumer info")
    }

    #[test]
    fn a_batch_fits_twice_in_the_consumers_max_ack_pending() {
        let limits = |pending, wanted| ConsumerLimits::of(&consumer(pending, 0), wanted, "batch");
        // Room for two batches: as asked.
        assert_eq!(limits(50_000, 20_000).batch, 20_000);
        assert_eq!(limits(40_000, 20_000).batch, 20_000);
        // Less: half of max_ack_pending, so one batch is read while one commits.
        assert_eq!(limits(20_000, 20_000).batch, 10_000);
        assert_eq!(limits(1, 100).batch, 1);
        // No limit on the server.
        assert_eq!(limits(-1, 20_000).batch, 20_000);
        assert_eq!(limits(0, 20_000).batch, 20_000);
    }

    /// The stream sequence, time and pending count read from real
    /// deliveries' reply subjects are what async-nats reads from them.
    #[tokio::test]
    async fn a_delivery_is_read_from_its_reply_subject_as_async_nats_reads_it() {
        use async_nats::jetstream::consumer::{pull, AckPolicy};
        use futures::StreamExt;
        use windrow_harness::{clients::create_stream, NatsServer};

        let nats = NatsServer::start().await;
        create_stream(&nats.url(), "DELIV", &["deliv.>"], Duration::from_secs(60)).await;
        let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        for i in 0..5 {
            js.publish(format!("deliv.d{i}"), "1".into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
        let consumer = js
            .get_stream("DELIV")
            .await
            .expect("stream")
            .create_consumer(pull::Config {
                durable_name: Some("deliv".into()),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut messages = consumer
            .fetch()
            .max_messages(5)
            .messages()
            .await
            .expect("fetch");
        let identity: Arc<str> = "DELIV@0".into();
        for _ in 0..5 {
            let m = messages
                .next()
                .await
                .expect("a message")
                .expect("delivered");
            let info = m.info().expect("async-nats reads the reply subject");
            let want = (
                info.stream_sequence,
                i64::try_from(info.published.unix_timestamp_nanos()).expect("i64 ns"),
                Some(info.pending),
            );
            let incoming = Incoming::jetstream(m, &identity);
            let stored = incoming.stored.expect("stored");
            assert_eq!((stored.seq, stored.at_ns, incoming.pending), want);
        }
    }

    #[test]
    fn the_ack_wait_is_the_consumers_or_the_servers_default() {
        let of = |ns| ConsumerLimits::of(&consumer(1000, ns), 10, "batch").ack_wait;
        assert_eq!(of(5_000_000_000), Duration::from_secs(5));
        assert_eq!(of(0), Duration::from_secs(30));
    }
}
