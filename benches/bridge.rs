//! Throughput of `windrow bridge` against what Mosquitto alone delivers.
//!
//! `cargo bench --bench bridge` runs, with private brokers from the test harness
//! (never the machine's 1883/4222), R interleaved rounds of:
//!
//! - (a) ceiling QoS 0: publisher → Mosquitto → one rumqttc QoS 0 subscriber;
//! - (b) bridge QoS 0: publisher → Mosquitto → `windrow bridge` (core NATS) →
//!   nats-server, counted by nats-server itself (`/varz` `in_msgs`: the
//!   bridge's rate *into* NATS, as the issue asks), and once more end to end
//!   with one async-nats subscriber counting;
//! - (c) ceiling QoS 1: QoS 1 publisher → Mosquitto → C rumqttc QoS 1
//!   subscribers in one shared group;
//! - (c) bridge QoS 1: QoS 1 publisher → Mosquitto → `windrow bridge` (C
//!   connections, JetStream) → a file stream, counted as stored (`/jsz`);
//!
//! and, in the same rounds, (e) (b) with OTLP tracing on (exporting to a
//! stand-in collector) at the default 1 % sampling and at 100 % (with one and
//! with two runtime threads), reported as a ratio to (b); then (d) (a) and (b)
//! once more with Mosquitto's default queue limits. Every scenario gets fresh
//! brokers. The rate is the number of messages counted divided by the time
//! between the first and the last one counted. Progress goes to stderr, a
//! Markdown report to stdout.
//!
//! Environment: `WINDROW_BENCH_MESSAGES` (default 1,000,000),
//! `WINDROW_BENCH_QOS1_MESSAGES` (default: the same), `WINDROW_BENCH_RUNS`
//! (default 3), `WINDROW_BENCH_PUBLISHER` (`raw`, the default: pre-encoded MQTT
//! packets written straight to the socket; or `rumqttc`), `WINDROW_BENCH_TRACING`
//! (`0` leaves out (e)).
//!
//! Without `--bench` (e.g. `cargo test --all-targets`) it does nothing.
#![allow(missing_docs)]

mod support;

use std::{
    fmt::Write as _,
    io::{self, Read, Write},
    net::TcpStream,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode};
use support::{
    cores, cpu_model, cpu_of, env_usize, group, machine_cpus, measuring_client, median, metric,
    rate_text, sample, split_publisher, stat_path, thread_cpu_secs, unix_ms, version_line,
    wait_for_quiet, ClientEvents, Cores, Meter, Procs, DISTURBED_CORES,
};
use windrow_harness::{
    clients::{create_stream, stream_len},
    free_port, http_get, Mosquitto, MosquittoOptions, NatsServer, OtlpCollector, RoleProcess,
};

/// Distinct topics of the workload.
const TOPICS: usize = 1000;
/// Size of every payload.
const PAYLOAD_BYTES: usize = 200;
/// Bridge MQTT connections for QoS 0 (b, d): the bridge's default for QoS 0 routes.
const QOS0_CONNECTIONS: usize = 1;
/// Bridge connections and shared ceiling subscribers for QoS 1 (c).
const QOS1_CONNECTIONS: usize = 4;
/// Mosquitto `max_inflight_messages` per client in (c), for the bridge and the ceiling alike.
const MOSQUITTO_INFLIGHT: u32 = 100;
/// Unacknowledged QoS 1 publishes the publisher keeps in flight.
const PUBLISHER_WINDOW: usize = 1000;
/// JetStream stream of (c).
const STREAM: &str = "BENCH";
/// NATS subjects of the workload's messages.
const BENCH_SUBJECTS: &str = "windrow.telemetry.bench.";
/// A QoS 0 scenario ends this long after the last message once the publisher is done.
const IDLE_END_QOS0: Duration = Duration::from_secs(2);
/// A QoS 1 scenario should lose nothing: it waits longer before giving up.
const IDLE_END_QOS1: Duration = Duration::from_secs(10);
/// A scenario with no message for this long is stopped as stalled.
const STALL: Duration = Duration::from_secs(10);
/// How often the controller looks at the counters.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for a quiet machine before a scenario goes ahead anyway.
const QUIET_WAIT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// Settings and workload

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PublisherKind {
    Raw,
    Rumqttc,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    n: usize,
    n_qos1: usize,
    runs: usize,
    publisher: PublisherKind,
    tracing: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let n = env_usize("WINDROW_BENCH_MESSAGES").unwrap_or(1_000_000);
        let publisher = match std::env::var("WINDROW_BENCH_PUBLISHER").as_deref() {
            Ok("rumqttc") => PublisherKind::Rumqttc,
            Ok("raw") | Err(_) => PublisherKind::Raw,
            Ok(other) => panic!("WINDROW_BENCH_PUBLISHER={other:?}: expected raw or rumqttc"),
        };
        let s = Settings {
            n,
            n_qos1: env_usize("WINDROW_BENCH_QOS1_MESSAGES").unwrap_or(n),
            runs: env_usize("WINDROW_BENCH_RUNS").unwrap_or(3),
            publisher,
            tracing: env_usize("WINDROW_BENCH_TRACING") != Some(0),
        };
        assert!(s.n > 0 && s.n_qos1 > 0 && s.runs > 0, "{s:?}");
        s
    }
}

/// MQTT PUBLISH packets, encoded once, back to back.
struct Encoded {
    bytes: Vec<u8>,
    /// End offset of packet i.
    ends: Vec<usize>,
}

impl Encoded {
    fn new(n: usize, qos: u8, ts0: u64) -> Encoded {
        let mut bytes = Vec::with_capacity(n * (PAYLOAD_BYTES + 32));
        let mut ends = Vec::with_capacity(n);
        for i in 0..n {
            encode_publish(&mut bytes, &topic(i), &payload(i, ts0), qos, packet_id(i));
            ends.push(bytes.len());
        }
        Encoded { bytes, ends }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1]
        }
    }

    fn packet(&self, i: usize) -> &[u8] {
        &self.bytes[self.start(i)..self.ends[i]]
    }
}

fn topic(i: usize) -> String {
    format!("bench/site-{}/temp", i % TOPICS)
}

/// `{"device":"d0123","seq":N,"ts":MS,"temp":21.37,"pad":"xx…"}`, exactly 200 bytes.
fn payload(i: usize, ts0: u64) -> Vec<u8> {
    let mut p = format!(
        r#"{{"device":"d{:04}","seq":{i},"ts":{},"temp":{}.{:02},"pad":""#,
        i % TOPICS,
        ts0 + i as u64,
        15 + (i * 7) % 20,
        (i * 13) % 100
    );
    while p.len() < PAYLOAD_BYTES - 2 {
        p.push('x');
    }
    p.push_str("\"}");
    assert_eq!(p.len(), PAYLOAD_BYTES, "{p}");
    p.into_bytes()
}

/// Packet ids 1..=65535, cycling; at most `PUBLISHER_WINDOW` are in flight.
fn packet_id(i: usize) -> u16 {
    u16::try_from(i % 65535 + 1).expect("below 65536")
}

fn push_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = u8::try_from(len % 128).expect("below 128");
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("MQTT strings are shorter than 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends an MQTT 3.1.1 PUBLISH.
fn encode_publish(out: &mut Vec<u8>, topic: &str, payload: &[u8], qos: u8, pkid: u16) {
    out.push(0x30 | (qos << 1));
    let id_len = if qos > 0 { 2 } else { 0 };
    push_remaining_length(out, 2 + topic.len() + id_len + payload.len());
    push_str(out, topic);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Topic and payload of a packet made by [`encode_publish`].
fn split_publish(packet: &[u8]) -> (&str, &[u8]) {
    let mut pos = 1;
    while packet[pos] & 0x80 != 0 {
        pos += 1;
    }
    pos += 1;
    let topic_len = usize::from(u16::from_be_bytes([packet[pos], packet[pos + 1]]));
    pos += 2;
    let topic = std::str::from_utf8(&packet[pos..pos + topic_len]).expect("UTF-8 topic");
    pos += topic_len;
    if packet[0] & 0x06 != 0 {
        pos += 2;
    }
    (topic, &packet[pos..])
}

/// MQTT 3.1.1 CONNECT, clean session, keep-alive 65535 s (no PINGs needed).
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0xFF, 0xFF];
    push_str(&mut body, client_id);
    let mut out = vec![0x10];
    push_remaining_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

// ---------------------------------------------------------------------------
// Publishers (each on its own OS thread)

fn raw_connect(port: u16, client_id: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.write_all(&connect_packet(client_id))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    if ack != [0x20, 2, 0, 0] {
        return Err(io::Error::other(format!("unexpected CONNACK {ack:?}")));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Sends DISCONNECT and waits until the broker closes the connection, i.e.
/// until it has processed everything sent before.
fn raw_disconnect(mut s: TcpStream) -> io::Result<()> {
    s.write_all(&[0xE0, 0])?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// QoS 0: the whole pre-encoded stream in one `write_all`.
fn raw_qos0(port: u16, enc: &Encoded) -> io::Result<()> {
    let mut s = raw_connect(port, "bench-publisher")?;
    s.write_all(&enc.bytes)?;
    raw_disconnect(s)
}

#[derive(Default)]
struct AckState {
    acked: usize,
    failed: Option<String>,
}

type AckShared = (Mutex<AckState>, Condvar);

fn lock(m: &Mutex<AckState>) -> MutexGuard<'_, AckState> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts PUBACKs (the only packets Mosquitto sends a publish-only client).
fn read_pubacks(mut s: TcpStream, n: usize, shared: &AckShared) {
    let result = (|| -> io::Result<()> {
        s.set_read_timeout(Some(STALL * 3))?;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut carry, mut total) = (0usize, 0usize);
        while total < n {
            let got = s.read(&mut buf[carry..])?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let len = carry + got;
            let whole = len / 4 * 4;
            if let Some(p) = buf[..whole]
                .chunks_exact(4)
                .find(|p| p[0] != 0x40 || p[1] != 2)
            {
                return Err(io::Error::other(format!("expected PUBACK, got {p:?}")));
            }
            buf.copy_within(whole..len, 0);
            carry = len - whole;
            total += whole / 4;
            lock(&shared.0).acked = total;
            shared.1.notify_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        lock(&shared.0).failed = Some(e.to_string());
        shared.1.notify_all();
    }
}

/// QoS 1 with up to `PUBLISHER_WINDOW` unacknowledged publishes, written in batches.
fn raw_qos1(port: u16, enc: &Encoded) -> io::Result<()> {
    let mut s = raw_connect(port, "bench-publisher")?;
    let reader = s.try_clone()?;
    let n = enc.len();
    let shared: Arc<AckShared> = Arc::default();
    let acks = {
        let shared = shared.clone();
        std::thread::spawn(move || read_pubacks(reader, n, &shared))
    };
    let mut sent = 0;
    while sent < n {
        let batch = {
            let mut st = lock(&shared.0);
            let want = (PUBLISHER_WINDOW / 4).min(n - sent);
            while st.failed.is_none() && sent - st.acked + want > PUBLISHER_WINDOW {
                st = shared.1.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(e) = &st.failed {
                return Err(io::Error::other(format!("reading PUBACKs: {e}")));
            }
            (PUBLISHER_WINDOW - (sent - st.acked)).min(n - sent)
        };
        s.write_all(&enc.bytes[enc.start(sent)..enc.ends[sent + batch - 1]])?;
        sent += batch;
    }
    if acks.join().is_err() {
        return Err(io::Error::other("PUBACK reader panicked"));
    }
    if let Some(e) = &lock(&shared.0).failed {
        return Err(io::Error::other(format!("reading PUBACKs: {e}")));
    }
    raw_disconnect(s)
}

/// The same through rumqttc (one flush per publish), for comparison.
fn rumqttc_publish(port: u16, enc: &Encoded, qos: u8) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut o = MqttOptions::new("bench-publisher", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(60))
            .set_clean_session(true)
            .set_inflight(u16::try_from(PUBLISHER_WINDOW).expect("small window"))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 10_000);
        let q = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let n = enc.len();
        let producer = async {
            for i in 0..n {
                let (t, p) = split_publish(enc.packet(i));
                client
                    .publish(t, q, false, p.to_vec())
                    .await
                    .map_err(io::Error::other)?;
            }
            Ok::<_, io::Error>(())
        };
        let events = async {
            let mut done = 0;
            while done < n {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == 0 => done += 1,
                    Ok(Event::Incoming(Packet::PubAck(_))) if qos == 1 => done += 1,
                    Ok(_) => {}
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
            Ok(())
        };
        let (produced, delivered) = tokio::join!(producer, events);
        produced?;
        delivered?;
        client.disconnect().await.map_err(io::Error::other)?;
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    })
}

struct PubReport {
    elapsed: Duration,
    cpu_secs: f64,
}

fn spawn_publisher(
    kind: PublisherKind,
    port: u16,
    enc: Arc<Encoded>,
    qos: u8,
) -> JoinHandle<io::Result<PubReport>> {
    std::thread::Builder::new()
        .name("bench-publisher".into())
        .spawn(move || {
            let cpu0 = thread_cpu_secs();
            let t0 = Instant::now();
            match (kind, qos) {
                (PublisherKind::Raw, 0) => raw_qos0(port, &enc)?,
                (PublisherKind::Raw, _) => raw_qos1(port, &enc)?,
                (PublisherKind::Rumqttc, q) => rumqttc_publish(port, &enc, q)?,
            }
            Ok(PubReport {
                elapsed: t0.elapsed(),
                cpu_secs: thread_cpu_secs() - cpu0,
            })
        })
        .expect("spawn the publisher thread")
}

// ---------------------------------------------------------------------------
// Measuring subscribers

/// A rumqttc subscriber counting publishes into `meter`; returns once subscribed.
async fn mqtt_subscriber(
    port: u16,
    id: String,
    filter: &str,
    qos: QoS,
    meter: Arc<Meter>,
) -> tokio::task::JoinHandle<()> {
    let mut o = MqttOptions::new(id.clone(), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    client
        .subscribe(filter, qos)
        .await
        .expect("queue SUBSCRIBE");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    assert!(
                        !ack.return_codes.contains(&SubscribeReasonCode::Failure),
                        "{id}: subscription refused"
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber {id}: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("subscriber {id}: no SUBACK within 10 s"));
    tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => meter.hit(1),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("[bench] subscriber {id}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// What counts the bridge's messages on the NATS side.
struct NatsCounter {
    task: tokio::task::JoinHandle<()>,
    /// The measuring subscriber's loss events (none when the server counts).
    events: Arc<ClientEvents>,
}

/// Where a bridge scenario counts what reached NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// nats-server's own counter of what it took in (`/varz` `in_msgs`) or
    /// stored (`/jsz` `messages`): the bridge's rate *into* NATS, which is what
    /// the issue compares with the ceiling. Nothing else runs on the machine.
    Server,
    /// A core async-nats subscriber in this process, on the same 2 cores:
    /// end to end, at the cost of one more busy process.
    Subscriber,
}

/// How often a [`Sink::Server`] reads the server's counter: 5 ms, against
/// scenarios of several seconds.
const SERVER_POLL: Duration = Duration::from_millis(5);

/// Counts into `meter` what nats-server reports on `path` under `field` (a
/// number in its JSON), from its value now on.
async fn server_counter(
    monitor: u16,
    path: &'static str,
    field: &'static str,
    meter: Arc<Meter>,
) -> NatsCounter {
    let read = move || async move {
        let (status, body) = http_get(monitor, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} from nats-server: {e}"));
        assert_eq!(status, 200, "GET {path} from nats-server: {body}");
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get(field)?.as_u64())
            .unwrap_or_else(|| panic!("no number {field:?} in nats-server's {path}: {body}"))
    };
    let base = read().await;
    let task = tokio::spawn(async move {
        let mut seen = base;
        loop {
            tokio::time::sleep(SERVER_POLL).await;
            let now = read().await;
            if now > seen {
                meter.hit(now - seen);
                seen = now;
            }
        }
    });
    NatsCounter {
        task,
        events: Arc::new(ClientEvents::default()),
    }
}

async fn nats_subscriber(url: &str, meter: Arc<Meter>) -> NatsCounter {
    let events = Arc::new(ClientEvents::default());
    let client = measuring_client(url, events.clone(), 1 << 21).await;
    let mut sub = client
        .subscribe("windrow.telemetry.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush the subscription");
    let task = tokio::spawn(async move {
        let _client = client;
        while let Some(m) = sub.next().await {
            if m.subject.as_str().starts_with(BENCH_SUBJECTS) {
                meter.hit(1);
            }
        }
        eprintln!("[bench] the NATS subscription ended");
    });
    NatsCounter { task, events }
}

// ---------------------------------------------------------------------------
// Bridge

struct Bridge {
    process: RoleProcess,
    http_port: u16,
}

async fn start_bridge(
    nats: &NatsServer,
    mqtt: &Mosquitto,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Bridge {
    let http_port = free_port();
    let mut args: Vec<String> = [
        "bridge",
        "--nats-url",
        &nats.url(),
        "--mqtt-host",
        "127.0.0.1",
        "--mqtt-port",
        &mqtt.port().to_string(),
        "--client-id",
        "bench-bridge",
        "--http-listen",
        &format!("127.0.0.1:{http_port}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let process = RoleProcess::spawn(Path::new(env!("CARGO_BIN_EXE_windrow")), &refs, envs);
    process.wait_ready(http_port, Duration::from_secs(20)).await;
    Bridge { process, http_port }
}

#[derive(Debug, Clone, Copy, Default)]
struct BridgeCounts {
    received: f64,
    forwarded: f64,
    dropped: f64,
    duplicates: f64,
}

impl std::ops::Sub for BridgeCounts {
    type Output = BridgeCounts;
    fn sub(self, o: BridgeCounts) -> BridgeCounts {
        BridgeCounts {
            received: self.received - o.received,
            forwarded: self.forwarded - o.forwarded,
            dropped: self.dropped - o.dropped,
            duplicates: self.duplicates - o.duplicates,
        }
    }
}

impl Bridge {
    async fn counts(&self) -> BridgeCounts {
        let body = match http_get(self.http_port, "/metrics").await {
            Ok((200, body)) => body,
            other => {
                eprintln!("[bench] GET /metrics: {other:?}");
                return BridgeCounts::default();
            }
        };
        BridgeCounts {
            received: metric(&body, "windrow_bridge_received_messages_total"),
            forwarded: metric(&body, "windrow_bridge_forwarded_messages_total"),
            dropped: metric(&body, "windrow_bridge_dropped_messages_total"),
            duplicates: metric(&body, "windrow_bridge_jetstream_duplicates_total"),
        }
    }
}

/// Publishes QoS 0 probes until one comes out of the bridge, so that the
/// bridge is subscribed before the measurement starts.
async fn probe_bridge(mqtt_port: u16, nats_url: &str) {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect the probe subscriber");
    let mut sub = client
        .subscribe("windrow.telemetry.warmup.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let mut s = raw_connect(mqtt_port, "bench-probe").expect("connect the probe publisher");
    let mut packet = Vec::new();
    encode_publish(&mut packet, "warmup/probe", b"probe", 0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        s.write_all(&packet).expect("publish a probe");
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(_)) => break,
            Ok(None) => panic!("the probe subscription ended"),
            Err(_) => assert!(
                Instant::now() < deadline,
                "the bridge forwarded no probe within 20 s"
            ),
        }
    }
    raw_disconnect(s).expect("disconnect the probe publisher");
    // Let straggling probes through before counters are read.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------
// Measurement

/// Processes of a scenario to account (an empty path for one not running: 0 CPU).
fn procs(mqtt: &Mosquitto, bridge: Option<&Bridge>, nats: Option<&NatsServer>) -> Procs {
    let stat = |pid: Option<u32>| pid.map_or_else(String::new, stat_path);
    let mut v = vec![
        ("bench", "/proc/self/stat".to_owned()),
        ("mosquitto", stat(mqtt.pid())),
    ];
    if let Some(b) = bridge {
        v.push(("bridge", stat(Some(b.process.pid()))));
    }
    if let Some(n) = nats {
        v.push(("nats-server", stat(n.pid())));
    }
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Every message arrived.
    Complete,
    /// The publisher was done and nothing arrived for a while.
    Idle,
    /// Nothing arrived for `STALL`.
    Stalled,
}

struct Measured {
    received: u64,
    window: Duration,
    end: End,
    publisher: Option<PubReport>,
    /// (process, CPU cores used) while messages flowed.
    cpu: Vec<(&'static str, f64)>,
    /// Busy cores of the whole machine meanwhile.
    machine: f64,
}

/// Starts the publisher and watches `meter` until `expected` messages arrived,
/// or the publisher is done and nothing arrived for `idle_end`, or nothing
/// arrived for `STALL`.
async fn measure(
    meter: &Meter,
    expected: u64,
    publish: impl FnOnce() -> JoinHandle<io::Result<PubReport>>,
    idle_end: Duration,
    procs: &Procs,
) -> Measured {
    wait_for_quiet(QUIET_WAIT).await;
    let cpu0 = sample(procs);
    let start = Instant::now();
    let mut publisher = Some(publish());
    let mut report = None;
    let mut cpu_last = cpu0.clone();
    let mut seen = 0;
    let end = loop {
        tokio::time::sleep(POLL).await;
        if publisher.as_ref().is_some_and(JoinHandle::is_finished) {
            match publisher.take().map(JoinHandle::join) {
                Some(Ok(Ok(r))) => report = Some(r),
                Some(Ok(Err(e))) => eprintln!("[bench] publisher failed: {e}"),
                _ => panic!("the publisher thread panicked"),
            }
        }
        let count = meter.count();
        if count != seen {
            seen = count;
            cpu_last = sample(procs);
        }
        if count >= expected {
            break End::Complete;
        }
        let idle = meter.last_at().unwrap_or(start).max(start).elapsed();
        if publisher.is_none() && idle >= idle_end {
            break End::Idle;
        }
        if idle >= STALL {
            break End::Stalled;
        }
    };
    if let Some(h) = publisher.take() {
        // Everything arrived before the publisher saw its last acks, or the
        // scenario ended early: give it a moment. One still blocked is left
        // behind and fails once its broker is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        if h.is_finished() {
            match h.join() {
                Ok(Ok(r)) => report = Some(r),
                Ok(Err(e)) => eprintln!("[bench] publisher failed: {e}"),
                Err(_) => panic!("the publisher thread panicked"),
            }
        }
    }
    let Cores {
        wall_secs,
        per: mut cpu,
        machine,
    } = cores(procs, &cpu0, &cpu_last);
    if let Some(r) = &report {
        split_publisher(&mut cpu, r.cpu_secs / wall_secs, "subscriber");
    }
    Measured {
        received: meter.count(),
        window: meter.window(),
        end,
        publisher: report,
        cpu,
        machine,
    }
}

// ---------------------------------------------------------------------------
// Scenarios

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    CeilingQos0,
    BridgeQos0,
    /// (b) counted by a NATS subscriber on the same cores.
    BridgeQos0Subscribed,
    CeilingQos1,
    BridgeQos1,
    CeilingQos0Defaults,
    BridgeQos0Defaults,
    /// (b) with OTLP export at the default 1 % sampling.
    BridgeQos0Traced1,
    /// (b) with OTLP export, every message traced.
    BridgeQos0Traced100,
    /// (e) 100 % on two runtime threads (`--threads 2`).
    BridgeQos0Traced100Threads2,
}

impl Scenario {
    /// The bridge's runtime threads (`--threads`).
    fn threads(self) -> usize {
        match self {
            Scenario::BridgeQos0Traced100Threads2 => 2,
            _ => 1,
        }
    }

    /// Where a bridge scenario counts its messages.
    fn sink(self) -> Sink {
        match self {
            Scenario::BridgeQos0Subscribed => Sink::Subscriber,
            _ => Sink::Server,
        }
    }

    /// The OTLP sampler settings of a traced scenario.
    fn sampling(self) -> Option<(&'static str, &'static str)> {
        match self {
            Scenario::BridgeQos0Traced1 => Some(("traceidratio", "0.01")),
            Scenario::BridgeQos0Traced100 | Scenario::BridgeQos0Traced100Threads2 => {
                Some(("always_on", "1"))
            }
            _ => None,
        }
    }
}

impl Scenario {
    fn short(self) -> &'static str {
        match self {
            Scenario::CeilingQos0 => "(a) ceiling QoS 0",
            Scenario::BridgeQos0 => "(b) bridge QoS 0 → core NATS",
            Scenario::BridgeQos0Subscribed => "(b) end to end: + a NATS subscriber",
            Scenario::CeilingQos1 => "(c) ceiling QoS 1",
            Scenario::BridgeQos1 => "(c) bridge QoS 1 → JetStream",
            Scenario::CeilingQos0Defaults => "(d) ceiling QoS 0, Mosquitto defaults",
            Scenario::BridgeQos0Defaults => "(d) bridge QoS 0, Mosquitto defaults",
            Scenario::BridgeQos0Traced1 => "(e) bridge QoS 0, tracing 1 %",
            Scenario::BridgeQos0Traced100 => "(e) bridge QoS 0, tracing 100 %",
            Scenario::BridgeQos0Traced100Threads2 => "(e) bridge QoS 0, tracing 100 %, 2 threads",
        }
    }

    fn path(self) -> String {
        match self {
            Scenario::CeilingQos0 | Scenario::CeilingQos0Defaults => {
                "publisher → Mosquitto → 1 rumqttc QoS 0 subscriber (`bench/#`)".into()
            }
            Scenario::BridgeQos0 | Scenario::BridgeQos0Defaults => format!(
                "publisher → Mosquitto → windrow bridge ({QOS0_CONNECTIONS} connection, `#` QoS 0 core) \
                 → nats-server; counted by nats-server (`/varz` `in_msgs`)"
            ),
            Scenario::BridgeQos0Subscribed => {
                "as (b), and nats-server delivers to 1 async-nats core subscriber in the \
                 benchmark process (`windrow.telemetry.>`), which counts"
                    .into()
            }
            Scenario::BridgeQos0Traced1
            | Scenario::BridgeQos0Traced100
            | Scenario::BridgeQos0Traced100Threads2 => {
                let (sampler, arg) = self.sampling().unwrap_or_default();
                format!(
                    "as (b), with `OTEL_EXPORTER_OTLP_ENDPOINT` set (OTLP/HTTP to a stand-in \
                     collector on loopback), `OTEL_TRACES_SAMPLER={sampler}` \
                     `OTEL_TRACES_SAMPLER_ARG={arg}`{}",
                    if self.threads() > 1 {
                        format!(", `--threads {}`", self.threads())
                    } else {
                        String::new()
                    }
                )
            }
            Scenario::CeilingQos1 => format!(
                "QoS 1 publisher → Mosquitto → {QOS1_CONNECTIONS} rumqttc QoS 1 subscribers \
                 (`$share/bench/bench/#`)"
            ),
            Scenario::BridgeQos1 => format!(
                "QoS 1 publisher → Mosquitto → windrow bridge ({QOS1_CONNECTIONS} connections, \
                 `#,qos=1,delivery=jetstream`) → JetStream file stream; counted by nats-server (`/jsz` `messages` stored)"
            ),
        }
    }
}

struct Outcome {
    scenario: Scenario,
    sent: usize,
    received: u64,
    /// Messages that did not arrive (for the JetStream scenario: not in the stream).
    loss: i64,
    rate: f64,
    window: Duration,
    end: End,
    publish: Option<Duration>,
    cpu: Vec<(&'static str, f64)>,
    machine: f64,
    note: String,
}

impl Outcome {
    fn new(scenario: Scenario, sent: usize, m: Measured, note: String) -> Outcome {
        let secs = m.window.as_secs_f64();
        Outcome {
            scenario,
            sent,
            received: m.received,
            loss: sent as i64 - m.received as i64,
            rate: if secs > 0.0 && m.received > 1 {
                m.received as f64 / secs
            } else {
                0.0
            },
            window: m.window,
            end: m.end,
            publish: m.publisher.map(|p| p.elapsed),
            cpu: m.cpu,
            machine: m.machine,
            note,
        }
    }

    /// Cores busy outside the tracked processes: other work on the machine.
    fn others(&self) -> f64 {
        self.machine - self.cpu.iter().map(|(_, c)| c).sum::<f64>()
    }

    /// Whether other work took a noticeable share of the machine meanwhile.
    fn disturbed(&self) -> bool {
        self.others() > DISTURBED_CORES
    }

    fn cpu_of(&self, name: &str) -> Option<f64> {
        cpu_of(&self.cpu, name)
    }

    fn loss_text(&self) -> String {
        match self.end {
            End::Stalled => format!("{} (stalled)", group(self.loss)),
            _ => group(self.loss),
        }
    }
}

struct Bench {
    settings: Settings,
    qos0: Arc<Encoded>,
    qos1: Arc<Encoded>,
}

fn qos0_options() -> MosquittoOptions {
    MosquittoOptions {
        persistence: false,
        ..MosquittoOptions::default()
    }
}

fn qos1_options() -> MosquittoOptions {
    MosquittoOptions {
        max_inflight_messages: Some(MOSQUITTO_INFLIGHT),
        persistence: true,
        // The harness autosaves every second for its kill tests; Mosquitto's
        // default (1800 s) is what a deployment runs with.
        extra_config: "autosave_interval 1800".into(),
        ..MosquittoOptions::default()
    }
}

fn default_options() -> MosquittoOptions {
    MosquittoOptions {
        max_queued_messages: None,
        max_inflight_messages: None,
        persistence: false,
        extra_config: String::new(),
    }
}

impl Bench {
    async fn ceiling_qos0(&self, scenario: Scenario, opts: MosquittoOptions) -> Outcome {
        let mqtt = Mosquitto::start_with(opts).await;
        let meter = Meter::new();
        let sub = mqtt_subscriber(
            mqtt.port(),
            "bench-sub".into(),
            "bench/#",
            QoS::AtMostOnce,
            meter.clone(),
        )
        .await;
        let (kind, port, enc) = (self.settings.publisher, mqtt.port(), self.qos0.clone());
        let m = measure(
            &meter,
            self.qos0.len() as u64,
            move || spawn_publisher(kind, port, enc, 0),
            IDLE_END_QOS0,
            &procs(&mqtt, None, None),
        )
        .await;
        sub.abort();
        Outcome::new(scenario, self.qos0.len(), m, String::new())
    }

    async fn bridge_qos0(&self, scenario: Scenario, opts: MosquittoOptions) -> Outcome {
        let nats = NatsServer::start_monitored().await;
        let mqtt = Mosquitto::start_with(opts).await;
        let connections = QOS0_CONNECTIONS.to_string();
        let collector = scenario.sampling().map(|_| OtlpCollector::start());
        let endpoint = collector.as_ref().map(OtlpCollector::url);
        let mut envs = Vec::new();
        if let (Some((sampler, arg)), Some(endpoint)) = (scenario.sampling(), &endpoint) {
            envs.extend([
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_TRACES_SAMPLER", sampler),
                ("OTEL_TRACES_SAMPLER_ARG", arg),
            ]);
        }
        let threads = scenario.threads().to_string();
        let bridge = start_bridge(
            &nats,
            &mqtt,
            &["--connections", &connections, "--threads", &threads],
            &envs,
        )
        .await;
        probe_bridge(mqtt.port(), &nats.url()).await;
        // Counts what the bridge exports while the scenario runs.
        let exported = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let drain = collector.map(|mut collector| {
            let exported = exported.clone();
            tokio::spawn(async move {
                while let Some(r) = collector.recv().await {
                    exported.0.fetch_add(1, Ordering::Relaxed);
                    exported.1.fetch_add(r.body.len() as u64, Ordering::Relaxed);
                }
            })
        });
        let before = bridge.counts().await;
        let meter = Meter::new();
        let counter = match scenario.sink() {
            Sink::Server => {
                server_counter(nats.monitoring_port(), "/varz", "in_msgs", meter.clone()).await
            }
            Sink::Subscriber => nats_subscriber(&nats.url(), meter.clone()).await,
        };
        let (kind, port, enc) = (self.settings.publisher, mqtt.port(), self.qos0.clone());
        let m = measure(
            &meter,
            self.qos0.len() as u64,
            move || spawn_publisher(kind, port, enc, 0),
            IDLE_END_QOS0,
            &procs(&mqtt, Some(&bridge), Some(&nats)),
        )
        .await;
        counter.task.abort();
        let c = bridge.counts().await - before;
        let mut note = bridge_note(&bridge, c, &counter, None);
        if let Some(drain) = drain {
            // The exporter flushes its last batch at shutdown.
            bridge.process.sigterm().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            drain.abort();
            let _ = write!(
                note,
                "; OTLP export requests {} ({} KiB)",
                group(exported.0.load(Ordering::Relaxed) as i64),
                group((exported.1.load(Ordering::Relaxed) / 1024) as i64)
            );
        }
        Outcome::new(scenario, self.qos0.len(), m, note)
    }

    async fn ceiling_qos1(&self) -> Outcome {
        let mqtt = Mosquitto::start_with(qos1_options()).await;
        let meter = Meter::new();
        let mut subs = Vec::new();
        for i in 0..QOS1_CONNECTIONS {
            subs.push(
                mqtt_subscriber(
                    mqtt.port(),
                    format!("bench-sub-{i}"),
                    "$share/bench/bench/#",
                    QoS::AtLeastOnce,
                    meter.clone(),
                )
                .await,
            );
        }
        let (kind, port, enc) = (self.settings.publisher, mqtt.port(), self.qos1.clone());
        let m = measure(
            &meter,
            self.qos1.len() as u64,
            move || spawn_publisher(kind, port, enc, 1),
            IDLE_END_QOS1,
            &procs(&mqtt, None, None),
        )
        .await;
        for s in subs {
            s.abort();
        }
        Outcome::new(Scenario::CeilingQos1, self.qos1.len(), m, String::new())
    }

    async fn bridge_qos1(&self) -> Outcome {
        let nats = NatsServer::start_monitored().await;
        let mqtt = Mosquitto::start_with(qos1_options()).await;
        let url = nats.url();
        create_stream(
            &url,
            STREAM,
            &["windrow.telemetry.>"],
            Duration::from_secs(120),
        )
        .await;
        let connections = QOS1_CONNECTIONS.to_string();
        let bridge = start_bridge(
            &nats,
            &mqtt,
            &[
                "--route",
                "#,qos=1,delivery=jetstream",
                "--connections",
                &connections,
            ],
            &[],
        )
        .await;
        probe_bridge(mqtt.port(), &url).await;
        let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
        js.get_stream(STREAM)
            .await
            .expect("get the stream")
            .purge()
            .await
            .expect("purge the probes");
        assert_eq!(stream_len(&url, STREAM).await, 0, "stream purged");
        let before = bridge.counts().await;
        let meter = Meter::new();
        let counter =
            server_counter(nats.monitoring_port(), "/jsz", "messages", meter.clone()).await;
        let (kind, port, enc) = (self.settings.publisher, mqtt.port(), self.qos1.clone());
        let n = self.qos1.len();
        let m = measure(
            &meter,
            n as u64,
            move || spawn_publisher(kind, port, enc, 1),
            IDLE_END_QOS1,
            &procs(&mqtt, Some(&bridge), Some(&nats)),
        )
        .await;
        counter.task.abort();
        let stored = settled_stream_len(&url, n as u64).await;
        let c = bridge.counts().await - before;
        let note = bridge_note(&bridge, c, &counter, Some(stored));
        let mut outcome = Outcome::new(Scenario::BridgeQos1, n, m, note);
        outcome.loss = n as i64 - stored as i64;
        outcome
    }
}

/// The stream length once it reached `n` or stopped growing for 2 s (at most 30 s).
async fn settled_stream_len(url: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (stream_len(url, STREAM).await, Instant::now());
    loop {
        if last.0 >= n || last.1.elapsed() >= Duration::from_secs(2) || Instant::now() >= deadline {
            return last.0;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let len = stream_len(url, STREAM).await;
        if len != last.0 {
            last = (len, Instant::now());
        }
    }
}

fn bridge_note(
    bridge: &Bridge,
    c: BridgeCounts,
    counter: &NatsCounter,
    stored: Option<u64>,
) -> String {
    let mut note = format!(
        "bridge received {}, forwarded {}, dropped {}",
        group(c.received as i64),
        group(c.forwarded as i64),
        group(c.dropped as i64)
    );
    if let Some(stored) = stored {
        let _ = write!(
            note,
            ", JetStream duplicates {}, stream holds {}",
            group(c.duplicates as i64),
            group(stored as i64)
        );
    }
    let (slow, disc) = counter.events.counts();
    if slow + disc > 0 {
        let _ = write!(
            note,
            "; NATS subscriber slow-consumer events {slow}, disconnects {disc}"
        );
    }
    if let Some(status) = bridge.process.try_exit() {
        let _ = write!(note, "; bridge EXITED with {status}");
    }
    note
}

// ---------------------------------------------------------------------------
// Reporting

fn progress(run: usize, runs: usize, o: &Outcome) {
    let cpu: Vec<String> = o.cpu.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
    eprintln!(
        "[bench] run {}/{runs} {}: {} msgs/s ({} of {} received in {:.2} s, loss {}, {:?}, publish {}); cores: {}, whole machine {:.2} (others {:.2}{}){}{}",
        run + 1,
        o.scenario.short(),
        rate_text(o.rate),
        group(o.received as i64),
        group(o.sent as i64),
        o.window.as_secs_f64(),
        o.loss_text(),
        o.end,
        o.publish
            .map_or_else(|| "unfinished".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
        cpu.join(", "),
        o.machine,
        o.others(),
        if o.disturbed() {
            ": DISTURBED by other work"
        } else {
            ""
        },
        if o.note.is_empty() { "" } else { "; " },
        o.note
    );
}

fn report(settings: &Settings, results: &[Vec<Outcome>], defaults: &[Outcome]) -> String {
    let mut md = String::new();
    let runs = results.len();
    let publisher = match settings.publisher {
        PublisherKind::Raw => {
            "one raw MQTT 3.1.1 connection writing pre-encoded PUBLISH packets \
                               back to back (QoS 1: up to 1,000 unacknowledged, written in batches)"
        }
        PublisherKind::Rumqttc => "rumqttc (one flush per publish; QoS 1 with inflight 1,000)",
    };
    let _ = writeln!(md, "## Bridge throughput\n");
    let _ = writeln!(
        md,
        "`cargo bench --bench bridge`: N = {} messages per QoS 0 scenario and {} per QoS 1 scenario, \
         {}-byte JSON payloads over {} topics (`bench/site-{{i%1000}}/temp`), {} interleaved runs \
         (a, b, c ceiling, c bridge), fresh brokers for every scenario.\n",
        group(settings.n as i64),
        group(settings.n_qos1 as i64),
        PAYLOAD_BYTES,
        group(TOPICS as i64),
        runs
    );
    let _ = writeln!(
        md,
        "Machine: 2 cores shared by publisher, Mosquitto, bridge and nats-server, plus a subscriber end to end ({}, {} cores online). \
         {}; {}; windrow release build.\n",
        cpu_model(),
        machine_cpus(),
        version_line("mosquitto", "-h", "version"),
        version_line("nats-server", "--version", "nats-server"),
    );
    let _ = writeln!(
        md,
        "Rate = messages counted ÷ time from the first to the last one counted (\"Publisher done\" \
         below: when Mosquitto had taken the publisher's last message). The ceilings count at their \
         MQTT subscribers. The bridge scenarios count what reached NATS, as nats-server reports it \
         (read every {} ms from its monitoring port): messages it took in for (b), (d) and (e), \
         messages stored in the stream for (c). The issue asks for the bridge's rate *into* NATS, and \
         a subscriber would add a fifth busy process on the 2 cores; \"(b) end to end\" shows the \
         rate with one.\n",
        SERVER_POLL.as_millis()
    );
    let order = [
        Scenario::CeilingQos0,
        Scenario::BridgeQos0,
        Scenario::BridgeQos0Subscribed,
        Scenario::BridgeQos0Traced1,
        Scenario::BridgeQos0Traced100,
        Scenario::BridgeQos0Traced100Threads2,
        Scenario::CeilingQos1,
        Scenario::BridgeQos1,
    ];
    let of = |s: Scenario| -> Vec<&Outcome> {
        results
            .iter()
            .flat_map(|r| r.iter().filter(move |o| o.scenario == s))
            .collect()
    };
    let med = |s: Scenario| median(of(s).iter().map(|o| o.rate).collect());
    let _ = write!(md, "| Scenario | Path |");
    for r in 0..runs {
        let _ = write!(md, " Run {} msgs/s |", r + 1);
    }
    let _ = writeln!(
        md,
        " Median msgs/s | Loss per run | Bridge ÷ ceiling (medians) |"
    );
    let _ = write!(md, "|---|---|");
    for _ in 0..runs {
        let _ = write!(md, "---:|");
    }
    let _ = writeln!(md, "---:|---:|---:|");
    for s in order {
        let outcomes = of(s);
        if outcomes.is_empty() {
            continue;
        }
        let _ = write!(md, "| {} | {} |", s.short(), s.path());
        for o in &outcomes {
            let mark = if o.disturbed() { " †" } else { "" };
            let _ = write!(md, " {}{mark} |", rate_text(o.rate));
        }
        let losses: Vec<String> = outcomes.iter().map(|o| o.loss_text()).collect();
        let ratio = match s {
            Scenario::BridgeQos0 | Scenario::BridgeQos0Subscribed => {
                format!("{:.2}", med(s) / med(Scenario::CeilingQos0))
            }
            Scenario::BridgeQos1 => format!("{:.2}", med(s) / med(Scenario::CeilingQos1)),
            Scenario::BridgeQos0Traced1
            | Scenario::BridgeQos0Traced100
            | Scenario::BridgeQos0Traced100Threads2 => format!(
                "{:.2} ({:.2} of (b))",
                med(s) / med(Scenario::CeilingQos0),
                med(s) / med(Scenario::BridgeQos0)
            ),
            _ => "—".into(),
        };
        let _ = writeln!(
            md,
            " **{}** | {} | {} |",
            rate_text(med(s)),
            losses.join(" / "),
            ratio
        );
    }
    if results.iter().flatten().any(Outcome::disturbed) {
        let _ = writeln!(
            md,
            "\n† Other work on the machine took more than {DISTURBED_CORES} cores during this run \
             (see \"Others\" below): the rate is too low."
        );
    }
    let _ = writeln!(
        md,
        "\nLoss = N − messages counted (for (c): N − messages in the stream, `stream_len` after \
         the run).\n"
    );

    let _ = writeln!(md, "### With Mosquitto's default limits (d)\n");
    let _ = writeln!(
        md,
        "`max_queued_messages` 1000 (default), `max_inflight_messages` 20 (default), persistence off; one run each.\n"
    );
    let _ = writeln!(md, "| Scenario | msgs/s | Received | Lost | Details |");
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    for o in defaults {
        let _ = writeln!(
            md,
            "| {} | {} | {} of {} | **{}** ({:.1} %) | {} |",
            o.scenario.short(),
            rate_text(o.rate),
            group(o.received as i64),
            group(o.sent as i64),
            o.loss_text(),
            100.0 * o.loss as f64 / o.sent as f64,
            if o.note.is_empty() { "—" } else { &o.note }
        );
    }

    if defaults.iter().all(|o| o.loss == 0) {
        let _ = writeln!(
            md,
            "\nNo loss here: Mosquitto only reads the publisher as fast as it delivers, and both \
             subscribers kept up with it, so no client's queue reached 1000. The default limit drops \
             messages once a subscriber falls more than 1000 behind (see pitfalls.md: a QoS 1 \
             subscriber lost 179,119 of 1,000,000)."
        );
    }
    let _ = writeln!(
        md,
        "\n### Where the CPU went\n\nMedian cores used while messages flowed (2.00 = the whole machine), \
         from /proc: per process, their sum, the whole machine's busy time, and the difference \
         (\"Others\": anything else running, plus kernel work outside process context; within about ±0.15 of 0 on a \
         quiet machine).\n"
    );
    let _ = writeln!(
        md,
        "| Scenario | Publisher done (s) | Publisher | Subscriber(s) | Mosquitto | Bridge | nats-server | Sum | Whole machine | Others |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let all: Vec<Scenario> = order
        .iter()
        .copied()
        .chain(defaults.iter().map(|o| o.scenario))
        .collect();
    for s in all {
        let outcomes: Vec<&Outcome> = of(s)
            .into_iter()
            .chain(defaults.iter().filter(|o| o.scenario == s))
            .collect();
        if outcomes.is_empty() {
            continue;
        }
        let cell = |name: &str| -> String {
            let v: Vec<f64> = outcomes.iter().filter_map(|o| o.cpu_of(name)).collect();
            if v.is_empty() {
                "—".into()
            } else {
                format!("{:.2}", median(v))
            }
        };
        let publish: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| o.publish.map(|d| d.as_secs_f64()))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
            s.short(),
            if publish.is_empty() {
                "—".into()
            } else {
                format!("{:.2}", median(publish))
            },
            cell("publisher"),
            cell("subscriber"),
            cell("mosquitto"),
            cell("bridge"),
            cell("nats-server"),
            median(
                outcomes
                    .iter()
                    .map(|o| o.cpu.iter().map(|(_, c)| c).sum())
                    .collect()
            ),
            median(outcomes.iter().map(|o| o.machine).collect()),
            median(outcomes.iter().map(|o| o.others()).collect())
        );
    }

    let bridge_notes: Vec<String> = results
        .iter()
        .enumerate()
        .flat_map(|(run, r)| {
            r.iter()
                .filter(|o| !o.note.is_empty())
                .map(move |o| format!("- run {}, {}: {}", run + 1, o.scenario.short(), o.note))
        })
        .collect();
    if !bridge_notes.is_empty() {
        let _ = writeln!(md, "\nBridge counters per run (from its /metrics):\n");
        for n in bridge_notes {
            let _ = writeln!(md, "{n}");
        }
    }

    let _ = writeln!(md, "\n### Settings\n");
    let _ = writeln!(
        md,
        "- Publisher: {publisher}; it runs in the benchmark process on its own thread."
    );
    let _ = writeln!(
        md,
        "- (a), (b): Mosquitto with `max_queued_messages 10000000`, `max_queued_bytes 0`, persistence \
         off (for speed: nothing of QoS 0 would be persisted anyway)."
    );
    let _ = writeln!(
        md,
        "- (c): the same plus `max_inflight_messages {MOSQUITTO_INFLIGHT}` for every subscriber (the {QOS1_CONNECTIONS} \
         ceiling subscribers and the bridge's {QOS1_CONNECTIONS} connections alike) and persistence on with \
         Mosquitto's default `autosave_interval 1800` (no save during a run)."
    );
    let _ = writeln!(
        md,
        "- Bridge: otherwise defaults (`--threads 1`, `--max-in-flight 4096`, `--message-id uuid7`, shared subscription \
         `$share/windrow/#`, RUST_LOG=info). Stream `{STREAM}`: `windrow.telemetry.>`, file storage, \
         1 replica, duplicate window 2 min, nats-server defaults (fsync every 2 min)."
    );
    let _ = writeln!(
        md,
        "- Counting: rumqttc 0.25 subscribers (auto-ack) for the ceilings; nats-server's `/varz` or `/jsz` \
         for the bridge; an async-nats 0.51 core subscription on `windrow.telemetry.>` (capacity \
         2,097,152) for (b) end to end. A scenario ends when \
         all N arrived, or 2 s (QoS 1: 10 s) after the last message once the publisher is done, or after \
         10 s without a message (reported as stalled). Each scenario starts once the machine is idle \
         (under 0.3 busy cores for 3 s in a row, waiting up to 10 min)."
    );
    md
}

// ---------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    support::run_bench("bridge", "brokers", run()).await;
}

async fn run() {
    let settings = Settings::from_env();
    eprintln!(
        "[bench] {settings:?}: encoding {} QoS 0 and {} QoS 1 messages",
        settings.n, settings.n_qos1
    );
    let ts0 = unix_ms() as u64;
    let bench = Bench {
        settings,
        qos0: Arc::new(Encoded::new(settings.n, 0, ts0)),
        qos1: Arc::new(Encoded::new(settings.n_qos1, 1, ts0)),
    };
    let runs = settings.runs;
    let mut results = Vec::new();
    for run in 0..runs {
        let mut this = Vec::new();
        let o = bench
            .ceiling_qos0(Scenario::CeilingQos0, qos0_options())
            .await;
        progress(run, runs, &o);
        this.push(o);
        for scenario in [Scenario::BridgeQos0, Scenario::BridgeQos0Subscribed] {
            let o = bench.bridge_qos0(scenario, qos0_options()).await;
            progress(run, runs, &o);
            this.push(o);
        }
        if settings.tracing {
            for scenario in [
                Scenario::BridgeQos0Traced1,
                Scenario::BridgeQos0Traced100,
                Scenario::BridgeQos0Traced100Threads2,
            ] {
                let o = bench.bridge_qos0(scenario, qos0_options()).await;
                progress(run, runs, &o);
                this.push(o);
            }
        }
        let o = bench.ceiling_qos1().await;
        progress(run, runs, &o);
        this.push(o);
        let o = bench.bridge_qos1().await;
        progress(run, runs, &o);
        this.push(o);
        results.push(this);
    }
    let mut defaults = Vec::new();
    for scenario in [Scenario::CeilingQos0Defaults, Scenario::BridgeQos0Defaults] {
        let o = match scenario {
            Scenario::CeilingQos0Defaults => bench.ceiling_qos0(scenario, default_options()).await,
            _ => bench.bridge_qos0(scenario, default_options()).await,
        };
        progress(0, 1, &o);
        defaults.push(o);
    }
    println!("{}", report(&settings, &results, &defaults));
}
