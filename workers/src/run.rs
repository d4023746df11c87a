//! Starting, running and draining a worker.

use std::{sync::Arc, time::Duration};

use async_nats::{
    connection::State,
    jetstream::{self, consumer::pull},
};
use futures::StreamExt;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use windrow_jetstream::subject::{consumer_filter, covers_stream};
use windrow_ops::{Health, OpsServer};

use crate::{
    config::{Config, Mode},
    consume::{next_before, BatchSize, Pipeline, Processor},
    events::Metrics,
    feed::Feed,
    incoming::{stream_identity, ConsumerLimits, Incoming},
    pause::PauseWatch,
    query,
    queue_group::{self, Leaving, QueueMember},
    store::{Clock, SystemClock},
    writer::Writer,
    Error,
};

/// Runs a worker until `shutdown`, then drains.
///
/// Drain order: stop fetching, finish the batch in hand (commit, then
/// acknowledge), stop answering queries, close the store. `shutdown_timeout_secs`
/// bounds it; what is unacknowledged then is redelivered (jetstream mode).
///
/// # Errors
/// Invalid configuration, store, NATS or operations-server failures at start-up.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    run_with_clock(config, shutdown, Arc::new(SystemClock)).await
}

/// [`run`] with an injectable clock (tests of rotation and lateness).
///
/// # Errors
/// As [`run`].
pub async fn run_with_clock(
    config: Config,
    shutdown: CancellationToken,
    clock: Arc<dyn Clock>,
) -> Result<(), Error> {
    config.validate()?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Health::new();
    health.register("nats");
    health.register("consumer");
    health.set("store", true);
    let ops = OpsServer::bind(config.http_listen).await?;
    let ops_stop = CancellationToken::new();
    let ops_task = tokio::spawn(ops.serve(Arc::new(registry), health.clone(), ops_stop.clone()));

    let (writer, writer_thread) = Writer::start(config.store.clone(), clock, metrics.clone())?;
    if let Ok(Ok(days)) = writer.enforce_retention().await {
        if !days.is_empty() {
            tracing::info!(?days, "deleted days beyond retention");
        }
    }

    let nats = {
        let health = health.clone();
        let metrics = metrics.clone();
        windrow_jetstream::connect(&config.nats, "windrow-worker", move |event| {
            match &event {
                async_nats::Event::Connected => {
                    health.set("nats", true);
                    tracing::info!("NATS connected");
                }
                async_nats::Event::Disconnected => {
                    health.set("nats", false);
                    tracing::warn!("NATS disconnected; reconnecting");
                }
                async_nats::Event::SlowConsumer(_) => metrics.slow_consumer(),
                other => tracing::warn!(event = %other, "NATS event"),
            }
            async {}
        })
        .await?
    };
    if nats.connection_state() == State::Connected {
        health.set("nats", true);
    }

    let config = Arc::new(config);
    let hard_stop = CancellationToken::new();
    let processor = Arc::new(Processor {
        config: config.clone(),
        writer: writer.clone(),
        nats: nats.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        double_ack: true,
    });
    let queries = tokio::spawn(query::answer(
        nats.clone(),
        writer.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    let retention = tokio::spawn(retention_loop(
        writer.clone(),
        config.retention_check_secs,
        shutdown.clone(),
    ));

    {
        let consumer = async {
            match config.mode {
                Mode::Core => {
                    consume_core(&nats, &config, &processor, &health, &shutdown, &hard_stop).await
                }
                Mode::Jetstream => {
                    consume_jetstream(
                        &nats, &config, &processor, &health, &metrics, &shutdown, &hard_stop,
                    )
                    .await
                }
            }
        };
        tracing::info!(mode = ?config.mode, filter = %config.filter(), node = %config.node_id, "worker running");
        tokio::pin!(consumer);
        let limit = Duration::from_secs(config.shutdown_timeout_secs);
        tokio::select! {
            () = &mut consumer => {}
            () = shutdown.cancelled() => {
                health.register("draining");
                tracing::info!(timeout_secs = limit.as_secs(), "draining");
                if tokio::time::timeout(limit, &mut consumer).await.is_err() {
                    tracing::warn!("drain timed out; unacknowledged messages will be redelivered");
                    hard_stop.cancel();
                    consumer.await;
                }
            }
        }
    }
    let _ = queries.await;
    let _ = retention.await;
    let _ = tokio::time::timeout(Duration::from_secs(5), nats.flush()).await;
    drop(processor);
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    ops_stop.cancel();
    if let Ok(res) = ops_task.await {
        res?;
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Core mode: a queue-group member; batches by size or time.
///
/// On shutdown it leaves the group without losing what the server routed to
/// it while traffic is steady ([`QueueMember::leave`]): the server sends it
/// a margin more and stops, and the other members take the rest; it applies
/// those and what its buffer held. When the last of them do not come (the
/// traffic stopped or slowed, the client dropped some as a slow consumer,
/// or reconnected), it unsubscribes outright, and only a message on the wire
/// at that instant can be lost. All within `shutdown_timeout_secs`. Core
/// NATS stays at-most-once (slow consumers, a killed worker); jetstream mode
/// is exact.
async fn consume_core(
    nats: &async_nats::Client,
    config: &Config,
    processor: &Arc<Processor>,
    health: &Health,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
) {
    let mut member =
        match QueueMember::join(nats, config.filter(), config.queue_group.clone()).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe");
                return;
            }
        };
    health.set("consumer", true);
    let wait = Duration::from_millis(config.batch_max_wait_ms);
    let mut sized = BatchSize::up_to(config.batch_max_messages);
    // Core NATS: nothing to acknowledge, so the ack wait does not matter.
    let mut pipeline = Pipeline::new(
        processor.clone(),
        Duration::from_secs(config.ack_wait_secs),
        hard_stop.clone(),
    );
    // Messages taken since the leaving began, once shutting down.
    let mut drained: Option<usize> = None;
    // Set while the server is still to send its last messages.
    let mut leaving: Option<Leaving> = None;
    // The subscription ended, rather than the loop being cut short.
    let mut ended = false;
    // It ended at the count agreed with the server.
    let mut exact = false;
    loop {
        let give_up_at = leaving.as_ref().map(Leaving::give_up_at);
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled(), if drained.is_none() => {
                drained = Some(0);
                leaving = member.leave(hard_stop).await;
                continue;
            }
            () = hard_stop.cancelled() => break,
            m = member.next() => match m {
                Some(m) => m,
                None => {
                    ended = true;
                    exact = leaving.as_ref().is_some_and(|l| l.reached(&member));
                    break;
                }
            },
            () = queue_group::until(give_up_at), if give_up_at.is_some() => {
                if let Some(l) = leaving.take() {
                    tracing::info!(
                        left_to_send = l.left(&member),
                        "the server's last messages did not come in time; unsubscribing outright"
                    );
                }
                member.unsubscribe_outright(hard_stop).await;
                continue;
            }
            // The unsubscribe waits for the connection, and nothing more
            // arrives without one: end once the buffer is empty.
            () = tokio::time::sleep(DRAIN_QUIET),
                if drained.is_some() && nats.connection_state() != State::Connected => {
                ended = true;
                break;
            }
        };
        let mut batch = sized.start(Incoming::core(first));
        let deadline = tokio::time::Instant::now() + wait;
        while batch.len() < config.batch_max_messages {
            match next_before(&mut member, deadline).await {
                Some(Some(m)) => batch.push(Incoming::core(m)),
                _ => break,
            }
        }
        sized.was(batch.len());
        member.batch_taken();
        if let Some(n) = drained.as_mut() {
            *n += batch.len();
        }
        if pipeline.submit(batch).await.is_none() {
            break;
        }
        // The quiet spell is counted from when the loop looks for more.
        if let Some(l) = leaving.as_mut() {
            l.submitted();
        }
    }
    // Dropped before the last batch finishes: a reconnect meanwhile would
    // have the server route more here, which nothing would apply.
    if drained.is_none() {
        member.unsubscribe().await;
    } else {
        drop(member);
    }
    let finished = pipeline.finish().await.is_some();
    match drained {
        Some(messages) if ended && finished && exact => tracing::info!(
            messages,
            "left the queue group: applied all the server sent here up to the count agreed with it"
        ),
        Some(messages) if ended && finished => tracing::info!(
            messages,
            "drained: applied what had arrived before the unsubscribe"
        ),
        Some(messages) => tracing::warn!(
            messages,
            "drain cut short (worker.shutdown_timeout_secs): what had arrived and was not applied is lost"
        ),
        None => {}
    }
}

/// How long a draining core worker without a NATS connection waits for
/// more of what is buffered before it stops.
const DRAIN_QUIET: Duration = Duration::from_millis(250);

/// JetStream mode: batches from the shared durable pull consumer.
///
/// A continuous pull (heartbeats, pipelined pull requests) rather than one
/// `fetch` per batch: the server fills the next batch while this one commits,
/// and a pull request the server forgets (seen with nats-server 2.9 under load:
/// a partly served request vanished without its 408) is noticed through the
/// missing heartbeat instead of stalling the worker until the request expires.
async fn consume_jetstream(
    nats: &async_nats::Client,
    config: &Config,
    processor: &Arc<Processor>,
    health: &Health,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
) {
    let js = jetstream::new(nats.clone());
    while !shutdown.is_cancelled() {
        let Some(bound) = bind_consumer(&js, config, health, shutdown).await else {
            return;
        };
        let lag = tokio::spawn(poll_lag(
            bound.consumer.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        pull_batches(&bound, config, processor, health, shutdown, hard_stop).await;
        lag.abort();
        if !shutdown.is_cancelled() {
            health.set("consumer", false);
            tracing::warn!(durable = %config.durable, "pull consumer ended; binding it again");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
}

/// The durable consumer as the server has it.
struct Bound {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    /// Key of the applied sequences ([`stream_identity`]).
    identity: Arc<str>,
    limits: ConsumerLimits,
}

impl Bound {
    fn new(
        consumer: jetstream::consumer::Consumer<pull::Config>,
        identity: Arc<str>,
        config: &Config,
    ) -> Bound {
        let info = consumer.cached_info();
        let limits =
            ConsumerLimits::of(info, config.batch_max_messages, "worker.batch_max_messages");
        if limits.ack_wait != Duration::from_secs(config.ack_wait_secs) {
            tracing::info!(
                durable = %config.durable,
                ack_wait_secs = limits.ack_wait.as_secs_f64(),
                "the consumer's ack wait differs from worker.ack_wait_secs; using the consumer's"
            );
        }
        Bound {
            consumer,
            identity,
            limits,
        }
    }
}

/// Gets or creates the durable consumer, retrying with backoff until shutdown.
async fn bind_consumer(
    js: &jetstream::Context,
    config: &Config,
    health: &Health,
    shutdown: &CancellationToken,
) -> Option<Bound> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let res = async {
            let mut stream = js.get_stream(&config.stream).await?;
            let info = stream.info().await?;
            let identity = stream_identity(info);
            let subjects = info.config.subjects.clone();
            let c = stream
                .get_or_create_consumer(
                    &config.durable,
                    pull::Config {
                        durable_name: Some(config.durable.clone()),
                        filter_subject: consumer_filter(&subjects, &config.filter()),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(config.ack_wait_secs),
                        max_deliver: config.max_deliver,
                        max_ack_pending: config.max_ack_pending,
                        ..Default::default()
                    },
                )
                .await?;
            let filter = &c.cached_info().config.filter_subject;
            if covers_stream(&subjects, filter) {
                tracing::warn!(
                    durable = %config.durable,
                    filter = %filter,
                    "the durable consumer filters on its whole stream; nats-server 2.9 then counts its pending messages by scanning the stream under the consumer's lock, which starves deliveries when a backlog builds up. Recreate it without a filter (stop the workers, delete the consumer; the workers create it again)"
                );
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Bound::new(c, identity, config))
        }
        .await;
        match res {
            Ok(b) => return Some(b),
            Err(e) => {
                health.set("consumer", false);
                tracing::warn!(error = %e, stream = %config.stream, durable = %config.durable, "cannot bind the durable consumer; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The continuous pull of one worker: large pull requests, heartbeats.
type Pull = jetstream::consumer::pull::Stream;

async fn start_pull(bound: &Bound) -> Option<Pull> {
    match bound
        .consumer
        .stream()
        .max_messages_per_batch(bound.limits.batch)
        .expires(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
    {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start pulling");
            None
        }
    }
}

/// Pulls, batches by size or time, and processes until shutdown or until the
/// pull stream ends (consumer deleted).
async fn pull_batches(
    bound: &Bound,
    config: &Config,
    processor: &Arc<Processor>,
    health: &Health,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
) {
    let nats = &processor.nats;
    let feed = |pull| {
        Feed::start(
            pull,
            bound.identity.clone(),
            Incoming::jetstream,
            bound.limits.batch,
            "pull consumer",
        )
    };
    // Without a pause, a message may go two thirds of the ack wait without
    // an ack: waiting in the buffers, then a third until its batch's first
    // in-progress ack (see `holding`). A pause longer than a sixth of the ack
    // wait counts as one, leaving a sixth as margin (see `crate::pause`).
    let pauses = PauseWatch::start(bound.limits.ack_wait / 6);
    let mut fence = pauses.fence();
    let Some(pull) = start_pull(bound).await else {
        return;
    };
    let mut pull = Some(feed(pull));
    health.set("consumer", true);
    let wait = Duration::from_millis(config.batch_max_wait_ms);
    let mut sized = BatchSize::up_to(bound.limits.batch);
    let mut pipeline = Pipeline::new(processor.clone(), bound.limits.ack_wait, hard_stop.clone());
    loop {
        // Stopped while a commit was slow (see `submit_releasing`): pull again.
        if pull.is_none() {
            fence = pauses.fence();
            pull = start_pull(bound).await.map(feed);
        }
        let Some(messages) = pull.as_mut() else {
            break;
        };
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            m = messages.next() => m,
        };
        // The stream ended (consumer deleted); its transient errors (missed
        // heartbeats, a failed pull request, a reconnect) were logged by the
        // feed, and the stream issues a new pull request by itself.
        let Some(first) = first else {
            break;
        };
        let mut batch = sized.start(first);
        let deadline = tokio::time::Instant::now() + wait;
        while batch.len() < bound.limits.batch {
            match next_before(messages, deadline).await {
                Some(Some(m)) => batch.push(m),
                _ => break,
            }
        }
        tracing::debug!(messages = batch.len(), "batch");
        sized.was(batch.len());
        if !fence.holds() {
            // Dropped, not handed back: another replica may be applying it.
            let buffered = pull.take().map(Feed::release).unwrap_or_default();
            processor.metrics.given_up(batch.len() + buffered.len());
            continue;
        }
        // The count the server stamped on the newest delivery: exact when it
        // was sent, and free (see `poll_lag`).
        if let Some(pending) = batch.last().and_then(|m| m.pending) {
            processor
                .metrics
                .consumer_pending
                .set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
        let submitted = pipeline.submit_releasing(batch, Some(fence.clone()), || {
            let Some(stopped) = pull.take() else {
                return Vec::new();
            };
            if !fence.holds() {
                // As above: dropped, not handed back.
                processor.metrics.given_up(stopped.release().len());
                return Vec::new();
            }
            let given_back: Vec<_> = stopped
                .release()
                .into_iter()
                .filter_map(|m| m.reply)
                .collect();
            tracing::warn!(
                given_back = given_back.len(),
                "the batch before is slow to commit: stopped pulling and gave back what was delivered meanwhile"
            );
            given_back
        });
        if submitted.await.is_none() {
            break;
        }
    }
    // Hand back what was delivered but not processed, so that another replica
    // gets it now rather than after the ack wait; first, so that the feed
    // stops asking for more while the last commit runs.
    let mut held = pull.map(Feed::release).unwrap_or_default();
    if !fence.holds() {
        processor.metrics.given_up(held.len());
        held.clear();
    }
    let handed_back = held.len();
    for m in held {
        m.hand_back(nats).await;
    }
    if handed_back > 0 {
        tracing::info!(handed_back, "returned delivered but unprocessed messages");
    }
    pipeline.finish().await;
}

/// Keeps the lag gauges current while no message arrives (deliveries set the
/// pending count themselves).
///
/// Consumer info is cheap for an unfiltered consumer but, on nats-server 2.9,
/// scans the stream under the consumer's lock for a filtered one (see
/// [`consumer_filter`]), so a filtered consumer is asked rarely.
async fn poll_lag(
    mut consumer: jetstream::consumer::Consumer<pull::Config>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let every = if consumer.cached_info().config.filter_subject.is_empty() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(60)
    };
    loop {
        if let Ok(info) = consumer.info().await {
            metrics.consumer_pending.set(info.num_pending as i64);
            metrics
                .consumer_ack_pending
                .set(info.num_ack_pending as i64);
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn retention_loop(writer: Writer, every_secs: u64, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(every_secs)) => {}
            () = shutdown.cancelled() => return,
        }
        match writer.enforce_retention().await {
            Ok(Ok(days)) if !days.is_empty() => {
                tracing::info!(?days, "deleted days beyond retention")
            }
            Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
            _ => {}
        }
    }
}
