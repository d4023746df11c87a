//! `windrow streams plan|apply` and `--ensure-streams` against a real nats-server.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use async_nats::jetstream::{self, consumer, stream};
use common::Worker;
use windrow_harness::{NatsServer, RoleProcess};

const STREAM: &str = "TELEMETRY";
const DURABLE: &str = "windrow-workers";

/// A `[jetstream]` section: stream TELEMETRY and its consumer, each with `extra` keys.
fn declaration(stream_extra: &str, consumer_extra: &str) -> String {
    format!(
        "[[jetstream.streams]]\nname = \"{STREAM}\"\nsubjects = [\"windrow.telemetry.>\"]\n{stream_extra}\n\
         [[jetstream.consumers]]\nstream = \"{STREAM}\"\ndurable = \"{DURABLE}\"\n{consumer_extra}\n"
    )
}

const V1_STREAM: &str = "storage = \"file\"\nmax_age_secs = 3600\nmax_msgs_per_subject = 100\n\
                         duplicate_window_secs = 60\ndiscard = \"old\"\nmax_bytes = 1000000000";
const V1_CONSUMER: &str = "filter_subject = \"windrow.telemetry.>\"\nmax_ack_pending = 8000\n\
                           max_deliver = 5\nbackoff_secs = [1, 10]";

/// What a `windrow` run printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `windrow streams <verb> --config <file> --nats-url <url> <extra>`.
async fn streams(verb: &str, config: &Path, url: &str, extra: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(common::windrow());
    cmd.args(["streams", verb, "--config", config.to_str().unwrap()])
        .args(["--nats-url", url])
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WINDROW_") {
            cmd.env_remove(key);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("windrow streams did not finish within 30 s")
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A config file in `dir` with `text`.
fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("windrow.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn context(nats: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(nats.url()).await.unwrap())
}

async fn stream_info(js: &jetstream::Context) -> stream::Info {
    js.get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
}

async fn consumer_info(js: &jetstream::Context) -> consumer::Info {
    let stream = js.get_stream(STREAM).await.unwrap();
    stream.consumer_info(DURABLE).await.unwrap()
}

async fn publish(js: &jetstream::Context, n: usize) {
    for i in 0..n {
        js.publish(format!("windrow.telemetry.dev{i}"), "1".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Applies `text` and expects success.
async fn apply_ok(config: &Path, url: &str) -> Run {
    let run = streams("apply", config, url, &[]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

#[tokio::test]
async fn plan_shows_creates_and_apply_creates_them_with_the_declared_values() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));

    let plan = streams("plan", &config, &nats.url(), &[]).await;
    assert_eq!(plan.code, Some(0), "{plan:?}");
    assert!(
        plan.stdout.contains("stream TELEMETRY: create\n"),
        "{plan:?}"
    );
    assert!(
        plan.stdout.contains("    max_age_secs = 3600\n"),
        "{plan:?}"
    );
    assert!(
        plan.stdout
            .contains("consumer TELEMETRY/windrow-workers: create\n"),
        "{plan:?}"
    );
    let js = context(&nats).await;
    assert!(js.get_stream(STREAM).await.is_err(), "plan must not create");

    let run = apply_ok(&config, &nats.url()).await;
    assert!(run.stdout.contains("stream TELEMETRY: created"), "{run:?}");
    let s = stream_info(&js).await.config;
    assert_eq!(s.subjects, ["windrow.telemetry.>"]);
    assert_eq!(s.storage, stream::StorageType::File);
    assert_eq!(s.max_age, Duration::from_secs(3600));
    assert_eq!(s.max_messages_per_subject, 100);
    assert_eq!(s.duplicate_window, Duration::from_secs(60));
    assert_eq!(s.max_bytes, 1_000_000_000);
    assert_eq!(s.max_messages, -1);
    assert_eq!(s.discard, stream::DiscardPolicy::Old);
    let c = consumer_info(&js).await.config;
    assert_eq!(c.durable_name.as_deref(), Some(DURABLE));
    assert_eq!(c.deliver_subject, None, "a pull consumer");
    assert_eq!(c.ack_policy, consumer::AckPolicy::Explicit);
    assert_eq!(c.deliver_policy, consumer::DeliverPolicy::All);
    assert_eq!(c.filter_subject, "windrow.telemetry.>");
    assert_eq!(c.max_ack_pending, 8000);
    assert_eq!(c.max_deliver, 5);
    assert_eq!(c.backoff, [Duration::from_secs(1), Duration::from_secs(10)]);
    assert_eq!(c.ack_wait, Duration::from_secs(1), "backoff_secs[0]");
}

#[tokio::test]
async fn a_second_apply_changes_nothing_and_plan_says_so() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));
    apply_ok(&config, &nats.url()).await;
    let js = context(&nats).await;
    publish(&js, 3).await;
    let before = (stream_info(&js).await, consumer_info(&js).await);

    let again = apply_ok(&config, &nats.url()).await;
    assert!(
        again
            .stdout
            .ends_with("no changes: the server already matched the declaration\n"),
        "{again:?}"
    );
    assert!(
        again.stdout.contains("stream TELEMETRY: unchanged"),
        "{again:?}"
    );
    let plan = streams("plan", &config, &nats.url(), &[]).await;
    assert_eq!(plan.code, Some(0), "{plan:?}");
    assert!(
        plan.stdout
            .ends_with("no changes: the server matches the declaration\n"),
        "{plan:?}"
    );
    let after = (stream_info(&js).await, consumer_info(&js).await);
    assert_eq!(before.0.config, after.0.config);
    assert_eq!(before.0.created, after.0.created);
    assert_eq!(after.0.state.messages, 3);
    assert_eq!(before.1.config, after.1.config);
    assert_eq!(before.1.created, after.1.created);
}

#[tokio::test]
async fn in_place_changes_are_applied_field_by_field_and_keep_the_messages() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));
    apply_ok(&config, &nats.url()).await;
    let js = context(&nats).await;
    publish(&js, 5).await;

    let v2_stream = V1_STREAM
        .replace("max_age_secs = 3600", "max_age_secs = 7200")
        .replace("max_msgs_per_subject = 100", "max_msgs_per_subject = 10")
        .replace("discard = \"old\"", "discard = \"new\"");
    let v2_consumer = "filter_subject = \"windrow.telemetry.dev1\"\nmax_ack_pending = 500\n\
                       max_deliver = 5\nbackoff_secs = [2, 10]";
    write_config(dir.path(), &declaration(&v2_stream, v2_consumer));

    let plan = streams("plan", &config, &nats.url(), &[]).await;
    assert_eq!(plan.code, Some(0), "{plan:?}");
    for line in [
        "stream TELEMETRY: update in place\n",
        "    max_age_secs: 3600 → 7200\n",
        "    max_msgs_per_subject: 100 → 10\n",
        "    discard: old → new\n",
        "consumer TELEMETRY/windrow-workers: update in place\n",
        "    filter_subject: windrow.telemetry.> → windrow.telemetry.dev1\n",
        "    ack_wait_secs: 1 → 2\n",
        "    max_ack_pending: 8000 → 500\n",
        "    backoff_secs: [1, 10] → [2, 10]\n",
        "0 to create, 2 to update, 0 refused, 0 unchanged\n",
    ] {
        assert!(plan.stdout.contains(line), "missing {line:?} in {plan:?}");
    }
    assert!(!plan.stdout.contains("max_bytes"), "{plan:?}");
    let created = stream_info(&js).await.created;

    let run = apply_ok(&config, &nats.url()).await;
    assert!(
        run.stdout.contains("stream TELEMETRY: updated in place"),
        "{run:?}"
    );
    let s = stream_info(&js).await;
    assert_eq!(s.config.max_age, Duration::from_secs(7200));
    assert_eq!(s.config.max_messages_per_subject, 10);
    assert_eq!(s.config.discard, stream::DiscardPolicy::New);
    assert_eq!(s.config.max_bytes, 1_000_000_000, "untouched");
    assert_eq!(s.created, created, "updated, not recreated");
    assert_eq!(s.state.messages, 5, "an update keeps the messages");
    let c = consumer_info(&js).await;
    assert_eq!(c.config.max_ack_pending, 500);
    assert_eq!(c.config.filter_subject, "windrow.telemetry.dev1");
    assert_eq!(c.config.ack_wait, Duration::from_secs(2));
    assert_eq!(
        c.num_pending, 1,
        "the new filter applies to stored messages"
    );
    let again = apply_ok(&config, &nats.url()).await;
    assert!(again.stdout.contains("no changes"), "{again:?}");
}

#[tokio::test]
async fn a_storage_change_is_refused_and_recreate_then_performs_it() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));
    apply_ok(&config, &nats.url()).await;
    let js = context(&nats).await;
    publish(&js, 4).await;
    let before = stream_info(&js).await;

    let memory = V1_STREAM
        .replace("storage = \"file\"", "storage = \"memory\"")
        .replace("max_age_secs = 3600", "max_age_secs = 60");
    write_config(dir.path(), &declaration(&memory, V1_CONSUMER));
    let plan = streams("plan", &config, &nats.url(), &[]).await;
    assert_eq!(plan.code, Some(2), "{plan:?}");
    assert!(
        plan.stdout.contains(
            "stream TELEMETRY: refused: needs --recreate (delete + create)\n    \
             storage: file → memory  (cannot change in place)\n"
        ),
        "{plan:?}"
    );
    let refused = streams("apply", &config, &nats.url(), &[]).await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("stream TELEMETRY: cannot change in place: storage (file → memory)"),
        "{refused:?}"
    );
    assert!(refused.stderr.contains("--recreate"), "{refused:?}");
    let after = stream_info(&js).await;
    assert_eq!(
        after.config, before.config,
        "nothing changed, not even max_age"
    );
    assert_eq!(after.created, before.created);
    assert_eq!(after.state.messages, 4);

    let plan = streams("plan", &config, &nats.url(), &["--recreate"]).await;
    assert_eq!(plan.code, Some(0), "{plan:?}");
    assert!(
        plan.stdout
            .contains("stream TELEMETRY: recreate (delete + create)"),
        "{plan:?}"
    );
    assert!(
        plan.stdout
            .contains("consumer TELEMETRY/windrow-workers: create again (its stream is recreated)"),
        "{plan:?}"
    );
    let run = streams("apply", &config, &nats.url(), &["--recreate"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stderr.contains(
            "warning: stream TELEMETRY: deleted and created again: its 4 message(s) and 1 consumer(s) were lost"
        ),
        "{run:?}"
    );
    let s = stream_info(&js).await;
    assert_eq!(s.config.storage, stream::StorageType::Memory);
    assert_eq!(s.config.max_age, Duration::from_secs(60));
    assert_eq!(s.state.messages, 0);
    assert_eq!(
        consumer_info(&js).await.config.max_ack_pending,
        8000,
        "consumer created again"
    );
    let again = apply_ok(&config, &nats.url()).await;
    assert!(again.stdout.contains("no changes"), "{again:?}");
}

#[tokio::test]
async fn a_consumer_deliver_policy_change_is_refused_and_recreate_resets_its_position() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));
    apply_ok(&config, &nats.url()).await;
    let js = context(&nats).await;
    publish(&js, 3).await;

    let new = format!("{V1_CONSUMER}\ndeliver_policy = \"new\"");
    write_config(dir.path(), &declaration(V1_STREAM, &new));
    let refused = streams("apply", &config, &nats.url(), &[]).await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(
        refused.stderr.contains(
            "consumer TELEMETRY/windrow-workers: cannot change in place: deliver_policy (all → new)"
        ),
        "{refused:?}"
    );
    assert_eq!(consumer_info(&js).await.num_pending, 3, "unchanged");

    let run = streams("apply", &config, &nats.url(), &["--recreate"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stderr.contains(
            "warning: consumer TELEMETRY/windrow-workers: deleted and created again: its position"
        ),
        "{run:?}"
    );
    let c = consumer_info(&js).await;
    assert_eq!(c.config.deliver_policy, consumer::DeliverPolicy::New);
    assert_eq!(c.num_pending, 0, "starts after the stored messages");
    assert_eq!(
        stream_info(&js).await.state.messages,
        3,
        "the stream keeps its messages"
    );
}

#[tokio::test]
async fn an_invalid_declaration_exits_2_naming_the_key_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1: nothing listens; validation must fail before any connection attempt.
    let url = "nats://127.0.0.1:1";
    let cases = [
        (
            "[[jetstream.streams]]\nname = \"S\"\n",
            "jetstream.streams[0].subjects: must not be empty",
        ),
        (
            &*declaration("storage = \"disk\"", ""),
            "jetstream.streams[0].storage: unknown variant",
        ),
        (
            &*declaration("max_age_secs = 30\nduplicate_window_secs = 120", ""),
            "jetstream.streams[0].duplicate_window_secs: must be ≤ max_age_secs (30), got 120",
        ),
        (
            &*declaration("", "backoff_secs = [1, 5]\nmax_deliver = 2"),
            "jetstream.consumers[0].max_deliver: must be more than the 2 backoff_secs values",
        ),
        (
            &*declaration("", "filter_subject = \"other.>\""),
            "jetstream.consumers[0].filter_subject: \"other.>\" is not within the subjects of stream \"TELEMETRY\"",
        ),
        (
            &*declaration("", "ack_policy = \"none\""),
            "unknown field: found `ack_policy`",
        ),
    ];
    for (text, needle) in cases {
        let config = write_config(dir.path(), text);
        for verb in ["plan", "apply"] {
            let run =
                tokio::time::timeout(Duration::from_secs(3), streams(verb, &config, url, &[]))
                    .await
                    .expect("validation must not wait for a connection");
            assert_eq!(run.code, Some(2), "{text}\n{run:?}");
            assert!(run.stderr.contains(needle), "expected {needle:?}:\n{run:?}");
        }
    }
}

#[tokio::test]
async fn a_consumer_on_a_stream_that_is_nowhere_exits_2() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[[jetstream.consumers]]\nstream = \"ELSEWHERE\"\ndurable = \"w\"\n",
    );
    let run = streams("apply", &config, &nats.url(), &[]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("consumer ELSEWHERE/w: stream ELSEWHERE is not on the server and not declared in jetstream.streams"),
        "{run:?}"
    );
}

#[tokio::test]
async fn an_unreachable_server_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));
    let url = format!("nats://127.0.0.1:{}", windrow_harness::free_port());
    let run = streams("plan", &config, &url, &["--nats-request-timeout-secs", "1"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("stream TELEMETRY: info"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_with_ensure_streams_creates_the_declared_stream_on_a_fresh_server() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--mode",
        "jetstream",
        "--ensure-streams",
    ];
    let mut worker = Worker::start(&nats, "w1", &dir.path().join("data"), &args).await;

    let js = context(&nats).await;
    let s = stream_info(&js).await.config;
    assert_eq!(s.subjects, ["windrow.telemetry.>"]);
    assert_eq!(s.max_age, Duration::from_secs(3600));
    assert_eq!(s.duplicate_window, Duration::from_secs(60));
    // 8000, not the worker's own default of 50000: the declaration made it.
    assert_eq!(consumer_info(&js).await.config.max_ack_pending, 8000);
    worker.process.sigterm().await;
    let status = worker.process.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.process.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_with_ensure_streams_does_not_start_on_a_refused_change() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));
    apply_ok(&config, &nats.url()).await;
    let memory = V1_STREAM.replace("storage = \"file\"", "storage = \"memory\"");
    write_config(dir.path(), &declaration(&memory, V1_CONSUMER));
    let data = dir.path().join("data");
    let mut worker = RoleProcess::spawn(
        common::windrow(),
        &[
            "worker",
            "--config",
            config.to_str().unwrap(),
            "--nats-url",
            &nats.url(),
            "--mode",
            "jetstream",
            "--data-dir",
            data.to_str().unwrap(),
            "--http-listen",
            &format!("127.0.0.1:{}", windrow_harness::free_port()),
            "--ensure-streams",
        ],
        &[],
    );
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    let log = worker.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("stream TELEMETRY: cannot change in place: storage (file → memory)"),
        "{log}"
    );
    let js = context(&nats).await;
    assert_eq!(
        stream_info(&js).await.config.storage,
        stream::StorageType::File
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_with_ensure_streams_exits_1_when_the_server_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &declaration(V1_STREAM, V1_CONSUMER));
    let data = dir.path().join("data");
    let url = format!("nats://127.0.0.1:{}", windrow_harness::free_port());
    let mut worker = RoleProcess::spawn(
        common::windrow(),
        &[
            "worker",
            "--config",
            config.to_str().unwrap(),
            "--nats-url",
            &url,
            "--nats-request-timeout-secs",
            "1",
            "--mode",
            "jetstream",
            "--data-dir",
            data.to_str().unwrap(),
            "--http-listen",
            &format!("127.0.0.1:{}", windrow_harness::free_port()),
            "--ensure-streams",
        ],
        &[],
    );
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    let log = worker.log();
    // Not a configuration problem (2): an orchestrator should retry it.
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("--ensure-streams"), "{log}");
}

#[tokio::test]
async fn config_check_validates_the_jetstream_declaration() {
    let dir = tempfile::tempdir().unwrap();
    let bad = V1_STREAM.replace("storage = \"file\"", "storage = \"tape\"");
    let config = write_config(dir.path(), &declaration(&bad, V1_CONSUMER));
    let out = tokio::process::Command::new(common::windrow())
        .args(["--config", config.to_str().unwrap(), "config", "check"])
        .env_remove("WINDROW_CONFIG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("jetstream.streams[0].storage"), "{stderr}");
}
