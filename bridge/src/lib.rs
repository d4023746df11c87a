//! The stateless MQTT → NATS bridge.
//!
//! Subscribes to MQTT topic filters (optionally in a shared-subscription group
//! so replicas split the load), maps each topic to a NATS subject with the
//! lossless codec of [`windrow_jetstream::subject`], and publishes the payload
//! byte for byte, either fire-and-forget into core NATS or acknowledged into
//! JetStream. For QoS 1/2 on a JetStream route, the MQTT acknowledgement is
//! sent only after JetStream acknowledged, so a crash anywhere loses nothing:
//! the broker redelivers.
//!
//! # Layout
//! - [`config`]: the `[bridge]` configuration and its validation.
//! - [`error`]: the crate's error type.
//! - [`run`](mod@run): start-up, running, drain.
//! - [`events`]: metrics and logs of what happens to messages.
//! - `envelope`: MQTT publish → NATS message (subject, headers, id).
//! - `forward`: publishing to NATS, retries, the acker task.
//! - `mqtt`: the connection task that owns rumqttc's event loop, and the ack gate.
//! - `trace`: head sampling and `traceparent` propagation.

pub mod config;
mod envelope;
pub mod error;
pub mod events;
mod forward;
mod mqtt;
pub mod run;
mod trace;

pub use config::{
    Config, Delivery, InvalidConfig, MessageIdMode, MqttConfig, RetainedPolicy, Route,
};
pub use envelope::message_id;
pub use error::Error;
pub use run::{run, run_with_ratio};
