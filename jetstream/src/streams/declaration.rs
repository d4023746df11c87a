//! The `[jetstream]` section as declared: streams and durable consumers,
//! their defaults, their validation, and the configuration each asks the
//! server for.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::*;

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

    pub(super) fn duplicate_window_secs(&self) -> u64 {
        self.duplicate_window_secs
            .unwrap_or(match self.max_age_secs {
                0 => DEFAULT_DUPLICATE_WINDOW_SECS,
                age => age.min(DEFAULT_DUPLICATE_WINDOW_SECS),
            })
    }

    /// The declared fields as the server spells them.
    pub(super) fn wire(&self) -> Map<String, Value> {
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
    pub(super) fn wire(&self) -> Map<String, Value> {
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
