//! NATS connection options shared by every role, and connecting with them.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::Error;

/// How to reach and authenticate to NATS (`nats.*` in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://host:4222,nats://other:4222`). Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subject prefix of telemetry subjects: topic `a/b` becomes `<prefix>.a.b`. Default `windrow.telemetry`.
    pub subject_prefix: String,
    /// User name (with `password`). Default none.
    pub user: Option<String>,
    /// Password (with `user`). Default none.
    pub password: Option<String>,
    /// Token authentication. Default none.
    pub token: Option<String>,
    /// A `.creds` file (JWT + NKey seed). Default none.
    pub credentials_file: Option<PathBuf>,
    /// PEM file of CA certificates to trust. Default none (system roots when TLS is on).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key_file`). Default none.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM client key for mutual TLS (with `tls_cert_file`). Default none.
    pub tls_key_file: Option<PathBuf>,
    /// Require TLS even if the URL says `nats://`. Default false.
    pub tls_required: bool,
    /// Time allowed to establish one connection, in seconds. Default 5.
    pub connect_timeout_secs: u64,
    /// Time to wait for a request's reply (including a JetStream publish ack), in seconds. Default 5.
    pub request_timeout_secs: u64,
    /// Messages the client buffers for publishing before a publish waits (backpressure). Default 65536.
    pub client_capacity: usize,
    /// Messages a subscription buffers before the client drops them as a slow consumer. Default 524288
    /// (a core-mode worker's backlog while compactions of `recent` run; README, "Workers").
    pub subscription_capacity: usize,
    /// Interval between client PINGs, in seconds. Default 10.
    pub ping_interval_secs: u64,
}

fn default_url() -> String {
    "nats://127.0.0.1:4222".to_owned()
}
fn default_subject_prefix() -> String {
    "windrow.telemetry".to_owned()
}
fn default_connect_timeout_secs() -> u64 {
    5
}
fn default_request_timeout_secs() -> u64 {
    5
}
fn default_client_capacity() -> usize {
    65_536
}
fn default_subscription_capacity() -> usize {
    524_288
}
fn default_ping_interval_secs() -> u64 {
    10
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            subject_prefix: default_subject_prefix(),
            user: None,
            password: None,
            token: None,
            credentials_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            connect_timeout_secs: default_connect_timeout_secs(),
            request_timeout_secs: default_request_timeout_secs(),
            client_capacity: default_client_capacity(),
            subscription_capacity: default_subscription_capacity(),
            ping_interval_secs: default_ping_interval_secs(),
        }
    }
}

impl NatsConfig {
    /// Collects every problem with these options, each naming its key under `path`
    /// (e.g. `bridge.nats`).
    pub fn problems(&self, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.url.trim().is_empty() {
            out.push(format!("{path}.url: must not be empty"));
        }
        for url in self.url.split(',') {
            let url = url.trim();
            if !url.is_empty()
                && url.contains("://")
                && !["nats://", "tls://", "ws://", "wss://"]
                    .iter()
                    .any(|s| url.starts_with(s))
            {
                out.push(format!(
                    "{path}.url: scheme must be nats://, tls://, ws:// or wss://, got {url:?}"
                ));
            }
        }
        if let Err(e) = crate::subject::validate_prefix(&self.subject_prefix) {
            out.push(format!("{path}.subject_prefix: {e}"));
        }
        if self.user.is_some() != self.password.is_some() {
            out.push(format!("{path}.user/password: set both or neither"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            out.push(format!(
                "{path}.tls_cert_file/tls_key_file: set both or neither"
            ));
        }
        let auth = [
            self.user.is_some(),
            self.token.is_some(),
            self.credentials_file.is_some(),
        ];
        if auth.iter().filter(|x| **x).count() > 1 {
            out.push(format!(
                "{path}: choose one of user/password, token and credentials_file"
            ));
        }
        for (key, file) in [
            ("credentials_file", &self.credentials_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(f) = file {
                if !f.is_file() {
                    out.push(format!("{path}.{key}: no such file {}", f.display()));
                }
            }
        }
        for (key, v) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("request_timeout_secs", self.request_timeout_secs),
            ("ping_interval_secs", self.ping_interval_secs),
        ] {
            if v == 0 {
                out.push(format!("{path}.{key}: must be ≥ 1, got 0"));
            }
        }
        for (key, v) in [
            ("client_capacity", self.client_capacity),
            ("subscription_capacity", self.subscription_capacity),
        ] {
            if v == 0 {
                out.push(format!("{path}.{key}: must be ≥ 1, got 0"));
            }
        }
        out
    }
}

/// Connects to NATS with `config`, naming the connection `name`.
///
/// The client retries the initial connection and reconnects forever with the
/// library's capped exponential backoff: a role never gives up on NATS, it
/// reports not-ready instead. `on_event` sees every connection event
/// (connected, disconnected, slow consumer...).
///
/// # Errors
/// [`Error::ReadFile`] for an unreadable credentials file, [`Error::Connect`]
/// if the options are rejected.
pub async fn connect<F, Fut>(
    config: &NatsConfig,
    name: &str,
    on_event: F,
) -> Result<async_nats::Client, Error>
where
    F: Fn(async_nats::Event) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(config.connect_timeout_secs))
        .request_timeout(Some(Duration::from_secs(config.request_timeout_secs)))
        .client_capacity(config.client_capacity)
        .subscription_capacity(config.subscription_capacity)
        .ping_interval(Duration::from_secs(config.ping_interval_secs))
        .event_callback(on_event);
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        opts = opts.token(token.clone());
    }
    if let Some(path) = &config.credentials_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| Error::ReadFile {
                path: path.clone(),
                source,
            })?;
    }
    if let Some(ca) = &config.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        opts = opts.require_tls(true);
    }
    let servers: Vec<&str> = config.url.split(',').map(str::trim).collect();
    async_nats::connect_with_options(servers, opts)
        .await
        .map_err(|source| Error::Connect {
            url: config.url.clone(),
            source,
        })
}
