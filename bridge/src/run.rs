//! Starting, running and draining the bridge.

use std::{sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use windrow_ops::{Health, OpsServer};

use crate::{
    events::Metrics,
    forward::Forwarder,
    mqtt::{self, Connection},
    Config, Error,
};

/// Runs the bridge until `shutdown` is cancelled, then drains and returns.
///
/// Start-up: validate the configuration (nothing connects if it is invalid),
/// bind the operations server, connect to NATS, then open
/// `mqtt.connections` MQTT connections. The bridge is ready while NATS and
/// every MQTT connection are up.
///
/// Drain order on shutdown: stop taking MQTT messages, await outstanding
/// JetStream acks, send their MQTT acks, disconnect from MQTT, flush NATS.
/// `shutdown_timeout_secs` bounds the drain; what is unacknowledged then is
/// redelivered by the broker.
///
/// # Errors
/// [`Error::InvalidConfig`], [`Error::ReadTlsFile`], [`Error::Nats`] or
/// [`Error::Ops`] at start-up. Once running, connection problems are retried
/// forever and only reported through logs, metrics and `/readyz`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    run_with_ratio(config, shutdown, 0.0).await
}

/// [`run`], with the trace sampling ratio used when the config leaves it unset
/// (the binary passes what it read from the `OTEL_*` variables).
///
/// # Errors
/// As [`run`].
pub async fn run_with_ratio(
    config: Config,
    shutdown: CancellationToken,
    default_sample_ratio: f64,
) -> Result<(), Error> {
    config.validate()?;
    // rumqttc is built without a default TLS provider; ring is the one the
    // NATS client uses too. An error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let options = (0..config.connections())
        .map(|i| mqtt::options(&config, i))
        .collect::<Result<Vec<_>, _>>()?;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Health::new();
    health.register("nats");
    for i in 0..config.connections() {
        health.register(format!("mqtt-{i}"));
    }
    let ops = OpsServer::bind(config.http_listen).await?;
    tracing::info!(addr = %config.http_listen, "serving /metrics, /healthz, /readyz");
    let ops_stop = CancellationToken::new();
    let ops_task = tokio::spawn(ops.serve(Arc::new(registry), health.clone(), ops_stop.clone()));

    let nats = {
        let health = health.clone();
        let gauge = metrics.nats_connected.clone();
        windrow_jetstream::connect(&config.nats, "windrow-bridge", move |event| {
            match &event {
                async_nats::Event::Connected => {
                    gauge.set(1);
                    health.set("nats", true);
                    tracing::info!("NATS connected");
                }
                async_nats::Event::Disconnected => {
                    gauge.set(0);
                    health.set("nats", false);
                    tracing::warn!("NATS disconnected; reconnecting");
                }
                other => tracing::warn!(event = %other, "NATS event"),
            }
            async {}
        })
        .await?
    };
    if nats.connection_state() == async_nats::connection::State::Connected {
        metrics.nats_connected.set(1);
        health.set("nats", true);
    }

    let ratio = config.trace_sample_ratio.unwrap_or(default_sample_ratio);
    let forwarder = Arc::new(Forwarder::new(
        &config,
        nats.clone(),
        metrics.clone(),
        health.clone(),
        ratio,
    ));
    let config = Arc::new(config);
    let hard_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    for (index, options) in options.into_iter().enumerate() {
        let conn = Connection {
            index,
            options,
            config: config.clone(),
            forwarder: forwarder.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
        };
        tracker.spawn(conn.run(shutdown.clone(), hard_stop.clone()));
    }
    tracker.close();
    tracing::info!(
        connections = config.connections(),
        routes = config.routes.len(),
        "bridge running"
    );

    shutdown.cancelled().await;
    health.register("draining");
    let limit = Duration::from_secs(config.shutdown_timeout_secs);
    tracing::info!(timeout_secs = limit.as_secs(), "draining");
    if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
        tracing::warn!(
            "drain timed out; unacknowledged messages will be redelivered by the broker"
        );
        hard_stop.cancel();
        tracker.wait().await;
    }
    if tokio::time::timeout(Duration::from_secs(5), nats.flush())
        .await
        .is_err()
    {
        tracing::warn!("NATS flush timed out");
    }
    ops_stop.cancel();
    match ops_task.await {
        Ok(res) => res?,
        Err(e) => tracing::error!(error = %e, "operations server task failed"),
    }
    tracing::info!("bridge stopped");
    Ok(())
}
