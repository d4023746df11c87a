//! Workers: fold telemetry from NATS into idempotent per-series time windows
//! stored in per-node LMDB, and answer queries about them.
//!
//! # Layout
//! - [`config`], [`error`], [`run`](mod@run): the role's configuration, errors, start-up and drain.
//! - [`window`]: window maths (pure): samples, mergeable aggregates, tumbling windows.
//! - [`decode`]: payload → samples (pure): JSON field mapping and plain numbers.
//! - [`store`]: LMDB (heed): one environment per UTC day, windows, latest values,
//!   applied stream sequences, batched commits, rotation and retention.
//! - `writer`: the single LMDB writer thread.
//! - `feed`: a consumer read ahead on a task of its own.
//! - `incoming`: a message from either mode or a replay, where its stream
//!   stored it, and what a durable consumer allows.
//! - `consume`: batch → commit → dead-letter → acknowledge, for both modes.
//! - `queue_group`: a core worker's subscription, and leaving its queue
//!   group without losing what the server routed to it.
//! - `pause`: noticing that the process stood still, so that a frozen
//!   jetstream worker does not apply what was redelivered elsewhere.
//! - [`query`]: the query plane's messages, a worker's answers and the merge of partials.
//! - [`replay`]: rebuild a store from a stream through the same path.
//! - [`events`]: metrics and logs.
//! - [`export`]: SQLite export of merged windows.

#![allow(missing_docs)] // TODO(#3): document the store and export APIs once they settle.

pub mod config;
mod consume;
pub mod decode;
pub mod error;
pub mod events;
pub mod export;
mod feed;
mod incoming;
mod pause;
pub mod query;
mod queue_group;
pub mod replay;
pub mod run;
pub mod store;
pub mod window;
mod writer;

pub use config::{Config, InvalidConfig, Mode};
pub use error::Error;
pub use run::{run, run_with_clock};
