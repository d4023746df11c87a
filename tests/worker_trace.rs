//! A trace begun at the bridge continues through the worker: both roles export
//! to one OTLP/HTTP collector, and the worker's spans of a message hang off the
//! bridge span whose context travelled in the message's `traceparent` header.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value,
};
use prost::Message as _;
use rumqttc::QoS;
use windrow_harness::{
    clients::{mqtt_publish, Collector},
    free_port, Mosquitto, NatsServer, OtlpCollector, OtlpRequest, RoleProcess,
};

const BRIDGE_SERVICE: &str = "windrow-trace-test-bridge";
const WORKER_SERVICE: &str = "windrow-trace-test-worker";

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct SpanRecord {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every span of an OTLP/HTTP protobuf trace export.
fn spans_of(request: &OtlpRequest) -> Vec<SpanRecord> {
    assert!(
        request.head.starts_with("POST /v1/traces "),
        "{}",
        request.head
    );
    assert!(
        request
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/x-protobuf"),
        "{}",
        request.head
    );
    let export = ExportTraceServiceRequest::decode(request.body.as_slice())
        .unwrap_or_else(|e| panic!("not an ExportTraceServiceRequest: {e}"));
    let mut out = Vec::new();
    for rs in export.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(SpanRecord {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                });
            }
        }
    }
    out
}

/// Environment that sends a role's spans to `collector`, and pins every
/// OTEL_* setting a developer's shell could otherwise change.
fn otel_env(collector: &OtlpCollector, service: &'static str) -> Vec<(&'static str, String)> {
    let base = collector.url();
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", base.clone()),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("{base}/v1/traces"),
        ),
        ("OTEL_SDK_DISABLED", "false".to_owned()),
        ("OTEL_SERVICE_NAME", service.to_owned()),
        ("OTEL_RESOURCE_ATTRIBUTES", String::new()),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on".to_owned()),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "none".to_owned()),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none".to_owned()),
        // Short batch interval: spans arrive while the roles run, not only at exit.
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
    ]
}

fn spawn_role(args: &[String], env: &[(&'static str, String)]) -> RoleProcess {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    RoleProcess::spawn(common::windrow(), &args, &env)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// (trace id, span id) of a W3C `traceparent` (`00-<trace>-<span>-<flags>`), sampled.
fn parse_traceparent(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {value:?}");
    assert_eq!(parts[0], "00", "traceparent version in {value:?}");
    assert_eq!(parts[1].len(), 32, "trace id in {value:?}");
    assert_eq!(parts[2].len(), 16, "span id in {value:?}");
    assert_eq!(parts[3], "01", "sampled flag in {value:?}");
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_begun_at_the_bridge_continues_through_fetch_apply_and_commit_in_the_worker() {
    let mut collector = OtlpCollector::start();
    let nats = NatsServer::start().await;
    let mqtt = Mosquitto::start().await;
    let data = tempfile::tempdir().unwrap();

    let worker_port = free_port();
    let worker_listen = format!("127.0.0.1:{worker_port}");
    let mut worker = spawn_role(
        &strings(&[
            "worker",
            "--nats-url",
            &nats.url(),
            "--node-id",
            "trace-node",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--http-listen",
            &worker_listen,
            "--series-field",
            "device",
        ]),
        &otel_env(&collector, WORKER_SERVICE),
    );
    worker
        .wait_ready(worker_port, Duration::from_secs(30))
        .await;

    let bridge_port = free_port();
    let bridge_listen = format!("127.0.0.1:{bridge_port}");
    let mut bridge = spawn_role(
        &strings(&[
            "bridge",
            "--nats-url",
            &nats.url(),
            "--mqtt-host",
            "127.0.0.1",
            "--mqtt-port",
            &mqtt.port().to_string(),
            "--client-id",
            "trace-bridge",
            "--http-listen",
            &bridge_listen,
            "--trace-sample-ratio",
            "1",
        ]),
        &otel_env(&collector, BRIDGE_SERVICE),
    );
    bridge
        .wait_ready(bridge_port, Duration::from_secs(20))
        .await;

    // What the worker receives, to read the traceparent the bridge injected.
    let mut on_nats = Collector::subscribe(&nats.url(), "windrow.telemetry.>").await;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let n = 5;
    let messages: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let device = format!("d{i}");
            let payload = format!("{{\"device\":\"{device}\",\"ts\":{now_ms},\"temp\":{i}.5}}");
            (format!("fleet/{device}"), payload.into_bytes())
        })
        .collect();
    mqtt_publish(
        mqtt.port(),
        "trace-publisher",
        messages,
        QoS::AtLeastOnce,
        None,
    )
    .await;

    assert_eq!(on_nats.wait_for(n, Duration::from_secs(10)).await, n);
    let mut carried: HashMap<String, String> = HashMap::new(); // trace id → bridge span id
    for m in &on_nats.messages {
        let tp = m
            .headers
            .get("traceparent")
            .unwrap_or_else(|| panic!("no traceparent on {} ({:?})", m.subject, m.headers));
        let (trace, span) = parse_traceparent(tp);
        assert!(
            carried.insert(trace.clone(), span).is_none(),
            "two messages share trace {trace}"
        );
    }
    let port = worker_port;
    assert!(
        windrow_harness::wait_until(Duration::from_secs(10), || async move {
            common::metric(port, "windrow_worker_applied_messages_total", "").await >= n as f64
        })
        .await,
        "the worker did not apply the {n} messages"
    );

    // SIGTERM: each role flushes its span exporter before exiting.
    bridge.sigterm().await;
    worker.sigterm().await;
    let bridge_exit = bridge.wait_exit(Duration::from_secs(30)).await;
    let worker_exit = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(bridge_exit.code(), Some(0), "bridge: {}", bridge.log());
    assert_eq!(worker_exit.code(), Some(0), "worker: {}", worker.log());

    let mut spans = Vec::new();
    while let Ok(Some(request)) =
        tokio::time::timeout(Duration::from_secs(1), collector.recv()).await
    {
        spans.extend(spans_of(&request));
    }
    let by_id: HashMap<&str, &SpanRecord> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let summary = || {
        spans
            .iter()
            .map(|s| {
                format!(
                    "{} {} trace={} span={} parent={}",
                    s.service, s.name, s.trace_id, s.span_id, s.parent_span_id
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    for (trace, bridge_span) in &carried {
        let forward = by_id.get(bridge_span.as_str()).unwrap_or_else(|| {
            panic!(
                "the span {bridge_span} named in traceparent was not exported; spans:\n{}",
                summary()
            )
        });
        assert_eq!(forward.service, BRIDGE_SERVICE, "{forward:?}");
        assert_eq!(forward.name, "bridge.forward", "{forward:?}");
        assert_eq!(&forward.trace_id, trace, "{forward:?}");

        let in_trace: Vec<&SpanRecord> = spans.iter().filter(|s| &s.trace_id == trace).collect();
        for name in ["worker.fetch", "worker.apply", "worker.commit"] {
            let found: Vec<&&SpanRecord> = in_trace.iter().filter(|s| s.name == name).collect();
            assert_eq!(
                found.len(),
                1,
                "{name} spans in trace {trace}; spans:\n{}",
                summary()
            );
            let span = found[0];
            assert_eq!(span.service, WORKER_SERVICE, "{span:?}");
            assert_eq!(
                &span.parent_span_id,
                bridge_span,
                "{name} must be a child of the bridge span in traceparent; spans:\n{}",
                summary()
            );
        }
    }
    // Every worker span belongs to one of the bridge's traces: no orphan roots.
    let traces: HashSet<&String> = carried.keys().collect();
    for s in spans.iter().filter(|s| s.service == WORKER_SERVICE) {
        assert!(
            s.name.starts_with("worker.") && traces.contains(&s.trace_id),
            "unexpected worker span {s:?}"
        );
    }
}
