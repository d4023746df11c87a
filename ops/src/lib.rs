//! Operations endpoints every windrow role serves: `/metrics`, `/healthz`, `/readyz`.
//!
//! Kubernetes probes and Prometheus scrape the same small HTTP server, so a
//! role only has to say which of its conditions hold ([`Health`]) and register
//! its metrics in a [`prometheus_client::registry::Registry`].
//!
//! # Layout
//! - [`health`]: named readiness conditions and liveness.
//! - [`server`]: the HTTP server.

pub mod health;
pub mod server;

pub use health::Health;
pub use server::{serve, Error, OpsServer};
