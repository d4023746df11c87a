//! `windrow replay`: flags over the worker configuration, then the workers' replay.

use std::{process::ExitCode, time::Duration};

use indicatif::{HumanDuration, ProgressBar, ProgressStyle};
use windrow_workers::replay::{self, End, Progress, ReplayConfig, Start};

use crate::{
    bridge::apply_nats,
    cli::{ProgressArg, ReplayArgs},
    config_error,
    settings::Settings,
    telemetry::{self, LogFormat},
    worker::parse_time,
};

/// Runs `windrow replay`; exit 0 done, 1 failed or differences found by
/// `--verify`, 2 invalid flags or configuration, 130 interrupted.
pub async fn command(settings: &Settings, args: &ReplayArgs, log_format: LogFormat) -> ExitCode {
    let mut worker: windrow_workers::Config = match settings.role("worker") {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    apply_nats(&mut worker.nats, &args.nats);
    worker.store.dir = args.into.clone();
    if let Some(s) = &args.stream {
        worker.stream = s.clone();
    }
    if let Err(e) = worker.validate() {
        return config_error(&e);
    }
    let start = match (&args.since, args.from_seq) {
        (Some(t), _) => match parse_time(t) {
            Ok(ns) => Start::Time(ns),
            Err(e) => return config_error(&format!("--since: {e:#}")),
        },
        (None, Some(s)) => Start::Sequence(s),
        (None, None) => Start::All,
    };
    let end = match (&args.until, args.to_seq) {
        (Some(t), _) => match parse_time(t) {
            Ok(ns) => End::Time(ns),
            Err(e) => return config_error(&format!("--until: {e:#}")),
        },
        (None, Some(s)) => End::Sequence(s),
        (None, None) => End::Current,
    };
    if args.batch == 0 {
        return config_error(&"--batch: must be ≥ 1");
    }
    let telemetry = match telemetry::init(log_format, "windrow-replay") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let config = ReplayConfig {
        worker: worker.clone(),
        stream: worker.stream.clone(),
        filter: args.subject_filter.clone(),
        start,
        end,
        durable: args.durable.clone(),
        batch: args.batch,
    };
    let code = run(config, args).await;
    telemetry.shutdown();
    code
}

async fn run(config: ReplayConfig, args: &ReplayArgs) -> ExitCode {
    let worker = config.worker.clone();
    let mut show = Show::new(args.progress);
    let shutdown = crate::shutdown_on_signal();
    let summary = match replay::replay(config, |p| show.update(p), shutdown).await {
        Ok(s) => s,
        Err(e) => {
            show.finish();
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    show.finish();
    let rate = summary.messages as f64 / summary.elapsed.as_secs_f64().max(1e-9);
    println!(
        "replayed {} message(s) (sequences {}..{}) in {:.1}s, {:.0} msg/s: {} applied, {} already in the store, {} rejected{}",
        summary.messages,
        summary.first_seq.map_or("-".into(), |s| s.to_string()),
        summary.last_seq.map_or("-".into(), |s| s.to_string()),
        summary.elapsed.as_secs_f64(),
        rate,
        summary.applied,
        summary.duplicates,
        summary.rejected,
        if summary.interrupted {
            "; INTERRUPTED (run again to continue; with --durable it resumes)"
        } else {
            ""
        }
    );
    if summary.interrupted {
        return ExitCode::from(130);
    }
    if !args.verify {
        return ExitCode::SUCCESS;
    }
    let (Some(from), Some(to)) = (summary.min_ts_ns, summary.max_ts_ns) else {
        println!("verify: nothing replayed, nothing to compare");
        return ExitCode::SUCCESS;
    };
    // Windows starting up to the last sample's.
    let to = to + 1;
    match replay::verify(
        &worker,
        from,
        to,
        args.expect_nodes,
        Duration::from_secs(10),
    )
    .await
    {
        Err(e) => {
            eprintln!("error: verify: {e}");
            ExitCode::FAILURE
        }
        Ok(v) if v.differences.is_empty() => {
            println!(
                "verify: {} window(s) identical to the live fleet's merged answer ({} node(s): {:?})",
                v.windows,
                v.nodes.len(),
                v.nodes
            );
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!(
                "verify: {} of {} window(s) differ from the live fleet ({} node(s): {:?}):",
                v.differences.len(),
                v.windows,
                v.nodes.len(),
                v.nodes
            );
            for d in v.differences.iter().take(20) {
                println!(
                    "  {} {} {}s @{}: rebuilt {:?} live {:?}",
                    d.series, d.field, d.resolution_secs, d.start_ns, d.rebuilt, d.live
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// Progress display: a bar on a terminal, a log line every 5 s otherwise.
enum Show {
    Bar(ProgressBar),
    Log(std::time::Instant),
    Nothing,
}

impl Show {
    fn new(arg: ProgressArg) -> Self {
        use std::io::IsTerminal;
        let bar = match arg {
            ProgressArg::Bar => true,
            ProgressArg::Auto => std::io::stderr().is_terminal(),
            ProgressArg::Log => false,
            ProgressArg::None => return Show::Nothing,
        };
        if bar {
            let pb = ProgressBar::new(0);
            pb.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} msgs {per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Show::Bar(pb)
        } else {
            // The first line after a second, then every five.
            let now = std::time::Instant::now();
            Show::Log(now.checked_sub(Duration::from_secs(4)).unwrap_or(now))
        }
    }

    fn update(&mut self, p: Progress) {
        match self {
            Show::Bar(pb) => {
                pb.set_length(p.done.saturating_add(p.remaining.min(u64::MAX / 2)));
                pb.set_position(p.done);
            }
            Show::Log(last) => {
                if last.elapsed() >= Duration::from_secs(5) || p.remaining == 0 {
                    *last = std::time::Instant::now();
                    let eta = p
                        .eta()
                        .map_or("unknown".into(), |d| HumanDuration(d).to_string());
                    tracing::info!(
                        done = p.done,
                        remaining = p.remaining,
                        rate = format!("{:.0} msg/s", p.rate),
                        eta = %eta,
                        "replay progress"
                    );
                }
            }
            Show::Nothing => {}
        }
    }

    fn finish(&self) {
        if let Show::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }
}
