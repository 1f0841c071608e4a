//! `[resources]`: when the host's CPU, memory or disks count as a spike. Its own
//! file because the watch (`ops::resources`) reads nothing else of the config.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{Violation, fail};

/// `[resources]`: the host resource watch (see `ops::resources`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    pub interval_ms: u64,
    pub cpu_percent: u8,
    pub memory_percent: u8,
    /// Above a threshold this long makes a spike.
    pub sustain_ms: u64,
    /// Paths whose filesystem usage is exported (and judged against `disk_percent`).
    pub disk_paths: Vec<PathBuf>,
    pub disk_percent: u8,
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        Self {
            interval_ms: 5_000,
            cpu_percent: 90,
            memory_percent: 90,
            sustain_ms: 30_000,
            disk_paths: vec![PathBuf::from("/")],
            disk_percent: 90,
        }
    }
}

impl ResourcesConfig {
    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        if self.interval_ms == 0 {
            return fail("resources.interval_ms", "must be greater than 0");
        }
        for (key, value) in [
            ("resources.cpu_percent", self.cpu_percent),
            ("resources.memory_percent", self.memory_percent),
            ("resources.disk_percent", self.disk_percent),
        ] {
            if value == 0 || value > 100 {
                return fail(key, format!("{value} is out of range; it must be 1..=100"));
            }
        }
        Ok(())
    }
}
