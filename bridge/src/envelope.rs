//! Turning a received MQTT publish into the NATS message that carries it.
//!
//! Pure: no I/O, so the mapping and the headers are unit-tested here.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::{header::HeaderName, HeaderMap};
use bytes::Bytes;
use rumqttc::{Publish, QoS};
use windrow_jetstream::{headers, subject, SubjectError};

use crate::config::MessageIdMode;

/// A NATS message ready to publish; kept whole so that a retry resends the same
/// subject, headers and, crucially, the same `Nats-Msg-Id`.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `<prefix>.<encoded topic>`.
    pub subject: String,
    /// windrow's headers, `Nats-Msg-Id` included.
    pub headers: HeaderMap,
    /// The MQTT payload, byte for byte.
    pub payload: Bytes,
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
    // Names built once: a name given as &str is validated and, unless it is
    // one of NATS's own, allocated again for every message.
    const MSG_ID: HeaderName = HeaderName::from_static(headers::MSG_ID);
    const MQTT_TOPIC: HeaderName = HeaderName::from_static(headers::MQTT_TOPIC);
    const MQTT_QOS: HeaderName = HeaderName::from_static(headers::MQTT_QOS);
    const MQTT_RETAIN: HeaderName = HeaderName::from_static(headers::MQTT_RETAIN);
    const RECEIVED_AT: HeaderName = HeaderName::from_static(headers::RECEIVED_AT);
    let mut h = HeaderMap::new();
    h.insert(MSG_ID, message_id(mode, topic, &publish.payload).as_str());
    if headers::is_header_safe(topic) {
        h.insert(MQTT_TOPIC, topic);
    }
    let qos = match publish.qos {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    };
    h.insert(MQTT_QOS, qos);
    h.insert(MQTT_RETAIN, if publish.retain { "true" } else { "false" });
    h.insert(RECEIVED_AT, itoa::Buffer::new().format(received_at_ns));
    Ok(Envelope {
        subject,
        headers: h,
        payload: publish.payload.clone(),
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
        assert_eq!(e.subject, "w.room%201.temp%2Ec");
        assert_eq!(&e.payload[..], b"{\"v\":1}");
        let get = |k: &str| e.headers.get(k).map(|v| v.as_str().to_owned());
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
        assert!(e.headers.get(headers::MQTT_TOPIC).is_none());
        assert_eq!(
            windrow_jetstream::decode_subject("w", &e.subject).unwrap(),
            "a\nb"
        );
    }
}
