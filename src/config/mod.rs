//! Configuration: the TOML file an operator writes, parsed into typed structs.
//!
//! Three steps, kept apart so each can be tested alone: [`load`] reads the file
//! (the only I/O), [`from_toml`] parses and type-checks it, and [`Config::validate`]
//! checks the rules that span several keys. Every error names the file, the line and
//! the dotted key, because an operator fixing a config at 3 a.m. should not have to
//! guess. Unknown keys are errors (`deny_unknown_fields`): a typo must never be
//! silently ignored. Durations carry their unit in the key name (`_ms`).
//!
//! Each section lives in a file of its own with the rules serde cannot check (its
//! `validate`), re-exported here so callers name `config::TlsConfig`, not where it
//! lives. This file keeps the root, loading, errors, and the order of the checks.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};

pub mod alerts;
pub mod analysis;
pub mod doctor;
mod env;
mod flags;
mod fleet;
pub mod maintenance;
pub mod redis_url;
mod resources;
mod routing;
mod server;
pub mod shadow;
pub mod sidecar;
pub mod traces;
mod upstream;

pub use env::expand_env;
pub use flags::{FlagsConfig, FlagsHeader, StaticFlag};
pub use fleet::FleetConfig;
pub use resources::ResourcesConfig;
pub use routing::{
    Cidr, MIN_STICKY_SECRET_BYTES, OverrideHeader, RoutingConfig, Sticky, sticky_secret_problem,
};
pub use server::{AccessLogFormat, AccessLogTarget, LimitsConfig, ServerConfig, TlsConfig};
pub use upstream::{BackendAddr, HealthConfig, PoolConfig, PoolsConfig, TimeoutsConfig};

use crate::config::alerts::AlertsConfig;
use crate::config::analysis::AnalysisConfig;
use crate::config::doctor::DoctorConfig;
use crate::config::maintenance::MaintenanceConfig;
use crate::config::shadow::ShadowConfig;

/// A config that could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{file}: cannot read config: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but something in it is wrong.
    #[error("{}", InvalidDisplay { file, line: *line, key, message })]
    Invalid {
        file: String,
        /// 1-based line of the offending key or value; 0 when it has no place in the file
        /// (a required key that is missing).
        line: usize,
        /// Dotted path of the key, e.g. `routing.canary_percent`; empty for syntax errors.
        key: String,
        message: String,
    },
}

struct InvalidDisplay<'a> {
    file: &'a str,
    line: usize,
    key: &'a str,
    message: &'a str,
}

impl fmt::Display for InvalidDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub pools: PoolsConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub flags: FlagsConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub resources: ResourcesConfig,
    #[serde(default)]
    pub analysis: AnalysisConfig,
    /// Read by `canarygate doctor` (its own process); validated here too.
    #[serde(default)]
    pub doctor: DoctorConfig,
    /// Read by `canarygate maintenance` (its own process); validated here too.
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    #[serde(default)]
    pub tracing: traces::TracingConfig,
    #[serde(default)]
    pub shadow: ShadowConfig,
}

/// A rule broken by an otherwise well-typed config: the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub key: String,
    pub message: String,
}

/// A broken rule, as a section's `validate` returns it: `return fail(key, message)`.
pub(crate) fn fail<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, Violation> {
    Err(Violation {
        key: key.into(),
        message: message.into(),
    })
}

impl Config {
    /// Checks the rules serde cannot express, section by section. Returns the first
    /// violation, so the order below is the order in which they are reported.
    pub fn validate(&self) -> Result<(), Violation> {
        self.server.validate_admin_listen()?;
        self.pools.validate()?;
        self.routing.validate()?;
        self.flags.validate(&self.fleet, &self.analysis)?;
        self.health.validate()?;
        self.limits.validate()?;
        self.server.validate_tls_listen()?;
        self.alerts.validate()?;
        self.resources.validate()?;
        self.analysis.validate()?;
        self.doctor.validate()?;
        self.maintenance.validate()?;
        self.fleet.validate(self.server.instance_id.as_deref())?;
        self.timeouts.validate()?;
        self.tracing.validate()?;
        self.shadow.validate(&self.analysis)?;
        Ok(())
    }

    /// Checks what only the running environment can tell: every `${VAR}` in
    /// `flags.redis_url` is set, and so are `routing.sticky_secret_env` and
    /// `tracing.headers_env` if named. `run` calls it; `check` does not, so a config can be
    /// checked on a machine without the secrets.
    /// The sections whose values differ from `other`'s, by name (a reload says
    /// what it applied).
    pub fn changed_sections(&self, other: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! each {
            ($($section:ident),*) => {
                $(if self.$section != other.$section {
                    changed.push(stringify!($section));
                })*
            };
        }
        each!(
            server,
            pools,
            routing,
            timeouts,
            flags,
            health,
            limits,
            alerts,
            resources,
            analysis,
            doctor,
            maintenance,
            fleet,
            tracing
        );
        changed
    }

    pub fn check_environment(&self) -> Result<(), Violation> {
        if let Some(name) = &self.routing.sticky_secret_env
            && let Some(message) = routing::sticky_secret_problem(name)
        {
            return Err(Violation {
                key: "routing.sticky_secret_env".to_owned(),
                message,
            });
        }
        if let Some(url) = &self.flags.redis_url {
            expand_env(url).map_err(|message| Violation {
                key: "flags.redis_url".to_owned(),
                message,
            })?;
        }
        if self.tracing.enabled()
            && let Some(name) = &self.tracing.headers_env
        {
            traces::collector_headers(name).map_err(|message| Violation {
                key: "tracing.headers_env".to_owned(),
                message,
            })?;
        }
        Ok(())
    }
}

/// Reads, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_as(path, Config::validate)
}

/// Parses and validates config text; `file` is only used in error messages.
pub fn from_toml(src: &str, file: &str) -> Result<Config, ConfigError> {
    parse(src, file, Config::validate)
}

/// Reads the file at `path` and parses it as `T` (a config, or the sections one
/// co-located process reads): errors name the file, the line and the key.
pub fn load_as<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T) -> Result<(), Violation>,
) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&src, &file, validate)
}

/// Parses `src` as `T`, then checks `validate`; every error carries file, line, key.
pub fn parse<T: serde::de::DeserializeOwned>(
    src: &str,
    file: &str,
    validate: impl FnOnce(&T) -> Result<(), Violation>,
) -> Result<T, ConfigError> {
    // A value quoted in a message may be a URL with a password in it.
    let invalid = |line: usize, key: String, message: String| ConfigError::Invalid {
        file: file.to_owned(),
        line,
        key,
        message: crate::redact::urls_in(&message),
    };
    let doc = DeTable::parse(src).map_err(|e| {
        invalid(
            e.span().map_or(0, |s| line_of(src, s.start)),
            String::new(),
            e.message().trim().to_owned(),
        )
    })?;
    let config: T = serde_path_to_error::deserialize(toml::de::Deserializer::from(doc.clone()))
        .map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            let inner = e.into_inner();
            // A missing key has no span of its own; point at its table if it has one.
            let line = inner
                .span()
                .map(|s| line_of(src, s.start))
                .or_else(|| span_of(&doc, &key).map(|s| line_of(src, s.start)))
                .unwrap_or(0);
            invalid(line, key, inner.message().trim().to_owned())
        })?;
    validate(&config).map_err(|v| {
        let line = span_of(&doc, &v.key).map_or(0, |s| line_of(src, s.start));
        invalid(line, v.key, v.message)
    })?;
    Ok(config)
}

/// 1-based line number of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Span of the value at a dotted key path, or of its deepest existing parent table.
fn span_of(doc: &toml::Spanned<DeTable<'_>>, key: &str) -> Option<std::ops::Range<usize>> {
    let mut table = doc.get_ref();
    let mut span = None;
    for part in key.split('.').filter(|p| !p.is_empty()) {
        let part = part.split('[').next().unwrap_or(part);
        let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref() == part) else {
            break;
        };
        span = Some(value.span());
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn err(src: &str) -> String {
        from_toml(src, "test.toml").unwrap_err().to_string()
    }

    pub(super) const MINIMAL: &str = "[pools.production]\nbackends = [\"127.0.0.1:3001\"]\n";

    #[test]
    fn minimal_config_takes_documented_defaults() {
        let c = from_toml(MINIMAL, "t").unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.server.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.server.drain_timeout_ms, 10_000);
        assert_eq!(c.routing.canary_percent, 33);
        assert_eq!(c.routing.sticky, Sticky::Cookie);
        assert_eq!(c.routing.override_header.0.unwrap().as_str(), "x-canary");
        assert_eq!(c.timeouts, TimeoutsConfig::default());
        assert!(c.pools.canary.backends.is_empty());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err(
            "[pools.production]\nbackends = [\"127.0.0.1:3001\"]\n\n[routing]\ncanary_pct = 5\n",
        );
        assert!(
            e.starts_with("test.toml:5: key `routing.canary_pct`"),
            "{e}"
        );
        assert!(e.contains("unknown field `canary_pct`"), "{e}");
    }

    #[test]
    fn bad_addresses_are_named() {
        let e = err(
            "[server]\nlisten = \"nope\"\n[pools.production]\nbackends = [\"127.0.0.1:3001\"]\n",
        );
        assert!(e.starts_with("test.toml:2: key `server.listen`"), "{e}");
        let e = err("[pools.production]\nbackends = [\"127.0.0.1:3001\", \"hostonly\"]\n");
        assert!(
            e.starts_with("test.toml:2: key `pools.production.backends[1]`"),
            "{e}"
        );
        assert!(e.contains("has no port"), "{e}");
    }

    #[test]
    fn syntax_error_names_line() {
        let e = err("[pools.production]\nbackends = [\"a:1\"\n");
        assert!(e.starts_with("test.toml:"), "{e}");
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let src = include_str!("../../config.toml");
        from_toml(src, "config.toml").unwrap();
    }
}
