//! Payload → samples: JSON field mapping and plain numbers.
//!
//! Pure, and lean because it runs once per message on the worker's hot path:
//! a borrowing visitor walks the object, keeps only the top-level fields the
//! configuration can use and skips the rest unbuilt, so keys and strings
//! without escapes are never copied. Every failure is a [`DecodeError`] whose
//! [`reason`](DecodeError::reason) is a fixed code for metric labels and
//! dead-letter headers.

use std::{borrow::Cow, fmt, fmt::Write as _};

use compact_str::CompactString;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Number;
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::window::Sample;

/// How payloads become samples (`[worker.decode]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Series key parts from MQTT topic levels, by 0-based index; negative
    /// counts from the end (-1 = last level). Default `[]`.
    pub series_levels: Vec<i32>,
    /// Series key parts from JSON fields holding strings or numbers, after the
    /// levels; parts are joined with `/`, and with neither levels nor fields the
    /// series is the whole topic. Ignored for plain numeric payloads. Default `[]`.
    pub series_fields: Vec<String>,
    /// JSON field holding the sample time; when absent, the bridge's receive
    /// time is used. Default `ts`.
    pub timestamp_field: String,
    /// Unit of numeric timestamps (RFC 3339 strings are read whatever the unit). Default `auto`.
    pub timestamp_unit: TimestampUnit,
    /// JSON fields holding values; `[]` means every top-level number except the
    /// timestamp and series fields. Default `[]`.
    pub value_fields: Vec<String>,
    /// Field name given to a plain numeric payload. Default `value`.
    pub plain_field: String,
}

fn default_timestamp_field() -> String {
    "ts".to_owned()
}

fn default_plain_field() -> String {
    "value".to_owned()
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            series_levels: Vec::new(),
            series_fields: Vec::new(),
            timestamp_field: default_timestamp_field(),
            timestamp_unit: TimestampUnit::default(),
            value_fields: Vec::new(),
            plain_field: default_plain_field(),
        }
    }
}

/// Unit of a numeric timestamp (numbers and numeric strings alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestampUnit {
    /// By magnitude: below 1e11 seconds, below 1e14 milliseconds, below 1e17
    /// microseconds, else nanoseconds: every instant from 1973-03-03 until i64
    /// nanoseconds end (2262) reads correctly in any of the four units.
    #[default]
    Auto,
    /// Seconds.
    S,
    /// Milliseconds.
    Ms,
    /// Microseconds.
    Us,
    /// Nanoseconds.
    Ns,
}

impl DecodeConfig {
    /// Configuration problems, each naming its full key under `path` and the bad value.
    pub fn problems(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        let mut name = |key: String, v: &str| {
            // NUL separates key parts in LMDB; an empty name cannot be meant.
            if v.is_empty() || v.contains('\0') {
                p.push(format!("{key}: must be non-empty without NUL, got {v:?}"));
            }
        };
        name(format!("{path}.timestamp_field"), &self.timestamp_field);
        name(format!("{path}.plain_field"), &self.plain_field);
        for (i, f) in self.series_fields.iter().enumerate() {
            name(format!("{path}.series_fields[{i}]"), f);
        }
        for (i, f) in self.value_fields.iter().enumerate() {
            name(format!("{path}.value_fields[{i}]"), f);
        }
        for (i, f) in self.value_fields.iter().enumerate() {
            let key = format!("{path}.value_fields[{i}]");
            if self.value_fields[..i].contains(f) {
                p.push(format!(
                    "{key}: duplicate {f:?} would count every sample twice"
                ));
            }
            if *f == self.timestamp_field {
                p.push(format!("{key}: {f:?} is the timestamp field"));
            }
        }
        p
    }
}

/// Why a payload yields no samples.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is not UTF-8 (so neither JSON nor number text).
    #[error("payload is not UTF-8")]
    NotUtf8,
    /// The payload is neither JSON nor number text.
    #[error("payload is neither JSON nor a number: {detail}")]
    NotJson {
        /// The parser's message, with line and column.
        detail: String,
    },
    /// The payload is JSON, but neither an object nor a number.
    #[error("payload is a JSON {found}, not an object or a number")]
    NotAnObject {
        /// JSON type found.
        found: &'static str,
    },
    /// A configured series or value field is absent.
    #[error("field {field:?} is missing")]
    MissingField {
        /// The field.
        field: String,
    },
    /// A configured value field holds something other than a JSON number.
    #[error("field {field:?} holds a {found}, not a number")]
    NotNumeric {
        /// The field.
        field: String,
        /// JSON type found.
        found: &'static str,
    },
    /// A series field holds something other than a string or number.
    #[error("series field {field:?} holds a {found}, not a string or number")]
    BadSeriesField {
        /// The field.
        field: String,
        /// JSON type found.
        found: &'static str,
    },
    /// No value fields are configured and the object has no numeric field.
    #[error("object has no numeric fields")]
    NoValues,
    /// No timestamp field and no receive time.
    #[error("no timestamp field and no receive time")]
    MissingTimestamp,
    /// The timestamp is not a non-negative instant that fits i64 nanoseconds.
    #[error("bad timestamp {value}: {reason}")]
    BadTimestamp {
        /// The timestamp as found (clipped).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A configured topic level does not exist in this topic.
    #[error("series level {index} does not exist: the topic has {levels} levels")]
    MissingLevel {
        /// The configured index.
        index: i32,
        /// Levels in the topic.
        levels: usize,
    },
    /// The series key cannot be stored.
    #[error("series key {reason}")]
    InvalidSeries {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value field name cannot be stored (NUL separates LMDB key parts).
    #[error("field name {field:?} contains NUL")]
    InvalidField {
        /// The field (clipped).
        field: String,
    },
}

impl DecodeError {
    /// Fixed, low-cardinality code for metric labels and dead-letter headers.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotUtf8 => "not_utf8",
            Self::NotJson { .. } => "not_json",
            Self::NotAnObject { .. } => "not_an_object",
            Self::MissingField { .. } => "missing_field",
            Self::NotNumeric { .. } => "not_numeric",
            Self::BadSeriesField { .. } => "bad_series_field",
            Self::NoValues => "no_values",
            Self::MissingTimestamp => "missing_timestamp",
            Self::BadTimestamp { .. } => "bad_timestamp",
            Self::MissingLevel { .. } => "missing_level",
            Self::InvalidSeries { .. } => "invalid_series",
            Self::InvalidField { .. } => "invalid_field",
        }
    }
}

/// Decodes one message into samples: one per value field, all with the same series and time.
///
/// A JSON object maps fields per `config`; a JSON number or number text
/// (`24.5`, ` -3\n`, `1e3`) is one sample named `plain_field` at
/// `received_at_ns`. Numeric strings are not values: a device that quotes its
/// numbers is misconfigured, and guessing would hide it. With default value
/// fields the samples are ordered by field name; a repeated key's last value wins.
///
/// # Errors
/// A [`DecodeError`] naming the first problem found; never panics on any input.
pub fn decode(
    config: &DecodeConfig,
    topic: &str,
    payload: &[u8],
    received_at_ns: Option<i64>,
) -> Result<Vec<Sample>, DecodeError> {
    let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?;
    let text = text.trim_ascii();
    if !text.starts_with('{') {
        let value = text.parse::<f64>().ok().filter(|v| v.is_finite());
        let value = value.ok_or_else(|| not_plain(text))?;
        let series = series_key(config, topic, &[], &[])?;
        let ts_ns = received(received_at_ns)?;
        let field = Cow::Borrowed(config.plain_field.as_str());
        return Ok(vec![sample(&series, field, ts_ns, value)?]);
    }
    // `from_str` after one UTF-8 check: the parser then skips re-validating strings.
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = de::Deserializer::deserialize_map(&mut de, Fields(config));
    let mut entries = entries
        .and_then(|e| de.end().map(|()| e))
        .map_err(not_json)?;
    let ts_ns = match last(&entries, &config.timestamp_field) {
        Some(v) => timestamp(v, config.timestamp_unit)?,
        None => received(received_at_ns)?,
    };
    let series = series_key(config, topic, &config.series_fields, &entries)?;
    let mut samples = Vec::with_capacity(config.value_fields.len().max(4));
    for field in &config.value_fields {
        let v = last(&entries, field).ok_or_else(|| missing(field))?;
        let (field, found) = (field.as_str(), v.type_name());
        let not_numeric = || DecodeError::NotNumeric {
            field: field.to_owned(),
            found,
        };
        let value = v.number().ok_or_else(not_numeric)?;
        samples.push(sample(&series, Cow::Borrowed(field), ts_ns, value)?);
    }
    if !config.value_fields.is_empty() {
        return Ok(samples);
    }
    let ts_field = config.timestamp_field.as_str();
    entries.retain(|(k, _)| *k != ts_field && !config.series_fields.iter().any(|f| f == k));
    // Stable: a repeated key's entries stay in payload order, and only the last
    // counts, as in serde_json.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (field, v)) in entries.iter().enumerate() {
        let repeated = entries.get(i + 1).is_some_and(|(next, _)| next == field);
        if let (Some(value), false) = (v.number(), repeated) {
            samples.push(sample(&series, Cow::Borrowed(field), ts_ns, value)?);
        }
    }
    if samples.is_empty() {
        return Err(DecodeError::NoValues);
    }
    Ok(samples)
}

/// Why text is not a plain number (error path only: it parses `text` again).
fn not_plain(text: &str) -> DecodeError {
    if let Err(e) = serde_json::from_str::<IgnoredAny>(text) {
        return not_json(e);
    }
    let found = match text.as_bytes().first() {
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "bool",
        Some(b'n') => "null",
        // JSON number syntax, yet beyond f64 (`1e400`).
        _ => return not_json(de::Error::custom("number out of range")),
    };
    DecodeError::NotAnObject { found }
}

fn not_json(e: serde_json::Error) -> DecodeError {
    DecodeError::NotJson {
        detail: e.to_string(),
    }
}

fn missing(field: &str) -> DecodeError {
    DecodeError::MissingField {
        field: field.to_owned(),
    }
}

fn sample(
    series: &CompactString,
    field: Cow<'_, str>,
    ts_ns: i64,
    value: f64,
) -> Result<Sample, DecodeError> {
    if field.contains('\0') {
        return Err(DecodeError::InvalidField {
            field: clip(&field),
        });
    }
    Ok(Sample {
        series: series.clone(),
        field: CompactString::from(field),
        ts_ns,
        value,
    })
}

/// Series key: topic levels, then `fields` looked up in `entries`.
fn series_key(
    config: &DecodeConfig,
    topic: &str,
    fields: &[String],
    entries: &[Entry<'_>],
) -> Result<CompactString, DecodeError> {
    if config.series_levels.is_empty() && fields.is_empty() {
        return checked(topic.into());
    }
    // Inline up to 24 bytes, on the heap beyond.
    let mut key = CompactString::default();
    let levels = || topic.split('/').count();
    for &index in &config.series_levels {
        let i = usize::try_from(index).ok();
        let i = i.or_else(|| levels().checked_sub(index.unsigned_abs() as usize));
        let part = i.and_then(|i| topic.split('/').nth(i));
        let part = part.ok_or_else(|| DecodeError::MissingLevel {
            index,
            levels: levels(),
        })?;
        key.push_str(part);
        key.push('/');
    }
    for field in fields {
        match last(entries, field).ok_or_else(|| missing(field))? {
            // Pushed, not formatted: this runs for nearly every message.
            Scalar::Str(s) => key.push_str(s),
            // Writing to a string cannot fail.
            Scalar::Num(n) => {
                let _ = write!(key, "{n}");
            }
            Scalar::Other(found) => {
                return Err(DecodeError::BadSeriesField {
                    field: field.clone(),
                    found,
                })
            }
        }
        key.push('/');
    }
    key.pop(); // the separator after the last part
    checked(key)
}

fn checked(key: CompactString) -> Result<CompactString, DecodeError> {
    let reason = if key.is_empty() {
        "is empty"
    } else if key.contains('\0') {
        "contains NUL"
    } else {
        return Ok(key);
    };
    Err(DecodeError::InvalidSeries { reason })
}

fn received(received_at_ns: Option<i64>) -> Result<i64, DecodeError> {
    match received_at_ns {
        None => Err(DecodeError::MissingTimestamp),
        Some(ns) if ns < 0 => Err(bad(&ns, "negative")),
        Some(ns) => Ok(ns),
    }
}

fn timestamp(v: &Scalar<'_>, unit: TimestampUnit) -> Result<i64, DecodeError> {
    match v {
        Scalar::Num(n) => match (n.as_u64(), n.as_f64()) {
            (Some(n), _) => from_int(n, unit),
            (None, Some(f)) => from_float(f, unit),
            (None, None) => Err(bad(n, "not finite")),
        },
        Scalar::Str(s) => from_text(s, unit),
        Scalar::Other(t) => Err(bad(t, "not a number or string")),
    }
}

fn from_text(s: &str, unit: TimestampUnit) -> Result<i64, DecodeError> {
    if let Ok(n) = s.parse::<u64>() {
        return from_int(n, unit);
    }
    if let Ok(f) = s.parse::<f64>() {
        return from_float(f, unit);
    }
    let t = OffsetDateTime::parse(s, &Rfc3339);
    let t = t.map_err(|_| bad(&s, "neither RFC 3339 nor a number"))?;
    match i64::try_from(t.unix_timestamp_nanos()) {
        Ok(ns) if ns >= 0 => Ok(ns),
        Ok(_) => Err(bad(&s, "negative")),
        Err(_) => Err(bad(&s, "out of range")),
    }
}

/// Nanoseconds per unit; `below(limit)` says whether the value is below `limit`,
/// so that integers and floats are each compared exactly.
fn ns_per(unit: TimestampUnit, below: impl Fn(u64) -> bool) -> u64 {
    match unit {
        TimestampUnit::Auto if below(100_000_000_000) => 1_000_000_000,
        TimestampUnit::Auto if below(100_000_000_000_000) => 1_000_000,
        TimestampUnit::Auto if below(100_000_000_000_000_000) => 1_000,
        TimestampUnit::Auto | TimestampUnit::Ns => 1,
        TimestampUnit::S => 1_000_000_000,
        TimestampUnit::Ms => 1_000_000,
        TimestampUnit::Us => 1_000,
    }
}

fn from_int(n: u64, unit: TimestampUnit) -> Result<i64, DecodeError> {
    let ns = n.checked_mul(ns_per(unit, |limit| n < limit));
    ns.and_then(|ns| i64::try_from(ns).ok())
        .ok_or_else(|| bad(&n, "out of range"))
}

fn from_float(f: f64, unit: TimestampUnit) -> Result<i64, DecodeError> {
    if !f.is_finite() {
        return Err(bad(&f, "not finite"));
    }
    if f < 0.0 {
        return Err(bad(&f, "negative"));
    }
    // Whole and fraction scaled apart: `f * 1e9` alone loses ~100 ns at today's
    // seconds. `as u64` saturates, so huge values fail the checked maths.
    let per = ns_per(unit, |limit| f < limit as f64);
    let frac_ns = (f.fract() * per as f64).round() as u64;
    let ns = (f.trunc() as u64)
        .checked_mul(per)
        .and_then(|ns| ns.checked_add(frac_ns));
    ns.and_then(|ns| i64::try_from(ns).ok())
        .ok_or_else(|| bad(&f, "out of range"))
}

fn bad(value: &dyn fmt::Display, reason: &'static str) -> DecodeError {
    DecodeError::BadTimestamp {
        value: clip(&value.to_string()),
        reason,
    }
}

/// Payload text in errors is clipped: errors end up in headers and logs.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A kept top-level field; a message's fields are in payload order, repeats included.
type Entry<'a> = (Cow<'a, str>, Scalar<'a>);

fn last<'e, 'a>(entries: &'e [Entry<'a>], name: &str) -> Option<&'e Scalar<'a>> {
    entries
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// A top-level JSON value, reduced to what decoding needs.
#[derive(Debug)]
enum Scalar<'a> {
    Num(Number),
    Str(Cow<'a, str>),
    /// Any other JSON type, by name.
    Other(&'static str),
}

impl Scalar<'_> {
    fn number(&self) -> Option<f64> {
        match self {
            Self::Num(n) => n.as_f64(),
            Self::Str(_) | Self::Other(_) => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Self::Num(_) => "number",
            Self::Str(_) => "string",
            Self::Other(t) => t,
        }
    }
}

/// An object key, borrowed from the payload unless it had escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// Visits the top-level object, keeping only fields the configuration can use.
struct Fields<'c>(&'c DecodeConfig);

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = Vec<Entry<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let c = self.0;
        let mut entries = Vec::with_capacity(8);
        while let Some(Key(key)) = map.next_key()? {
            let listed = |list: &[String]| list.iter().any(|f| *f == key);
            if c.value_fields.is_empty()
                || key == c.timestamp_field.as_str()
                || listed(&c.series_fields)
                || listed(&c.value_fields)
            {
                entries.push((key, map.next_value()?));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(entries)
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// Reads one value as a [`Scalar`]; nested values are skipped, not built.
struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Num(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Num(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Number::from_f64(v).map_or(Scalar::Other("number"), Scalar::Num))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other("bool"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other("null"))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("object"))
    }
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
