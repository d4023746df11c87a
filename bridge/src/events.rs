//! Telemetry events of the bridge: each logs and counts in one place.
//!
//! Metric labels come from fixed sets (QoS, delivery, reason); never a topic,
//! subject or error text.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::config::Delivery;

/// Why a message was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Payload plus headers exceed the NATS server's `max_payload`.
    Oversize,
    /// The broker sent a topic that is not a valid MQTT topic name.
    InvalidTopic,
    /// A retained message on a route with `retained = "ignore"`.
    RetainedIgnored,
    /// No route's filter matches the topic (overlapping broker subscriptions).
    NoRoute,
    /// A QoS 0 message arrived while draining for shutdown.
    ShuttingDown,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        Self::Oversize,
        Self::InvalidTopic,
        Self::RetainedIgnored,
        Self::NoRoute,
        Self::ShuttingDown,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::InvalidTopic => "invalid_topic",
            Self::RetainedIgnored => "retained_ignored",
            Self::NoRoute => "no_route",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QosLabel {
    qos: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabel {
    delivery: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

fn delivery_str(d: Delivery) -> &'static str {
    match d {
        Delivery::Core => "core",
        Delivery::Jetstream => "jetstream",
    }
}

/// The bridge's metrics. Counters are resolved once here, so the hot path
/// increments an atomic and never hashes a label set.
#[derive(Clone)]
pub struct Metrics {
    received: [Counter; 3],
    forwarded_core: Counter,
    forwarded_jetstream: Counter,
    duplicates: Counter,
    dropped: Family<ReasonLabel, Counter>,
    dead_lettered: Counter,
    retries: Counter,
    mqtt_reconnects: Counter,
    /// Messages handed to NATS and not yet acknowledged to MQTT.
    pub in_flight: Gauge,
    /// MQTT connections currently up.
    pub mqtt_connected: Gauge,
    /// 1 while the NATS connection is up.
    pub nats_connected: Gauge,
    latency_core: Histogram,
    latency_jetstream: Histogram,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let received_family = Family::<QosLabel, Counter>::default();
        let received =
            [0u8, 1, 2].map(|qos| received_family.get_or_create(&QosLabel { qos }).clone());
        registry.register(
            "windrow_bridge_received_messages",
            "MQTT messages received, by QoS",
            received_family,
        );
        let forwarded = Family::<DeliveryLabel, Counter>::default();
        let forwarded_core = forwarded
            .get_or_create(&DeliveryLabel { delivery: "core" })
            .clone();
        let forwarded_jetstream = forwarded
            .get_or_create(&DeliveryLabel {
                delivery: "jetstream",
            })
            .clone();
        registry.register(
            "windrow_bridge_forwarded_messages",
            "Messages forwarded to NATS (core: handed to the client; jetstream: acknowledged by the stream)",
            forwarded,
        );
        let duplicates = Counter::default();
        registry.register(
            "windrow_bridge_jetstream_duplicates",
            "JetStream publishes acknowledged as duplicates (Nats-Msg-Id seen within the duplicate window)",
            duplicates.clone(),
        );
        let dropped = Family::<ReasonLabel, Counter>::default();
        for r in DropReason::ALL {
            let _ = dropped.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        registry.register(
            "windrow_bridge_dropped_messages",
            "Messages not forwarded, by reason",
            dropped.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            "windrow_bridge_dead_lettered_messages",
            "Metadata of unforwardable messages published to the dead-letter subject",
            dead_lettered.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "windrow_bridge_publish_retries",
            "JetStream publishes retried (same Nats-Msg-Id) after an error or timeout",
            retries.clone(),
        );
        let mqtt_reconnects = Counter::default();
        registry.register(
            "windrow_bridge_mqtt_connection_errors",
            "MQTT connections lost or refused",
            mqtt_reconnects.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "windrow_bridge_in_flight_messages",
            "Messages handed to NATS whose MQTT acknowledgement is pending",
            in_flight.clone(),
        );
        let mqtt_connected = Gauge::default();
        registry.register(
            "windrow_bridge_mqtt_connected_connections",
            "MQTT connections currently up",
            mqtt_connected.clone(),
        );
        let nats_connected = Gauge::default();
        registry.register(
            "windrow_bridge_nats_connected",
            "1 while the NATS connection is up",
            nats_connected.clone(),
        );
        let latency = Family::<DeliveryLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let latency_core = latency
            .get_or_create(&DeliveryLabel { delivery: "core" })
            .clone();
        let latency_jetstream = latency
            .get_or_create(&DeliveryLabel {
                delivery: "jetstream",
            })
            .clone();
        registry.register(
            "windrow_bridge_publish_latency_seconds",
            "Time from MQTT receipt to NATS hand-off (core) or JetStream ack (jetstream)",
            latency,
        );
        Self {
            received,
            forwarded_core,
            forwarded_jetstream,
            duplicates,
            dropped,
            dead_lettered,
            retries,
            mqtt_reconnects,
            in_flight,
            mqtt_connected,
            nats_connected,
            latency_core,
            latency_jetstream,
        }
    }

    /// A message arrived from MQTT.
    pub fn received(&self, qos: u8) {
        if let Some(c) = self.received.get(usize::from(qos)) {
            c.inc();
        }
    }

    /// A message reached NATS, `seconds` after it was received.
    pub fn forwarded(&self, delivery: Delivery, seconds: f64) {
        match delivery {
            Delivery::Core => {
                self.forwarded_core.inc();
                self.latency_core.observe(seconds);
            }
            Delivery::Jetstream => {
                self.forwarded_jetstream.inc();
                self.latency_jetstream.observe(seconds);
            }
        }
    }

    /// JetStream reported the publish as a duplicate (already stored).
    pub fn duplicate(&self) {
        self.duplicates.inc();
    }

    /// A message was not forwarded.
    pub fn dropped(&self, reason: DropReason, topic: &str, detail: &str) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        match reason {
            DropReason::RetainedIgnored | DropReason::ShuttingDown => {
                tracing::debug!(reason = reason.as_str(), topic, detail, "message dropped")
            }
            _ => tracing::warn!(reason = reason.as_str(), topic, detail, "message dropped"),
        }
    }

    /// Metadata of a dropped message went to the dead-letter subject.
    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    /// A JetStream publish failed and will be retried with the same id.
    pub fn publish_retry(&self, attempt: u32, error: &dyn std::fmt::Display) {
        self.retries.inc();
        if attempt == 1 || attempt.is_multiple_of(20) {
            tracing::warn!(attempt, %error, "JetStream publish failed; retrying with the same Nats-Msg-Id");
        }
    }

    /// An MQTT connection was lost or refused.
    pub fn mqtt_connection_error(&self, index: usize, error: &dyn std::fmt::Display) {
        self.mqtt_reconnects.inc();
        tracing::warn!(connection = index, %error, "MQTT connection error; reconnecting");
    }

    /// The label value of `delivery`, for logs.
    pub fn delivery_name(delivery: Delivery) -> &'static str {
        delivery_str(delivery)
    }
}
