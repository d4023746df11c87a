//! Rate of `windrow replay` against what a plain JetStream consumer reads.
//!
//! `cargo bench --bench replay` starts a private `nats-server -js` from the test
//! harness (never the machine's 4222), publishes the workload **once** into the
//! file-storage stream `TELEMETRY` (`windrow.telemetry.>`), reads it once
//! untimed (warm-up), then runs R rounds of four scenarios on that same stream,
//! interleaved (within each pair the order alternates from round to round):
//!
//! - (r) ordered ceiling: an async-nats ordered pull consumer with the
//!   library's defaults (what replay uses) reading the whole stream, counting;
//! - (p) `windrow replay` (the release binary as a child, ordered consumer,
//!   default batch) rebuilding an empty store from the whole stream;
//! - (r-d) durable ceiling: a durable pull consumer (explicit ack, pulls of
//!   the replay batch size, `max_ack_pending` 4 × batch as replay's) acking
//!   every message as it arrives (plain ack, no reply awaited);
//! - (p-d) `windrow replay --durable NAME` likewise.
//!
//! Rates: (r), (r-d) messages ÷ time from before the consumer connects to the
//! last message; (p), (p-d) the rate replay prints in its summary line
//! (messages ÷ time from its start, store opened and NATS connected, to the
//! last batch committed), and for comparison N ÷ the wall time from spawning
//! the process to its exit (seen within 25 ms). Also recorded per replay: the
//! store's size on disk, peak RSS (VmHWM, which counts the store's mapped
//! pages too) and peak anonymous RSS, sampled every 25 ms, and CPU per process
//! and per replay thread. Progress goes to stderr, a Markdown report
//! to stdout.
//!
//! Workload: `WINDROW_BENCH_MESSAGES` (default 1,000,000) readings of
//! `WINDROW_BENCH_SERIES` (default 10,000) devices, round-robin, on
//! `windrow.telemetry.fleet.d<NNNNNN>` with payloads like
//! `{"device":"d000042","ts":1764000000000,"temp":21.5}`, as in the worker
//! benchmark; replay runs with `[worker.decode] series_fields = ["device"]`.
//! `WINDROW_BENCH_LOG_DIR` (keep each replay's log there),
//! `WINDROW_BENCH_RUNS` (default 3), `WINDROW_BENCH_BATCH` (replay `--batch`
//! and the durable ceiling's pull size; default: replay's own, 50,000),
//! `WINDROW_BENCH_PIN=1` (nats-server on half the CPUs, the consumer being
//! measured on the other half; see `support/pinning.rs`).
//!
//! Without `--bench` (e.g. `cargo test --all-targets`) it does nothing.
#![allow(missing_docs)]

mod support;

use std::{
    collections::VecDeque,
    fmt::Write as _,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use support::{
    cores, cpu_model, cpu_of, disk_bytes, env_usize, group, machine_cpus, median, pinning_text,
    proc_status, rate_text, sample, start_nats, stat_cpu_secs, stat_path, status_mib, version_line,
    wait_for_quiet, Cores, Fleet, Meter, Procs, DISTURBED_CORES,
};
use windrow_harness::{
    clients::{create_stream, stream_len},
    NatsServer, RoleProcess,
};

/// Stream replay reads (its default).
const STREAM: &str = "TELEMETRY";
/// Subjects of the stream and filter of every consumer.
const FILTER: &str = "windrow.telemetry.>";
/// `windrow replay --batch` default.
const REPLAY_DEFAULT_BATCH: usize = 50_000;
/// Messages the publisher's client buffers before `publish` waits.
const PUBLISH_CAPACITY: usize = 65_536;
/// Unacknowledged JetStream publishes in flight.
const JS_PUBLISH_WINDOW: usize = 4096;
/// Replay's issue target: replay ÷ raw consumer rate.
const TARGET: f64 = 0.8;
/// A consumer with no progress for this long is stopped as stalled.
const STALL: Duration = Duration::from_secs(30);
/// How often the controller looks at counters and processes.
const POLL: Duration = Duration::from_millis(25);
/// How often a running scenario reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for a quiet machine before a scenario goes ahead anyway.
const QUIET_WAIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Settings and workload

#[derive(Debug, Clone, Copy)]
struct Settings {
    n: usize,
    series: usize,
    runs: usize,
    /// `--batch` for replay; `None` keeps replay's default.
    batch: Option<usize>,
}

impl Settings {
    fn from_env() -> Settings {
        let s = Settings {
            n: env_usize("WINDROW_BENCH_MESSAGES").unwrap_or(1_000_000),
            series: env_usize("WINDROW_BENCH_SERIES").unwrap_or(10_000),
            runs: env_usize("WINDROW_BENCH_RUNS").unwrap_or(3),
            batch: env_usize("WINDROW_BENCH_BATCH"),
        };
        assert!(
            s.n > 0 && s.series > 0 && s.series <= 1_000_000 && s.runs > 0,
            "{s:?}"
        );
        assert!(s.batch != Some(0), "{s:?}");
        s
    }

    fn batch(&self) -> usize {
        self.batch.unwrap_or(REPLAY_DEFAULT_BATCH)
    }
}

/// Publishes the workload into `STREAM`, acknowledged, `JS_PUBLISH_WINDOW` in
/// flight; returns the time until the last ack.
async fn publish(url: &str, work: &Fleet) -> Duration {
    let client = async_nats::ConnectOptions::new()
        .client_capacity(PUBLISH_CAPACITY)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect the publisher to {url}: {e}"));
    let js = jetstream::new(client);
    let mut acks = VecDeque::with_capacity(JS_PUBLISH_WINDOW);
    let started = Instant::now();
    let mut next_progress = started + PROGRESS_EVERY;
    for i in 0..work.len() {
        let (subject, payload) = work.message(i);
        let ack = js
            .publish(subject, payload)
            .await
            .unwrap_or_else(|e| panic!("JetStream publish {i}: {e}"));
        acks.push_back(ack);
        if acks.len() >= JS_PUBLISH_WINDOW {
            if let Some(ack) = acks.pop_front() {
                ack.await.unwrap_or_else(|e| panic!("JetStream ack: {e}"));
            }
        }
        if i % 4096 == 0 && Instant::now() >= next_progress {
            eprintln!(
                "[bench]   publish: {} of {}",
                group(i as i64),
                group(work.len() as i64)
            );
            next_progress += PROGRESS_EVERY;
        }
    }
    for ack in acks {
        ack.await.unwrap_or_else(|e| panic!("JetStream ack: {e}"));
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------
// The raw consumers (in this process)

/// Reads the whole stream through an ordered consumer (`durable` `None`) or a
/// durable pull consumer acking every message, counting into `meter`.
async fn raw_consumer(
    url: String,
    durable: Option<String>,
    batch: usize,
    meter: Arc<Meter>,
) -> Result<(), String> {
    let client = async_nats::connect(&url)
        .await
        .map_err(|e| format!("connect to {url}: {e}"))?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(STREAM)
        .await
        .map_err(|e| format!("get stream: {e}"))?;
    let Some(name) = durable else {
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: FILTER.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create the ordered consumer: {e}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| format!("start the ordered consumer: {e}"))?;
        while let Some(m) = messages.next().await {
            match m {
                Ok(_) => meter.hit(1),
                Err(e) => eprintln!("[bench] ordered consumer: {e}"),
            }
        }
        return Ok(());
    };
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name),
            filter_subject: FILTER.to_owned(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: (batch * 4) as i64,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("create the durable consumer: {e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .expires(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| format!("start pulling: {e}"))?;
    while let Some(m) = messages.next().await {
        match m {
            Ok(m) => {
                if let Err(e) = m.ack().await {
                    eprintln!("[bench] ack: {e}");
                }
                meter.hit(1);
            }
            Err(e) => eprintln!("[bench] durable consumer: {e}"),
        }
    }
    Ok(())
}

async fn delete_consumer(url: &str, name: &str) {
    let result = async {
        let js = jetstream::new(async_nats::connect(url).await?);
        js.get_stream(STREAM).await?.delete_consumer(name).await?;
        Ok::<_, async_nats::Error>(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("[bench] delete consumer {name}: {e}");
    }
}

// ---------------------------------------------------------------------------
// CPU, memory, disk

/// CPU seconds of a process's threads, grouped by thread name (tokio's
/// workers together); `None` once the process is gone.
fn thread_cpu(pid: u32) -> Option<Vec<(String, f64)>> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(Result::ok)
    {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = match &stat[open + 1..close] {
            n if n.starts_with("tokio-r") => "tokio workers".to_owned(),
            "windrow" => "main (replay loop)".to_owned(),
            n => n.to_owned(),
        };
        let secs = stat_cpu_secs(&stat).unwrap_or(0.0);
        add_by_name(&mut out, name, secs, |total, secs| total + secs);
    }
    Some(out)
}

/// Folds `secs` into `name`'s entry of `totals` (a new entry if none).
fn add_by_name(
    totals: &mut Vec<(String, f64)>,
    name: String,
    secs: f64,
    fold: impl Fn(f64, f64) -> f64,
) {
    match totals.iter_mut().find(|(n, _)| *n == name) {
        Some(e) => e.1 = fold(e.1, secs),
        None => totals.push((name, secs)),
    }
}

/// Processes of a scenario to account.
fn procs(nats: &NatsServer, replay: Option<u32>) -> Procs {
    let mut v = vec![("bench", "/proc/self/stat".to_owned())];
    if let Some(pid) = nats.pid() {
        v.push(("nats-server", stat_path(pid)));
    }
    if let Some(pid) = replay {
        v.push(("replay", stat_path(pid)));
    }
    v
}

// ---------------------------------------------------------------------------
// Scenarios

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    RawOrdered,
    Replay,
    RawDurable,
    ReplayDurable,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::RawOrdered,
        Scenario::Replay,
        Scenario::RawDurable,
        Scenario::ReplayDurable,
    ];

    fn short(self) -> &'static str {
        match self {
            Scenario::RawOrdered => "(r) ordered consumer",
            Scenario::Replay => "(p) windrow replay",
            Scenario::RawDurable => "(r-d) durable consumer + ack",
            Scenario::ReplayDurable => "(p-d) windrow replay --durable",
        }
    }

    fn path(self, s: &Settings) -> String {
        let batch = group(s.batch() as i64);
        match self {
            Scenario::RawOrdered => {
                "async-nats ordered pull consumer (library defaults: pulls of 500), counting".into()
            }
            Scenario::Replay => format!(
                "release `windrow replay` into an empty store (ordered consumer, batch {batch})"
            ),
            Scenario::RawDurable => format!(
                "durable pull consumer, pulls of {batch}, max_ack_pending {}, plain ack per message",
                group(s.batch() as i64 * 4)
            ),
            Scenario::ReplayDurable => format!(
                "release `windrow replay --durable` into an empty store (batch {batch}, plain ack after commit)"
            ),
        }
    }

    /// The raw consumer a replay scenario is compared with.
    fn ceiling(self) -> Option<Scenario> {
        match self {
            Scenario::Replay => Some(Scenario::RawOrdered),
            Scenario::ReplayDurable => Some(Scenario::RawDurable),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Every message was read (raw) or replay exited with success.
    Complete,
    /// No progress for `STALL` (raw) or replay overran its deadline (killed).
    Stalled,
    /// The consumer task or the replay process failed.
    Failed,
}

/// Replay's summary line: "replayed N message(s) (sequences a..b) in Xs, R
/// msg/s: A applied, D already in the store, J rejected".
#[derive(Debug, Clone, Default)]
struct Summary {
    messages: u64,
    sequences: String,
    rate: f64,
    applied: u64,
    duplicates: u64,
    rejected: u64,
}

fn parse_summary(log: &str) -> Option<Summary> {
    let line = log.lines().rev().find(|l| l.starts_with("replayed "))?;
    let rest = line.strip_prefix("replayed ")?;
    let (messages, rest) = rest.split_once(" message(s) (sequences ")?;
    let (sequences, rest) = rest.split_once(") in ")?;
    let (_, rest) = rest.split_once("s, ")?;
    let (rate, rest) = rest.split_once(" msg/s: ")?;
    let (applied, rest) = rest.split_once(" applied, ")?;
    let (duplicates, rest) = rest.split_once(" already in the store, ")?;
    let (rejected, _) = rest.split_once(" rejected")?;
    Some(Summary {
        messages: messages.parse().ok()?,
        sequences: sequences.to_owned(),
        rate: rate.parse().ok()?,
        applied: applied.parse().ok()?,
        duplicates: duplicates.parse().ok()?,
        rejected: rejected.parse().ok()?,
    })
}

struct ReplayStats {
    summary: Option<Summary>,
    exit: String,
    /// N ÷ time from spawn to exit.
    wall_rate: f64,
    wall_secs: f64,
    hwm_mib: f64,
    /// Peak anonymous RSS (heap, stacks): VmHWM also counts the store's mapped pages.
    anon_mib: f64,
    store_mib: f64,
    /// Cores per thread group over the process's life.
    threads: Vec<(String, f64)>,
}

struct Outcome {
    scenario: Scenario,
    count: u64,
    /// The headline rate: raw consumers measured here, replay from its summary line.
    rate: f64,
    secs: f64,
    end: End,
    cpu: Vec<(&'static str, f64)>,
    machine: f64,
    replay: Option<ReplayStats>,
}

impl Outcome {
    fn cpu_of(&self, name: &str) -> Option<f64> {
        cpu_of(&self.cpu, name)
    }

    /// Cores busy outside the tracked processes: other work on the machine.
    fn others(&self) -> f64 {
        self.machine - self.cpu.iter().map(|(_, c)| c).sum::<f64>()
    }

    fn disturbed(&self) -> bool {
        self.others() > DISTURBED_CORES
    }
}

struct Bench {
    s: Settings,
    nats: NatsServer,
    config: tempfile::NamedTempFile,
}

impl Bench {
    async fn run(&self, scenario: Scenario, round: usize) -> Outcome {
        let o = match scenario {
            Scenario::RawOrdered | Scenario::RawDurable => self.raw(scenario, round).await,
            Scenario::Replay | Scenario::ReplayDurable => self.replay(scenario, round).await,
        };
        progress_line(&o);
        o
    }

    /// (r) and (r-d): a raw consumer in this process.
    async fn raw(&self, scenario: Scenario, round: usize) -> Outcome {
        let url = self.nats.url();
        let durable = (scenario == Scenario::RawDurable).then(|| format!("bench-ceiling-{round}"));
        let n = self.s.n as u64;
        let procs = procs(&self.nats, None);
        wait_for_quiet(QUIET_WAIT).await;
        let meter = Meter::new();
        let cpu0 = sample(&procs);
        let task = tokio::spawn(raw_consumer(
            url.clone(),
            durable.clone(),
            self.s.batch(),
            meter.clone(),
        ));
        let (mut seen, mut last, mut cpu_last) = (0, Instant::now(), cpu0.clone());
        let mut next_progress = Instant::now() + PROGRESS_EVERY;
        let end = loop {
            tokio::time::sleep(POLL).await;
            let count = meter.count();
            if count > seen {
                (seen, last, cpu_last) = (count, Instant::now(), sample(&procs));
            }
            if count >= n {
                break End::Complete;
            }
            if task.is_finished() {
                break End::Failed;
            }
            if last.elapsed() >= STALL {
                break End::Stalled;
            }
            if Instant::now() >= next_progress {
                eprintln!(
                    "[bench]   {}: {} of {}",
                    scenario.short(),
                    group(seen as i64),
                    group(n as i64)
                );
                next_progress += PROGRESS_EVERY;
            }
        };
        if end == End::Failed {
            match task.await {
                Ok(Err(e)) => eprintln!("[bench] {}: {e}", scenario.short()),
                other => eprintln!("[bench] {}: ended: {other:?}", scenario.short()),
            }
        } else {
            task.abort();
        }
        if let Some(name) = &durable {
            delete_consumer(&url, name).await;
        }
        let count = meter.count();
        let secs = meter
            .last_at()
            .map_or(0.0, |last| last.duration_since(meter.base()).as_secs_f64());
        let Cores {
            per: cpu, machine, ..
        } = cores(&procs, &cpu0, &cpu_last);
        Outcome {
            scenario,
            count,
            rate: if secs > 0.0 { count as f64 / secs } else { 0.0 },
            secs,
            end,
            cpu,
            machine,
            replay: None,
        }
    }

    /// (p) and (p-d): the release binary as a child.
    async fn replay(&self, scenario: Scenario, round: usize) -> Outcome {
        let url = self.nats.url();
        let durable =
            (scenario == Scenario::ReplayDurable).then(|| format!("bench-replay-{round}"));
        let n = self.s.n;
        let dir = tempfile::Builder::new()
            .prefix("windrow-bench-replay-")
            .tempdir()
            .expect("create the store's temp dir");
        let into = dir.path().join("store");
        let mut args: Vec<String> = vec![
            "--config".into(),
            self.config.path().to_str().expect("UTF-8 temp path").into(),
            "replay".into(),
            "--nats-url".into(),
            url.clone(),
            "--stream".into(),
            STREAM.into(),
            "--into".into(),
            into.to_str().expect("UTF-8 temp path").into(),
            "--progress".into(),
            "log".into(),
        ];
        if let Some(d) = &durable {
            args.extend(["--durable".into(), d.clone()]);
        }
        if let Some(b) = self.s.batch {
            args.extend(["--batch".into(), b.to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        wait_for_quiet(QUIET_WAIT).await;
        let mut cpu0 = sample(&procs(&self.nats, None));
        let started = cpu0.at;
        let mut process = RoleProcess::spawn(Path::new(env!("CARGO_BIN_EXE_windrow")), &refs, &[]);
        let pid = process.pid();
        let procs = procs(&self.nats, Some(pid));
        // The child's CPU counts from its start.
        cpu0.secs.push(Some(0.0));
        let (mut cpu_last, mut threads) = (cpu0.clone(), Vec::new());
        let (mut hwm, mut anon) = (0.0_f64, 0.0_f64);
        let mut shown = String::new();
        let deadline = started + STALL + Duration::from_secs_f64(n as f64 / 2000.0);
        let mut next_progress = started + PROGRESS_EVERY;
        let end = loop {
            tokio::time::sleep(POLL).await;
            if let Some(status) = process.try_exit() {
                break if status.success() {
                    End::Complete
                } else {
                    End::Failed
                };
            }
            // Sampled while it runs: the last sample is at most one poll before the exit.
            let now = sample(&procs);
            let status = proc_status(pid);
            if let (Some(Some(_)), Some(t), Some(h), Some(a)) = (
                now.secs.last(),
                thread_cpu(pid),
                status.as_deref().and_then(|s| status_mib(s, "VmHWM:")),
                status.as_deref().and_then(|s| status_mib(s, "RssAnon:")),
            ) {
                cpu_last = now;
                // Each name's highest total so far: a thread that ends before
                // the last sample (the writer, once the store is closed)
                // would otherwise drop out of the list.
                for (name, secs) in t {
                    add_by_name(&mut threads, name, secs, f64::max);
                }
                (hwm, anon) = (hwm.max(h), anon.max(a));
            }
            if Instant::now() >= next_progress {
                let log = process.log();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("replay progress"))
                    .unwrap_or("(no progress line yet)")
                    .trim();
                if last != shown {
                    eprintln!("[bench]   {}: {last}", scenario.short());
                    last.clone_into(&mut shown);
                }
                next_progress += PROGRESS_EVERY;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "[bench] {} overran {deadline:?}; killing it",
                    scenario.short()
                );
                process.sigkill().await;
                break End::Stalled;
            }
        };
        let wall_secs = started.elapsed().as_secs_f64();
        let log = process.log();
        if let Some(dir) = std::env::var_os("WINDROW_BENCH_LOG_DIR") {
            let name = scenario
                .short()
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join("-");
            let path = Path::new(&dir).join(format!("{name}-round{round}.log"));
            if let Err(e) = std::fs::write(&path, &log) {
                eprintln!("[bench] cannot keep the log in {}: {e}", path.display());
            }
        }
        let summary = parse_summary(&log);
        if end != End::Complete || summary.is_none() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "[bench] {}: {end:?}, no summary line? log tail:\n{}",
                scenario.short(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(name) = &durable {
            delete_consumer(&url, name).await;
        }
        let Cores {
            per: cpu, machine, ..
        } = cores(&procs, &cpu0, &cpu_last);
        let life = cpu_last.at.duration_since(started).as_secs_f64().max(1e-9);
        let stats = ReplayStats {
            exit: process
                .try_exit()
                .map_or("running".into(), |s| s.to_string()),
            wall_rate: n as f64 / wall_secs,
            wall_secs,
            hwm_mib: hwm,
            anon_mib: anon,
            store_mib: disk_bytes(&into) as f64 / (1024.0 * 1024.0),
            threads: threads.into_iter().map(|(t, c)| (t, c / life)).collect(),
            summary: summary.clone(),
        };
        let count = summary.as_ref().map_or(0, |s| s.messages);
        let rate = summary.as_ref().map_or(0.0, |s| s.rate);
        Outcome {
            scenario,
            count,
            rate,
            secs: if rate > 0.0 { count as f64 / rate } else { 0.0 },
            end,
            cpu,
            machine,
            replay: Some(stats),
        }
    }
}

// ---------------------------------------------------------------------------
// Reporting

fn replay_note(r: &ReplayStats) -> String {
    let summary = r.summary.as_ref().map_or("no summary line".into(), |s| {
        format!(
            "{} read (sequences {}), {} applied, {} duplicates, {} rejected",
            group(s.messages as i64),
            s.sequences,
            group(s.applied as i64),
            group(s.duplicates as i64),
            group(s.rejected as i64)
        )
    });
    let threads: Vec<String> = r
        .threads
        .iter()
        .filter(|(_, c)| *c >= 0.005)
        .map(|(t, c)| format!("{t} {c:.2}"))
        .collect();
    format!(
        "{summary}; {}; spawn→exit {:.2} s ({} msgs/s); peak RSS {:.0} MiB ({:.0} anon); \
         store {:.0} MiB; threads (cores over its life): {}",
        r.exit,
        r.wall_secs,
        rate_text(r.wall_rate),
        r.hwm_mib,
        r.anon_mib,
        r.store_mib,
        threads.join(", ")
    )
}

fn progress_line(o: &Outcome) {
    let cpu: Vec<String> = o.cpu.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
    eprintln!(
        "[bench] {}: {} msgs/s ({} in {:.2} s, {:?}); cores: {}, machine {:.2} (others {:.2}){}",
        o.scenario.short(),
        rate_text(o.rate),
        group(o.count as i64),
        o.secs,
        o.end,
        cpu.join(", "),
        o.machine,
        o.others(),
        if o.disturbed() {
            " DISTURBED by other work"
        } else {
            ""
        },
    );
    if let Some(r) = &o.replay {
        eprintln!("[bench]   replay: {}", replay_note(r));
    }
}

/// What was published, reported once.
struct Setup {
    publish_secs: f64,
    stored: u64,
    warm_up: Option<f64>,
}

fn report(s: &Settings, setup: &Setup, results: &[Vec<Outcome>]) -> String {
    let mut md = String::new();
    let of = |sc: Scenario| -> Vec<&Outcome> {
        results
            .iter()
            .filter_map(|r| r.iter().find(|o| o.scenario == sc))
            .collect()
    };
    let med = |sc: Scenario| median(of(sc).iter().map(|o| o.rate).collect());
    let _ = writeln!(
        md,
        "`cargo bench --bench replay`: N = {} messages over {} series, published once into stream \
         `{STREAM}` (file storage, R1; {:.1} s at {} msgs/s, acknowledged, {JS_PUBLISH_WINDOW} in \
         flight; {} stored), read once untimed as a warm-up ({}), then {} interleaved rounds on \
         that stream; replay batch {}.\n",
        group(s.n as i64),
        group(s.series as i64),
        setup.publish_secs,
        rate_text(s.n as f64 / setup.publish_secs.max(1e-9)),
        group(setup.stored as i64),
        setup
            .warm_up
            .map_or("failed".into(), |r| format!("{} msgs/s", rate_text(r))),
        s.runs,
        group(s.batch() as i64),
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
        "| Scenario | Path |{runs_header} Median msgs/s | ÷ ceiling (medians) | ÷ ceiling per run |"
    );
    let _ = writeln!(md, "|---|---|{runs_rule}---:|---:|---:|");
    for sc in Scenario::ALL {
        let os = of(sc);
        if os.is_empty() {
            continue;
        }
        let cells: String = os
            .iter()
            .map(|o| {
                let mark = match o.end {
                    End::Complete => "",
                    End::Stalled => " (stalled)",
                    End::Failed => " (failed)",
                };
                let dist = if o.disturbed() { " †" } else { "" };
                format!(" {}{mark}{dist} |", rate_text(o.rate))
            })
            .collect();
        let (vs, per_run) = match sc.ceiling() {
            Some(c) if med(c) > 0.0 => {
                let per: Vec<String> = results
                    .iter()
                    .filter_map(|r| {
                        let a = r.iter().find(|o| o.scenario == c)?;
                        let b = r.iter().find(|o| o.scenario == sc)?;
                        (a.rate > 0.0).then(|| format!("{:.2}", b.rate / a.rate))
                    })
                    .collect();
                (
                    format!("**{:.2}** of {}", med(sc) / med(c), c.short()),
                    per.join(" / "),
                )
            }
            _ => ("—".into(), "—".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} |{cells} **{}** | {vs} | {per_run} |",
            sc.short(),
            sc.path(s),
            rate_text(med(sc)),
        );
    }
    let _ = writeln!(
        md,
        "\nRates: (r), (r-d) messages ÷ time from before the consumer connects to its last \
         message; (p), (p-d) the msg/s of replay's summary line (messages ÷ time from its start, \
         store opened and NATS connected, until the last batch committed). † = more than \
         {DISTURBED_CORES} cores went to other work meanwhile. Target: replay ≥ {TARGET} × the raw \
         consumer rate."
    );

    let _ = writeln!(
        md,
        "\n### Replay: wall time, memory, store (medians over runs)\n"
    );
    let _ = writeln!(
        md,
        "| Scenario | Summary msgs/s | Spawn→exit s | Spawn→exit msgs/s | Applied | Rejected | Peak RSS MiB | Peak anon RSS MiB | Store on disk MiB |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for sc in [Scenario::Replay, Scenario::ReplayDurable] {
        let rs: Vec<&ReplayStats> = of(sc).iter().filter_map(|o| o.replay.as_ref()).collect();
        if rs.is_empty() {
            continue;
        }
        let m = |f: &dyn Fn(&ReplayStats) -> f64| median(rs.iter().map(|r| f(r)).collect());
        let sm = |f: &dyn Fn(&Summary) -> f64| m(&|r| r.summary.as_ref().map_or(0.0, f));
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
            sc.short(),
            rate_text(sm(&|s| s.rate)),
            m(&|r| r.wall_secs),
            rate_text(m(&|r| r.wall_rate)),
            group(sm(&|s| s.applied as f64) as i64),
            group(sm(&|s| s.rejected as f64) as i64),
            m(&|r| r.hwm_mib),
            m(&|r| r.anon_mib),
            m(&|r| r.store_mib),
        );
    }
    let _ = writeln!(
        md,
        "\nPeak RSS is VmHWM, which counts the LMDB store's memory-mapped pages; anon is the \
         highest RssAnon seen (heap, stacks). Both sampled every 25 ms."
    );

    let _ = writeln!(
        md,
        "\n### Where the CPU went\n\nMedian cores used (2.00 = the whole machine), from /proc: \
         per process (consumer: this benchmark process, i.e. the raw consumer, or only polling \
         during replay), their sum, the whole machine's busy time and the difference (\"Others\": \
         anything else running). Raw consumers: from the start to the last message; replay: from \
         spawn to the last sample before its exit, and its threads over the same time.\n"
    );
    let _ = writeln!(
        md,
        "| Scenario | Window (s) | Consumer | nats-server | Replay | Replay threads | Sum | Whole machine | Others |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---|---:|---:|---:|");
    for sc in Scenario::ALL {
        let os = of(sc);
        if os.is_empty() {
            continue;
        }
        let cell = |name: &str| -> String {
            let v: Vec<f64> = os.iter().filter_map(|o| o.cpu_of(name)).collect();
            if v.is_empty() {
                "—".into()
            } else {
                format!("{:.2}", median(v))
            }
        };
        let mut names: Vec<String> = Vec::new();
        for o in &os {
            for (t, _) in o.replay.iter().flat_map(|r| &r.threads) {
                if !names.contains(t) {
                    names.push(t.clone());
                }
            }
        }
        let threads: Vec<String> = names
            .iter()
            .filter_map(|t| {
                let v = median(
                    os.iter()
                        .filter_map(|o| {
                            o.replay
                                .as_ref()?
                                .threads
                                .iter()
                                .find(|(n, _)| n == t)
                                .map(|(_, c)| *c)
                        })
                        .collect(),
                );
                (v >= 0.005).then(|| format!("{t} {v:.2}"))
            })
            .collect();
        let _ = writeln!(
            md,
            "| {} | {:.2} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
            sc.short(),
            median(os.iter().map(|o| o.secs).collect()),
            cell("bench"),
            cell("nats-server"),
            cell("replay"),
            if threads.is_empty() {
                "—".into()
            } else {
                threads.join(", ")
            },
            median(
                os.iter()
                    .map(|o| o.cpu.iter().map(|(_, c)| c).sum())
                    .collect()
            ),
            median(os.iter().map(|o| o.machine).collect()),
            median(os.iter().map(|o| o.others()).collect()),
        );
    }

    let _ = writeln!(md, "\nPer run:\n");
    for (run, r) in results.iter().enumerate() {
        for o in r {
            let mut line = format!(
                "- run {}, {}: {} msgs/s, {} messages in {:.2} s ({:?})",
                run + 1,
                o.scenario.short(),
                rate_text(o.rate),
                group(o.count as i64),
                o.secs,
                o.end
            );
            if let Some(r) = &o.replay {
                let _ = write!(line, "; {}", replay_note(r));
            }
            let _ = writeln!(md, "{line}");
        }
    }
    md
}

// ---------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    support::run_bench("replay", "servers", run()).await;
}

async fn run() {
    let s = Settings::from_env();
    support::pin_bench();
    eprintln!("[bench] {s:?}");
    let nats = start_nats().await;
    let url = nats.url();
    create_stream(&url, STREAM, &[FILTER], Duration::from_secs(120)).await;
    let mut config = tempfile::Builder::new()
        .prefix("windrow-bench-replay-")
        .suffix(".toml")
        .tempfile()
        .expect("create the replay config file");
    std::io::Write::write_all(
        &mut config,
        b"[worker.decode]\nseries_fields = [\"device\"]\n",
    )
    .expect("write the replay config file");

    eprintln!("[bench] publishing {} messages", group(s.n as i64));
    let publish_secs = publish(&url, &Fleet::new(s.n, s.series))
        .await
        .as_secs_f64();
    let stored = stream_len(&url, STREAM).await;
    eprintln!(
        "[bench] published in {publish_secs:.1} s; the stream holds {}",
        group(stored as i64)
    );
    assert_eq!(stored, s.n as u64, "the stream must hold every message");

    let bench = Bench { s, nats, config };
    eprintln!("[bench] warm-up read");
    let warm = bench.raw(Scenario::RawOrdered, 0).await;
    let setup = Setup {
        publish_secs,
        stored,
        warm_up: (warm.end == End::Complete).then_some(warm.rate),
    };
    eprintln!("[bench] warm-up: {} msgs/s", rate_text(warm.rate));

    let started = Instant::now();
    let mut results = Vec::new();
    for run in 0..s.runs {
        eprintln!("[bench] run {}/{}", run + 1, s.runs);
        let pairs = [
            [Scenario::RawOrdered, Scenario::Replay],
            [Scenario::RawDurable, Scenario::ReplayDurable],
        ];
        let mut this = Vec::new();
        for mut pair in pairs {
            // Alternate which of a pair goes first, so neither always meets
            // the other's after-effects (page cache, nats-server block cache).
            if run % 2 == 1 {
                pair.reverse();
            }
            for sc in pair {
                this.push(bench.run(sc, run + 1).await);
            }
        }
        results.push(this);
        let per_run = started.elapsed().as_secs_f64() / (run + 1) as f64;
        eprintln!(
            "[bench] run {}/{} done after {:.0} s; about {:.0} s to go",
            run + 1,
            s.runs,
            started.elapsed().as_secs_f64(),
            per_run * (s.runs - run - 1) as f64
        );
    }
    println!("{}", report(&s, &setup, &results));
}
