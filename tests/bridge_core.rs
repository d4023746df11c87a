//! The bridge into core NATS: throughput path, topic codec end to end, bad input.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::{collections::HashMap, time::Duration};

use common::{numbered_messages, seq_of, tally, Bridge};
use rumqttc::QoS;
use windrow_harness::{
    clients::{mqtt_publish, Collector},
    wait_until, Mosquitto, NatsOptions, NatsServer, RoleProcess,
};

/// 1,000 topics with the characters NATS tokens forbid or that need care.
fn awkward_topics() -> Vec<String> {
    (0..1000)
        .map(|i| match i % 8 {
            0 => format!("plant/line {i}/temp"),
            1 => format!("plant/v1.{i}/x*y>z"),
            2 => format!("/leading/{i}"),
            3 => format!("trailing/{i}/"),
            4 => format!("a//empty/{i}"),
            5 => format!("dollar/$in{i}/%25"),
            6 => format!("unicode/zürich/温度/{i}"),
            _ => format!("plain/{i}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qos0_core_delivers_100k_messages_over_1000_awkward_topics() {
    let nats = NatsServer::start().await;
    let mqtt = Mosquitto::start().await;
    let bridge = Bridge::start(&nats, &mqtt, "core-test", &["--connections", "2"]).await;
    let mut collector = Collector::subscribe(&nats.url(), "windrow.telemetry.>").await;

    let topics = awkward_topics();
    let n = 100_000;
    let messages = numbered_messages(n, &topics);
    let expected_topic: HashMap<usize, String> = messages
        .iter()
        .enumerate()
        .map(|(i, (t, _))| (i, t.clone()))
        .collect();
    mqtt_publish(mqtt.port(), "publisher", messages, QoS::AtMostOnce, None).await;

    let got = collector.wait_for(n, Duration::from_secs(10)).await;
    let received = &collector.messages;
    let (missing, dups) = tally(n, received.iter().map(|m| seq_of(&m.payload)));
    assert!(
        missing.is_empty(),
        "{} of {n} lost (got {got}); first missing {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(dups, 0);
    let mut topics_seen = std::collections::HashSet::new();
    for m in received {
        let seq = seq_of(&m.payload);
        let topic = windrow_jetstream::decode_subject("windrow.telemetry", &m.subject)
            .unwrap_or_else(|e| panic!("subject {:?} does not decode: {e}", m.subject));
        assert_eq!(&topic, &expected_topic[&seq], "topic of seq {seq}");
        assert_eq!(m.headers.get("Windrow-Mqtt-Topic"), Some(&topic));
        assert_eq!(
            m.headers.get("Windrow-Mqtt-Qos").map(String::as_str),
            Some("0")
        );
        assert!(m.headers.contains_key("Nats-Msg-Id"));
        assert!(m.headers.contains_key("Windrow-Received-At"));
        topics_seen.insert(topic);
    }
    assert_eq!(topics_seen.len(), 1000);
    assert_eq!(
        bridge
            .metric("windrow_bridge_forwarded_messages_total", "core")
            .await,
        n as f64
    );
}

/// A bridge stopped with SIGTERM while QoS 0 messages flow loses none of
/// them: it unsubscribes its shared QoS 0 routes first, so that Mosquitto
/// deals the next messages to the other bridge instead of to a session about
/// to be left without a connection (where Mosquitto drops QoS 0), and it
/// forwards what was dealt to it before the broker's UNSUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bridge_stopped_mid_stream_hands_its_qos0_share_to_the_other_bridge() {
    let nats = NatsServer::start().await;
    let mqtt = Mosquitto::start().await;
    let mut leaving = Bridge::start(&nats, &mqtt, "drain-leaving", &[]).await;
    let staying = Bridge::start(&nats, &mqtt, "drain-staying", &[]).await;
    let mut collector = Collector::subscribe(&nats.url(), "windrow.telemetry.>").await;
    let n = 40_000;
    let topics: Vec<String> = (0..100).map(|i| format!("plant/{i}/temp")).collect();
    let messages = numbered_messages(n, &topics);
    let port = mqtt.port();
    // About 20,000 messages/s for 2 s.
    let publisher = tokio::spawn(async move {
        mqtt_publish(
            port,
            "publisher",
            messages,
            QoS::AtMostOnce,
            Some(Duration::from_millis(50)),
        )
        .await;
    });
    // Mid-stream: once the leaving bridge carries part of it (publishing
    // takes at least 2 s).
    assert!(
        wait_until(Duration::from_secs(30), || async {
            leaving
                .metric("windrow_bridge_forwarded_messages_total", "core")
                .await
                > 0.0
        })
        .await,
        "{}",
        leaving.process.log()
    );
    leaving.process.sigterm().await;
    let status = leaving.process.wait_exit(Duration::from_secs(30)).await;
    let log = leaving.process.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("QoS 0 shared routes unsubscribed"), "{log}");
    publisher.await.unwrap();

    let got = collector.wait_for(n, Duration::from_secs(15)).await;
    let (missing, dups) = tally(n, collector.messages.iter().map(|m| seq_of(&m.payload)));
    let staying_forwarded = staying
        .metric("windrow_bridge_forwarded_messages_total", "core")
        .await;
    eprintln!(
        "{got} of {n} arrived; the staying bridge forwarded {staying_forwarded}, the leaving one the rest"
    );
    assert!(
        missing.is_empty(),
        "{} of {n} lost; first missing {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(dups, 0);
    assert!(
        staying_forwarded < n as f64,
        "the leaving bridge carried part of the stream before it left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversize_payload_is_counted_and_dead_lettered_not_forwarded() {
    let nats = NatsServer::start_with(NatsOptions {
        max_payload: Some(64 * 1024),
        ..NatsOptions::default()
    })
    .await;
    let mqtt = Mosquitto::start().await;
    let bridge = Bridge::start(&nats, &mqtt, "oversize-test", &["--route", "big/#,qos=1"]).await;
    let mut telemetry = Collector::subscribe(&nats.url(), "windrow.telemetry.>").await;
    let mut dead = Collector::subscribe(&nats.url(), "windrow.deadletter.bridge").await;

    let messages = vec![
        ("big/before".to_owned(), b"1".to_vec()),
        ("big/huge".to_owned(), vec![b'x'; 100 * 1024]),
        ("big/after".to_owned(), b"2".to_vec()),
    ];
    mqtt_publish(mqtt.port(), "publisher", messages, QoS::AtLeastOnce, None).await;

    assert_eq!(telemetry.wait_for(2, Duration::from_secs(5)).await, 2);
    // Two connections share the subscription, so order across topics is not kept.
    let mut subjects: Vec<&str> = telemetry
        .messages
        .iter()
        .map(|m| m.subject.as_str())
        .collect();
    subjects.sort_unstable();
    assert_eq!(
        subjects,
        [
            "windrow.telemetry.big.after",
            "windrow.telemetry.big.before"
        ]
    );
    assert_eq!(dead.wait_for(1, Duration::from_secs(5)).await, 1);
    let record: serde_json::Value = serde_json::from_slice(&dead.messages[0].payload).unwrap();
    assert_eq!(record["reason"], "oversize");
    assert_eq!(record["topic"], "big/huge");
    assert_eq!(record["payload_bytes"], 100 * 1024);
    assert_eq!(
        dead.messages[0]
            .headers
            .get("Windrow-Dead-Letter-Reason")
            .map(String::as_str),
        Some("oversize")
    );
    assert_eq!(
        bridge
            .metric("windrow_bridge_dropped_messages_total", "oversize")
            .await,
        1.0
    );
    // The oversize message was acknowledged, not redelivered forever.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(telemetry.wait_for(3, Duration::from_millis(500)).await, 2);
}

#[tokio::test]
async fn invalid_config_exits_2_naming_the_key_and_reason() {
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["bridge", "--keep-alive-secs", "0"],
            vec![],
            "bridge.mqtt.keep_alive_secs: must be ≥ 5, got 0",
        ),
        (
            vec!["bridge", "--route", "a/#/b"],
            vec![],
            "bridge.routes[0].filter",
        ),
        (
            vec!["bridge", "--subject-prefix", "a..b"],
            vec![],
            "bridge.nats.subject_prefix",
        ),
        (
            vec!["bridge"],
            vec![("WINDROW_BRIDGE__MQTT__PORT", "not-a-port")],
            "bridge.mqtt.port",
        ),
        (
            vec!["bridge"],
            vec![("WINDROW_BRIDGE__MQTT__CONNECTONS", "3")],
            "connectons",
        ),
        (
            vec!["bridge", "--config", "/nonexistent/windrow.toml"],
            vec![],
            "/nonexistent/windrow.toml",
        ),
    ];
    for (args, envs, needle) in cases {
        let mut p = RoleProcess::spawn(common::windrow(), &args, &envs);
        let status = p.wait_exit(Duration::from_secs(10)).await;
        let log = p.log();
        assert_eq!(status.code(), Some(2), "{args:?} {envs:?}: {log}");
        assert!(
            log.contains(needle),
            "{args:?} {envs:?}: expected {needle:?} in:\n{log}"
        );
    }
}

#[tokio::test]
async fn invalid_config_file_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("windrow.toml");
    std::fs::write(
        &file,
        "[nats]\nurl = \"nats://127.0.0.1:1\"\n[bridge.mqtt]\nkeep_alive = 30\n",
    )
    .unwrap();
    let mut p = RoleProcess::spawn(
        common::windrow(),
        &["bridge", "--config", file.to_str().unwrap()],
        &[],
    );
    let status = p.wait_exit(Duration::from_secs(10)).await;
    let log = p.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("bridge.mqtt") && log.contains("keep_alive"),
        "{log}"
    );
    let mut check = RoleProcess::spawn(
        common::windrow(),
        &["config", "check", "--config", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(
        check.wait_exit(Duration::from_secs(10)).await.code(),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topics_starting_with_dollar_are_bridged_by_a_plain_subscription() {
    // Mosquitto 2.0 never delivers `$`-topics to `$share/` subscriptions, and `#`
    // does not match them (MQTT 4.7.2): they need their own, unshared route.
    let nats = NatsServer::start().await;
    let mqtt = Mosquitto::start().await;
    let _bridge = Bridge::start(
        &nats,
        &mqtt,
        "dollar-test",
        &[
            "--no-shared-subscription",
            "--connections",
            "1",
            "--route",
            "$dollar/#,qos=1",
        ],
    )
    .await;
    let mut collector = Collector::subscribe(&nats.url(), "windrow.telemetry.>").await;
    let topics: Vec<String> = (0..10).map(|i| format!("$dollar/{i}/a.b")).collect();
    mqtt_publish(
        mqtt.port(),
        "publisher",
        numbered_messages(100, &topics),
        QoS::AtLeastOnce,
        None,
    )
    .await;
    assert_eq!(collector.wait_for(100, Duration::from_secs(5)).await, 100);
    for m in &collector.messages {
        let topic = windrow_jetstream::decode_subject("windrow.telemetry", &m.subject).unwrap();
        assert!(
            topic.starts_with("$dollar/") && topic.ends_with("/a.b"),
            "{topic}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sampled_messages_carry_a_w3c_traceparent() {
    let nats = NatsServer::start().await;
    let mqtt = Mosquitto::start().await;
    // An OTLP endpoint that refuses connections: export fails (logged), but the
    // spans exist and their context travels in the headers.
    let dead_collector = format!("http://127.0.0.1:{}", windrow_harness::free_port());
    let http_port = windrow_harness::free_port();
    let args = [
        "bridge",
        "--nats-url",
        &nats.url(),
        "--mqtt-port",
        &mqtt.port().to_string(),
        "--client-id",
        "trace-test",
        "--http-listen",
        &format!("127.0.0.1:{http_port}"),
    ];
    let envs = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", dead_collector.as_str()),
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
    ];
    let bridge = RoleProcess::spawn(common::windrow(), &args, &envs);
    bridge.wait_ready(http_port, Duration::from_secs(20)).await;
    let mut collector = Collector::subscribe(&nats.url(), "windrow.telemetry.>").await;
    let topics = vec!["t/1".to_owned()];
    mqtt_publish(
        mqtt.port(),
        "publisher",
        numbered_messages(100, &topics),
        QoS::AtLeastOnce,
        None,
    )
    .await;
    assert_eq!(collector.wait_for(100, Duration::from_secs(5)).await, 100);
    let traced: Vec<&String> = collector
        .messages
        .iter()
        .filter_map(|m| m.headers.get("traceparent"))
        .collect();
    assert_eq!(traced.len(), 50, "every second message is traced");
    for tp in traced {
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_ne!(parts[1], "0".repeat(32));
        assert_eq!(parts[3], "01", "sampled flag");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retained_messages_are_forwarded_or_ignored_per_route() {
    let nats = NatsServer::start().await;
    let mqtt = Mosquitto::start().await;
    // Retained messages exist before the bridge subscribes.
    let retained = |topic: &str| {
        let status = std::process::Command::new("mosquitto_pub")
            .args([
                "-p",
                &mqtt.port().to_string(),
                "-r",
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                "{\"seq\":0,\"v\":1}",
            ])
            .status()
            .expect("mosquitto_pub (apt-get install mosquitto-clients)");
        assert!(status.success());
    };
    retained("keep/a");
    retained("drop/a");
    // Listening before the bridge starts: Mosquitto sends the retained
    // messages with the SUBACK, the moment the bridge becomes ready.
    let mut collector = Collector::subscribe(&nats.url(), "windrow.telemetry.>").await;
    let _bridge = Bridge::start(
        &nats,
        &mqtt,
        "retain-test",
        &[
            "--no-shared-subscription",
            "--connections",
            "1",
            "--route",
            "keep/#,qos=1",
            "--route",
            "drop/#,qos=1,retained=ignore",
        ],
    )
    .await;
    // Live (non-retained) messages on both routes are forwarded.
    let live = vec![
        ("keep/b".to_owned(), b"1".to_vec()),
        ("drop/b".to_owned(), b"2".to_vec()),
    ];
    mqtt_publish(mqtt.port(), "publisher", live, QoS::AtLeastOnce, None).await;
    collector.wait_for(4, Duration::from_secs(3)).await;
    let mut got: Vec<(String, Option<String>)> = collector
        .messages
        .iter()
        .map(|m| {
            (
                m.subject.clone(),
                m.headers.get("Windrow-Mqtt-Retain").cloned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "windrow.telemetry.drop.b".to_owned(),
                Some("false".to_owned())
            ),
            (
                "windrow.telemetry.keep.a".to_owned(),
                Some("true".to_owned())
            ),
            (
                "windrow.telemetry.keep.b".to_owned(),
                Some("false".to_owned())
            ),
        ]
    );
}
