//! The LMDB writer's cost per message as a day's store fills up.
//!
//! `cargo bench --bench store` drives the worker's [`Store`] directly, in this
//! process (no NATS, no decoding: the writer thread's part alone), with a
//! fleet of `WINDROW_BENCH_SERIES` (default 20,000) devices reporting
//! round-robin every `WINDROW_BENCH_STEP_SECS` (default 10) seconds, in
//! batches of 20,000 messages (the worker's default batch), until
//! `WINDROW_BENCH_MESSAGES` (default 2,000,000) messages. Each batch is
//! applied and then, as the writer thread does, [`Store::compact_due`] runs.
//!
//! Two scenarios, interleaved over `WINDROW_BENCH_RUNS` (default 3) rounds:
//! - (r) the store's `recent_max_windows` (default 1,000,000, or
//!   `WINDROW_BENCH_RECENT`): windows collect in `recent`, time first, and
//!   are compacted into a run now and then;
//! - (m) every batch's windows compacted into a run of their own right
//!   after the batch (`Store::compact_all`), the runs merged in tiers: a
//!   store without `recent`, log-structured (plus a second commit per
//!   batch). Before format version 5 this scenario merged every batch into
//!   the series-ordered `windows` B-tree: the page cost of the layout
//!   before `recent` existed (BENCHMARKS.md keeps those figures).
//!
//! The worker benchmark's 500,000 messages over 100,000 series give each
//! series five readings, and a young store hides what this measures: once a
//! series has a page of windows of its own, a batch that touches it rewrites
//! that page.
//!
//! Reported per scenario: messages per second over the whole run and over its
//! second half (the older store, with the defaults two compactions in it),
//! microseconds of the writer per message in that half,
//! bytes written to disk per message (`write_bytes` of /proc/self/io), and the
//! compactions (how many, and the time of their slices, in total and the
//! longest: the longest is how long the writer pauses between two batches).
//! Progress goes to stderr, a Markdown report to stdout.
//!
//! Without `--bench` (e.g. `cargo test --all-targets`) it does nothing.
#![allow(missing_docs)]

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use support::{cpu_model, disk_bytes, env_usize, group, median};
use windrow_workers::{
    store::{ManualClock, Message, Store, StoreConfig},
    window::Sample,
};

/// The worker's default `batch_max_messages`.
const BATCH: usize = 20_000;

/// 2025-12-01T01:00:00Z: an hour into a UTC day, so a run of a few hours of
/// device time stays within one day.
const T0: i64 = 1_764_550_800_000_000_000;

#[derive(Debug, Clone, Copy)]
struct Settings {
    messages: usize,
    series: usize,
    step_secs: i64,
    runs: usize,
    recent: Option<u64>,
}

impl Settings {
    fn from_env() -> Self {
        let s = Settings {
            messages: env_usize("WINDROW_BENCH_MESSAGES").unwrap_or(2_000_000),
            series: env_usize("WINDROW_BENCH_SERIES").unwrap_or(20_000),
            step_secs: env_usize("WINDROW_BENCH_STEP_SECS").unwrap_or(10) as i64,
            runs: env_usize("WINDROW_BENCH_RUNS").unwrap_or(3),
            recent: env_usize("WINDROW_BENCH_RECENT").map(|n| n as u64),
        };
        assert!(
            s.messages >= BATCH && s.series > 0 && s.step_secs > 0 && s.runs > 0,
            "WINDROW_BENCH_MESSAGES ≥ {BATCH}, and SERIES, STEP_SECS, RUNS > 0: {s:?}"
        );
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Recent,
    MergedEveryBatch,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::Recent => "(r) recent, compacted now and then",
            Scenario::MergedEveryBatch => "(m) a run per batch",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    secs: f64,
    /// When half the messages were applied, seconds from the start.
    half_secs: f64,
    written_bytes: u64,
    compactions: usize,
    compaction_secs: f64,
    longest_compaction_secs: f64,
    disk_bytes: u64,
}

impl Outcome {
    fn rate(&self, messages: usize) -> f64 {
        messages as f64 / self.secs
    }
    /// The second half's rate: the older store, and (with the defaults)
    /// two compactions in it, so their cost is in it.
    fn second_half_rate(&self, messages: usize) -> f64 {
        (messages - messages / 2) as f64 / (self.secs - self.half_secs)
    }
}

/// Bytes this process caused to be written to disk so far.
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn run(s: Settings, scenario: Scenario, round: usize) -> Outcome {
    let dir = tempfile::Builder::new()
        .prefix("windrow-bench-store-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create the store directory");
    let clock = ManualClock::new(T0);
    let recent_max_windows = s
        .recent
        .unwrap_or(StoreConfig::default().recent_max_windows);
    let config = StoreConfig {
        dir: dir.path().to_owned(),
        recent_max_windows,
        ..StoreConfig::default()
    };
    let mut store = Store::open(config, Arc::new(clock.clone())).expect("open the store");
    let names: Vec<String> = (0..s.series).map(|i| format!("fleet/d{i:06}")).collect();
    let mut out = Outcome::default();
    let (written_before, started) = (written_bytes(), Instant::now());
    let tenth = s.messages.div_ceil(10);
    let (mut tenth_started, mut tenth_done) = (Instant::now(), 0usize);
    let mut batch = Vec::with_capacity(BATCH);
    for n in 0..s.messages {
        let (round_of_fleet, device) = (n / s.series, n % s.series);
        let ts = T0 + round_of_fleet as i64 * s.step_secs * 1_000_000_000;
        batch.push(Message {
            stream_seq: None,
            received_ns: None,
            samples: vec![Sample {
                series: names[device].as_str().into(),
                field: "temp".into(),
                ts_ns: ts,
                value: (n % 1000) as f64 / 10.0,
            }],
        });
        if batch.len() == BATCH || n + 1 == s.messages {
            clock.set(ts);
            store.apply(&batch).expect("apply a batch");
            let compacting = Instant::now();
            let compacted = match scenario {
                // What the writer thread does after each batch.
                Scenario::Recent => store
                    .compact_due()
                    .expect("compact")
                    .iter()
                    .map(|step| (step.done, step.windows))
                    .collect(),
                // The whole batch into a run before the next one.
                Scenario::MergedEveryBatch => {
                    vec![(true, store.compact_all().expect("compact") as usize)]
                }
            };
            if !compacted.is_empty() {
                let secs = compacting.elapsed().as_secs_f64();
                out.compactions += compacted.iter().filter(|(done, _)| *done).count();
                out.compaction_secs += secs;
                out.longest_compaction_secs = out.longest_compaction_secs.max(secs);
            }
            tenth_done += batch.len();
            batch.clear();
            if out.half_secs == 0.0 && n + 1 >= s.messages / 2 {
                out.half_secs = started.elapsed().as_secs_f64();
            }
            if tenth_done >= tenth || n + 1 == s.messages {
                let secs = tenth_started.elapsed().as_secs_f64();
                let done = n + 1;
                let elapsed = started.elapsed().as_secs_f64();
                let eta = elapsed / done as f64 * (s.messages - done) as f64;
                eprintln!(
                    "[bench] {} round {round}: {:>3} % ({} msgs), {:.2} µs/msg over the last {}, \
                     {} msgs/s, ETA {eta:.0} s",
                    scenario.label(),
                    done * 100 / s.messages,
                    group(done as i64),
                    secs * 1e6 / tenth_done as f64,
                    group(tenth_done as i64),
                    group((tenth_done as f64 / secs) as i64),
                );
                (tenth_started, tenth_done) = (Instant::now(), 0);
            }
        }
    }
    out.secs = started.elapsed().as_secs_f64();
    out.written_bytes = written_bytes().saturating_sub(written_before);
    out.disk_bytes = disk_bytes(dir.path());
    store.close();
    out
}

fn report(s: Settings, results: &[(Scenario, Vec<Outcome>)]) {
    let m = s.messages;
    println!("## Store ageing ({})\n", cpu_model());
    println!(
        "`cargo bench --bench store`: {} messages, {} series reporting every {} s \
         round-robin ({} readings each, {:.0} min of device time), batches of {}, {} \
         interleaved runs; medians.\n",
        group(m as i64),
        group(s.series as i64),
        s.step_secs,
        m / s.series,
        (m / s.series) as f64 * s.step_secs as f64 / 60.0,
        group(BATCH as i64),
        s.runs
    );
    println!(
        "| Scenario | msgs/s, whole run | msgs/s, second half | µs/msg, second half | \
         KiB written/msg | Compactions | Compaction s (total) | Longest slice s | \
         Store MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let med = |v: &[Outcome], f: &dyn Fn(&Outcome) -> f64| median(v.iter().map(f).collect());
    for (scenario, v) in results {
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} |",
            scenario.label(),
            group(med(v, &|o| o.rate(m)) as i64),
            group(med(v, &|o| o.second_half_rate(m)) as i64),
            med(v, &|o| 1e6 / o.second_half_rate(m)),
            med(v, &|o| o.written_bytes as f64 / 1024.0 / m as f64),
            med(v, &|o| o.compactions as f64),
            med(v, &|o| o.compaction_secs),
            med(v, &|o| o.longest_compaction_secs),
            med(v, &|o| o.disk_bytes as f64 / 1048576.0),
        );
    }
    if let [(_, r), (_, merged)] = results {
        let ratio = |f: &dyn Fn(&Outcome) -> f64| {
            median(r.iter().zip(merged).map(|(a, b)| f(a) / f(b)).collect())
        };
        println!(
            "\n(r) ÷ (m), per round then median: whole run {:.2}, second half {:.2}.",
            ratio(&|o| o.rate(m)),
            ratio(&|o| o.second_half_rate(m))
        );
    }
    for (scenario, v) in results {
        for (i, o) in v.iter().enumerate() {
            println!(
                "- run {}, {}: {} msgs/s ({:.1} s), second half {} msgs/s; {} compactions, longest slice {:.2} s",
                i + 1,
                scenario.label(),
                group(o.rate(m) as i64),
                o.secs,
                group(o.second_half_rate(m) as i64),
                o.compactions,
                o.longest_compaction_secs
            );
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    support::run_bench("store", "nothing", async {
        let s = Settings::from_env();
        eprintln!("[bench] {s:?}");
        let mut results = vec![
            (Scenario::Recent, Vec::new()),
            (Scenario::MergedEveryBatch, Vec::new()),
        ];
        for round in 1..=s.runs {
            // Alternate which goes first, so drift favours neither.
            let order: Vec<usize> = if round % 2 == 1 {
                vec![0, 1]
            } else {
                vec![1, 0]
            };
            for i in order {
                let scenario = results[i].0;
                let outcome = tokio::task::spawn_blocking(move || run(s, scenario, round))
                    .await
                    .expect("the run finishes");
                results[i].1.push(outcome);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        report(s, &results);
    })
    .await;
}
