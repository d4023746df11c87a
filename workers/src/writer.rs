//! The single LMDB writer thread.
//!
//! LMDB allows one writer, and heed transactions must not cross an `.await`,
//! so the [`Store`] lives on one dedicated thread fed by a channel; async tasks
//! send it work and await the answer.

use std::{sync::Arc, thread};

use tokio::sync::{mpsc, oneshot};

use crate::{
    events::Metrics,
    pause::Fence,
    query::QueryRequest,
    store::{Clock, LatestRow, Message, Store, StoreConfig, StoreError, Verdict, WindowRow},
};

/// A node's answer to a query: its windows and latest values.
type QueryResult = Result<(Vec<WindowRow>, Vec<LatestRow>), StoreError>;

/// What became of a batch sent to the writer.
pub(crate) enum Applied {
    /// Committed (one verdict per message), or nothing of it on an error.
    Done(Result<Vec<Verdict>, StoreError>),
    /// Its fence no longer held when the writer took it up: nothing of it
    /// was applied.
    GivenUp,
}

/// Work for the writer thread.
enum Command {
    Apply(Arc<Vec<Message>>, Option<Fence>, oneshot::Sender<Applied>),
    Query(QueryRequest, oneshot::Sender<QueryResult>),
    Retention(oneshot::Sender<Result<Vec<String>, StoreError>>),
}

/// Handle to the writer thread; cloning shares it.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Command>,
}

/// The writer thread stopped (the store panicked or was closed).
#[derive(Debug, thiserror::Error)]
#[error("the LMDB writer thread has stopped")]
pub struct WriterGone;

/// Compacts the days whose `recent` database is full enough, logging what
/// it did. A failure leaves the windows in `recent`, where readers find them,
/// and the next batch tries again.
fn compact_due(store: &mut Store, metrics: &Metrics) {
    match store.compact_due() {
        Ok(steps) => {
            for step in steps {
                metrics.compacted(&step.day, step.windows, step.seconds, step.done);
            }
        }
        Err(e) => metrics.compaction_failed(&e),
    }
}

impl Writer {
    /// Opens the store and starts the thread.
    ///
    /// # Errors
    /// What [`Store::open`] returns.
    pub fn start(
        config: StoreConfig,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
    ) -> Result<(Writer, thread::JoinHandle<()>), StoreError> {
        let mut store = Store::open(config, clock)?;
        let (tx, mut rx) = mpsc::channel::<Command>(16);
        let handle = thread::Builder::new()
            .name("lmdb-writer".into())
            .spawn(move || {
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Command::Apply(batch, fence, reply) => {
                            // Checked here, as late as can be: a batch
                            // waits in the channel while the one before
                            // commits.
                            let applied = if fence.is_some_and(|f| !f.holds()) {
                                Applied::GivenUp
                            } else {
                                Applied::Done(store.apply(&batch))
                            };
                            let _ = reply.send(applied);
                            // After the reply, so the batch's acknowledgements
                            // do not wait for it; the next batch does.
                            compact_due(&mut store, &metrics);
                        }
                        Command::Query(q, reply) => {
                            let res = store
                                .windows(
                                    &q.series,
                                    q.field.as_deref(),
                                    q.resolution_secs,
                                    q.from_ns,
                                    q.to_ns,
                                )
                                .and_then(|w| {
                                    let latest = if q.latest {
                                        store.latest(&q.series)?
                                    } else {
                                        Vec::new()
                                    };
                                    Ok((w, latest))
                                });
                            let _ = reply.send(res);
                        }
                        Command::Retention(reply) => {
                            let _ = reply.send(store.enforce_retention());
                        }
                    }
                }
                store.close();
            })
            .map_err(|source| StoreError::Io {
                path: "lmdb-writer thread".into(),
                source,
            })?;
        Ok((Writer { tx }, handle))
    }

    /// Applies and commits a batch, unless `fence` no longer holds when the
    /// writer takes it up.
    pub async fn apply(
        &self,
        batch: Arc<Vec<Message>>,
        fence: Option<Fence>,
    ) -> Result<Applied, WriterGone> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Apply(batch, fence, tx))
            .await
            .map_err(|_| WriterGone)?;
        rx.await.map_err(|_| WriterGone)
    }

    /// Answers a query from this node's store.
    pub async fn query(&self, q: QueryRequest) -> Result<QueryResult, WriterGone> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Query(q, tx))
            .await
            .map_err(|_| WriterGone)?;
        rx.await.map_err(|_| WriterGone)
    }

    /// Deletes days beyond retention.
    pub async fn enforce_retention(&self) -> Result<Result<Vec<String>, StoreError>, WriterGone> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Retention(tx))
            .await
            .map_err(|_| WriterGone)?;
        rx.await.map_err(|_| WriterGone)
    }
}
