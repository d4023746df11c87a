//! `telemetry::init` exports spans over OTLP/HTTP to a real listener when called inside tokio.
//!
//! Its own test binary because `init` installs process-wide state and reads the environment.

#[allow(dead_code)]
#[path = "../src/telemetry.rs"]
mod telemetry;

use std::time::Duration;

use windrow_harness::OtlpCollector;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_http_collector_on_shutdown() {
    let mut collector = OtlpCollector::start();
    std::env::remove_var("OTEL_SDK_DISABLED");
    std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    std::env::remove_var("OTEL_TRACES_SAMPLER");
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url());
    std::env::set_var("OTEL_SERVICE_NAME", "windrow-telemetry-test");

    let telemetry = telemetry::init(telemetry::LogFormat::Json, "windrow-test").expect("init");
    assert!(telemetry.otlp_enabled());
    assert_eq!(telemetry.sample_ratio(), 0.01);
    tracing::info_span!("otlp_test_span", topic = "sensors/1").in_scope(|| {
        tracing::info!("inside the span");
    });
    telemetry.shutdown();

    let request = tokio::time::timeout(Duration::from_secs(10), collector.recv())
        .await
        .expect("collector got no request within 10 s")
        .expect("collector channel open");
    assert!(
        request.head.starts_with("POST /v1/traces "),
        "{}",
        request.head
    );
    assert!(request
        .head
        .to_ascii_lowercase()
        .contains("content-type: application/x-protobuf"));
    assert!(!request.body.is_empty());
    // Protobuf stores strings verbatim, so the span and service names are visible in the body.
    let contains = |needle: &[u8]| request.body.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"otlp_test_span"));
    assert!(contains(b"windrow-telemetry-test"));
}
