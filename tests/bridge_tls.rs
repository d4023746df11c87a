//! TLS on both sides of the bridge: to Mosquitto (server authentication, and
//! mutual TLS with `require_certificate true`) and to nats-server (`tls {}`, and
//! `verify: true` for mutual TLS), with certificates made per test by `rcgen`.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::{numbered_messages, seq_of, tally};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::QoS;
use windrow_harness::{
    clients::{create_stream_on, mqtt_publish, read_stream_on, stream_len_on},
    free_port, http_get, wait_until, Mosquitto, MosquittoOptions, NatsOptions, NatsServer,
    RoleProcess, ServerTls,
};

const STREAM: &str = "TELEMETRY";

/// A private CA with a server certificate for `127.0.0.1` and a client
/// certificate, as PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("windrow-pki-")
            .tempdir()
            .unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, format!("windrow test CA {name}"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |common_name: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, common_name);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![usage];
            p.use_authority_key_identifier_extension = true;
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf(
            "127.0.0.1",
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(
            "windrow-bridge",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        for (file, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("server.pem", server),
            ("server-key.pem", server_key),
            ("client.pem", client),
            ("client-key.pem", client_key),
        ] {
            std::fs::write(dir.path().join(file), pem).unwrap();
        }
        Pki { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    fn server_tls(&self, verify_clients: bool) -> ServerTls {
        ServerTls {
            cert_file: self.file("server.pem"),
            key_file: self.file("server-key.pem"),
            ca_file: self.ca(),
            verify_clients,
        }
    }

    /// A NATS connection of the test itself, trusting this CA and presenting the client certificate.
    async fn nats_client(&self, nats: &NatsServer) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .add_root_certificates(self.ca())
            .add_client_certificate(self.file("client.pem"), self.file("client-key.pem"))
            .require_tls(true)
            .connect(nats.url())
            .await
            .unwrap_or_else(|e| panic!("test client cannot connect over TLS: {e}"))
    }
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// What the bridge is given for TLS on one side.
#[derive(Clone, Copy)]
enum ClientTls<'a> {
    /// Verify the server with this PKI's CA.
    Ca(&'a Pki),
    /// Verify the server and present this PKI's client certificate.
    Mutual(&'a Pki),
}

impl ClientTls<'_> {
    /// The bridge flags for this side (`nats` or `mqtt`).
    fn flags(self, side: &str) -> Vec<String> {
        let (pki, mutual) = match self {
            ClientTls::Ca(p) => (p, false),
            ClientTls::Mutual(p) => (p, true),
        };
        let mut f = vec![format!("--{side}-tls-ca-file"), path(&pki.ca())];
        if mutual {
            f.extend([
                format!("--{side}-tls-cert-file"),
                path(&pki.file("client.pem")),
                format!("--{side}-tls-key-file"),
                path(&pki.file("client-key.pem")),
            ]);
        }
        f.push(if side == "mqtt" {
            "--mqtt-tls".into()
        } else {
            "--nats-tls-required".into()
        });
        f
    }
}

/// Starts `windrow bridge` to the TLS listeners of `mqtt` and `nats` without
/// waiting for readiness; returns the process and its HTTP port.
fn spawn_bridge(
    nats: &NatsServer,
    mqtt: &Mosquitto,
    client_id: &str,
    nats_tls: ClientTls<'_>,
    mqtt_tls: ClientTls<'_>,
) -> (RoleProcess, u16) {
    let http_port = free_port();
    let mut args: Vec<String> = [
        "bridge",
        "--nats-url",
        &nats.url(),
        "--mqtt-host",
        "127.0.0.1",
        "--mqtt-port",
        &mqtt.tls_port().unwrap().to_string(),
        "--client-id",
        client_id,
        "--connections",
        "2",
        "--http-listen",
        &format!("127.0.0.1:{http_port}"),
        "--route",
        "#,qos=1,delivery=jetstream",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(nats_tls.flags("nats"));
    args.extend(mqtt_tls.flags("mqtt"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    (RoleProcess::spawn(common::windrow(), &refs, &[]), http_port)
}

/// Brokers that accept only TLS from the bridge; the test's own NATS client
/// uses `pki` too, its MQTT publisher the broker's plain listener.
async fn tls_brokers(pki: &Pki, verify_clients: bool) -> (NatsServer, Mosquitto) {
    let nats = NatsServer::start_with_tls(NatsOptions::default(), pki.server_tls(verify_clients));
    let mqtt =
        Mosquitto::start_with_tls(MosquittoOptions::default(), pki.server_tls(verify_clients));
    let (nats, mqtt) = tokio::join!(nats, mqtt);
    create_stream_on(
        pki.nats_client(&nats).await,
        STREAM,
        &["windrow.telemetry.>"],
        Duration::from_secs(120),
    )
    .await;
    (nats, mqtt)
}

/// Publishes the numbered QoS 1 messages `range` of `n` and checks that
/// messages `0..range.end` are in the stream exactly once.
async fn assert_flows_end_to_end(
    pki: &Pki,
    nats: &NatsServer,
    mqtt: &Mosquitto,
    range: std::ops::Range<usize>,
) {
    let topics: Vec<String> = (0..10).map(|i| format!("tls/{i}/temp")).collect();
    let n = range.end;
    let mut messages = numbered_messages(n, &topics);
    let batch = messages.split_off(range.start);
    mqtt_publish(mqtt.port(), "publisher", batch, QoS::AtLeastOnce, None).await;
    let stored_all = wait_until(Duration::from_secs(60), || async {
        stream_len_on(pki.nats_client(nats).await, STREAM).await >= n as u64
    })
    .await;
    let stored = read_stream_on(pki.nats_client(nats).await, STREAM).await;
    assert!(stored_all, "only {} of {n} stored", stored.len());
    let (missing, dups) = tally(n, stored.iter().map(|m| seq_of(&m.payload)));
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert_eq!(dups, 0, "duplicates in the stream");
    assert!(stored.iter().all(|m| m.headers.contains_key("Nats-Msg-Id")));
}

/// A client that does not trust `pki`'s CA cannot talk to the server at all,
/// so the bridge's success is not plain TCP in disguise.
async fn assert_nats_requires_tls(nats: &NatsServer) {
    let plain = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(nats.url())
        .await;
    assert!(
        plain.is_err(),
        "a client without the CA connected to the TLS-only server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bridge_forwards_over_tls_to_mosquitto_and_nats_server() {
    let pki = Pki::new("server-auth");
    let (nats, mqtt) = tls_brokers(&pki, false).await;
    assert_nats_requires_tls(&nats).await;
    let (bridge, http_port) = spawn_bridge(
        &nats,
        &mqtt,
        "tls-bridge",
        ClientTls::Ca(&pki),
        ClientTls::Ca(&pki),
    );
    bridge.wait_ready(http_port, Duration::from_secs(30)).await;
    assert_flows_end_to_end(&pki, &nats, &mqtt, 0..2_000).await;

    // The bridge reconnects over TLS after a NATS restart (same port, same TLS config).
    let mut nats = nats;
    nats.restart().await;
    bridge.wait_ready(http_port, Duration::from_secs(30)).await;
    assert_flows_end_to_end(&pki, &nats, &mqtt, 2_000..4_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bridge_presents_client_certificates_for_mutual_tls_on_both_sides() {
    let pki = Pki::new("mutual");
    let (nats, mqtt) = tls_brokers(&pki, true).await;
    assert_nats_requires_tls(&nats).await;

    // Without its client certificates the brokers refuse the bridge: mutual TLS is on.
    let (refused, refused_port) = spawn_bridge(
        &nats,
        &mqtt,
        "no-client-cert",
        ClientTls::Ca(&pki),
        ClientTls::Ca(&pki),
    );
    let failing = wait_not_ready(&refused, refused_port, &["nats", "mqtt-0", "mqtt-1"]).await;
    drop(refused);
    eprintln!("without client certificates: {failing}");

    let (bridge, http_port) = spawn_bridge(
        &nats,
        &mqtt,
        "mtls-bridge",
        ClientTls::Mutual(&pki),
        ClientTls::Mutual(&pki),
    );
    bridge.wait_ready(http_port, Duration::from_secs(30)).await;
    assert_flows_end_to_end(&pki, &nats, &mqtt, 0..2_000).await;
}

/// Polls `/readyz` for 8 s and asserts that every answer was 503 naming each
/// condition in `failing`, and that the process kept running; returns the last body.
async fn wait_not_ready(bridge: &RoleProcess, http_port: u16, failing: &[&str]) -> String {
    let mut answers = 0;
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < deadline {
        if let Some(status) = bridge.try_exit() {
            panic!("bridge exited with {status}; log:\n{}", bridge.log());
        }
        if let Ok((status, body)) = http_get(http_port, "/readyz").await {
            assert_eq!(status, 503, "ready although TLS must fail: {body}");
            for cond in failing {
                assert!(body.contains(cond), "{cond} not failing in {body:?}");
            }
            answers += 1;
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        answers > 0,
        "/readyz never answered; log:\n{}",
        bridge.log()
    );
    last
}

// A wrong CA is a configuration error, but the bridge treats every connection
// failure alike (documented): it keeps running and retrying, so that a server
// whose certificate is being rotated comes back without a restart. What an
// operator needs is that it never looks healthy and says which side is broken.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_ca_for_mosquitto_keeps_bridge_unready_and_logs_the_certificate_error() {
    let pki = Pki::new("real");
    let other = Pki::new("other");
    let (nats, mqtt) = tls_brokers(&pki, false).await;
    let (bridge, http_port) = spawn_bridge(
        &nats,
        &mqtt,
        "wrong-mqtt-ca",
        ClientTls::Ca(&pki),
        ClientTls::Ca(&other),
    );
    let body = wait_not_ready(&bridge, http_port, &["mqtt-0", "mqtt-1"]).await;
    assert_eq!(
        body.trim(),
        "not ready: mqtt-0, mqtt-1",
        "NATS side is fine"
    );
    let log = bridge.log();
    assert!(
        log.contains("MQTT connection error; reconnecting")
            && log.contains("invalid peer certificate: UnknownIssuer"),
        "the log names the cause:\n{log}"
    );
    assert!(
        common::metric(http_port, "windrow_bridge_mqtt_connection_errors_total", "").await >= 2.0
    );
    assert_eq!(
        common::metric(http_port, "windrow_bridge_mqtt_connected_connections", "").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_ca_for_nats_keeps_bridge_unready_and_logs_nats_errors() {
    let pki = Pki::new("real");
    let other = Pki::new("other");
    let (nats, mqtt) = tls_brokers(&pki, false).await;
    let (bridge, http_port) = spawn_bridge(
        &nats,
        &mqtt,
        "wrong-nats-ca",
        ClientTls::Ca(&other),
        ClientTls::Ca(&pki),
    );
    let body = wait_not_ready(&bridge, http_port, &["nats"]).await;
    assert_eq!(body.trim(), "not ready: nats", "MQTT side is fine");
    assert_eq!(
        common::metric(http_port, "windrow_bridge_nats_connected", "").await,
        0.0
    );
    // async-nats hands the bridge only the kind of a failed connection attempt
    // ("client error: nats: IO error", the same as for a server that is down);
    // the certificate error itself is in async-nats's connector debug line,
    // which the default log filter keeps.
    let log = bridge.log();
    assert!(
        log.contains("invalid peer certificate: UnknownIssuer"),
        "the certificate error is not in the log:\n{log}"
    );
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("NATS event") && l.contains("client error"))
        .count();
    assert!(
        warnings >= 2,
        "connection failures are logged as they repeat:\n{log}"
    );
}
