//! Child processes: the shared supervision used by the server guards, and
//! [`RoleProcess`] for windrow's own binary.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use tempfile::TempDir;
use tokio::time::{sleep, Instant};

use crate::net::{http_get, POLL_INTERVAL};

/// Lines of a log printed when a guard is dropped during a panic.
const LOG_TAIL_LINES: usize = 60;

/// A supervised child whose stdout and stderr are appended to a log file.
///
/// `std::process::Child` rather than tokio's: `Drop` can then kill and reap
/// synchronously (the port is free and no zombie is left behind), and async
/// waits poll `try_wait`, which does not depend on tokio's SIGCHLD reaper.
#[derive(Debug)]
pub(crate) struct Supervised {
    child: Child,
    exit: Option<ExitStatus>,
}

impl Supervised {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to `log`.
    ///
    /// # Panics
    /// If the log cannot be opened or the program cannot be started.
    pub(crate) fn spawn(mut cmd: Command, log: &Path) -> Supervised {
        let out = open_append(log);
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate log handle {}: {e}", log.display()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Supervised { child, exit: None }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (it is reaped then).
    pub(crate) fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Sends `signal` unless the process has already been reaped.
    ///
    /// While the child is not reaped its pid cannot be reused, so the signal
    /// never reaches an unrelated process.
    pub(crate) fn signal(&mut self, signal: Signal) {
        if self.try_exit().is_some() {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pids fit in i32"));
        // ESRCH only happens for a zombie that exited in between: harmless.
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// Waits up to `timeout` for the process to exit.
    pub(crate) async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGTERM, then SIGKILL if the process outlives `grace`; returns the status.
    ///
    /// # Panics
    /// If the process survives SIGKILL for 10 s.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait(grace).await {
            return status;
        }
        self.kill().await
    }

    /// SIGKILL and wait for the exit; returns the status.
    ///
    /// # Panics
    /// If the process survives SIGKILL for 10 s.
    pub(crate) async fn kill(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        match self.wait(Duration::from_secs(10)).await {
            Some(status) => status,
            None => panic!("pid {} survived SIGKILL for 10 s", self.pid()),
        }
    }

    /// SIGKILL and reap synchronously, ignoring every error (for `Drop`).
    pub(crate) fn kill_now(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for Supervised {
    /// Kills the child if it is still running, so that a start cancelled
    /// half-way (a dropped future) leaves no server behind.
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// Opens `path` for appending, creating it.
///
/// Append mode matters: a server that also opens the file itself (mosquitto's
/// `log_dest file`) then interleaves lines instead of overwriting ours.
fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log {}: {e}", path.display()))
}

/// The whole log file, lossily decoded; empty if it does not exist yet.
pub(crate) fn read_log(path: &Path) -> String {
    read_log_from(path, 0)
}

/// The log file from byte `offset` on, lossily decoded.
pub(crate) fn read_log_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The current length of the log file (0 if missing): where the next start's output begins.
pub(crate) fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `LOG_TAIL_LINES` lines of the log.
pub(crate) fn log_tail(path: &Path) -> String {
    let log = read_log(path);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Prints the log tail to stderr when the current thread is panicking; with
/// `KEEP_FAILED_LOGS=DIR` set, also copies the whole log there.
pub(crate) fn print_tail_if_panicking(what: &str, path: &Path) {
    if std::thread::panicking() {
        if let Some(dir) = std::env::var_os("KEEP_FAILED_LOGS") {
            let name = path
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = std::fs::copy(path, Path::new(&dir).join(format!("{name}.log")));
        }
        eprintln!(
            "----- last {LOG_TAIL_LINES} lines of {what} log ({}) -----\n{}\n----- end of {what} log -----",
            path.display(),
            log_tail(path)
        );
    }
}

/// The panic message for a server start that failed: what happened, the config and the log.
pub(crate) fn startup_failure(server: &str, what: &str, config: &Path, log: &Path) -> String {
    format!(
        "{server} {what}\n----- config {} -----\n{}\n----- log {} -----\n{}",
        config.display(),
        std::fs::read_to_string(config).unwrap_or_else(|e| format!("(unreadable: {e})")),
        log.display(),
        read_log(log)
    )
}

/// A running `windrow <role> ...` child process.
///
/// Its stdout and stderr go to a log file in its own temp dir. Dropping it
/// kills the process (SIGKILL) and, if the test is panicking, prints the
/// tail of its log.
#[derive(Debug)]
pub struct RoleProcess {
    // A mutex so that `&self` methods can check for an exit; never held across `.await`.
    child: Mutex<Supervised>,
    log_path: PathBuf,
    dir: TempDir,
}

impl RoleProcess {
    /// Starts `bin` with `args` and `envs` added to the inherited environment.
    ///
    /// `RUST_LOG` is the test runner's `ROLE_LOG` (to debug a failing test), else
    /// unset so that the role logs as it does by default; `NO_COLOR` is `1`
    /// unless `envs` sets it; inherited `WINDROW_*` variables are removed so that a developer's
    /// shell cannot change a test's configuration.
    ///
    /// # Panics
    /// If the temp dir or log cannot be created or `bin` cannot be started.
    pub fn spawn(bin: &Path, args: &[&str], envs: &[(&str, &str)]) -> RoleProcess {
        let dir = tempfile::Builder::new()
            .prefix("windrow-role-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for {}: {e}", bin.display()));
        let log_path = dir.path().join("role.log");
        let mut cmd = Command::new(bin);
        cmd.args(args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WINDROW_") {
                cmd.env_remove(key);
            }
        }
        match std::env::var("ROLE_LOG") {
            Ok(level) => cmd.env("RUST_LOG", level),
            Err(_) => cmd.env_remove("RUST_LOG"),
        };
        cmd.env("NO_COLOR", "1");
        cmd.envs(envs.iter().copied());
        let child = Supervised::spawn(cmd, &log_path);
        tracing::debug!(pid = child.pid(), bin = %bin.display(), ?args, "role started");
        RoleProcess {
            child: Mutex::new(child),
            log_path,
            dir,
        }
    }

    fn child(&self) -> MutexGuard<'_, Supervised> {
        // A panic while holding the lock leaves the child usable.
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child().pid()
    }

    /// The temp dir owned by this process guard (holds the log; tests may put role files here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path of the log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status if the process has exited.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        self.child().try_exit()
    }

    /// Sends SIGTERM (graceful shutdown) without waiting; a no-op after exit.
    pub async fn sigterm(&self) {
        self.child().signal(Signal::SIGTERM);
    }

    /// Stops the process outright (SIGSTOP), as a paused container or a
    /// frozen cgroup would: it runs no code until [thawed](Self::thaw).
    pub fn freeze(&self) {
        self.child().signal(Signal::SIGSTOP);
    }

    /// Lets a [frozen](Self::freeze) process run again (SIGCONT).
    pub fn thaw(&self) {
        self.child().signal(Signal::SIGCONT);
    }

    /// Sends SIGKILL and waits for the exit.
    ///
    /// # Panics
    /// If the process survives SIGKILL for 10 s.
    pub async fn sigkill(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        child.kill().await;
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    ///
    /// # Panics
    /// On timeout, with the process log in the message.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        match child.wait(timeout).await {
            Some(status) => status,
            None => panic!(
                "windrow role (pid {}) did not exit within {timeout:?}; log:\n{}",
                child.pid(),
                read_log(&self.log_path)
            ),
        }
    }

    /// The log contents so far (stdout and stderr).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Polls `GET /readyz` on `127.0.0.1:http_port` until it answers 200.
    ///
    /// # Panics
    /// On timeout, or as soon as the process exits, with the log in the message.
    pub async fn wait_ready(&self, http_port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "windrow role (pid {}) exited with {status} before /readyz on port {http_port} \
                     answered 200 (last: {last}); log:\n{}",
                    self.pid(),
                    self.log()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, http_get(http_port, "/readyz")).await {
                Ok(Ok((200, _))) => return,
                Ok(Ok((status, body))) => last = format!("status {status}: {}", body.trim()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "request timed out".into(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "windrow role (pid {}, still running) not ready on port {http_port} within \
                     {timeout:?} (last: {last}); log:\n{}",
                    self.pid(),
                    self.log()
                );
            }
            sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        child.kill_now();
        print_tail_if_panicking("windrow role", &self.log_path);
    }
}
