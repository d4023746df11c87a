//! Command-line interface.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::telemetry::LogFormat;

/// windrow: MQTT telemetry into durable, queryable time windows over NATS.
///
/// Configuration is layered: built-in defaults < the TOML file (--config) <
/// WINDROW_* environment variables (sections joined by `__`, e.g.
/// WINDROW_NATS__URL, WINDROW_BRIDGE__MQTT__HOST) < flags.
#[derive(Debug, Parser)]
#[command(name = "windrow", version, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file (`windrow config default` prints one).
    #[arg(long, short, global = true, env = "WINDROW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format on stderr. Filter with RUST_LOG (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty, env = "WINDROW_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bridge MQTT topics into NATS subjects (core or JetStream).
    Bridge(Box<BridgeArgs>),
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `windrow config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the built-in defaults of every section as TOML.
    Default,
    /// Validate the configuration (file, environment) of every role; exit 2 if invalid.
    Check,
}

/// Message id mode flag values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MessageIdArg {
    /// UUID v7 per received message.
    Uuid7,
    /// BLAKE3 of topic + payload.
    ContentHash,
}

/// NATS connection flags (override `[nats]`).
#[derive(Debug, Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma-separated [nats.url; default nats://127.0.0.1:4222].
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Subject prefix of telemetry subjects [nats.subject_prefix; default windrow.telemetry].
    #[arg(long)]
    pub subject_prefix: Option<String>,
    /// NATS user [nats.user].
    #[arg(long)]
    pub nats_user: Option<String>,
    /// NATS password [nats.password]; prefer WINDROW_NATS__PASSWORD.
    #[arg(long)]
    pub nats_password: Option<String>,
    /// NATS token [nats.token]; prefer WINDROW_NATS__TOKEN.
    #[arg(long)]
    pub nats_token: Option<String>,
    /// NATS credentials (.creds) file [nats.credentials_file].
    #[arg(long)]
    pub nats_credentials_file: Option<PathBuf>,
    /// CA certificates (PEM) for NATS TLS [nats.tls_ca_file].
    #[arg(long)]
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS [nats.tls_cert_file].
    #[arg(long)]
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Client key (PEM) for NATS mutual TLS [nats.tls_key_file].
    #[arg(long)]
    pub nats_tls_key_file: Option<PathBuf>,
    /// Require TLS to NATS [nats.tls_required].
    #[arg(long)]
    pub nats_tls_required: bool,
    /// Seconds to establish a NATS connection [nats.connect_timeout_secs; default 5].
    #[arg(long)]
    pub nats_connect_timeout_secs: Option<u64>,
    /// Seconds to wait for a reply or JetStream ack [nats.request_timeout_secs; default 5].
    #[arg(long)]
    pub nats_request_timeout_secs: Option<u64>,
    /// Messages buffered for publishing before publishers wait [nats.client_capacity; default 65536].
    #[arg(long)]
    pub nats_client_capacity: Option<usize>,
    /// Messages a subscription buffers before dropping (slow consumer) [nats.subscription_capacity; default 65536].
    #[arg(long)]
    pub nats_subscription_capacity: Option<usize>,
    /// Seconds between client PINGs [nats.ping_interval_secs; default 10].
    #[arg(long)]
    pub nats_ping_interval_secs: Option<u64>,
}

/// `windrow bridge` flags; each names the config key it overrides.
#[derive(Debug, Args)]
#[command(
    after_long_help = "Routes: --route FILTER[,qos=N][,delivery=core|jetstream][,retained=forward|ignore], \
repeatable; given routes replace the configured ones. Example:\n  \
windrow bridge --mqtt-host broker --route 'sensors/#,qos=1,delivery=jetstream' --route 'status/+,retained=ignore'"
)]
pub struct BridgeArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// MQTT broker host [bridge.mqtt.host; default 127.0.0.1].
    #[arg(long)]
    pub mqtt_host: Option<String>,
    /// MQTT broker port [bridge.mqtt.port; default 1883].
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// Stable client id of this replica; connection i is <id>-<i> [bridge.mqtt.client_id; default $POD_NAME or $HOSTNAME].
    #[arg(long)]
    pub client_id: Option<String>,
    /// MQTT connections in this process [bridge.mqtt.connections; default 4].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Shared-subscription group [bridge.mqtt.shared_group; default windrow].
    #[arg(long)]
    pub shared_group: Option<String>,
    /// Subscribe without $share/ [bridge.mqtt.shared_subscription = false].
    #[arg(long)]
    pub no_shared_subscription: bool,
    /// Start a fresh MQTT session on each connect [bridge.mqtt.clean_session].
    #[arg(long)]
    pub clean_session: bool,
    /// MQTT keep-alive seconds [bridge.mqtt.keep_alive_secs; default 30].
    #[arg(long)]
    pub keep_alive_secs: Option<u64>,
    /// Largest MQTT packet accepted [bridge.mqtt.max_packet_bytes; default 16777216].
    #[arg(long)]
    pub max_packet_bytes: Option<usize>,
    /// rumqttc request channel capacity [bridge.mqtt.request_channel_capacity; default 1024].
    #[arg(long)]
    pub request_channel_capacity: Option<usize>,
    /// MQTT user name [bridge.mqtt.username].
    #[arg(long)]
    pub mqtt_username: Option<String>,
    /// MQTT password [bridge.mqtt.password]; prefer WINDROW_BRIDGE__MQTT__PASSWORD.
    #[arg(long)]
    pub mqtt_password: Option<String>,
    /// Connect to MQTT with TLS [bridge.mqtt.tls].
    #[arg(long)]
    pub mqtt_tls: bool,
    /// CA bundle (PEM) for MQTT TLS [bridge.mqtt.tls_ca_file].
    #[arg(long)]
    pub mqtt_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for MQTT mutual TLS [bridge.mqtt.tls_cert_file].
    #[arg(long)]
    pub mqtt_tls_cert_file: Option<PathBuf>,
    /// Client key (PEM) for MQTT mutual TLS [bridge.mqtt.tls_key_file].
    #[arg(long)]
    pub mqtt_tls_key_file: Option<PathBuf>,
    /// First MQTT reconnect delay, ms [bridge.mqtt.reconnect_min_ms; default 100].
    #[arg(long)]
    pub reconnect_min_ms: Option<u64>,
    /// Largest MQTT reconnect delay, ms [bridge.mqtt.reconnect_max_ms; default 5000].
    #[arg(long)]
    pub reconnect_max_ms: Option<u64>,
    /// A route (see below) [bridge.routes; default `#` at QoS 0 to core NATS].
    #[arg(
        long = "route",
        value_name = "FILTER[,qos=N][,delivery=..][,retained=..]"
    )]
    pub routes: Vec<String>,
    /// How Nats-Msg-Id is made [bridge.message_id; default uuid7].
    #[arg(long, value_enum)]
    pub message_id: Option<MessageIdArg>,
    /// Unacknowledged JetStream publishes before MQTT reading pauses [bridge.max_in_flight; default 4096].
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// First JetStream retry delay, ms [bridge.retry_min_ms; default 100].
    #[arg(long)]
    pub retry_min_ms: Option<u64>,
    /// Largest JetStream retry delay, ms [bridge.retry_max_ms; default 5000].
    #[arg(long)]
    pub retry_max_ms: Option<u64>,
    /// Dead-letter subject [bridge.dead_letter_subject; default windrow.deadletter.bridge].
    #[arg(long)]
    pub dead_letter_subject: Option<String>,
    /// Do not publish dead-letter records [bridge.dead_letter = false].
    #[arg(long)]
    pub no_dead_letter: bool,
    /// Address of /metrics, /healthz, /readyz [bridge.http_listen; default 0.0.0.0:9464].
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Drain time limit after SIGTERM, seconds [bridge.shutdown_timeout_secs; default 20].
    #[arg(long)]
    pub shutdown_timeout_secs: Option<u64>,
    /// Fraction of messages traced [bridge.trace_sample_ratio; default from OTEL_TRACES_SAMPLER*].
    #[arg(long)]
    pub trace_sample_ratio: Option<f64>,
}
