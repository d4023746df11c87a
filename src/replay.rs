//! `windrow replay`: flags over the worker configuration, then the workers' replay.

use std::process::ExitCode;

use crate::{cli::ReplayArgs, settings::Settings, telemetry::LogFormat};

/// Runs `windrow replay`.
pub async fn command(settings: &Settings, args: &ReplayArgs, log_format: LogFormat) -> ExitCode {
    let _ = (settings, args, log_format);
    eprintln!("error: windrow replay is not implemented yet");
    ExitCode::FAILURE
}
