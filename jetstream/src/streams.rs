//! JetStream as code: the streams and durable pull consumers declared in the
//! `[jetstream]` section, compared with a server ([`plan`]) and made to match
//! it ([`apply`]).
//!
//! Only the declared fields are compared and changed. An update sends the
//! server's own configuration with the declared fields replaced, so what the
//! server filled in (its defaults, fields of servers newer than 2.9) is kept.
//! What cannot change in place follows nats-server 2.9.10 (checked against it):
//! a stream's `storage` and `retention`; a consumer's `ack_policy`,
//! `deliver_policy` and push/pull kind. A consumer's `filter_subject` does
//! change in place on 2.9.10. Undeclared streams and consumers are never touched.

use std::fmt;

use async_nats::jetstream::{context::RequestError, Context};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::subject::{covers_stream, subject_within};

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Longest duration in seconds whose nanoseconds fit the server's int64.
const MAX_SECS: u64 = i64::MAX as u64 / NANOS_PER_SEC;
/// The server's duplicate window when none is given (capped at `max_age`).
const DEFAULT_DUPLICATE_WINDOW_SECS: u64 = 120;
/// JetStream API error codes (`err_code`) this module reacts to.
const STREAM_NOT_FOUND: u64 = 10059;
const STREAM_NAME_IN_USE: u64 = 10058;
const CONSUMER_NOT_FOUND: u64 = 10014;

/// The `[jetstream]` section: streams and durable consumers to keep on the server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Declaration {
    /// Streams (`[[jetstream.streams]]`). Default none: the fleet runs on core NATS.
    pub streams: Vec<StreamDeclaration>,
    /// Durable pull consumers (`[[jetstream.consumers]]`). Default none.
    pub consumers: Vec<ConsumerDeclaration>,
}

/// One `[[jetstream.streams]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamDeclaration {
    /// Stream name (no spaces, `.`, `*`, `>`, `/`). Required.
    pub name: String,
    /// Subjects captured, wildcards allowed. Required, at least one.
    pub subjects: Vec<String>,
    /// `file` or `memory`; cannot change in place. Default `file`.
    pub storage: Storage,
    /// `limits`, `interest` or `workqueue`; cannot change in place. Default `limits`.
    pub retention: Retention,
    /// Copies kept in a cluster, 1 to 5. Default 1.
    pub replicas: u32,
    /// Oldest message kept, in seconds; 0 for no limit. Default 0.
    pub max_age_secs: u64,
    /// Largest total size in bytes; -1 for no limit. Default -1.
    pub max_bytes: i64,
    /// Most messages kept; -1 for no limit. Default -1.
    pub max_msgs: i64,
    /// Most messages kept per subject; -1 for no limit. Default -1.
    pub max_msgs_per_subject: i64,
    /// `Nats-Msg-Id` deduplication window in seconds. Default 120, or `max_age_secs` if shorter.
    pub duplicate_window_secs: Option<u64>,
    /// At a limit, `old` deletes old messages, `new` refuses new ones. Default `old`.
    pub discard: Discard,
}

/// One `[[jetstream.consumers]]` entry: a durable pull consumer with explicit acks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerDeclaration {
    /// The stream it reads. Required.
    pub stream: String,
    /// Durable name. Required.
    pub durable: String,
    /// Only messages on this subject (wildcards allowed). Default: the whole stream.
    pub filter_subject: Option<String>,
    /// Where a new consumer starts: `all`, `new`, `last`, `last_per_subject`;
    /// cannot change in place. Default `all`.
    pub deliver_policy: DeliverPolicy,
    /// Seconds before an unacknowledged message is redelivered. Default 30,
    /// or `backoff_secs[0]` (the server uses that when `backoff_secs` is set).
    pub ack_wait_secs: Option<u64>,
    /// Deliveries per message; -1 for no limit. Default 10.
    pub max_deliver: i64,
    /// Unacknowledged messages before delivery pauses; -1 for no limit. Default 50000.
    pub max_ack_pending: i64,
    /// Redelivery delays in seconds, one per delivery. Default none.
    pub backoff_secs: Vec<u64>,
}

/// Stream storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk.
    #[default]
    File,
    /// In memory.
    Memory,
}

/// Stream retention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    /// Kept until a limit removes them.
    #[default]
    Limits,
    /// Kept while a consumer has not acknowledged them.
    Interest,
    /// Removed once acknowledged.
    Workqueue,
}

/// What a stream at a limit discards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    /// Old messages.
    #[default]
    Old,
    /// New messages (publishes fail).
    New,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicy {
    /// The first message in the stream.
    #[default]
    All,
    /// Messages stored after the consumer was created.
    New,
    /// The last message in the stream.
    Last,
    /// The last message of every subject.
    LastPerSubject,
}

impl Default for StreamDeclaration {
    fn default() -> Self {
        Self {
            name: String::new(),
            subjects: Vec::new(),
            storage: Storage::default(),
            retention: Retention::default(),
            replicas: default_replicas(),
            max_age_secs: 0,
            max_bytes: UNLIMITED,
            max_msgs: UNLIMITED,
            max_msgs_per_subject: UNLIMITED,
            duplicate_window_secs: None,
            discard: Discard::default(),
        }
    }
}

impl Default for ConsumerDeclaration {
    fn default() -> Self {
        Self {
            stream: String::new(),
            durable: String::new(),
            filter_subject: None,
            deliver_policy: DeliverPolicy::default(),
            ack_wait_secs: None,
            max_deliver: default_max_deliver(),
            max_ack_pending: default_max_ack_pending(),
            backoff_secs: Vec::new(),
        }
    }
}

const UNLIMITED: i64 = -1;
const DEFAULT_ACK_WAIT_SECS: u64 = 30;

fn default_replicas() -> u32 {
    1
}
fn default_max_deliver() -> i64 {
    10
}
fn default_max_ack_pending() -> i64 {
    50_000
}

/// Errors of [`plan`] and [`apply`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The declaration is invalid; one line per problem, naming the key.
    #[error("invalid declaration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    /// Changes that cannot be made in place, one line per stream or consumer and field.
    #[error("refused (a delete and create is needed):\n  {}", .0.join("\n  "))]
    Refused(Vec<String>),
    /// A consumer's stream is neither on the server nor declared.
    #[error("consumer {stream}/{durable}: stream {stream} is not on the server and not declared in jetstream.streams")]
    MissingStream {
        /// The stream.
        stream: String,
        /// The consumer.
        durable: String,
    },
    /// The request failed (no connection, timeout, JetStream disabled).
    #[error("{what}: {source}")]
    Request {
        /// The operation, e.g. `stream TELEMETRY: create`.
        what: String,
        /// The cause.
        #[source]
        source: RequestError,
    },
    /// The server answered with an error.
    #[error("{what}: the server refused: {description} (err_code {err_code})")]
    Api {
        /// The operation.
        what: String,
        /// JetStream error code.
        err_code: u64,
        /// The server's text.
        description: String,
    },
}

impl Error {
    /// True for problems of the declaration (invalid, refused, missing stream),
    /// false for server and connection failures.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Invalid(_) | Self::Refused(_) | Self::MissingStream { .. }
        )
    }
}

impl Declaration {
    /// Checks everything that can be checked without a server.
    ///
    /// # Errors
    /// [`Error::Invalid`] with every problem, each naming its key
    /// (`jetstream.streams[0].subjects: must not be empty`).
    pub fn validate(&self) -> Result<(), Error> {
        let mut p = Vec::new();
        for (i, s) in self.streams.iter().enumerate() {
            s.problems(&format!("jetstream.streams[{i}]"), &mut p);
            if self.streams[..i].iter().any(|o| o.name == s.name) {
                p.push(format!(
                    "jetstream.streams[{i}].name: {:?} is declared twice",
                    s.name
                ));
            }
        }
        for (i, c) in self.consumers.iter().enumerate() {
            let path = format!("jetstream.consumers[{i}]");
            c.problems(&path, &mut p);
            if self.consumers[..i]
                .iter()
                .any(|o| o.stream == c.stream && o.durable == c.durable)
            {
                p.push(format!(
                    "{path}.durable: {:?} is declared twice on stream {:?}",
                    c.durable, c.stream
                ));
            }
            let stream = self.streams.iter().find(|s| s.name == c.stream);
            if let (Some(stream), Some(filter)) = (stream, &c.filter_subject) {
                if !stream.subjects.iter().any(|s| subject_within(filter, s)) {
                    p.push(format!(
                        "{path}.filter_subject: {filter:?} is not within the subjects of stream {:?} ({:?})",
                        stream.name, stream.subjects
                    ));
                }
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(p))
        }
    }

    /// Advice that does not stop `plan` or `apply`, one line per case, naming
    /// the key: a consumer whose filter covers its whole (declared) stream.
    /// nats-server 2.9 counts a filtered consumer's pending messages by
    /// scanning the stream under the consumer's lock, which starves deliveries
    /// once a backlog builds up; without the filter the count is O(1).
    pub fn warnings(&self) -> Vec<String> {
        self.consumers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let stream = self.streams.iter().find(|s| s.name == c.stream)?;
                let filter = c.filter_subject.as_ref()?;
                covers_stream(&stream.subjects, filter).then(|| {
                    format!(
                        "jetstream.consumers[{i}].filter_subject: {filter:?} covers all of stream {:?}: \
                         leave it out (nats-server 2.9 scans the stream to count a filtered \
                         consumer's pending messages, which starves deliveries under a backlog)",
                        stream.name
                    )
                })
            })
            .collect()
    }

    /// True when nothing is declared.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty() && self.consumers.is_empty()
    }
}

impl StreamDeclaration {
    fn problems(&self, path: &str, p: &mut Vec<String>) {
        name_problems(&format!("{path}.name"), &self.name, p);
        if self.subjects.is_empty() {
            p.push(format!("{path}.subjects: must not be empty"));
        }
        for (j, s) in self.subjects.iter().enumerate() {
            if let Err(e) = check_subject(s) {
                p.push(format!("{path}.subjects[{j}]: {e}, got {s:?}"));
            } else if self.subjects[..j].contains(s) {
                p.push(format!("{path}.subjects[{j}]: {s:?} is listed twice"));
            }
        }
        if !(1..=5).contains(&self.replicas) {
            p.push(format!(
                "{path}.replicas: must be 1 to 5, got {}",
                self.replicas
            ));
        }
        if self.max_age_secs > MAX_SECS {
            p.push(format!(
                "{path}.max_age_secs: must be ≤ {MAX_SECS}, got {}",
                self.max_age_secs
            ));
        }
        for (key, v) in [
            ("max_bytes", self.max_bytes),
            ("max_msgs", self.max_msgs),
            ("max_msgs_per_subject", self.max_msgs_per_subject),
        ] {
            if v == 0 || v < UNLIMITED {
                p.push(format!(
                    "{path}.{key}: must be ≥ 1 or -1 (no limit), got {v}"
                ));
            }
        }
        match self.duplicate_window_secs {
            Some(0) => p.push(format!(
                "{path}.duplicate_window_secs: must be ≥ 1 (leave it out for the default), got 0"
            )),
            Some(w) if self.max_age_secs > 0 && w > self.max_age_secs => p.push(format!(
                "{path}.duplicate_window_secs: must be ≤ max_age_secs ({}), got {w}",
                self.max_age_secs
            )),
            Some(w) if w > MAX_SECS => p.push(format!(
                "{path}.duplicate_window_secs: must be ≤ {MAX_SECS}, got {w}"
            )),
            _ => {}
        }
    }

    fn duplicate_window_secs(&self) -> u64 {
        self.duplicate_window_secs
            .unwrap_or(match self.max_age_secs {
                0 => DEFAULT_DUPLICATE_WINDOW_SECS,
                age => age.min(DEFAULT_DUPLICATE_WINDOW_SECS),
            })
    }

    /// The declared fields as the server spells them.
    fn wire(&self) -> Map<String, Value> {
        let v = json!({
            "name": self.name,
            "subjects": self.subjects,
            "storage": self.storage,
            "retention": self.retention,
            "num_replicas": self.replicas,
            "max_age": self.max_age_secs * NANOS_PER_SEC,
            "max_bytes": self.max_bytes,
            "max_msgs": self.max_msgs,
            "max_msgs_per_subject": self.max_msgs_per_subject,
            "duplicate_window": self.duplicate_window_secs() * NANOS_PER_SEC,
            "discard": self.discard,
        });
        into_map(v)
    }
}

impl ConsumerDeclaration {
    fn problems(&self, path: &str, p: &mut Vec<String>) {
        name_problems(&format!("{path}.stream"), &self.stream, p);
        name_problems(&format!("{path}.durable"), &self.durable, p);
        if let Some(f) = &self.filter_subject {
            if let Err(e) = check_subject(f) {
                p.push(format!("{path}.filter_subject: {e}, got {f:?}"));
            }
        }
        match self.ack_wait_secs {
            Some(0) => p.push(format!("{path}.ack_wait_secs: must be ≥ 1, got 0")),
            Some(w) if w > MAX_SECS => {
                p.push(format!("{path}.ack_wait_secs: must be ≤ {MAX_SECS}, got {w}"));
            }
            Some(w) if self.backoff_secs.first().is_some_and(|b| *b != w) => p.push(format!(
                "{path}.ack_wait_secs: the server uses backoff_secs[0] ({}) when backoff_secs is set; leave ack_wait_secs out or make it equal, got {w}",
                self.backoff_secs[0]
            )),
            _ => {}
        }
        for (key, v) in [
            ("max_deliver", self.max_deliver),
            ("max_ack_pending", self.max_ack_pending),
        ] {
            if v == 0 || v < UNLIMITED {
                p.push(format!(
                    "{path}.{key}: must be ≥ 1 or -1 (no limit), got {v}"
                ));
            }
        }
        for (j, b) in self.backoff_secs.iter().enumerate() {
            if *b == 0 || *b > MAX_SECS {
                p.push(format!(
                    "{path}.backoff_secs[{j}]: must be 1 to {MAX_SECS}, got {b}"
                ));
            }
        }
        let n = self.backoff_secs.len();
        if n > 0 && (self.max_deliver == UNLIMITED || self.max_deliver <= n as i64) {
            p.push(format!(
                "{path}.max_deliver: must be more than the {n} backoff_secs values (and not -1), got {}",
                self.max_deliver
            ));
        }
    }

    /// The declared fields as the server spells them; unset ones are absent.
    fn wire(&self) -> Map<String, Value> {
        let ack_wait = self
            .backoff_secs
            .first()
            .copied()
            .or(self.ack_wait_secs)
            .unwrap_or(DEFAULT_ACK_WAIT_SECS);
        let mut m = into_map(json!({
            "durable_name": self.durable,
            "ack_policy": "explicit",
            "deliver_policy": self.deliver_policy,
            "ack_wait": ack_wait * NANOS_PER_SEC,
            "max_deliver": self.max_deliver,
            "max_ack_pending": self.max_ack_pending,
        }));
        if let Some(f) = &self.filter_subject {
            m.insert("filter_subject".into(), json!(f));
        }
        if !self.backoff_secs.is_empty() {
            let b: Vec<u64> = self
                .backoff_secs
                .iter()
                .map(|s| s * NANOS_PER_SEC)
                .collect();
            m.insert("backoff".into(), json!(b));
        }
        m
    }
}

fn into_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn name_problems(key: &str, name: &str, p: &mut Vec<String>) {
    if name.is_empty() {
        p.push(format!("{key}: must not be empty"));
    } else if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
    {
        p.push(format!(
            "{key}: must not contain white space, `.`, `*`, `>`, `/` or `\\`, got {name:?}"
        ));
    }
}

/// Checks a subject that may hold wildcards (`*` as a token, `>` as the last token).
fn check_subject(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err("has an empty token");
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain white space");
        }
        if (t.contains(['*', '>']) && t.len() > 1) || (*t == ">" && i + 1 != tokens.len()) {
            return Err("`*` must be a whole token and `>` the whole last token");
        }
    }
    Ok(())
}

/// A declared field: its key in the file, its key on the server, whether it
/// holds nanoseconds shown as seconds, and whether the server changes it in place.
struct Field {
    key: &'static str,
    wire: &'static str,
    nanos: bool,
    in_place: bool,
}

const fn field(key: &'static str, wire: &'static str, nanos: bool, in_place: bool) -> Field {
    Field {
        key,
        wire,
        nanos,
        in_place,
    }
}

const STREAM_FIELDS: [Field; 10] = [
    field("subjects", "subjects", false, true),
    field("storage", "storage", false, false),
    field("retention", "retention", false, false),
    field("replicas", "num_replicas", false, true),
    field("max_age_secs", "max_age", true, true),
    field("max_bytes", "max_bytes", false, true),
    field("max_msgs", "max_msgs", false, true),
    field("max_msgs_per_subject", "max_msgs_per_subject", false, true),
    field("duplicate_window_secs", "duplicate_window", true, true),
    field("discard", "discard", false, true),
];

const CONSUMER_FIELDS: [Field; 8] = [
    // Declared consumers are pull consumers: a push consumer has a deliver subject.
    field("deliver_subject", "deliver_subject", false, false),
    field("ack_policy", "ack_policy", false, false),
    field("deliver_policy", "deliver_policy", false, false),
    field("filter_subject", "filter_subject", false, true),
    field("ack_wait_secs", "ack_wait", true, true),
    field("max_deliver", "max_deliver", false, true),
    field("max_ack_pending", "max_ack_pending", false, true),
    field("backoff_secs", "backoff", true, true),
];

/// A value as the server means it: absent, null, `""` and `[]` are all "not set".
fn normal(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    })
}

fn show(v: Option<&Value>, nanos: bool) -> String {
    let secs = |v: &Value| match v.as_u64() {
        Some(n) if n % NANOS_PER_SEC == 0 => (n / NANOS_PER_SEC).to_string(),
        Some(n) => format!("{:.9}", n as f64 / NANOS_PER_SEC as f64),
        None => v.to_string(),
    };
    match (v, nanos) {
        (None, _) => "(none)".into(),
        (Some(Value::Array(a)), true) => {
            format!("[{}]", a.iter().map(secs).collect::<Vec<_>>().join(", "))
        }
        (Some(v), true) => secs(v),
        (Some(Value::String(s)), false) => s.clone(),
        (Some(v), false) => v.to_string(),
    }
}

/// One field that differs: `field: old → new`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key in the declaration (`max_age_secs`), or the server's for fixed ones (`ack_policy`).
    pub field: &'static str,
    /// The server's value, in the declaration's units; empty for a create.
    pub old: String,
    /// The declared value.
    pub new: String,
    /// Whether the server can make this change without a delete and create.
    pub in_place: bool,
}

/// What a stream or consumer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A stream, by name.
    Stream(String),
    /// A durable consumer.
    Consumer {
        /// Its stream.
        stream: String,
        /// Its durable name.
        durable: String,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stream(name) => write!(f, "stream {name}"),
            Self::Consumer { stream, durable } => write!(f, "consumer {stream}/{durable}"),
        }
    }
}

/// What to do (or what was done) to one stream or consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Not on the server: create it.
    Create,
    /// Every difference can change in place.
    Update,
    /// Matches the declaration.
    Unchanged,
    /// A difference cannot change in place: delete and create (refused unless asked for).
    Replace,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Unchanged => "check",
            Self::Replace => "recreate",
        }
    }
}

/// One stream or consumer of a [`Plan`] or [`Applied`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The stream or consumer.
    pub target: Target,
    /// What to do.
    pub action: Action,
    /// Field by field; for a create, every declared value.
    pub changes: Vec<Change>,
}

impl Item {
    fn compare(
        target: Target,
        fields: &[Field],
        have: Option<&Map<String, Value>>,
        want: &Map<String, Value>,
    ) -> Self {
        let Some(have) = have else {
            let changes = fields
                .iter()
                .filter_map(|f| {
                    normal(want.get(f.wire)).map(|v| Change {
                        field: f.key,
                        old: String::new(),
                        new: show(Some(v), f.nanos),
                        in_place: true,
                    })
                })
                .collect();
            return Self {
                target,
                action: Action::Create,
                changes,
            };
        };
        let changes: Vec<Change> = fields
            .iter()
            .filter_map(|f| {
                let (old, new) = (normal(have.get(f.wire)), normal(want.get(f.wire)));
                (old != new).then(|| Change {
                    field: f.key,
                    old: show(old, f.nanos),
                    new: show(new, f.nanos),
                    in_place: f.in_place,
                })
            })
            .collect();
        let action = if changes.is_empty() {
            Action::Unchanged
        } else if changes.iter().all(|c| c.in_place) {
            Action::Update
        } else {
            Action::Replace
        };
        Self {
            target,
            action,
            changes,
        }
    }

    fn refusal(&self) -> Option<String> {
        (self.action == Action::Replace).then(|| {
            let fields: Vec<String> = self
                .changes
                .iter()
                .filter(|c| !c.in_place)
                .map(|c| format!("{} ({} → {})", c.field, c.old, c.new))
                .collect();
            format!(
                "{}: cannot change in place: {}",
                self.target,
                fields.join(", ")
            )
        })
    }
}

/// The difference between the declaration and the server, from [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Streams in declaration order, then consumers.
    pub items: Vec<Item>,
}

impl Plan {
    /// True when the server already matches the declaration.
    pub fn is_unchanged(&self) -> bool {
        self.items.iter().all(|i| i.action == Action::Unchanged)
    }

    /// One line per stream or consumer that needs a delete and create, naming the fields.
    pub fn refusals(&self) -> Vec<String> {
        self.items.iter().filter_map(Item::refusal).collect()
    }

    /// The plan as text, showing replacements as permitted (`recreate`) or refused.
    pub fn display(&self, recreate: bool) -> impl fmt::Display + '_ {
        Listing {
            items: &self.items,
            done: false,
            recreate,
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.display(false).fmt(f)
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Streams in declaration order, then consumers, with what was done.
    pub items: Vec<Item>,
    /// What was lost to a delete and create (messages, consumer positions).
    pub warnings: Vec<String>,
}

impl Applied {
    /// True when nothing had to change.
    pub fn is_unchanged(&self) -> bool {
        self.items.iter().all(|i| i.action == Action::Unchanged)
    }
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Listing {
            items: &self.items,
            done: true,
            recreate: true,
        }
        .fmt(f)
    }
}

struct Listing<'a> {
    items: &'a [Item],
    done: bool,
    recreate: bool,
}

impl Listing<'_> {
    /// A planned consumer whose stream is to be recreated: it goes with its stream.
    fn goes_with_stream(&self, item: &Item) -> bool {
        let Target::Consumer { stream, .. } = &item.target else {
            return false;
        };
        !self.done
            && self.recreate
            && self
                .items
                .iter()
                .any(|i| i.action == Action::Replace && i.target == Target::Stream(stream.clone()))
    }
}

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut counts = [0usize; 4];
        for item in self.items {
            if self.goes_with_stream(item) {
                counts[0] += 1;
                writeln!(f, "{}: create again (its stream is recreated)", item.target)?;
                continue;
            }
            let (i, verb) = match (item.action, self.done) {
                (Action::Create, false) => (0, "create"),
                (Action::Create, true) => (0, "created"),
                (Action::Update, false) => (1, "update in place"),
                (Action::Update, true) => (1, "updated in place"),
                (Action::Replace, false) if self.recreate => (2, "recreate (delete + create)"),
                (Action::Replace, false) => (2, "refused: needs --recreate (delete + create)"),
                (Action::Replace, true) => (2, "recreated (deleted + created)"),
                (Action::Unchanged, _) => (3, "unchanged"),
            };
            counts[i] += 1;
            writeln!(f, "{}: {verb}", item.target)?;
            for c in &item.changes {
                match (item.action, c.in_place) {
                    (Action::Create, _) => writeln!(f, "    {} = {}", c.field, c.new)?,
                    (_, true) => writeln!(f, "    {}: {} → {}", c.field, c.old, c.new)?,
                    (_, false) => writeln!(
                        f,
                        "    {}: {} → {}  (cannot change in place)",
                        c.field, c.old, c.new
                    )?,
                }
            }
        }
        if counts[3] == self.items.len() {
            let tense = if self.done {
                "already matched"
            } else {
                "matches"
            };
            return writeln!(f, "no changes: the server {tense} the declaration");
        }
        let replace = match (self.done, self.recreate) {
            (true, _) => "recreated",
            (false, true) => "to recreate",
            (false, false) => "refused",
        };
        let [create, update, recreate, unchanged] = counts;
        let (c, u) = if self.done {
            ("created", "updated")
        } else {
            ("to create", "to update")
        };
        writeln!(
            f,
            "{create} {c}, {update} {u}, {recreate} {replace}, {unchanged} unchanged"
        )
    }
}

/// Compares the declaration with the server.
///
/// # Errors
/// [`Error::Invalid`] before any request; [`Error::MissingStream`];
/// [`Error::Request`]/[`Error::Api`] when the server cannot be asked.
pub async fn plan(js: &Context, declaration: &Declaration) -> Result<Plan, Error> {
    declaration.validate()?;
    let mut items = Vec::new();
    for s in &declaration.streams {
        let info = stream_info(js, &s.name).await?;
        items.push(stream_item(s, info.as_ref()));
    }
    for c in &declaration.consumers {
        items.push(consumer_item(js, declaration, c).await?.0);
    }
    Ok(Plan { items })
}

/// Creates and updates streams and consumers to match the declaration.
///
/// Nothing is changed when a difference cannot be made in place and
/// `recreate` is false. With `recreate`, such a stream or consumer is deleted
/// and created again; [`Applied::warnings`] says what was lost. Running it
/// again changes nothing. Another process creating the same stream at the same
/// time (replicas starting with `--ensure-streams`) is not an error.
///
/// # Errors
/// As [`plan`]; [`Error::Refused`] (before any change) without `recreate`.
pub async fn apply(
    js: &Context,
    declaration: &Declaration,
    recreate: bool,
) -> Result<Applied, Error> {
    let refusals = plan(js, declaration).await?.refusals();
    if !recreate && !refusals.is_empty() {
        return Err(Error::Refused(refusals));
    }
    let mut applied = Applied::default();
    for s in &declaration.streams {
        apply_stream(js, s, recreate, &mut applied).await?;
    }
    // Planned again after the streams: a recreated stream lost its consumers.
    for c in &declaration.consumers {
        apply_consumer(js, declaration, c, recreate, &mut applied).await?;
    }
    Ok(applied)
}

fn stream_item(s: &StreamDeclaration, info: Option<&Value>) -> Item {
    let have = info
        .and_then(|i| i.get("config"))
        .and_then(Value::as_object);
    Item::compare(
        Target::Stream(s.name.clone()),
        &STREAM_FIELDS,
        have,
        &s.wire(),
    )
}

/// The consumer's item and the server's info of it (`None` if absent).
async fn consumer_item(
    js: &Context,
    declaration: &Declaration,
    c: &ConsumerDeclaration,
) -> Result<(Item, Option<Value>), Error> {
    let target = Target::Consumer {
        stream: c.stream.clone(),
        durable: c.durable.clone(),
    };
    let subject = format!("CONSUMER.INFO.{}.{}", c.stream, c.durable);
    let info = match api(js, &format!("{target}: info"), subject, &json!({})).await {
        Ok(info) => Some(info),
        Err(Error::Api {
            err_code: CONSUMER_NOT_FOUND,
            ..
        }) => None,
        Err(Error::Api {
            err_code: STREAM_NOT_FOUND,
            ..
        }) if declaration.streams.iter().any(|s| s.name == c.stream) => None,
        Err(Error::Api {
            err_code: STREAM_NOT_FOUND,
            ..
        }) => {
            return Err(Error::MissingStream {
                stream: c.stream.clone(),
                durable: c.durable.clone(),
            })
        }
        Err(e) => return Err(e),
    };
    let have = info
        .as_ref()
        .and_then(|i| i.get("config"))
        .and_then(Value::as_object);
    Ok((
        Item::compare(target, &CONSUMER_FIELDS, have, &c.wire()),
        info,
    ))
}

async fn apply_stream(
    js: &Context,
    s: &StreamDeclaration,
    recreate: bool,
    applied: &mut Applied,
) -> Result<(), Error> {
    // Two attempts: a create can lose a race with another process creating it.
    for attempt in 0..2 {
        let info = stream_info(js, &s.name).await?;
        let item = stream_item(s, info.as_ref());
        let what = format!("{}: {}", item.target, item.action.verb());
        let res = match item.action {
            Action::Unchanged => Ok(Value::Null),
            Action::Create => api(js, &what, format!("STREAM.CREATE.{}", s.name), &s.wire()).await,
            Action::Update => {
                let mut config = config_of(info.as_ref());
                patch(&mut config, &STREAM_FIELDS, &s.wire());
                api(js, &what, format!("STREAM.UPDATE.{}", s.name), &config).await
            }
            Action::Replace if !recreate => {
                return Err(Error::Refused(item.refusal().into_iter().collect()))
            }
            Action::Replace => {
                let state = info.as_ref().and_then(|i| i.get("state"));
                let count = |k: &str| {
                    state
                        .and_then(|s| s.get(k))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                let warning = format!(
                    "{}: deleted and created again: its {} message(s) and {} consumer(s) were lost",
                    item.target,
                    count("messages"),
                    count("consumer_count")
                );
                api(js, &what, format!("STREAM.DELETE.{}", s.name), &json!({})).await?;
                tracing::warn!(stream = %s.name, "{warning}");
                applied.warnings.push(warning);
                api(js, &what, format!("STREAM.CREATE.{}", s.name), &s.wire()).await
            }
        };
        match res {
            Err(Error::Api {
                err_code: STREAM_NAME_IN_USE,
                ..
            }) if attempt == 0 => continue,
            Err(e) => return Err(e),
            Ok(_) => {
                if item.action != Action::Unchanged {
                    tracing::info!(stream = %s.name, action = ?item.action, "stream applied");
                }
                applied.items.push(item);
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn apply_consumer(
    js: &Context,
    declaration: &Declaration,
    c: &ConsumerDeclaration,
    recreate: bool,
    applied: &mut Applied,
) -> Result<(), Error> {
    let (item, info) = consumer_item(js, declaration, c).await?;
    let what = format!("{}: {}", item.target, item.action.verb());
    let create = match &c.filter_subject {
        Some(f) => format!("CONSUMER.CREATE.{}.{}.{f}", c.stream, c.durable),
        None => format!("CONSUMER.CREATE.{}.{}", c.stream, c.durable),
    };
    let request = |config: &Map<String, Value>| json!({"stream_name": c.stream, "config": config});
    match item.action {
        Action::Unchanged => {}
        Action::Create => {
            api(js, &what, create, &request(&c.wire())).await?;
        }
        Action::Update => {
            let mut config = config_of(info.as_ref());
            patch(&mut config, &CONSUMER_FIELDS, &c.wire());
            api(js, &what, create, &request(&config)).await?;
        }
        Action::Replace if !recreate => {
            return Err(Error::Refused(item.refusal().into_iter().collect()))
        }
        Action::Replace => {
            let floor = info
                .as_ref()
                .and_then(|i| i.pointer("/ack_floor/stream_seq"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let warning = format!(
                "{}: deleted and created again: its position (acknowledged up to stream sequence {floor}) was lost; it starts again by deliver_policy",
                item.target
            );
            let delete = format!("CONSUMER.DELETE.{}.{}", c.stream, c.durable);
            api(js, &what, delete, &json!({})).await?;
            tracing::warn!(stream = %c.stream, durable = %c.durable, "{warning}");
            applied.warnings.push(warning);
            api(js, &what, create, &request(&c.wire())).await?;
        }
    }
    if item.action != Action::Unchanged {
        tracing::info!(stream = %c.stream, durable = %c.durable, action = ?item.action, "consumer applied");
    }
    applied.items.push(item);
    Ok(())
}

fn config_of(info: Option<&Value>) -> Map<String, Value> {
    info.and_then(|i| i.get("config"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// Replaces the declared fields of the server's `config`; unset ones are removed.
fn patch(config: &mut Map<String, Value>, fields: &[Field], want: &Map<String, Value>) {
    for f in fields {
        match normal(want.get(f.wire)) {
            Some(v) => config.insert(f.wire.into(), v.clone()),
            None => config.remove(f.wire),
        };
    }
}

async fn stream_info(js: &Context, name: &str) -> Result<Option<Value>, Error> {
    let what = format!("stream {name}: info");
    match api(js, &what, format!("STREAM.INFO.{name}"), &json!({})).await {
        Ok(info) => Ok(Some(info)),
        Err(Error::Api {
            err_code: STREAM_NOT_FOUND,
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One JetStream API request (`subject` without the `$JS.API.` prefix).
async fn api<T: Serialize + ?Sized>(
    js: &Context,
    what: &str,
    subject: String,
    body: &T,
) -> Result<Value, Error> {
    let reply: Value = js
        .request(subject, body)
        .await
        .map_err(|source| Error::Request {
            what: what.to_owned(),
            source,
        })?;
    match reply.get("error") {
        Some(e) => Err(Error::Api {
            what: what.to_owned(),
            err_code: e.get("err_code").and_then(Value::as_u64).unwrap_or(0),
            description: e
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("no description")
                .to_owned(),
        }),
        None => Ok(reply),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stream(name: &str, subjects: &[&str]) -> StreamDeclaration {
        StreamDeclaration {
            name: name.into(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            ..StreamDeclaration::default()
        }
    }

    fn consumer(stream: &str, durable: &str) -> ConsumerDeclaration {
        ConsumerDeclaration {
            stream: stream.into(),
            durable: durable.into(),
            ..ConsumerDeclaration::default()
        }
    }

    fn problems(d: &Declaration) -> Vec<String> {
        match d.validate() {
            Ok(()) => Vec::new(),
            Err(Error::Invalid(p)) => p,
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// What nats-server 2.9.10 returned for `stream("S", &["a.>"])` created with its wire form.
    fn server_stream() -> Value {
        json!({"config": {"name": "S", "subjects": ["a.>"], "retention": "limits", "max_consumers": -1,
            "max_msgs": -1, "max_bytes": -1, "max_age": 0, "max_msgs_per_subject": -1, "max_msg_size": -1,
            "discard": "old", "storage": "file", "num_replicas": 1, "duplicate_window": 120_000_000_000_u64,
            "allow_direct": false, "mirror_direct": false, "sealed": false, "deny_delete": false,
            "deny_purge": false, "allow_rollup_hdrs": false}})
    }

    /// What nats-server 2.9.10 returned for `consumer("S", "w")` created with its wire form.
    fn server_consumer() -> Value {
        json!({"config": {"durable_name": "w", "name": "w", "deliver_policy": "all", "ack_policy": "explicit",
            "ack_wait": 30_000_000_000_u64, "max_deliver": 10, "replay_policy": "instant", "max_waiting": 512,
            "max_ack_pending": 50000, "num_replicas": 0}})
    }

    #[test]
    fn defaults_and_a_minimal_declaration_are_valid() {
        assert!(Declaration::default().validate().is_ok());
        let d = Declaration {
            streams: vec![stream("S", &["a.>", "b.*.c"])],
            consumers: vec![ConsumerDeclaration {
                filter_subject: Some("a.x.>".into()),
                ..consumer("S", "w")
            }],
        };
        assert_eq!(problems(&d), Vec::<String>::new());
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let d = Declaration {
            streams: vec![
                StreamDeclaration {
                    replicas: 0,
                    max_bytes: 0,
                    max_age_secs: 60,
                    duplicate_window_secs: Some(120),
                    ..stream("bad.name", &[])
                },
                stream("S", &["a.>", "a.>", "b..c", "c.>.d"]),
                stream("S", &["z"]),
            ],
            consumers: vec![
                ConsumerDeclaration {
                    filter_subject: Some("b.x".into()),
                    ack_wait_secs: Some(30),
                    backoff_secs: vec![1, 5],
                    max_deliver: 2,
                    max_ack_pending: 0,
                    ..consumer("S", "")
                },
                ConsumerDeclaration {
                    backoff_secs: vec![1],
                    max_deliver: -1,
                    ..consumer("S", "w")
                },
                consumer("S", "w"),
            ],
        };
        let p = problems(&d);
        let expected = [
            "jetstream.streams[0].name: must not contain white space, `.`, `*`, `>`, `/` or `\\`, got \"bad.name\"",
            "jetstream.streams[0].subjects: must not be empty",
            "jetstream.streams[0].replicas: must be 1 to 5, got 0",
            "jetstream.streams[0].max_bytes: must be ≥ 1 or -1 (no limit), got 0",
            "jetstream.streams[0].duplicate_window_secs: must be ≤ max_age_secs (60), got 120",
            "jetstream.streams[1].subjects[1]: \"a.>\" is listed twice",
            "jetstream.streams[1].subjects[2]: has an empty token, got \"b..c\"",
            "jetstream.streams[1].subjects[3]: `*` must be a whole token and `>` the whole last token, got \"c.>.d\"",
            "jetstream.streams[2].name: \"S\" is declared twice",
            "jetstream.consumers[0].durable: must not be empty",
            "jetstream.consumers[0].ack_wait_secs: the server uses backoff_secs[0] (1) when backoff_secs is set; leave ack_wait_secs out or make it equal, got 30",
            "jetstream.consumers[0].max_ack_pending: must be ≥ 1 or -1 (no limit), got 0",
            "jetstream.consumers[0].max_deliver: must be more than the 2 backoff_secs values (and not -1), got 2",
            "jetstream.consumers[0].filter_subject: \"b.x\" is not within the subjects of stream \"S\" ([\"a.>\", \"a.>\", \"b..c\", \"c.>.d\"])",
            "jetstream.consumers[1].max_deliver: must be more than the 1 backoff_secs values (and not -1), got -1",
            "jetstream.consumers[2].durable: \"w\" is declared twice on stream \"S\"",
        ];
        assert_eq!(p, expected);
    }

    #[test]
    fn a_consumer_filter_covering_its_whole_stream_is_warned_about() {
        let filtered = |filter: &str| ConsumerDeclaration {
            filter_subject: Some(filter.into()),
            ..consumer("S", "w")
        };
        let d = |c: ConsumerDeclaration| Declaration {
            streams: vec![stream("S", &["a.>", "b.*"])],
            consumers: vec![c],
        };
        let w = d(filtered(">")).warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "jetstream.consumers[0].filter_subject: \">\" covers all of stream \"S\""
            ),
            "{w:?}"
        );
        assert!(d(filtered("a.>")).warnings().is_empty());
        assert!(d(consumer("S", "w")).warnings().is_empty());
    }

    #[test]
    fn duplicate_window_defaults_to_max_age_when_shorter() {
        let mut s = stream("S", &["a"]);
        assert_eq!(s.duplicate_window_secs(), 120);
        s.max_age_secs = 30;
        assert_eq!(s.duplicate_window_secs(), 30);
        s.max_age_secs = 3600;
        assert_eq!(s.duplicate_window_secs(), 120);
        s.duplicate_window_secs = Some(600);
        assert_eq!(s.duplicate_window_secs(), 600);
    }

    #[test]
    fn the_server_echo_of_a_declaration_compares_unchanged() {
        let s = stream_item(&stream("S", &["a.>"]), Some(&server_stream()));
        assert_eq!(s.action, Action::Unchanged, "{s:?}");
        let c = Item::compare(
            Target::Stream("x".into()),
            &CONSUMER_FIELDS,
            server_consumer()["config"].as_object(),
            &consumer("S", "w").wire(),
        );
        assert_eq!(c.action, Action::Unchanged, "{c:?}");
        let missing = stream_item(&stream("S", &["a.>"]), None);
        assert_eq!(missing.action, Action::Create);
        assert!(missing
            .changes
            .iter()
            .any(|c| c.field == "max_age_secs" && c.new == "0"));
    }

    #[test]
    fn differences_are_field_by_field_in_declared_units() {
        let declared = StreamDeclaration {
            max_age_secs: 7200,
            max_msgs_per_subject: 5,
            ..stream("S", &["a.>"])
        };
        let item = stream_item(&declared, Some(&server_stream()));
        assert_eq!(item.action, Action::Update);
        let lines: Vec<String> = item
            .changes
            .iter()
            .map(|c| format!("{}: {} → {}", c.field, c.old, c.new))
            .collect();
        assert_eq!(
            lines,
            ["max_age_secs: 0 → 7200", "max_msgs_per_subject: -1 → 5"]
        );
        let memory = StreamDeclaration {
            storage: Storage::Memory,
            ..declared
        };
        let item = stream_item(&memory, Some(&server_stream()));
        assert_eq!(item.action, Action::Replace);
        assert_eq!(
            item.refusal().unwrap(),
            "stream S: cannot change in place: storage (file → memory)"
        );
    }

    #[test]
    fn consumer_policies_and_push_mode_cannot_change_in_place() {
        let mut have = server_consumer()["config"].as_object().unwrap().clone();
        have.insert("deliver_subject".into(), json!("push.here"));
        let want = ConsumerDeclaration {
            deliver_policy: DeliverPolicy::New,
            backoff_secs: vec![1, 5],
            ..consumer("S", "w")
        }
        .wire();
        let item = Item::compare(
            Target::Stream("S".into()),
            &CONSUMER_FIELDS,
            Some(&have),
            &want,
        );
        assert_eq!(item.action, Action::Replace);
        let fixed: Vec<&str> = item
            .changes
            .iter()
            .filter(|c| !c.in_place)
            .map(|c| c.field)
            .collect();
        assert_eq!(fixed, ["deliver_subject", "deliver_policy"]);
        let backoff = item
            .changes
            .iter()
            .find(|c| c.field == "backoff_secs")
            .unwrap();
        assert_eq!(
            (backoff.old.as_str(), backoff.new.as_str()),
            ("(none)", "[1, 5]")
        );
        let ack_wait = item
            .changes
            .iter()
            .find(|c| c.field == "ack_wait_secs")
            .unwrap();
        assert_eq!((ack_wait.old.as_str(), ack_wait.new.as_str()), ("30", "1"));
    }

    #[test]
    fn patch_replaces_declared_fields_and_keeps_the_rest() {
        let mut config = server_consumer()["config"].as_object().unwrap().clone();
        config.insert("filter_subject".into(), json!("a.x"));
        config.insert("description".into(), json!("kept"));
        patch(&mut config, &CONSUMER_FIELDS, &consumer("S", "w").wire());
        assert_eq!(config.get("filter_subject"), None);
        assert_eq!(config["description"], "kept");
        assert_eq!(config["max_waiting"], 512);
        assert_eq!(config["ack_policy"], "explicit");
    }

    #[test]
    fn plans_read_as_field_by_field_text() {
        let update = stream_item(
            &StreamDeclaration {
                max_age_secs: 60,
                ..stream("S", &["a.>"])
            },
            Some(&server_stream()),
        );
        let plan = Plan {
            items: vec![update, stream_item(&stream("T", &["t"]), None)],
        };
        let text = plan.to_string();
        assert!(
            text.starts_with("stream S: update in place\n    max_age_secs: 0 → 60\n    duplicate_window_secs: 120 → 60\nstream T: create\n    subjects = [\"t\"]\n"),
            "{text}"
        );
        assert!(
            text.ends_with("1 to create, 1 to update, 0 refused, 0 unchanged\n"),
            "{text}"
        );
        let same = Plan {
            items: vec![stream_item(&stream("S", &["a.>"]), Some(&server_stream()))],
        };
        assert!(same.is_unchanged());
        assert_eq!(
            same.to_string(),
            "stream S: unchanged\nno changes: the server matches the declaration\n"
        );
    }

    #[test]
    fn declarations_read_from_config_values_with_defaults() {
        let d: Declaration = serde_json::from_value(json!({
            "streams": [{"name": "S", "subjects": ["a.>"], "storage": "memory", "discard": "new"}],
            "consumers": [{"stream": "S", "durable": "w", "deliver_policy": "last_per_subject"}],
        }))
        .unwrap();
        assert_eq!(d.streams[0].storage, Storage::Memory);
        assert_eq!(d.streams[0].max_bytes, -1);
        assert_eq!(d.consumers[0].deliver_policy, DeliverPolicy::LastPerSubject);
        assert_eq!(d.consumers[0].max_ack_pending, 50_000);
        let unknown = serde_json::from_value::<Declaration>(json!({"streams": [{"nme": "S"}]}));
        assert!(unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `nme`"));
    }
}
