//! `telemetry::init` exports spans over OTLP/HTTP to a real listener when called inside tokio.
//!
//! Its own test binary because `init` installs process-wide state and reads the environment.

#[allow(dead_code)]
#[path = "../src/telemetry.rs"]
mod telemetry;

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// One request as the collector saw it.
#[derive(Debug)]
struct Request {
    head: String,
    body: Vec<u8>,
}

/// Reads one HTTP/1.1 request with a `Content-Length` body and answers 200.
async fn serve(mut stream: TcpStream, seen: mpsc::UnboundedSender<Request>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        if stream.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    let body = buf[head_end..].to_vec();
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await?;
    let _ = seen.send(Request { head, body });
    Ok(())
}

/// Runs the collector on a runtime of its own, as a real collector would be outside the process,
/// so that a blocked worker in the runtime under test cannot starve it.
fn start_collector() -> (u16, mpsc::UnboundedReceiver<Request>) {
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("collector runtime");
        runtime.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind collector");
            port_tx
                .send(listener.local_addr().expect("local addr").port())
                .expect("send port");
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, seen_tx.clone()));
            }
        });
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("collector port");
    (port, seen_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_http_collector_on_shutdown() {
    let (port, mut seen) = start_collector();
    std::env::remove_var("OTEL_SDK_DISABLED");
    std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    std::env::remove_var("OTEL_TRACES_SAMPLER");
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    );
    std::env::set_var("OTEL_SERVICE_NAME", "windrow-telemetry-test");

    let telemetry = telemetry::init(telemetry::LogFormat::Json, "windrow-test").expect("init");
    assert!(telemetry.otlp_enabled());
    assert_eq!(telemetry.sample_ratio(), 0.01);
    tracing::info_span!("otlp_test_span", topic = "sensors/1").in_scope(|| {
        tracing::info!("inside the span");
    });
    telemetry.shutdown();

    let request = tokio::time::timeout(Duration::from_secs(10), seen.recv())
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
