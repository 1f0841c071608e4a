//! `[server]`, `[server.tls]` and `[limits]`: the client side of the proxy: where
//! its listeners bind, how they drain and log, and what one client may ask of them.
//! Read mostly where the listeners start (`serve_all`, `serve_options`), which is
//! why changing the addresses, the drain or `max_connections` waits for a restart.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{Violation, fail};

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

impl ServerConfig {
    /// The admin listener has an address of its own.
    pub fn validate_admin_listen(&self) -> Result<(), Violation> {
        // Port 0 asks the OS for a free port, so two of them never collide.
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return fail(
                "server.admin_listen",
                format!(
                    "{} is also server.listen; the admin listener needs its own address",
                    self.admin_listen
                ),
            );
        }
        Ok(())
    }

    /// The TLS listener, if any, has an address of its own.
    pub fn validate_tls_listen(&self) -> Result<(), Violation> {
        if let Some(tls) = &self.tls {
            let port_zero = tls.listen.port() == 0;
            if !port_zero && (tls.listen == self.listen || tls.listen == self.admin_listen) {
                return fail(
                    "server.tls.listen",
                    format!("{} is already used by another listener", tls.listen),
                );
            }
        }
        Ok(())
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
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
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

impl LimitsConfig {
    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        if self.max_header_bytes < 1024 {
            return fail(
                "limits.max_header_bytes",
                format!("{} is too small; at least 1024", self.max_header_bytes),
            );
        }
        if self.max_connections == 0 {
            return fail("limits.max_connections", "must be greater than 0");
        }
        Ok(())
    }
}
