//! `WINDROW_BENCH_PIN=1`: the publisher and nats-server on one half of the
//! machine's CPUs, the consumer being measured on the other.
//!
//! Unpinned, on two cores, every CPU second the consumer spends is taken from
//! the publisher and the broker, so a consumer that does more work than the
//! ceiling's plain one lowers its own publish rate: the ratio then measures
//! how the three share the cores as much as what the consumer can do. Pinned,
//! the ceiling's plain consumer and the measured one get the same CPUs and the
//! broker side gets the same CPUs in both, as on a deployment where workers
//! and brokers run on different nodes. Both measurements are kept: the
//! unpinned one is the default.
//!
//! What goes where: this benchmark process (its measuring consumers, its
//! metrics polling, the replay benchmark's one-time load of the stream) and
//! the windrow roles it spawns, which inherit the affinity of the thread that
//! spawns them, on the consumer's CPUs; each nats-server once it started, and
//! the worker benchmark's publisher thread, on the brokers'.
//!
//! Both halves get the same number of CPUs (an odd one out stays unused):
//! nats-server starts on the consumer's CPUs before it is moved, and Go fixes
//! its GOMAXPROCS from the CPUs it starts on. Programs that size their thread
//! pools from their CPUs see half the machine; the windrow roles (tokio)
//! then run one runtime thread per CPU of their half.

use std::sync::OnceLock;

use windrow_harness::{allowed_cpus, pin_process, pin_this_thread, NatsServer};

/// How `WINDROW_BENCH_PIN=1` splits this process's CPUs.
#[derive(Debug)]
pub struct Pinning {
    /// For the publisher and nats-server: the first half.
    pub brokers: Vec<usize>,
    /// For the consumer being measured: the second half.
    pub consumer: Vec<usize>,
    /// The CPUs this process could use before it was pinned.
    pub machine: usize,
}

static PINNING: OnceLock<Option<Pinning>> = OnceLock::new();

/// The split chosen from `WINDROW_BENCH_PIN` on first use.
///
/// # Panics
/// If `WINDROW_BENCH_PIN` is neither unset, `0` nor `1`, or asks for pinning on
/// fewer than two CPUs.
pub fn pinning() -> Option<&'static Pinning> {
    PINNING
        .get_or_init(|| match std::env::var("WINDROW_BENCH_PIN").as_deref() {
            Err(_) | Ok("" | "0") => None,
            Ok("1") => {
                let cpus = allowed_cpus().expect("read this process's CPUs");
                assert!(
                    cpus.len() >= 2,
                    "WINDROW_BENCH_PIN=1 needs two CPUs or more; this process may use {cpus:?}"
                );
                let half = cpus.len() / 2;
                Some(Pinning {
                    brokers: cpus[..half].to_vec(),
                    consumer: cpus[half..2 * half].to_vec(),
                    machine: cpus.len(),
                })
            }
            Ok(other) => panic!("WINDROW_BENCH_PIN={other:?}: expected 1 (pin) or 0 (don't)"),
        })
        .as_ref()
}

/// Pins this whole process to the consumer's CPUs (no-op unpinned); call it
/// first, so every thread and child started later inherits them.
///
/// # Panics
/// If the kernel refuses.
pub fn pin_bench() {
    if let Some(p) = pinning() {
        pin_process(std::process::id(), &p.consumer)
            .unwrap_or_else(|e| panic!("pin the benchmark to CPUs {:?}: {e}", p.consumer));
        eprintln!(
            "[bench] pinned: publisher and nats-server on CPUs {:?}, the measured consumer on {:?}",
            p.brokers, p.consumer
        );
    }
}

/// Pins the calling thread, the publisher's, to the brokers' CPUs (no-op unpinned).
///
/// # Panics
/// If the kernel refuses.
pub fn pin_publisher() {
    if let Some(p) = pinning() {
        pin_this_thread(&p.brokers)
            .unwrap_or_else(|e| panic!("pin the publisher to CPUs {:?}: {e}", p.brokers));
    }
}

/// Starts a private nats-server ([`NatsServer::start`]) and, when pinning,
/// moves it to the brokers' CPUs: every benchmark's servers start here, so
/// none is left unpinned.
///
/// # Panics
/// As [`NatsServer::start`], or if the kernel refuses the pinning.
pub async fn start_nats() -> NatsServer {
    let nats = NatsServer::start().await;
    pin_broker(&nats);
    nats
}

/// Pins a started nats-server to the brokers' CPUs (no-op unpinned).
///
/// # Panics
/// If the server is not running or the kernel refuses.
fn pin_broker(nats: &NatsServer) {
    if let Some(p) = pinning() {
        let pid = nats.pid().expect("nats-server is running");
        pin_process(pid, &p.brokers)
            .unwrap_or_else(|e| panic!("pin nats-server ({pid}) to CPUs {:?}: {e}", p.brokers));
    }
}

/// The machine's CPUs for a report: pinning leaves this process fewer.
pub fn machine_cpus() -> usize {
    pinning().map_or_else(
        || std::thread::available_parallelism().map_or(0, |n| n.get()),
        |p| p.machine,
    )
}

/// One line for a report's header.
pub fn pinning_text() -> String {
    match pinning() {
        None => "Not pinned (`WINDROW_BENCH_PIN=1` pins): every process may use every CPU.".into(),
        Some(p) => format!(
            "**Pinned** (`WINDROW_BENCH_PIN=1`): nats-server and the worker benchmark's \
             publisher on CPUs {:?}; the measured consumer and the rest of this benchmark \
             (its polling; replay: the one-time publish) on CPUs {:?}. Core counts below \
             are still of the whole machine, but each side can use only its own CPUs.",
            p.brokers, p.consumer
        ),
    }
}
