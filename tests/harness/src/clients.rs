//! Real MQTT and NATS clients for driving and observing windrow in tests and benchmarks.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use async_nats::jetstream;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// One message as a NATS subscriber or stream reader saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The NATS subject.
    pub subject: String,
    /// Header name → value (first value of each).
    pub headers: HashMap<String, String>,
    /// The payload.
    pub payload: Vec<u8>,
}

fn headers_of(h: Option<&async_nats::HeaderMap>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(h) = h {
        for (k, v) in h.iter() {
            if let Some(first) = v.first() {
                out.insert(k.to_string(), first.as_str().to_owned());
            }
        }
    }
    out
}

/// Publishes `messages` to the MQTT broker on `port` from client `client_id`.
///
/// QoS 0: returns once every publish was written to the socket. QoS 1: returns
/// once the broker acknowledged every message, riding out broker restarts (the
/// session is persistent and rumqttc resends unacknowledged publishes).
/// `pace` inserts a sleep after each chunk of 1,000 messages, to spread a
/// stream over time (e.g. so that a broker can be killed mid-stream).
pub async fn mqtt_publish(
    port: u16,
    client_id: &str,
    messages: Vec<(String, Vec<u8>)>,
    qos: QoS,
    pace: Option<Duration>,
) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_inflight(100)
        .set_max_packet_size(64 << 20, 64 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    let total = messages.len();
    let producer = tokio::spawn(async move {
        for (i, (topic, payload)) in messages.into_iter().enumerate() {
            if client.publish(topic, qos, false, payload).await.is_err() {
                return client;
            }
            if let Some(p) = pace {
                if i % 1000 == 999 {
                    tokio::time::sleep(p).await;
                }
            }
        }
        client
    });
    let mut done = 0usize;
    let deadline = Instant::now() + Duration::from_secs(600);
    while done < total {
        assert!(
            Instant::now() < deadline,
            "publishing {total} messages took over 10 minutes ({done} done)"
        );
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) if qos != QoS::AtMostOnce => done += 1,
            Ok(Event::Incoming(Packet::PubComp(_))) if qos == QoS::ExactlyOnce => done += 1,
            Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => done += 1,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if let Ok(client) = producer.await {
        let _ = client.disconnect().await;
        // Let the DISCONNECT (and anything queued before it) reach the socket.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    _ => {}
                }
            }
        })
        .await;
    }
}

/// A core NATS subscription collecting everything on `subject` in the background.
pub struct Collector {
    rx: tokio::sync::mpsc::UnboundedReceiver<Received>,
    /// Everything received so far.
    pub messages: Vec<Received>,
}

impl Collector {
    /// Subscribes to `subject` (wildcards allowed) on `url`.
    pub async fn subscribe(url: &str, subject: &str) -> Collector {
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(url)
            .await
            .expect("connect collector to NATS");
        let mut sub = client
            .subscribe(subject.to_owned())
            .await
            .expect("subscribe");
        client.flush().await.expect("flush subscription");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _keep = client;
            while let Some(m) = sub.next().await {
                let r = Received {
                    subject: m.subject.to_string(),
                    headers: headers_of(m.headers.as_ref()),
                    payload: m.payload.to_vec(),
                };
                if tx.send(r).is_err() {
                    break;
                }
            }
        });
        Collector {
            rx,
            messages: Vec::new(),
        }
    }

    /// Waits until `n` messages arrived in all, or `timeout` passes since the
    /// last message arrived; returns how many arrived.
    pub async fn wait_for(&mut self, n: usize, idle_timeout: Duration) -> usize {
        while self.messages.len() < n {
            match tokio::time::timeout(idle_timeout, self.rx.recv()).await {
                Ok(Some(m)) => self.messages.push(m),
                _ => break,
            }
        }
        self.messages.len()
    }
}

/// Creates (or replaces) stream `name` capturing `subjects`, file storage,
/// with the given duplicate window.
pub async fn create_stream(url: &str, name: &str, subjects: &[&str], duplicate_window: Duration) {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    create_stream_on(client, name, subjects, duplicate_window).await;
}

/// [`create_stream`] over an existing connection (e.g. one set up for TLS).
pub async fn create_stream_on(
    client: async_nats::Client,
    name: &str,
    subjects: &[&str],
    duplicate_window: Duration,
) {
    let js = jetstream::new(client);
    let _ = js.delete_stream(name).await;
    js.create_stream(jetstream::stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        storage: jetstream::stream::StorageType::File,
        duplicate_window,
        ..Default::default()
    })
    .await
    .expect("create stream");
}

/// Reads every message of stream `name` (an ordered ephemeral consumer).
pub async fn read_stream(url: &str, name: &str) -> Vec<Received> {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    read_stream_on(client, name).await
}

/// [`read_stream`] over an existing connection (e.g. one set up for TLS).
pub async fn read_stream_on(client: async_nats::Client, name: &str) -> Vec<Received> {
    let js = jetstream::new(client);
    let mut stream = js.get_stream(name).await.expect("get stream");
    let info = stream.info().await.expect("stream info");
    let total = info.state.messages as usize;
    let mut out = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("create ordered consumer");
    let mut messages = consumer.messages().await.expect("consume");
    while out.len() < total {
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("stream read stalled")
            .expect("stream ended")
            .expect("stream message");
        out.push(Received {
            subject: m.subject.to_string(),
            headers: headers_of(m.headers.as_ref()),
            payload: m.payload.to_vec(),
        });
    }
    out
}

/// The number of messages stored in stream `name`.
pub async fn stream_len(url: &str, name: &str) -> u64 {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    stream_len_on(client, name).await
}

/// [`stream_len`] over an existing connection (e.g. one set up for TLS).
pub async fn stream_len_on(client: async_nats::Client, name: &str) -> u64 {
    let js = jetstream::new(client);
    let mut stream = js.get_stream(name).await.expect("get stream");
    stream.info().await.expect("stream info").state.messages
}

/// Durable consumer `durable` of stream `stream` as the server has it now.
pub async fn consumer_info(url: &str, stream: &str, durable: &str) -> jetstream::consumer::Info {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = jetstream::new(client);
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(durable, stream)
        .await
        .expect("get consumer");
    consumer.info().await.expect("consumer info").clone()
}

/// Waits up to `within` until the durable consumer has nothing left to
/// deliver and nothing unacknowledged (so no redelivery can still change what
/// its clients did) and returns it then; panics with its last state if not.
pub async fn wait_consumer_settled(
    url: &str,
    stream: &str,
    durable: &str,
    within: Duration,
) -> jetstream::consumer::Info {
    let settled = crate::wait_until(within, || async {
        let info = consumer_info(url, stream, durable).await;
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    let info = consumer_info(url, stream, durable).await;
    assert!(
        settled,
        "consumer {durable} not settled within {within:?}: {} pending, {} unacknowledged, \
         delivered {:?}, ack floor {:?}",
        info.num_pending, info.num_ack_pending, info.delivered, info.ack_floor
    );
    info
}
