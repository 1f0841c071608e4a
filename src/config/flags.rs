//! `[flags]`: where feature flags come from and how they reach the application.
//! The settings and their rules only: a static value is checked by the flag model
//! itself ([`crate::flags::model`]), so the config refuses exactly what the watcher
//! would.

use std::str::FromStr;

use http::HeaderName;
use serde::Deserialize;

use crate::config::analysis::AnalysisConfig;
use crate::config::redis_url::{self, RedisUrl};
use crate::config::{FleetConfig, Violation, fail};

/// `[flags]`: where feature flags come from and how they reach the application.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlagsConfig {
    /// `redis://` or `rediss://` (TLS) URL; `${VAR}` is replaced by that environment
    /// variable, percent-encoded. Absent: no Redis, flags come from `static`.
    pub redis_url: Option<String>,
    /// PEM file of the CA that signed the Redis server's certificate (`rediss://` with
    /// a private CA); absent: the bundled public roots.
    pub tls_ca_path: Option<std::path::PathBuf>,
    /// The Redis hash holding the flags.
    pub key: String,
    /// Full re-read period, the safety net under keyspace notifications.
    pub poll_ms: u64,
    /// Request header that carries the flags to the application.
    pub header: FlagsHeader,
    /// Start values (and the only values when there is no Redis).
    #[serde(rename = "static")]
    pub static_flags: std::collections::BTreeMap<String, StaticFlag>,
}

impl Default for FlagsConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            tls_ca_path: None,
            key: "canarygate:flags".to_owned(),
            poll_ms: 1_000,
            header: FlagsHeader(HeaderName::from_static("x-feature-flags")),
            static_flags: std::collections::BTreeMap::new(),
        }
    }
}

impl FlagsConfig {
    /// The flag set `[flags.static]` describes (validated with the config, so nothing
    /// is refused here).
    pub fn static_set(&self) -> crate::flags::model::FlagSet {
        let raw: Vec<(&str, String)> = self
            .static_flags
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_raw()))
            .collect();
        let (set, _) = crate::flags::model::build(
            raw.iter().map(|(k, v)| (*k, v.as_str())),
            &crate::flags::model::FlagSet::default(),
        );
        set
    }

    /// Whether `other` reads flags from another store, or the same one otherwise
    /// (the settings the watcher starts with).
    pub fn store_differs(&self, other: &Self) -> bool {
        self.redis_url != other.redis_url
            || self.tls_ca_path != other.tls_ca_path
            || self.key != other.key
            || self.poll_ms != other.poll_ms
    }

    /// The rules serde cannot check, with the other keys the flags' Redis holds
    /// (`fleet.key`, `analysis.redis_key`): on a Redis Cluster they share one slot.
    pub fn validate(
        &self,
        fleet: &FleetConfig,
        analysis: &AnalysisConfig,
    ) -> Result<(), Violation> {
        if let Some(url) = &self.redis_url {
            match redis_url::parse(url) {
                Err(message) => {
                    return fail("flags.redis_url", format!("`{url}`: {message}"));
                }
                Ok(RedisUrl::Cluster { .. }) => {
                    // Keys written together (one script, one transaction) must be in
                    // one slot: the same hash tag.
                    let Some(tag) = redis_url::hash_tag(&self.key) else {
                        return fail(
                            "flags.key",
                            format!(
                                "`{}` needs a hash tag on a Redis Cluster, e.g. \"{{canarygate}}:flags\"",
                                self.key
                            ),
                        );
                    };
                    for (key, value, example) in [
                        ("fleet.key", &fleet.key, "fleet"),
                        ("analysis.redis_key", &analysis.redis_key, "analysis"),
                    ] {
                        if redis_url::hash_tag(value) != Some(tag) {
                            return fail(
                                key,
                                format!(
                                    "`{value}` needs flags.key's hash tag on a Redis Cluster, e.g. \"{{{tag}}}:{example}\""
                                ),
                            );
                        }
                    }
                }
                Ok(_) => {}
            }
        }
        if self.key.is_empty() {
            return fail("flags.key", "must not be empty");
        }
        if self.poll_ms == 0 {
            return fail("flags.poll_ms", "must be greater than 0");
        }
        for (name, value) in &self.static_flags {
            let raw = value.as_raw();
            let (_, rejected) = crate::flags::model::build(
                [(name.as_str(), raw.as_str())],
                &crate::flags::model::FlagSet::default(),
            );
            if let Some(r) = rejected.first() {
                return fail(format!("flags.static.{name}"), r.reason.to_string());
            }
        }
        Ok(())
    }
}

/// The flags header name, validated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FlagsHeader(pub HeaderName);

impl TryFrom<String> for FlagsHeader {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        HeaderName::from_str(&s)
            .map(Self)
            .map_err(|_| format!("`{s}` is not a valid header name"))
    }
}

/// A static flag value: a string as in Redis, or a TOML boolean or integer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum StaticFlag {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl StaticFlag {
    /// The value as it would be stored in the Redis hash.
    pub fn as_raw(&self) -> String {
        match self {
            Self::Bool(true) => "on".to_owned(),
            Self::Bool(false) => "off".to_owned(),
            Self::Int(i) => i.to_string(),
            Self::Text(s) => s.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::from_toml;
    use crate::config::tests::{MINIMAL, err};

    #[test]
    fn flags_section_defaults_and_static_values() {
        let c = from_toml(MINIMAL, "t").unwrap();
        assert_eq!(c.flags.key, "canarygate:flags");
        assert_eq!(c.flags.poll_ms, 1000);
        assert_eq!(c.flags.header.0.as_str(), "x-feature-flags");
        assert!(c.flags.redis_url.is_none());
        let c = from_toml(
            &format!("{MINIMAL}[flags.static]\ndark_mode = \"off\"\nbeta = true\nlimit = 5\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.flags.static_flags["beta"].as_raw(), "on");
        assert_eq!(c.flags.static_flags["limit"].as_raw(), "5");
        let e = err(&format!("{MINIMAL}[flags.static]\n\"Bad Name\" = \"on\"\n"));
        assert!(
            e.starts_with("test.toml:4: key `flags.static.Bad Name`"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[flags.static]\ncanary_percent = 150\n"));
        assert!(
            e.starts_with("test.toml:4: key `flags.static.canary_percent`"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[flags]\nredis_url = \"http://x\"\n"));
        assert!(e.starts_with("test.toml:4: key `flags.redis_url`"), "{e}");
    }

    #[test]
    fn a_cluster_names_the_key_without_flags_hash_tag() {
        let cluster = format!("{MINIMAL}[flags]\nredis_url = \"redis+cluster://h:7000\"\n");
        for (extra, want) in [
            (
                "",
                "key `flags.key`: `canarygate:flags` needs a hash tag on a Redis Cluster, e.g. \"{canarygate}:flags\"",
            ),
            (
                "key = \"{cg}:flags\"\n",
                "key `fleet.key`: `canarygate:fleet` needs flags.key's hash tag on a Redis Cluster, e.g. \"{cg}:fleet\"",
            ),
            (
                "key = \"{cg}:flags\"\n[fleet]\nkey = \"{cg}:fleet\"\n",
                "key `analysis.redis_key`: `canarygate:analysis` needs flags.key's hash tag on a Redis Cluster, e.g. \"{cg}:analysis\"",
            ),
        ] {
            let e = err(&format!("{cluster}{extra}"));
            assert!(e.ends_with(want), "{e}");
        }
    }
}
