//! `windrow worker` and `windrow query`: flags over the configuration, then the workers library.

use std::{
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use windrow_workers::{
    query::{gather, QueryRequest},
    Config, Mode,
};

use crate::{
    bridge::apply_nats,
    cli::{ExportSqliteArgs, FormatArg, ModeArg, QueryArgs, WorkerArgs},
    config_error,
    settings::Settings,
};

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// The worker's configuration: the `[worker]` section, then the flags, validated.
///
/// # Errors
/// Exit code 2, after printing what is wrong (each bad key named).
pub fn config(settings: &Settings, args: &WorkerArgs) -> Result<Config, ExitCode> {
    let mut config: Config = settings.role("worker").map_err(|e| config_error(&e))?;
    apply(&mut config, args);
    config.validate().map_err(|e| config_error(&e))?;
    Ok(config)
}

/// Applies the worker flags over `c`.
fn apply(c: &mut Config, a: &WorkerArgs) {
    apply_nats(&mut c.nats, &a.nats);
    if let Some(m) = a.mode {
        c.mode = match m {
            ModeArg::Core => Mode::Core,
            ModeArg::Jetstream => Mode::Jetstream,
        };
    }
    if a.subject_filter.is_some() {
        c.subject_filter = a.subject_filter.clone();
    }
    set(&mut c.queue_group, a.queue_group.clone());
    set(&mut c.stream, a.stream.clone());
    set(&mut c.durable, a.durable.clone());
    set(&mut c.store.dir, a.data_dir.clone());
    set(&mut c.store.retention_days, a.retention_days);
    set(&mut c.batch_max_messages, a.batch_max_messages);
    set(&mut c.batch_max_wait_ms, a.batch_max_wait_ms);
    if !a.series_levels.is_empty() {
        c.decode.series_levels = a.series_levels.clone();
    }
    if !a.series_fields.is_empty() {
        c.decode.series_fields = a.series_fields.clone();
    }
    if !a.value_fields.is_empty() {
        c.decode.value_fields = a.value_fields.clone();
    }
    set(&mut c.decode.timestamp_field, a.timestamp_field.clone());
    set(&mut c.node_id, a.node_id.clone());
    if !a.supersedes.is_empty() {
        c.supersedes = a.supersedes.clone();
    }
    set(&mut c.http_listen, a.http_listen);
    set(&mut c.threads, a.threads);
    if a.no_dead_letter {
        c.dead_letter = false;
    }
}

/// Connects to NATS for a one-shot command, naming the URL on failure.
async fn connect(worker: &Config, name: &str) -> anyhow::Result<async_nats::Client> {
    windrow_jetstream::connect(&worker.nats, name, |_| async {})
        .await
        .with_context(|| format!("connecting to {}", worker.nats.url))
}

/// Parses RFC 3339 or Unix seconds into Unix ns.
pub(crate) fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(secs) = s.parse::<f64>() {
        return Ok((secs * 1e9) as i64);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{s:?} is neither RFC 3339 nor Unix seconds"))?;
    i64::try_from(t.unix_timestamp_nanos()).context("time out of range")
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Runs `windrow query`: scatter, gather, merge, print.
pub async fn query(mut worker: Config, a: &QueryArgs) -> anyhow::Result<()> {
    apply_nats(&mut worker.nats, &a.nats);
    set(&mut worker.query_subject, a.query_subject.clone());
    let to_ns =
        a.to.as_deref()
            .map(parse_time)
            .transpose()?
            .unwrap_or_else(now_ns);
    let from_ns = a
        .from
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(to_ns - 3600 * 1_000_000_000);
    let request = QueryRequest {
        series: a.series.clone(),
        field: a.field.clone(),
        resolution_secs: a.resolution_secs,
        from_ns,
        to_ns,
        latest: a.latest,
    };
    let nats = connect(&worker, "windrow-query").await?;
    let g = gather(
        &nats,
        &worker.query_subject,
        &request,
        a.expect_nodes,
        Duration::from_millis(a.timeout_ms),
    )
    .await?;
    eprintln!(
        "answered by {} node(s): {:?}{}",
        g.complete.len(),
        g.complete,
        if g.incomplete.is_empty() {
            String::new()
        } else {
            format!("; incomplete: {:?}", g.incomplete)
        }
    );
    if !g.superseded.is_empty() {
        eprintln!(
            "left out of the merge (superseded by a node that answered): {:?}",
            g.superseded
        );
    }
    for e in &g.errors {
        eprintln!("error from {e}");
    }
    if let Some(n) = a.expect_nodes {
        if g.complete.len() < n {
            bail!("expected {n} node(s), {} answered fully", g.complete.len());
        }
    }
    print_result(&g.windows, &g.latest, a.format)
}

fn print_result(
    windows: &[windrow_workers::store::WindowRow],
    latest: &[windrow_workers::store::LatestRow],
    format: FormatArg,
) -> anyhow::Result<()> {
    match format {
        FormatArg::Json => {
            let doc = serde_json::json!({ "windows": windows.iter().map(|w| serde_json::json!({
                "series": w.series, "field": w.field, "resolution_secs": w.resolution_secs, "start_ns": w.start_ns,
                "count": w.agg.count, "sum": w.agg.sum, "min": w.agg.min, "max": w.agg.max, "mean": w.agg.mean(),
                "first": w.agg.first, "first_ts_ns": w.agg.first_ts_ns, "last": w.agg.last, "last_ts_ns": w.agg.last_ts_ns,
            })).collect::<Vec<_>>(), "latest": latest });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        FormatArg::Csv => {
            println!("series,field,resolution_secs,start_ns,count,sum,min,max,mean,first,last");
            for w in windows {
                println!(
                    "{},{},{},{},{},{},{},{},{},{},{}",
                    csv_field(&w.series),
                    csv_field(&w.field),
                    w.resolution_secs,
                    w.start_ns,
                    w.agg.count,
                    w.agg.sum,
                    w.agg.min,
                    w.agg.max,
                    w.agg.mean(),
                    w.agg.first,
                    w.agg.last
                );
            }
        }
        FormatArg::Table => {
            println!(
                "{:<32} {:<12} {:>6} {:<30} {:>8} {:>12} {:>12} {:>12} {:>12}",
                "series", "field", "res_s", "start", "count", "mean", "min", "max", "last"
            );
            for w in windows {
                let start = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(w.start_ns))
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_else(|| w.start_ns.to_string());
                println!(
                    "{:<32} {:<12} {:>6} {:<30} {:>8} {:>12.4} {:>12.4} {:>12.4} {:>12.4}",
                    w.series,
                    w.field,
                    w.resolution_secs,
                    start,
                    w.agg.count,
                    w.agg.mean(),
                    w.agg.min,
                    w.agg.max,
                    w.agg.last
                );
            }
            if !latest.is_empty() {
                println!("\nlatest:");
                for l in latest {
                    println!(
                        "{:<32} {:<12} {:>20} {:>12.4}",
                        l.series, l.field, l.ts_ns, l.value
                    );
                }
            }
        }
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Runs `windrow export sqlite`: for each resolution, gather merged windows from
/// the watermark (minus the lateness) to now, upsert them, move the watermark.
pub async fn export_sqlite(mut worker: Config, a: &ExportSqliteArgs) -> anyhow::Result<()> {
    apply_nats(&mut worker.nats, &a.nats);
    let resolutions = if a.resolutions.is_empty() {
        worker.store.resolutions_secs.clone()
    } else {
        a.resolutions.clone()
    };
    let lateness_ns = a
        .lateness_secs
        .unwrap_or(worker.store.allowed_lateness_secs) as i64
        * 1_000_000_000;
    let first_from = a.from.as_deref().map(parse_time).transpose()?;
    let mut db = windrow_workers::export::sqlite::SqliteExport::open(&a.db)?;
    let nats = connect(&worker, "windrow-export").await?;
    for res in resolutions {
        let to_ns = now_ns();
        let from_ns = match db.watermark(res)? {
            Some(w) => w - lateness_ns,
            None => first_from.unwrap_or(to_ns - 86_400 * 1_000_000_000),
        };
        let request = QueryRequest {
            series: a.series.clone(),
            field: None,
            resolution_secs: res,
            from_ns,
            to_ns,
            latest: false,
        };
        let g = gather(
            &nats,
            &worker.query_subject,
            &request,
            a.expect_nodes,
            Duration::from_millis(a.timeout_ms),
        )
        .await?;
        if let Some(n) = a.expect_nodes {
            if g.complete.len() < n {
                bail!(
                    "resolution {res}s: expected {n} node(s), {} answered fully; nothing written",
                    g.complete.len()
                );
            }
        }
        if !g.errors.is_empty() {
            bail!(
                "resolution {res}s: node errors, nothing written: {:?}",
                g.errors
            );
        }
        let n = db.write(res, &g.windows, to_ns, now_ns())?;
        eprintln!(
            "resolution {res}s: {n} window(s) upserted from {} node(s); watermark {to_ns}",
            g.complete.len()
        );
    }
    Ok(())
}

/// Runs `windrow store ...` against a data directory.
pub fn store(a: &crate::cli::StoreArgs) -> anyhow::Result<()> {
    use crate::cli::StoreCommand;
    let reader = windrow_workers::store::open_read_only(&a.data_dir)
        .with_context(|| format!("opening the store in {}", a.data_dir.display()))?;
    match &a.command {
        StoreCommand::Stat => {
            for day in reader.stat()? {
                println!(
                    "{}  map {} B  file {} B  ({})",
                    day.day,
                    day.map_bytes,
                    day.file_bytes,
                    day.path.display()
                );
                for (db, entries) in &day.databases {
                    println!("  {db:<10} {entries:>12} entries");
                }
            }
        }
        StoreCommand::Get {
            series,
            resolution_secs,
            format,
        } => {
            let windows = reader.windows(series, None, *resolution_secs, i64::MIN, i64::MAX)?;
            let latest: Vec<_> = reader.latest(series)?;
            print_result(&windows, &latest, *format)?;
        }
        StoreCommand::Scan {
            series,
            field,
            resolution_secs,
            from,
            to,
            format,
        } => {
            let from_ns = from
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or(i64::MIN);
            let to_ns = to
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or(i64::MAX);
            let windows =
                reader.windows(series, field.as_deref(), *resolution_secs, from_ns, to_ns)?;
            print_result(&windows, &[], *format)?;
        }
        StoreCommand::Dump => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let n = reader.dump(&mut out)?;
            eprintln!("{n} line(s)");
        }
        StoreCommand::Backup { dir } => {
            reader.backup(dir)?;
            eprintln!("backed up to {}", dir.display());
        }
    }
    Ok(())
}
