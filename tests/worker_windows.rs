//! Workers fold telemetry into windows; the merged query plane equals
//! independently computed aggregates, across kills, restarts and redeliveries.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::time::Duration;

use common::{
    assert_same, expected_windows, fleet_readings, hold_write_lock, publish_core,
    publish_jetstream, query_windows, total, wait_applied, wait_total, Worker,
};
use windrow_harness::{clients, http_get, wait_for_body, wait_until, NatsServer, RoleProcess};

use common::{
    ack_wait_config, base_in_today, nats_with_telemetry_stream, now_ns, wait_workers_settled,
};

/// What nats-server has queued to its clients in all, and the bytes of it
/// not yet written to their sockets (`/connz`), from its monitoring port.
async fn sent_to_subscribers(monitor: u16) -> (u64, u64) {
    let (status, body) = http_get(monitor, "/connz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let connz: serde_json::Value = serde_json::from_str(&body).unwrap();
    let connections = connz["connections"].as_array().unwrap();
    let sum = |field: &str| connections.iter().map(|c| c[field].as_u64().unwrap()).sum();
    (sum("out_msgs"), sum("pending_bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_core_workers_in_a_queue_group_match_independent_aggregates() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Small compactions, so that each worker compacts `recent` into runs
    // several times and merges runs while messages flow, and queries read
    // windows split between them.
    let config = dir.path().join("compaction.toml");
    std::fs::write(
        &config,
        "[worker.store]\nrecent_max_windows = 20000\ncompaction_slice_windows = 5000\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let mut workers = Vec::new();
    for i in 0..3 {
        let data = dir.path().join(format!("node-{i}"));
        // One on a multi-thread runtime, the others on the default one thread.
        let threads = if i == 1 { "2" } else { "1" };
        let extra = ["--config", config, "--threads", threads];
        workers.push(Worker::start(&nats, &format!("node-{i}"), &data, &extra).await);
    }
    let base = now_ns() - 30 * 60 * 1_000_000_000;
    let readings = fleet_readings(10_000, 100, base);
    assert_eq!(readings.len(), 1_000_000);
    publish_core(&nats.url(), &readings, 100_000).await;
    let refs: Vec<&Worker> = workers.iter().collect();
    assert!(
        wait_applied(&refs, 1_000_000.0, Duration::from_secs(120)).await,
        "not all applied"
    );
    let (mut shares, mut merged) = (Vec::new(), 0.0);
    for w in &workers {
        assert_eq!(
            w.metric("windrow_worker_slow_consumer_events_total", "")
                .await,
            0.0
        );
        shares.push(w.metric("windrow_worker_applied_messages_total", "").await);
        // Over 100,000 windows per worker (11 one-second windows and a
        // minute or two of each of 10,000 devices), 20,000 at a time.
        let compactions = w.metric("windrow_worker_compactions_total", "").await;
        assert!(compactions >= 3.0, "{compactions} compactions");
        merged += w
            .metric("windrow_worker_merged_run_windows_total", "")
            .await;
        assert_eq!(
            w.metric("windrow_worker_compaction_errors_total", "").await,
            0.0
        );
    }
    assert!(
        shares.iter().all(|s| *s > 0.0),
        "each worker took a share: {shares:?}"
    );
    // About 16 compactions each: the runs of level 0 merge every 4.
    assert!(merged > 0.0, "no run was merged");
    let from = base - 120_000_000_000;
    let to = now_ns();
    let got = query_windows(&nats, 60, from, to, 3).await;
    assert_eq!(total(&got), 1_000_000);
    assert_same(&got, &expected_windows(&readings, 60));
    let got = query_windows(&nats, 1, from, to, 3).await;
    assert_same(&got, &expected_windows(&readings, 1));
}

/// A worker stopped with SIGTERM while NATS is down exits 0 promptly: it
/// applies what had reached it, and does not wait out its shutdown timeout
/// for a broker that may not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_while_nats_is_down_exits_promptly() {
    for mode in ["core", "jetstream"] {
        let mut nats = nats_with_telemetry_stream().await;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join(mode);
        let mut worker = Worker::start(&nats, mode, &data, &["--mode", mode]).await;
        nats.stop().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = std::time::Instant::now();
        worker.process.sigterm().await;
        let status = worker.process.wait_exit(Duration::from_secs(60)).await;
        let took = started.elapsed();
        assert_eq!(status.code(), Some(0), "{mode}: {}", worker.process.log());
        // Well under the 30 s shutdown timeout, and above the 5 s it gives a
        // lost connection to come back for a last flush, with room for a
        // loaded machine.
        assert!(
            took < Duration::from_secs(20),
            "{mode}: took {took:?} (shutdown_timeout_secs is 30): {}",
            worker.process.log()
        );
    }
}

async fn jetstream_fleet(nats: &NatsServer, dir: &std::path::Path, n: usize) -> Vec<Worker> {
    let mut workers = Vec::new();
    for i in 0..n {
        let data = dir.join(format!("node-{i}"));
        workers.push(
            Worker::start(
                nats,
                &format!("node-{i}"),
                &data,
                // One on a multi-thread runtime, the others on the default one thread.
                &[
                    "--mode",
                    "jetstream",
                    "--batch-max-messages",
                    "1000",
                    "--threads",
                    if i == 1 { "2" } else { "1" },
                ],
            )
            .await,
        );
    }
    workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_worker_killed_mid_stream_loses_nothing_and_double_counts_at_most_one_batch() {
    let nats = nats_with_telemetry_stream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut workers = jetstream_fleet(&nats, dir.path(), 3).await;
    let base = now_ns() - 10 * 60 * 1_000_000_000;
    let readings = fleet_readings(2_000, 100, base);
    let n = readings.len();
    let url = nats.url();
    let publisher = {
        let readings = readings.clone();
        tokio::spawn(async move { publish_jetstream(&url, &readings).await })
    };
    {
        let refs: Vec<&Worker> = workers.iter().collect();
        assert!(wait_applied(&refs, (n / 4) as f64, Duration::from_secs(60)).await);
    }
    let victim = workers.remove(1);
    let mut victim = victim;
    victim.process.sigkill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    workers.insert(1, victim.restart().await);
    publisher.await.unwrap();

    let got = {
        let to = now_ns();
        let from = base - 120_000_000_000;
        assert!(
            wait_total(&nats, (from, to), 3, n as u64).await,
            "not all applied"
        );
        // Let redeliveries of the killed worker's unacknowledged batch settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        query_windows(&nats, 60, from, to, 3).await
    };
    let want = expected_windows(&readings, 60);
    let counted = total(&got);
    let double = counted - n as u64;
    eprintln!("SIGKILL: {double} message(s) counted twice (committed before the kill, acknowledged after)");
    for (k, w) in &want {
        let g = got.get(k).unwrap_or_else(|| panic!("window {k:?} missing"));
        assert!(g.0 >= w.0, "window {k:?} lost messages: {} < {}", g.0, w.0);
    }
    assert!(
        double <= 1000,
        "at most one in-flight batch (1000) counted twice, got {double}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_worker_stopped_with_sigterm_mid_stream_is_exact() {
    let nats = nats_with_telemetry_stream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut workers = jetstream_fleet(&nats, dir.path(), 3).await;
    let base = now_ns() - 10 * 60 * 1_000_000_000;
    let readings = fleet_readings(2_000, 100, base);
    let n = readings.len();
    let url = nats.url();
    let publisher = {
        let readings = readings.clone();
        tokio::spawn(async move { publish_jetstream(&url, &readings).await })
    };
    {
        let refs: Vec<&Worker> = workers.iter().collect();
        assert!(wait_applied(&refs, (n / 4) as f64, Duration::from_secs(60)).await);
    }
    let mut victim = workers.remove(1);
    victim.process.sigterm().await;
    let status = victim.process.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", victim.process.log());
    workers.insert(1, victim.restart().await);
    publisher.await.unwrap();
    let range = (base - 120_000_000_000, now_ns());
    assert!(
        wait_total(&nats, range, 3, n as u64).await,
        "not all applied"
    );
    let got = query_windows(&nats, 60, range.0, range.1, 3).await;
    assert_same(&got, &expected_windows(&readings, 60));
}

/// A core worker stopped with SIGTERM applies every message that had reached
/// it. Another LMDB writer holds its commits up, so that when the signal
/// comes most of the messages wait in its subscription buffer: core NATS does
/// not redeliver, so any dropped there would be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn core_worker_stopped_with_sigterm_applies_what_had_reached_it() {
    const NS_PER_SEC: i64 = 1_000_000_000;
    let nats = NatsServer::start_monitored().await;
    let monitor = nats.monitoring_port();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node-0");
    let worker = Worker::start(&nats, "node-0", &data, &["--batch-max-messages", "1000"]).await;
    // All in today's UTC day: the lock below is taken on the one day's store.
    let base = base_in_today();
    let readings = fleet_readings(1_000, 20, base);
    let (before, held) = readings.split_at(1_000);
    publish_core(&nats.url(), before, 100_000).await;
    assert!(
        wait_applied(&[&worker], 1_000.0, Duration::from_secs(60)).await,
        "{}",
        worker.process.log()
    );

    let (locked, is_locked) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        hold_write_lock(&data, move || released.recv().unwrap_or(()), locked);
    });
    is_locked.recv_timeout(Duration::from_secs(30)).unwrap();
    publish_core(&nats.url(), held, 100_000).await;
    // The worker's client reads them while its commit waits for the lock.
    // Once nats-server has queued them all to it and written out what it
    // queued, they are on the worker's side of the socket, which its client
    // goes on reading. (A fixed pause here depended on the machine's speed.)
    let all = readings.len() as u64;
    let sent = wait_until(Duration::from_secs(60), || async move {
        let (queued, pending_bytes) = sent_to_subscribers(monitor).await;
        queued >= all && pending_bytes == 0
    })
    .await;
    assert!(
        sent,
        "nats-server sent, still pending: {:?}",
        sent_to_subscribers(monitor).await
    );
    worker.process.sigterm().await;
    // Released once the worker drains: it then unsubscribes at its first
    // turn, before it takes any buffered message.
    let draining = wait_for_body(
        worker.http_port,
        "/readyz",
        "draining",
        Duration::from_secs(30),
    )
    .await;
    assert!(draining, "{}", worker.process.log());
    release.send(()).unwrap();
    holder.join().unwrap();
    let mut worker = worker;
    let status = worker.process.wait_exit(Duration::from_secs(30)).await;
    let log = worker.process.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("applying what had already arrived"), "{log}");

    let worker = worker.restart().await;
    let range = (base - 120 * NS_PER_SEC, now_ns() + 60 * NS_PER_SEC);
    let got = query_windows(&nats, 60, range.0, range.1, 1).await;
    eprintln!(
        "{} of {} messages in the store after the drain",
        total(&got),
        readings.len()
    );
    assert_same(&got, &expected_windows(&readings, 60));
    drop(worker);
}

/// A jetstream worker frozen (SIGSTOP, as a paused container) for three ack
/// waits while it holds messages: JetStream redelivers them to the other
/// worker, and the frozen one, woken up, gives them up instead of applying
/// them too. At most the batch whose commit the freeze interrupted can be
/// counted twice, as with SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jetstream_worker_frozen_past_the_ack_wait_counts_at_most_one_batch_twice() {
    const ACK_WAIT_SECS: u64 = 2;
    const BATCH: u64 = 1_000;
    let nats = nats_with_telemetry_stream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ack_wait_config(dir.path(), ACK_WAIT_SECS);
    let base = now_ns() - 10 * 60 * 1_000_000_000;
    let readings = fleet_readings(2_000, 100, base);
    let n = readings.len() as u64;
    let batch = BATCH.to_string();
    let args = [
        "--mode",
        "jetstream",
        "--batch-max-messages",
        &batch,
        "--config",
        config.to_str().unwrap(),
    ];
    let frozen = Worker::start(&nats, "frozen", &dir.path().join("frozen"), &args).await;
    let awake = Worker::start(&nats, "awake", &dir.path().join("awake"), &args).await;
    // Published while both consume, so that the frozen one holds messages
    // when it is frozen, however fast it is.
    let url = nats.url();
    let publisher = {
        let readings = readings.clone();
        tokio::spawn(async move { publish_jetstream(&url, &readings).await })
    };
    assert!(
        wait_applied(&[&frozen], 1.0, Duration::from_secs(60)).await,
        "{}",
        frozen.process.log()
    );
    frozen.process.freeze();
    tokio::time::sleep(Duration::from_secs(3 * ACK_WAIT_SECS)).await;
    frozen.process.thaw();
    publisher.await.unwrap();
    wait_workers_settled(&nats, Duration::from_secs(120)).await;
    let range = (base - 120_000_000_000, now_ns());
    assert!(wait_total(&nats, range, 2, n).await, "not all applied");
    let got = query_windows(&nats, 60, range.0, range.1, 2).await;
    let given_up = frozen
        .metric("windrow_worker_given_up_messages_total", "")
        .await;
    let double = total(&got) - n;
    eprintln!(
        "frozen for {}s: {given_up} message(s) given up on waking, {double} counted twice",
        3 * ACK_WAIT_SECS
    );
    let want = expected_windows(&readings, 60);
    for (k, w) in &want {
        let g = got.get(k).unwrap_or_else(|| panic!("window {k:?} missing"));
        assert!(g.0 >= w.0, "window {k:?} lost messages: {} < {}", g.0, w.0);
    }
    assert!(given_up > 0.0, "the frozen worker held nothing when frozen");
    assert!(
        double <= BATCH,
        "at most the batch committing at the freeze ({BATCH}) counted twice, got {double}"
    );
    drop(awake);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_messages_delivered_twice_to_one_worker_change_nothing() {
    let nats = nats_with_telemetry_stream().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let base = now_ns() - 10 * 60 * 1_000_000_000;
    let readings = fleet_readings(500, 20, base);
    publish_jetstream(&nats.url(), &readings).await;
    let want = expected_windows(&readings, 60);
    let range = (base - 120_000_000_000, now_ns());

    let mut first = Worker::start(
        &nats,
        "node",
        &data,
        &["--mode", "jetstream", "--durable", "first"],
    )
    .await;
    assert!(
        wait_total(&nats, range, 1, readings.len() as u64).await,
        "first pass incomplete"
    );
    assert_same(&query_windows(&nats, 60, range.0, range.1, 1).await, &want);
    first.process.sigterm().await;
    first.process.wait_exit(Duration::from_secs(30)).await;

    // A second durable consumer delivers every message again to the same store.
    let second = Worker::start(
        &nats,
        "node",
        &data,
        &["--mode", "jetstream", "--durable", "second"],
    )
    .await;
    let port = second.http_port;
    let n = readings.len() as f64;
    assert!(
        wait_until(Duration::from_secs(120), || async move {
            common::metric(port, "windrow_worker_duplicates_skipped_total", "").await >= n
        })
        .await,
        "second pass did not see every message"
    );
    assert_eq!(
        second
            .metric("windrow_worker_applied_messages_total", "")
            .await,
        0.0
    );
    assert_same(&query_windows(&nats, 60, range.0, range.1, 1).await, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_payloads_are_dead_lettered_with_reason_and_terminated() {
    let nats = nats_with_telemetry_stream().await;
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::start(
        &nats,
        "node",
        &dir.path().join("node"),
        &["--mode", "jetstream"],
    )
    .await;
    let mut dead = clients::Collector::subscribe(&nats.url(), "windrow.deadletter.worker").await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let ts = now_ns() / 1_000_000;
    let cases: [(&str, String); 4] = [
        ("not-json", "{not json".to_owned()),
        (
            "not-numeric",
            format!("{{\"device\":\"a\",\"ts\":{ts},\"temp\":\"hot\"}}"),
        ),
        (
            "too-late",
            format!(
                "{{\"device\":\"a\",\"ts\":{},\"temp\":1}}",
                ts - 48 * 3_600_000
            ),
        ),
        (
            "good",
            format!("{{\"device\":\"a\",\"ts\":{ts},\"temp\":1}}"),
        ),
    ];
    for (topic, payload) in &cases {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Windrow-Mqtt-Topic", *topic);
        js.publish_with_headers(
            format!("windrow.telemetry.{topic}"),
            h,
            payload.clone().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert_eq!(dead.wait_for(3, Duration::from_secs(10)).await, 3);
    let mut reasons: Vec<(String, String, String)> = dead
        .messages
        .iter()
        .map(|m| {
            (
                m.headers["Windrow-Mqtt-Topic"].clone(),
                m.headers["Windrow-Dead-Letter-Reason"].clone(),
                String::from_utf8(m.payload.clone()).unwrap(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons[0].0, "not-json");
    assert_eq!(reasons[0].2, "{not json", "original payload kept");
    assert_eq!(reasons[1].0, "not-numeric");
    assert_eq!(reasons[2].0, "too-late");
    assert_eq!(reasons[2].1, "too_late");
    assert!(wait_applied(&[&worker], 1.0, Duration::from_secs(10)).await);
    // Terminated, not redelivered: nothing left pending on the consumer.
    wait_workers_settled(&nats, Duration::from_secs(10)).await;
}

/// nats-server 2.9 counts a filtered consumer's pending messages by scanning
/// the stream under the consumer's lock (README, footnote ²): a worker leaves
/// off a filter that covers the whole stream, keeps one that narrows it, and
/// warns about an existing consumer that filters on its whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_consumers_carry_a_filter_only_when_it_narrows_the_stream() {
    use async_nats::jetstream::{self, consumer::pull};
    let nats = nats_with_telemetry_stream().await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some("legacy".into()),
            filter_subject: "windrow.telemetry.>".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = |node: &'static str, extra: &'static [&'static str]| {
        let data = dir.path().join(node);
        let nats = &nats;
        async move {
            let mut args = vec!["--mode", "jetstream"];
            args.extend_from_slice(extra);
            Worker::start(nats, node, &data, &args).await
        }
    };
    let _whole = start("whole", &["--durable", "whole"]).await;
    let _part = start(
        "part",
        &[
            "--durable",
            "part",
            "--subject-filter",
            "windrow.telemetry.site1.>",
        ],
    )
    .await;
    let legacy = start("legacy", &["--durable", "legacy"]).await;
    let filter = |name: &'static str| {
        let stream = stream.clone();
        async move {
            let mut c: jetstream::consumer::PullConsumer = stream.get_consumer(name).await.unwrap();
            c.info().await.unwrap().config.filter_subject.clone()
        }
    };
    assert_eq!(filter("whole").await, "");
    assert_eq!(filter("part").await, "windrow.telemetry.site1.>");
    assert_eq!(filter("legacy").await, "windrow.telemetry.>");
    assert!(
        legacy
            .process
            .log()
            .contains("the durable consumer filters on its whole stream"),
        "no warning about the whole-stream filter:\n{}",
        legacy.process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_worker_config_fails_at_start_naming_the_key() {
    // Read and refused before the runtime starts (its size is configured):
    // exit code 2, the key and the reason, no data directory made.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut p = RoleProcess::spawn(
        common::windrow(),
        &[
            "worker",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--data-dir",
            data.to_str().unwrap(),
            "--threads",
            "0",
        ],
        &[],
    );
    let status = p.wait_exit(Duration::from_secs(10)).await;
    let log = p.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("worker.threads: must be 1 to 256, got 0"),
        "{log}"
    );
    assert!(!data.exists(), "{log}");
}
