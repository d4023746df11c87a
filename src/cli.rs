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
    /// Log format on stderr. Filter with RUST_LOG (default `info,async_nats::connector=debug`).
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
    /// Fold telemetry into time windows in per-node LMDB (core queue group or JetStream).
    Worker(Box<WorkerArgs>),
    /// Ask every worker for its windows and print the merged result.
    Query(Box<QueryArgs>),
    /// Export merged windows.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Read a worker's LMDB store directly: stat, get, scan, dump, backup.
    Store(Box<StoreArgs>),
    /// JetStream streams and consumers declared in `[jetstream]`: plan or apply them.
    #[command(subcommand)]
    Streams(StreamsCommand),
    /// Rebuild a store from a stream through the workers' decode → window → LMDB path.
    Replay(Box<ReplayArgs>),
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
    /// Messages a subscription buffers before dropping (slow consumer) [nats.subscription_capacity; default 524288].
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
    /// MQTT connections in this process [bridge.mqtt.connections; default 1 when every route is QoS 0, else 4].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Threads of the async runtime [bridge.threads; default 1].
    #[arg(long)]
    pub threads: Option<usize>,
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
    /// Run `windrow streams apply` (no --recreate) before starting.
    #[arg(long)]
    pub ensure_streams: bool,
}

/// `windrow worker` flags (the rest comes from `[worker]` in the config file or `WINDROW_WORKER__*`).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// core (queue group, at-most-once) or jetstream (durable pull consumer) [worker.mode; default core].
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Subject filter [worker.subject_filter; default <prefix>.>].
    #[arg(long)]
    pub subject_filter: Option<String>,
    /// Queue group in core mode [worker.queue_group; default windrow-workers].
    #[arg(long)]
    pub queue_group: Option<String>,
    /// Stream in jetstream mode [worker.stream; default TELEMETRY].
    #[arg(long)]
    pub stream: Option<String>,
    /// Durable consumer in jetstream mode [worker.durable; default windrow-workers].
    #[arg(long)]
    pub durable: Option<String>,
    /// Data directory: one LMDB environment per UTC day [worker.store.dir; default data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Days kept [worker.store.retention_days; default 7].
    #[arg(long)]
    pub retention_days: Option<u32>,
    /// Messages per commit [worker.batch_max_messages; default 20000].
    #[arg(long)]
    pub batch_max_messages: Option<usize>,
    /// Longest wait before committing a partial batch, ms [worker.batch_max_wait_ms; default 100].
    #[arg(long)]
    pub batch_max_wait_ms: Option<u64>,
    /// Series key from these topic levels (0-based, negative from the end), repeatable [worker.decode.series_levels].
    #[arg(long = "series-level", allow_hyphen_values = true)]
    pub series_levels: Vec<i32>,
    /// Series key from these JSON fields, repeatable [worker.decode.series_fields].
    #[arg(long = "series-field")]
    pub series_fields: Vec<String>,
    /// Value fields, repeatable [worker.decode.value_fields; default every numeric field].
    #[arg(long = "value-field")]
    pub value_fields: Vec<String>,
    /// Timestamp field [worker.decode.timestamp_field; default ts].
    #[arg(long)]
    pub timestamp_field: Option<String>,
    /// This worker's name in query replies [worker.node_id; default $POD_NAME or $HOSTNAME].
    #[arg(long)]
    pub node_id: Option<String>,
    /// Nodes whose data this store already holds (a replayed store put into service): queries leave their answers out of the merge; repeatable or comma-separated [worker.supersedes].
    #[arg(long, value_delimiter = ',')]
    pub supersedes: Vec<String>,
    /// Address of /metrics, /healthz, /readyz [worker.http_listen; default 0.0.0.0:9465].
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Do not publish dead-letter messages [worker.dead_letter = false].
    #[arg(long)]
    pub no_dead_letter: bool,
    /// Threads of the async runtime: 1 runs the NATS client and the batching loop on one thread [worker.threads; default 1].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run `windrow streams apply` (no --recreate) before starting.
    #[arg(long)]
    pub ensure_streams: bool,
}

/// Worker mode flag values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Core NATS queue group.
    Core,
    /// JetStream durable pull consumer.
    Jetstream,
}

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum FormatArg {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
    /// CSV with a header line.
    Csv,
}

/// `windrow query` flags.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Series: exact, a prefix ending in `*`, or `*`.
    #[arg(long, default_value = "*")]
    pub series: String,
    /// Only this value field.
    #[arg(long)]
    pub field: Option<String>,
    /// Window resolution in seconds.
    #[arg(long, default_value_t = 60)]
    pub resolution_secs: u32,
    /// Start: RFC 3339, or Unix seconds. Default: 1 hour ago.
    #[arg(long)]
    pub from: Option<String>,
    /// End (exclusive): RFC 3339, or Unix seconds. Default: now.
    #[arg(long)]
    pub to: Option<String>,
    /// Also print the latest value per series and field.
    #[arg(long)]
    pub latest: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Table)]
    pub format: FormatArg,
    /// Stop waiting once this many workers answered fully.
    #[arg(long)]
    pub expect_nodes: Option<usize>,
    /// How long to gather replies, ms.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Query subject [worker.query_subject; default windrow.query].
    #[arg(long)]
    pub query_subject: Option<String>,
}

/// `windrow export ...`.
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Copy merged windows (from every worker, over the query plane) into SQLite, incrementally.
    Sqlite(Box<ExportSqliteArgs>),
}

/// `windrow export sqlite` flags.
#[derive(Debug, Args)]
pub struct ExportSqliteArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The SQLite database file (created if missing).
    #[arg(long)]
    pub db: PathBuf,
    /// Resolutions to export, seconds, repeatable. Default: the workers' configured resolutions.
    #[arg(long = "resolution-secs")]
    pub resolutions: Vec<u32>,
    /// Series pattern: exact, a prefix ending in `*`, or `*`.
    #[arg(long, default_value = "*")]
    pub series: String,
    /// First run only: export windows from this time (RFC 3339 or Unix seconds). Default: 24 hours ago.
    #[arg(long)]
    pub from: Option<String>,
    /// Re-read this far behind the watermark, seconds, to pick up late samples. Default: worker.store.allowed_lateness_secs.
    #[arg(long)]
    pub lateness_secs: Option<u64>,
    /// Refuse to write unless this many workers answered fully.
    #[arg(long)]
    pub expect_nodes: Option<usize>,
    /// How long to gather replies, ms.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// `windrow store ...`: read a worker's store directly (safe while the worker writes).
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The worker's data directory.
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: StoreCommand,
}

/// Store subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Per day and database: entries, map size, file size.
    Stat,
    /// All windows and the latest values of one series.
    Get {
        /// The series key.
        series: String,
        /// Window resolution in seconds.
        #[arg(long, default_value_t = 60)]
        resolution_secs: u32,
        /// Output format.
        #[arg(long, value_enum, default_value_t = FormatArg::Table)]
        format: FormatArg,
    },
    /// Range and prefix scan: windows of series matching a pattern (`prefix*`) in a time range.
    Scan {
        /// Series pattern: exact, a prefix ending in `*`, or `*`.
        #[arg(long, default_value = "*")]
        series: String,
        /// Only this value field.
        #[arg(long)]
        field: Option<String>,
        /// Window resolution in seconds.
        #[arg(long, default_value_t = 60)]
        resolution_secs: u32,
        /// Start: RFC 3339 or Unix seconds. Default: the beginning.
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive): RFC 3339 or Unix seconds. Default: the end.
        #[arg(long)]
        to: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = FormatArg::Table)]
        format: FormatArg,
    },
    /// Every entry as JSON lines on stdout.
    Dump,
    /// A consistent copy of every day environment into DIR.
    Backup {
        /// Target directory (must not exist or be empty).
        dir: PathBuf,
    },
}

/// `windrow streams ...`.
#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// Print the difference between the declared streams/consumers and the server's.
    Plan(Box<StreamsArgs>),
    /// Create or update the server's streams/consumers to match the declaration.
    Apply(Box<StreamsArgs>),
}

/// `windrow streams plan|apply` flags.
#[derive(Debug, Args)]
pub struct StreamsArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Delete and create again what cannot be changed in place (a stream's
    /// messages are lost; a consumer's position is lost).
    #[arg(long)]
    pub recreate: bool,
}

/// `windrow replay` flags.
#[derive(Debug, Args)]
#[command(
    after_long_help = "Without --since/--from-seq the whole stream is read; without \
--until/--to-seq replay stops at the stream's last sequence when it started. The store at \
--into is an ordinary worker store: start `windrow worker --data-dir DIR` on it to serve queries."
)]
pub struct ReplayArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Stream to read [worker.stream; default TELEMETRY].
    #[arg(long)]
    pub stream: Option<String>,
    /// Store directory to build (created if missing; may hold an earlier replay).
    #[arg(long)]
    pub into: PathBuf,
    /// Start at messages stored at or after this time (RFC 3339 or Unix seconds).
    #[arg(long, conflicts_with = "from_seq")]
    pub since: Option<String>,
    /// Start at this stream sequence.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Stop before messages stored at or after this time (RFC 3339 or Unix seconds).
    #[arg(long, conflicts_with = "to_seq")]
    pub until: Option<String>,
    /// Stop after this stream sequence (inclusive).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Only subjects matching this filter [default: worker.subject_filter or <prefix>.>].
    #[arg(long)]
    pub subject_filter: Option<String>,
    /// Read through this durable consumer, so an interrupted replay resumes where it stopped.
    #[arg(long)]
    pub durable: Option<String>,
    /// Messages per fetch and per commit.
    #[arg(long, default_value_t = 50_000)]
    pub batch: usize,
    /// After the replay, compare the rebuilt store with the live fleet's merged
    /// windows (query plane) over the replayed time range; exit 1 on differences.
    #[arg(long)]
    pub verify: bool,
    /// With --verify: wait for this many workers to answer.
    #[arg(long, requires = "verify")]
    pub expect_nodes: Option<usize>,
    /// Progress on stderr: auto (bar on a terminal, log lines otherwise), bar, log, none.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
}

/// Progress display.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProgressArg {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    /// A progress bar.
    Bar,
    /// A log line every few seconds.
    Log,
    /// Nothing.
    None,
}
