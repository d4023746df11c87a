//! A worker whose LMDB map is full at `max_map_bytes` stops acknowledging and
//! reports not-ready; it neither drops nor dead-letters what it cannot commit,
//! and a restart with a larger map applies every message exactly once. A
//! worker whose commits are slow keeps what it holds from redelivery to other
//! replicas, so none is counted twice.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use async_nats::jetstream::consumer::Info;
use common::{
    ack_wait_config, assert_same, base_in_today, expected_windows, fleet_readings, hold_write_lock,
    nats_with_telemetry_stream, now_ns, publish_jetstream, query_windows, wait_workers_settled,
    Windows, Worker,
};
use windrow_harness::{
    clients::{self, Collector},
    http_get, wait_until,
};

const NS_PER_SEC: i64 = 1_000_000_000;
const SHUTDOWN_TIMEOUT_SECS: u64 = 5;

fn total(w: &Windows) -> u64 {
    w.values().map(|v| v.0).sum()
}

/// Writes a worker config file with these map limits.
fn config_file(dir: &Path, name: &str, initial_map_bytes: usize, max_map_bytes: usize) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[worker]\n\
             ack_wait_secs = 10\n\
             shutdown_timeout_secs = {SHUTDOWN_TIMEOUT_SECS}\n\
             [worker.store]\n\
             initial_map_bytes = {initial_map_bytes}\n\
             max_map_bytes = {max_map_bytes}\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

async fn consumer_info(url: &str) -> Info {
    clients::consumer_info(url, "TELEMETRY", "windrow-workers").await
}

/// How many messages the consumer has acknowledged: one worker commits and
/// acknowledges its batches in stream order, so that is the ack floor. (Counts
/// derived from `delivered` go wrong once a message is redelivered: nats-server
/// then reports the redelivered sequence as the last delivered one.) That
/// nothing beyond the floor was acknowledged without being applied is proved
/// at the end, when the restarted worker's windows equal the expected ones.
fn acknowledged(info: &Info) -> u64 {
    info.ack_floor.stream_sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_lmdb_map_stops_acknowledgements_and_a_larger_map_applies_everything_once() {
    let nats = nats_with_telemetry_stream().await;
    let mut dead = Collector::subscribe(&nats.url(), "windrow.deadletter.>").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let tiny = config_file(dir.path(), "tiny.toml", 64 << 10, 256 << 10);
    let roomy = config_file(dir.path(), "roomy.toml", 64 << 10, 256 << 20);

    // One UTC day (a batch never spans two environments), well within lateness.
    let base = base_in_today();
    let readings = fleet_readings(2_000, 20, base);
    let n = readings.len() as u64;
    publish_jetstream(&nats.url(), &readings).await;
    let range = (base - 120 * NS_PER_SEC, now_ns() + 60 * NS_PER_SEC);

    let args = ["--mode", "jetstream", "--batch-max-messages", "500"];
    let mut worker = Worker::start(
        &nats,
        "node",
        &data,
        &[&args[..], &["--config", &tiny]].concat(),
    )
    .await;

    // The map fills: the worker says so on /readyz and keeps running.
    let port = worker.http_port;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    let mut not_ready = false;
    while !not_ready && Instant::now() < deadline {
        match http_get(port, "/readyz").await {
            Ok((status, body)) => {
                not_ready = status == 503 && body.contains("store");
                last = format!("{status} {}", body.trim());
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(not_ready, "/readyz never reported the store (last: {last})");
    assert!(worker.metric("windrow_worker_store_errors_total", "").await >= 1.0);

    // Let the acks of the batches committed before the map filled land, and a
    // few retries fail; then nothing more may be acknowledged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let committed = total(&query_windows(&nats, 60, range.0, range.1, 1).await);
    // On a loaded machine the last acks may take longer than that.
    let url = nats.url();
    wait_until(Duration::from_secs(30), || {
        let url = url.clone();
        async move { acknowledged(&consumer_info(&url).await) >= committed }
    })
    .await;
    let before = consumer_info(&nats.url()).await;
    let applied = worker
        .metric("windrow_worker_applied_messages_total", "")
        .await;
    eprintln!(
        "map full after {committed} of {n} messages; consumer: delivered {:?}, ack floor {:?}, \
         ack pending {}, pending {}, redelivered {}",
        before.delivered,
        before.ack_floor,
        before.num_ack_pending,
        before.num_pending,
        before.num_redelivered
    );
    assert!(committed > 0, "no batch fitted before the map filled");
    assert!(committed < n, "everything fitted: the map is not full");
    assert_eq!(applied, committed as f64, "applied metric vs store");
    assert!(before.num_ack_pending > 0, "the failing batch is pending");
    assert_eq!(
        acknowledged(&before),
        committed,
        "acknowledged exactly what was committed"
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = consumer_info(&nats.url()).await;
    assert_eq!(
        later.ack_floor.stream_sequence, before.ack_floor.stream_sequence,
        "the ack floor moved while the map was full"
    );
    assert_eq!(
        acknowledged(&later),
        committed,
        "acknowledged after the map filled"
    );
    assert_eq!(
        total(&query_windows(&nats, 60, range.0, range.1, 1).await),
        committed,
        "commits while the map is full"
    );
    assert!(
        worker.process.try_exit().is_none(),
        "the worker exited: {}",
        worker.process.log()
    );
    assert_eq!(http_get(port, "/readyz").await.unwrap().0, 503);
    let log = worker.process.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("map full at max_map_bytes"),
        "the store error names the cause"
    );

    // SIGTERM: the batch cannot be committed, so the drain ends at its time limit.
    let stopping = Instant::now();
    worker.process.sigterm().await;
    let status = worker
        .process
        .wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 15))
        .await;
    let drain = stopping.elapsed();
    eprintln!("drain with a full map took {drain:?}, exit status {status}");
    let log = worker.process.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        drain < Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 5),
        "drain took {drain:?} (limit {SHUTDOWN_TIMEOUT_SECS} s)"
    );
    let stopped = consumer_info(&nats.url()).await;
    assert_eq!(
        acknowledged(&stopped),
        committed,
        "acknowledged during the drain"
    );

    // The same data dir with room to grow: everything arrives, once.
    let worker = Worker::start(
        &nats,
        "node",
        &data,
        &[&args[..], &["--config", &roomy]].concat(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Windows::new();
    while Instant::now() < deadline {
        got = query_windows(&nats, 60, range.0, range.1, 1).await;
        if total(&got) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(total(&got), n, "applied after the restart");
    let port = worker.http_port;
    wait_workers_settled(&nats, Duration::from_secs(15)).await;
    let done = consumer_info(&nats.url()).await;
    assert_eq!(done.ack_floor.stream_sequence, n);
    assert_eq!(http_get(port, "/readyz").await.unwrap().0, 200);
    assert_same(
        &query_windows(&nats, 60, range.0, range.1, 1).await,
        &expected_windows(&readings, 60),
    );
    assert_same(
        &query_windows(&nats, 1, range.0, range.1, 1).await,
        &expected_windows(&readings, 1),
    );
    assert_eq!(
        worker
            .metric("windrow_worker_applied_messages_total", "")
            .await,
        (n - committed) as f64,
        "the restarted worker applied the rest, once"
    );
    assert_eq!(
        dead.wait_for(1, Duration::from_millis(500)).await,
        0,
        "dead letters"
    );
    assert!(!worker.process.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_slower_to_commit_than_the_ack_wait_keeps_its_messages_and_none_is_counted_twice()
{
    const ACK_WAIT_SECS: u64 = 2;
    let nats = nats_with_telemetry_stream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ack_wait_config(dir.path(), ACK_WAIT_SECS);
    let config = config.to_str().unwrap();
    let base = base_in_today();
    let readings = fleet_readings(2_000, 100, base);
    let n = readings.len() as u64;
    publish_jetstream(&nats.url(), &readings).await;
    let range = (base - 120 * NS_PER_SEC, now_ns() + 60 * NS_PER_SEC);

    let args = [
        "--mode",
        "jetstream",
        "--batch-max-messages",
        "2000",
        "--config",
        config,
    ];
    let slow_data = dir.path().join("slow");
    let slow = Worker::start(&nats, "slow", &slow_data, &args).await;
    let fast = Worker::start(&nats, "fast", &dir.path().join("fast"), &args).await;
    assert!(
        wait_until(Duration::from_secs(60), || async {
            slow.metric("windrow_worker_applied_messages_total", "")
                .await
                > 0.0
        })
        .await,
        "the slow worker committed nothing: {}",
        slow.process.log()
    );

    // Its next commits wait for the lock for four ack waits.
    let hold = Duration::from_secs(4 * ACK_WAIT_SECS);
    let (locked, is_locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        hold_write_lock(&slow_data, || std::thread::sleep(hold), locked)
    });
    is_locked.recv_timeout(Duration::from_secs(30)).unwrap();
    let applied_when_locked = slow
        .metric("windrow_worker_applied_messages_total", "")
        .await;
    holder.join().unwrap();

    wait_workers_settled(&nats, Duration::from_secs(120)).await;
    let slow_applied = slow
        .metric("windrow_worker_applied_messages_total", "")
        .await;
    let fast_applied = fast
        .metric("windrow_worker_applied_messages_total", "")
        .await;
    eprintln!(
        "slow worker: {applied_when_locked} applied before the lock, {slow_applied} in all; \
         fast worker: {fast_applied}; consumer: {:?}",
        consumer_info(&nats.url()).await
    );
    assert!(
        slow_applied > applied_when_locked,
        "the slow worker applied what it held once the lock was gone"
    );
    assert_eq!(
        slow_applied + fast_applied,
        n as f64,
        "each message applied by one worker only"
    );
    let log = slow.process.log();
    assert!(
        log.contains("slow to commit"),
        "the slow worker never gave back what it had not begun; its last lines:\n{}",
        log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    let merged = query_windows(&nats, 60, range.0, range.1, 2).await;
    assert_eq!(total(&merged), n, "merged windows count each message once");
    assert_same(&merged, &expected_windows(&readings, 60));
}
