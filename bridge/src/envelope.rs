//! Turning a received MQTT publish into the NATS message that carries it.
//!
//! Pure: no I/O, so the mapping and the headers are unit-tested here.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::{header::HeaderName, HeaderMap, Subject};
use bytes::Bytes;
use rumqttc::{Publish, QoS};
use windrow_jetstream::{headers, subject, SubjectError};

use crate::config::MessageIdMode;

/// A NATS message ready to publish, kept until JetStream acknowledged it so
/// that a retry resends the same subject, headers and, crucially, the same
/// `Nats-Msg-Id`.
///
/// It keeps what the headers are made of rather than the headers: each
/// publish takes a header map by value, and cloning one per message (a map
/// and a dozen small strings) was a tenth of the bridge's CPU in QoS 1 →
/// JetStream. [`Envelope::headers`] makes them for each attempt instead. Not
/// `Clone`, so that no per-message copy creeps back in.
#[derive(Debug)]
pub struct Envelope {
    /// `<prefix>.<encoded topic>`.
    pub subject: Subject,
    /// The MQTT payload, byte for byte.
    pub payload: Bytes,
    msg_id: String,
    /// The topic, when it can travel in a header (see [`headers::is_header_safe`]).
    topic: Option<String>,
    qos: QoS,
    retain: bool,
    received_at_ns: u128,
    /// Trace context (`traceparent`, ...) of a sampled message.
    trace: Option<HeaderMap>,
}

impl Envelope {
    /// windrow's headers, `Nats-Msg-Id` included.
    pub fn headers(&self) -> HeaderMap {
        // Names built once: a name given as &str is validated and, unless it
        // is one of NATS's own, allocated again for every message.
        const MSG_ID: HeaderName = HeaderName::from_static(headers::MSG_ID);
        const MQTT_TOPIC: HeaderName = HeaderName::from_static(headers::MQTT_TOPIC);
        const MQTT_QOS: HeaderName = HeaderName::from_static(headers::MQTT_QOS);
        const MQTT_RETAIN: HeaderName = HeaderName::from_static(headers::MQTT_RETAIN);
        const RECEIVED_AT: HeaderName = HeaderName::from_static(headers::RECEIVED_AT);
        let mut h = self.trace.clone().unwrap_or_default();
        h.insert(MSG_ID, self.msg_id.as_str());
        if let Some(topic) = &self.topic {
            h.insert(MQTT_TOPIC, topic.as_str());
        }
        let qos = match self.qos {
            QoS::AtMostOnce => "0",
            QoS::AtLeastOnce => "1",
            QoS::ExactlyOnce => "2",
        };
        h.insert(MQTT_QOS, qos);
        h.insert(MQTT_RETAIN, if self.retain { "true" } else { "false" });
        h.insert(RECEIVED_AT, itoa::Buffer::new().format(self.received_at_ns));
        h
    }

    /// Carries the trace context of `span` (a sampled message).
    pub fn trace(&mut self, span: &tracing::Span) {
        let mut h = HeaderMap::new();
        crate::trace::inject(span, &mut h);
        self.trace = Some(h);
    }
}

/// The QoS as its MQTT number.
pub fn qos_number(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// Unix time now, in nanoseconds.
pub fn now_unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The message id for `topic` + `payload` under `mode`.
///
/// `content_hash` is BLAKE3 over the topic's length, the topic and the payload
/// (the length keeps `a`+`bc` apart from `ab`+`c`), truncated to 128 bits.
pub fn message_id(mode: MessageIdMode, topic: &str, payload: &[u8]) -> String {
    match mode {
        MessageIdMode::Uuid7 => uuid::Uuid::now_v7().to_string(),
        MessageIdMode::ContentHash => {
            let mut h = blake3::Hasher::new();
            h.update(&(topic.len() as u64).to_le_bytes());
            h.update(topic.as_bytes());
            h.update(payload);
            let hash = h.finalize();
            let mut id = String::with_capacity(32);
            for b in &hash.as_bytes()[..16] {
                id.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
                id.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
            }
            id
        }
    }
}

/// Builds the NATS message for `publish`.
///
/// # Errors
/// [`SubjectError::InvalidTopic`] if the broker sent a topic that is not a valid
/// MQTT topic name (nothing to map it to).
pub fn build(
    prefix: &str,
    publish: &Publish,
    mode: MessageIdMode,
    received_at_ns: u128,
) -> Result<Envelope, SubjectError> {
    let topic = publish.topic.as_str();
    let subject = subject::encode_topic(prefix, topic)?;
    Ok(Envelope {
        subject: Subject::from(subject),
        payload: publish.payload.clone(),
        msg_id: message_id(mode, topic, &publish.payload),
        topic: headers::is_header_safe(topic).then(|| topic.to_owned()),
        qos: publish.qos,
        retain: publish.retain,
        received_at_ns,
        trace: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, payload: &'static [u8], qos: QoS) -> Publish {
        Publish::new(topic, qos, payload)
    }

    #[test]
    fn envelope_carries_payload_and_headers() {
        let p = publish("room 1/temp.c", b"{\"v\":1}", QoS::AtLeastOnce);
        let e = build("w", &p, MessageIdMode::ContentHash, 42).unwrap();
        assert_eq!(e.subject.as_str(), "w.room%201.temp%2Ec");
        assert_eq!(&e.payload[..], b"{\"v\":1}");
        let h = e.headers();
        let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
        assert_eq!(get(headers::MQTT_TOPIC).as_deref(), Some("room 1/temp.c"));
        assert_eq!(get(headers::MQTT_QOS).as_deref(), Some("1"));
        assert_eq!(get(headers::MQTT_RETAIN).as_deref(), Some("false"));
        assert_eq!(get(headers::RECEIVED_AT).as_deref(), Some("42"));
        assert_eq!(get(headers::MSG_ID).map(|s| s.len()), Some(32));
    }

    #[test]
    fn content_hash_ids_are_stable_and_separate_topic_from_payload() {
        let m = MessageIdMode::ContentHash;
        assert_eq!(message_id(m, "a", b"bc"), message_id(m, "a", b"bc"));
        assert_ne!(message_id(m, "a", b"bc"), message_id(m, "ab", b"c"));
        let u = MessageIdMode::Uuid7;
        assert_ne!(message_id(u, "a", b"b"), message_id(u, "a", b"b"));
    }

    #[test]
    fn control_characters_keep_the_topic_out_of_headers_only() {
        let p = publish("a\nb", b"1", QoS::AtMostOnce);
        let e = build("w", &p, MessageIdMode::Uuid7, 0).unwrap();
        assert!(e.headers().get(headers::MQTT_TOPIC).is_none());
        assert_eq!(
            windrow_jetstream::decode_subject("w", &e.subject).unwrap(),
            "a\nb"
        );
    }
}
