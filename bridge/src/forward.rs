//! Forwarding received MQTT messages into NATS, and the acknowledgements that follow.
//!
//! The connection task calls [`Forwarder::handle`] for each publish, in order of
//! receipt, so JetStream stores a topic's messages in MQTT order (retries aside).
//! What must happen later (a JetStream ack, then the MQTT ack) goes to the
//! connection's [`acker`](run_acker) task, so the connection task keeps reading.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use async_nats::jetstream::{
    self,
    context::{PublishAckFuture, PublishErrorKind},
    message::PublishMessage,
    publish::PublishAck,
};
use futures::{
    future::{BoxFuture, Either},
    stream::FuturesUnordered,
    FutureExt, StreamExt,
};
use rumqttc::{Publish, QoS};
use tokio::{
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use windrow_jetstream::{headers, subject};
use windrow_ops::Health;

use crate::{
    config::{Config, Delivery, MessageIdMode, RetainedPolicy, Route},
    envelope::{self, Envelope},
    events::{DropReason, Metrics},
    mqtt::{AckGate, AckResult},
    trace::Sampler,
};

/// A message whose MQTT acknowledgement waits on something.
pub(crate) enum ToAcker {
    /// Send this MQTT ack (already handled; no JetStream ack to wait for).
    Ack(Ack),
    /// Wait for the JetStream ack, retrying with the same id, then send the MQTT ack.
    Pending(Box<InFlight>),
}

/// An MQTT acknowledgement owed for a packet of connection generation `generation`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ack {
    pub generation: u64,
    pub qos: QoS,
    pub pkid: u16,
}

/// A JetStream publish awaiting its ack.
pub(crate) struct InFlight {
    envelope: Envelope,
    ack: Ack,
    received: Instant,
    attempt: u32,
    first: Option<PublishAckFuture>,
    /// This message's share of `max_in_flight`, returned when it is dropped.
    _permit: OwnedSemaphorePermit,
    _span: Option<tracing::Span>,
}

/// The readiness condition of JetStream publishes ([`Forwarder::retry_started`]).
const JETSTREAM_READY: &str = "jetstream";

/// Shared by all MQTT connections of one bridge process.
pub(crate) struct Forwarder {
    prefix: String,
    routes: Vec<Route>,
    message_id: MessageIdMode,
    dead_letter_subject: Option<String>,
    retry_min: Duration,
    retry_max: Duration,
    nats: async_nats::Client,
    js: jetstream::Context,
    /// `max_in_flight` permits, one held by each [`InFlight`] from its first
    /// publish until its JetStream ack. The JetStream context's own limit is
    /// not enough: it counts only publishes awaiting an ack, and one that timed
    /// out and waits for its retry holds no slot there, so during a NATS outage
    /// the bridge would keep reading MQTT past `max_in_flight`.
    in_flight: Arc<Semaphore>,
    metrics: Metrics,
    sampler: Sampler,
    health: Health,
    /// JetStream publishes failed at least once and not yet landed, across
    /// all connections ([`Forwarder::retry_started`]).
    retrying: AtomicUsize,
}

impl Forwarder {
    pub fn new(
        config: &Config,
        nats: async_nats::Client,
        metrics: Metrics,
        health: Health,
        sample_ratio: f64,
    ) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(config.nats.request_timeout_secs))
            .max_ack_inflight(config.max_in_flight)
            .backpressure_on_inflight(true)
            .build(nats.clone());
        Self {
            prefix: config.nats.subject_prefix.clone(),
            routes: config.routes.clone(),
            message_id: config.message_id,
            dead_letter_subject: config
                .dead_letter
                .then(|| config.dead_letter_subject.clone()),
            retry_min: Duration::from_millis(config.retry_min_ms),
            retry_max: Duration::from_millis(config.retry_max_ms),
            nats,
            js,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            metrics,
            sampler: Sampler::new(sample_ratio),
            health,
            retrying: AtomicUsize::new(0),
        }
    }

    /// A JetStream publish failed for the first time and will be retried.
    /// While any is being retried (no stream captures its subject, JetStream
    /// unavailable) the readiness condition `jetstream` is false: the pod is
    /// up, but what it takes from MQTT does not land. Set only when the count
    /// leaves or reaches 0, so that publishes landing meanwhile on other
    /// subjects or connections do not make it flap.
    fn retry_started(&self) {
        if self.retrying.fetch_add(1, Ordering::AcqRel) == 0 {
            self.health.set(JETSTREAM_READY, false);
        }
    }

    /// A retried publish landed, or was given up (oversize).
    fn retry_ended(&self) {
        if self.retrying.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.health.set(JETSTREAM_READY, true);
            tracing::info!("every retried JetStream publish has landed");
        }
    }

    /// Forwards one publish; returns what the acker must do for it, if anything.
    ///
    /// Waits (backpressure) while `max_in_flight` JetStream publishes are
    /// unacknowledged (awaiting their ack or a retry) or the NATS client's
    /// buffer is full.
    pub async fn handle(&self, publish: Publish, generation: u64) -> Option<ToAcker> {
        let received = Instant::now();
        let ack = Ack {
            generation,
            qos: publish.qos,
            pkid: publish.pkid,
        };
        let done = (publish.qos != QoS::AtMostOnce).then_some(ToAcker::Ack(ack));
        let Some(route) = self
            .routes
            .iter()
            .find(|r| subject::topic_matches(&r.filter, &publish.topic))
        else {
            self.metrics
                .dropped(DropReason::NoRoute, &publish.topic, "no route matches");
            return done;
        };
        if publish.retain && route.retained == RetainedPolicy::Ignore {
            self.metrics
                .dropped(DropReason::RetainedIgnored, &publish.topic, "");
            return done;
        }
        let mut env = match envelope::build(
            &self.prefix,
            &publish,
            self.message_id,
            envelope::now_unix_nanos(),
        ) {
            Ok(env) => env,
            Err(e) => {
                self.reject(&publish, DropReason::InvalidTopic, &e.to_string())
                    .await;
                return done;
            }
        };
        let span = self.sampler.sample().then(|| {
            let span = tracing::info_span!(
                "bridge.forward",
                messaging.system = "nats",
                messaging.destination.name = %env.subject,
                mqtt.qos = envelope::qos_number(publish.qos),
                delivery = Metrics::delivery_name(route.delivery),
            );
            env.trace(&span);
            span
        });
        match route.delivery {
            Delivery::Core => {
                let res = self
                    .nats
                    .publish_with_headers(env.subject.clone(), env.headers(), env.payload)
                    .await;
                match res {
                    Ok(()) => self
                        .metrics
                        .forwarded(Delivery::Core, received.elapsed().as_secs_f64()),
                    Err(e)
                        if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded =>
                    {
                        self.reject(&publish, DropReason::Oversize, &e.to_string())
                            .await;
                    }
                    Err(e) => {
                        // The client is closing: leave QoS 1/2 unacknowledged so the
                        // broker redelivers them.
                        tracing::warn!(error = %e, "core publish failed");
                        return None;
                    }
                }
                done
            }
            Delivery::Jetstream => {
                let permit = Arc::clone(&self.in_flight)
                    .acquire_owned()
                    .await
                    .expect("the in-flight semaphore is never closed");
                let first = match self.send(&env).await {
                    Ok(f) => Some(f),
                    Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                        self.reject(&publish, DropReason::Oversize, &e.to_string())
                            .await;
                        return done;
                    }
                    Err(e) => {
                        self.retry_started();
                        self.metrics.publish_retry(1, &e);
                        None
                    }
                };
                self.metrics.in_flight.inc();
                Some(ToAcker::Pending(Box::new(InFlight {
                    envelope: env,
                    ack,
                    received,
                    attempt: u32::from(first.is_none()),
                    first,
                    _permit: permit,
                    _span: span,
                })))
            }
        }
    }

    async fn send(
        &self,
        env: &Envelope,
    ) -> Result<PublishAckFuture, jetstream::context::PublishError> {
        let msg = PublishMessage::build()
            .payload(env.payload.clone())
            .headers(env.headers());
        self.js.send_publish(env.subject.clone(), msg).await
    }

    /// Counts a message that cannot be forwarded and dead-letters its metadata.
    async fn reject(&self, publish: &Publish, reason: DropReason, detail: &str) {
        self.metrics.dropped(reason, &publish.topic, detail);
        let Some(subject) = &self.dead_letter_subject else {
            return;
        };
        let meta = DeadLetter {
            reason: reason.as_str(),
            detail,
            topic: &publish.topic,
            qos: envelope::qos_number(publish.qos),
            retain: publish.retain,
            payload_bytes: publish.payload.len(),
            received_at_ns: envelope::now_unix_nanos(),
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::DEAD_LETTER_REASON, reason.as_str());
        h.insert(
            headers::DEAD_LETTER_PAYLOAD_BYTES,
            publish.payload.len().to_string().as_str(),
        );
        let body = match serde_json::to_vec(&meta) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode dead-letter record");
                return;
            }
        };
        match self
            .nats
            .publish_with_headers(subject.clone(), h, body.into())
            .await
        {
            Ok(()) => self.metrics.dead_lettered(),
            Err(e) => tracing::error!(error = %e, "cannot publish dead-letter record"),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .retry_min
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        exp.min(self.retry_max)
    }
}

/// The dead-letter record: the message's metadata and why it was not forwarded.
#[derive(serde::Serialize)]
struct DeadLetter<'a> {
    reason: &'static str,
    detail: &'a str,
    topic: &'a str,
    qos: u8,
    retain: bool,
    payload_bytes: usize,
    received_at_ns: u128,
}

/// What a JetStream publish came to.
type Settled = (
    Box<InFlight>,
    Result<PublishAck, jetstream::context::PublishError>,
);

/// The first attempt's ack: the common case, so it is not boxed (the acker's
/// queue allocates each entry anyway) and it holds only the ack future.
async fn first_ack(ack: PublishAckFuture, f: Box<InFlight>) -> Settled {
    let res = ack.await;
    (f, res)
}

/// The acker's set of publishes awaiting their acks: first attempts as
/// `first` makes them, retries boxed. (Naming `first`'s future type here lets
/// the set's type be known before anything is pushed.)
fn publishes<F>(
    _first: impl Fn(PublishAckFuture, Box<InFlight>) -> F,
) -> FuturesUnordered<Either<F, BoxFuture<'static, Settled>>>
where
    F: std::future::Future<Output = Settled>,
{
    FuturesUnordered::new()
}

/// A retry after its backoff, with the same message id.
fn retry(fwd: Arc<Forwarder>, f: Box<InFlight>) -> BoxFuture<'static, Settled> {
    async move {
        tokio::time::sleep(fwd.backoff(f.attempt)).await;
        let res = match fwd.send(&f.envelope).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        (f, res)
    }
    .boxed()
}

/// Completes one connection's JetStream publishes and sends its MQTT acks.
///
/// Ends when `rx` is closed (the connection stopped taking messages) and all
/// pending publishes are acknowledged, or at once when `hard_stop` fires
/// (whatever is unacknowledged then is redelivered by the broker).
pub(crate) async fn run_acker(
    fwd: Arc<Forwarder>,
    gate: Arc<AckGate>,
    mut rx: mpsc::Receiver<ToAcker>,
    hard_stop: CancellationToken,
) {
    let mut pending = publishes(first_ack);
    // MQTT acks the client's request channel could not take yet; retried shortly,
    // never by blocking (the connection task must keep polling to drain it).
    let mut backlog: VecDeque<Ack> = VecDeque::new();
    // When to try the backlog again. One timer, re-armed only while acks
    // wait: select! builds every branch's future on every turn, enabled or not.
    let backlog_retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(backlog_retry);
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            () = hard_stop.cancelled() => break,
            Some((mut f, res)) = pending.next() => match res {
                Ok(ack) => {
                    if f.attempt > 0 {
                        fwd.retry_ended();
                    }
                    fwd.metrics.in_flight.dec();
                    if ack.duplicate {
                        fwd.metrics.duplicate();
                    }
                    fwd.metrics.forwarded(Delivery::Jetstream, f.received.elapsed().as_secs_f64());
                    if f.ack.qos != QoS::AtMostOnce {
                        backlog.push_back(f.ack);
                    }
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    if f.attempt > 0 {
                        fwd.retry_ended();
                    }
                    fwd.metrics.in_flight.dec();
                    fwd.metrics.dropped(DropReason::Oversize, f.envelope.subject.as_str(), &e.to_string());
                    if f.ack.qos != QoS::AtMostOnce {
                        backlog.push_back(f.ack);
                    }
                }
                Err(e) => {
                    if f.attempt == 0 {
                        fwd.retry_started();
                    }
                    f.attempt += 1;
                    fwd.metrics.publish_retry(f.attempt, &e);
                    pending.push(Either::Right(retry(fwd.clone(), f)));
                }
            },
            msg = rx.recv(), if open => match msg {
                Some(ToAcker::Ack(a)) => backlog.push_back(a),
                Some(ToAcker::Pending(mut f)) => match f.first.take() {
                    Some(ack) => pending.push(Either::Left(first_ack(ack, f))),
                    // The first send failed (counted then): retried after its backoff.
                    None => pending.push(Either::Right(retry(fwd.clone(), f))),
                },
                None => open = false,
            },
            () = &mut backlog_retry, if !backlog.is_empty() => {},
            else => break,
        }
        while let Some(a) = backlog.front().copied() {
            match gate.try_ack(a) {
                AckResult::Sent | AckResult::Stale => {
                    backlog.pop_front();
                }
                AckResult::Full => {
                    backlog_retry
                        .as_mut()
                        .reset(Instant::now() + Duration::from_millis(1));
                    break;
                }
            }
        }
        if !open && pending.is_empty() && backlog.is_empty() {
            break;
        }
    }
    let left = pending.len();
    if left > 0 {
        fwd.metrics.in_flight.dec_by(left as i64);
        tracing::warn!(
            unacknowledged = left,
            "stopped with JetStream publishes unacknowledged; the broker redelivers them"
        );
    }
}
