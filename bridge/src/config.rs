//! Bridge configuration (`[bridge]` in the config file).

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};
use windrow_jetstream::{subject, NatsConfig};

/// Everything the bridge needs; every endpoint, port and path comes from here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection (the top-level `[nats]` section, overridable as `[bridge.nats]`).
    pub nats: NatsConfig,
    /// MQTT connection(s).
    pub mqtt: MqttConfig,
    /// What to subscribe to and how to deliver it; the first route whose filter
    /// matches a topic wins. Default: `#` at QoS 0 into core NATS.
    pub routes: Vec<Route>,
    /// How `Nats-Msg-Id` is made: `uuid7` (default) or `content_hash`.
    pub message_id: MessageIdMode,
    /// JetStream publishes awaiting their ack, per bridge process; when reached,
    /// the bridge stops reading MQTT (backpressure). Default 4096.
    pub max_in_flight: usize,
    /// First delay before retrying a failed JetStream publish, in milliseconds. Default 100.
    pub retry_min_ms: u64,
    /// Largest delay between JetStream publish retries, in milliseconds. Default 5000.
    pub retry_max_ms: u64,
    /// Publish the metadata of messages the bridge cannot forward (e.g. over
    /// `max_payload`) to `dead_letter_subject`. Default true.
    pub dead_letter: bool,
    /// Subject of dead-letter records. Default `windrow.deadletter.bridge`.
    pub dead_letter_subject: String,
    /// Address of the `/metrics`, `/healthz`, `/readyz` server. Default `0.0.0.0:9464`.
    pub http_listen: SocketAddr,
    /// Upper bound on the drain after SIGTERM, in seconds. Default 20.
    pub shutdown_timeout_secs: u64,
    /// Threads of the bridge's async runtime. Default 1: every connection and
    /// the NATS client then run on one thread, and a message is handed from
    /// MQTT to NATS without waking another thread. On a shared 2-core machine
    /// that carried 20 % more messages than a thread per core (BENCHMARKS.md).
    /// Scale out with replicas, or raise this when one core is not enough.
    pub threads: usize,
    /// Fraction of messages that get a trace span and a `traceparent` header.
    /// Default: taken from the `OTEL_TRACES_SAMPLER*` variables (0 when OTLP is off).
    pub trace_sample_ratio: Option<f64>,
}

/// MQTT side of the bridge (`[bridge.mqtt]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host name. Default `127.0.0.1`.
    pub host: String,
    /// Broker port. Default 1883.
    pub port: u16,
    /// Stable client id of this replica; connection *i* uses `<client_id>-<i>`.
    /// Must be the same after a restart (e.g. the StatefulSet pod name) so that the
    /// persistent sessions, and with them the messages queued for them, are resumed.
    /// Default: `$POD_NAME`, else `$HOSTNAME`, else `windrow-bridge`.
    pub client_id: String,
    /// MQTT connections per bridge process, all in the same shared-subscription
    /// group. Default ([`Config::connections`]): 1 when every route is QoS 0,
    /// else 4. Mosquitto caps each connection's unacknowledged QoS 1/2 messages
    /// (`max_inflight_messages`), so ack-after-JetStream needs several; QoS 0
    /// needs none of that, and Mosquitto spends more per message dealing a
    /// shared subscription over several connections than writing to one
    /// (measured: one connection carried 0.99–1.07 of Mosquitto's own delivery
    /// rate, two 0.69–0.79).
    pub connections: Option<usize>,
    /// Subscribe as `$share/<shared_group>/<filter>` so that replicas and
    /// connections split the load. Default true.
    pub shared_subscription: bool,
    /// Shared-subscription group name. Default `windrow`.
    pub shared_group: String,
    /// Start a new session on every connect, dropping queued messages. Default false.
    pub clean_session: bool,
    /// MQTT keep-alive, in seconds. Default 30.
    pub keep_alive_secs: u64,
    /// Largest MQTT packet accepted from the broker, in bytes. Larger packets make
    /// the client disconnect, so keep this ≥ the broker's `message_size_limit`. Default 16 MiB.
    pub max_packet_bytes: usize,
    /// Capacity of the client's request channel (acks, subscribes). Default 1024.
    pub request_channel_capacity: usize,
    /// User name. Default none.
    pub username: Option<String>,
    /// Password (with `username`). Default none.
    pub password: Option<String>,
    /// Connect with TLS. Default false.
    pub tls: bool,
    /// PEM CA bundle to verify the broker with (required with `tls`).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM client key for mutual TLS (with `tls_cert_file`).
    pub tls_key_file: Option<PathBuf>,
    /// First reconnect delay, in milliseconds. Default 100.
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay, in milliseconds. Default 5000.
    pub reconnect_max_ms: u64,
}

/// One subscription and where its messages go (`[[bridge.routes]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// MQTT topic filter (`+`, `#` allowed), without any `$share/` prefix.
    pub filter: String,
    /// Subscription QoS: 0, 1 or 2. Default 0.
    #[serde(default)]
    pub qos: u8,
    /// `core` (fire-and-forget) or `jetstream` (acknowledged). Default `core`.
    #[serde(default)]
    pub delivery: Delivery,
    /// Retained messages: `forward` (default) or `ignore` (like `mosquitto_sub -R`).
    #[serde(default)]
    pub retained: RetainedPolicy,
}

/// How a route delivers into NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Core NATS publish; the MQTT ack (QoS 1/2) is sent once the client took the message.
    #[default]
    Core,
    /// JetStream publish; the MQTT ack is sent only after JetStream acknowledged.
    Jetstream,
}

/// What to do with retained messages replayed on subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetainedPolicy {
    /// Forward them like any other message.
    #[default]
    Forward,
    /// Acknowledge and drop them.
    Ignore,
}

/// How the `Nats-Msg-Id` header is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageIdMode {
    /// A UUID v7 made once per received message (reused by retries).
    #[default]
    Uuid7,
    /// A hash of topic and payload: an MQTT redelivery of the same message
    /// becomes a JetStream duplicate within the stream's duplicate window.
    ContentHash,
}

fn default_client_id() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "windrow-bridge".to_owned())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            mqtt: MqttConfig::default(),
            routes: vec![Route {
                filter: "#".to_owned(),
                qos: 0,
                delivery: Delivery::Core,
                retained: RetainedPolicy::Forward,
            }],
            message_id: MessageIdMode::default(),
            max_in_flight: 4096,
            retry_min_ms: 100,
            retry_max_ms: 5000,
            dead_letter: true,
            dead_letter_subject: "windrow.deadletter.bridge".to_owned(),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
            shutdown_timeout_secs: 20,
            threads: 1,
            trace_sample_ratio: None,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 1883,
            client_id: default_client_id(),
            connections: None,
            shared_subscription: true,
            shared_group: "windrow".to_owned(),
            clean_session: false,
            keep_alive_secs: 30,
            max_packet_bytes: 16 * 1024 * 1024,
            request_channel_capacity: 1024,
            username: None,
            password: None,
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5000,
        }
    }
}

/// Configuration problems, each naming the full key and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct InvalidConfig(pub Vec<String>);

impl Config {
    /// Checks every option before anything connects, collecting all problems.
    ///
    /// # Errors
    /// [`InvalidConfig`] listing each bad key under `bridge.`.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let mut p = self.nats.problems("bridge.nats");
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            p.push("bridge.mqtt.host: must not be empty".into());
        }
        if m.port == 0 {
            p.push("bridge.mqtt.port: must be ≥ 1, got 0".into());
        }
        if m.client_id.is_empty() || m.client_id.len() > 200 {
            p.push(format!(
                "bridge.mqtt.client_id: must be 1 to 200 bytes, got {:?}",
                m.client_id
            ));
        }
        if m.client_id.contains(['+', '#', '/']) || m.client_id.starts_with(' ') {
            p.push(format!(
                "bridge.mqtt.client_id: must not contain '+', '#', '/' or start with a space, got {:?}",
                m.client_id
            ));
        }
        if let Some(n) = m.connections.filter(|n| !(1..=256).contains(n)) {
            p.push(format!(
                "bridge.mqtt.connections: must be 1 to 256, got {n}"
            ));
        }
        let g = &m.shared_group;
        if m.shared_subscription && (g.is_empty() || g.contains(['+', '#', '/'])) {
            p.push(format!(
                "bridge.mqtt.shared_group: must be non-empty without '+', '#', '/', got {g:?}"
            ));
        }
        if m.shared_subscription && m.clean_session {
            p.push("bridge.mqtt.clean_session: must be false with a shared subscription, or messages dealt to this member while it reconnects are lost".into());
        }
        if m.keep_alive_secs < 5 {
            p.push(format!(
                "bridge.mqtt.keep_alive_secs: must be ≥ 5, got {}",
                m.keep_alive_secs
            ));
        }
        if !(1024..=268_435_455).contains(&m.max_packet_bytes) {
            p.push(format!(
                "bridge.mqtt.max_packet_bytes: must be 1024 to 268435455, got {}",
                m.max_packet_bytes
            ));
        }
        if m.request_channel_capacity == 0 {
            p.push("bridge.mqtt.request_channel_capacity: must be ≥ 1, got 0".into());
        }
        if m.username.is_none() && m.password.is_some() {
            p.push("bridge.mqtt.password: set without bridge.mqtt.username".into());
        }
        if m.tls && m.tls_ca_file.is_none() {
            p.push("bridge.mqtt.tls_ca_file: required when bridge.mqtt.tls is true (e.g. /etc/ssl/certs/ca-certificates.crt)".into());
        }
        if m.tls_cert_file.is_some() != m.tls_key_file.is_some() {
            p.push("bridge.mqtt.tls_cert_file/tls_key_file: set both or neither".into());
        }
        for (key, file) in [
            ("tls_ca_file", &m.tls_ca_file),
            ("tls_cert_file", &m.tls_cert_file),
            ("tls_key_file", &m.tls_key_file),
        ] {
            if let Some(f) = file {
                if !f.is_file() {
                    p.push(format!("bridge.mqtt.{key}: no such file {}", f.display()));
                }
            }
        }
        if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
            p.push(format!(
                "bridge.mqtt.reconnect_min_ms: must be ≥ 1 and ≤ reconnect_max_ms ({}), got {}",
                m.reconnect_max_ms, m.reconnect_min_ms
            ));
        }
        if self.routes.is_empty() {
            p.push("bridge.routes: at least one route is required".into());
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Err(e) = subject::encode_filter("x", &r.filter) {
                p.push(format!("bridge.routes[{i}].filter: {e}"));
            }
            if r.filter.starts_with("$share/") {
                p.push(format!("bridge.routes[{i}].filter: give the filter without $share/ and set bridge.mqtt.shared_group instead, got {:?}", r.filter));
            }
            if r.qos > 2 {
                p.push(format!(
                    "bridge.routes[{i}].qos: must be 0, 1 or 2, got {}",
                    r.qos
                ));
            }
            // One subscription per filter on the broker: a second route would
            // replace the first's QoS, and unsubscribing one (a QoS 0 route,
            // when draining) would remove both.
            if let Some(j) = self.routes[..i].iter().position(|o| o.filter == r.filter) {
                p.push(format!(
                    "bridge.routes[{i}].filter: {:?} is also routes[{j}]'s filter; give each filter one route",
                    r.filter
                ));
            }
        }
        if !(1..=1_000_000).contains(&self.max_in_flight) {
            p.push(format!(
                "bridge.max_in_flight: must be 1 to 1000000, got {}",
                self.max_in_flight
            ));
        }
        if self.retry_min_ms == 0 || self.retry_min_ms > self.retry_max_ms {
            p.push(format!(
                "bridge.retry_min_ms: must be ≥ 1 and ≤ retry_max_ms ({}), got {}",
                self.retry_max_ms, self.retry_min_ms
            ));
        }
        if self.dead_letter && !subject::is_valid_subject(&self.dead_letter_subject) {
            p.push(format!(
                "bridge.dead_letter_subject: not a literal NATS subject: {:?}",
                self.dead_letter_subject
            ));
        }
        if self.shutdown_timeout_secs == 0 {
            p.push("bridge.shutdown_timeout_secs: must be ≥ 1, got 0".into());
        }
        if !(1..=256).contains(&self.threads) {
            p.push(format!(
                "bridge.threads: must be 1 to 256, got {}",
                self.threads
            ));
        }
        if let Some(r) = self.trace_sample_ratio {
            if !(0.0..=1.0).contains(&r) {
                p.push(format!(
                    "bridge.trace_sample_ratio: must be between 0 and 1, got {r}"
                ));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(InvalidConfig(p))
        }
    }

    /// MQTT connections to open: `mqtt.connections`, else 1 when every route
    /// is QoS 0 and 4 otherwise (see [`MqttConfig::connections`]).
    pub fn connections(&self) -> usize {
        self.mqtt.connections.unwrap_or_else(|| {
            if self.routes.iter().all(|r| r.qos == 0) {
                1
            } else {
                4
            }
        })
    }

    /// The client id of connection `index`.
    pub fn client_id(&self, index: usize) -> String {
        format!("{}-{index}", self.mqtt.client_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn connections_default_to_one_for_qos0_and_four_with_acknowledged_routes() {
        let mut c = Config::default();
        assert_eq!(c.connections(), 1, "the default route is QoS 0");
        c.routes.push(Route {
            filter: "alarms/#".into(),
            qos: 1,
            delivery: Delivery::Jetstream,
            retained: RetainedPolicy::Forward,
        });
        assert_eq!(c.connections(), 4);
        c.mqtt.connections = Some(2);
        assert_eq!(c.connections(), 2, "a configured count wins");
    }

    #[test]
    fn every_problem_names_its_key() {
        let mut c = Config::default();
        c.mqtt.keep_alive_secs = 0;
        c.mqtt.connections = Some(0);
        c.routes[0].qos = 3;
        c.routes[0].filter = "a/#/b".into();
        c.routes.push(c.routes[0].clone());
        c.nats.subject_prefix = "a..b".into();
        c.threads = 0;
        let err = c.validate().unwrap_err();
        let text = err.to_string();
        for key in [
            "bridge.mqtt.keep_alive_secs: must be ≥ 5, got 0",
            "bridge.mqtt.connections",
            "bridge.routes[0].qos",
            "bridge.routes[0].filter",
            "bridge.routes[1].filter: \"a/#/b\" is also routes[0]'s filter",
            "bridge.nats.subject_prefix",
            "bridge.threads: must be 1 to 256, got 0",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
        // routes[1] repeats routes[0]'s two problems, and adds the duplicate.
        assert_eq!(err.0.len(), 9);
    }
}
