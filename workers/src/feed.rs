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
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use async_nats::jetstream;
use futures::{FutureExt, Stream, StreamExt};
use tokio::{
    sync::mpsc::{self, error::SendError},
    time::Instant,
};
use tokio_util::task::AbortOnDropHandle;

use crate::consume::Incoming;

/// How a delivered message becomes an [`Incoming`] (acknowledged or not).
pub(crate) type Convert = fn(jetstream::Message, &Arc<str>) -> Incoming;

/// A consumer's messages, read ahead by a task of their own.
pub(crate) struct Feed<S> {
    chunks: mpsc::Receiver<Vec<Incoming>>,
    ready: std::vec::IntoIter<Incoming>,
    /// Shared with the task, which polls it; taken out on [`Feed::release`].
    stream: Arc<Mutex<Option<S>>>,
    convert: Convert,
    identity: Arc<str>,
    _task: AbortOnDropHandle<()>,
}

/// Messages moved from the task to the loop at a time, at most.
const CHUNK: usize = 512;

impl<S, E> Feed<S>
where
    S: Stream<Item = Result<jetstream::Message, E>> + Unpin + Send + 'static,
    E: Display,
{
    /// Reads `stream` on a new task, at most about `ahead` messages ahead of
    /// the loop. `identity` is the stream's ([`crate::consume::stream_identity`]);
    /// `label` names the consumer in the warnings about its transient errors
    /// (missed heartbeats and the like, from which the stream recovers by
    /// itself). What the task holds when the feed is released or dropped is
    /// handed back through `nats`.
    pub fn start(
        stream: S,
        identity: Arc<str>,
        convert: Convert,
        ahead: usize,
        nats: async_nats::Client,
        label: &'static str,
    ) -> Self {
        let stream = Arc::new(Mutex::new(Some(stream)));
        let (tx, chunks) = mpsc::channel(ahead.div_ceil(CHUNK).max(2));
        let shared = stream.clone();
        let id = identity.clone();
        let task = tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    () = tx.closed() => return,
                    item = poll_fn(|cx| poll_shared(&shared, cx)) => item,
                };
                let mut chunk = Vec::with_capacity(CHUNK);
                let mut open = take(&mut chunk, first, convert, &id, label);
                while open && chunk.len() < CHUNK {
                    match poll_fn(|cx| poll_shared(&shared, cx)).now_or_never() {
                        Some(item) => open = take(&mut chunk, item, convert, &id, label),
                        None => break,
                    }
                }
                if !chunk.is_empty() {
                    if let Err(SendError(chunk)) = tx.send(chunk).await {
                        // Released meanwhile.
                        for m in chunk {
                            m.hand_back(&nats).await;
                        }
                        return;
                    }
                }
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

    /// The next message; `None` once the stream ended or the feed was released.
    pub async fn next(&mut self) -> Option<Incoming> {
        if let Some(m) = self.ready.next() {
            return Some(m);
        }
        self.ready = self.chunks.recv().await?.into_iter();
        self.ready.next()
    }

    /// The next message if it arrives before `deadline`: `Some(None)` at the
    /// end, `None` at the deadline. What is already here is taken without
    /// arming a timer.
    pub async fn next_before(&mut self, deadline: Instant) -> Option<Option<Incoming>> {
        if let Some(m) = self.ready.next() {
            return Some(Some(m));
        }
        if let Some(item) = self.next().now_or_never() {
            return Some(item);
        }
        tokio::time::timeout_at(deadline, self.next()).await.ok()
    }

    /// Stops reading and returns what was delivered and not yet taken: the
    /// loop's queue and what the stream itself buffered. The stream is
    /// dropped, which ends its pull requests (the server checks the reply
    /// subject's interest), so nothing more comes to this feed; a chunk the
    /// task was still sending is handed back by the task.
    pub fn release(&mut self) -> Vec<Incoming> {
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
            while let Some(Some(item)) = stream.next().now_or_never() {
                if let Ok(m) = item {
                    held.push((self.convert)(m, &self.identity));
                }
            }
        }
        held
    }
}

/// Polls the stream unless it was released (then it has ended).
fn poll_shared<S: Stream + Unpin>(
    shared: &Mutex<Option<S>>,
    cx: &mut Context<'_>,
) -> Poll<Option<S::Item>> {
    match shared
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        Some(stream) => stream.poll_next_unpin(cx),
        None => Poll::Ready(None),
    }
}

/// Adds a delivered message to `chunk`; false at the end of the stream.
fn take<E: Display>(
    chunk: &mut Vec<Incoming>,
    item: Option<Result<jetstream::Message, E>>,
    convert: Convert,
    identity: &Arc<str>,
    label: &'static str,
) -> bool {
    match item {
        Some(Ok(m)) => chunk.push(convert(m, identity)),
        Some(Err(e)) => tracing::warn!(error = %e, "{label}"),
        None => return false,
    }
    true
}
