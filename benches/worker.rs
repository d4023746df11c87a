//! Apply rate of `windrow worker` against what one publisher pushes through NATS.
//!
//! `cargo bench --bench worker` runs, with a private `nats-server -js` from the
//! test harness (never the machine's 4222) and the release `windrow` binary as a
//! child, R rounds of these scenarios, interleaved:
//!
//! - (a) core ceiling: one async-nats publisher → nats-server → one core
//!   subscriber (a separate connection in this process);
//! - (b) worker core: the same publisher → `windrow worker --mode core` (queue
//!   group), with a subscription buffer large enough for the whole run, so the
//!   rate is what the worker drains, not what it drops;
//! - (c) worker core, paced: the publisher held to `WINDROW_BENCH_PACE_PERCENT`
//!   (default 80) % of this round's (a), the worker at its default buffer
//!   (524,288 messages): does it keep up, and what does it lose;
//! - (j) JetStream publish: the same messages into stream `TELEMETRY`
//!   (`windrow.telemetry.>`, file storage), acknowledged, 4,096 in flight;
//! - (d1) JetStream ceiling: a durable pull consumer reading that stream and
//!   acking each message (plain ack) as it arrives;
//! - (d2) the worker's NATS path alone: a durable pull consumer batching like
//!   the worker (size or time) and double-acking each batch, 256 at a time;
//! - (e) worker jetstream: `windrow worker --mode jetstream` consuming the stream.
//!
//! Every core scenario gets a fresh nats-server; the JetStream ones share one per
//! round. Rates: core scenarios divide the messages that arrived (subscriber) or
//! were applied (worker, `windrow_worker_applied_messages_total`) by the time
//! from the first publish to the last arrival/apply; JetStream consumers divide
//! the messages after the first one seen by the time from the first to the last.
//! The worker's metrics are polled every 25 ms. Also recorded per worker run:
//! batches committed per second, messages per commit, commit latency, RSS
//! (VmRSS, split into anonymous and file-backed, and the peak VmHWM) once every
//! message is applied, the store's size on disk, the compaction slices (how
//! many, their time, and how many took over 0.1 s and 0.25 s: the writer's
//! pauses between batches), and the CPU of every process (the worker's
//! `lmdb-writer` thread separately). Progress goes to stderr, a
//! Markdown report to stdout.
//!
//! Workload: `WINDROW_BENCH_MESSAGES` (default 500,000) readings of
//! `WINDROW_BENCH_SERIES` (default 100,000) devices, round-robin, on
//! `windrow.telemetry.fleet.d<NNNNNN>` with payloads like
//! `{"device":"d000042","ts":1764000000000,"temp":21.5}` (the end-to-end tests'
//! format; the worker runs with `--series-field device`); consecutive readings of
//! a device are 1 s apart (less when the series are few), ending a minute ago.
//! `WINDROW_BENCH_RUNS` (default 3), `WINDROW_BENCH_BATCH` (worker
//! `--batch-max-messages`, default 20,000, the worker's default),
//! `WINDROW_BENCH_WAIT_MS` (`--batch-max-wait-ms`, default 100),
//! `WINDROW_BENCH_THREADS` (the worker's `--threads`; default: the worker's
//! default, 1),
//! `WINDROW_BENCH_ONLY` (`core` or `jetstream`: skip the other half),
//! `WINDROW_BENCH_PIN=1` (the publisher and nats-server on half the CPUs, the
//! consumer being measured on the other half; see `support/pinning.rs`).
//!
//! Without `--bench` (e.g. `cargo test --all-targets`) it does nothing.
#![allow(missing_docs)]

mod support;

use std::{
    collections::VecDeque,
    fmt::Write as _,
    path::Path,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use async_nats::{
    jetstream::{self, consumer::pull},
    Subject,
};
use bytes::Bytes;
use futures::StreamExt;
use support::{
    bucket, cores, cpu_model, cpu_of, disk_bytes, env_usize, group, machine_cpus, measuring_client,
    median, metric, pin_publisher, pinning_text, proc_status, rate_text, sample, split_publisher,
    start_nats, stat_path, status_mib, thread_cpu_secs, unix_ms, version_line, wait_for_quiet,
    ClientEvents, Cores, CpuSample, Fleet, Meter, Procs, DISTURBED_CORES,
};
use windrow_harness::{
    clients::{create_stream, stream_len},
    free_port, http_get, NatsServer, RoleProcess,
};

/// Stream the worker reads in jetstream mode (its default).
const STREAM: &str = "TELEMETRY";
/// Subjects of the stream and filter of every consumer.
const FILTER: &str = "windrow.telemetry.>";
/// Probe readings (core mode) that show the worker is subscribed.
const PROBE_SUBJECT: &str = "windrow.telemetry.probe.p0";
/// Messages the publisher's client buffers before `publish` waits.
const PUBLISH_CAPACITY: usize = 65_536;
/// Unacknowledged JetStream publishes in flight.
const JS_PUBLISH_WINDOW: usize = 4096;
/// The worker's default `max_ack_pending`, used for the ceiling consumers too.
const MAX_ACK_PENDING: i64 = 50_000;
/// The paced publisher checks its schedule every this many messages.
const PACE_CHECK: usize = 64;
/// A core scenario ends this long after the last arrival once the publisher is done.
const IDLE_END_CORE: Duration = Duration::from_secs(3);
/// A JetStream scenario should lose nothing: it waits longer before giving up.
const IDLE_END_JS: Duration = Duration::from_secs(10);
/// A scenario with no progress for this long is stopped as stalled.
const STALL: Duration = Duration::from_secs(30);
/// How often the controller looks at the counters.
const POLL: Duration = Duration::from_millis(25);
/// How often a running scenario reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for a quiet machine before a scenario goes ahead anyway.
const QUIET_WAIT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------
// Settings and workload

#[derive(Debug, Clone, Copy)]
struct Settings {
    n: usize,
    series: usize,
    runs: usize,
    batch: usize,
    wait_ms: u64,
    /// The worker's `--threads`; `None`: its default.
    threads: Option<usize>,
    pace_percent: usize,
    core: bool,
    jetstream: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let (core, jetstream) = match std::env::var("WINDROW_BENCH_ONLY").as_deref() {
            Err(_) | Ok("") => (true, true),
            Ok("core") => (true, false),
            Ok("jetstream") => (false, true),
            Ok(other) => panic!("WINDROW_BENCH_ONLY={other:?}: expected core or jetstream"),
        };
        let s = Settings {
            n: env_usize("WINDROW_BENCH_MESSAGES").unwrap_or(500_000),
            series: env_usize("WINDROW_BENCH_SERIES").unwrap_or(100_000),
            runs: env_usize("WINDROW_BENCH_RUNS").unwrap_or(3),
            batch: env_usize("WINDROW_BENCH_BATCH").unwrap_or(20_000),
            wait_ms: env_usize("WINDROW_BENCH_WAIT_MS").unwrap_or(100) as u64,
            threads: env_usize("WINDROW_BENCH_THREADS"),
            pace_percent: env_usize("WINDROW_BENCH_PACE_PERCENT").unwrap_or(80),
            core,
            jetstream,
        };
        assert!(
            s.n > 0 && s.series > 0 && s.series <= 1_000_000 && s.runs > 0,
            "{s:?}"
        );
        assert!(
            s.batch > 0 && s.batch as i64 <= MAX_ACK_PENDING && s.wait_ms > 0,
            "{s:?}"
        );
        assert!((1..=1000).contains(&s.pace_percent), "{s:?}");
        s
    }
}

/// A [`Fleet`]'s readings, made before the publisher starts, so that its CPU
/// and rate are publishing alone.
struct Workload {
    subjects: Vec<Subject>,
    payloads: Vec<Bytes>,
}

impl Workload {
    /// `n` readings of `series` devices (see [`Fleet`]).
    fn new(n: usize, series: usize) -> Workload {
        let fleet = Fleet::new(n, series);
        Workload {
            subjects: (0..series).map(|d| fleet.subject(d)).collect(),
            payloads: (0..n).map(|i| fleet.payload(i)).collect(),
        }
    }

    fn len(&self) -> usize {
        self.payloads.len()
    }

    fn message(&self, i: usize) -> (Subject, Bytes) {
        (
            self.subjects[i % self.subjects.len()].clone(),
            self.payloads[i].clone(),
        )
    }
}

// ---------------------------------------------------------------------------
// Publisher (its own OS thread and runtime, so that its CPU time is its own)

#[derive(Debug, Clone, Copy)]
enum Publish {
    /// Core NATS, as fast as it goes or at this many messages per second.
    Core(Option<f64>),
    /// JetStream, acknowledged, `JS_PUBLISH_WINDOW` in flight.
    JetStream,
}

struct PubReport {
    first: Instant,
    done: Instant,
    cpu_secs: f64,
}

impl PubReport {
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.done.duration_since(self.first).as_secs_f64().max(1e-9)
    }
}

type Publisher = JoinHandle<Result<PubReport, String>>;

fn spawn_publisher(url: String, work: Arc<Workload>, how: Publish) -> Publisher {
    std::thread::Builder::new()
        .name("bench-publisher".into())
        .spawn(move || {
            pin_publisher();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("publisher runtime: {e}"))?;
            let cpu0 = thread_cpu_secs();
            let (first, done) = rt.block_on(async {
                let client = async_nats::ConnectOptions::new()
                    .client_capacity(PUBLISH_CAPACITY)
                    .connect(&url)
                    .await
                    .map_err(|e| format!("publisher connect {url}: {e}"))?;
                match how {
                    Publish::Core(rate) => publish_core(&client, &work, rate).await,
                    Publish::JetStream => publish_jetstream(client, &work).await,
                }
            })?;
            Ok(PubReport {
                first,
                done,
                cpu_secs: thread_cpu_secs() - cpu0,
            })
        })
        .expect("spawn the publisher thread")
}

async fn publish_core(
    client: &async_nats::Client,
    work: &Workload,
    rate: Option<f64>,
) -> Result<(Instant, Instant), String> {
    let first = Instant::now();
    for i in 0..work.len() {
        if let Some(rate) = rate.filter(|_| i % PACE_CHECK == 0) {
            let due = first + Duration::from_secs_f64(i as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let (subject, payload) = work.message(i);
        client
            .publish(subject, payload)
            .await
            .map_err(|e| format!("publish {i}: {e}"))?;
    }
    client.flush().await.map_err(|e| format!("flush: {e}"))?;
    Ok((first, Instant::now()))
}

async fn publish_jetstream(
    client: async_nats::Client,
    work: &Workload,
) -> Result<(Instant, Instant), String> {
    let js = jetstream::new(client);
    let mut acks = VecDeque::with_capacity(JS_PUBLISH_WINDOW);
    let first = Instant::now();
    for i in 0..work.len() {
        let (subject, payload) = work.message(i);
        let ack = js
            .publish(subject, payload)
            .await
            .map_err(|e| format!("JetStream publish {i}: {e}"))?;
        acks.push_back(ack);
        if acks.len() >= JS_PUBLISH_WINDOW {
            if let Some(ack) = acks.pop_front() {
                ack.await.map_err(|e| format!("JetStream ack: {e}"))?;
            }
        }
    }
    for ack in acks {
        ack.await.map_err(|e| format!("JetStream ack: {e}"))?;
    }
    Ok((first, Instant::now()))
}

// ---------------------------------------------------------------------------
// Measuring clients in this process

/// A core subscriber on `FILTER` counting into `meter`; subscribed on return.
async fn core_subscriber(
    url: &str,
    meter: Arc<Meter>,
    events: Arc<ClientEvents>,
    capacity: usize,
) -> tokio::task::JoinHandle<()> {
    let client = measuring_client(url, events, capacity).await;
    let mut sub = client.subscribe(FILTER).await.expect("subscribe");
    client.flush().await.expect("flush the subscription");
    tokio::spawn(async move {
        let _client = client;
        while sub.next().await.is_some() {
            meter.hit(1);
        }
    })
}

/// How a ceiling consumer acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckStyle {
    /// Plain ack of each message on arrival (no reply awaited).
    Each,
    /// Batches like the worker's, then a double ack (acknowledged ack) per message.
    WorkerBatches,
}

/// A durable pull consumer on `STREAM` counting into `meter`.
async fn pull_consumer(
    url: &str,
    durable: &str,
    style: AckStyle,
    s: &Settings,
    meter: Arc<Meter>,
    events: Arc<ClientEvents>,
) -> tokio::task::JoinHandle<()> {
    let client = measuring_client(url, events, 65_536).await;
    let js = jetstream::new(client);
    let stream = js.get_stream(STREAM).await.expect("get the stream");
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.to_owned()),
            filter_subject: FILTER.to_owned(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        })
        .await
        .expect("create the ceiling consumer");
    let (batch, wait) = (s.batch, Duration::from_millis(s.wait_ms));
    tokio::spawn(async move {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .expires(Duration::from_secs(30))
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .expect("start pulling");
        loop {
            let first = match messages.next().await {
                None => return,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    eprintln!("[bench] pull consumer: {e}");
                    continue;
                }
            };
            if style == AckStyle::Each {
                if let Err(e) = first.ack().await {
                    eprintln!("[bench] ack: {e}");
                }
                meter.hit(1);
                continue;
            }
            let mut b = vec![first];
            let deadline = tokio::time::Instant::now() + wait;
            while b.len() < batch {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(m))) => b.push(m),
                    Ok(Some(Err(e))) => {
                        eprintln!("[bench] pull consumer: {e}");
                        break;
                    }
                    _ => break,
                }
            }
            // Counted where the worker counts "applied": before the acks.
            meter.hit(b.len() as u64);
            // As the worker acknowledges: plain acks in order, the last one
            // confirmed (double ack), which confirms the batch.
            let last = b.pop();
            for m in b {
                if let Err(e) = m.ack().await {
                    eprintln!("[bench] ack: {e}");
                }
            }
            if let Some(m) = last {
                if let Err(e) = m.double_ack().await {
                    eprintln!("[bench] double ack: {e}");
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------
// The worker

/// A running `windrow worker` with its data directory.
struct Worker {
    // Declared first: dropped (killed) before its data directory is removed.
    process: RoleProcess,
    http_port: u16,
    data: tempfile::TempDir,
    baseline: Counters,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    consumed: f64,
    applied: f64,
    duplicates: f64,
    dead_lettered: f64,
    slow_consumer: f64,
    store_errors: f64,
    commits: f64,
    commit_secs: f64,
    batch_messages: f64,
    /// Compaction slices, their time, and those longer than 0.1 s and 0.25 s
    /// (the writer pauses between two batches for each).
    slices: f64,
    slice_secs: f64,
    slices_over_100ms: f64,
    slices_over_250ms: f64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            consumed: self.consumed - o.consumed,
            applied: self.applied - o.applied,
            duplicates: self.duplicates - o.duplicates,
            dead_lettered: self.dead_lettered - o.dead_lettered,
            slow_consumer: self.slow_consumer - o.slow_consumer,
            store_errors: self.store_errors - o.store_errors,
            commits: self.commits - o.commits,
            commit_secs: self.commit_secs - o.commit_secs,
            batch_messages: self.batch_messages - o.batch_messages,
            slices: self.slices - o.slices,
            slice_secs: self.slice_secs - o.slice_secs,
            slices_over_100ms: self.slices_over_100ms - o.slices_over_100ms,
            slices_over_250ms: self.slices_over_250ms - o.slices_over_250ms,
        }
    }
}

impl Worker {
    async fn start(nats: &NatsServer, s: &Settings, mode: &str, envs: &[(&str, &str)]) -> Worker {
        let data = tempfile::Builder::new()
            .prefix("windrow-bench-worker-")
            .tempdir()
            .expect("create the worker's data dir");
        let http_port = free_port();
        let threads = s.threads.map(|t| t.to_string());
        let threads_args = threads.as_deref().map(|t| ["--threads", t]);
        let args: Vec<String> = [
            "worker",
            "--nats-url",
            &nats.url(),
            "--mode",
            mode,
            "--node-id",
            "bench",
            "--data-dir",
            data.path().to_str().expect("UTF-8 temp path"),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
            "--series-field",
            "device",
            "--batch-max-messages",
            &s.batch.to_string(),
            "--batch-max-wait-ms",
            &s.wait_ms.to_string(),
        ]
        .iter()
        .chain(threads_args.iter().flatten())
        .map(|a| (*a).to_owned())
        .collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = RoleProcess::spawn(Path::new(env!("CARGO_BIN_EXE_windrow")), &refs, envs);
        process.wait_ready(http_port, Duration::from_secs(30)).await;
        Worker {
            process,
            http_port,
            data,
            baseline: Counters::default(),
        }
    }

    /// Counters since `baseline`.
    async fn counters(&self) -> Counters {
        let body = match http_get(self.http_port, "/metrics").await {
            Ok((200, body)) => body,
            other => {
                eprintln!("[bench] worker GET /metrics: {other:?}");
                return Counters::default();
            }
        };
        let slices = metric(&body, &format!("{SLICES}_count"));
        Counters {
            consumed: metric(&body, "windrow_worker_consumed_messages_total"),
            applied: metric(&body, "windrow_worker_applied_messages_total"),
            duplicates: metric(&body, "windrow_worker_duplicates_skipped_total"),
            dead_lettered: metric(&body, "windrow_worker_dead_lettered_messages_total"),
            slow_consumer: metric(&body, "windrow_worker_slow_consumer_events_total"),
            store_errors: metric(&body, "windrow_worker_store_errors_total"),
            commits: metric(&body, "windrow_worker_commit_latency_seconds_count"),
            commit_secs: metric(&body, "windrow_worker_commit_latency_seconds_sum"),
            batch_messages: metric(&body, "windrow_worker_batch_messages_sum"),
            slices,
            slice_secs: metric(&body, &format!("{SLICES}_sum")),
            slices_over_100ms: slices - bucket(&body, SLICES, "0.1"),
            slices_over_250ms: slices - bucket(&body, SLICES, "0.25"),
        } - self.baseline
    }

    /// Publishes probe readings until the worker has applied one, then makes the
    /// counters start from zero: the queue subscription is in place.
    async fn probe(&mut self, url: &str) {
        let client = async_nats::connect(url).await.expect("connect the prober");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.counters().await.applied < 1.0 {
            assert!(
                Instant::now() < deadline,
                "the worker applied no probe within 20 s; log:\n{}",
                self.process.log()
            );
            let payload = format!(r#"{{"device":"probe","ts":{},"temp":1}}"#, unix_ms());
            client
                .publish(PROBE_SUBJECT, payload.into())
                .await
                .expect("publish a probe");
            client.flush().await.expect("flush a probe");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Let straggling probes be applied before the baseline is taken.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.baseline = self.counters().await + self.baseline;
    }

    fn memory(&self) -> Memory {
        let status = proc_status(self.process.pid()).unwrap_or_default();
        let mib = |key: &str| status_mib(&status, key).unwrap_or(0.0);
        Memory {
            rss_mib: mib("VmRSS:"),
            anon_mib: mib("RssAnon:"),
            file_mib: mib("RssFile:"),
            hwm_mib: mib("VmHWM:"),
            store_mib: disk_bytes(self.data.path()) as f64 / (1024.0 * 1024.0),
        }
    }

    /// The tid of the worker's LMDB writer thread.
    fn writer_thread(&self) -> Option<u32> {
        let pid = self.process.pid();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(Result::ok)
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "lmdb-writer")
            })
            .and_then(|e| e.file_name().to_str()?.parse().ok())
    }
}

impl std::ops::Add for Counters {
    type Output = Counters;
    fn add(self, o: Counters) -> Counters {
        Counters {
            consumed: self.consumed + o.consumed,
            applied: self.applied + o.applied,
            duplicates: self.duplicates + o.duplicates,
            dead_lettered: self.dead_lettered + o.dead_lettered,
            slow_consumer: self.slow_consumer + o.slow_consumer,
            store_errors: self.store_errors + o.store_errors,
            commits: self.commits + o.commits,
            commit_secs: self.commit_secs + o.commit_secs,
            batch_messages: self.batch_messages + o.batch_messages,
            slices: self.slices + o.slices,
            slice_secs: self.slice_secs + o.slice_secs,
            slices_over_100ms: self.slices_over_100ms + o.slices_over_100ms,
            slices_over_250ms: self.slices_over_250ms + o.slices_over_250ms,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss_mib: f64,
    anon_mib: f64,
    file_mib: f64,
    hwm_mib: f64,
    store_mib: f64,
}

// ---------------------------------------------------------------------------
// CPU and machine load

/// Processes of a scenario (and the worker's writer thread) to account.
fn procs(nats: &NatsServer, worker: Option<&Worker>) -> Procs {
    let mut v = vec![("bench", "/proc/self/stat".to_owned())];
    if let Some(pid) = nats.pid() {
        v.push(("nats-server", stat_path(pid)));
    }
    if let Some(w) = worker {
        let pid = w.process.pid();
        v.push(("worker", stat_path(pid)));
        if let Some(tid) = w.writer_thread() {
            v.push(("lmdb-writer", format!("/proc/{pid}/task/{tid}/stat")));
        }
    }
    v
}

// ---------------------------------------------------------------------------
// Watching a scenario

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Every message arrived or was applied.
    Complete,
    /// The publisher was done and nothing more came for a while.
    Idle,
    /// No progress for `STALL`.
    Stalled,
}

/// What a scenario counts.
enum Source<'a> {
    Meter(&'a Meter),
    Worker(&'a Worker),
}

impl Source<'_> {
    async fn count(&self) -> u64 {
        match self {
            Source::Meter(m) => m.count(),
            Source::Worker(w) => w.counters().await.applied.max(0.0) as u64,
        }
    }
}

struct Watched {
    count: u64,
    /// First progress seen: when, and the count then.
    first: Option<(Instant, u64)>,
    last: Option<Instant>,
    end: End,
    publisher: Option<PubReport>,
    /// (process, cores used) from the start until the last progress.
    cpu: Vec<(&'static str, f64)>,
    machine: f64,
}

fn join_publisher(h: Publisher) -> Option<PubReport> {
    match h.join() {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            eprintln!("[bench] publisher failed: {e}");
            None
        }
        Err(_) => panic!("the publisher thread panicked"),
    }
}

/// Watches `source` until `expected` is reached, or the publisher (if any) is
/// done and nothing moved for `idle_end`, or nothing moved for `STALL`.
async fn watch(
    label: &str,
    source: Source<'_>,
    expected: u64,
    mut publisher: Option<Publisher>,
    idle_end: Duration,
    procs: &Procs,
    cpu0: CpuSample,
) -> Watched {
    let start = cpu0.at;
    let mut report = None;
    let mut cpu_last = cpu0.clone();
    let (mut seen, mut first, mut last) = (0, None, None::<Instant>);
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    let end = loop {
        tokio::time::sleep(POLL).await;
        if publisher.as_ref().is_some_and(JoinHandle::is_finished) {
            report = publisher.take().and_then(join_publisher);
        }
        let count = source.count().await;
        let now = Instant::now();
        if count > seen {
            first.get_or_insert((now, count));
            last = Some(now);
            seen = count;
            cpu_last = sample(procs);
        }
        if now >= next_progress {
            let secs = now.duration_since(start).as_secs_f64();
            let rate = seen as f64 / secs.max(1e-9);
            let eta = if seen > 0 && seen < expected {
                format!(", about {:.0} s to go", (expected - seen) as f64 / rate)
            } else {
                String::new()
            };
            eprintln!(
                "[bench]   {label}: {} of {} after {secs:.0} s ({} msgs/s so far{eta})",
                group(seen as i64),
                group(expected as i64),
                rate_text(rate)
            );
            next_progress += PROGRESS_EVERY;
        }
        if count >= expected {
            break End::Complete;
        }
        let idle = last.unwrap_or(start).elapsed();
        if publisher.is_none() && idle >= idle_end {
            break End::Idle;
        }
        if idle >= STALL {
            break End::Stalled;
        }
    };
    if let Some(h) = publisher.take() {
        // Everything arrived before the publisher's flush returned: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        if h.is_finished() {
            report = join_publisher(h);
        }
    }
    if let Source::Meter(m) = source {
        // The meter's own clock is exact; polls are 25 ms apart.
        if let (Some(f), Some(l)) = (m.first_at(), m.last_at()) {
            first = Some((f, 1));
            last = Some(l);
        }
    }
    let Cores {
        wall_secs,
        per: mut cpu,
        machine,
    } = cores(procs, &cpu0, &cpu_last);
    if let Some(r) = &report {
        // The publisher may have finished after the last progress: cap its share.
        let publisher = (r.cpu_secs / wall_secs).min(cpu_of(&cpu, "bench").unwrap_or(0.0));
        split_publisher(&mut cpu, publisher, "consumer");
    } else if let Some(bench) = cpu.iter_mut().find(|(n, _)| *n == "bench") {
        bench.0 = "consumer";
    }
    Watched {
        count: seen.max(source.count().await),
        first,
        last,
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
    CoreCeiling,
    WorkerCore,
    WorkerCorePaced,
    JsPublish,
    JsPullAck,
    JsPullBatches,
    WorkerJs,
}

impl Scenario {
    const ALL: [Scenario; 7] = [
        Scenario::CoreCeiling,
        Scenario::WorkerCore,
        Scenario::WorkerCorePaced,
        Scenario::JsPublish,
        Scenario::JsPullAck,
        Scenario::JsPullBatches,
        Scenario::WorkerJs,
    ];

    fn short(self) -> &'static str {
        match self {
            Scenario::CoreCeiling => "(a) core ceiling",
            Scenario::WorkerCore => "(b) worker core",
            Scenario::WorkerCorePaced => "(c) worker core, paced",
            Scenario::JsPublish => "(j) JetStream publish",
            Scenario::JsPullAck => "(d1) JetStream pull ceiling",
            Scenario::JsPullBatches => "(d2) pull + worker batches + confirmed acks",
            Scenario::WorkerJs => "(e) worker jetstream",
        }
    }

    fn path(self, s: &Settings) -> String {
        match self {
            Scenario::CoreCeiling => {
                "1 publisher → nats-server → 1 core subscriber (`windrow.telemetry.>`)".into()
            }
            Scenario::WorkerCore => {
                "1 publisher → nats-server → windrow worker (queue group; subscription buffer \
                 ≥ N, so nothing is dropped)"
                    .into()
            }
            Scenario::WorkerCorePaced => format!(
                "1 publisher held to {}% of this run's (a) → nats-server → windrow worker \
                 (default 524,288-message buffer)",
                s.pace_percent
            ),
            Scenario::JsPublish => format!(
                "1 publisher → stream `{STREAM}` (file, R1), acknowledged, \
                 {JS_PUBLISH_WINDOW} in flight"
            ),
            Scenario::JsPullAck => "durable pull consumer, plain ack per message on arrival".into(),
            Scenario::JsPullBatches => format!(
                "durable pull consumer, batches of ≤ {} or {} ms, then plain acks and a double ack \
                 of the last message (the batch's confirmation): the worker's NATS path without \
                 decode and LMDB",
                group(s.batch as i64),
                s.wait_ms
            ),
            Scenario::WorkerJs => "windrow worker --mode jetstream on the pre-loaded stream".into(),
        }
    }

    fn is_worker(self) -> bool {
        matches!(
            self,
            Scenario::WorkerCore | Scenario::WorkerCorePaced | Scenario::WorkerJs
        )
    }
}

struct WorkerStats {
    counters: Counters,
    memory: Memory,
    exited: Option<String>,
}

struct Outcome {
    scenario: Scenario,
    sent: usize,
    count: u64,
    loss: i64,
    rate: f64,
    window: Duration,
    end: End,
    /// Rate the publisher achieved (publisher scenarios).
    offered: Option<f64>,
    /// Last apply after the publisher was done (core worker scenarios).
    lag: Option<Duration>,
    cpu: Vec<(&'static str, f64)>,
    machine: f64,
    worker: Option<WorkerStats>,
    client_events: (u64, u64),
}

impl Outcome {
    /// `from_publish`: the window starts at the first publish, else at the first progress seen.
    fn new(scenario: Scenario, sent: usize, w: &Watched, from_publish: bool) -> Outcome {
        let (start, base) = match (from_publish, &w.publisher, w.first) {
            (true, Some(p), _) => (Some(p.first), 0),
            (_, _, Some((at, count))) => (Some(at), count),
            _ => (None, 0),
        };
        let window = match (start, w.last) {
            (Some(s), Some(l)) => l.saturating_duration_since(s),
            _ => Duration::ZERO,
        };
        let counted = w.count.saturating_sub(base);
        Outcome {
            scenario,
            sent,
            count: w.count,
            loss: sent as i64 - w.count as i64,
            rate: if window > Duration::ZERO {
                counted as f64 / window.as_secs_f64()
            } else {
                0.0
            },
            window,
            end: w.end,
            offered: w.publisher.as_ref().map(|p| p.rate(sent)),
            lag: match (&w.publisher, w.last) {
                (Some(p), Some(l)) if from_publish => Some(l.saturating_duration_since(p.done)),
                _ => None,
            },
            cpu: w.cpu.clone(),
            machine: w.machine,
            worker: None,
            client_events: (0, 0),
        }
    }

    fn cpu_of(&self, name: &str) -> Option<f64> {
        cpu_of(&self.cpu, name)
    }

    /// Cores busy outside the tracked processes: other work on the machine.
    fn others(&self) -> f64 {
        let tracked: f64 = self
            .cpu
            .iter()
            .filter(|(n, _)| *n != "lmdb-writer")
            .map(|(_, c)| c)
            .sum();
        self.machine - tracked
    }

    fn disturbed(&self) -> bool {
        self.others() > DISTURBED_CORES
    }

    fn commits_per_sec(&self) -> Option<f64> {
        let w = self.worker.as_ref()?;
        (self.window > Duration::ZERO).then(|| w.counters.commits / self.window.as_secs_f64())
    }
}

struct Bench {
    s: Settings,
}

impl Bench {
    /// (a): publisher → nats-server → core subscriber.
    async fn core_ceiling(&self) -> Outcome {
        let work = Arc::new(Workload::new(self.s.n, self.s.series));
        let nats = start_nats().await;
        let (meter, events) = (Meter::new(), Arc::new(ClientEvents::default()));
        let sub =
            core_subscriber(&nats.url(), meter.clone(), events.clone(), self.s.n + 1024).await;
        let procs = procs(&nats, None);
        wait_for_quiet(QUIET_WAIT).await;
        let cpu0 = sample(&procs);
        let publisher = spawn_publisher(nats.url(), work, Publish::Core(None));
        let w = watch(
            "(a) core ceiling",
            Source::Meter(&meter),
            self.s.n as u64,
            Some(publisher),
            IDLE_END_CORE,
            &procs,
            cpu0,
        )
        .await;
        sub.abort();
        let mut o = Outcome::new(Scenario::CoreCeiling, self.s.n, &w, true);
        o.client_events = events.counts();
        o
    }

    /// (b) unpaced with a buffer for everything, (c) paced at `rate` with the default buffer.
    async fn worker_core(&self, rate: Option<f64>) -> Outcome {
        let work = Arc::new(Workload::new(self.s.n, self.s.series));
        let nats = start_nats().await;
        let capacity = (self.s.n + 100_000).to_string();
        let envs: Vec<(&str, &str)> = match rate {
            None => vec![("WINDROW_NATS__SUBSCRIPTION_CAPACITY", &capacity)],
            Some(_) => Vec::new(),
        };
        let mut worker = Worker::start(&nats, &self.s, "core", &envs).await;
        worker.probe(&nats.url()).await;
        let procs = procs(&nats, Some(&worker));
        let scenario = match rate {
            None => Scenario::WorkerCore,
            Some(_) => Scenario::WorkerCorePaced,
        };
        wait_for_quiet(QUIET_WAIT).await;
        let cpu0 = sample(&procs);
        let publisher = spawn_publisher(nats.url(), work, Publish::Core(rate));
        let w = watch(
            scenario.short(),
            Source::Worker(&worker),
            self.s.n as u64,
            Some(publisher),
            IDLE_END_CORE,
            &procs,
            cpu0,
        )
        .await;
        let mut o = Outcome::new(scenario, self.s.n, &w, true);
        o.worker = Some(worker_stats(&worker).await);
        o
    }

    /// (j), (d1), (d2), (e) on one server and one pre-loaded stream.
    async fn jetstream(&self) -> Vec<Outcome> {
        let work = Arc::new(Workload::new(self.s.n, self.s.series));
        let n = self.s.n;
        let nats = start_nats().await;
        let url = nats.url();
        create_stream(&url, STREAM, &[FILTER], Duration::from_secs(120)).await;
        let mut out = Vec::new();

        let procs_nats = procs(&nats, None);
        wait_for_quiet(QUIET_WAIT).await;
        let cpu0 = sample(&procs_nats);
        let publisher = spawn_publisher(url.clone(), work, Publish::JetStream);
        let w = watch_publisher(n as u64, publisher, &procs_nats, cpu0).await;
        let mut o = Outcome::new(Scenario::JsPublish, n, &w, true);
        o.rate = o.offered.unwrap_or(0.0);
        o.lag = None;
        o.count = stream_len(&url, STREAM).await;
        o.loss = n as i64 - o.count as i64;
        progress_line(&o);
        out.push(o);

        for (scenario, durable, style) in [
            (Scenario::JsPullAck, "bench-ack", AckStyle::Each),
            (
                Scenario::JsPullBatches,
                "bench-batches",
                AckStyle::WorkerBatches,
            ),
        ] {
            let (meter, events) = (Meter::new(), Arc::new(ClientEvents::default()));
            wait_for_quiet(QUIET_WAIT).await;
            let cpu0 = sample(&procs_nats);
            let task =
                pull_consumer(&url, durable, style, &self.s, meter.clone(), events.clone()).await;
            let w = watch(
                scenario.short(),
                Source::Meter(&meter),
                n as u64,
                None,
                IDLE_END_JS,
                &procs_nats,
                cpu0,
            )
            .await;
            task.abort();
            let mut o = Outcome::new(scenario, n, &w, false);
            o.client_events = events.counts();
            progress_line(&o);
            out.push(o);
        }

        // The worker consumes as soon as it is ready: the quiet wait comes
        // first, and the rate is taken from the first batch it applied.
        wait_for_quiet(QUIET_WAIT).await;
        let worker = Worker::start(&nats, &self.s, "jetstream", &[]).await;
        let procs = procs(&nats, Some(&worker));
        let w = watch(
            Scenario::WorkerJs.short(),
            Source::Worker(&worker),
            n as u64,
            None,
            IDLE_END_JS,
            &procs,
            sample(&procs),
        )
        .await;
        let mut o = Outcome::new(Scenario::WorkerJs, n, &w, false);
        o.worker = Some(worker_stats(&worker).await);
        progress_line(&o);
        out.push(o);
        out
    }
}

/// Watches the JetStream publisher: done when it returns (every ack is in).
async fn watch_publisher(n: u64, publisher: Publisher, procs: &Procs, cpu0: CpuSample) -> Watched {
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    while !publisher.is_finished() {
        tokio::time::sleep(POLL).await;
        if Instant::now() >= next_progress {
            eprintln!(
                "[bench]   (j) JetStream publish: running for {:.0} s",
                cpu0.at.elapsed().as_secs_f64()
            );
            next_progress += PROGRESS_EVERY;
        }
    }
    let cpu_last = sample(procs);
    let report = join_publisher(publisher);
    let Cores {
        wall_secs,
        per: mut cpu,
        machine,
    } = cores(procs, &cpu0, &cpu_last);
    if let Some(r) = &report {
        split_publisher(&mut cpu, r.cpu_secs / wall_secs, "consumer");
    }
    Watched {
        count: n,
        first: None,
        last: report.as_ref().map(|r| r.done),
        end: if report.is_some() {
            End::Complete
        } else {
            End::Stalled
        },
        publisher: report,
        cpu,
        machine,
    }
}

/// The worker's histogram of compaction slices (the writer's pauses for compaction).
const SLICES: &str = "windrow_worker_compaction_slice_seconds";

async fn worker_stats(worker: &Worker) -> WorkerStats {
    // The last batch's acks and metrics settle within a poll or two.
    tokio::time::sleep(Duration::from_millis(200)).await;
    WorkerStats {
        counters: worker.counters().await,
        memory: worker.memory(),
        exited: worker.process.try_exit().map(|s| s.to_string()),
    }
}

// ---------------------------------------------------------------------------
// Reporting

/// A count of slices over a bound, or `?` if `/metrics` lacked its bucket.
fn over(n: f64) -> String {
    if n.is_nan() {
        "?".into()
    } else {
        group(n as i64)
    }
}

fn worker_note(o: &Outcome) -> String {
    let Some(w) = &o.worker else {
        return String::new();
    };
    let c = &w.counters;
    let mut note = format!(
        "consumed {}, applied {}, duplicates {}, dead-lettered {}, slow-consumer events {}, \
         store errors {}, commits {} ({:.1}/s, {} msgs and {:.1} ms each); RSS {:.0} MiB \
         (anon {:.0}, file {:.0}, peak {:.0}), store {:.0} MiB; compaction slices {} ({:.2} s, \
         {} over 0.1 s, {} over 0.25 s)",
        group(c.consumed as i64),
        group(c.applied as i64),
        group(c.duplicates as i64),
        group(c.dead_lettered as i64),
        group(c.slow_consumer as i64),
        group(c.store_errors as i64),
        group(c.commits as i64),
        o.commits_per_sec().unwrap_or(0.0),
        group((c.batch_messages / c.commits.max(1.0)).round() as i64),
        c.commit_secs / c.commits.max(1.0) * 1000.0,
        w.memory.rss_mib,
        w.memory.anon_mib,
        w.memory.file_mib,
        w.memory.hwm_mib,
        w.memory.store_mib,
        group(c.slices as i64),
        c.slice_secs,
        over(c.slices_over_100ms),
        over(c.slices_over_250ms)
    );
    if let Some(e) = &w.exited {
        let _ = write!(note, "; worker EXITED with {e}");
    }
    note
}

fn progress_line(o: &Outcome) {
    let cpu: Vec<String> = o.cpu.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
    let mut extra = String::new();
    if let Some(r) = o.offered {
        let _ = write!(extra, ", publisher {} msgs/s", rate_text(r));
    }
    if let Some(l) = o.lag {
        let _ = write!(
            extra,
            ", last apply {:.2} s after the last publish",
            l.as_secs_f64()
        );
    }
    if o.client_events != (0, 0) {
        let _ = write!(
            extra,
            ", client slow-consumer events {}, disconnects {}",
            o.client_events.0, o.client_events.1
        );
    }
    eprintln!(
        "[bench] {}: {} msgs/s ({} of {} in {:.2} s, loss {}, {:?}{extra}); cores: {}, machine {:.2} (others {:.2}){}",
        o.scenario.short(),
        rate_text(o.rate),
        group(o.count as i64),
        group(o.sent as i64),
        o.window.as_secs_f64(),
        group(o.loss),
        o.end,
        cpu.join(", "),
        o.machine,
        o.others(),
        if o.disturbed() { " DISTURBED by other work" } else { "" },
    );
    if o.worker.is_some() {
        eprintln!("[bench]   worker: {}", worker_note(o));
    }
}

fn report(s: &Settings, results: &[Vec<Outcome>]) -> String {
    let mut md = String::new();
    let of = |sc: Scenario| -> Vec<&Outcome> {
        results
            .iter()
            .filter_map(|r| r.iter().find(|o| o.scenario == sc))
            .collect()
    };
    let med = |sc: Scenario| median(of(sc).iter().map(|o| o.rate).collect());
    let present: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|sc| !of(*sc).is_empty())
        .collect();
    let _ = writeln!(
        md,
        "`cargo bench --bench worker`: N = {} messages per scenario over {} series, {} runs; worker \
         `--batch-max-messages {}` `--batch-max-wait-ms {}`{}, `--series-field device`, otherwise defaults.\n",
        group(s.n as i64),
        group(s.series as i64),
        s.runs,
        group(s.batch as i64),
        s.wait_ms,
        s.threads.map(|t| format!(" `--threads {t}`")).unwrap_or_default()
    );
    let _ = writeln!(
        md,
        "Machine: {} cores ({}); {}; windrow release build. {}\n",
        machine_cpus(),
        cpu_model(),
        version_line("nats-server", "--version", "nats-server"),
        pinning_text()
    );
    let runs_header: String = (1..=s.runs).map(|r| format!(" Run {r} msgs/s |")).collect();
    let runs_rule: String = (1..=s.runs).map(|_| "---:|").collect();
    let _ = writeln!(
        md,
        "| Scenario | Path |{runs_header} Median msgs/s | Loss per run | ÷ (a) (medians) | ÷ (a) per run | ÷ own ceiling |"
    );
    let _ = writeln!(md, "|---|---|{runs_rule}---:|---:|---:|---:|---:|");
    let ceiling = med(Scenario::CoreCeiling);
    for sc in &present {
        let os = of(*sc);
        let cells: String = os
            .iter()
            .map(|o| {
                format!(
                    " {}{} |",
                    rate_text(o.rate),
                    if o.disturbed() { " †" } else { "" }
                )
            })
            .collect();
        let losses: Vec<String> = os
            .iter()
            .map(|o| match o.end {
                End::Stalled => format!("{} (stalled)", group(o.loss)),
                _ => group(o.loss),
            })
            .collect();
        let vs_a = if *sc == Scenario::CoreCeiling || ceiling <= 0.0 {
            "—".to_owned()
        } else {
            format!("{:.2}", med(*sc) / ceiling)
        };
        let per_run: Vec<String> = results
            .iter()
            .filter_map(|r| {
                let a = r.iter().find(|o| o.scenario == Scenario::CoreCeiling)?;
                let o = r.iter().find(|o| o.scenario == *sc)?;
                (a.rate > 0.0 && *sc != Scenario::CoreCeiling)
                    .then(|| format!("{:.2}", o.rate / a.rate))
            })
            .collect();
        let own = match sc {
            Scenario::WorkerJs | Scenario::JsPullBatches if med(Scenario::JsPullAck) > 0.0 => {
                format!("{:.2} of (d1)", med(*sc) / med(Scenario::JsPullAck))
            }
            _ => "—".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} |{cells} **{}** | {} | {vs_a} | {} | {own} |",
            sc.short(),
            sc.path(s),
            rate_text(med(*sc)),
            losses.join(" / "),
            if per_run.is_empty() {
                "—".to_owned()
            } else {
                per_run.join(" / ")
            },
        );
    }
    let _ = writeln!(
        md,
        "\nRate: (a)–(c) messages received (a) or applied (b, c) ÷ time from the first publish to \
         the last arrival/apply; (j) N ÷ publish time until the last ack; (d1), (d2), (e) messages \
         after the first one seen ÷ time from the first to the last (the stream is full before \
         they start). Loss = N − received/applied (for (j): N − messages in the stream). † = more \
         than {DISTURBED_CORES} cores went to other work meanwhile."
    );

    let paced = of(Scenario::WorkerCorePaced);
    if !paced.is_empty() {
        let _ = writeln!(
            md,
            "\n### (c) Keeping up at {}% of the core ceiling\n",
            s.pace_percent
        );
        let _ = writeln!(
            md,
            "| Run | Offered msgs/s | Applied msgs/s | Applied | Lost | Slow-consumer events | Last apply after last publish |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
        for (i, o) in paced.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                o.offered.map_or("—".into(), rate_text),
                rate_text(o.rate),
                group(o.count as i64),
                group(o.loss),
                o.worker
                    .as_ref()
                    .map_or("—".into(), |w| group(w.counters.slow_consumer as i64)),
                o.lag
                    .map_or("—".into(), |l| format!("{:.2} s", l.as_secs_f64()))
            );
        }
    }

    let _ = writeln!(md, "\n### Worker: commits and memory (medians over runs)\n");
    let _ = writeln!(
        md,
        "| Scenario | Batch max / wait | Commits/s | Msgs per commit | Commit ms (mean) | Dead-lettered | RSS MiB (anon + file) | Peak RSS MiB | Store on disk MiB |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for sc in present.iter().filter(|sc| sc.is_worker()) {
        let os = of(*sc);
        let m = |f: &dyn Fn(&Outcome, &WorkerStats) -> f64| -> f64 {
            median(
                os.iter()
                    .filter_map(|o| o.worker.as_ref().map(|w| f(o, w)))
                    .collect(),
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} / {} ms | {:.1} | {} | {:.1} | {} | {:.0} ({:.0} + {:.0}) | {:.0} | {:.0} |",
            sc.short(),
            group(s.batch as i64),
            s.wait_ms,
            m(&|o, _| o.commits_per_sec().unwrap_or(0.0)),
            group(
                m(&|_, w| w.counters.batch_messages / w.counters.commits.max(1.0)).round() as i64
            ),
            m(&|_, w| w.counters.commit_secs / w.counters.commits.max(1.0) * 1000.0),
            group(m(&|_, w| w.counters.dead_lettered) as i64),
            m(&|_, w| w.memory.rss_mib),
            m(&|_, w| w.memory.anon_mib),
            m(&|_, w| w.memory.file_mib),
            m(&|_, w| w.memory.hwm_mib),
            m(&|_, w| w.memory.store_mib),
        );
    }

    let _ = writeln!(
        md,
        "\n### Where the CPU went\n\nMedian cores used from the start of a scenario to its last \
         progress (2.00 = the whole machine), from /proc: per process (publisher: its thread in \
         the benchmark process; consumer: the rest of the benchmark process, i.e. the measuring \
         subscriber or pull consumer, or just the metrics polling), the worker's LMDB writer \
         thread (part of the worker), the sum, the whole machine's busy time and the difference \
         (\"Others\").\n"
    );
    let _ = writeln!(
        md,
        "| Scenario | Window (s) | Publisher | Consumer | nats-server | Worker | of which lmdb-writer | Sum | Whole machine | Others |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for sc in &present {
        let os = of(*sc);
        let cell = |name: &str| -> String {
            let v: Vec<f64> = os.iter().filter_map(|o| o.cpu_of(name)).collect();
            if v.is_empty() {
                "—".into()
            } else {
                format!("{:.2}", median(v))
            }
        };
        let sum = median(
            os.iter()
                .map(|o| {
                    o.cpu
                        .iter()
                        .filter(|(n, _)| *n != "lmdb-writer")
                        .map(|(_, c)| c)
                        .sum()
                })
                .collect(),
        );
        let _ = writeln!(
            md,
            "| {} | {:.2} | {} | {} | {} | {} | {} | {sum:.2} | {:.2} | {:.2} |",
            sc.short(),
            median(os.iter().map(|o| o.window.as_secs_f64()).collect()),
            cell("publisher"),
            cell("consumer"),
            cell("nats-server"),
            cell("worker"),
            cell("lmdb-writer"),
            median(os.iter().map(|o| o.machine).collect()),
            median(os.iter().map(|o| o.others()).collect()),
        );
    }

    let _ = writeln!(md, "\nPer run (worker counters from its /metrics):\n");
    for (run, r) in results.iter().enumerate() {
        for o in r {
            let mut line = format!(
                "- run {}, {}: {} msgs/s, {} of {} in {:.2} s ({:?})",
                run + 1,
                o.scenario.short(),
                rate_text(o.rate),
                group(o.count as i64),
                group(o.sent as i64),
                o.window.as_secs_f64(),
                o.end
            );
            if let Some(r) = o.offered {
                let _ = write!(line, "; publisher {} msgs/s", rate_text(r));
            }
            if o.client_events != (0, 0) {
                let _ = write!(
                    line,
                    "; measuring client slow-consumer events {}, disconnects {}",
                    o.client_events.0, o.client_events.1
                );
            }
            if o.worker.is_some() {
                let _ = write!(line, "; {}", worker_note(o));
            }
            let _ = writeln!(md, "{line}");
        }
    }
    md
}

// ---------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    support::run_bench("worker", "servers", run()).await;
}

async fn run() {
    let s = Settings::from_env();
    support::pin_bench();
    eprintln!("[bench] {s:?}");
    let bench = Bench { s };
    let started = Instant::now();
    let mut results = Vec::new();
    for run in 0..s.runs {
        eprintln!("[bench] run {}/{}", run + 1, s.runs);
        let mut this = Vec::new();
        if s.core {
            let a = bench.core_ceiling().await;
            progress_line(&a);
            let ceiling = a.rate;
            this.push(a);
            let b = bench.worker_core(None).await;
            progress_line(&b);
            this.push(b);
            if ceiling > 0.0 {
                let rate = ceiling * s.pace_percent as f64 / 100.0;
                let c = bench.worker_core(Some(rate)).await;
                progress_line(&c);
                this.push(c);
            }
        }
        if s.jetstream {
            this.extend(bench.jetstream().await);
        }
        results.push(this);
        let per_run = started.elapsed().as_secs_f64() / (run + 1) as f64;
        let left = per_run * (s.runs - run - 1) as f64;
        eprintln!(
            "[bench] run {}/{} done after {:.0} s in all; about {:.0} s to go",
            run + 1,
            s.runs,
            started.elapsed().as_secs_f64(),
            left
        );
    }
    println!("{}", report(&s, &results));
}
