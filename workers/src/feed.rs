//! A JetStream consumer read on a task of its own, ahead of the loop that
//! batches its messages.
//!
//! async-nats' pull streams ask the server for more messages only while they
//! are polled. Polled from the loop that also decodes each batch and waits for
//! the commit before, a stream stopped asking whenever the loop was busy, and
//! the server ran dry: reading and applying alternated instead of overlapping.
//! The ordered consumer of a replay, which asks for 500 messages at a time,
//! lost most. A feed keeps polling while the loop works, up to a bound, and
//! takes each message apart on its own task too.

use std::{
    fmt::Display,
    future::poll_fn,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use async_nats::jetstream;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::incoming::Incoming;

/// How a delivered message becomes an [`Incoming`] (acknowledged or not).
pub(crate) type Convert = fn(jetstream::Message, &Arc<str>) -> Incoming;

/// A consumer's messages, read ahead by a task of their own.
///
/// As a [`Stream`], it yields the messages in order and ends when the
/// consumer's stream ends or the feed is released. Cancel safe: a message
/// is taken from the queue only in the poll that returns it.
pub(crate) struct Feed<S> {
    chunks: mpsc::Receiver<Vec<Incoming>>,
    ready: std::vec::IntoIter<Incoming>,
    /// Shared with the task, which polls it; taken out on [`Feed::release`].
    stream: Arc<Mutex<Option<S>>>,
    convert: Convert,
    identity: Arc<str>,
    _task: AbortOnDropHandle<()>,
}

/// Messages moved from the task to the loop at a time, at most (fewer when
/// fewer have arrived, or when the task's cooperative budget runs out).
const CHUNK: usize = 512;

impl<S, E> Feed<S>
where
    S: Stream<Item = Result<jetstream::Message, E>> + Unpin + Send + 'static,
    E: Display,
{
    /// Reads `stream` on a new task, at most `ahead / 512` chunks (of at most
    /// 512 messages) ahead of the loop; the stream's own buffer comes on top.
    /// `identity` is the stream's ([`crate::incoming::stream_identity`]);
    /// `label` names the consumer in the warnings about its transient errors
    /// (missed heartbeats and the like, from which it recovers by itself).
    pub fn start(
        stream: S,
        identity: Arc<str>,
        convert: Convert,
        ahead: usize,
        label: &'static str,
    ) -> Self {
        let stream = Arc::new(Mutex::new(Some(stream)));
        let (tx, chunks) = mpsc::channel(ahead.div_ceil(CHUNK).max(2));
        let shared = stream.clone();
        let id = identity.clone();
        let task = tokio::spawn(async move {
            // Room in the queue first: a chunk is then queued in the same
            // step, under the lock, that took it from the stream, so that
            // `release` finds every message either still in the stream or
            // already in the queue, never in this task's hands.
            while let Ok(permit) = tx.reserve().await {
                let mut permit = Some(permit);
                let open = tokio::select! {
                    // Wakes this task once `release` took the stream away
                    // (and with it the waker the stream held).
                    () = tx.closed() => false,
                    open = poll_fn(|cx| {
                        let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
                        let Some(stream) = guard.as_mut() else {
                            return Poll::Ready(false);
                        };
                        let (chunk, open) = poll_chunk(stream, cx, convert, &id, label);
                        if chunk.is_empty() && open {
                            return Poll::Pending;
                        }
                        if let Some(permit) = permit.take() {
                            if !chunk.is_empty() {
                                permit.send(chunk);
                            }
                        }
                        Poll::Ready(open)
                    }) => open,
                };
                if !open {
                    return; // dropping `tx` ends the feed
                }
            }
        });
        Self {
            chunks,
            ready: Vec::new().into_iter(),
            stream,
            convert,
            identity,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Stops reading and returns what was delivered and not yet taken: the
    /// loop's queue and what the stream itself buffered. The stream is
    /// dropped, which ends its pull requests (the server checks the reply
    /// subject's interest), so nothing more comes to this feed.
    ///
    /// Taking the stream's buffer can make it send one more pull request
    /// (async-nats asks for more whenever fewer than half a batch are due)
    /// just before it is dropped. What the server sends for it, if it is
    /// not at the consumer's `max_ack_pending`, reaches no one and is
    /// redelivered after the ack wait: later, never twice.
    pub fn release(mut self) -> Vec<Incoming> {
        let stream = self
            .stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.chunks.close();
        let mut held: Vec<Incoming> = std::mem::take(&mut self.ready).collect();
        while let Ok(chunk) = self.chunks.try_recv() {
            held.extend(chunk);
        }
        if let Some(mut stream) = stream {
            // Unconstrained: the cooperative budget of the calling task
            // would otherwise end this after about a hundred messages.
            while let Some(Some(item)) = tokio::task::unconstrained(stream.next()).now_or_never() {
                if let Ok(m) = item {
                    held.push((self.convert)(m, &self.identity));
                }
            }
        }
        held
    }
}

impl<S> Stream for Feed<S> {
    type Item = Incoming;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        if let Some(m) = self.ready.next() {
            return Poll::Ready(Some(m));
        }
        match self.chunks.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => {
                self.ready = chunk.into_iter();
                Poll::Ready(self.ready.next())
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What `stream` has ready, up to a chunk; false at its end.
fn poll_chunk<S, E>(
    stream: &mut S,
    cx: &mut Context<'_>,
    convert: Convert,
    identity: &Arc<str>,
    label: &'static str,
) -> (Vec<Incoming>, bool)
where
    S: Stream<Item = Result<jetstream::Message, E>> + Unpin,
    E: Display,
{
    let mut chunk = Vec::new();
    // Bounded in polls, not only in messages: a run of errors must not keep
    // this task from yielding.
    for _ in 0..CHUNK {
        match stream.poll_next_unpin(cx) {
            Poll::Pending => return (chunk, true),
            Poll::Ready(Some(Ok(m))) => {
                if chunk.is_empty() {
                    chunk.reserve(CHUNK);
                }
                chunk.push(convert(m, identity));
            }
            Poll::Ready(Some(Err(e))) => tracing::warn!(error = %e, "{label}"),
            Poll::Ready(None) => return (chunk, false),
        }
    }
    // The stream had more: come back for it, even with nothing to send yet.
    cx.waker().wake_by_ref();
    (chunk, true)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::jetstream::consumer::{pull, AckPolicy};
    use windrow_harness::{clients::create_stream, NatsServer};

    use super::*;

    /// Every message the server delivered to a released feed is either one
    /// it yielded or one it returned: none is left to wait out the ack wait
    /// (the task's hands, the queue and the stream's buffer are all emptied).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_released_feed_returns_every_delivered_message_it_did_not_yield() {
        let nats = NatsServer::start().await;
        create_stream(&nats.url(), "FEED", &["feed.>"], Duration::from_secs(60)).await;
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = jetstream::new(client.clone());
        for i in 0..5_000 {
            js.publish(format!("feed.d{}", i % 7), "1".into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
        let stream = js.get_stream("FEED").await.expect("stream");
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("feed".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(120),
                // Two pull requests' worth, both sent before the loop below
                // has taken 700. Draining the stream in `release` may send it
                // one more request before it is dropped; at this cap the
                // server cannot serve it, so the count below is exact.
                max_ack_pending: 2_000,
                ..Default::default()
            })
            .await
            .expect("consumer");
        let received = || {
            client
                .statistics()
                .in_messages
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let before = received();
        let pull = consumer
            .stream()
            .max_messages_per_batch(1_000)
            .messages()
            .await
            .expect("pull");
        let mut feed = Feed::start(pull, "FEED@0".into(), Incoming::jetstream, 1_024, "test");
        let mut yielded = 0;
        while yielded < 700 {
            let m = feed.next().await.expect("a message");
            assert!(m.reply.is_some(), "an acknowledgeable message");
            yielded += 1;
        }
        // The task fills its queue and stops polling, and the stream's pull
        // requests are served in full: wait until the server's count of
        // delivered messages stands still, and the client has read them all
        // (its count of messages in, less one reply per consumer info), so
        // that none is in flight however slow the machine. (No heartbeats
        // are asked for, and the pull requests expire long after this loop;
        // a status message would only end the wait early, and fail it.)
        let mut consumer = consumer;
        let mut delivered = 0;
        for infos in 1..=50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = consumer
                .info()
                .await
                .expect("consumer info")
                .num_ack_pending;
            let read = (received() - before).saturating_sub(infos);
            if now == delivered && read >= now as u64 {
                break;
            }
            delivered = now;
        }
        let held = feed.release();
        assert!(held.iter().all(|m| m.reply.is_some()));
        let info = consumer.info().await.expect("consumer info");
        assert_eq!(
            info.num_ack_pending as usize,
            yielded + held.len(),
            "delivered = yielded + returned ({yielded} yielded, {} returned)",
            held.len()
        );
        assert_eq!(
            info.num_ack_pending, 2_000,
            "the feed read ahead to the cap"
        );
    }
}
