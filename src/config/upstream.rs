//! `[pools]`, `[health]` and `[timeouts]`: the backends and how the proxy treats
//! them (mostly; two timeouts are the client side's). One file because
//! [`crate::upstream`] builds its pools from the first two together.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::uri::Authority;
use serde::Deserialize;

use crate::client::conn_pool::ConnLimits;
use crate::config::{Violation, fail};

/// `[pools.production]` and `[pools.canary]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsConfig {
    pub production: PoolConfig,
    #[serde(default)]
    pub canary: PoolConfig,
}

/// One pool: the backends that serve one version of the application, and the
/// connection limits each of them gets.
///
/// The limits are keys of the pool, applied to each of its backends (HAProxy's
/// `default-server maxconn` in a backend section): a pool's backends run one
/// version on like instances, and one level keeps `check` and the docs simple. A
/// backend of its own limits would be a backend written as a table later, without
/// changing these keys. Defaults (docs/configuration.md says why): Envoy's circuit
/// breaker default for `max_connections` (1024); a queue as long as the default
/// client limit (`limits.max_connections`, 10000), so an HTTP/1.1 client is never
/// refused by count, only by time, as with HAProxy's unbounded `maxqueue`; HAProxy's
/// `timeout queue` falls back to `timeout connect`, so `pending_timeout_ms` is the
/// default `connect_ms`; 16 connects at once stay far below the listen backlog of
/// 128 that most servers get by default, even from several proxies.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub backends: Vec<BackendAddr>,
    /// Connections to each backend open at most: connecting, idle, busy, upgraded.
    pub max_connections: u32,
    /// Requests waiting for a connection to each backend at most (0: none wait).
    pub max_pending: u32,
    /// The longest a request waits for a connection.
    pub pending_timeout_ms: u64,
    /// Connects in progress to each backend at most.
    pub max_connecting: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        let limits = ConnLimits::default();
        Self {
            backends: Vec::new(),
            max_connections: limits.max_connections,
            max_pending: limits.max_pending,
            pending_timeout_ms: u64::try_from(limits.pending_timeout.as_millis())
                .unwrap_or(u64::MAX),
            max_connecting: limits.max_connecting,
        }
    }
}

impl PoolConfig {
    /// The limits each backend of the pool gets.
    pub fn limits(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.max_connections,
            max_pending: self.max_pending,
            max_connecting: self.max_connecting,
            pending_timeout: Duration::from_millis(self.pending_timeout_ms),
        }
    }

    fn validate(&self, pool: &str) -> Result<(), Violation> {
        for (key, value) in [
            ("max_connections", u64::from(self.max_connections)),
            ("max_connecting", u64::from(self.max_connecting)),
            ("pending_timeout_ms", self.pending_timeout_ms),
        ] {
            if value == 0 {
                return fail(format!("pools.{pool}.{key}"), "must be greater than 0");
            }
        }
        if self.max_connections > 1 << 30 {
            return fail(
                format!("pools.{pool}.max_connections"),
                "must be at most 1073741824",
            );
        }
        Ok(())
    }
}

/// A backend's `host:port`. A hostname is resolved by the system resolver when a
/// connection is opened, so DNS changes are followed without a reload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BackendAddr(pub Authority);

impl TryFrom<String> for BackendAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let authority =
            Authority::from_str(&s).map_err(|_| format!("`{s}` is not a host:port address"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{s}` must not contain user info"));
        }
        if authority.port_u16().is_none() {
            return Err(format!("`{s}` has no port (write host:port)"));
        }
        if authority.host().is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        Ok(Self(authority))
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl PoolsConfig {
    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        if self.production.backends.is_empty() {
            return fail(
                "pools.production.backends",
                "the production pool is empty; list at least one backend",
            );
        }
        self.production.validate("production")?;
        self.canary.validate("canary")?;
        for (pool, cfg) in [
            ("pools.production.backends", &self.production),
            ("pools.canary.backends", &self.canary),
        ] {
            for (i, backend) in cfg.backends.iter().enumerate() {
                if cfg.backends[..i].contains(backend) {
                    return fail(pool, format!("{backend} is listed twice"));
                }
            }
        }
        if let Some(shared) = self
            .canary
            .backends
            .iter()
            .find(|b| self.production.backends.contains(b))
        {
            return fail(
                "pools.canary.backends",
                format!("{shared} is in both pools; a backend serves one version"),
            );
        }
        Ok(())
    }
}

/// `[health]`: active checks and passive ejection of backends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Path requested by the active check (`GET`, `Host` = the backend address).
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Passing checks in a row that make an unhealthy backend healthy.
    pub rise: u32,
    /// Failing checks in a row that make a healthy backend unhealthy.
    pub fall: u32,
    /// Connect errors or 5xx responses in a row that eject a backend (0: never).
    pub consecutive_failures: u32,
    /// First ejection length; doubles on each ejection in a row, up to 16 times.
    pub ejection_ms: u64,
    /// At most this share of a pool is ejected at once.
    pub max_ejected_percent: u8,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: "/health".to_owned(),
            interval_ms: 2_000,
            timeout_ms: 1_000,
            rise: 2,
            fall: 3,
            consecutive_failures: 5,
            ejection_ms: 30_000,
            max_ejected_percent: 50,
        }
    }
}

impl HealthConfig {
    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        if !self.path.starts_with('/') || http::uri::PathAndQuery::from_str(&self.path).is_err() {
            return fail(
                "health.path",
                format!("`{}` must be a path starting with /", self.path),
            );
        }
        for (key, value) in [
            ("health.interval_ms", self.interval_ms),
            ("health.timeout_ms", self.timeout_ms),
            ("health.ejection_ms", self.ejection_ms),
            ("health.rise", u64::from(self.rise)),
            ("health.fall", u64::from(self.fall)),
        ] {
            if value == 0 {
                return fail(key, "must be greater than 0");
            }
        }
        if self.max_ejected_percent > 100 {
            return fail(
                "health.max_ejected_percent",
                format!(
                    "{} is out of range; it must be 0..=100",
                    self.max_ejected_percent
                ),
            );
        }
        Ok(())
    }
}

/// `[timeouts]`, all in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Default 2 s: Linux resends an unanswered SYN after 1 s, so a 1 s timeout
    /// turned every SYN a busy backend's full accept queue dropped into a 502 (seen
    /// at 512 client connections, benches/load.sh growth); 2 s lets that one resend
    /// through.
    pub connect_ms: u64,
    pub response_header_ms: u64,
    pub client_header_read_ms: u64,
    pub idle_ms: u64,
    /// An upgraded tunnel (WebSocket) with no byte either way for this long is closed.
    pub websocket_idle_ms: u64,
    /// A backend that sends no byte of a response body for this long has the
    /// response cut (nginx's `proxy_read_timeout`, 60 s).
    pub upstream_body_idle_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: 2_000,
            response_header_ms: 30_000,
            client_header_read_ms: 10_000,
            idle_ms: 60_000,
            websocket_idle_ms: 600_000,
            upstream_body_idle_ms: 60_000,
        }
    }
}

impl TimeoutsConfig {
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }
    pub fn response_header(&self) -> Duration {
        Duration::from_millis(self.response_header_ms)
    }
    pub fn client_header_read(&self) -> Duration {
        Duration::from_millis(self.client_header_read_ms)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
    pub fn websocket_idle(&self) -> Duration {
        Duration::from_millis(self.websocket_idle_ms)
    }
    pub fn upstream_body_idle(&self) -> Duration {
        Duration::from_millis(self.upstream_body_idle_ms)
    }

    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        for (key, value) in [
            ("timeouts.connect_ms", self.connect_ms),
            ("timeouts.response_header_ms", self.response_header_ms),
            ("timeouts.client_header_read_ms", self.client_header_read_ms),
            ("timeouts.idle_ms", self.idle_ms),
            ("timeouts.websocket_idle_ms", self.websocket_idle_ms),
            ("timeouts.upstream_body_idle_ms", self.upstream_body_idle_ms),
        ] {
            if value == 0 {
                return fail(key, "must be greater than 0");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{MINIMAL, err};

    #[test]
    fn empty_production_pool_is_refused() {
        let e = err("[pools.production]\nbackends = []\n");
        assert_eq!(
            e,
            "test.toml:2: key `pools.production.backends`: the production pool is empty; list at least one backend"
        );
        let e = err("[pools.canary]\nbackends = [\"127.0.0.1:1\"]\n");
        assert!(e.contains("key `pools`") && e.contains("production"), "{e}");
    }

    #[test]
    fn connection_limits_have_defaults_and_zero_is_refused() {
        let config = crate::config::from_toml(
            &format!("{MINIMAL}max_pending = 0\n[pools.canary]\nmax_connections = 8\n"),
            "t",
        )
        .unwrap();
        let defaults = crate::client::conn_pool::ConnLimits::default();
        assert_eq!(config.pools.production.max_connections, 1024);
        assert_eq!(config.pools.production.max_pending, 0);
        assert_eq!(
            config.pools.canary.limits(),
            crate::client::conn_pool::ConnLimits {
                max_connections: 8,
                ..defaults
            }
        );
        let e = err(&format!("{MINIMAL}max_connecting = 0\n"));
        assert_eq!(
            e,
            "test.toml:3: key `pools.production.max_connecting`: must be greater than 0"
        );
    }

    #[test]
    fn backend_in_both_pools_and_zero_timeouts_are_refused() {
        let e = err(
            "[pools.production]\nbackends = [\"127.0.0.1:1\"]\n[pools.canary]\nbackends = [\"127.0.0.1:1\"]\n",
        );
        assert!(
            e.starts_with("test.toml:4: key `pools.canary.backends`"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[timeouts]\nconnect_ms = 0\n"));
        assert_eq!(
            e,
            "test.toml:4: key `timeouts.connect_ms`: must be greater than 0"
        );
    }
}
