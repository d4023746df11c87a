//! A private `mosquitto` per test.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tempfile::TempDir;
use tokio::time::{sleep, Instant};

use crate::{
    net::{accepts, free_port, POLL_INTERVAL},
    process::{
        log_len, print_tail_if_panicking, read_log, read_log_from, startup_failure, Supervised,
    },
    require_binary, ServerTls, Startup, MAX_START_ATTEMPTS, READY_TIMEOUT, RESTART_READY_TIMEOUT,
    STOP_GRACE,
};

/// Logged by mosquitto 2.0 once every listener is open ("mosquitto version 2.0.11 running").
const READY_MARKER: &str = " running";

/// Settings for [`Mosquitto::start_with`].
#[derive(Debug, Clone)]
pub struct MosquittoOptions {
    /// `max_queued_messages` per client; `None` keeps mosquitto's default (1000,
    /// beyond which it silently drops). Default: 10,000,000.
    pub max_queued_messages: Option<u32>,
    /// `max_inflight_messages` per client; `None` keeps mosquitto's default (20). Default: `None`.
    pub max_inflight_messages: Option<u32>,
    /// Persists sessions and queued messages in the guard's temp dir, saved
    /// every second and on SIGTERM. Default: true.
    pub persistence: bool,
    /// Appended raw to the generated config file. Default: empty.
    pub extra_config: String,
}

impl Default for MosquittoOptions {
    fn default() -> Self {
        Self {
            max_queued_messages: Some(10_000_000),
            max_inflight_messages: None,
            persistence: true,
            extra_config: String::new(),
        }
    }
}

/// A running `mosquitto` on a private loopback port with its own temp dir.
///
/// The port and the persistence file survive [`restart`](Self::restart).
/// Dropping the guard kills the broker (SIGKILL) and, if the test is
/// panicking, prints the tail of the broker log.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Supervised>,
    bin: PathBuf,
    port: u16,
    opts: MosquittoOptions,
    /// The TLS listener's settings and port (0 until picked).
    tls: Option<(ServerTls, u16)>,
    config_path: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    dir: TempDir,
}

impl Mosquitto {
    /// Starts a broker with [`MosquittoOptions::default`] and waits until it accepts connections.
    ///
    /// # Panics
    /// As [`start_with`](Self::start_with).
    pub async fn start() -> Mosquitto {
        Self::start_with(MosquittoOptions::default()).await
    }

    /// Starts a broker with `opts` and waits until it accepts connections.
    ///
    /// Mosquitto cannot pick its own port, so this tries ports from
    /// [`free_port`] until one is not taken by the time the broker binds it.
    ///
    /// # Panics
    /// If `mosquitto` is not installed, or it exits for another reason or is
    /// not ready within 10 s (the message holds the broker log).
    pub async fn start_with(opts: MosquittoOptions) -> Mosquitto {
        Self::start_inner(opts, None).await
    }

    /// Starts a broker with `opts` and a second, TLS-only listener (requiring a
    /// client certificate if `tls.verify_clients`) on [`tls_port`](Self::tls_port),
    /// and waits until both accept connections.
    ///
    /// The plain listener on [`port`](Self::port) stays, so that test publishers
    /// and subscribers need no TLS; give the client under test only `tls_port`.
    /// Both ports and TLS survive [`restart`](Self::restart).
    ///
    /// # Panics
    /// As [`start_with`](Self::start_with) (a bad certificate or key makes the
    /// broker exit during start-up; the message holds its log).
    pub async fn start_with_tls(opts: MosquittoOptions, tls: ServerTls) -> Mosquitto {
        Self::start_inner(opts, Some(tls)).await
    }

    async fn start_inner(opts: MosquittoOptions, tls: Option<ServerTls>) -> Mosquitto {
        let bin = require_binary("mosquitto");
        let dir = tempfile::Builder::new()
            .prefix("windrow-mosquitto-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for mosquitto: {e}"));
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", data_dir.display()));
        let mut broker = Mosquitto {
            child: None,
            bin,
            port: 0,
            opts,
            tls: tls.map(|t| (t, 0)),
            config_path: dir.path().join("mosquitto.conf"),
            data_dir,
            log_path: dir.path().join("mosquitto.log"),
            dir,
        };
        broker.launch(READY_TIMEOUT, true).await;
        tracing::debug!(port = broker.port, "mosquitto started");
        broker
    }

    /// The broker URL, `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.host(), self.port)
    }

    /// The broker host, `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The broker port (plain MQTT).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS listener's port, if started with [`start_with_tls`](Self::start_with_tls).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls.as_ref().map(|(_, port)| *port)
    }

    /// The persistence directory (holds `mosquitto.db`), kept across restarts.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The guard's temp dir (config, log, persistence).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while a broker process is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Supervised::pid)
    }

    /// Kills the broker with SIGKILL and waits for it to exit.
    ///
    /// With persistence on, changes since the last autosave (≤ 1 s) are lost.
    ///
    /// # Panics
    /// If it survives SIGKILL for 10 s.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await;
        }
    }

    /// Stops the broker with SIGTERM (it saves its database) and waits for it
    /// to exit (SIGKILL after 10 s).
    ///
    /// # Panics
    /// If it survives SIGKILL for 10 s.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.terminate(STOP_GRACE).await;
        }
    }

    /// Starts the broker again on the same port with the same config and
    /// persistence dir, and waits until it accepts connections; stops it first
    /// (as [`stop`](Self::stop)) if it is running.
    ///
    /// # Panics
    /// If it exits or is not ready within 30 s; the message holds the broker log.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch(RESTART_READY_TIMEOUT, false).await;
    }

    /// The broker log so far, across restarts.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    fn failure(&self, what: &str) -> String {
        startup_failure("mosquitto", what, &self.config_path, &self.log_path)
    }

    fn write_config(&self) {
        let o = &self.opts;
        let mut c = String::from("# written by windrow-harness\n");
        let _ = writeln!(c, "listener {} 127.0.0.1", self.port);
        c.push_str("allow_anonymous true\n");
        // Started as root, mosquitto 2.0 switches to user `mosquitto`, which
        // cannot write into our 0700 temp dir; `root` means "stay" and is
        // ignored when not running as root.
        c.push_str("user root\n");
        if let Some(n) = o.max_queued_messages {
            let _ = writeln!(c, "max_queued_messages {n}");
        }
        c.push_str("max_queued_bytes 0\n");
        if let Some(n) = o.max_inflight_messages {
            let _ = writeln!(c, "max_inflight_messages {n}");
        }
        let _ = writeln!(c, "persistence {}", o.persistence);
        if o.persistence {
            let _ = writeln!(c, "persistence_location {}/", self.data_dir.display());
            c.push_str("autosave_interval 1\n");
        }
        let _ = writeln!(c, "log_dest file {}", self.log_path.display());
        for kind in ["error", "warning", "notice", "information"] {
            let _ = writeln!(c, "log_type {kind}");
        }
        c.push_str("log_timestamp_format %Y-%m-%dT%H:%M:%S\n");
        c.push_str(&o.extra_config);
        c.push('\n');
        if let Some((tls, port)) = &self.tls {
            // Last, so that listener options in `extra_config` keep applying to
            // the plain listener; cafile..require_certificate apply to this one.
            let _ = writeln!(c, "listener {port} 127.0.0.1");
            let _ = writeln!(c, "cafile {}", tls.ca_file.display());
            let _ = writeln!(c, "certfile {}", tls.cert_file.display());
            let _ = writeln!(c, "keyfile {}", tls.key_file.display());
            let _ = writeln!(c, "require_certificate {}", tls.verify_clients);
        }
        std::fs::write(&self.config_path, c)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config_path.display()));
    }

    /// Starts the process and waits until it is ready; on "address already in
    /// use" retries, with a new port if `new_port` (first start) or after a pause.
    async fn launch(&mut self, timeout: Duration, new_port: bool) {
        for attempt in 1..=MAX_START_ATTEMPTS {
            if new_port {
                self.port = free_port();
                if let Some((_, tls_port)) = self.tls.as_mut() {
                    *tls_port = loop {
                        let p = free_port();
                        if p != self.port {
                            break p;
                        }
                    };
                }
            }
            self.write_config();
            let offset = log_len(&self.log_path);
            let mut cmd = Command::new(&self.bin);
            cmd.arg("-c").arg(&self.config_path);
            let mut child = Supervised::spawn(cmd, &self.log_path);
            let startup = self.await_ready(&mut child, offset, timeout).await;
            let new_log = read_log_from(&self.log_path, offset);
            match startup {
                Startup::Ready => {
                    self.child = Some(child);
                    return;
                }
                Startup::Exited(_)
                    if attempt < MAX_START_ATTEMPTS
                        && new_log
                            .to_ascii_lowercase()
                            .contains("address already in use") =>
                {
                    if !new_port {
                        sleep(Duration::from_millis(200)).await;
                    }
                }
                Startup::Exited(status) => panic!(
                    "{}",
                    self.failure(&format!("exited with {status} during start-up"))
                ),
                Startup::TimedOut(why) => {
                    child.kill_now();
                    panic!(
                        "{}",
                        self.failure(&format!("was not ready within {timeout:?}: {why}"))
                    )
                }
            }
        }
    }

    /// The first of the broker's ports (plain, then TLS) that refuses a TCP connection.
    async fn refusing_port(&self) -> Option<u16> {
        for port in std::iter::once(self.port).chain(self.tls_port()) {
            if !accepts(port).await {
                return Some(port);
            }
        }
        None
    }

    async fn await_ready(&self, child: &mut Supervised, offset: u64, timeout: Duration) -> Startup {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_exit() {
                return Startup::Exited(status);
            }
            // The marker proves that *this* process bound the port: a connect
            // alone could reach another server that took it.
            let why = if !read_log_from(&self.log_path, offset).contains(READY_MARKER) {
                format!("no {READY_MARKER:?} line in the log")
            } else if let Some(port) = self.refusing_port().await {
                format!("port {port} refuses connections")
            } else {
                return Startup::Ready;
            };
            if Instant::now() >= deadline {
                return Startup::TimedOut(why);
            }
            sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.kill_now();
        }
        print_tail_if_panicking("mosquitto", &self.log_path);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn broker_accepts_tcp() {
        let broker = Mosquitto::start().await;
        assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{}", broker.port()));
        assert!(accepts(broker.port()).await);
        let config = std::fs::read_to_string(broker.config_path()).unwrap();
        assert!(
            config.contains("max_queued_messages 10000000\n"),
            "{config}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn kill_stop_and_restart_keep_the_port() {
        let mut broker = Mosquitto::start().await;
        let port = broker.port();
        broker.kill().await;
        assert!(!accepts(port).await, "port {port} still accepts after kill");
        broker.restart().await;
        assert_eq!(broker.port(), port);
        assert!(accepts(port).await);

        broker.stop().await;
        assert!(
            broker.data_dir().join("mosquitto.db").exists(),
            "no database saved on SIGTERM; log:\n{}",
            broker.log()
        );
        broker.restart().await;
        assert!(accepts(port).await);
        assert_eq!(broker.log().matches("running").count(), 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn restart_waits_for_a_taken_port() {
        let mut broker = Mosquitto::start().await;
        let port = broker.port();
        broker.kill().await;
        let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        // Free the port once the server has failed on it at least once.
        let log_path = broker.log_path.clone();
        let freed = tokio::spawn(async move {
            let failed = crate::wait_until(Duration::from_secs(10), || async {
                read_log(&log_path).contains("Address already in use")
            })
            .await;
            drop(squatter);
            failed
        });
        broker.restart().await;
        assert!(freed.await.unwrap(), "the taken port was not reported");
        assert!(accepts(port).await);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn options_reach_the_config() {
        let broker = Mosquitto::start_with(MosquittoOptions {
            persistence: false,
            max_queued_messages: None,
            max_inflight_messages: Some(5),
            extra_config: "max_keepalive 60".into(),
        })
        .await;
        let config = std::fs::read_to_string(broker.config_path()).unwrap();
        assert!(!config.contains("max_queued_messages"), "{config}");
        assert!(config.contains("max_inflight_messages 5\n"), "{config}");
        assert!(config.contains("persistence false\n"), "{config}");
        assert!(config.ends_with("max_keepalive 60\n"), "{config}");
    }
}
