//! `windrow bridge`: flags over the configuration, then the bridge library.

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use windrow_bridge::{Config, Delivery, MessageIdMode, RetainedPolicy, Route};
use windrow_jetstream::NatsConfig;

use crate::{
    cli::{BridgeArgs, MessageIdArg, NatsArgs},
    config_error,
    settings::Settings,
};

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// Applies NATS flags over `nats`.
pub fn apply_nats(nats: &mut NatsConfig, a: &NatsArgs) {
    set(&mut nats.url, a.nats_url.clone());
    set(&mut nats.subject_prefix, a.subject_prefix.clone());
    if a.nats_user.is_some() {
        nats.user = a.nats_user.clone();
    }
    if a.nats_password.is_some() {
        nats.password = a.nats_password.clone();
    }
    if a.nats_token.is_some() {
        nats.token = a.nats_token.clone();
    }
    if a.nats_credentials_file.is_some() {
        nats.credentials_file = a.nats_credentials_file.clone();
    }
    if a.nats_tls_ca_file.is_some() {
        nats.tls_ca_file = a.nats_tls_ca_file.clone();
    }
    if a.nats_tls_cert_file.is_some() {
        nats.tls_cert_file = a.nats_tls_cert_file.clone();
    }
    if a.nats_tls_key_file.is_some() {
        nats.tls_key_file = a.nats_tls_key_file.clone();
    }
    nats.tls_required |= a.nats_tls_required;
    set(&mut nats.connect_timeout_secs, a.nats_connect_timeout_secs);
    set(&mut nats.request_timeout_secs, a.nats_request_timeout_secs);
    set(&mut nats.client_capacity, a.nats_client_capacity);
    set(
        &mut nats.subscription_capacity,
        a.nats_subscription_capacity,
    );
    set(&mut nats.ping_interval_secs, a.nats_ping_interval_secs);
}

/// Parses `FILTER[,qos=N][,delivery=core|jetstream][,retained=forward|ignore]`.
pub fn parse_route(spec: &str) -> anyhow::Result<Route> {
    let mut parts = spec.split(',');
    let filter = parts.next().unwrap_or_default().to_owned();
    let mut route = Route {
        filter,
        qos: 0,
        delivery: Delivery::Core,
        retained: RetainedPolicy::Forward,
    };
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("--route {spec:?}: expected key=value, got {part:?}"))?;
        match (k, v) {
            ("qos", v) => {
                route.qos = v
                    .parse()
                    .with_context(|| format!("--route {spec:?}: qos must be 0, 1 or 2"))?
            }
            ("delivery", "core") => route.delivery = Delivery::Core,
            ("delivery", "jetstream") => route.delivery = Delivery::Jetstream,
            ("retained", "forward") => route.retained = RetainedPolicy::Forward,
            ("retained", "ignore") => route.retained = RetainedPolicy::Ignore,
            _ => bail!("--route {spec:?}: unknown setting {part:?} (qos=0|1|2, delivery=core|jetstream, retained=forward|ignore)"),
        }
    }
    Ok(route)
}

/// The bridge's configuration: the file and environment, then the flags, validated.
///
/// # Errors
/// Exit code 2, after printing what is wrong (each bad key named).
pub fn config(settings: &Settings, args: &BridgeArgs) -> Result<Config, ExitCode> {
    let mut config: Config = settings.role("bridge").map_err(|e| config_error(&e))?;
    apply(&mut config, args).map_err(|e| config_error(&e))?;
    config.validate().map_err(|e| config_error(&e))?;
    Ok(config)
}

/// Applies the bridge flags over `c`.
fn apply(c: &mut Config, a: &BridgeArgs) -> anyhow::Result<()> {
    apply_nats(&mut c.nats, &a.nats);
    let m = &mut c.mqtt;
    set(&mut m.host, a.mqtt_host.clone());
    set(&mut m.port, a.mqtt_port);
    set(&mut m.client_id, a.client_id.clone());
    set(&mut m.connections, a.connections.map(Some));
    set(&mut m.shared_group, a.shared_group.clone());
    if a.no_shared_subscription {
        m.shared_subscription = false;
    }
    m.clean_session |= a.clean_session;
    set(&mut m.keep_alive_secs, a.keep_alive_secs);
    set(&mut m.max_packet_bytes, a.max_packet_bytes);
    set(&mut m.request_channel_capacity, a.request_channel_capacity);
    if a.mqtt_username.is_some() {
        m.username = a.mqtt_username.clone();
    }
    if a.mqtt_password.is_some() {
        m.password = a.mqtt_password.clone();
    }
    m.tls |= a.mqtt_tls;
    if a.mqtt_tls_ca_file.is_some() {
        m.tls_ca_file = a.mqtt_tls_ca_file.clone();
    }
    if a.mqtt_tls_cert_file.is_some() {
        m.tls_cert_file = a.mqtt_tls_cert_file.clone();
    }
    if a.mqtt_tls_key_file.is_some() {
        m.tls_key_file = a.mqtt_tls_key_file.clone();
    }
    set(&mut m.reconnect_min_ms, a.reconnect_min_ms);
    set(&mut m.reconnect_max_ms, a.reconnect_max_ms);
    if !a.routes.is_empty() {
        c.routes = a
            .routes
            .iter()
            .map(|s| parse_route(s))
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(mode) = a.message_id {
        c.message_id = match mode {
            MessageIdArg::Uuid7 => MessageIdMode::Uuid7,
            MessageIdArg::ContentHash => MessageIdMode::ContentHash,
        };
    }
    set(&mut c.max_in_flight, a.max_in_flight);
    set(&mut c.retry_min_ms, a.retry_min_ms);
    set(&mut c.retry_max_ms, a.retry_max_ms);
    set(&mut c.dead_letter_subject, a.dead_letter_subject.clone());
    if a.no_dead_letter {
        c.dead_letter = false;
    }
    set(&mut c.http_listen, a.http_listen);
    set(&mut c.shutdown_timeout_secs, a.shutdown_timeout_secs);
    set(&mut c.threads, a.threads);
    if a.trace_sample_ratio.is_some() {
        c.trace_sample_ratio = a.trace_sample_ratio;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_flags() {
        let r = parse_route("sensors/#,qos=1,delivery=jetstream,retained=ignore").unwrap();
        assert_eq!(r.filter, "sensors/#");
        assert_eq!(r.qos, 1);
        assert_eq!(r.delivery, Delivery::Jetstream);
        assert_eq!(r.retained, RetainedPolicy::Ignore);
        assert!(parse_route("a,qos=x").is_err());
        assert!(parse_route("a,delivery=fast").is_err());
    }
}
