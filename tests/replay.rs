//! `windrow replay` rebuilds a store from a stream through the workers' own
//! path: equal to the live fleet, idempotent, resumable, and exact about where
//! it starts.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::{path::Path, process::Output, time::Duration};

use common::{
    assert_same, expected_windows, fleet_readings, now_ns, parse_windows, publish_jetstream,
    query_windows, windrow, Bridge, Reading, Windows, Worker,
};
use futures::TryStreamExt;
use rumqttc::QoS;
use windrow_harness::{
    clients::{consumer_info, create_stream, mqtt_publish, stream_len, wait_consumer_settled},
    wait_until, Mosquitto, NatsServer, RoleProcess,
};

const STREAM: &str = "TELEMETRY";

async fn stream(nats: &NatsServer) {
    create_stream(
        &nats.url(),
        STREAM,
        &["windrow.telemetry.>"],
        Duration::from_secs(120),
    )
    .await;
}

/// A private nats-server whose stream holds `devices` × `per_device` fleet
/// readings, published through JetStream.
async fn stream_of_readings(devices: usize, per_device: usize) -> (NatsServer, Vec<Reading>) {
    let nats = NatsServer::start().await;
    stream(&nats).await;
    let readings = fleet_readings(devices, per_device, recent_base());
    publish_jetstream(&nats.url(), &readings).await;
    (nats, readings)
}

/// The fleet's shared configuration file: series keyed by the `device` field,
/// as `Worker::start` does with a flag.
fn fleet_config() -> &'static Path {
    static FILE: std::sync::OnceLock<tempfile::NamedTempFile> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, b"[worker.decode]\nseries_fields = [\"device\"]\n")
            .unwrap();
        f
    })
    .path()
}

/// Runs `windrow replay --into DIR ARGS...` to completion.
async fn replay(nats: &NatsServer, into: &Path, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(windrow())
        .arg("--config")
        .arg(fleet_config())
        .arg("replay")
        .args(["--nats-url", &nats.url(), "--progress", "log"])
        .arg("--into")
        .arg(into)
        .args(args)
        .env_remove("WINDROW_CONFIG")
        .output()
        .await
        .unwrap();
    eprintln!(
        "replay {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `windrow replay --into DIR ARGS...` process, logging its progress.
fn spawn_replay(nats: &NatsServer, into: &Path, extra: &[&str]) -> RoleProcess {
    let url = nats.url();
    let mut args = vec![
        "--config",
        fleet_config().to_str().unwrap(),
        "replay",
        "--nats-url",
        &url,
        "--progress",
        "log",
        "--into",
        into.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    RoleProcess::spawn(windrow(), &args, &[("RUST_LOG", "info")])
}

/// A `windrow replay --durable NAME --batch N` process.
fn spawn_durable_replay(nats: &NatsServer, into: &Path, name: &str, batch: &str) -> RoleProcess {
    spawn_replay(nats, into, &["--durable", name, "--batch", batch])
}

/// A durable replay (`--durable name --batch batch`) whose consumer has
/// delivered at least `delivered` messages: under way however fast it runs.
async fn durable_replay_delivering(
    nats: &NatsServer,
    into: &Path,
    name: &str,
    batch: &str,
    delivered: u64,
) -> RoleProcess {
    let process = spawn_durable_replay(nats, into, name, batch);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let under_way = wait_until(Duration::from_secs(60), || {
        let js = js.clone();
        async move {
            match js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    name, STREAM,
                )
                .await
            {
                Ok(mut c) => c
                    .info()
                    .await
                    .is_ok_and(|i| i.delivered.stream_sequence >= delivered),
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(under_way, "{}", process.log());
    process
}

/// A stream of 1,000 devices × 100 readings, and a durable replay `name` of
/// it (batches of 2,000) into `<temp dir>/<name>`, killed outright once its
/// consumer delivered 6,000 messages; the killed process is returned for its
/// log.
async fn killed_durable_replay(
    name: &str,
) -> (
    NatsServer,
    Vec<Reading>,
    tempfile::TempDir,
    std::path::PathBuf,
    RoleProcess,
) {
    let (nats, readings) = stream_of_readings(1_000, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join(name);
    let mut first_run = durable_replay_delivering(&nats, &into, name, "2000", 6_000).await;
    first_run.sigkill().await;
    (nats, readings, dir, into, first_run)
}

/// A durable consumer as the server has it: the last stream sequence it
/// delivered and how many of its deliveries are unacknowledged.
async fn consumer_state(nats: &NatsServer, durable: &str) -> (u64, usize) {
    let info = consumer_info(&nats.url(), STREAM, durable).await;
    (info.delivered.stream_sequence, info.num_ack_pending)
}

/// The windows of a store read directly (`windrow store scan`).
async fn store_windows(dir: &Path, resolution_secs: u32) -> Windows {
    let out = tokio::process::Command::new(windrow())
        .args(["store", "--data-dir"])
        .arg(dir)
        .args([
            "scan",
            "--resolution-secs",
            &resolution_secs.to_string(),
            "--format",
            "json",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "store scan: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_windows(&out.stdout)
}

fn total(w: &Windows) -> u64 {
    w.values().map(|v| v.0).sum()
}

/// A minute-aligned base 10 minutes ago, so every reading is within lateness.
fn recent_base() -> i64 {
    let m = 60_000_000_000;
    (now_ns() - 10 * m).div_euclid(m) * m
}

/// MQTT messages for `readings`: topic `fleet/<device>`, the same JSON payload.
fn as_mqtt(readings: &[Reading]) -> Vec<(String, Vec<u8>)> {
    readings
        .iter()
        .map(|(_, payload, device, _, _)| (format!("fleet/{device}"), payload.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_store_equals_the_live_fleet_for_a_million_messages_through_the_bridge() {
    let nats = NatsServer::start().await;
    let mqtt = Mosquitto::start().await;
    stream(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let workers = [
        Worker::start(
            &nats,
            "live-0",
            &dir.path().join("live-0"),
            &["--mode", "jetstream"],
        )
        .await,
        Worker::start(
            &nats,
            "live-1",
            &dir.path().join("live-1"),
            &["--mode", "jetstream"],
        )
        .await,
    ];
    let _bridge = Bridge::start(
        &nats,
        &mqtt,
        "replay-bridge",
        // An MQTT redelivery (a keep-alive lost on a loaded machine) becomes a
        // JetStream duplicate, so the stream holds each reading once.
        &[
            "--route",
            "fleet/#,qos=1,delivery=jetstream",
            "--message-id",
            "content-hash",
        ],
    )
    .await;
    let readings = fleet_readings(10_000, 100, recent_base());
    let n = readings.len() as u64;
    assert_eq!(n, 1_000_000);
    mqtt_publish(
        mqtt.port(),
        "publisher",
        as_mqtt(&readings),
        QoS::AtLeastOnce,
        None,
    )
    .await;
    let url = nats.url();
    assert!(
        wait_until(Duration::from_secs(300), || {
            let url = url.clone();
            async move { stream_len(&url, STREAM).await >= n }
        })
        .await,
        "the bridge did not store every message"
    );
    let range = (recent_base() - 120_000_000_000, now_ns());
    assert_eq!(
        stream_len(&url, STREAM).await,
        n,
        "the stream holds each reading once"
    );
    // Settled: everything delivered and acknowledged, so no redelivery can
    // still change the live windows while replay compares with them.
    wait_consumer_settled(&url, STREAM, "windrow-workers", Duration::from_secs(300)).await;
    assert_eq!(
        total(&query_windows(&nats, 60, range.0, range.1, 2).await),
        n,
        "the live fleet applied each message once"
    );
    for w in &workers {
        assert!(w.metric("windrow_worker_applied_messages_total", "").await > 0.0);
    }

    let rebuilt = dir.path().join("rebuilt");
    let out = replay(&nats, &rebuilt, &["--verify", "--expect-nodes", "2"]).await;
    assert!(out.status.success(), "replay --verify failed");
    assert!(
        stdout(&out).contains("identical to the live fleet"),
        "{}",
        stdout(&out)
    );
    let live = query_windows(&nats, 60, range.0, range.1, 2).await;
    for res in [60, 1] {
        let got = store_windows(&rebuilt, res).await;
        assert_eq!(total(&got), n, "resolution {res}s");
        assert_same(&got, &expected_windows(&readings, i64::from(res)));
    }
    assert_same(&store_windows(&rebuilt, 60).await, &live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_twice_changes_nothing_and_an_interrupted_durable_replay_resumes() {
    let (nats, readings) = stream_of_readings(2_000, 100).await;
    let want = expected_windows(&readings, 60);
    let dir = tempfile::tempdir().unwrap();

    // Twice into the same store: the second pass finds everything applied.
    let once = dir.path().join("once");
    let out = replay(&nats, &once, &[]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("200000 applied, 0 already"),
        "{}",
        stdout(&out)
    );
    let first = store_windows(&once, 60).await;
    assert_same(&first, &want);
    let out = replay(&nats, &once, &[]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("0 applied, 200000 already"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        store_windows(&once, 60).await,
        first,
        "byte-for-byte the same windows"
    );

    // Stopped at a sequence, then continued through the same durable consumer.
    let stopped = dir.path().join("stopped");
    let out = replay(&nats, &stopped, &["--durable", "part", "--to-seq", "50000"]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("replayed 50000 message(s)"),
        "{}",
        stdout(&out)
    );
    // Nothing past the end was pulled (and so nothing waits for a NAK or the
    // ack wait to come back), and every read message was acknowledged.
    let settled = wait_until(Duration::from_secs(10), || async {
        consumer_state(&nats, "part").await == (50_000, 0)
    })
    .await;
    assert!(
        settled,
        "consumer after --to-seq 50000: (delivered up to, unacknowledged) = {:?}",
        consumer_state(&nats, "part").await
    );
    let out = replay(&nats, &stopped, &["--durable", "part"]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("replayed 150000 message(s) (sequences 50001..200000)"),
        "the second run continues where the first stopped: {}",
        stdout(&out)
    );
    assert_same(&store_windows(&stopped, 60).await, &want);

    // Interrupted with SIGTERM mid-way, then started again with the same
    // durable name. Mid-way however fast the machine: once 2,000 messages
    // are delivered, 198,000 are left, in about 4,000 pulls and commits of
    // 50 (waiting for its first progress line, a second in, could let a fast
    // machine finish first).
    let resumed = dir.path().join("resumed");
    let mut first_run = durable_replay_delivering(&nats, &resumed, "rebuild", "50", 2_000).await;
    first_run.sigterm().await;
    let status = first_run.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(130),
        "interrupted mid-way: {}",
        first_run.log()
    );
    let out = replay(&nats, &resumed, &["--durable", "rebuild"]).await;
    assert!(out.status.success());
    let text = stdout(&out);
    let read: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        read > 0 && read < 200_000,
        "the second run started over: {text}"
    );
    assert!(text.contains("0 rejected"), "{text}");
    assert_same(&store_windows(&resumed, 60).await, &want);
    assert_same(
        &store_windows(&resumed, 1).await,
        &expected_windows(&readings, 1),
    );
    assert_eq!(total(&store_windows(&resumed, 60).await), 200_000);
}

/// A durable replay killed outright (no hand-back) leaves messages delivered
/// and unacknowledged; the next run with the same name takes their
/// redeliveries after the ack wait and ends with exactly the stream's windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_durable_replay_killed_outright_resumes_after_the_ack_wait_and_ends_identical() {
    let (nats, readings, _dir, into, first_run) = killed_durable_replay("killed").await;
    assert!(
        first_run.log().lines().all(|l| !l.starts_with("replayed ")),
        "killed before the end: {}",
        first_run.log()
    );

    let out = replay(&nats, &into, &["--durable", "killed"]).await;
    let (text, log) = (stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}\n{log}");
    assert!(text.contains("0 rejected"), "{text}");
    assert_same(
        &store_windows(&into, 60).await,
        &expected_windows(&readings, 60),
    );
    assert_same(
        &store_windows(&into, 1).await,
        &expected_windows(&readings, 1),
    );
    assert_eq!(total(&store_windows(&into, 60).await), 100_000);
}

/// A durable replay with an end before the stream's last message, after a
/// killed one: while it waits for the killed run's messages to come back
/// (after the ack wait), the consumer offers it messages past its end. It
/// holds those, still takes the killed run's messages of its range, and then
/// hands them back for a later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bounded_durable_replay_after_a_killed_one_still_takes_the_killed_runs_messages() {
    // Killed once it read a few batches, well before the end.
    let (nats, readings, _dir, into, _first_run) = killed_durable_replay("bounded").await;
    let (delivered, unacked) = consumer_state(&nats, "bounded").await;
    assert!(unacked > 0, "the killed run left messages unacknowledged: {delivered} delivered, {unacked} unacknowledged");
    assert!(
        delivered < 90_000,
        "killed well before the end: {delivered} delivered"
    );
    let end = delivered + (100_000 - delivered) / 2;

    let out = replay(
        &nats,
        &into,
        &["--durable", "bounded", "--to-seq", &end.to_string()],
    )
    .await;
    let (text, log) = (stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}\n{log}");
    assert!(
        log.contains("waiting for messages an earlier run received"),
        "it waited for the killed run's messages: {log}"
    );
    assert!(
        consumer_state(&nats, "bounded").await.0 > end,
        "it was offered messages past its end meanwhile"
    );
    let in_range = &readings[..usize::try_from(end).unwrap()];
    assert_same(
        &store_windows(&into, 60).await,
        &expected_windows(in_range, 60),
    );
    assert_eq!(total(&store_windows(&into, 60).await), end);
}

/// A broker that stops answering in mid-replay (frozen, as in a paused VM)
/// makes an ordered replay warn while it waits, not fail or skip anything:
/// it carries on when the broker does and ends with exactly the stream's
/// windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_replay_waits_out_a_frozen_broker_with_a_warning_and_ends_exact() {
    let (mut nats, readings) = stream_of_readings(1_000, 300).await;
    let want = expected_windows(&readings, 60);
    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("store");
    let mut process = spawn_replay(&nats, &into, &["--batch", "20000"]);
    let started = wait_until(Duration::from_secs(60), || {
        let log = process.log();
        async move { log.contains("replay started") }
    })
    .await;
    assert!(started, "{}", process.log());
    // The consumer's `max_expires` is what async-nats takes its pull expiry
    // and heartbeat from, and what bounds a stall (see ORDERED_PULL_EXPIRY).
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let consumers: Vec<_> = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .consumers()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(consumers.len(), 1, "{consumers:?}");
    assert_eq!(consumers[0].config.max_expires, Duration::from_secs(5));
    nats.freeze();
    assert!(
        process.try_exit().is_none(),
        "the replay ended before the broker froze:\n{}",
        process.log()
    );
    let warned = wait_until(Duration::from_secs(30), || {
        let log = process.log();
        async move { log.contains("no message from the ordered consumer") }
    })
    .await;
    nats.thaw();
    let log = process.log();
    assert!(warned, "no warning while the broker was frozen:\n{log}");
    let status = process.wait_exit(Duration::from_secs(120)).await;
    let log = process.log();
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("the ordered consumer delivers again"), "{log}");
    assert!(
        log.contains("replayed 300000 message(s)") && log.contains("300000 applied"),
        "{log}"
    );
    assert_same(&store_windows(&into, 60).await, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn since_a_time_in_the_middle_selects_exactly_the_messages_from_then() {
    let nats = NatsServer::start().await;
    stream(&nats).await;
    let base = recent_base();
    let all = fleet_readings(500, 40, base);
    let (early, late) = all.split_at(all.len() / 2);
    publish_jetstream(&nats.url(), early).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let since = now_ns();
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_jetstream(&nats.url(), late).await;

    let dir = tempfile::tempdir().unwrap();
    let since_secs = format!("{}", since as f64 / 1e9);
    let out = replay(&nats, dir.path(), &["--since", &since_secs]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains(&format!("replayed {} message(s)", late.len())),
        "{}",
        stdout(&out)
    );
    assert_same(
        &store_windows(dir.path(), 60).await,
        &expected_windows(late, 60),
    );

    // By sequence: the same boundary.
    let seq_dir = tempfile::tempdir().unwrap();
    let from = (early.len() + 1).to_string();
    let out = replay(&nats, seq_dir.path(), &["--from-seq", &from]).await;
    assert!(out.status.success());
    assert_same(
        &store_windows(seq_dir.path(), 60).await,
        &expected_windows(late, 60),
    );
    // And the end bound: only the early half.
    let to_dir = tempfile::tempdir().unwrap();
    let to = early.len().to_string();
    let out = replay(&nats, to_dir.path(), &["--to-seq", &to]).await;
    assert!(out.status.success());
    assert_same(
        &store_windows(to_dir.path(), 60).await,
        &expected_windows(early, 60),
    );
}

/// The swap procedure of the README: a store rebuilt through a durable
/// consumer is put into service by a worker that continues that consumer and
/// supersedes the old nodes; merged answers stay exact while the old nodes
/// still answer, after they are retired, and as new messages arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuilt_store_put_into_service_keeps_merged_answers_exact_during_and_after_the_swap() {
    let nats = NatsServer::start().await;
    stream(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let base = recent_base();
    let range = (base - 120_000_000_000, now_ns() + 60_000_000_000);
    let old: Vec<Worker> = futures::future::join_all(["old-0", "old-1"].map(|node| {
        let data = dir.path().join(node);
        let nats = &nats;
        async move { Worker::start(nats, node, &data, &["--mode", "jetstream"]).await }
    }))
    .await;

    // Before: the old fleet applied phase A.
    let mut sent = fleet_readings(500, 100, base);
    publish_jetstream(&nats.url(), &sent).await;
    let applied = |nodes: usize, n: usize| {
        let nats = &nats;
        async move {
            wait_until(Duration::from_secs(120), || async move {
                total(&query_windows(nats, 60, range.0, range.1, nodes).await) >= n as u64
            })
            .await
        }
    };
    assert!(
        applied(2, sent.len()).await,
        "the old fleet did not apply A"
    );

    // 1. Rebuild through a durable consumer, up to the stream's end.
    let rebuilt = dir.path().join("rebuilt");
    let out = replay(&nats, &rebuilt, &["--durable", "rebuilt"]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("50000 applied, 0 already"),
        "{}",
        stdout(&out)
    );

    // Phase B arrives while the swap is under way: the old fleet takes it from
    // its consumer, the rebuilt store will take it from its own.
    let b = fleet_readings(500, 100, base + 20_000_000_000);
    publish_jetstream(&nats.url(), &b).await;
    sent.extend(b);

    // 2. A worker on the rebuilt store continues the replay's consumer and
    //    supersedes the old nodes, which keep running and answering.
    let new = Worker::start(
        &nats,
        "rebuilt",
        &rebuilt,
        &[
            "--mode",
            "jetstream",
            "--durable",
            "rebuilt",
            "--supersedes",
            "old-0,old-1",
        ],
    )
    .await;
    assert!(applied(3, sent.len()).await, "B not applied everywhere");
    let during = query_windows(&nats, 60, range.0, range.1, 3).await;
    assert_eq!(
        total(&during),
        sent.len() as u64,
        "counted twice during the swap"
    );
    assert_same(&during, &expected_windows(&sent, 60));
    assert_same(
        &query_windows(&nats, 1, range.0, range.1, 3).await,
        &expected_windows(&sent, 1),
    );
    assert_eq!(
        new.metric("windrow_worker_applied_messages_total", "")
            .await,
        50_000.0,
        "the new node applied exactly what came after the replay"
    );
    assert_eq!(
        new.metric("windrow_worker_duplicates_skipped_total", "")
            .await,
        0.0
    );

    // 3. The old nodes are retired; the new one answers alone, and keeps up.
    for mut w in old {
        w.process.sigterm().await;
        assert_eq!(
            w.process.wait_exit(Duration::from_secs(40)).await.code(),
            Some(0)
        );
    }
    assert_same(
        &query_windows(&nats, 60, range.0, range.1, 1).await,
        &expected_windows(&sent, 60),
    );
    let c = fleet_readings(500, 100, base + 40_000_000_000);
    publish_jetstream(&nats.url(), &c).await;
    sent.extend(c);
    assert!(
        applied(1, sent.len()).await,
        "C not applied by the new node"
    );
    assert_same(
        &query_windows(&nats, 60, range.0, range.1, 1).await,
        &expected_windows(&sent, 60),
    );
    assert!(!new.process.log().contains("panicked"));
}

/// A stream deleted and created again numbers its messages from 1 again: a
/// store that applied the old stream's sequences must not take the new
/// stream's messages for them (neither a live worker nor a replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_stream_is_not_mistaken_for_the_old_one() {
    let nats = NatsServer::start().await;
    stream(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let base = recent_base();
    let range = (base - 120_000_000_000, now_ns() + 60_000_000_000);
    let worker = Worker::start(
        &nats,
        "live",
        &dir.path().join("live"),
        &["--mode", "jetstream"],
    )
    .await;
    let mut sent = fleet_readings(100, 50, base);
    publish_jetstream(&nats.url(), &sent).await;
    let rebuilt = dir.path().join("rebuilt");
    let applied = |n: usize| {
        let nats = &nats;
        async move {
            wait_until(Duration::from_secs(60), || async move {
                total(&query_windows(nats, 60, range.0, range.1, 1).await) >= n as u64
            })
            .await
        }
    };
    assert!(
        applied(sent.len()).await,
        "the first stream was not applied"
    );
    let out = replay(&nats, &rebuilt, &[]).await;
    assert!(
        stdout(&out).contains("5000 applied, 0 already"),
        "{}",
        stdout(&out)
    );

    // Same name, same sequences 1..5000, other messages.
    stream(&nats).await;
    let second = fleet_readings(100, 50, base + 30_000_000_000);
    publish_jetstream(&nats.url(), &second).await;
    sent.extend(second);
    assert!(
        applied(sent.len()).await,
        "the live worker skipped the new stream's messages: {}",
        worker.process.log()
    );
    assert_same(
        &query_windows(&nats, 60, range.0, range.1, 1).await,
        &expected_windows(&sent, 60),
    );
    let out = replay(&nats, &rebuilt, &[]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("5000 applied, 0 already"),
        "the replay skipped the new stream's messages: {}",
        stdout(&out)
    );
    assert_same(
        &store_windows(&rebuilt, 60).await,
        &expected_windows(&sent, 60),
    );
}
