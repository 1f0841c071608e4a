//! `[routing]`: how requests are split between the pools. The settings only:
//! the decisions they feed are pure functions in [`crate::routing`].

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
    fn empty_override_header_turns_it_off() {
        let c = from_toml(
            &format!("{MINIMAL}[routing]\noverride_header = \"\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.routing.override_header, OverrideHeader(None));
    }
}
