//! Real-broker test harness for windrow's end-to-end tests.
//!
//! Every test gets its own `nats-server` ([`NatsServer`]) and `mosquitto`
//! ([`Mosquitto`]) on fresh loopback ports with their own temp dirs, so tests
//! run in parallel and never touch the machine's brokers on 1883/4222.
//! Windrow roles run as child processes ([`RoleProcess`]). Every guard waits
//! for readiness with a deadline, panics with the server log when a start
//! fails, kills its process on `Drop` without panicking, and prints the log
//! tail when dropped during a failing test.
//!
//! ```no_run
//! # async fn demo() {
//! use windrow_harness::{Mosquitto, NatsServer};
//! let nats = NatsServer::start().await;
//! let mqtt = Mosquitto::start().await;
//! println!("{} {}", nats.url(), mqtt.url());
//! # }
//! ```
//!
//! # Layout
//! - `nats.rs`: [`NatsServer`], [`NatsOptions`].
//! - `mosquitto.rs`: [`Mosquitto`], [`MosquittoOptions`].
//! - `process.rs`: child supervision shared by the guards, and [`RoleProcess`].
//! - `net.rs`: [`free_port`], [`http_get`], [`wait_until`].
//! - `tls.rs`: [`ServerTls`], the certificate files of a TLS server.
//! - `cpu.rs`: [`pin_process`], [`pin_this_thread`], [`allowed_cpus`]: CPU affinity for the benchmarks.
//! - `otlp.rs`: [`OtlpCollector`], a stand-in OTLP/HTTP collector, and the
//!   [`OtlpRequest`]s it records.
#![warn(missing_docs)]

pub mod clients;
mod cpu;
mod mosquitto;
mod nats;
mod net;
mod otlp;
mod process;
mod tls;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

pub use cpu::{allowed_cpus, pin_process, pin_this_thread};
pub use mosquitto::{Mosquitto, MosquittoOptions};
pub use nats::{NatsOptions, NatsServer};
pub use net::{free_port, http_get, wait_for_body, wait_until};
pub use otlp::{OtlpCollector, OtlpRequest};
pub use process::RoleProcess;
pub use tls::ServerTls;

/// Deadline for a first start to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline for a restart: JetStream may have to recover a large store after a kill.
const RESTART_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `stop()` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Start attempts when the port turns out to be taken ("address already in use").
const MAX_START_ATTEMPTS: u32 = 10;

/// Directories searched after `PATH`: Debian installs both servers in `/usr/sbin`,
/// which is not on a normal user's `PATH`.
const EXTRA_BIN_DIRS: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/usr/bin"];

/// How a server start ended.
#[derive(Debug)]
enum Startup {
    Ready,
    Exited(ExitStatus),
    TimedOut(String),
}

/// Finds the executable `name` on `PATH` or in `/usr/sbin`, `/usr/local/sbin`, `/usr/bin`.
///
/// # Panics
/// If it is not found, with the command that installs it, e.g. "nats-server
/// not found: install it with `sudo apt-get install -y nats-server` (the
/// README's test command does this)".
pub fn require_binary(name: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(EXTRA_BIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: install it with `sudo apt-get install -y {name}` \
                 (the README's test command does this)"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn finds_servers_and_names_the_install_command() {
        assert!(require_binary("nats-server").ends_with("nats-server"));
        assert!(require_binary("mosquitto").ends_with("mosquitto"));
        let missing = std::panic::catch_unwind(|| require_binary("windrow-no-such-server"));
        let message = *missing.unwrap_err().downcast::<String>().unwrap();
        assert_eq!(
            message,
            "windrow-no-such-server not found: install it with \
             `sudo apt-get install -y windrow-no-such-server` (the README's test command does this)"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn two_of_each_run_side_by_side() {
        let (n1, n2, m1, m2) = tokio::join!(
            NatsServer::start(),
            NatsServer::start(),
            Mosquitto::start(),
            Mosquitto::start()
        );
        let mut ports = vec![n1.port(), n2.port(), m1.port(), m2.port()];
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 4, "ports collide: {ports:?}");
        assert_ne!(n1.store_dir(), n2.store_dir());
        for port in ports {
            assert!(net::accepts(port).await, "port {port}");
            assert!(![1883, 4222].contains(&port));
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn role_process_captures_output_signals_and_exit() {
        let sh = require_binary("sh");
        let mut role = RoleProcess::spawn(
            &sh,
            &["-c", "trap 'echo bye; exit 3' TERM; echo \"log=$RUST_LOG x=$X\"; while :; do sleep 0.05; done"],
            &[("X", "1")],
        );
        assert!(
            wait_until(Duration::from_secs(5), || async {
                role.log().contains("x=1")
            })
            .await
        );
        // RUST_LOG is the runner's ROLE_LOG, else unset (the role's default).
        let want = format!("log={} x=1", std::env::var("ROLE_LOG").unwrap_or_default());
        assert!(role.log().contains(&want), "{}", role.log());
        role.sigterm().await;
        let status = role.wait_exit(Duration::from_secs(5)).await;
        assert_eq!(status.code(), Some(3));
        assert!(role.log().contains("bye"));
        role.sigterm().await; // no-op after exit
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn role_process_readiness_reports_an_exit() {
        let sh = require_binary("sh");
        let role = RoleProcess::spawn(
            &sh,
            &["-c", "echo boom >&2; exit 1"],
            &[("RUST_LOG", "debug")],
        );
        let port = free_port();
        let message = panic_message(async move {
            role.wait_ready(port, Duration::from_secs(5)).await;
        })
        .await;
        assert!(message.contains("exited with exit status: 1"), "{message}");
        assert!(message.contains("boom"), "{message}");
    }

    async fn panic_message<F>(fut: F) -> String
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match tokio::spawn(fut).await {
            Ok(_) => panic!("the future was expected to panic"),
            Err(failure) => *failure.into_panic().downcast::<String>().unwrap(),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bad_server_configs_fail_with_the_log() {
        let nats = panic_message(NatsServer::start_with(NatsOptions {
            extra_config: "this is { not valid".into(),
            ..NatsOptions::default()
        }))
        .await;
        assert!(nats.starts_with("nats-server exited with"), "{nats}");
        assert!(nats.contains("Parse error on line"), "{nats}");
        assert!(nats.contains("this is { not valid"), "{nats}");
        let mosquitto = panic_message(Mosquitto::start_with(MosquittoOptions {
            extra_config: "no_such_option 1".into(),
            ..MosquittoOptions::default()
        }))
        .await;
        assert!(
            mosquitto.starts_with("mosquitto exited with"),
            "{mosquitto}"
        );
        assert!(mosquitto.contains("no_such_option"), "{mosquitto}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn role_process_readiness_and_sigkill() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for status in [
                "503 Service Unavailable",
                "503 Service Unavailable",
                "200 OK",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let sh = require_binary("sh");
        let mut role = RoleProcess::spawn(&sh, &["-c", "exec sleep 30"], &[]);
        role.wait_ready(port, Duration::from_secs(5)).await;
        assert!(role.try_exit().is_none());
        role.sigkill().await;
        let status = role.wait_exit(Duration::from_secs(1)).await;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }
}
