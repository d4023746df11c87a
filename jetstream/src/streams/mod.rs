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
//!
//! Layout: `declaration` (the section's types, defaults, validation and the
//! configuration each asks the server for), `compare` (the fields compared, the
//! differences and how they are shown), and here the requests to the server.

use async_nats::jetstream::{context::RequestError, Context};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::subject::{covers_stream, subject_within};

mod compare;
mod declaration;

use compare::{normal, Field, CONSUMER_FIELDS, STREAM_FIELDS};
pub use compare::{Action, Applied, Change, Item, Plan, Target};
pub use declaration::{
    ConsumerDeclaration, Declaration, DeliverPolicy, Discard, Retention, Storage, StreamDeclaration,
};

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Longest duration in seconds whose nanoseconds fit the server's int64.
const MAX_SECS: u64 = i64::MAX as u64 / NANOS_PER_SEC;
/// The server's duplicate window when none is given (capped at `max_age`).
const DEFAULT_DUPLICATE_WINDOW_SECS: u64 = 120;
/// JetStream API error codes (`err_code`) this module reacts to.
const STREAM_NOT_FOUND: u64 = 10059;
const STREAM_NAME_IN_USE: u64 = 10058;
const CONSUMER_NOT_FOUND: u64 = 10014;

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
