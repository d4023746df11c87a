//! TLS settings shared by the server guards.

use std::path::PathBuf;

/// PEM files that turn on TLS for a test server
/// ([`NatsServer::start_with_tls`](crate::NatsServer::start_with_tls),
/// [`Mosquitto::start_with_tls`](crate::Mosquitto::start_with_tls)).
///
/// The harness does not make certificates: tests generate them (e.g. with
/// `rcgen`) so that each test can choose its CA, names and client certificates.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server's certificate chain (PEM); it must name `127.0.0.1` (IP SAN),
    /// the address clients dial.
    pub cert_file: PathBuf,
    /// The server's private key (PEM, PKCS#8 or traditional).
    pub key_file: PathBuf,
    /// CA certificates (PEM) the server trusts for client certificates.
    pub ca_file: PathBuf,
    /// Require and verify a client certificate signed by `ca_file` (mutual TLS):
    /// nats-server `verify: true`, mosquitto `require_certificate true`.
    pub verify_clients: bool,
}
