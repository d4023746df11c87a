//! The lossless MQTT topic ⇄ NATS subject codec.
//!
//! MQTT topic levels may hold characters that a NATS token may not (`.`, `*`,
//! `>`, white space), may be empty (`a//b`, a leading or trailing `/`), and may
//! start with `$`. nats-server's own MQTT gateway maps `/` to `.` and `.` to
//! `//`, cannot carry `*`, `>` or spaces, and so is not reversible for every
//! topic. This codec is: each MQTT level becomes one NATS token, with
//!
//! - an empty level written as the token `%` (a token that no other level
//!   produces, because a literal `%` is always escaped);
//! - `%`, `.`, `*`, `>` and every white-space or control character written as
//!   `%XX` per UTF-8 byte (upper-case hex);
//! - everything else, including `$`, `/`-free Unicode and `#`/`+` inside
//!   filters' literal levels, kept as is.
//!
//! Subjects are `<prefix>.<token>(.<token>)*`. Decoding is strict: a token that
//! the encoder would not have produced (lower-case hex, a needless escape) is an
//! error, so the mapping is a bijection between valid topics and valid subjects.

use std::fmt::Write as _;

/// Why a topic, filter, prefix or subject cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The MQTT topic name is empty or holds a wildcard or NUL.
    #[error("invalid MQTT topic name {topic:?}: {reason}")]
    InvalidTopic {
        /// The offending topic.
        topic: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The MQTT topic filter is malformed.
    #[error("invalid MQTT topic filter {filter:?}: {reason}")]
    InvalidFilter {
        /// The offending filter.
        filter: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The subject prefix is not a literal NATS subject.
    #[error("invalid subject prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The offending prefix.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The NATS subject is not one that [`encode_topic`] produces for this prefix.
    #[error("subject {subject:?} is not an encoded MQTT topic under this prefix: {reason}")]
    NotEncoded {
        /// The offending subject.
        subject: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The token that stands for an empty MQTT level.
const EMPTY_LEVEL: &str = "%";

fn must_escape(c: char) -> bool {
    matches!(c, '%' | '.' | '*' | '>') || c.is_whitespace() || c.is_control()
}

fn encode_level(level: &str, out: &mut String) {
    if level.is_empty() {
        out.push_str(EMPTY_LEVEL);
        return;
    }
    for c in level.chars() {
        if must_escape(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                // Writing to a String cannot fail.
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends the MQTT level that `token` encodes to `out`.
fn decode_level(token: &str, subject: &str, out: &mut String) -> Result<(), SubjectError> {
    let not_encoded = |reason| SubjectError::NotEncoded {
        subject: subject.to_owned(),
        reason,
    };
    if token == EMPTY_LEVEL {
        return Ok(());
    }
    if token.is_empty() {
        return Err(not_encoded("empty token"));
    }
    // The common case, once per message on the workers' hot path: printable
    // ASCII that needs no escape is its own encoding.
    let plain = |b: u8| b.is_ascii_graphic() && !matches!(b, b'%' | b'.' | b'*' | b'>');
    if token.bytes().all(plain) {
        out.push_str(token);
        return Ok(());
    }
    let bytes = token.as_bytes();
    let mut raw = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) else {
                return Err(not_encoded("'%' not followed by two upper-case hex digits"));
            };
            raw.push(hi << 4 | lo);
            i += 3;
        } else {
            raw.push(bytes[i]);
            i += 1;
        }
    }
    let level = String::from_utf8(raw).map_err(|_| not_encoded("escapes are not UTF-8"))?;
    // Strictness: only the encoder's own output decodes, so the codec is a bijection.
    let mut canonical = String::with_capacity(token.len());
    encode_level(&level, &mut canonical);
    if canonical != token {
        return Err(not_encoded("token is not in canonical encoding"));
    }
    out.push_str(&level);
    Ok(())
}

/// Checks that `prefix` is a literal NATS subject (one or more tokens, no wildcards).
///
/// # Errors
/// [`SubjectError::InvalidPrefix`] naming the problem.
pub fn validate_prefix(prefix: &str) -> Result<(), SubjectError> {
    let bad = |reason| SubjectError::InvalidPrefix {
        prefix: prefix.to_owned(),
        reason,
    };
    if prefix.is_empty() {
        return Err(bad("must not be empty"));
    }
    for token in prefix.split('.') {
        if token.is_empty() {
            return Err(bad("has an empty token"));
        }
        if token == "*" || token == ">" || token.contains(['*', '>']) {
            return Err(bad("must not contain wildcards"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("must not contain white space or control characters"));
        }
    }
    Ok(())
}

/// Checks that `topic` is a valid MQTT topic name (what a publisher may send).
///
/// # Errors
/// [`SubjectError::InvalidTopic`] for an empty topic, a wildcard or NUL.
pub fn validate_topic(topic: &str) -> Result<(), SubjectError> {
    let bad = |reason| SubjectError::InvalidTopic {
        topic: topic.to_owned(),
        reason,
    };
    if topic.is_empty() {
        return Err(bad("must not be empty"));
    }
    if topic.len() > 65_535 {
        return Err(bad("longer than 65,535 bytes"));
    }
    if topic.contains(['+', '#']) {
        return Err(bad("wildcards are not allowed in topic names"));
    }
    if topic.contains('\0') {
        return Err(bad("NUL is not allowed"));
    }
    Ok(())
}

/// Maps an MQTT topic name to the NATS subject `<prefix>.<tokens>`.
///
/// The prefix is trusted (validated once at start-up with [`validate_prefix`]).
///
/// # Errors
/// [`SubjectError::InvalidTopic`] if `topic` is not a valid MQTT topic name.
pub fn encode_topic(prefix: &str, topic: &str) -> Result<String, SubjectError> {
    validate_topic(topic)?;
    let mut out = String::with_capacity(prefix.len() + topic.len() + 8);
    out.push_str(prefix);
    for level in topic.split('/') {
        out.push('.');
        encode_level(level, &mut out);
    }
    Ok(out)
}

/// Maps an NATS subject produced by [`encode_topic`] back to its MQTT topic.
///
/// # Errors
/// [`SubjectError::NotEncoded`] if the subject is not under `prefix` or a token is
/// not in the encoder's canonical form.
pub fn decode_subject(prefix: &str, subject: &str) -> Result<String, SubjectError> {
    let mut topic = String::new();
    decode_subject_into(prefix, subject, &mut topic)?;
    Ok(topic)
}

/// [`decode_subject`] into `topic`, which it clears first: a worker decodes
/// every message's subject, and reusing one buffer saves an allocation each.
///
/// # Errors
/// As [`decode_subject`]; `topic` then holds part of the topic.
pub fn decode_subject_into(
    prefix: &str,
    subject: &str,
    topic: &mut String,
) -> Result<(), SubjectError> {
    topic.clear();
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| SubjectError::NotEncoded {
            subject: subject.to_owned(),
            reason: "does not start with the prefix",
        })?;
    topic.reserve(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        decode_level(token, subject, topic)?;
    }
    Ok(())
}

/// Maps an MQTT topic filter (`+`, `#` wildcards) to the NATS subject filter
/// that matches exactly the subjects of the topics the MQTT filter matches.
///
/// A `$share/<group>/` prefix must be stripped before calling this.
///
/// # Errors
/// [`SubjectError::InvalidFilter`] for an empty filter or a misplaced wildcard.
pub fn encode_filter(prefix: &str, filter: &str) -> Result<String, SubjectError> {
    let bad = |reason| SubjectError::InvalidFilter {
        filter: filter.to_owned(),
        reason,
    };
    if filter.is_empty() {
        return Err(bad("must not be empty"));
    }
    if filter.contains('\0') {
        return Err(bad("NUL is not allowed"));
    }
    let mut out = String::with_capacity(prefix.len() + filter.len() + 8);
    out.push_str(prefix);
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        out.push('.');
        match *level {
            "+" => out.push('*'),
            "#" if i + 1 == levels.len() => out.push('>'),
            "#" => return Err(bad("'#' must be the last level")),
            l if l.contains(['+', '#']) => {
                return Err(bad("'+' and '#' must occupy a whole level"))
            }
            l => encode_level(l, &mut out),
        }
    }
    Ok(out)
}

/// Checks whether an MQTT topic name matches an MQTT topic filter.
///
/// Follows MQTT 3.1.1 §4.7: `+` matches one level, `#` the parent and any
/// number of levels below, and filters starting with a wildcard do not match
/// topics starting with `$`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `subject` is a syntactically valid, literal NATS subject: non-empty
/// tokens, no wildcards, no white space.
pub fn is_valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t.contains(['*', '>'])
                && !t.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// True when every subject matching `filter` also matches `pattern` (both NATS
/// subjects, possibly with wildcards).
pub fn subject_within(filter: &str, pattern: &str) -> bool {
    let (mut f, mut p) = (filter.split('.'), pattern.split('.'));
    loop {
        match (f.next(), p.next()) {
            (None, None) => return true,
            (Some(_), Some(">")) => return true,
            (Some(ft), Some("*")) if ft != ">" => {}
            (Some(ft), Some(pt)) if ft == pt => {}
            _ => return false,
        }
    }
}

/// The filter subject to give a consumer of a stream with `stream_subjects`
/// that should read `filter`: none (empty) when `filter` covers the whole
/// stream.
///
/// Why it matters: nats-server 2.9 counts a filtered consumer's pending
/// messages by scanning the stream from the consumer's position (or its ack
/// floor) while holding the consumer's lock, on every consumer-info request
/// and pull request. With a backlog of 100k messages each scan takes long
/// enough to starve deliveries and acks — a fleet whose durable consumer
/// carries the stream's own subject as its filter was seen crawling at ~30
/// msg/s after a worker restart. An unfiltered consumer's count is O(1).
pub fn consumer_filter(stream_subjects: &[String], filter: &str) -> String {
    if covers_stream(stream_subjects, filter) {
        String::new()
    } else {
        filter.to_owned()
    }
}

/// Whether consumer filter `filter` (non-empty) selects every subject of a
/// stream with `stream_subjects`: a filter to leave off ([`consumer_filter`]),
/// and to warn about on a consumer that already carries it.
pub fn covers_stream(stream_subjects: &[String], filter: &str) -> bool {
    !filter.is_empty()
        && !stream_subjects.is_empty()
        && stream_subjects.iter().all(|s| subject_within(s, filter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "windrow.telemetry";

    #[test]
    fn subject_within_follows_wildcards() {
        assert!(subject_within("a.b", "a.>"));
        assert!(subject_within("a.*.c", "a.>"));
        assert!(subject_within("a.b.>", "a.*.>"));
        assert!(subject_within("a.b", "a.*"));
        assert!(subject_within("a.>", "a.>"));
        assert!(subject_within("a.*", "a.*"));
        assert!(
            !subject_within("a.>", "a.*"),
            "> may be many tokens, * is one"
        );
        assert!(!subject_within("a", "a.>"), "> needs at least one token");
        assert!(!subject_within("a.b.c", "a.*"));
        assert!(!subject_within("b.c", "a.>"));
        assert!(!subject_within("a.*", "a.b"));
    }

    #[test]
    fn a_consumer_that_reads_the_whole_stream_gets_no_filter() {
        let subjects = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            consumer_filter(&subjects(&["windrow.telemetry.>"]), "windrow.telemetry.>"),
            ""
        );
        assert_eq!(
            consumer_filter(
                &subjects(&["windrow.telemetry.a.*", "windrow.telemetry.b"]),
                "windrow.telemetry.>"
            ),
            ""
        );
        assert_eq!(
            consumer_filter(
                &subjects(&["windrow.telemetry.>"]),
                "windrow.telemetry.site1.>"
            ),
            "windrow.telemetry.site1.>"
        );
        assert_eq!(
            consumer_filter(
                &subjects(&["windrow.telemetry.>", "other.>"]),
                "windrow.telemetry.>"
            ),
            "windrow.telemetry.>"
        );
        assert_eq!(
            consumer_filter(&[], "x.>"),
            "x.>",
            "a stream without subjects (a mirror) keeps the filter"
        );
    }

    #[test]
    fn awkward_topics_map_to_readable_subjects() {
        let cases = [
            ("a/b", "windrow.telemetry.a.b"),
            ("a//b", "windrow.telemetry.a.%.b"),
            ("/a/", "windrow.telemetry.%.a.%"),
            ("/", "windrow.telemetry.%.%"),
            ("v1.2/x*y>z", "windrow.telemetry.v1%2E2.x%2Ay%3Ez"),
            ("room 1/50%", "windrow.telemetry.room%201.50%25"),
            ("$SYS/broker", "windrow.telemetry.$SYS.broker"),
            ("%", "windrow.telemetry.%25"),
            ("zürich/温度", "windrow.telemetry.zürich.温度"),
        ];
        // One buffer for all, as a worker decodes a batch: each topic alone,
        // whatever the one before left in it, even a failed one.
        let mut buffer = String::from("left over");
        for (topic, subject) in cases {
            assert_eq!(encode_topic(P, topic).unwrap(), subject, "{topic:?}");
            assert_eq!(decode_subject(P, subject).unwrap(), topic, "{subject:?}");
            decode_subject_into(P, subject, &mut buffer).unwrap();
            assert_eq!(buffer, topic, "{subject:?} into a used buffer");
            assert!(decode_subject_into(P, "windrow.telemetry.ok.%41", &mut buffer).is_err());
        }
    }

    #[test]
    fn invalid_topics_and_subjects_are_rejected() {
        assert!(encode_topic(P, "").is_err());
        assert!(encode_topic(P, "a/+/b").is_err());
        assert!(encode_topic(P, "a/#").is_err());
        assert!(decode_subject(P, "other.a").is_err());
        assert!(
            decode_subject(P, "windrow.telemetry.a%2e").is_err(),
            "lower-case hex"
        );
        assert!(
            decode_subject(P, "windrow.telemetry.%41").is_err(),
            "needless escape"
        );
        assert!(decode_subject(P, "windrow.telemetry.a%2").is_err());
        assert!(
            decode_subject(P, "windrow.telemetry.%FF").is_err(),
            "not UTF-8"
        );
        assert!(decode_subject(P, "windrow.telemetry").is_err());
    }

    #[test]
    fn filters_map_wildcards() {
        assert_eq!(encode_filter(P, "#").unwrap(), "windrow.telemetry.>");
        assert_eq!(
            encode_filter(P, "a/+/c.d").unwrap(),
            "windrow.telemetry.a.*.c%2Ed"
        );
        assert_eq!(encode_filter(P, "a//#").unwrap(), "windrow.telemetry.a.%.>");
        assert!(encode_filter(P, "a/#/b").is_err());
        assert!(encode_filter(P, "a/b+").is_err());
    }

    #[test]
    fn topic_matching_follows_mqtt() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("+/+", "/x"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(topic_matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(validate_prefix("windrow").is_ok());
        assert!(validate_prefix("a.b").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("a..b").is_err());
        assert!(validate_prefix("a.*").is_err());
        assert!(validate_prefix("a b").is_err());
    }

    /// Any valid MQTT topic: levels of arbitrary Unicode except `/`, `+`, `#`, NUL.
    fn mqtt_topic() -> impl Strategy<Value = String> {
        let level = prop_oneof![
            Just(String::new()),
            "[a-z0-9]{1,8}",
            "[ .*>%$a-z\\t\\r\\n]{1,6}",
            "[^/+#\\x00]{0,12}",
        ];
        prop::collection::vec(level, 1..8)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("non-empty", |t| !t.is_empty())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn decode_inverts_encode(topic in mqtt_topic()) {
            let subject = encode_topic(P, &topic).unwrap();
            prop_assert!(is_valid_subject(&subject), "{subject:?}");
            prop_assert_eq!(decode_subject(P, &subject).unwrap(), topic);
        }

        #[test]
        fn levels_map_to_tokens_one_to_one(topic in mqtt_topic()) {
            let subject = encode_topic(P, &topic).unwrap();
            let tokens = subject.split('.').count() - P.split('.').count();
            prop_assert_eq!(tokens, topic.split('/').count());
        }

        #[test]
        fn filter_subjects_match_like_mqtt(topic in mqtt_topic(), mask in prop::collection::vec(0u8..3, 1..8)) {
            // Build a filter from the topic by replacing some levels with wildcards.
            let levels: Vec<&str> = topic.split('/').collect();
            let mut filter = Vec::new();
            for (i, level) in levels.iter().enumerate() {
                match mask.get(i).copied().unwrap_or(0) {
                    1 => filter.push("+".to_owned()),
                    2 => { filter.push("#".to_owned()); break; }
                    _ => filter.push((*level).to_owned()),
                }
            }
            let filter = filter.join("/");
            prop_assert!(topic_matches(&filter, &topic) || topic.starts_with('$'));
            let nats_filter = encode_filter(P, &filter).unwrap();
            let subject = encode_topic(P, &topic).unwrap();
            prop_assert!(nats_subject_matches(&nats_filter, &subject));
        }
    }

    /// NATS wildcard matching, for checking encoded filters.
    fn nats_subject_matches(filter: &str, subject: &str) -> bool {
        let mut f = filter.split('.');
        let mut s = subject.split('.');
        loop {
            match (f.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}
