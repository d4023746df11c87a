//! Named readiness conditions.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

/// Readiness conditions of a role, by name (`nats`, `mqtt-0`, `store`...).
///
/// The role is ready when every registered condition is true. Conditions are
/// registered false, so a role is not ready until it has proved each one.
/// Cloning shares the state.
#[derive(Clone, Default, Debug)]
pub struct Health {
    conditions: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    /// A health state with no conditions (ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `name` as not yet satisfied.
    pub fn register(&self, name: impl Into<String>) {
        self.lock().insert(name.into(), false);
    }

    /// Sets condition `name` (registering it if needed).
    pub fn set(&self, name: &str, ok: bool) {
        let mut map = self.lock();
        match map.get_mut(name) {
            Some(v) => *v = ok,
            None => {
                map.insert(name.to_owned(), ok);
            }
        }
    }

    /// Removes condition `name` (e.g. while draining, to report not-ready use `set` instead).
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Whether every condition holds.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|v| *v)
    }

    /// The names of the conditions that do not hold.
    pub fn failing(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        // A poisoned lock only means a panic elsewhere; the map itself is always consistent.
        self.conditions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_conditions_hold() {
        let h = Health::new();
        assert!(h.is_ready());
        h.register("nats");
        h.register("mqtt-0");
        assert!(!h.is_ready());
        h.set("nats", true);
        assert_eq!(h.failing(), vec!["mqtt-0".to_owned()]);
        h.set("mqtt-0", true);
        assert!(h.is_ready());
    }
}
