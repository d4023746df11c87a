//! The single LMDB writer thread, and the query plane's readers beside it.
//!
//! LMDB allows one writer, and heed transactions must not cross an `.await`,
//! so the [`Store`] lives on one dedicated thread fed by a channel; async tasks
//! send it work and await the answer. Queries do not go through it: they
//! read on blocking threads of their own ([`SharedReader`]), since a query
//! for one series over a long range can read up to a few million `recent`
//! windows, and on the writer thread every batch waited for it.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    events::Metrics,
    pause::Fence,
    query::QueryRequest,
    store::{
        Clock, LatestRow, Message, SharedReader, Store, StoreConfig, StoreError, Verdict, WindowRow,
    },
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
    Retention(oneshot::Sender<Result<Vec<String>, StoreError>>),
    /// Sent every [`IDLE`]: when no batch came for that long, a compaction
    /// in progress takes its next slice anyway.
    Idle,
    /// Holds the writer until the sender is dropped (tests: a writer busy
    /// for as long as they need).
    #[cfg(test)]
    Hold(std::sync::mpsc::Receiver<()>),
}

/// How long the writer waits for a batch before it goes on compacting
/// without one. Compaction otherwise advances only after batches: when
/// traffic stops, a loaded compaction would hold its windows in memory (about
/// 110 bytes each) and leave readers scanning `recent` until the next batch.
const IDLE: Duration = Duration::from_millis(200);

/// Handle to the writer thread and the store's readers; cloning shares it.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Command>,
    reader: SharedReader,
}

/// The writer thread stopped (the store panicked or was closed).
#[derive(Debug, thiserror::Error)]
#[error("the LMDB writer thread has stopped")]
pub struct WriterGone;

/// Compacts the days whose `recent` database is full enough, logging what
/// it did. A failure leaves the windows in `recent`, where readers find them,
/// and the next batch or idle tick tries again.
fn compact_due(store: &mut Store, metrics: &Metrics) {
    let mut steps = Vec::new();
    // The slices committed count even if a later one failed.
    let result = store.compact_due_into(&mut steps);
    for step in steps {
        if step.merge {
            metrics.merged_runs(&step.day, step.windows, step.seconds, step.done);
        } else {
            metrics.compacted(&step.day, step.windows, step.seconds, step.done);
        }
    }
    if let Err(e) = result {
        metrics.compaction_failed(&e);
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
        let reader = store.shared_reader();
        let (tx, mut rx) = mpsc::channel::<Command>(16);
        // The ticks stop when the writer's last handle is dropped: the ticker
        // holds only a weak one, so that the channel can close. At most one
        // tick is queued at a time: ticks piled up behind a slow slice would
        // each run a slice, and a batch behind them would wait for all.
        // (Without a runtime, as in a benchmark driving the writer from a
        // plain thread, there are no ticks: compaction then advances after
        // batches only.)
        let tick_queued = Arc::new(AtomicBool::new(false));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let ticks = tx.downgrade();
            let queued = tick_queued.clone();
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(IDLE).await;
                    let Some(tx) = ticks.upgrade() else { return };
                    // Never waits: a full channel means the writer is busy.
                    if !queued.swap(true, Ordering::AcqRel) && tx.try_send(Command::Idle).is_err() {
                        queued.store(false, Ordering::Release);
                    }
                }
            });
        }
        let handle = thread::Builder::new()
            .name("lmdb-writer".into())
            .spawn(move || {
                let mut last_batch = Instant::now();
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Command::Idle => {
                            tick_queued.store(false, Ordering::Release);
                            // Only when nothing else waits: a batch comes first.
                            if last_batch.elapsed() >= IDLE && rx.is_empty() {
                                compact_due(&mut store, &metrics);
                            }
                        }
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
                            last_batch = Instant::now();
                        }
                        #[cfg(test)]
                        Command::Hold(until) => {
                            let _ = until.recv();
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
        Ok((Writer { tx, reader }, handle))
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

    /// Answers a query from this node's store, on a blocking thread beside
    /// the writer: what is committed when each day's read begins.
    pub async fn query(&self, q: QueryRequest) -> Result<QueryResult, WriterGone> {
        if self.tx.is_closed() {
            return Err(WriterGone);
        }
        let store = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let store = store.snapshot();
            let windows = store.windows(
                &q.series,
                q.field.as_deref(),
                q.resolution_secs,
                q.from_ns,
                q.to_ns,
            )?;
            let latest = if q.latest {
                store.latest(&q.series)?
            } else {
                Vec::new()
            };
            Ok((windows, latest))
        })
        .await
        .map_err(|_| WriterGone)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::{
        query::QueryRequest,
        store::{
            tests::{msg, T0},
            ManualClock,
        },
    };

    /// A query is answered while the writer is busy (held here for as long
    /// as the test needs), from what was committed, and sees a day the
    /// writer opened after the query side was set up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_are_answered_while_the_writer_is_busy() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = StoreConfig {
            dir: dir.path().to_owned(),
            ..StoreConfig::default()
        };
        let clock = ManualClock::new(T0);
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let (writer, thread) =
            Writer::start(config, Arc::new(clock.clone()), metrics).expect("writer");
        let message = |series: &str, ts_ns| msg(None, series, ts_ns, 2.5);
        // One message today, then one on the next day (a day opened now).
        let applied = writer
            .apply(Arc::new(vec![message("d1", T0)]), None)
            .await
            .expect("writer");
        assert!(matches!(applied, Applied::Done(Ok(_))));
        let next_day = T0 + 86_400 * 1_000_000_000;
        clock.set(next_day);
        let applied = writer
            .apply(Arc::new(vec![message("d2", next_day)]), None)
            .await
            .expect("writer");
        assert!(matches!(applied, Applied::Done(Ok(_))));
        let (release, held) = std::sync::mpsc::channel();
        writer
            .tx
            .send(Command::Hold(held))
            .await
            .expect("the writer takes the hold");
        let query = QueryRequest {
            series: "*".into(),
            field: None,
            resolution_secs: 60,
            from_ns: T0 - 86_400 * 1_000_000_000,
            to_ns: next_day + 86_400 * 1_000_000_000,
            latest: true,
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), writer.query(query))
            .await
            .expect("answered while the writer is held")
            .expect("writer")
            .expect("read");
        let series: Vec<&str> = answer.0.iter().map(|w| w.series.as_str()).collect();
        assert_eq!(series, ["d1", "d2"]);
        assert_eq!(answer.1.len(), 2, "the latest value of each series");
        drop(release);
        drop(writer);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join")
            .expect("the writer thread ends once its handles are dropped");
    }

    /// One batch fills `recent` past its threshold and nothing follows: the
    /// compaction it starts still runs to its end, slice by slice, on the
    /// writer's idle ticks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compaction_goes_on_when_no_batch_comes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = StoreConfig {
            dir: dir.path().to_owned(),
            recent_max_windows: 10,
            compaction_slice_windows: 50,
            ..StoreConfig::default()
        };
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let (writer, thread) =
            Writer::start(config, Arc::new(ManualClock::new(T0)), metrics).expect("writer");
        // 200 series at two resolutions: 400 windows, eight slices.
        let batch = (0..200)
            .map(|i| msg(None, &format!("d{i}"), T0, 1.0))
            .collect();
        let applied = writer.apply(Arc::new(batch), None).await.expect("writer");
        assert!(matches!(applied, Applied::Done(Ok(_))));
        let metric = |name: &str| {
            let mut text = String::new();
            encode(&mut text, &registry).expect("metrics text");
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while metric("windrow_worker_compactions_total") == 0 {
            assert!(
                Instant::now() < deadline,
                "no compaction finished without batches ({} windows merged)",
                metric("windrow_worker_compacted_windows_total")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metric("windrow_worker_compacted_windows_total"), 400);
        drop(writer);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join")
            .expect("the writer thread ends once its handles are dropped");
    }
}
