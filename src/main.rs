//! The `windrow` binary: flags, configuration and telemetry, then a role library.

mod bridge;
mod cli;
mod replay;
mod settings;
mod streams;
mod telemetry;
mod worker;

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use windrow_jetstream::NatsConfig;

use crate::{
    cli::{BridgeArgs, Cli, Command, ConfigCommand, ExportCommand, StreamsCommand, WorkerArgs},
    settings::Settings,
    telemetry::LogFormat,
};

/// jemalloc instead of glibc's malloc. A worker allocates each batch's
/// decoded messages on its loop's thread (a few MiB per 20,000 messages) and
/// frees them on another once committed; glibc gave that memory back to the
/// kernel after every batch, and the next batch faulted it in again, zeroed,
/// page by page: about a third of the loop thread's time in core mode
/// (perf). jemalloc keeps freed pages for a while (its decay) and reuses
/// them. (mimalloc, tried first, gave them back even sooner: worse.)
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for configuration errors (nothing was started).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return config_error(&e),
    };
    match cli.command {
        // The bridge sizes its runtime from its configuration, so that is read
        // (and refused, with exit code 2) before the runtime starts.
        Command::Bridge(args) => match bridge::config(&settings, &args) {
            Ok(config) => match runtime(Threads::Workers(config.threads)) {
                Ok(rt) => rt.block_on(run_bridge(config, &settings, &args, cli.log_format)),
                Err(code) => code,
            },
            Err(code) => code,
        },
        // So does the worker.
        Command::Worker(args) => match worker::config(&settings, &args) {
            Ok(config) => {
                let threads = match config.threads {
                    1 => Threads::One,
                    n => Threads::Workers(n),
                };
                match runtime(threads) {
                    Ok(rt) => rt.block_on(run_worker(config, &settings, &args, cli.log_format)),
                    Err(code) => code,
                }
            }
            Err(code) => code,
        },
        command => match runtime(Threads::PerCore) {
            Ok(rt) => rt.block_on(dispatch(command, &settings, cli.log_format)),
            Err(code) => code,
        },
    }
}

/// The threads of a role's async runtime.
enum Threads {
    /// A multi-thread runtime with a worker thread per core.
    PerCore,
    /// A multi-thread runtime with this many worker threads; the role's own
    /// future runs on the main thread beside them.
    Workers(usize),
    /// Everything on the main thread (a current-thread runtime); blocking
    /// work still goes to tokio's blocking pool.
    One,
}

fn runtime(threads: Threads) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore | Threads::Workers(_) => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    if let Threads::Workers(n) = threads {
        builder.worker_threads(n);
    }
    builder.build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Prints a configuration error and returns exit code 2.
pub(crate) fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

async fn dispatch(command: Command, settings: &Settings, log_format: LogFormat) -> ExitCode {
    match command {
        Command::Config(ConfigCommand::Default) => {
            match toml::to_string_pretty(&settings::defaults()) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config(ConfigCommand::Check) => {
            let bridge = settings
                .role::<windrow_bridge::Config>("bridge")
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()));
            let worker = settings
                .role::<windrow_workers::Config>("worker")
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()));
            let jetstream = settings
                .jetstream()
                .map_err(|e| e.to_string())
                .and_then(|d| d.validate().map_err(|e| e.to_string()));
            let res = bridge.and(worker).and(jetstream);
            match res {
                Ok(()) => {
                    println!("configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(&e),
            }
        }
        Command::Query(args) => {
            let config: windrow_workers::Config = match settings.role("worker") {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            match worker::query(config, &args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Export(ExportCommand::Sqlite(args)) => {
            let config: windrow_workers::Config = match settings.role("worker") {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            match worker::export_sqlite(config, &args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Streams(StreamsCommand::Plan(args)) => {
            streams::command(settings, &args, false).await
        }
        Command::Streams(StreamsCommand::Apply(args)) => {
            streams::command(settings, &args, true).await
        }
        Command::Replay(args) => replay::command(settings, &args, log_format).await,
        Command::Store(args) => match worker::store(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bridge(_) | Command::Worker(_) => {
            unreachable!("main runs the bridge and the worker on runtimes of their own")
        }
    }
}

/// `windrow worker` with its validated configuration.
async fn run_worker(
    config: windrow_workers::Config,
    settings: &Settings,
    args: &WorkerArgs,
    log_format: LogFormat,
) -> ExitCode {
    let nats = config.nats.clone();
    serve(
        "windrow-worker",
        settings,
        &nats,
        args.ensure_streams,
        log_format,
        |_| async {
            let res = windrow_workers::run(config, shutdown_on_signal()).await;
            res.map_err(|e| (e.is_config(), anyhow::Error::from(e)))
        },
    )
    .await
}

/// `windrow bridge` with its validated configuration.
async fn run_bridge(
    config: windrow_bridge::Config,
    settings: &Settings,
    args: &BridgeArgs,
    log_format: LogFormat,
) -> ExitCode {
    let nats = config.nats.clone();
    serve(
        "windrow-bridge",
        settings,
        &nats,
        args.ensure_streams,
        log_format,
        |telemetry| {
            tracing::info!(
                otlp = telemetry.otlp_enabled(),
                trace_sample_ratio = telemetry.sample_ratio(),
                "starting bridge"
            );
            let ratio = telemetry.sample_ratio();
            async move {
                let res = windrow_bridge::run_with_ratio(config, shutdown_on_signal(), ratio).await;
                res.map_err(|e| (e.is_config(), anyhow::Error::from(e)))
            }
        },
    )
    .await
}

/// A long-running role around its library's `run`: telemetry up, the
/// streams ensured if asked, the role until it ends, telemetry flushed.
async fn serve<Run, Fut>(
    service: &str,
    settings: &Settings,
    nats: &NatsConfig,
    ensure_streams: bool,
    log_format: LogFormat,
    run: Run,
) -> ExitCode
where
    Run: FnOnce(&telemetry::Telemetry) -> Fut,
    Fut: std::future::Future<Output = Result<(), (bool, anyhow::Error)>>,
{
    let telemetry = match telemetry::init(log_format, service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let role = run(&telemetry);
    if ensure_streams {
        if let Err((is_config, e)) = streams::ensure(settings, nats).await {
            tracing::error!(error = format!("{e:#}"), "--ensure-streams failed");
            telemetry.shutdown();
            return exit_code(Err((is_config, e.context("--ensure-streams"))));
        }
    }
    let res = role.await;
    telemetry.shutdown();
    exit_code(res)
}

fn exit_code(res: Result<(), (bool, anyhow::Error)>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err((true, e)) => config_error(&format!("{e:#}")),
        Err((false, e)) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled on SIGTERM or SIGINT.
pub(crate) fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        t.cancel();
    });
    token
}
