//! The NATS contract shared by every windrow role.
//!
//! The bridge writes and the workers read the same subjects and headers; keeping
//! both sides in one crate means a change to the contract is one change.
//!
//! # Layout
//! - [`subject`]: the lossless MQTT topic ⇄ NATS subject codec.
//! - [`headers`]: the header names windrow puts on every message.
//! - [`connection`]: NATS connection options (auth, TLS) and connecting with them.
//! - [`delivery`]: a JetStream message's stream sequence and time, from its reply subject.
//! - [`streams`]: JetStream as code: the declared streams and consumers, compared with a server and applied.
//! - [`error`]: this crate's error type.

pub mod connection;
pub mod delivery;
pub mod error;
pub mod headers;
pub mod streams;
pub mod subject;

pub use connection::{connect, NatsConfig};
pub use error::Error;
pub use subject::{decode_subject, decode_subject_into, encode_filter, encode_topic, SubjectError};
