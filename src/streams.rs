//! `windrow streams plan|apply` and `--ensure-streams`: the `[jetstream]`
//! declaration against the server.

use std::process::ExitCode;

use windrow_jetstream::NatsConfig;

use crate::{cli::StreamsArgs, settings::Settings};

/// `windrow streams plan` (`apply == false`) or `windrow streams apply`.
pub async fn command(settings: &Settings, args: &StreamsArgs, apply: bool) -> ExitCode {
    let _ = (settings, args, apply);
    eprintln!("error: windrow streams is not implemented yet");
    ExitCode::FAILURE
}

/// `--ensure-streams`: apply the declaration (never recreating) before a role starts.
///
/// # Errors
/// The declaration is invalid, the server is unreachable, or a change needs `--recreate`.
pub async fn ensure(settings: &Settings, nats: &NatsConfig) -> anyhow::Result<()> {
    let _ = (settings, nats);
    anyhow::bail!("--ensure-streams is not implemented yet")
}
