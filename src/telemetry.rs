//! Process-wide logs and traces for the `windrow` binary.
//!
//! Only the binary installs subscribers; the role libraries just emit. Logs go to stderr, and spans
//! also go to an OTLP/HTTP collector when the standard `OTEL_*` variables ask for it, so operators
//! configure windrow like any other OpenTelemetry service.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Key;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::{EnvResourceDetector, ResourceDetector as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

/// Upper bound on the final span flush, so an unreachable collector cannot hold up exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Share of messages traced when OTLP is on but `OTEL_TRACES_SAMPLER` is unset: tracing every
/// message at bridge rates would cost more than the work being traced.
const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

/// Format of the log lines written to stderr.
#[derive(
    Clone,
    Copy,
    Debug,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
    PartialEq,
    Eq,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable single lines, coloured on a terminal: for people at a console.
    #[default]
    Pretty,
    /// One JSON object per line: for log collectors, e.g. in Kubernetes.
    Json,
}

/// What [`init`] found in the environment, kept so the roles can size their head sampling and
/// so `main` can flush buffered spans before exit.
///
/// Dropping it without [`Telemetry::shutdown`] still flushes (the SDK does so on drop), but
/// without a bound on how long that takes.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    sample_ratio: f64,
}

impl Telemetry {
    /// Fraction of messages (0.0–1.0) the roles should trace.
    ///
    /// The roles sample at the head themselves so that an untraced message creates no span at
    /// all; 0.0 when OTLP export is off. Read from `OTEL_TRACES_SAMPLER`/`_ARG`, 0.01 when unset.
    pub fn sample_ratio(&self) -> f64 {
        self.sample_ratio
    }

    /// Whether spans are exported over OTLP, i.e. whether tracing a message has any effect.
    pub fn otlp_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes buffered spans and stops the exporter; call once before exit.
    ///
    /// Blocks the calling thread for at most a few seconds. The export itself runs on the batch
    /// processor's own thread, so this is safe to call from inside a tokio runtime. A failed
    /// flush is logged, not returned: losing the last spans must not change the exit code.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                tracing::warn!(%error, "flushing spans to the OTLP collector failed");
            }
        }
    }
}

/// The log filter when `RUST_LOG` is unset: `info`, plus async-nats's
/// connection attempts. async-nats reports a failed attempt to the client only
/// by its kind ("IO error" for a refused connection and for an untrusted TLS
/// certificate alike); the cause is in its connector's debug line, one per
/// attempt.
pub const DEFAULT_LOG_FILTER: &str = "info,async_nats::connector=debug";

/// Installs the global tracing subscriber and the W3C trace-context propagator.
///
/// Logs go to stderr in `format`, filtered by `RUST_LOG` (default
/// [`DEFAULT_LOG_FILTER`]). When
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and
/// `OTEL_SDK_DISABLED` is not `true`, spans at `info` and above are also exported over
/// OTLP/HTTP protobuf as service `OTEL_SERVICE_NAME` (else `service.name` from
/// `OTEL_RESOURCE_ATTRIBUTES`, else `default_service`). The export has its own level filter, not
/// `RUST_LOG`: quieting the logs must not drop the spans whose context travels in NATS headers.
/// The SDK sampler is `ParentBased(AlwaysOn)`: the roles choose which messages to trace, and a
/// span whose remote parent was sampled is kept.
///
/// # Errors
/// If `RUST_LOG` does not parse, the OTLP exporter cannot be built, or a global subscriber is
/// already installed (call this once per process).
pub fn init(format: LogFormat, default_service: &str) -> anyhow::Result<Telemetry> {
    let var = |name| std::env::var(name).ok();
    let enabled = otlp_enabled_from(
        var("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").as_deref(),
        var("OTEL_SDK_DISABLED").as_deref(),
    );
    let (sample_ratio, sampler_problem) = sample_ratio_from(
        enabled,
        var("OTEL_TRACES_SAMPLER").as_deref(),
        var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
    );
    let service = service_name(var("OTEL_SERVICE_NAME"), default_service);
    let filter = match var("RUST_LOG").filter(|v| !v.trim().is_empty()) {
        Some(directives) => EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse(directives)
            .context("RUST_LOG: invalid filter directive")?,
        None => EnvFilter::new(DEFAULT_LOG_FILTER),
    };
    let provider = enabled.then(|| tracer_provider(&service)).transpose()?;
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("windrow"))
            .with_filter(LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(fmt_layer(format).with_filter(filter))
        .with(otel_layer)
        .try_init()
        .context("installing the global tracing subscriber (telemetry::init called twice?)")?;
    // Always, so that trace context read from MQTT/NATS headers is passed on even when this
    // process exports nothing itself.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(problem) = sampler_problem {
        tracing::warn!(%problem, sample_ratio, "ignoring invalid sampler setting");
    }
    tracing::info!(otlp_enabled = enabled, %service, sample_ratio, "telemetry initialised");
    Ok(Telemetry {
        provider,
        sample_ratio,
    })
}

fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => layer.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => layer.json().boxed(),
    }
}

fn tracer_provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    // Endpoint, headers, timeout and compression come from the OTEL_EXPORTER_OTLP_* variables.
    // The blocking client is built on a thread of its own and used only from the batch
    // processor's thread, so neither touches the caller's tokio runtime.
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .context("building the OTLP/HTTP span exporter from OTEL_EXPORTER_OTLP_*")?;
    // Resource::builder() reads OTEL_RESOURCE_ATTRIBUTES; the service name set here wins over it.
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .build())
}

fn service_name(otel_service_name: Option<String>, default_service: &str) -> String {
    otel_service_name
        .filter(|name| !name.is_empty())
        .or_else(|| {
            let attributes = EnvResourceDetector::new().detect();
            attributes
                .get(&Key::new("service.name"))
                .map(|name| name.to_string())
        })
        .unwrap_or_else(|| default_service.to_owned())
}

/// Empty values count as unset, as the OpenTelemetry environment specification requires.
fn otlp_enabled_from(
    endpoint: Option<&str>,
    traces_endpoint: Option<&str>,
    sdk_disabled: Option<&str>,
) -> bool {
    let set = |value: Option<&str>| value.is_some_and(|v| !v.trim().is_empty());
    let disabled = sdk_disabled.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    (set(endpoint) || set(traces_endpoint)) && !disabled
}

/// The ratio the roles trace at, and a description of any setting that had to be ignored.
fn sample_ratio_from(
    otlp_enabled: bool,
    sampler: Option<&str>,
    arg: Option<&str>,
) -> (f64, Option<String>) {
    if !otlp_enabled {
        return (0.0, None);
    }
    let Some(sampler) = sampler.map(str::trim).filter(|s| !s.is_empty()) else {
        return (DEFAULT_SAMPLE_RATIO, None);
    };
    match sampler.to_ascii_lowercase().as_str() {
        "always_on" | "parentbased_always_on" => (1.0, None),
        "always_off" | "parentbased_always_off" => (0.0, None),
        "traceidratio" | "parentbased_traceidratio" => {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => (1.0, None),
                Some(arg) => match arg.parse::<f64>() {
                    Ok(ratio) if (0.0..=1.0).contains(&ratio) => (ratio, None),
                    _ => (
                        1.0,
                        Some(format!(
                            "OTEL_TRACES_SAMPLER_ARG: must be in [0, 1], got {arg:?}"
                        )),
                    ),
                },
            }
        }
        _ => (
            DEFAULT_SAMPLE_RATIO,
            Some(format!("OTEL_TRACES_SAMPLER: unsupported, got {sampler:?}")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(sampler: Option<&str>, arg: Option<&str>) -> f64 {
        sample_ratio_from(true, sampler, arg).0
    }

    #[test]
    fn sample_ratio_is_zero_when_otlp_is_off() {
        assert_eq!(
            sample_ratio_from(false, Some("always_on"), None),
            (0.0, None)
        );
    }

    #[test]
    fn sample_ratio_defaults_to_one_percent_when_sampler_is_unset() {
        assert_eq!(ratio(None, Some("0.5")), 0.01);
        assert_eq!(ratio(Some(""), None), 0.01);
    }

    #[test]
    fn always_samplers_give_all_or_nothing() {
        assert_eq!(ratio(Some("always_on"), None), 1.0);
        assert_eq!(ratio(Some("parentbased_always_on"), Some("0.2")), 1.0);
        assert_eq!(ratio(Some("always_off"), None), 0.0);
        assert_eq!(ratio(Some("parentbased_always_off"), None), 0.0);
    }

    #[test]
    fn ratio_samplers_take_the_argument_and_default_to_one() {
        assert_eq!(ratio(Some("traceidratio"), Some("0.25")), 0.25);
        assert_eq!(ratio(Some("parentbased_traceidratio"), Some(" 0.5 ")), 0.5);
        assert_eq!(ratio(Some("traceidratio"), None), 1.0);
    }

    #[test]
    fn invalid_settings_fall_back_and_are_reported() {
        for arg in ["1.5", "-0.1", "NaN", "half"] {
            let (ratio, problem) = sample_ratio_from(true, Some("traceidratio"), Some(arg));
            assert_eq!(ratio, 1.0, "{arg}");
            assert!(problem.is_some(), "{arg}");
        }
        let (ratio, problem) = sample_ratio_from(true, Some("jaeger_remote"), None);
        assert_eq!(ratio, 0.01);
        assert!(problem.is_some());
    }

    #[test]
    fn otlp_needs_an_endpoint_and_no_sdk_disable() {
        assert!(otlp_enabled_from(Some("http://c:4318"), None, None));
        assert!(otlp_enabled_from(
            None,
            Some("http://c:4318/v1/traces"),
            Some("false")
        ));
        assert!(!otlp_enabled_from(None, None, None));
        assert!(!otlp_enabled_from(Some(""), None, None));
        assert!(!otlp_enabled_from(
            Some("http://c:4318"),
            None,
            Some("TRUE")
        ));
    }

    #[test]
    fn service_name_prefers_the_environment() {
        assert_eq!(service_name(Some("svc".into()), "windrow-bridge"), "svc");
    }
}
