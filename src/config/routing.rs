//! `[routing]`: how requests are split between the pools. The settings only:
//! the decisions they feed are pure functions in [`crate::routing`].

use std::net::IpAddr;
use std::str::FromStr;

use http::HeaderName;
use serde::Deserialize;

use crate::config::{Violation, fail};

/// `[routing]`: how requests are split between the pools.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub canary_percent: u8,
    pub sticky: Sticky,
    pub override_header: OverrideHeader,
    /// `Upgrade` protocols passed through (lowercase); others get 400.
    pub allowed_upgrades: Vec<String>,
    /// The networks whose override header is honoured; from anywhere else it is
    /// ignored and the bucket decides.
    pub override_trusted: Vec<Cidr>,
    /// The environment variable holding the key that signs the sticky cookie
    /// (the same on every proxy of a fleet); unset: a per-process key.
    pub sticky_secret_env: Option<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            canary_percent: 33,
            sticky: Sticky::Cookie,
            override_header: OverrideHeader(Some(HeaderName::from_static("x-canary"))),
            allowed_upgrades: vec!["websocket".to_owned()],
            override_trusted: vec![
                Cidr::new(IpAddr::from([127, 0, 0, 0]), 8),
                Cidr::new(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), 128),
            ],
            sticky_secret_env: None,
        }
    }
}

/// The shortest sticky secret accepted from the environment.
pub const MIN_STICKY_SECRET_BYTES: usize = 16;

/// What is wrong with `routing.sticky_secret_env` in this environment, if anything:
/// a named variable must be set and hold at least [`MIN_STICKY_SECRET_BYTES`] bytes.
pub fn sticky_secret_problem(secret_env: &str) -> Option<String> {
    match std::env::var(secret_env) {
        Err(_) => Some(format!("environment variable {secret_env} is not set")),
        Ok(secret) if secret.len() < MIN_STICKY_SECRET_BYTES => Some(format!(
            "environment variable {secret_env} holds {} bytes; a sticky secret needs at least {MIN_STICKY_SECRET_BYTES}",
            secret.len()
        )),
        Ok(_) => None,
    }
}

impl RoutingConfig {
    /// Whether the override header of a request from `peer` is honoured.
    pub fn override_trusted_from(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.override_trusted.iter().any(|net| net.contains(peer))
    }
}

/// A network, `address/prefix` (`10.0.0.0/8`, `fd00::/8`); a bare address is its
/// own /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub const fn new(network: IpAddr, prefix: u8) -> Self {
        Self { network, prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| -> (u128, u32) {
            match a {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let ((net, width), (addr, addr_width)) = (bits(self.network), bits(ip));
        if width != addr_width {
            return false;
        }
        let prefix = u32::from(self.prefix);
        let mask = if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - prefix)
        };
        net & mask == addr & mask
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let (addr, prefix) = s
            .split_once('/')
            .map_or((s.as_str(), None), |(a, p)| (a, Some(p)));
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address or a network like 10.0.0.0/8"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix must be 0..={max}"))?,
        };
        Ok(Self { network, prefix })
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

impl RoutingConfig {
    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        if let Some(bad) = self.allowed_upgrades.iter().find(|u| {
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
        if self.canary_percent > 100 {
            return fail(
                "routing.canary_percent",
                format!(
                    "{} is out of range; it must be 0..=100",
                    self.canary_percent
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::from_toml;
    use crate::config::tests::{MINIMAL, err};

    use super::*;

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
    fn override_is_trusted_from_loopback_by_default_and_from_listed_networks() {
        let default = RoutingConfig::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(default.override_trusted_from(ip("127.0.0.1")));
        assert!(default.override_trusted_from(ip("127.9.9.9")));
        assert!(default.override_trusted_from(ip("::1")));
        assert!(default.override_trusted_from(ip("::ffff:127.0.0.1")));
        assert!(!default.override_trusted_from(ip("192.0.2.1")));
        assert!(!default.override_trusted_from(ip("::2")));
        let c = from_toml(
            &format!(
                "{MINIMAL}[routing]\noverride_trusted = [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\"]\n"
            ),
            "t",
        )
        .unwrap();
        let r = &c.routing;
        assert!(r.override_trusted_from(ip("10.200.0.1")));
        assert!(!r.override_trusted_from(ip("11.0.0.1")));
        assert!(r.override_trusted_from(ip("2001:db8:ffff::1")));
        assert!(r.override_trusted_from(ip("192.0.2.7")));
        assert!(!r.override_trusted_from(ip("192.0.2.8")));
        assert!(
            !r.override_trusted_from(ip("127.0.0.1")),
            "the list replaces the default"
        );
        let e = from_toml(
            &format!("{MINIMAL}[routing]\noverride_trusted = [\"10.0.0.0/33\"]\n"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("t:4: key `routing.override_trusted"), "{e}");
        let e = from_toml(
            &format!("{MINIMAL}[routing]\noverride_trusted = [\"anywhere\"]\n"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not an address"), "{e}");
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
}
