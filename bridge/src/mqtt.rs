//! One MQTT connection: the task that owns its rumqttc `EventLoop`.
//!
//! rumqttc's pitfall: acks queued for a connection that has since dropped must
//! not be sent on the next one, because packet ids restart and the broker
//! would take the ack for a different message. Every connection therefore has
//! a *generation*, bumped (under [`AckGate`]'s lock) as soon as the connection
//! is lost; an ack is only queued while its packet's generation is current,
//! and acks that slipped into the client's queue are purged on the bump.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    Request, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use windrow_ops::Health;

use crate::{
    config::Config,
    events::{DropReason, Metrics},
    forward::{run_acker, Ack, Forwarder},
    Error,
};

/// What became of an ack request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckResult {
    /// Queued for the current connection.
    Sent,
    /// The packet came on a connection that is gone; the broker will redeliver it.
    Stale,
    /// The client's request queue is full; try again shortly.
    Full,
}

/// Guards MQTT acks with the connection generation.
pub(crate) struct AckGate {
    generation: Mutex<u64>,
    client: AsyncClient,
}

impl AckGate {
    fn new(client: AsyncClient) -> Self {
        Self {
            generation: Mutex::new(0),
            client,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current connection generation.
    pub fn current(&self) -> u64 {
        *self.lock()
    }

    /// Queues the ack if its packet belongs to the current connection.
    pub fn try_ack(&self, ack: Ack) -> AckResult {
        let generation = self.lock();
        if *generation != ack.generation {
            return AckResult::Stale;
        }
        let mut p = Publish::new("", ack.qos, Vec::<u8>::new());
        p.pkid = ack.pkid;
        match self.client.try_ack(&p) {
            Ok(()) => AckResult::Sent,
            Err(_) => AckResult::Full,
        }
    }

    /// Marks the connection lost: later acks for its packets are refused, and
    /// acks already queued are removed (rumqttc would replay them on the next
    /// connection).
    fn connection_lost(&self, eventloop: &mut EventLoop) {
        let mut generation = self.lock();
        *generation += 1;
        // poll() already ran clean(); running it again under the lock drains acks
        // that were queued between that and the bump.
        eventloop.clean();
        eventloop
            .pending
            .retain(|r| !matches!(r, Request::PubAck(_) | Request::PubRec(_)));
    }
}

/// Builds the rumqttc options of connection `index`.
///
/// # Errors
/// [`Error::ReadTlsFile`] if a TLS file cannot be read.
pub(crate) fn options(config: &Config, index: usize) -> Result<MqttOptions, Error> {
    let m = &config.mqtt;
    let mut o = MqttOptions::new(config.client_id(index), m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_secs))
        .set_clean_session(m.clean_session)
        .set_manual_acks(true)
        .set_max_packet_size(m.max_packet_bytes, m.max_packet_bytes)
        .set_request_channel_capacity(m.request_channel_capacity);
    if let Some(user) = &m.username {
        o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    if m.tls {
        let read = |path: &std::path::PathBuf| {
            std::fs::read(path).map_err(|source| Error::ReadTlsFile {
                path: path.clone(),
                source,
            })
        };
        let ca = match &m.tls_ca_file {
            Some(p) => read(p)?,
            None => Vec::new(),
        };
        let client_auth = match (&m.tls_cert_file, &m.tls_key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        o.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(o)
}

fn subscriptions(config: &Config) -> Vec<SubscribeFilter> {
    config
        .routes
        .iter()
        .map(|r| {
            let path = if config.mqtt.shared_subscription {
                format!("$share/{}/{}", config.mqtt.shared_group, r.filter)
            } else {
                r.filter.clone()
            };
            let qos = match r.qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            };
            SubscribeFilter::new(path, qos)
        })
        .collect()
}

/// The shared subscriptions of QoS 0 routes: unsubscribed first when
/// draining. Mosquitto deals shared-subscription messages to every member's
/// session, a disconnected one's too, and drops the QoS 0 ones dealt to a
/// session without a connection: left subscribed, a bridge pod that restarts
/// loses its share of QoS 0 messages for as long as it is away. QoS 1/2
/// routes stay subscribed: the persistent session keeps their messages for
/// the pod's return under the same client id.
fn qos0_shared_filters(config: &Config) -> Vec<String> {
    if !config.mqtt.shared_subscription {
        return Vec::new();
    }
    subscriptions(config)
        .into_iter()
        .filter(|f| f.qos == QoS::AtMostOnce)
        .map(|f| f.path)
        .collect()
}

/// How long a draining connection waits for the broker's UNSUBACKs before it
/// stops forwarding anyway.
const UNSUBACK_WAIT: Duration = Duration::from_secs(5);

/// Everything a connection task needs.
pub(crate) struct Connection {
    pub index: usize,
    pub options: MqttOptions,
    pub config: Arc<Config>,
    pub forwarder: Arc<Forwarder>,
    pub metrics: Metrics,
    pub health: Health,
}

impl Connection {
    /// Runs the connection until `shutdown`, then drains.
    ///
    /// Drain order: unsubscribe the QoS 0 shared routes
    /// ([`qos0_shared_filters`]) and keep forwarding until the broker
    /// confirmed (UNSUBACK: what it had dealt to this connection before comes
    /// first), then stop forwarding new publishes (QoS 1/2 ones stay unacked
    /// and the broker redelivers them), let the acker finish outstanding
    /// JetStream acks and queue their MQTT acks, then DISCONNECT, which
    /// rumqttc sends after the queued acks. `hard_stop` abandons the drain.
    ///
    /// # Cancel safety
    /// `EventLoop::poll` is only dropped mid-flight when shutting down; the worst
    /// case is an ack that is not sent, and the broker redelivers that message.
    pub async fn run(self, shutdown: CancellationToken, hard_stop: CancellationToken) {
        let Connection {
            index,
            options,
            config,
            forwarder,
            metrics,
            health,
        } = self;
        let health_key = format!("mqtt-{index}");
        let capacity = config.mqtt.request_channel_capacity;
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        let gate = Arc::new(AckGate::new(client.clone()));
        let (tx, rx) = mpsc::channel(config.max_in_flight);
        let mut acker = tokio::spawn(run_acker(
            forwarder.clone(),
            gate.clone(),
            rx,
            hard_stop.clone(),
        ));
        let mut tx = Some(tx);
        let mut connected = false;
        let mut subscribed_once = false;
        let mut acker_done = false;
        let mut disconnect_sent = false;
        // UNSUBACKs still awaited while draining, and until when.
        let mut unsubscribing = 0usize;
        let mut unsubscribe_until = tokio::time::Instant::now();
        let min = Duration::from_millis(config.mqtt.reconnect_min_ms);
        let max = Duration::from_millis(config.mqtt.reconnect_max_ms);
        let mut backoff = min;
        loop {
            let event = tokio::select! {
                biased;
                () = hard_stop.cancelled() => break,
                () = shutdown.cancelled(), if tx.is_some() && unsubscribing == 0 => {
                    tracing::info!(connection = index, "draining MQTT connection");
                    if connected {
                        let filters = qos0_shared_filters(&config);
                        unsubscribing = filters
                            .iter()
                            .filter(|f| client.try_unsubscribe(f.as_str()).is_ok())
                            .count();
                        if unsubscribing < filters.len() {
                            tracing::warn!(
                                connection = index,
                                not_sent = filters.len() - unsubscribing,
                                "could not queue every UNSUBSCRIBE (request channel full): the broker keeps dealing those routes' QoS 0 messages to this session, and drops them once it is gone"
                            );
                        }
                        unsubscribe_until = tokio::time::Instant::now() + UNSUBACK_WAIT;
                    }
                    if unsubscribing == 0 {
                        tx = None; // the acker ends once its pending work is done
                    }
                    continue;
                }
                () = tokio::time::sleep_until(unsubscribe_until), if unsubscribing > 0 => {
                    tracing::warn!(connection = index, missing = unsubscribing, "no UNSUBACK from the broker in time; draining anyway");
                    unsubscribing = 0;
                    tx = None;
                    continue;
                }
                _ = &mut acker, if !acker_done => {
                    acker_done = true;
                    if !connected {
                        break;
                    }
                    disconnect_sent = client.try_disconnect().is_ok();
                    if !disconnect_sent {
                        break;
                    }
                    continue;
                }
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != ConnectReturnCode::Success {
                        tracing::error!(connection = index, code = ?ack.code, "MQTT broker refused the connection");
                        continue;
                    }
                    connected = true;
                    backoff = min;
                    metrics.mqtt_connected.inc();
                    tracing::info!(
                        connection = index,
                        client_id = %config.client_id(index),
                        session_present = ack.session_present,
                        "MQTT connected"
                    );
                    // Subscribe when the broker has no session for us, and once per
                    // process so that changed routes take effect. A resumed session
                    // keeps plain subscriptions (re-subscribing would replay retained
                    // messages), but Mosquitto 2.0 does not restore *shared*
                    // subscriptions from its persistence file after a restart while
                    // still reporting session-present, so those are always renewed.
                    // Ready once subscribed: at the SUBACK when subscribing,
                    // else now (the resumed session holds the subscriptions).
                    if !ack.session_present || !subscribed_once || config.mqtt.shared_subscription {
                        if let Err(e) = client.try_subscribe_many(subscriptions(&config)) {
                            tracing::error!(connection = index, error = %e, "cannot queue SUBSCRIBE");
                        }
                        subscribed_once = true;
                    } else {
                        health.set(&health_key, true);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    let mut refused = false;
                    for (i, code) in suback.return_codes.iter().enumerate() {
                        if *code == SubscribeReasonCode::Failure {
                            refused = true;
                            tracing::error!(
                                connection = index,
                                filter = config.routes.get(i).map(|r| r.filter.as_str()),
                                "MQTT broker refused the subscription (check its ACL); not ready"
                            );
                        }
                    }
                    health.set(&health_key, !refused);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    metrics.received(crate::envelope::qos_number(publish.qos));
                    let Some(tx) = &tx else {
                        if publish.qos == QoS::AtMostOnce {
                            metrics.dropped(DropReason::ShuttingDown, &publish.topic, "");
                        }
                        continue;
                    };
                    let generation = gate.current();
                    if let Some(work) = forwarder.handle(publish, generation).await {
                        if tx.send(work).await.is_err() {
                            tracing::error!(connection = index, "acker stopped unexpectedly");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::UnsubAck(_))) if unsubscribing > 0 => {
                    unsubscribing -= 1;
                    if unsubscribing == 0 {
                        tracing::info!(
                            connection = index,
                            "QoS 0 shared routes unsubscribed: the other members take their messages"
                        );
                        tx = None;
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) if disconnect_sent => break,
                Ok(_) => {}
                Err(e) => {
                    gate.connection_lost(&mut eventloop);
                    if connected {
                        metrics.mqtt_connected.dec();
                    }
                    connected = false;
                    health.set(&health_key, false);
                    if unsubscribing > 0 {
                        // Draining: the UNSUBACKs will not come on this connection.
                        unsubscribing = 0;
                        tx = None;
                    }
                    if tx.is_none() {
                        // Draining: outstanding acks now belong to a dead connection.
                        break;
                    }
                    metrics.mqtt_connection_error(index, &e);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        if connected {
            metrics.mqtt_connected.dec();
        }
        health.set(&health_key, false);
        if !acker_done {
            acker.abort();
        }
        tracing::info!(connection = index, "MQTT connection closed");
    }
}
