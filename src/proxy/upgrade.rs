//! Protocol upgrades (WebSockets): which requests may switch, the RFC 8441 bridge from
//! HTTP/2 extended CONNECT to an HTTP/1.1 upgrade, and the tunnel that splices the
//! two connections once the backend said 101.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Version};
use hyper::body::Incoming;
use tracing::debug;

use crate::client::body::Upgraded;
use crate::http1::{list_items, strip_hop_by_hop};
use crate::observe::metrics::GaugeGuard;
use crate::proxy::error::ProxyError;

/// A valid, allowed request to switch protocols.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// The protocol, as the `Upgrade` header value sent upstream (`websocket`).
    pub protocol: HeaderValue,
    /// An HTTP/2 extended CONNECT (RFC 8441), bridged to an HTTP/1.1 upgrade.
    pub extended_connect: bool,
}

/// The upgrade a request asks for: an HTTP/1.1 `Connection: upgrade` + `Upgrade`, or
/// an HTTP/2 extended CONNECT with `:protocol` (RFC 8441). A protocol not in
/// `allowed` is refused with 400.
pub fn upgrade_requested(
    req: &Request<Incoming>,
    allowed: &[String],
) -> Result<Option<UpgradeRequest>, ProxyError> {
    let h = req.headers();
    let (protocol, extended_connect) = if req.method() == Method::CONNECT {
        match req.extensions().get::<hyper::ext::Protocol>() {
            Some(protocol) => match HeaderValue::from_str(protocol.as_str()) {
                Ok(value) => (value, true),
                Err(_) => return Err(ProxyError::BadRequest("invalid :protocol")),
            },
            // A plain CONNECT: refused later with 405.
            None => return Ok(None),
        }
    } else {
        let Some(protocol) = h.get(header::UPGRADE) else {
            return Ok(None);
        };
        let connection_upgrade = list_items(&h.get_all(header::CONNECTION))
            .any(|token| token.eq_ignore_ascii_case(b"upgrade"));
        if !connection_upgrade || req.version() != Version::HTTP_11 {
            // Not an upgrade request: the Upgrade header is hop-by-hop noise.
            return Ok(None);
        }
        (protocol.clone(), false)
    };
    let first = protocol
        .as_bytes()
        .split(|&b| b == b',')
        .next()
        .unwrap_or_default();
    let name = first
        .split(|&b| b == b'/')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if allowed
        .iter()
        .any(|a| name.eq_ignore_ascii_case(a.as_bytes()))
    {
        Ok(Some(UpgradeRequest {
            protocol,
            extended_connect,
        }))
    } else {
        Err(ProxyError::BadRequest(
            "upgrade to a protocol not in routing.allowed_upgrades",
        ))
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 4.1).
pub fn websocket_key() -> HeaderValue {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = fastrand::u128(..).to_le_bytes();
    let mut out = Vec::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        let symbols = chunk.len() + 1;
        for i in 0..4 {
            out.push(if i < symbols {
                B64[((n >> (18 - 6 * i)) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    HeaderValue::from_bytes(&out)
        .unwrap_or_else(|_| HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="))
}

/// Strips a 101 response's hop-by-hop headers but keeps the two that describe the
/// switch itself.
pub fn keep_upgrade_headers(headers: &mut HeaderMap) {
    let protocol = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(protocol) = protocol {
        headers.insert(header::UPGRADE, protocol);
    }
}

/// Splices an upgraded client connection and its backend connection both ways until
/// either side closes (or the connection goes idle, or the drain deadline cuts it).
pub async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut upstream: Upgraded,
    open: prometheus::IntGauge,
    cut: tokio_util::sync::CancellationToken,
) {
    let client = match client.await {
        Ok(client) => client,
        Err(error) => {
            debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let _open = GaugeGuard::new(open);
    let mut client = hyper_util::rt::TokioIo::new(client);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match result {
            Ok((up, down)) => debug!(up, down, "tunnel closed"),
            Err(error) => debug!(%error, "tunnel ended"),
        },
        () = cut.cancelled() => debug!("tunnel cut by the drain deadline"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys_are_16_random_bytes_in_base64() {
        let a = websocket_key();
        let b = websocket_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(a.to_str().unwrap().ends_with("=="));
    }
}
