//! Configuration: the TOML file an operator writes, parsed into typed structs.
//!
//! Three steps, kept apart so each can be tested alone: [`load`] reads the file
//! (the only I/O), [`from_toml`] parses and type-checks it, and [`Config::validate`]
//! checks the rules that span several keys. Every error names the file, the line and
//! the dotted key, because an operator fixing a config at 3 a.m. should not have to
//! guess. Unknown keys are errors (`deny_unknown_fields`): a typo must never be
//! silently ignored. Durations carry their unit in the key name (`_ms`).

use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::HeaderName;
use http::uri::Authority;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

pub mod alerts;
pub mod analysis;
pub mod doctor;
pub mod maintenance;
pub mod redis_url;
pub mod sidecar;

use crate::config::alerts::AlertsConfig;
use crate::config::analysis::AnalysisConfig;
use crate::config::doctor::DoctorConfig;
use crate::config::maintenance::MaintenanceConfig;

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
}

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
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: key.to_owned(),
                message,
            })
        };
        if self.interval_ms == 0 {
            return fail("resources.interval_ms", "must be greater than 0".to_owned());
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

/// `[server]`: where the proxy and the admin listener bind, and how long a drain may take.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// After SIGTERM, `/readyz` says 503 this long while traffic is still served, so an
    /// outer load balancer stops sending before the listener closes.
    pub drain_delay_ms: u64,
    pub drain_timeout_ms: u64,
    /// `[server.tls]`: optional TLS termination on its own listener.
    pub tls: Option<TlsConfig>,
    /// Where the one line per proxied request goes: standard output (`"-"`, the
    /// default), a file, or `"off"` (read at start).
    pub access_log: AccessLogTarget,
    /// How that line is written: `"canarygate"`, `"combined"` or `"json"`.
    pub access_log_format: AccessLogFormat,
    /// This instance's name in the fleet (heartbeats, /fleet, /flags, /analysis,
    /// alerts, logs); default `hostname:listen port`. Read at start.
    pub instance_id: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            drain_delay_ms: 0,
            drain_timeout_ms: 10_000,
            tls: None,
            access_log: AccessLogTarget::Stdout,
            access_log_format: AccessLogFormat::Canarygate,
            instance_id: None,
        }
    }
}

/// `server.access_log`: `"-"` (standard output), `"off"`, or a file path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AccessLogTarget {
    Stdout,
    Off,
    File(PathBuf),
}

impl TryFrom<String> for AccessLogTarget {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "-" => Ok(Self::Stdout),
            "off" => Ok(Self::Off),
            "" => Err("empty: use \"-\" (standard output), \"off\" or a file path".to_owned()),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// `server.access_log_format`: canarygate's own line (with pool, routing reason and
/// backend), the Apache/nginx `combined` line, or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    Canarygate,
    Combined,
    Json,
}

/// `[server.tls]`: HTTPS (HTTP/1.1 and HTTP/2 by ALPN) on `listen`, with a PEM
/// certificate chain and private key. Both files are re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default = "default_tls_listen")]
    pub listen: SocketAddr,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
    /// Session resumption by tickets (keys rotate every 6 h; a restart makes new ones).
    #[serde(default = "default_true")]
    pub session_tickets: bool,
}

fn default_true() -> bool {
    true
}

fn default_tls_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
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

/// `[limits]`: what one client may ask of the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Request line plus headers; larger requests get 431.
    pub max_header_bytes: u32,
    /// Open client connections; past it new connections wait in the listen backlog.
    pub max_connections: u32,
    /// Request body; larger bodies get 413. Absent: no limit.
    pub max_body_bytes: Option<u64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            max_body_bytes: None,
        }
    }
}

/// `[pools.production]` and `[pools.canary]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsConfig {
    pub production: PoolConfig,
    #[serde(default)]
    pub canary: PoolConfig,
}

/// One pool: the backends that serve one version of the application.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default)]
    pub backends: Vec<BackendAddr>,
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

/// `[routing]`: how requests are split between the pools.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub canary_percent: u8,
    pub sticky: Sticky,
    pub override_header: OverrideHeader,
    /// `Upgrade` protocols passed through (lowercase); others get 400.
    pub allowed_upgrades: Vec<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            canary_percent: 33,
            sticky: Sticky::Cookie,
            override_header: OverrideHeader(Some(HeaderName::from_static("x-canary"))),
            allowed_upgrades: vec!["websocket".to_owned()],
        }
    }
}

/// What keeps a user on one version: `"cookie"`, `"header:<name>"`, `"ip"` or `"none"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Sticky {
    /// The `canarygate_id` cookie, set by the proxy on a client's first response.
    Cookie,
    /// The value of a request header the application or an outer proxy sets.
    Header(HeaderName),
    /// The client's IP address as the proxy sees it (the TCP peer).
    Ip,
    /// No stickiness: every request draws its own bucket.
    None,
}

impl TryFrom<String> for Sticky {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "cookie" => Ok(Self::Cookie),
            "ip" => Ok(Self::Ip),
            "none" => Ok(Self::None),
            other => match other.strip_prefix("header:") {
                Some(name) => HeaderName::from_str(name)
                    .map(Self::Header)
                    .map_err(|_| format!("`{name}` is not a valid header name")),
                None => Err(format!(
                    "`{s}` is not one of \"cookie\", \"header:<name>\", \"ip\", \"none\""
                )),
            },
        }
    }
}

/// The request header whose value `always`/`never` forces a pool; `""` turns it off.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct OverrideHeader(pub Option<HeaderName>);

impl TryFrom<String> for OverrideHeader {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.is_empty() {
            return Ok(Self(None));
        }
        HeaderName::from_str(&s)
            .map(|name| Self(Some(name)))
            .map_err(|_| format!("`{s}` is not a valid header name"))
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
}

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

/// Replaces each `${NAME}` in `s` with the environment variable NAME, percent-encoded
/// so a password with `@` or `/` cannot break the URL. A missing variable is an error.
pub fn expand_env(s: &str) -> Result<String, String> {
    expand_with(s, |name| std::env::var(name).ok())
}

fn expand_with(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
        let name = &after[..end];
        let value =
            lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A rule broken by an otherwise well-typed config: the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub key: String,
    pub message: String,
}

impl Config {
    /// Checks the rules serde cannot express. Returns the first violation.
    pub fn validate(&self) -> Result<(), Violation> {
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: key.to_owned(),
                message,
            })
        };
        // Port 0 asks the OS for a free port, so two of them never collide.
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            return fail(
                "server.admin_listen",
                format!(
                    "{} is also server.listen; the admin listener needs its own address",
                    self.server.admin_listen
                ),
            );
        }
        if self.pools.production.backends.is_empty() {
            return fail(
                "pools.production.backends",
                "the production pool is empty; list at least one backend".to_owned(),
            );
        }
        for (pool, cfg) in [
            ("pools.production.backends", &self.pools.production),
            ("pools.canary.backends", &self.pools.canary),
        ] {
            for (i, backend) in cfg.backends.iter().enumerate() {
                if cfg.backends[..i].contains(backend) {
                    return fail(pool, format!("{backend} is listed twice"));
                }
            }
        }
        if let Some(shared) = self
            .pools
            .canary
            .backends
            .iter()
            .find(|b| self.pools.production.backends.contains(b))
        {
            return fail(
                "pools.canary.backends",
                format!("{shared} is in both pools; a backend serves one version"),
            );
        }
        if let Some(bad) = self.routing.allowed_upgrades.iter().find(|u| {
            u.is_empty()
                || !u
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase() && b != b',')
        }) {
            return fail(
                "routing.allowed_upgrades",
                format!("`{bad}` is not a lowercase protocol token (e.g. \"websocket\")"),
            );
        }
        if self.routing.canary_percent > 100 {
            return fail(
                "routing.canary_percent",
                format!(
                    "{} is out of range; it must be 0..=100",
                    self.routing.canary_percent
                ),
            );
        }
        self.validate_flags()?;
        self.validate_health_and_limits()?;
        self.alerts.validate()?;
        self.resources.validate()?;
        self.analysis.validate()?;
        self.doctor.validate()?;
        self.maintenance.validate()?;
        self.validate_fleet()?;
        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.connect_ms", t.connect_ms),
            ("timeouts.response_header_ms", t.response_header_ms),
            ("timeouts.client_header_read_ms", t.client_header_read_ms),
            ("timeouts.idle_ms", t.idle_ms),
            ("timeouts.websocket_idle_ms", t.websocket_idle_ms),
            ("timeouts.upstream_body_idle_ms", t.upstream_body_idle_ms),
        ] {
            if value == 0 {
                return fail(key, "must be greater than 0".to_owned());
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_fleet(&self) -> Result<(), Violation> {
        let fleet = &self.fleet;
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: key.to_owned(),
                message,
            })
        };
        if fleet.heartbeat_ms == 0 {
            return fail("fleet.heartbeat_ms", "must be greater than 0".to_owned());
        }
        if fleet.seen_ms < fleet.heartbeat_ms.saturating_mul(2) {
            return fail(
                "fleet.seen_ms",
                format!(
                    "{} must be at least twice fleet.heartbeat_ms ({}): one late heartbeat \
                     would drop a live instance",
                    fleet.seen_ms, fleet.heartbeat_ms
                ),
            );
        }
        if fleet.key.is_empty() {
            return fail("fleet.key", "must not be empty".to_owned());
        }
        if let Some(id) = &self.server.instance_id
            && (id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == ' '))
        {
            return fail(
                "server.instance_id",
                format!("{id:?} must be 1 to 128 characters without spaces or controls"),
            );
        }
        Ok(())
    }

    fn validate_flags(&self) -> Result<(), Violation> {
        let f = &self.flags;
        let fail = |key: String, message: String| Err(Violation { key, message });
        if let Some(url) = &f.redis_url {
            match redis_url::parse(url) {
                Err(message) => {
                    return fail("flags.redis_url".to_owned(), format!("`{url}`: {message}"));
                }
                Ok(redis_url::RedisUrl::Cluster { .. }) => {
                    // Keys written together (one script, one transaction) must be in
                    // one slot: the same hash tag.
                    let tag = redis_url::hash_tag(&f.key);
                    if tag.is_none() {
                        return fail(
                            "flags.key".to_owned(),
                            format!(
                                "`{}` needs a hash tag on a Redis Cluster, e.g. \"{{canarygate}}:flags\"",
                                f.key
                            ),
                        );
                    }
                    if redis_url::hash_tag(&self.fleet.key) != tag {
                        return fail(
                            "fleet.key".to_owned(),
                            format!(
                                "`{}` needs flags.key's hash tag on a Redis Cluster, e.g. \"{{{}}}:fleet\"",
                                self.fleet.key,
                                tag.unwrap_or_default()
                            ),
                        );
                    }
                    if redis_url::hash_tag(&self.analysis.redis_key) != tag {
                        return fail(
                            "analysis.redis_key".to_owned(),
                            format!(
                                "`{}` needs flags.key's hash tag on a Redis Cluster, e.g. \"{{{}}}:analysis\"",
                                self.analysis.redis_key,
                                tag.unwrap_or_default()
                            ),
                        );
                    }
                }
                Ok(_) => {}
            }
        }
        if f.key.is_empty() {
            return fail("flags.key".to_owned(), "must not be empty".to_owned());
        }
        if f.poll_ms == 0 {
            return fail(
                "flags.poll_ms".to_owned(),
                "must be greater than 0".to_owned(),
            );
        }
        for (name, value) in &f.static_flags {
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

    fn validate_health_and_limits(&self) -> Result<(), Violation> {
        let h = &self.health;
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: key.to_owned(),
                message,
            })
        };
        if !h.path.starts_with('/') || http::uri::PathAndQuery::from_str(&h.path).is_err() {
            return fail(
                "health.path",
                format!("`{}` must be a path starting with /", h.path),
            );
        }
        for (key, value) in [
            ("health.interval_ms", h.interval_ms),
            ("health.timeout_ms", h.timeout_ms),
            ("health.ejection_ms", h.ejection_ms),
            ("health.rise", u64::from(h.rise)),
            ("health.fall", u64::from(h.fall)),
        ] {
            if value == 0 {
                return fail(key, "must be greater than 0".to_owned());
            }
        }
        if h.max_ejected_percent > 100 {
            return fail(
                "health.max_ejected_percent",
                format!(
                    "{} is out of range; it must be 0..=100",
                    h.max_ejected_percent
                ),
            );
        }
        let l = &self.limits;
        if l.max_header_bytes < 1024 {
            return fail(
                "limits.max_header_bytes",
                format!("{} is too small; at least 1024", l.max_header_bytes),
            );
        }
        if l.max_connections == 0 {
            return fail(
                "limits.max_connections",
                "must be greater than 0".to_owned(),
            );
        }
        if let Some(tls) = &self.server.tls {
            let port_zero = tls.listen.port() == 0;
            if !port_zero
                && (tls.listen == self.server.listen || tls.listen == self.server.admin_listen)
            {
                return fail(
                    "server.tls.listen",
                    format!("{} is already used by another listener", tls.listen),
                );
            }
        }
        Ok(())
    }

    /// Checks what only the running environment can tell: every `${VAR}` in
    /// `flags.redis_url` is set. `run` calls it; `check` does not, so a config can be
    /// checked on a machine without the secrets.
    pub fn check_environment(&self) -> Result<(), Violation> {
        if let Some(url) = &self.flags.redis_url {
            expand_env(url).map_err(|message| Violation {
                key: "flags.redis_url".to_owned(),
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
    let invalid = |line: usize, key: String, message: String| ConfigError::Invalid {
        file: file.to_owned(),
        line,
        key,
        message,
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

    fn err(src: &str) -> String {
        from_toml(src, "test.toml").unwrap_err().to_string()
    }

    const MINIMAL: &str = "[pools.production]\nbackends = [\"127.0.0.1:3001\"]\n";

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
    fn percent_out_of_range_names_line() {
        let e = err(&format!("{MINIMAL}[routing]\ncanary_percent = 150\n"));
        assert_eq!(
            e,
            "test.toml:4: key `routing.canary_percent`: 150 is out of range; it must be 0..=100"
        );
        let e = err(&format!("{MINIMAL}[routing]\ncanary_percent = -1\n"));
        assert!(
            e.starts_with("test.toml:4: key `routing.canary_percent`"),
            "{e}"
        );
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
    fn sticky_modes_parse() {
        let with = |s: &str| from_toml(&format!("{MINIMAL}[routing]\nsticky = \"{s}\"\n"), "t");
        assert_eq!(with("ip").unwrap().routing.sticky, Sticky::Ip);
        assert_eq!(with("none").unwrap().routing.sticky, Sticky::None);
        assert_eq!(
            with("header:X-User").unwrap().routing.sticky,
            Sticky::Header(HeaderName::from_static("x-user"))
        );
        let e = with("session").unwrap_err().to_string();
        assert!(e.starts_with("t:4: key `routing.sticky`"), "{e}");
        assert!(with("header:bad name").is_err());
    }

    #[test]
    fn syntax_error_names_line() {
        let e = err("[pools.production]\nbackends = [\"a:1\"\n");
        assert!(e.starts_with("test.toml:"), "{e}");
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

    #[test]
    fn empty_override_header_turns_it_off() {
        let c = from_toml(
            &format!("{MINIMAL}[routing]\noverride_header = \"\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.routing.override_header, OverrideHeader(None));
    }

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
    fn env_expansion_percent_encodes() {
        let lookup = |name: &str| (name == "PW").then(|| "p@ss/w:rd%".to_owned());
        assert_eq!(
            expand_with("redis://:${PW}@h:1/0", lookup).unwrap(),
            "redis://:p%40ss%2Fw%3Ard%25@h:1/0"
        );
        assert_eq!(
            expand_with("redis://h:1/0", lookup).unwrap(),
            "redis://h:1/0"
        );
        assert_eq!(
            expand_with("redis://:${NOPE}@h", lookup).unwrap_err(),
            "environment variable NOPE is not set"
        );
        assert!(expand_with("redis://${PW", lookup).is_err());
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let src = include_str!("../../config.toml");
        from_toml(src, "config.toml").unwrap();
    }

    #[test]
    fn analysis_defaults_and_bad_values_name_file_line_and_key() {
        let c = from_toml(MINIMAL, "t").unwrap();
        let a = &c.analysis;
        assert!(!a.enabled);
        assert_eq!(
            (a.interval_ms, a.window_ms, a.min_requests),
            (10_000, 120_000, 100)
        );
        assert_eq!(
            (a.failure_threshold, a.redis_key.as_str()),
            (2, "canarygate:analysis")
        );
        assert!(
            (a.max_error_ratio_delta - 0.02).abs() < 1e-12 && (a.confidence - 0.99).abs() < 1e-12
        );
        let ok = from_toml(
            &format!("{MINIMAL}[analysis]\nenabled = true\nsteps = [5, 10, 25, 33, 50]\nstep_ms = 30000\n"),
            "t",
        )
        .unwrap();
        assert_eq!(ok.analysis.steps, [5, 10, 25, 33, 50]);
        for (body, want) in [
            (
                "steps = [5, 25, 10]",
                "test.toml:4: key `analysis.steps`: 25 then 10: steps must increase",
            ),
            (
                "steps = [5, 101]",
                "test.toml:4: key `analysis.steps`: 101 is out of range; steps are percents 1..=100",
            ),
            (
                "confidence = 0.5",
                "test.toml:4: key `analysis.confidence`: 0.5 is out of range; it must be in (0.5, 1), e.g. 0.99",
            ),
            (
                "confidence = 1.0",
                "test.toml:4: key `analysis.confidence`: 1 is out of range; it must be in (0.5, 1), e.g. 0.99",
            ),
            (
                "interval_ms = 20000\nwindow_ms = 10000",
                "test.toml:5: key `analysis.window_ms`: 10000 is shorter than interval_ms (20000): checks would skip requests",
            ),
            (
                "failure_threshold = 0",
                "test.toml:4: key `analysis.failure_threshold`: must be greater than 0",
            ),
        ] {
            assert_eq!(err(&format!("{MINIMAL}[analysis]\n{body}\n")), want);
        }
        let e = err(&format!("{MINIMAL}[analysis]\nsteps = [5, 300]\n"));
        assert!(e.starts_with("test.toml:4: key `analysis.steps"), "{e}");
        let e = err(&format!("{MINIMAL}[analysis]\nwindow = 5\n"));
        assert!(e.starts_with("test.toml:4: key `analysis"), "{e}");
    }
}
