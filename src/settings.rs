//! Configuration layering: defaults < file (`--config`) < `WINDROW_*` environment < flags.
//!
//! The file has a shared `[nats]` section, one section per role
//! (`[bridge]`, ...) and the `[jetstream]` declaration of streams and consumers. A role's configuration is its section with `nats`
//! filled from the shared section (a role may override it as `[bridge.nats]`).
//! Environment variables follow the same shape: `WINDROW_NATS__URL`,
//! `WINDROW_BRIDGE__MQTT__HOST` (`__` between sections).

use std::path::{Path, PathBuf};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    value::{Dict, Value},
    Figment,
};
use serde::{de::DeserializeOwned, Serialize};
use windrow_jetstream::streams::Declaration;

/// Top-level sections the file may have.
const SECTIONS: &[&str] = &["nats", "bridge", "worker", "jetstream"];

/// A configuration problem, reported with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The `--config` file does not exist.
    #[error("config file {0}: no such file")]
    Missing(PathBuf),
    /// Values of the wrong type, unknown keys, unparsable file.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// The merged file and environment, before any role extracts its part.
pub struct Settings {
    figment: Figment,
}

impl Settings {
    /// Reads `file` (if given) and the `WINDROW_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError::Missing(path.to_owned()));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("WINDROW_").split("__").filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            SECTIONS
                .iter()
                .any(|s| k == *s || k.starts_with(&format!("{s}.")))
        }));
        let settings = Self { figment };
        settings.check_sections()?;
        Ok(settings)
    }

    fn check_sections(&self) -> Result<(), SettingsError> {
        let dict: Dict = self
            .figment
            .extract()
            .map_err(|e| SettingsError::Invalid(describe("", e)))?;
        let unknown: Vec<String> = dict
            .keys()
            .filter(|k| !SECTIONS.contains(&k.as_str()))
            .map(|k| {
                format!(
                    "{k}: unknown section (expected one of: {})",
                    SECTIONS.join(", ")
                )
            })
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(SettingsError::Invalid(unknown))
        }
    }

    /// Extracts role section `section` as `T`, with the shared `[nats]` section
    /// under its `nats` key.
    pub fn role<T: Serialize + DeserializeOwned + Default>(
        &self,
        section: &str,
    ) -> Result<T, SettingsError> {
        let nats: Option<Value> = self.figment.extract_inner("nats").ok();
        let mut role = Figment::from(Serialized::defaults(T::default()));
        if let Some(nats) = nats {
            role = role.merge(Serialized::default("nats", nats));
        }
        role = role.merge(self.figment.clone().focus(section));
        role.extract()
            .map_err(|e| SettingsError::Invalid(describe(section, e)))
    }

    /// Extracts section `section` as `T` over `T::default()`, without the
    /// shared `[nats]` (e.g. `[nats]` itself, or `[jetstream]`).
    pub fn section<T: Serialize + DeserializeOwned + Default>(
        &self,
        section: &str,
    ) -> Result<T, SettingsError> {
        Figment::from(Serialized::defaults(T::default()))
            .merge(self.figment.clone().focus(section))
            .extract()
            .map_err(|e| SettingsError::Invalid(describe(section, e)))
    }

    /// The `[jetstream]` declaration of streams and consumers (empty by default).
    pub fn jetstream(&self) -> Result<Declaration, SettingsError> {
        self.section("jetstream")
    }
}

/// One line per figment error, naming the full key path (`jetstream.streams[0].storage`).
fn describe(section: &str, error: figment::Error) -> Vec<String> {
    error
        .into_iter()
        .map(|e| {
            let mut path: Vec<String> = Vec::new();
            if !section.is_empty() {
                path.push(section.to_owned());
            }
            for key in &e.path {
                match (key.parse::<usize>(), path.last_mut()) {
                    (Ok(index), Some(last)) => last.push_str(&format!("[{index}]")),
                    _ => path.push(key.clone()),
                }
            }
            let source = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            if path.is_empty() {
                format!("{}{source}", e.kind)
            } else {
                format!("{}: {}{source}", path.join("."), e.kind)
            }
        })
        .collect()
}

/// The defaults of every section as a TOML-ready value, for `windrow config default`.
///
/// Keys without a default (optional settings) are left out; the bridge's `nats`
/// key is shown once, as the shared `[nats]` section.
pub fn defaults() -> serde_json::Value {
    let mut bridge =
        serde_json::to_value(windrow_bridge::Config::default()).unwrap_or(serde_json::Value::Null);
    if let Some(obj) = bridge.as_object_mut() {
        obj.remove("nats");
        // Derived from $POD_NAME/$HOSTNAME per replica; pinning it in a shared
        // file would give every replica the same MQTT identity.
        if let Some(mqtt) = obj.get_mut("mqtt").and_then(|m| m.as_object_mut()) {
            mqtt.remove("client_id");
        }
    }
    let mut worker =
        serde_json::to_value(windrow_workers::Config::default()).unwrap_or(serde_json::Value::Null);
    if let Some(obj) = worker.as_object_mut() {
        obj.remove("nats");
        obj.remove("node_id"); // per replica, like the bridge's client_id
    }
    let mut all = serde_json::json!({
        "nats": serde_json::to_value(windrow_jetstream::NatsConfig::default())
            .unwrap_or(serde_json::Value::Null),
        "bridge": bridge,
        "worker": worker,
        "jetstream": serde_json::to_value(Declaration::default())
            .unwrap_or(serde_json::Value::Null),
    });
    strip_nulls(&mut all);
    all
}

fn strip_nulls(v: &mut serde_json::Value) {
    if let Some(obj) = v.as_object_mut() {
        obj.retain(|_, v| !v.is_null());
        obj.values_mut().for_each(strip_nulls);
    } else if let Some(arr) = v.as_array_mut() {
        arr.iter_mut().for_each(strip_nulls);
    }
}
