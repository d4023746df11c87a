//! Reading a live worker's store with `windrow store`, and `windrow export sqlite`.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{expected_windows, fleet_readings, publish_core, Worker};
use windrow_harness::{wait_until, NatsServer};

async fn windrow(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(common::windrow())
        .args(args)
        .env_remove("WINDROW_CONFIG")
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_commands_read_a_live_store_and_export_is_idempotent() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let worker = Worker::start(&nats, "node", &data, &[]).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let base = now - 20 * 60 * 1_000_000_000;
    let readings = fleet_readings(100, 50, base);
    publish_core(&nats.url(), &readings, 50_000).await;
    let port = worker.http_port;
    assert!(
        wait_until(Duration::from_secs(60), || async move {
            common::metric(port, "windrow_worker_applied_messages_total", "").await >= 5000.0
        })
        .await
    );
    let d = data.to_str().unwrap();

    // While the worker still runs and holds the store open.
    let (ok, out, err) = windrow(&["store", "--data-dir", d, "stat"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("windows") && out.contains("applied"), "{out}");
    let (ok, out, err) = windrow(&[
        "store",
        "--data-dir",
        d,
        "get",
        "d00042",
        "--format",
        "json",
    ])
    .await;
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want = expected_windows(&readings, 60);
    let want_42: Vec<_> = want.iter().filter(|(k, _)| k.0 == "d00042").collect();
    assert_eq!(doc["windows"].as_array().unwrap().len(), want_42.len());
    assert_eq!(doc["latest"].as_array().unwrap().len(), 1);
    let (ok, out, err) = windrow(&[
        "store",
        "--data-dir",
        d,
        "scan",
        "--series",
        "d0001*",
        "--format",
        "csv",
    ])
    .await;
    assert!(ok, "{err}");
    let rows = out.lines().count() - 1;
    assert_eq!(
        rows,
        want.keys().filter(|k| k.0.starts_with("d0001")).count()
    );
    let backup = dir.path().join("backup");
    let (ok, _, err) =
        windrow(&["store", "--data-dir", d, "backup", backup.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let (ok, out, _) = windrow(&["store", "--data-dir", backup.to_str().unwrap(), "dump"]).await;
    assert!(ok);
    assert!(out.lines().count() >= want.len());

    // Export twice: the second run adds nothing twice.
    let db = dir.path().join("windows.db");
    let from = format!("{}", (base - 3_600_000_000_000) / 1_000_000_000);
    for _ in 0..2 {
        let (ok, _, err) = windrow(&[
            "export",
            "sqlite",
            "--nats-url",
            &nats.url(),
            "--db",
            db.to_str().unwrap(),
            "--resolution-secs",
            "60",
            "--from",
            &from,
            "--expect-nodes",
            "1",
        ])
        .await;
        assert!(ok, "{err}");
    }
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (rows, total): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), SUM(count) FROM windows WHERE resolution_secs = 60",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows as usize, want.len());
    assert_eq!(total, 5000);
    let watermark: i64 = conn
        .query_row(
            "SELECT exported_to_ns FROM export_watermark WHERE resolution_secs = 60",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(watermark >= now);
}
