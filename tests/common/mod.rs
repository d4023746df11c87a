//! Helpers shared by the end-to-end test files (each test binary uses a subset).
#![allow(dead_code, clippy::unwrap_used)]

/// Windows as (series, field, start_ns) → (count, sum, min, max, first, last).
pub type Windows =
    std::collections::BTreeMap<(String, String, i64), (u64, f64, f64, f64, f64, f64)>;

/// One test reading: (subject, payload, device, ts_ns, value).
pub type Reading = (String, Vec<u8>, String, i64, f64);

use std::{path::Path, time::Duration};

use windrow_harness::{free_port, Mosquitto, NatsServer, RoleProcess};

/// Wall-clock time, Unix ns: readings are stamped relative to it so that they
/// fall within the store's lateness and retention.
pub fn now_ns() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_nanos()).expect("before 2262")
}

/// A start for readings of the last ten minutes that all fall in today's UTC
/// day (one store environment), however close to midnight the test runs.
pub fn base_in_today() -> i64 {
    const NS_PER_SEC: i64 = 1_000_000_000;
    const NS_PER_DAY: i64 = 86_400 * NS_PER_SEC;
    let now = now_ns();
    (now - 10 * 60 * NS_PER_SEC).max(now.div_euclid(NS_PER_DAY) * NS_PER_DAY + NS_PER_SEC)
}

/// Waits until the workers' durable consumer (`TELEMETRY`/`windrow-workers`)
/// has nothing pending or unacknowledged.
pub async fn wait_workers_settled(nats: &NatsServer, timeout: Duration) {
    windrow_harness::clients::wait_consumer_settled(
        &nats.url(),
        "TELEMETRY",
        "windrow-workers",
        timeout,
    )
    .await;
}

/// A worker configuration file in `dir` setting the consumer's ack wait.
pub fn ack_wait_config(dir: &Path, secs: u64) -> std::path::PathBuf {
    let path = dir.join("ack-wait.toml");
    std::fs::write(&path, format!("[worker]\nack_wait_secs = {secs}\n")).unwrap();
    path
}

/// A private nats-server with the workers' default stream: `TELEMETRY` on
/// `windrow.telemetry.>`, file storage, a 2-minute duplicate window.
pub async fn nats_with_telemetry_stream() -> NatsServer {
    let nats = NatsServer::start().await;
    windrow_harness::clients::create_stream(
        &nats.url(),
        "TELEMETRY",
        &["windrow.telemetry.>"],
        Duration::from_secs(120),
    )
    .await;
    nats
}

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

/// A running `windrow worker` child.
pub struct Worker {
    /// The process.
    pub process: RoleProcess,
    /// Port of /metrics, /healthz, /readyz.
    pub http_port: u16,
    /// Its data directory (kept by the test).
    pub data_dir: std::path::PathBuf,
    /// Start arguments (to restart it identically).
    pub args: Vec<String>,
}

impl Worker {
    /// Starts a worker with node id `node`, data in `data_dir`, and `extra` flags.
    pub async fn start(nats: &NatsServer, node: &str, data_dir: &Path, extra: &[&str]) -> Worker {
        let http_port = free_port();
        let mut args: Vec<String> = [
            "worker",
            "--nats-url",
            &nats.url(),
            "--node-id",
            node,
            "--data-dir",
            data_dir.to_str().expect("utf-8 path"),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
            "--series-field",
            "device",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self::spawn(args, http_port, data_dir.to_owned()).await
    }

    async fn spawn(args: Vec<String>, http_port: u16, data_dir: std::path::PathBuf) -> Worker {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = RoleProcess::spawn(
            windrow(),
            &refs,
            &[("WINDROW_NATS__SUBSCRIPTION_CAPACITY", "2000000")],
        );
        process.wait_ready(http_port, Duration::from_secs(30)).await;
        Worker {
            process,
            http_port,
            data_dir,
            args,
        }
    }

    /// Starts the same worker again after it stopped.
    pub async fn restart(self) -> Worker {
        let Worker {
            args,
            http_port,
            data_dir,
            ..
        } = self;
        Self::spawn(args, http_port, data_dir).await
    }

    /// A metric sample of this worker.
    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        metric(self.http_port, name, label).await
    }
}

/// Runs `windrow query --format json` and returns its windows as
/// (series, field, start_ns) → (count, sum, min, max, first, last).
pub async fn query_windows(
    nats: &NatsServer,
    resolution_secs: u32,
    from_ns: i64,
    to_ns: i64,
    expect_nodes: usize,
) -> Windows {
    let from = format!("{}", from_ns as f64 / 1e9);
    let to = format!("{}", to_ns as f64 / 1e9);
    let out = tokio::process::Command::new(windrow())
        .args([
            "query",
            "--nats-url",
            &nats.url(),
            "--series",
            "*",
            "--resolution-secs",
            &resolution_secs.to_string(),
            "--from",
            &from,
            "--to",
            &to,
            "--format",
            "json",
            "--expect-nodes",
            &expect_nodes.to_string(),
            "--timeout-ms",
            "20000",
        ])
        .env_remove("WINDROW_CONFIG")
        .output()
        .await
        .expect("run windrow query");
    assert!(
        out.status.success(),
        "windrow query failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_windows(&out.stdout)
}

/// Asserts equal windows: counts, min, max, first, last exactly; sums within
/// 1e-6 relative (float addition order differs between stores and merges).
pub fn assert_same(got: &Windows, want: &Windows) {
    assert_eq!(
        got.len(),
        want.len(),
        "number of windows; first got {:?}, first wanted {:?}",
        got.iter().next(),
        want.iter().next()
    );
    for (k, w) in want {
        let g = got.get(k).unwrap_or_else(|| {
            panic!(
                "window {k:?} missing; first windows present: {:?}",
                got.keys().take(3).collect::<Vec<_>>()
            )
        });
        assert_eq!(g.0, w.0, "count of {k:?}");
        assert!(
            (g.1 - w.1).abs() <= 1e-6 * w.1.abs().max(1.0),
            "sum of {k:?}: {} vs {}",
            g.1,
            w.1
        );
        assert_eq!(
            (g.2, g.3, g.4, g.5),
            (w.2, w.3, w.4, w.5),
            "min/max/first/last of {k:?}"
        );
    }
}

/// Windows from `windrow query|store scan --format json` output.
pub fn parse_windows(json: &[u8]) -> Windows {
    let doc: serde_json::Value = serde_json::from_slice(json).expect("windows JSON");
    let mut map = std::collections::BTreeMap::new();
    for w in doc["windows"].as_array().expect("windows array") {
        let key = (
            w["series"].as_str().unwrap().to_owned(),
            w["field"].as_str().unwrap().to_owned(),
            w["start_ns"].as_i64().unwrap(),
        );
        let val = (
            w["count"].as_u64().unwrap(),
            w["sum"].as_f64().unwrap(),
            w["min"].as_f64().unwrap(),
            w["max"].as_f64().unwrap(),
            w["first"].as_f64().unwrap(),
            w["last"].as_f64().unwrap(),
        );
        map.insert(key, val);
    }
    map
}

/// Test telemetry: `devices` devices, `per_device` readings each, 100 ms apart,
/// starting `base_ns`; subject `windrow.telemetry.fleet.<device>`, JSON payload
/// with device, ts (ms) and temp. Returns (subject, payload, device, ts_ns, temp).
pub fn fleet_readings(devices: usize, per_device: usize, base_ns: i64) -> Vec<Reading> {
    let mut out = Vec::with_capacity(devices * per_device);
    for k in 0..per_device {
        for d in 0..devices {
            let device = format!("d{d:05}");
            let ts_ms = base_ns / 1_000_000 + (k as i64) * 100 + (d as i64 % 100);
            let temp = ((d * 7 + k * 13) % 1000) as f64 / 10.0 - 20.0;
            let payload =
                format!("{{\"device\":\"{device}\",\"ts\":{ts_ms},\"temp\":{temp}}}").into_bytes();
            out.push((
                format!("windrow.telemetry.fleet.{device}"),
                payload,
                device,
                ts_ms * 1_000_000,
                temp,
            ));
        }
    }
    out
}

/// Independently computed 60 s / 1 s aggregates of `readings`, keyed like [`query_windows`].
pub fn expected_windows(readings: &[Reading], resolution_secs: i64) -> Windows {
    let res = resolution_secs * 1_000_000_000;
    type Acc = (u64, f64, f64, f64, (i64, f64), (i64, f64));
    let mut map: std::collections::BTreeMap<(String, String, i64), Acc> =
        std::collections::BTreeMap::new();
    for (_, _, device, ts, v) in readings {
        let start = ts.div_euclid(res) * res;
        let e = map
            .entry((device.clone(), "temp".to_owned(), start))
            .or_insert((
                0,
                0.0,
                f64::INFINITY,
                f64::NEG_INFINITY,
                (i64::MAX, 0.0),
                (i64::MIN, 0.0),
            ));
        e.0 += 1;
        e.1 += v;
        e.2 = e.2.min(*v);
        e.3 = e.3.max(*v);
        if *ts < e.4 .0 {
            e.4 = (*ts, *v);
        }
        if *ts > e.5 .0 {
            e.5 = (*ts, *v);
        }
    }
    map.into_iter()
        .map(|(k, (c, s, mn, mx, f, l))| (k, (c, s, mn, mx, f.1, l.1)))
        .collect()
}

/// Publishes readings to core NATS at about `rate` messages/s.
pub async fn publish_core(url: &str, readings: &[Reading], rate: usize) {
    let client = async_nats::connect(url).await.expect("connect publisher");
    let chunk = (rate / 100).max(1);
    for part in readings.chunks(chunk) {
        let started = std::time::Instant::now();
        for (subject, payload, _, _, _) in part {
            client
                .publish(subject.clone(), payload.clone().into())
                .await
                .expect("publish");
        }
        client.flush().await.expect("flush");
        let budget = Duration::from_millis(10);
        if let Some(rest) = budget.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

/// Publishes readings into JetStream (acknowledged, pipelined).
pub async fn publish_jetstream(url: &str, readings: &[Reading]) {
    let client = async_nats::connect(url).await.expect("connect publisher");
    let js = async_nats::jetstream::new(client);
    for part in readings.chunks(1000) {
        let mut acks = Vec::with_capacity(part.len());
        for (subject, payload, _, _, _) in part {
            acks.push(
                js.publish(subject.clone(), payload.clone().into())
                    .await
                    .expect("publish"),
            );
        }
        for a in acks {
            a.await.expect("JetStream ack");
        }
    }
}

/// Holds the LMDB write lock of the one day under `data` until `release`
/// returns, from this process, as a second writer would; `locked` is sent
/// once it is held.
pub fn hold_write_lock(data: &Path, release: impl FnOnce(), locked: std::sync::mpsc::Sender<()>) {
    let days: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("data.mdb").exists())
        .collect();
    assert_eq!(days.len(), 1, "one day in {}: {days:?}", data.display());
    let mut options = heed::EnvOpenOptions::new();
    options.map_size(1 << 30).max_dbs(4);
    // SAFETY: a local directory; this process opens it once; no database is
    // touched, the transaction is only begun and aborted.
    #[allow(unsafe_code)]
    let env = unsafe { options.open(&days[0]) }.unwrap();
    let txn = env.write_txn().unwrap();
    locked.send(()).unwrap();
    release();
    txn.abort();
}

/// Samples in all the windows.
pub fn total(w: &Windows) -> u64 {
    w.values().map(|v| v.0).sum()
}

/// Waits until the workers together applied `n` messages.
pub async fn wait_applied(workers: &[&Worker], n: f64, timeout: Duration) -> bool {
    let ports: Vec<u16> = workers.iter().map(|w| w.http_port).collect();
    windrow_harness::wait_until(timeout, || {
        let ports = ports.clone();
        async move {
            let mut sum = 0.0;
            for p in ports {
                sum += metric(p, "windrow_worker_applied_messages_total", "").await;
            }
            sum >= n
        }
    })
    .await
}

/// Polls the query plane until the merged windows hold `n` samples in all
/// (`false` after 120 s).
pub async fn wait_total(nats: &NatsServer, range: (i64, i64), nodes: usize, n: u64) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if total(&query_windows(nats, 60, range.0, range.1, nodes).await) >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}
