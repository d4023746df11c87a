//! Helpers shared by the benchmarks in `benches/` (each uses a subset).
//!
//! Included with `mod support;`; Cargo discovers only `benches/*.rs` and
//! `benches/*/main.rs` as bench targets, so this directory is never one of its own.
//!
//! # Layout
//! - `mod.rs`: [`run_bench`], the `main` of every benchmark; [`env_usize`], [`unix_ms`].
//! - `machine.rs`: CPU, memory and disk from /proc — [`wait_for_quiet`],
//!   [`CpuSample`], [`cores`], [`split_publisher`], [`status_mib`], [`disk_bytes`].
//! - `meter.rs`: measuring clients — [`Meter`], [`ClientEvents`], [`measuring_client`].
//! - `pinning.rs`: `WINDROW_BENCH_PIN` — [`pin_bench`], [`start_nats`],
//!   [`pin_publisher`], [`pinning_text`], [`machine_cpus`].
//! - `fleet.rs`: [`Fleet`], the device readings the worker and replay benchmarks publish.
//! - `report.rs`: numbers and machine facts for the Markdown report — [`group`],
//!   [`rate_text`], [`median`], [`metric`], [`cpu_model`], [`version_line`].
#![allow(dead_code)] // each benchmark uses a subset; unused items are not a mistake

mod fleet;
mod machine;
mod meter;
mod pinning;
mod report;

use std::{
    future::Future,
    time::{SystemTime, UNIX_EPOCH},
};

// Re-exported for every benchmark, each of which imports a subset.
#[allow(unused_imports)]
pub use fleet::Fleet;
#[allow(unused_imports)]
pub use machine::{
    cores, cpu_of, disk_bytes, proc_status, sample, split_publisher, stat_cpu_secs, stat_path,
    status_mib, thread_cpu_secs, wait_for_quiet, Cores, CpuSample, Procs, DISTURBED_CORES,
};
#[allow(unused_imports)]
pub use meter::{measuring_client, ClientEvents, Meter};
#[allow(unused_imports)]
pub use pinning::{machine_cpus, pin_bench, pin_publisher, pinning, pinning_text, start_nats};
#[allow(unused_imports)]
pub use report::{bucket, cpu_model, group, median, metric, rate_text, version_line};

/// Runs the benchmark `bench` named `name` until it ends, SIGINT or SIGTERM.
///
/// `cargo test --all-targets` runs bench targets too, without `--bench`: then
/// it only says how to run the benchmark, since one takes many minutes. On a
/// signal `bench` is dropped, and with it the guards of the servers (`servers`
/// names them in the message, e.g. "brokers") and roles, which kill their processes.
///
/// # Panics
/// If the SIGTERM handler cannot be installed.
pub async fn run_bench(name: &str, servers: &str, bench: impl Future<Output = ()>) {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "windrow {name} benchmark: run it with `cargo bench --bench {name}`; nothing to do here"
        );
        return;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install a SIGTERM handler");
    tokio::select! {
        () = bench => {}
        _ = tokio::signal::ctrl_c() => eprintln!("[bench] interrupted; stopping {servers}"),
        _ = term.recv() => eprintln!("[bench] terminated; stopping {servers}"),
    }
}

/// The environment variable `name` as a count (`_` and `,` allowed as digit
/// separators); `None` if unset.
///
/// # Panics
/// If it is set but not a count: a typo must not silently run the defaults.
pub fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|v| {
        v.replace(['_', ','], "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}"))
    })
}

/// Wall-clock time, Unix ms (0 if the clock is before 1970).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
