//! A private `nats-server` per test.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::time::{sleep, Instant};

use crate::{
    net::{first_line, POLL_INTERVAL},
    process::{
        log_len, print_tail_if_panicking, read_log, read_log_from, startup_failure, Supervised,
    },
    require_binary, ServerTls, Startup, MAX_START_ATTEMPTS, READY_TIMEOUT, RESTART_READY_TIMEOUT,
    STOP_GRACE,
};

/// Line nats-server 2.9+ logs once JetStream is up and clients are accepted.
const READY_MARKER: &str = "Server is ready";

/// Seconds nats-server allows a client for the TLS handshake. Its default (0.5 s)
/// is too tight for a loaded 2-core test machine.
const TLS_HANDSHAKE_TIMEOUT_SECS: u32 = 10;

/// Settings for [`NatsServer::start_with`].
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Enables JetStream with a store in the guard's temp dir. Default: true.
    pub jetstream: bool,
    /// `max_payload` in bytes; `None` keeps the server default (1 MiB).
    pub max_payload: Option<usize>,
    /// Serves the monitoring endpoints (`/varz`, `/connz`, ...) on a loopback
    /// port the server picks, which [`NatsServer::monitoring_port`] tells.
    /// Default: false.
    pub monitoring: bool,
    /// Appended raw to the generated config file. Default: empty.
    pub extra_config: String,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            jetstream: true,
            max_payload: None,
            monitoring: false,
            extra_config: String::new(),
        }
    }
}

/// A running `nats-server` on a private loopback port with its own temp dir.
///
/// The port and the JetStream store survive [`restart`](Self::restart).
/// Dropping the guard kills the server (SIGKILL) and, if the test is
/// panicking, prints the tail of the server log.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Supervised>,
    bin: PathBuf,
    port: u16,
    /// 0 until the server reports it, and without [`NatsOptions::monitoring`].
    monitoring_port: u16,
    opts: NatsOptions,
    tls: Option<ServerTls>,
    config_path: PathBuf,
    ports_dir: PathBuf,
    store_dir: PathBuf,
    log_path: PathBuf,
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server with [`NatsOptions::default`] (JetStream on) and waits until it is ready.
    ///
    /// # Panics
    /// As [`start_with`](Self::start_with).
    pub async fn start() -> NatsServer {
        Self::start_with(NatsOptions::default()).await
    }

    /// [`start`](Self::start) with its monitoring endpoints served
    /// ([`NatsOptions::monitoring`]).
    ///
    /// # Panics
    /// As [`start_with`](Self::start_with).
    pub async fn start_monitored() -> NatsServer {
        Self::start_with(NatsOptions {
            monitoring: true,
            ..NatsOptions::default()
        })
        .await
    }

    /// Starts a server with `opts` and waits until it is ready.
    ///
    /// The server picks its own port (`-p -1` semantics, reported through
    /// `--ports_file_dir`); the config is then pinned to that port for restarts.
    ///
    /// # Panics
    /// If `nats-server` is not installed, or it exits or is not ready within
    /// 10 s (the message holds the server log).
    pub async fn start_with(opts: NatsOptions) -> NatsServer {
        Self::start_inner(opts, None).await
    }

    /// Starts a server with `opts` that requires TLS from every client (and a
    /// client certificate if `tls.verify_clients`), and waits until it is ready.
    ///
    /// Clients keep using [`url`](Self::url): nats-server announces
    /// `tls_required` in its plain-text `INFO` and clients upgrade. TLS stays on
    /// across [`restart`](Self::restart).
    ///
    /// # Panics
    /// As [`start_with`](Self::start_with) (a bad certificate or key makes the
    /// server exit during start-up; the message holds its log).
    pub async fn start_with_tls(opts: NatsOptions, tls: ServerTls) -> NatsServer {
        Self::start_inner(opts, Some(tls)).await
    }

    async fn start_inner(opts: NatsOptions, tls: Option<ServerTls>) -> NatsServer {
        let bin = require_binary("nats-server");
        let dir = tempfile::Builder::new()
            .prefix("windrow-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for nats-server: {e}"));
        let store_dir = dir.path().join("store");
        let ports_dir = dir.path().join("ports");
        for d in [&store_dir, &ports_dir] {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        let mut server = NatsServer {
            child: None,
            bin,
            port: 0,
            monitoring_port: 0,
            opts,
            tls,
            config_path: dir.path().join("nats.conf"),
            ports_dir,
            store_dir,
            log_path: dir.path().join("nats.log"),
            dir,
        };
        server.launch(READY_TIMEOUT).await;
        // Restarts must come back on the same port.
        server.write_config();
        tracing::debug!(port = server.port, "nats-server started");
        server
    }

    /// The monitoring port on 127.0.0.1 (`/varz`, `/connz`, ...).
    ///
    /// # Panics
    /// Unless started with [`NatsOptions::monitoring`].
    pub fn monitoring_port(&self) -> u16 {
        assert!(
            self.opts.monitoring,
            "nats-server started without NatsOptions::monitoring"
        );
        self.monitoring_port
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The configured JetStream `store_dir`, kept across restarts.
    ///
    /// nats-server keeps its files in a `jetstream/` subdirectory of it.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The guard's temp dir (config, log, store).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while a server process is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Supervised::pid)
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    ///
    /// # Panics
    /// If it survives SIGKILL for 10 s.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await;
        }
    }

    /// Freezes the server (SIGSTOP): it keeps its connections open but
    /// answers nothing, like a broker in a paused VM or container. Undo with
    /// [`thaw`](Self::thaw); stopping, restarting or dropping it thaws or
    /// kills it.
    pub fn freeze(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.signal(Signal::SIGSTOP);
        }
    }

    /// Lets a [frozen](Self::freeze) server run again (SIGCONT).
    pub fn thaw(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.signal(Signal::SIGCONT);
        }
    }

    /// Stops the server with SIGTERM and waits for it to exit (SIGKILL after 10 s).
    ///
    /// # Panics
    /// If it survives SIGKILL for 10 s.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen server would only take the SIGTERM once thawed.
            child.signal(Signal::SIGCONT);
            child.terminate(STOP_GRACE).await;
        }
    }

    /// Starts the server again on the same port with the same store dir and
    /// config, and waits until it is ready; stops it first (as [`stop`](Self::stop)) if it is running.
    ///
    /// # Panics
    /// If it exits or is not ready within 30 s (JetStream may have to recover
    /// a large store after a kill); the message holds the server log.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch(RESTART_READY_TIMEOUT).await;
    }

    /// The server log so far, across restarts.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    fn failure(&self, what: &str) -> String {
        startup_failure("nats-server", what, &self.config_path, &self.log_path)
    }

    fn write_config(&self) {
        let listen = match self.port {
            0 => "127.0.0.1:-1".to_owned(),
            port => format!("127.0.0.1:{port}"),
        };
        let mut config = format!("# written by windrow-harness\nlisten: \"{listen}\"\n");
        if self.opts.jetstream {
            let _ = writeln!(
                config,
                "jetstream {{\n  store_dir: \"{}\"\n}}",
                self.store_dir.display()
            );
        }
        if self.opts.monitoring {
            let port = match self.monitoring_port {
                0 => "-1".to_owned(),
                port => port.to_string(),
            };
            let _ = writeln!(config, "http: \"127.0.0.1:{port}\"");
        }
        if let Some(max_payload) = self.opts.max_payload {
            let _ = writeln!(config, "max_payload: {max_payload}");
        }
        if let Some(tls) = &self.tls {
            let quoted = |p: &Path| format!("{:?}", p.display().to_string());
            let _ = writeln!(
                config,
                "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: {}\n  timeout: {TLS_HANDSHAKE_TIMEOUT_SECS}\n}}",
                quoted(&tls.cert_file),
                quoted(&tls.key_file),
                quoted(&tls.ca_file),
                tls.verify_clients,
            );
        }
        config.push_str(&self.opts.extra_config);
        config.push('\n');
        std::fs::write(&self.config_path, config)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config_path.display()));
    }

    /// Starts the process (retrying while the port is briefly taken) and waits until it is ready.
    async fn launch(&mut self, timeout: Duration) {
        if self.port == 0 {
            self.write_config();
        }
        for attempt in 1..=MAX_START_ATTEMPTS {
            let offset = log_len(&self.log_path);
            let mut cmd = Command::new(&self.bin);
            cmd.arg("-c")
                .arg(&self.config_path)
                .arg("--ports_file_dir")
                .arg(&self.ports_dir);
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
                    sleep(Duration::from_millis(200)).await;
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

    async fn await_ready(
        &mut self,
        child: &mut Supervised,
        offset: u64,
        timeout: Duration,
    ) -> Startup {
        let deadline = Instant::now() + timeout;
        let mut why = String::from("no port reported yet");
        loop {
            if let Some(status) = child.try_exit() {
                return Startup::Exited(status);
            }
            if self.port == 0 || (self.opts.monitoring && self.monitoring_port == 0) {
                let ports = read_ports_file(&self.ports_dir, child.pid());
                self.port = ports.map_or(0, |p| p.nats);
                self.monitoring_port = ports.and_then(|p| p.monitoring).unwrap_or(0);
            }
            if self.opts.monitoring && self.monitoring_port == 0 {
                why = "no monitoring port reported yet".into();
            } else if self.port != 0 {
                if !read_log_from(&self.log_path, offset).contains(READY_MARKER) {
                    why = format!("no {READY_MARKER:?} in the log");
                } else {
                    match first_line(self.port).await {
                        Ok(line) if line.starts_with("INFO") => return Startup::Ready,
                        Ok(line) => why = format!("first line on port {} was {line:?}", self.port),
                        Err(e) => why = format!("port {}: {e}", self.port),
                    }
                }
            }
            if Instant::now() >= deadline {
                return Startup::TimedOut(why);
            }
            sleep(POLL_INTERVAL).await;
        }
    }
}

/// The ports a server reported.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ports {
    nats: u16,
    monitoring: Option<u16>,
}

/// The ports from `nats-server_<pid>.ports`:
/// `{"nats":["nats://127.0.0.1:PORT"],"monitoring":["http://127.0.0.1:PORT"]}`
/// (`tls://` when the server requires TLS; no monitoring without `http`).
fn read_ports_file(dir: &Path, pid: u32) -> Option<Ports> {
    let text = std::fs::read_to_string(dir.join(format!("nats-server_{pid}.ports"))).ok()?;
    parse_ports_file(&text)
}

fn parse_ports_file(text: &str) -> Option<Ports> {
    let port = |key: &str| {
        let after_key = &text[text.find(key)?..];
        let url_start = after_key.find("://")? + "://".len();
        let url = &after_key[url_start..];
        let url = &url[..url.find('"')?];
        let port: u16 = url.rsplit(':').next()?.parse().ok()?;
        (port != 0).then_some(port)
    };
    Some(Ports {
        nats: port("\"nats\"")?,
        monitoring: port("\"monitoring\""),
    })
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.kill_now();
        }
        print_tail_if_panicking("nats-server", &self.log_path);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use crate::net::accepts;

    #[test]
    fn parses_the_ports_file() {
        let text = r#"{"nats":["nats://127.0.0.1:46645"],"monitoring":["http://127.0.0.1:8222"]}"#;
        let ports = |nats, monitoring| Some(Ports { nats, monitoring });
        assert_eq!(parse_ports_file(text), ports(46645, Some(8222)));
        let tls = r#"{"nats":["tls://127.0.0.1:32787"]}"#;
        assert_eq!(parse_ports_file(tls), ports(32787, None));
        assert_eq!(parse_ports_file("{"), None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn monitoring_is_served_on_a_port_the_server_picks_and_keeps() {
        let mut server = NatsServer::start_monitored().await;
        let port = server.monitoring_port();
        assert_ne!(port, server.port());
        for _ in 0..2 {
            let (status, body) = crate::http_get(port, "/varz").await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"server_id\""), "{body}");
            server.restart().await;
        }
        assert_eq!(server.monitoring_port(), port);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn server_greets_with_info() {
        let server = NatsServer::start().await;
        assert!(server.url().ends_with(&format!(":{}", server.port())));
        let line = first_line(server.port()).await.unwrap();
        assert!(line.starts_with("INFO {"), "{line}");
        assert!(line.contains("\"jetstream\":true"), "{line}");
        assert!(server.store_dir().join("jetstream").is_dir());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn options_reach_the_server() {
        let server = NatsServer::start_with(NatsOptions {
            jetstream: false,
            max_payload: Some(4096),
            monitoring: false,
            extra_config: "max_connections: 100".into(),
        })
        .await;
        let line = first_line(server.port()).await.unwrap();
        assert!(line.contains("\"max_payload\":4096"), "{line}");
        assert!(!line.contains("\"jetstream\":true"), "{line}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn kill_and_restart_keep_port_and_store() {
        let mut server = NatsServer::start().await;
        let (port, store) = (server.port(), server.store_dir().to_owned());
        let marker = store.join("jetstream").join("harness-marker");
        std::fs::write(&marker, b"kept").unwrap();

        server.kill().await;
        assert!(!accepts(port).await, "port {port} still accepts after kill");
        server.restart().await;
        assert_eq!((server.port(), server.store_dir()), (port, store.as_path()));
        assert!(first_line(port).await.unwrap().starts_with("INFO"));
        assert!(marker.exists(), "store dir was not kept");

        server.stop().await;
        server.restart().await;
        assert!(first_line(port).await.unwrap().starts_with("INFO"));
        assert_eq!(server.log().matches(READY_MARKER).count(), 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn restart_waits_for_a_taken_port_then_reports_it() {
        let mut server = NatsServer::start().await;
        let port = server.port();
        server.kill().await;
        let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        // Free the port once the server has failed on it at least once.
        let log_path = server.log_path.clone();
        let freed = tokio::spawn(async move {
            let failed = crate::wait_until(Duration::from_secs(10), || async {
                read_log(&log_path).contains("address already in use")
            })
            .await;
            drop(squatter);
            failed
        });
        server.restart().await;
        assert!(freed.await.unwrap(), "the taken port was not reported");
        assert!(first_line(port).await.unwrap().starts_with("INFO"));
    }
}
