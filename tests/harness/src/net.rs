//! Ports, raw HTTP and polling.

use std::{
    future::Future,
    io,
    net::{Ipv4Addr, TcpListener},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{sleep, Instant},
};

/// How often every wait in the harness polls.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Upper bound for one [`http_get`] exchange.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Ports of the brokers installed on the machine; a test must never touch them.
const RESERVED_PORTS: [u16; 2] = [1883, 4222];

/// Returns a loopback port that was free a moment ago (never 1883 or 4222).
///
/// Another process may take it before the caller binds it: callers that start
/// a server retry with a new port on "address already in use".
///
/// # Panics
/// If no loopback port can be bound at all.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("cannot read the address of 127.0.0.1:0: {e}"))
            .port();
        if !RESERVED_PORTS.contains(&port) {
            return port;
        }
    }
}

/// Polls `cond` every 20 ms until it returns true or `timeout` passes; returns whether it became true.
///
/// `cond` is evaluated at least once, and once more at the deadline.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

/// Polls `GET path` on `127.0.0.1:port` until its body contains `needle`
/// or `timeout` passes; returns whether it did.
pub async fn wait_for_body(port: u16, path: &str, needle: &str, timeout: Duration) -> bool {
    wait_until(timeout, || async move {
        http_get(port, path)
            .await
            .is_ok_and(|(_, body)| body.contains(needle))
    })
    .await
}

/// GETs `path` on `127.0.0.1:port` with a raw HTTP/1.1 request; returns (status, body).
///
/// Sends `Connection: close` and reads to EOF; a chunked body is decoded.
///
/// # Errors
/// Connection or I/O errors, a malformed response (`InvalidData`), or no
/// complete response within 10 s (`TimedOut`).
pub async fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    match tokio::time::timeout(HTTP_TIMEOUT, exchange(port, path)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("GET {path} on 127.0.0.1:{port}: no response within {HTTP_TIMEOUT:?}"),
        )),
    }
}

async fn exchange(port: u16, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: windrow-harness\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    parse_response(&response)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Splits a complete HTTP/1.1 response into status and decoded body.
fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("response without end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let chunked = lines.any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        decode_chunked(body)?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn decode_chunked(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("chunk size line without CRLF"))?;
        let size_line = String::from_utf8_lossy(&rest[..eol]);
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|e| invalid(format!("bad chunk size {size_hex:?}: {e}")))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| invalid("truncated chunk"))?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

/// Connects to `127.0.0.1:port` and reads until the first line is complete (or 2 s pass).
pub(crate) async fn first_line(port: u16) -> io::Result<String> {
    let read = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        while !buf.contains(&b'\n') {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no first line within 2 s",
            ))
        })
}

/// Whether a TCP connect to `127.0.0.1:port` succeeds.
pub(crate) async fn accepts(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready";
        assert_eq!(parse_response(plain).unwrap(), (503, "not ready".into()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "abcde".into()));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn free_port_is_never_a_broker_port() {
        for _ in 0..100 {
            assert!(!RESERVED_PORTS.contains(&free_port()));
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn wait_until_reports_success_and_timeout() {
        let mut calls = 0;
        assert!(
            wait_until(Duration::from_secs(1), || {
                calls += 1;
                let done = calls >= 3;
                async move { done }
            })
            .await
        );
        assert!(!wait_until(Duration::from_millis(50), || async { false }).await);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn http_get_talks_to_a_raw_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                .await
                .unwrap();
            req
        });
        assert_eq!(
            http_get(port, "/healthz").await.unwrap(),
            (200, "ok\n".into())
        );
        assert!(server
            .await
            .unwrap()
            .starts_with("GET /healthz HTTP/1.1\r\n"));
    }
}
