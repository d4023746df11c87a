//! Helpers shared by the end-to-end test files (each test binary uses a subset).
#![allow(dead_code)]

use std::{path::Path, time::Duration};

use windrow_harness::{free_port, Mosquitto, NatsServer, RoleProcess};

/// The `windrow` binary cargo built for these tests.
pub fn windrow() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_windrow"))
}

/// A running `windrow bridge` child and its metrics port.
pub struct Bridge {
    /// The process.
    pub process: RoleProcess,
    /// Port of /metrics, /healthz, /readyz.
    pub http_port: u16,
    /// The arguments it was started with (to restart it identically).
    pub args: Vec<String>,
}

impl Bridge {
    /// Starts a bridge between `mqtt` and `nats` with client id `client_id` and
    /// `extra` flags, and waits until it is ready.
    pub async fn start(
        nats: &NatsServer,
        mqtt: &Mosquitto,
        client_id: &str,
        extra: &[&str],
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
            client_id,
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self::spawn(args, http_port).await
    }

    async fn spawn(args: Vec<String>, http_port: u16) -> Bridge {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = RoleProcess::spawn(windrow(), &refs, &[]);
        process.wait_ready(http_port, Duration::from_secs(20)).await;
        Bridge {
            process,
            http_port,
            args,
        }
    }

    /// Starts the same bridge again (same identity, same port) after it stopped.
    pub async fn restart(self) -> Bridge {
        let Bridge {
            args, http_port, ..
        } = self;
        Self::spawn(args, http_port).await
    }

    /// The value of the first sample of metric `name` whose line contains `label`.
    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        metric(self.http_port, name, label).await
    }
}

/// Reads a metric sample from a /metrics endpoint (0 if absent).
pub async fn metric(port: u16, name: &str, label: &str) -> f64 {
    let (_, body) = windrow_harness::http_get(port, "/metrics")
        .await
        .expect("GET /metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// `n` messages over `topics` topics, each payload a JSON object whose `seq`
/// field is the message's index, so that loss and duplication are countable.
pub fn numbered_messages(n: usize, topics: &[String]) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let topic = topics[i % topics.len()].clone();
            let payload = format!("{{\"seq\":{i},\"value\":{}.5}}", i % 100).into_bytes();
            (topic, payload)
        })
        .collect()
}

/// Extracts `seq` from a payload made by [`numbered_messages`].
pub fn seq_of(payload: &[u8]) -> usize {
    let text = std::str::from_utf8(payload).expect("utf-8 payload");
    let start = text.find("\"seq\":").expect("seq field") + 6;
    let end = start + text[start..].find(',').expect("seq end");
    text[start..end].parse().expect("seq number")
}

/// Counts how often each seq in 0..n occurs; returns (missing, duplicated).
pub fn tally(n: usize, seqs: impl IntoIterator<Item = usize>) -> (Vec<usize>, usize) {
    let mut counts = vec![0u32; n];
    for s in seqs {
        counts[s] += 1;
    }
    let missing = (0..n).filter(|i| counts[*i] == 0).collect();
    let dups = counts.iter().map(|c| c.saturating_sub(1) as usize).sum();
    (missing, dups)
}
