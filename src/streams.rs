//! `windrow streams plan|apply` and `--ensure-streams`: the `[jetstream]`
//! declaration against the server.

use std::process::ExitCode;

use anyhow::Context as _;
use windrow_jetstream::{
    streams::{self, Error},
    NatsConfig,
};

use crate::{bridge::apply_nats, cli::StreamsArgs, settings::Settings};

/// Exit code of an invalid declaration or a change refused without `--recreate`.
const EXIT_REFUSED: u8 = 2;

/// What `windrow streams apply --recreate` costs, appended to refusals.
const RECREATE_HINT: &str = "run `windrow streams apply --recreate` to delete and create them \
again: a stream loses its messages and consumers, a consumer its position";

/// `windrow streams plan` (`apply == false`) or `windrow streams apply`.
///
/// Exit codes: 0 done (or nothing to do); 2 invalid declaration or a change
/// refused without `--recreate`; 1 the server could not be reached or failed.
pub async fn command(settings: &Settings, args: &StreamsArgs, apply: bool) -> ExitCode {
    let declaration = match settings.jetstream() {
        Ok(d) => d,
        Err(e) => return refused(&e),
    };
    let mut nats: NatsConfig = match settings.section("nats") {
        Ok(n) => n,
        Err(e) => return refused(&e),
    };
    apply_nats(&mut nats, &args.nats);
    let mut problems = nats.problems("nats");
    if let Err(Error::Invalid(p)) = declaration.validate() {
        problems.extend(p);
    }
    if !problems.is_empty() {
        return refused(&format!(
            "invalid configuration:\n  {}",
            problems.join("\n  ")
        ));
    }
    if declaration.is_empty() {
        println!("nothing declared in [jetstream]: no streams or consumers to manage");
        return ExitCode::SUCCESS;
    }
    for w in declaration.warnings() {
        eprintln!("warning: {w}");
    }
    let js = match jetstream(&nats).await {
        Ok(js) => js,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if apply {
        match streams::apply(&js, &declaration, args.recreate).await {
            Ok(applied) => {
                for w in &applied.warnings {
                    eprintln!("warning: {w}");
                }
                print!("{applied}");
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e),
        }
    } else {
        match streams::plan(&js, &declaration).await {
            Ok(plan) => {
                print!("{}", plan.display(args.recreate));
                let refusals = plan.refusals();
                if refusals.is_empty() || args.recreate {
                    ExitCode::SUCCESS
                } else {
                    failed(&Error::Refused(refusals))
                }
            }
            Err(e) => failed(&e),
        }
    }
}

/// `--ensure-streams`: apply the declaration (never recreating) before a role starts.
///
/// # Errors
/// `(true, _)` (exit 2) when the declaration is invalid or a change needs
/// `--recreate`; `(false, _)` (exit 1) when the server cannot be reached or fails.
pub async fn ensure(settings: &Settings, nats: &NatsConfig) -> Result<(), (bool, anyhow::Error)> {
    let declaration = settings
        .jetstream()
        .map_err(|e| (true, anyhow::Error::from(e)))?;
    if let Err(e) = declaration.validate() {
        return Err((true, e.into()));
    }
    if declaration.is_empty() {
        tracing::info!("--ensure-streams: nothing declared in [jetstream]");
        return Ok(());
    }
    for w in declaration.warnings() {
        tracing::warn!("--ensure-streams: {w}");
    }
    let js = jetstream(nats).await.map_err(|e| (false, e))?;
    let applied = match streams::apply(&js, &declaration, false).await {
        Ok(a) => a,
        Err(e) => {
            let config = e.is_config();
            let hint = if matches!(e, Error::Refused(_)) {
                format!("\n{RECREATE_HINT}")
            } else {
                String::new()
            };
            return Err((
                config,
                anyhow::Error::from(e)
                    .context(format!("applying [jetstream] on {}{hint}", nats.url)),
            ));
        }
    };
    for item in &applied.items {
        tracing::info!(item = %item.target, action = ?item.action, changes = item.changes.len(), "--ensure-streams");
    }
    Ok(())
}

/// A JetStream context on a new connection with `nats`.
async fn jetstream(nats: &NatsConfig) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = windrow_jetstream::connect(nats, "windrow-streams", |_| async {})
        .await
        .with_context(|| format!("connecting to NATS at {}", nats.url))?;
    Ok(async_nats::jetstream::new(client))
}

fn refused(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_REFUSED)
}

fn failed(e: &Error) -> ExitCode {
    match e {
        Error::Refused(_) => refused(&format!("{e}\n{RECREATE_HINT}")),
        _ if e.is_config() => refused(e),
        _ => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
