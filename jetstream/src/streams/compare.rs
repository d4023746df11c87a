//! What `plan` found and `apply` did: the declared fields compared, the
//! differences per stream and consumer, and how they are shown.

use std::fmt;

use serde_json::Value;

use super::*;

/// A declared field: its key in the file, its key on the server, whether it
/// holds nanoseconds shown as seconds, and whether the server changes it in place.
pub(super) struct Field {
    pub(super) key: &'static str,
    pub(super) wire: &'static str,
    pub(super) nanos: bool,
    pub(super) in_place: bool,
}

const fn field(key: &'static str, wire: &'static str, nanos: bool, in_place: bool) -> Field {
    Field {
        key,
        wire,
        nanos,
        in_place,
    }
}

pub(super) const STREAM_FIELDS: [Field; 10] = [
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

pub(super) const CONSUMER_FIELDS: [Field; 8] = [
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
pub(super) fn normal(v: Option<&Value>) -> Option<&Value> {
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
    pub(super) fn verb(self) -> &'static str {
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
    pub(super) fn compare(
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

    pub(super) fn refusal(&self) -> Option<String> {
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
