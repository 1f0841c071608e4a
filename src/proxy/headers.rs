//! The request as the backend sees it: the client's fields minus the hop-by-hop ones,
//! plus what the proxy sets (`Host` from `:authority`, `X-Forwarded-*`,
//! `X-Request-Id`, the flags), and the ids and cookies behind them.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};
use hyper::body::{Body as _, Incoming};

use crate::client::codec::SetFields;
use crate::client::request_body::UpstreamBody;
use crate::http1::strip_hop_by_hop;
use crate::observe::baggage;
use crate::observe::trace::{BAGGAGE, RequestTrace, TRACESTATE, Tracing};
use crate::proxy::error::ProxyError;
use crate::proxy::upgrade::{UpgradeRequest, websocket_key};
use crate::routing;
use crate::server::conn_state::ConnState;
use crate::shadow::SHADOW_HEADER;
use crate::sticky::StickySigner;

/// Header on every proxied response naming the pool that served it.
pub const POOL_HEADER: HeaderName = HeaderName::from_static("x-canarygate-pool");
/// Request id, kept from the client or generated, sent upstream and returned.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A year, the lifetime of the sticky cookie.
const STICKY_COOKIE_MAX_AGE_S: u32 = 365 * 24 * 3600;

/// What the proxy knows about the client connection a request came on. Built once
/// per connection, so per-request work (the client IP's text, its sticky bucket) is
/// not repeated for every request of a keep-alive connection.
#[derive(Debug)]
pub struct ClientPeer {
    pub peer: SocketAddr,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// The connection's shared state: the smuggling guard's verdicts, one per
    /// request in order, and the idle timeout an upgraded tunnel changes.
    pub conn: Arc<ConnState>,
    /// The peer IP as an `X-Forwarded-For` value.
    pub forwarded_for: HeaderValue,
    /// The peer IP's sticky bucket (`sticky = "ip"`).
    pub ip_bucket: u8,
}

impl ClientPeer {
    pub fn new(peer: SocketAddr, scheme: &'static str, conn: Arc<ConnState>) -> Self {
        let mut buf = [0u8; 64];
        let ip_text = write_ip(&mut buf, peer.ip());
        Self {
            peer,
            scheme,
            conn,
            forwarded_for: HeaderValue::from_bytes(ip_text)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            ip_bucket: routing::bucket(ip_text),
        }
    }
}

/// Headers and limits the proxy applies to every upstream request.
pub struct UpstreamHeaders<'a> {
    /// The tracer and the request's server span, when `[tracing]` is on: each
    /// attempt then gets a `traceparent` of its own, and the client's trace fields
    /// are replaced.
    pub trace: Option<(&'a Tracing, &'a RequestTrace)>,
    /// The `baggage` sent upstream (with `[tracing]` on).
    pub baggage: Option<&'a HeaderValue>,
    pub request_id: &'a HeaderValue,
    pub flags_header: &'a HeaderName,
    pub flags: &'a HeaderValue,
    pub max_body_bytes: Option<u64>,
    /// A valid, allowed upgrade request, passed through.
    pub upgrade: Option<&'a UpgradeRequest>,
    /// Set to the monotonic ms at which the client's body has all arrived (for a
    /// request with a body): the canary analysis times the backend from there.
    pub upload_done: Option<&'a Arc<AtomicU64>>,
}

/// Writes the time the client's body ended into its cell when dropped (with the
/// body's end, failure or abandonment).
struct UploadDone(Arc<AtomicU64>);

impl Drop for UploadDone {
    fn drop(&mut self) {
        self.0.store(crate::clock::now_ms(), Ordering::Relaxed);
    }
}

/// Rewrites a client request into the request sent upstream: the client's header
/// fields minus the hop-by-hop ones, and the fields the proxy sets (`Host` when the
/// client sent `:authority`, `X-Forwarded-*`, `X-Request-Id`, the flags header, an
/// allowed upgrade's `Connection` and `Upgrade`), which replace any the client sent.
/// Those are returned apart and written straight into the request head: inserting
/// them into the client's map made it grow and rehash on most requests.
pub fn upstream_request(
    req: Request<Incoming>,
    peer: &ClientPeer,
    extra: &UpstreamHeaders<'_>,
) -> Result<(Request<UpstreamBody>, SetFields), ProxyError> {
    let extended_connect = extra.upgrade.is_some_and(|u| u.extended_connect);
    if req.method() == Method::CONNECT && !extended_connect {
        return Err(ProxyError::MethodNotAllowed);
    }
    if req.uri().path_and_query().is_none() {
        return Err(ProxyError::BadRequest("request target has no path"));
    }
    let (mut parts, body) = req.into_parts();
    if extended_connect {
        // RFC 8441 -> RFC 6455: the backend speaks HTTP/1.1, so it gets the classic
        // handshake (GET + Sec-WebSocket-Key); the WebSocket frames then pass as is.
        parts.method = Method::GET;
        parts
            .headers
            .insert(header::SEC_WEBSOCKET_KEY, websocket_key());
        if !parts.headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
            parts.headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    // One pass over the client's fields for the two the proxy may take out: a
    // lookup each cost more, on every request, than a request's few fields.
    let (mut shadow_mark, mut own_baggage) = (false, false);
    for (name, value) in &parts.headers {
        if *name == SHADOW_HEADER {
            shadow_mark = true;
        } else if *name == BAGGAGE && !own_baggage {
            own_baggage = baggage::mentions_canarygate(std::iter::once(value.as_bytes()));
        }
    }
    if shadow_mark {
        // The shadow's mark is the proxy's alone: a client sending it could make the
        // application skip the side effects of its real request (`crate::shadow`).
        parts.headers.remove(SHADOW_HEADER);
    }
    parts.version = Version::HTTP_11;
    if extra.trace.is_some() {
        // Each attempt sets its own `traceparent` (the field list replaces the
        // client's); a caller's tracestate goes on only through the trace it
        // continued.
        parts.headers.remove(TRACESTATE);
    }
    let baggage = match extra.baggage {
        Some(baggage) => Some(baggage.clone()),
        // Tracing off: baggage passes, but never a `canarygate.*` member (services
        // behind may trust `canarygate.pool`; a client must not set it).
        None if own_baggage => {
            let incoming = baggage::parse(
                parts
                    .headers
                    .get_all(BAGGAGE)
                    .iter()
                    .map(HeaderValue::as_bytes),
            );
            parts.headers.remove(BAGGAGE);
            baggage::render(None, &[], &incoming)
                .and_then(|out| HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok())
        }
        None => None,
    };

    let h = &parts.headers;
    // Room for the trace fields too (traceparent, tracestate, baggage): growing it
    // showed in the profile.
    let mut set = Vec::with_capacity(12);
    // Exactly one Host goes upstream: the target's authority when the request has one
    // (HTTP/2 :authority; an HTTP/1.1 absolute-form target, whose Host the recipient
    // MUST ignore, RFC 9112 3.2.2), else the client's one Host (checked before).
    let host = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| h.get(header::HOST).cloned());
    if let Some(host) = host {
        set.push((header::HOST, host.clone()));
        set.push((X_FORWARDED_HOST, host));
    }
    if let Some(upgrade) = extra.upgrade {
        // The one exception to hop-by-hop stripping: a valid upgrade keeps its headers.
        set.push((header::CONNECTION, HeaderValue::from_static("upgrade")));
        set.push((header::UPGRADE, upgrade.protocol.clone()));
    }
    set.push((
        X_FORWARDED_FOR,
        forwarded_for(h.get(X_FORWARDED_FOR), &peer.forwarded_for),
    ));
    set.push((X_FORWARDED_PROTO, HeaderValue::from_static(peer.scheme)));
    set.push((REQUEST_ID, extra.request_id.clone()));
    if let Some(baggage) = baggage {
        set.push((BAGGAGE, baggage));
    }
    // Replaces every client-sent value: flags come only from the proxy.
    set.push((extra.flags_header.clone(), extra.flags.clone()));
    let mut body = UpstreamBody::new(body, extra.max_body_bytes);
    if !body.is_end_stream() {
        // While it arrives, a quiet connection is the client's: the idle timeout runs.
        let done = extra.upload_done.map(|cell| UploadDone(Arc::clone(cell)));
        body = body.holding(Box::new((peer.conn.upload_in_progress(), done)));
    }
    Ok((Request::from_parts(parts, body), set))
}

/// Checks the request's Host field and target authority (RFC 9112 3.2, RFC 9113
/// 8.3.1): at most one Host field, each of them a valid `uri-host [ ":" port ]`
/// (RFC 9110 7.2; userinfo is not allowed), and an HTTP/2 request's Host, if any,
/// naming the same authority as its `:authority`.
pub fn check_host(req: &Request<Incoming>) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host field"));
    }
    // An empty Host is what RFC 9112 3.2 asks of a client whose target has no
    // authority; it is valid and routes nowhere special.
    if host.is_some_and(|h| !h.is_empty() && !valid_authority(h.as_bytes())) {
        return Err(ProxyError::BadRequest("invalid Host"));
    }
    if req.version() == Version::HTTP_11 && host.is_none() {
        return Err(ProxyError::BadRequest("HTTP/1.1 request without Host"));
    }
    let Some(authority) = req.uri().authority() else {
        return Ok(());
    };
    if !valid_authority(authority.as_str().as_bytes()) {
        return Err(ProxyError::BadRequest("invalid request target authority"));
    }
    if req.version() == Version::HTTP_2
        && host.is_some_and(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        })
    {
        return Err(ProxyError::BadRequest("Host differs from :authority"));
    }
    Ok(())
}

/// Whether `value` is `uri-host [ ":" port ]` (RFC 3986 3.2.2 and 3.2.3): an IP
/// literal in brackets, or an IPv4 address or registered name (unreserved,
/// percent-encoded and sub-delims characters), then an optional port of at most
/// 65535.
pub fn valid_authority(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(close) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..close];
        if !valid_ip_literal(literal) {
            return false;
        }
        match &value[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&value[..=close], Some(port)),
            _ => return false,
        }
    } else {
        match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        }
    };
    let host_ok = host.first() == Some(&b'[') || (!host.is_empty() && valid_reg_name(host));
    let port_ok = port.is_none_or(|p| {
        p.len() <= 5
            && p.iter()
                .try_fold(0u32, |n, &b| {
                    b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
                })
                .is_some_and(|n| n <= u32::from(u16::MAX))
    });
    host_ok && port_ok
}

/// The bytes a `reg-name` may hold as they are (RFC 3986 3.2.2): unreserved and
/// sub-delims; `%` starts a percent-encoded byte.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let allowed = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=";
    let mut i = 0;
    while i < allowed.len() {
        table[allowed[i] as usize] = true;
        i += 1;
    }
    table
};

/// `reg-name` (RFC 3986 3.2.2), which also covers IPv4 addresses.
fn valid_reg_name(host: &[u8]) -> bool {
    let mut i = 0;
    while i < host.len() {
        match host[i] {
            b'%' => {
                if !host
                    .get(i + 1..i + 3)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
            }
            b if REG_NAME[usize::from(b)] => i += 1,
            _ => return false,
        }
    }
    true
}

/// The inside of `[...]`: an IPv6 address or an `IPvFuture` (RFC 3986 3.2.2).
fn valid_ip_literal(literal: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = literal {
        let Some(dot) = rest.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (version, tail) = (&rest[..dot], &rest[dot + 1..]);
        return !version.is_empty()
            && version.iter().all(u8::is_ascii_hexdigit)
            && !tail.is_empty()
            && tail
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:".contains(&b));
    }
    std::str::from_utf8(literal)
        .ok()
        .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
        .is_some()
}

/// `X-Forwarded-For` with the client IP appended, keeping what earlier proxies wrote.
fn forwarded_for(prior: Option<&HeaderValue>, ip: &HeaderValue) -> HeaderValue {
    match prior {
        Some(prior) if !prior.is_empty() => {
            let mut joined = Vec::with_capacity(prior.len() + 2 + ip.len());
            joined.extend_from_slice(prior.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip.as_bytes());
            // Both parts are valid header values, and so is ", ".
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| ip.clone())
        }
        _ => ip.clone(),
    }
}

/// Writes an IP in its usual text form (`192.0.2.7`, `2001:db8::1`) into `buf`.
fn write_ip(buf: &mut [u8; 64], ip: IpAddr) -> &[u8] {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // 64 bytes hold the longest IPv6 text (45), so the write cannot fail.
    let _ = write!(cursor, "{ip}");
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    &buf[..len]
}

pub fn random_bucket() -> u8 {
    fastrand::u8(0..100)
}

/// The sticky id from the client's cookies, if there is one `signer` signed.
pub fn sticky_cookie<'a>(headers: &'a HeaderMap, signer: &StickySigner) -> Option<&'a [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .find_map(|v| routing::find_cookie(v.as_bytes(), routing::STICKY_COOKIE))
        .and_then(|value| signer.verify(value))
}

/// 128 random bits as 32 lowercase hex characters: sticky ids and request ids.
pub fn random_hex_id() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut out = [0u8; 32];
    for byte in out.iter_mut().rev() {
        *byte = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    out
}

pub fn header_value_from_id(id: &[u8; 32]) -> HeaderValue {
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The `Set-Cookie` of a new sticky id, its value signed ([`StickySigner::sign`]).
pub fn sticky_set_cookie(signed: &[u8]) -> HeaderValue {
    let mut value = Vec::with_capacity(160);
    value.extend_from_slice(routing::STICKY_COOKIE.as_bytes());
    value.push(b'=');
    value.extend_from_slice(signed);
    let _ = write!(
        value,
        "; Path=/; Max-Age={STICKY_COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Lax"
    );
    HeaderValue::from_bytes(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A client-sent request id is kept when it is 1 to 128 visible ASCII characters;
/// otherwise the proxy generates one, so logs never carry arbitrary bytes.
pub fn valid_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len()) && id.iter().all(|&b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_follow_rfc_3986() {
        for good in [
            "example.com",
            "example.com:8080",
            "EXAMPLE.com:",
            "127.0.0.1:80",
            "[::1]",
            "[2001:db8::7]:443",
            "[v1.fe80::a+en1]",
            "xn--bcher-kva.example",
            "a%20b.example",
            "sub_delims!$&'()*+,;=",
            "h:65535",
        ] {
            assert!(valid_authority(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "bad host",
            "user@example.com",
            "example.com:80:80",
            "example.com:http",
            "example.com:65536",
            "example.com:000080",
            "[::1",
            "[::1]x",
            "[not-ipv6]",
            "[v1.]",
            "a%2",
            "a%zz",
            ":80",
            "a/b",
            "a\tb",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_appends() {
        let conn = |ip: &str| {
            ClientPeer::new(
                SocketAddr::new(ip.parse().unwrap(), 1),
                "http",
                Arc::default(),
            )
        };
        let first = forwarded_for(None, &conn("10.0.0.1").forwarded_for);
        assert_eq!(first, "10.0.0.1");
        let second = forwarded_for(Some(&first), &conn("2001:db8::1").forwarded_for);
        assert_eq!(second, "10.0.0.1, 2001:db8::1");
        let empty = HeaderValue::from_static("");
        assert_eq!(
            forwarded_for(Some(&empty), &conn("10.0.0.2").forwarded_for),
            "10.0.0.2"
        );
        assert_eq!(conn("127.0.0.1").ip_bucket, routing::bucket(b"127.0.0.1"));
    }

    #[test]
    fn ids_are_hex_and_differ() {
        let a = random_hex_id();
        let b = random_hex_id();
        assert_ne!(a, b);
        assert!(a.iter().all(u8::is_ascii_hexdigit));
        assert!(routing::valid_sticky_id(&a));
    }

    #[test]
    fn set_cookie_has_the_documented_attributes() {
        let v = sticky_set_cookie(b"0123456789abcdef0123456789abcdef");
        assert_eq!(
            v,
            "canarygate_id=0123456789abcdef0123456789abcdef; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn request_id_validation() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id(&[b'a'; 129]));
    }
}
