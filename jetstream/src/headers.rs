//! Header names windrow puts on every message it publishes.
//!
//! Header values are ASCII. Time is Unix nanoseconds in decimal, so a reader
//! needs no date parser on the hot path.

/// JetStream's de-duplication id (`Nats-Msg-Id`): see the bridge's `message_id` setting.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The original MQTT topic, verbatim. Omitted when the topic holds control
/// characters (not valid in a header value); the subject always carries it.
pub const MQTT_TOPIC: &str = "Windrow-Mqtt-Topic";
/// The QoS (`0`, `1` or `2`) the bridge received the message with.
pub const MQTT_QOS: &str = "Windrow-Mqtt-Qos";
/// `true` if the message was a retained message replayed on subscribe.
pub const MQTT_RETAIN: &str = "Windrow-Mqtt-Retain";
/// When the bridge received the message: Unix time in nanoseconds.
pub const RECEIVED_AT: &str = "Windrow-Received-At";
/// W3C trace context, set when tracing is on.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state, forwarded with `traceparent`.
pub const TRACESTATE: &str = "tracestate";
/// On a dead-letter message: why the original was not forwarded or applied.
pub const DEAD_LETTER_REASON: &str = "Windrow-Dead-Letter-Reason";
/// On a dead-letter message: the original payload's size in bytes.
pub const DEAD_LETTER_PAYLOAD_BYTES: &str = "Windrow-Dead-Letter-Payload-Bytes";

/// Whether a string can be sent as a NATS header value as is.
pub fn is_header_safe(value: &str) -> bool {
    !value.chars().any(char::is_control)
}
