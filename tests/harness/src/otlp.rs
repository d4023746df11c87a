//! A stand-in OTLP/HTTP collector that records what exporters send it.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

/// How long [`OtlpCollector::start`] waits for its listener.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer to every request: OTLP/HTTP's success, with an empty protobuf body.
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// One request the collector received.
#[derive(Debug)]
pub struct OtlpRequest {
    /// Request line and headers, up to and including the blank line.
    pub head: String,
    /// The body (`Content-Length` bytes, or what came before the connection closed).
    pub body: Vec<u8>,
}

/// An OTLP/HTTP collector on a loopback port that answers every request with
/// 200 and hands it to the test.
///
/// It runs on a thread and runtime of its own, as a real collector runs
/// outside the process: a blocked worker in the runtime under test cannot
/// starve it. A request is handed over before it is answered, so once an
/// exporter has its 200 the request is already waiting in [`recv`](Self::recv).
/// Dropping the collector stops it.
///
/// ```no_run
/// # async fn demo() {
/// use windrow_harness::OtlpCollector;
/// let mut collector = OtlpCollector::start();
/// std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url());
/// // ... export spans ...
/// let request = collector.recv().await.expect("the collector is running");
/// assert!(request.head.starts_with("POST /v1/traces "));
/// # }
/// ```
#[derive(Debug)]
pub struct OtlpCollector {
    port: u16,
    requests: mpsc::UnboundedReceiver<OtlpRequest>,
    /// Dropped with the collector, which ends its accept loop.
    _stop: oneshot::Sender<()>,
}

impl OtlpCollector {
    /// Starts a collector on a free loopback port.
    ///
    /// # Panics
    /// If it cannot start a runtime or bind a port, or is not listening within 5 s.
    pub fn start() -> OtlpCollector {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (seen_tx, requests) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("otlp-collector".into())
            .spawn(move || {
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
                    let accept = async {
                        while let Ok((stream, _)) = listener.accept().await {
                            tokio::spawn(serve(stream, seen_tx.clone()));
                        }
                    };
                    // Cancel-safe: on stop the accept loop and any unfinished
                    // connection are dropped with the runtime.
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn the collector thread");
        let port = port_rx.recv_timeout(START_TIMEOUT).expect("collector port");
        OtlpCollector {
            port,
            requests,
            _stop: stop,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its base URL, `http://127.0.0.1:<port>`: the value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next request received; `None` once the collector has stopped.
    ///
    /// # Cancel safety
    /// Cancel-safe (wrap it in a timeout): a request is never lost by a cancelled call.
    pub async fn recv(&mut self) -> Option<OtlpRequest> {
        self.requests.recv().await
    }
}

/// Reads one HTTP/1.1 request with a `Content-Length` body, hands it over, and answers 200.
async fn serve(
    mut stream: TcpStream,
    seen: mpsc::UnboundedSender<OtlpRequest>,
) -> std::io::Result<()> {
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
    // Handed over before answering: once the exporter has its 200, the request is in the channel.
    let _ = seen.send(OtlpRequest { head, body });
    stream.write_all(RESPONSE).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_a_post_and_answers_200() {
        let mut collector = OtlpCollector::start();
        assert_eq!(
            collector.url(),
            format!("http://127.0.0.1:{}", collector.port())
        );
        let mut stream = TcpStream::connect(("127.0.0.1", collector.port()))
            .await
            .unwrap();
        stream
            .write_all(b"POST /v1/traces HTTP/1.1\r\nContent-Length: 5\r\n\r\nspans")
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, RESPONSE);
        let request = collector.recv().await.unwrap();
        assert_eq!(
            request.head,
            "POST /v1/traces HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
        );
        assert_eq!(request.body, b"spans");
    }
}
