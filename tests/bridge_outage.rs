//! The bridge through a NATS outage: while nats-server is down and devices keep
//! publishing, the bridge stops reading MQTT once `max_in_flight` publishes
//! await their ack (Mosquitto holds the backlog), so its memory stays bounded;
//! once NATS is back every message reaches the stream exactly once.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::time::Duration;

use common::{metric, numbered_messages, seq_of, tally, Bridge};
use rumqttc::QoS;
use tokio::time::Instant;
use windrow_harness::{
    clients::{create_stream, mqtt_publish, read_stream, stream_len},
    http_get, wait_until, Mosquitto, MosquittoOptions, NatsServer,
};

const STREAM: &str = "TELEMETRY";
const MAX_IN_FLIGHT: usize = 256;
const CONNECTIONS: usize = 4;
/// Messages published before the outage, to warm up connections, buffers and
/// the allocator before the RSS baseline is taken.
const WARM_UP: usize = 2_000;
/// Allowed growth of the bridge's resident memory over its warmed-up baseline
/// while the backlog builds up. Taking the backlog in without backpressure
/// would hold every message with its envelope and publish future: well over
/// 100 MiB for 200,000 messages.
const RSS_GROWTH_LIMIT_KIB: u64 = 48 * 1024;

/// Resident set size of `pid` in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// The worst the bridge looked while being watched.
#[derive(Debug, Default)]
struct Watch {
    samples: usize,
    max_in_flight: f64,
    max_rss_kib: u64,
    /// Messages taken from MQTT and not (yet) acknowledged by JetStream.
    max_taken_not_stored: f64,
    readyz_200: usize,
}

impl Watch {
    /// Samples the in-flight gauge, received minus forwarded, RSS and /readyz once.
    async fn sample(&mut self, bridge: &Bridge) {
        if let Some(status) = bridge.process.try_exit() {
            panic!("bridge exited with {status}");
        }
        let port = bridge.http_port;
        let in_flight = metric(port, "windrow_bridge_in_flight_messages", "").await;
        let received = metric(port, "windrow_bridge_received_messages_total", "qos=\"1\"").await;
        let forwarded = metric(port, "windrow_bridge_forwarded_messages_total", "jetstream").await;
        self.samples += 1;
        self.max_in_flight = self.max_in_flight.max(in_flight);
        self.max_taken_not_stored = self.max_taken_not_stored.max(received - forwarded);
        self.max_rss_kib = self.max_rss_kib.max(rss_kib(bridge.process.pid()));
        if matches!(http_get(port, "/readyz").await, Ok((200, _))) {
            self.readyz_200 += 1;
        }
    }
}

/// One outage: how much is published, and how the bridge is set up.
struct Scenario {
    /// Messages in all, `WARM_UP` of them before the outage.
    total: usize,
    /// How long NATS stays down after the publisher finished.
    down_after_publishing: Duration,
    /// Extra bridge flags.
    flags: &'static [&'static str],
}

/// What happened, for the test's own assertions; the brokers are still running.
struct Outcome {
    bridge: Bridge,
    _nats: NatsServer,
    _mqtt: Mosquitto,
}

/// nats-server with the stream, and a Mosquitto that can hold the whole backlog.
async fn brokers() -> (NatsServer, Mosquitto) {
    let nats = NatsServer::start().await;
    // Mosquitto holds the backlog (up to 200,000 messages). max_queued_messages
    // 1,000,000: nothing is dropped for a bridge connection that falls behind or,
    // in the keep-alive test, is disconnected (the default, 1000, drops the
    // excess silently). max_inflight_messages 0 lifts Mosquitto's own limit of
    // 20 unacknowledged messages per client, so that only the bridge's
    // backpressure keeps the backlog out of the bridge. No persistence: the
    // broker is not restarted here, and saving a large queue every second (the
    // harness's autosave) only slows the test down.
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        max_queued_messages: Some(1_000_000),
        max_inflight_messages: Some(0),
        persistence: false,
        ..MosquittoOptions::default()
    })
    .await;
    create_stream(
        &nats.url(),
        STREAM,
        &["windrow.telemetry.>"],
        Duration::from_secs(300),
    )
    .await;
    (nats, mqtt)
}

/// A bridge with one QoS 1 JetStream route, `MAX_IN_FLIGHT` and `CONNECTIONS`, plus `extra` flags.
async fn start_bridge(
    nats: &NatsServer,
    mqtt: &Mosquitto,
    client_id: &str,
    extra: &[&str],
) -> Bridge {
    let mut flags = vec![
        "--route".to_owned(),
        "#,qos=1,delivery=jetstream".to_owned(),
        "--max-in-flight".to_owned(),
        MAX_IN_FLIGHT.to_string(),
        "--connections".to_owned(),
        CONNECTIONS.to_string(),
    ];
    flags.extend(extra.iter().map(|f| (*f).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Bridge::start(nats, mqtt, client_id, &flags).await
}

fn messages(total: usize) -> Vec<(String, Vec<u8>)> {
    let topics: Vec<String> = (0..100).map(|i| format!("site/{i}/temp")).collect();
    numbered_messages(total, &topics)
}

/// Runs `s`: warm up, stop NATS, publish the rest while watching the bridge,
/// restart NATS, and check that every message is in the stream exactly once.
async fn run(s: Scenario, client_id: &str) -> Outcome {
    let (mut nats, mqtt) = brokers().await;
    let bridge = start_bridge(&nats, &mqtt, client_id, s.flags).await;
    let mut messages = messages(s.total);
    let backlog = messages.split_off(WARM_UP);

    mqtt_publish(mqtt.port(), "publisher", messages, QoS::AtLeastOnce, None).await;
    let url = nats.url();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let url = url.clone();
            async move { stream_len(&url, STREAM).await >= WARM_UP as u64 }
        })
        .await,
        "warm-up messages not stored"
    );
    let baseline_kib = rss_kib(bridge.process.pid());

    nats.stop().await;
    let port = bridge.http_port;
    assert!(
        wait_until(Duration::from_secs(15), || async move {
            matches!(http_get(port, "/readyz").await, Ok((503, _)))
        })
        .await,
        "bridge not reported unready after NATS stopped"
    );

    // At most ~20,000 messages/s, so that the backlog builds up over a while.
    let mqtt_port = mqtt.port();
    let mut publisher = tokio::spawn(async move {
        mqtt_publish(
            mqtt_port,
            "publisher",
            backlog,
            QoS::AtLeastOnce,
            Some(Duration::from_millis(50)),
        )
        .await;
    });
    let mut outage = Watch::default();
    let mut published_at: Option<Instant> = None;
    while published_at.is_none_or(|t| t.elapsed() < s.down_after_publishing) {
        outage.sample(&bridge).await;
        match published_at {
            None => {
                let wait = tokio::time::timeout(Duration::from_millis(100), &mut publisher);
                if let Ok(done) = wait.await {
                    done.unwrap();
                    published_at = Some(Instant::now());
                }
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    eprintln!(
        "{client_id}: NATS down: {} samples; RSS baseline {baseline_kib} KiB, max {} KiB \
         (+{} KiB); max in flight {}; max taken from MQTT but not stored {}",
        outage.samples,
        outage.max_rss_kib,
        outage.max_rss_kib.saturating_sub(baseline_kib),
        outage.max_in_flight,
        outage.max_taken_not_stored,
    );
    assert_eq!(
        outage.readyz_200, 0,
        "/readyz answered 200 while NATS was down"
    );
    assert!(
        outage.max_in_flight > 0.0,
        "nothing was in flight: the backlog never reached the bridge"
    );
    assert!(
        outage.max_in_flight <= MAX_IN_FLIGHT as f64,
        "in-flight gauge reached {} > max_in_flight {MAX_IN_FLIGHT}",
        outage.max_in_flight
    );
    // Each connection task may hold one more message, waiting for a slot.
    assert!(
        outage.max_taken_not_stored <= (MAX_IN_FLIGHT + CONNECTIONS) as f64,
        "the bridge kept reading MQTT: {} messages taken and not stored",
        outage.max_taken_not_stored
    );
    assert!(
        outage.max_rss_kib.saturating_sub(baseline_kib) < RSS_GROWTH_LIMIT_KIB,
        "RSS grew from {baseline_kib} KiB to {} KiB while NATS was down",
        outage.max_rss_kib
    );

    nats.restart().await;
    let recovery = wait_for_stream(&bridge, &nats, s.total).await;
    eprintln!(
        "{client_id}: NATS back: max in flight {}; max RSS {} KiB",
        recovery.max_in_flight, recovery.max_rss_kib
    );
    assert!(
        recovery.max_in_flight <= MAX_IN_FLIGHT as f64,
        "in-flight gauge reached {} > {MAX_IN_FLIGHT} while catching up",
        recovery.max_in_flight
    );
    bridge
        .process
        .wait_ready(port, Duration::from_secs(30))
        .await;
    assert_each_stored_once(&nats, s.total).await;
    Outcome {
        bridge,
        _nats: nats,
        _mqtt: mqtt,
    }
}

/// Watches the bridge until the stream holds `total` messages; fails if it
/// stops growing for 60 s.
async fn wait_for_stream(bridge: &Bridge, nats: &NatsServer, total: usize) -> Watch {
    let mut watch = Watch::default();
    let url = nats.url();
    let mut stored = 0;
    let mut progress_at = Instant::now();
    while stored < total as u64 {
        watch.sample(bridge).await;
        let now = stream_len(&url, STREAM).await;
        if now > stored {
            stored = now;
            progress_at = Instant::now();
        }
        assert!(
            progress_at.elapsed() < Duration::from_secs(60),
            "stream stuck at {stored} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watch
}

/// Every seq is in the stream exactly once, each under its own `Nats-Msg-Id`.
async fn assert_each_stored_once(nats: &NatsServer, total: usize) {
    // Let late retries, if any, land before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = read_stream(&nats.url(), STREAM).await;
    let (missing, dups) = tally(total, stored.iter().map(|m| seq_of(&m.payload)));
    assert!(
        missing.is_empty(),
        "{} of {total} messages missing; first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(dups, 0, "duplicates in the stream");
    let ids: std::collections::HashSet<&String> = stored
        .iter()
        .filter_map(|m| m.headers.get("Nats-Msg-Id"))
        .collect();
    assert_eq!(ids.len(), total, "one distinct Nats-Msg-Id per message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_outage_keeps_bridge_memory_bounded_then_every_message_arrives_once() {
    // The bridge sends no MQTT PINGREQ while backpressure holds its connection
    // tasks, so an outage longer than 1.5 × keep-alive makes Mosquitto drop the
    // connections and redeliver (the next test). A long keep-alive keeps this
    // test about the backlog alone, however slow the machine.
    let outcome = run(
        Scenario {
            total: 200_000,
            down_after_publishing: Duration::from_secs(10),
            flags: &["--keep-alive-secs", "600"],
        },
        "outage",
    )
    .await;
    let errors = outcome
        .bridge
        .metric("windrow_bridge_mqtt_connection_errors_total", "")
        .await;
    assert_eq!(errors, 0.0, "the MQTT connections stayed up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_outage_longer_than_mqtt_keep_alive_loses_nothing_with_content_hash_ids() {
    // Keep-alive 5 s: Mosquitto drops the silent connections after 7.5 s and
    // redelivers what they held; content-hash ids make the redelivered copies
    // JetStream duplicates (uuid7 ids would store them twice, as documented).
    let outcome = run(
        Scenario {
            total: 50_000,
            down_after_publishing: Duration::from_secs(12),
            flags: &["--keep-alive-secs", "5", "--message-id", "content-hash"],
        },
        "outage-keepalive",
    )
    .await;
    let errors = outcome
        .bridge
        .metric("windrow_bridge_mqtt_connection_errors_total", "")
        .await;
    assert!(
        errors >= 1.0,
        "the broker was expected to drop the silent connections"
    );
    let duplicates = outcome
        .bridge
        .metric("windrow_bridge_jetstream_duplicates_total", "")
        .await;
    eprintln!(
        "outage-keepalive: {errors} MQTT connection errors, {duplicates} JetStream duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_nats_outage_ends_the_drain_at_its_timeout_and_loses_nothing() {
    let (mut nats, mqtt) = brokers().await;
    let bridge = start_bridge(
        &nats,
        &mqtt,
        "outage-sigterm",
        &["--shutdown-timeout-secs", "3"],
    )
    .await;
    nats.stop().await;
    let total = 5_000;
    mqtt_publish(
        mqtt.port(),
        "publisher",
        messages(total),
        QoS::AtLeastOnce,
        None,
    )
    .await;
    let port = bridge.http_port;
    assert!(
        wait_until(Duration::from_secs(30), || async move {
            metric(port, "windrow_bridge_in_flight_messages", "").await == MAX_IN_FLIGHT as f64
        })
        .await,
        "backpressure never engaged"
    );

    // Nothing can be acknowledged: the drain gives up after 3 s, drops what is
    // in flight (the broker keeps it) and the process exits.
    let mut bridge = bridge;
    bridge.process.sigterm().await;
    let status = bridge.process.wait_exit(Duration::from_secs(30)).await;
    let log = bridge.process.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("drain timed out"), "{log}");

    nats.restart().await;
    let bridge = bridge.restart().await;
    wait_for_stream(&bridge, &nats, total).await;
    assert_each_stored_once(&nats, total).await;
}
