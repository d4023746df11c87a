//! Turning a batch of NATS messages into one LMDB commit, then acknowledging.
//!
//! The same path serves core and JetStream consumption: decode (pure), apply
//! and commit on the writer thread, dead-letter what cannot be applied, and
//! only then acknowledge (JetStream). A failing commit is retried, with
//! in-progress acks so JetStream does not hand the batch to another replica,
//! and the worker reports not-ready meanwhile; nothing is dropped.

use std::{sync::Arc, time::Duration};

use async_nats::{
    jetstream::{self, AckKind},
    HeaderMap,
};
use bytes::Bytes;
use futures::StreamExt;
use opentelemetry::propagation::Extractor;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use windrow_jetstream::{decode_subject, headers};
use windrow_ops::Health;

use crate::{
    config::Config,
    decode::decode,
    events::Metrics,
    store::{Message, Verdict},
    writer::Writer,
};

/// One message from either consumption mode.
pub(crate) struct Incoming {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    /// Present in jetstream mode: the message to acknowledge.
    pub js: Option<jetstream::Message>,
}

impl Incoming {
    pub fn core(m: async_nats::Message) -> Self {
        Self {
            subject: m.subject.to_string(),
            headers: m.headers,
            payload: m.payload,
            js: None,
        }
    }

    pub fn jetstream(m: jetstream::Message) -> Self {
        Self {
            subject: m.subject.to_string(),
            headers: m.headers.clone(),
            payload: m.payload.clone(),
            js: Some(m),
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// A span continuing the bridge's trace, for messages that carry `traceparent`.
fn continue_trace(name: &'static str, headers: Option<&HeaderMap>) -> Option<tracing::Span> {
    let h = headers?;
    h.get(headers::TRACEPARENT)?;
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h)));
    let span = match name {
        "worker.fetch" => tracing::info_span!("worker.fetch"),
        "worker.apply" => tracing::info_span!("worker.apply"),
        _ => tracing::info_span!("worker.commit"),
    };
    let _ = span.set_parent(parent);
    Some(span)
}

/// What happens to one message after the commit.
enum Fate {
    Ack,
    DeadLetter(&'static str, String),
}

/// Processes batches for one worker.
pub(crate) struct Processor {
    pub config: Arc<Config>,
    pub writer: Writer,
    pub nats: async_nats::Client,
    pub metrics: Metrics,
    pub health: Health,
}

impl Processor {
    /// Decodes, commits, dead-letters and acknowledges one batch.
    ///
    /// Returns when the batch is committed and acknowledged, or when `hard_stop`
    /// fires first (then nothing of it is acknowledged, and JetStream redelivers).
    pub async fn process(&self, batch: Vec<Incoming>, hard_stop: &CancellationToken) {
        if batch.is_empty() {
            return;
        }
        self.metrics.consumed(batch.len());
        let prefix = &self.config.nats.subject_prefix;
        let mut fates: Vec<Fate> = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        let mut owners = Vec::with_capacity(batch.len());
        let mut spans = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            if let Some(span) = continue_trace("worker.fetch", m.headers.as_ref()) {
                spans.push((i, span));
            }
            let topic = match decode_subject(prefix, &m.subject) {
                Ok(t) => t,
                Err(e) => {
                    fates.push(Fate::DeadLetter("bad_subject", e.to_string()));
                    continue;
                }
            };
            let received_at = m
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::RECEIVED_AT))
                .and_then(|v| v.as_str().parse::<i64>().ok());
            match decode(&self.config.decode, &topic, &m.payload, received_at) {
                Ok(samples) => {
                    let stream_seq =
                        m.js.as_ref()
                            .and_then(|js| js.info().ok())
                            .map(|info| (info.stream.to_owned(), info.stream_sequence));
                    owners.push(i);
                    messages.push(Message {
                        stream_seq,
                        samples,
                    });
                    fates.push(Fate::Ack);
                }
                Err(e) => fates.push(Fate::DeadLetter(e.reason(), e.to_string())),
            }
        }
        let apply_spans: Vec<tracing::Span> = spans
            .iter()
            .filter_map(|(i, _)| continue_trace("worker.apply", batch[*i].headers.as_ref()))
            .collect();
        let messages = Arc::new(messages);
        let started = Instant::now();
        let verdicts = match self.commit(&batch, &messages, hard_stop).await {
            Some(v) => v,
            None => return,
        };
        drop(apply_spans);
        let commit_spans: Vec<tracing::Span> = spans
            .iter()
            .filter_map(|(i, _)| continue_trace("worker.commit", batch[*i].headers.as_ref()))
            .collect();
        let mut applied = 0;
        let mut duplicates = 0;
        for (verdict, owner) in verdicts.iter().zip(&owners) {
            match verdict {
                Verdict::Applied => applied += 1,
                Verdict::Duplicate => duplicates += 1,
                Verdict::TooLate => {
                    fates[*owner] = Fate::DeadLetter(
                        "too_late",
                        "sample older than the allowed lateness".into(),
                    )
                }
                Verdict::TooEarly => {
                    fates[*owner] =
                        Fate::DeadLetter("too_early", "sample time too far in the future".into())
                }
                Verdict::Invalid => {
                    fates[*owner] =
                        Fate::DeadLetter("invalid", "series or field cannot be stored".into())
                }
            }
        }
        self.metrics.committed(
            messages.len(),
            applied,
            duplicates,
            started.elapsed().as_secs_f64(),
        );
        drop(commit_spans);
        drop(spans);
        self.settle(batch, fates).await;
    }

    /// Applies the batch, retrying a failed commit until it succeeds.
    async fn commit(
        &self,
        batch: &[Incoming],
        messages: &Arc<Vec<Message>>,
        hard_stop: &CancellationToken,
    ) -> Option<Vec<Verdict>> {
        let mut backoff = Duration::from_millis(100);
        let mut last_progress = Instant::now();
        loop {
            match self.writer.apply(messages.clone()).await {
                Ok(Ok(v)) => {
                    self.health.set("store", true);
                    return Some(v);
                }
                Ok(Err(e)) => {
                    self.metrics.store_error(&e);
                    self.health.set("store", false);
                }
                Err(gone) => {
                    tracing::error!(error = %gone, "cannot commit");
                    self.health.set("store", false);
                    return None;
                }
            }
            // Keep JetStream from redelivering the batch to another replica while
            // this one retries.
            if last_progress.elapsed() > Duration::from_secs(self.config.ack_wait_secs / 3 + 1) {
                for m in batch.iter().filter_map(|m| m.js.as_ref()) {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
                last_progress = Instant::now();
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = hard_stop.cancelled() => return None,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Dead-letters and acknowledges after the commit.
    async fn settle(&self, batch: Vec<Incoming>, fates: Vec<Fate>) {
        let mut acks = Vec::with_capacity(batch.len());
        for (m, fate) in batch.into_iter().zip(fates) {
            match fate {
                Fate::Ack => {
                    if let Some(js) = m.js {
                        acks.push((js, AckKind::Ack));
                    }
                }
                Fate::DeadLetter(reason, detail) => {
                    self.metrics.dead_lettered(reason, &m.subject, &detail);
                    if self.config.dead_letter {
                        let mut h = m.headers.clone().unwrap_or_default();
                        h.insert(headers::DEAD_LETTER_REASON, reason);
                        h.insert(
                            "Windrow-Dead-Letter-Detail",
                            detail.replace(['\r', '\n'], " ").as_str(),
                        );
                        h.insert("Windrow-Original-Subject", m.subject.as_str());
                        if let Err(e) = self
                            .nats
                            .publish_with_headers(
                                self.config.dead_letter_subject.clone(),
                                h,
                                m.payload.clone(),
                            )
                            .await
                        {
                            tracing::error!(error = %e, "cannot publish dead-letter message");
                        }
                    }
                    // Terminated, not acked: JetStream must not redeliver a poison message.
                    if let Some(js) = m.js {
                        acks.push((js, AckKind::Term));
                    }
                }
            }
        }
        if acks.is_empty() {
            return;
        }
        // The dead-letter copies must be on their way before the originals are terminated.
        let _ = self.nats.flush().await;
        futures::stream::iter(acks)
            .for_each_concurrent(256, |(m, kind)| async move {
                let res = match kind {
                    AckKind::Ack => m.double_ack().await,
                    other => m.ack_with(other).await,
                };
                if let Err(e) = res {
                    tracing::warn!(error = %e, "acknowledgement failed; the message will be redelivered and skipped as a duplicate");
                }
            })
            .await;
    }
}
