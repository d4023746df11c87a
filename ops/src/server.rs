//! The HTTP server for metrics and probes.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Health;

/// Errors of the operations server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound (in use, or not permitted).
    #[error("cannot listen on {addr} for /metrics and probes: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("operations server failed: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    health: Health,
}

/// A bound, not yet serving, operations server.
///
/// Binding is separate from serving so that a role fails at start-up, before
/// it connects anywhere, when its port is taken.
pub struct OpsServer {
    listener: TcpListener,
}

impl OpsServer {
    /// Binds `addr`.
    ///
    /// # Errors
    /// [`Error::Bind`] if the address cannot be bound.
    pub async fn bind(addr: SocketAddr) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        Ok(Self { listener })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` is cancelled.
    ///
    /// # Errors
    /// [`Error::Serve`] if accepting connections fails.
    pub async fn serve(
        self,
        registry: Arc<Registry>,
        health: Health,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(AppState { registry, health });
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(Error::Serve)
    }
}

/// Binds `addr` and serves until `shutdown` is cancelled.
///
/// # Errors
/// As [`OpsServer::bind`] and [`OpsServer::serve`].
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    OpsServer::bind(addr)
        .await?
        .serve(registry, health, shutdown)
        .await
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("encoding metrics failed: {e}\n"),
        ),
    }
}

async fn healthz() -> impl IntoResponse {
    // Liveness: the runtime answers. Readiness covers the connections.
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let failing = state.health.failing();
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", failing.join(", ")),
        )
    }
}
