//! `[fleet]`: the heartbeats instances leave in the flags' Redis. Its own file
//! because its rules tie it to `server.instance_id` (the name a heartbeat carries)
//! and, on a Redis Cluster, to `flags.key` (see [`super::FlagsConfig::validate`]).

use serde::Deserialize;

use crate::config::{Violation, fail};

/// `[fleet]`: the heartbeats every instance writes to the flags' Redis, and what
/// `/fleet` lists (see `ops::fleet`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// A heartbeat this often.
    pub heartbeat_ms: u64,
    /// An instance is listed while its last heartbeat is younger than this; it is
    /// also the heartbeat key's TTL.
    pub seen_ms: u64,
    /// The index (a sorted set of instance ids by last heartbeat); each heartbeat is
    /// the string `<key>:<instance id>`.
    pub key: String,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 2_000,
            seen_ms: 30_000,
            key: "canarygate:fleet".to_owned(),
        }
    }
}

impl FleetConfig {
    /// The rules serde cannot check, with `instance_id` (`server.instance_id`): the
    /// name this instance's heartbeats carry.
    pub fn validate(&self, instance_id: Option<&str>) -> Result<(), Violation> {
        if self.heartbeat_ms == 0 {
            return fail("fleet.heartbeat_ms", "must be greater than 0");
        }
        if self.seen_ms < self.heartbeat_ms.saturating_mul(2) {
            return fail(
                "fleet.seen_ms",
                format!(
                    "{} must be at least twice fleet.heartbeat_ms ({}): one late heartbeat \
                     would drop a live instance",
                    self.seen_ms, self.heartbeat_ms
                ),
            );
        }
        if self.key.is_empty() {
            return fail("fleet.key", "must not be empty");
        }
        if let Some(id) = instance_id
            && (id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == ' '))
        {
            return fail(
                "server.instance_id",
                format!("{id:?} must be 1 to 128 characters without spaces or controls"),
            );
        }
        Ok(())
    }
}
