//! CPU, memory and disk use from /proc, and waiting for a quiet machine.
//!
//! The benchmarks run on a small machine (two cores) where a concurrent build
//! would halve the rates: they wait for quiet before each scenario, and report
//! per-process CPU next to the whole machine's, so that the difference
//! ("others") shows any disturbance that happened anyway.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

/// Kernel clock ticks per second in /proc/*/stat (100 on Linux x86-64 and arm64).
const CLK_TCK: f64 = 100.0;
/// Before each scenario, wait until the machine's busy cores over one second
/// fall below this: other processes would skew the rates.
const QUIET_CORES: f64 = 0.3;
/// Seconds in a row the machine must stay below `QUIET_CORES`.
const QUIET_SECONDS: u32 = 3;
/// How often [`wait_for_quiet`] says it is still waiting.
const QUIET_REPORT_EVERY: Duration = Duration::from_secs(15);
/// A run during which more than this many cores went to other work is marked †.
pub const DISTURBED_CORES: f64 = 0.25;

/// CPU seconds (user + system) from the text of a /proc stat file.
///
/// Fields are counted after the last `)`: the command name in parentheses may
/// contain spaces and parentheses itself.
pub fn stat_cpu_secs(stat: &str) -> Option<f64> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// CPU seconds (user + system) of a process or thread from its /proc stat file;
/// `None` once it is gone.
pub fn cpu_secs(stat_path: &str) -> Option<f64> {
    stat_cpu_secs(&std::fs::read_to_string(stat_path).ok()?)
}

/// CPU seconds of the calling thread (0 if /proc cannot tell): a publisher on
/// its own thread measures itself, apart from the rest of the benchmark process.
pub fn thread_cpu_secs() -> f64 {
    cpu_secs("/proc/thread-self/stat").unwrap_or(0.0)
}

/// The /proc stat file of process `pid`.
pub fn stat_path(pid: u32) -> String {
    format!("/proc/{pid}/stat")
}

/// Busy CPU seconds of the whole machine (user, nice, system, irq, softirq, steal) from /proc/stat.
pub fn machine_busy_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| f.get(*i))
        .sum::<f64>()
        / CLK_TCK
}

/// Waits until the machine is (nearly) idle, so that a concurrent build does
/// not share the two cores with the scenario; goes ahead anyway after `max_wait`.
pub async fn wait_for_quiet(max_wait: Duration) {
    let deadline = Instant::now() + max_wait;
    let mut reported = None::<Instant>;
    let mut quiet_seconds = 0;
    loop {
        let (b0, t0) = (machine_busy_secs(), Instant::now());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let busy = (machine_busy_secs() - b0) / t0.elapsed().as_secs_f64();
        if busy < QUIET_CORES {
            quiet_seconds += 1;
            if quiet_seconds >= QUIET_SECONDS {
                return;
            }
            continue;
        }
        quiet_seconds = 0;
        if Instant::now() >= deadline {
            eprintln!("[bench] still {busy:.2} cores busy after {max_wait:?}; going ahead");
            return;
        }
        if reported.is_none_or(|r| r.elapsed() >= QUIET_REPORT_EVERY) {
            eprintln!("[bench] {busy:.2} cores busy with other work; waiting for a quiet machine");
            reported = Some(Instant::now());
        }
    }
}

/// (name, /proc stat path) of every process (or thread) to account; the
/// benchmark process itself is `("bench", "/proc/self/stat")` by convention.
pub type Procs = Vec<(&'static str, String)>;

/// CPU seconds of every entry of a [`Procs`] list and of the whole machine, at one moment.
#[derive(Clone)]
pub struct CpuSample {
    /// When it was taken.
    pub at: Instant,
    /// Per entry, in the list's order; `None` where the stat file could not be read.
    pub secs: Vec<Option<f64>>,
    /// Busy CPU seconds of the whole machine.
    pub machine: f64,
}

/// Samples the CPU seconds of `procs` and of the machine now.
pub fn sample(procs: &[(&'static str, String)]) -> CpuSample {
    CpuSample {
        at: Instant::now(),
        secs: procs.iter().map(|(_, p)| cpu_secs(p)).collect(),
        machine: machine_busy_secs(),
    }
}

/// Cores used between two samples.
pub struct Cores {
    /// Seconds between the samples (at least 1 ns, so that it can divide).
    pub wall_secs: f64,
    /// (name, cores used) per entry of the [`Procs`] list, in its order; an
    /// unreadable stat file counts as 0 CPU seconds.
    pub per: Vec<(&'static str, f64)>,
    /// Busy cores of the whole machine.
    pub machine: f64,
}

/// Cores used per entry of `procs` and by the whole machine from sample `a` to sample `b`.
pub fn cores(procs: &[(&'static str, String)], a: &CpuSample, b: &CpuSample) -> Cores {
    let wall_secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let per = procs
        .iter()
        .zip(a.secs.iter().zip(&b.secs))
        .map(|((name, _), (x, y))| (*name, (y.unwrap_or(0.0) - x.unwrap_or(0.0)) / wall_secs))
        .collect();
    Cores {
        wall_secs,
        per,
        machine: (b.machine - a.machine) / wall_secs,
    }
}

/// The cores of entry `name`, if it is in `cpu`.
pub fn cpu_of(cpu: &[(&'static str, f64)], name: &str) -> Option<f64> {
    cpu.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// Splits a publisher thread's `publisher` cores out of the benchmark
/// process's entry, which includes them: renames `"bench"` to `rest` (what
/// remains, e.g. the measuring subscriber) with the difference, and appends
/// `("publisher", publisher)`.
pub fn split_publisher(cpu: &mut Vec<(&'static str, f64)>, publisher: f64, rest: &'static str) {
    for entry in cpu.iter_mut().filter(|(n, _)| *n == "bench") {
        *entry = (rest, (entry.1 - publisher).max(0.0));
    }
    cpu.push(("publisher", publisher));
}

/// The text of `/proc/PID/status`; `None` once the process is gone.
pub fn proc_status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// A value of a `/proc/PID/status` text in MiB (`key` like `"VmHWM:"`; the file gives kB).
pub fn status_mib(status: &str, key: &str) -> Option<f64> {
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Bytes allocated on disk below `dir` (sparse and preallocated files as they really are).
pub fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
