//! What the co-located processes (`canarygate doctor`, `canarygate maintenance`)
//! read of the proxy's own sections: where its `/metrics` are.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::Violation;

/// `server.admin_listen` alone (the rest of `[server]` is the proxy's business).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ServerAddress {
    pub admin_listen: Option<SocketAddr>,
}

impl ServerAddress {
    /// The proxy's `/metrics`: `configured` when set, or the proxy's admin listener
    /// (an unspecified address such as 0.0.0.0 is reached on loopback).
    pub fn metrics_url(&self, configured: Option<&String>) -> String {
        if let Some(url) = configured {
            return url.clone();
        }
        let mut addr = self
            .admin_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090)));
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}/metrics")
    }
}

/// `<section>.proxy_metrics_url` must be an http(s) URL.
pub fn check_metrics_url(section: &str, url: Option<&String>) -> Result<(), Violation> {
    match url {
        Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
            Err(Violation {
                key: format!("{section}.proxy_metrics_url"),
                message: format!("`{url}` is not an http:// or https:// URL"),
            })
        }
        _ => Ok(()),
    }
}
