//! The request path: route one client request to a backend and stream the answer back.
//!
//! `handle` loads the snapshot once, decides the pool and backend with the pure
//! functions of [`crate::routing`], rewrites headers (hop-by-hop stripping per
//! RFC 9110 7.6.1, `X-Forwarded-*`, `X-Request-Id`), forwards through the pooled
//! client with a response-header deadline, and maps every failure to a status in one
//! exhaustive match. Bodies are never buffered: hyper streams them both ways with
//! backpressure, so a 64 MiB upload costs the proxy a few buffers, not 64 MiB.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Uri;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Incoming};
use tracing::{debug, info, warn};

use std::sync::atomic::Ordering;

use crate::client::{ExchangeError, PooledBody, SetFields, Upgraded};
use crate::config::Sticky;
use crate::metrics::UpstreamErrorKind;
use crate::pool::ConnectSettings;
use crate::routing;
use crate::routing::PoolKind;
use crate::state::AppState;
use crate::state::Snapshot;
use crate::upstream::{self, Backend, BodyTooLarge, Ejection, Pool, UpstreamBody};

/// Response body: the upstream's streamed body, or a short body the proxy wrote.
pub type ProxyBody = Either<PooledBody, Full<Bytes>>;

/// Header on every proxied response naming the pool that served it.
pub const POOL_HEADER: HeaderName = HeaderName::from_static("x-canarygate-pool");
/// Request id, kept from the client or generated, sent upstream and returned.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 7.6.1, plus the non-standard Proxy-Connection and the
/// Trailer announcement): they describe one connection, never the next one.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A year, the lifetime of the sticky cookie.
const STICKY_COOKIE_MAX_AGE_S: u32 = 365 * 24 * 3600;

/// What the proxy knows about the client connection a request came on. Built once
/// per connection, so per-request work (the client IP's text, its sticky bucket) is
/// not repeated for every request of a keep-alive connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// Framing verdicts from the smuggling guard, one per request in order.
    pub framing: std::sync::Arc<crate::framing::ConnShared>,
    /// The peer IP as an `X-Forwarded-For` value.
    forwarded_for: HeaderValue,
    /// The peer IP's sticky bucket (`sticky = "ip"`).
    ip_bucket: u8,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        scheme: &'static str,
        framing: std::sync::Arc<crate::framing::ConnShared>,
    ) -> Self {
        let mut buf = [0u8; 64];
        let ip_text = write_ip(&mut buf, peer.ip());
        Self {
            peer,
            scheme,
            framing,
            forwarded_for: HeaderValue::from_bytes(ip_text)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            ip_bucket: routing::bucket(ip_text),
        }
    }
}

/// Why a request got no upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request cannot be proxied: {0}")]
    BadRequest(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("no backend available in pool {0}")]
    NoBackend(&'static str),
    #[error("request body larger than max_body_bytes ({0})")]
    PayloadTooLarge(u64),
    #[error("the client's request body was malformed or cut short")]
    ClientBody,
    #[error("backend switched protocols without being asked")]
    BadGatewayUpgrade,
    #[error("connecting to the backend failed")]
    Connect(#[source] ExchangeError),
    #[error("backend sent no response headers within {0:?}")]
    Timeout(Duration),
    #[error("backend failed")]
    Upstream(#[source] ExchangeError),
}

impl ProxyError {
    /// The one place errors become statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::ClientBody => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NoBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Connect(_) | Self::Upstream(_) | Self::BadGatewayUpgrade => {
                StatusCode::BAD_GATEWAY
            }
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `kind` label for `canarygate_upstream_errors_total`; `None` when the
    /// backend was never involved.
    pub fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            Self::BadRequest(_)
            | Self::MethodNotAllowed
            | Self::NoBackend(_)
            | Self::PayloadTooLarge(_)
            | Self::ClientBody => None,
            Self::Connect(_) => Some(UpstreamErrorKind::Connect),
            Self::Timeout(_) => Some(UpstreamErrorKind::Timeout),
            Self::Upstream(e) => Some(classify_upstream(e)),
            Self::BadGatewayUpgrade => Some(UpstreamErrorKind::Protocol),
        }
    }

    /// Connect errors and resets before any response byte: the backend never saw the
    /// request, or dropped it before answering.
    fn retryable(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Upstream(e) => classify_upstream(e) == UpstreamErrorKind::Reset,
            Self::BadRequest(_)
            | Self::MethodNotAllowed
            | Self::NoBackend(_)
            | Self::PayloadTooLarge(_)
            | Self::ClientBody
            | Self::BadGatewayUpgrade
            | Self::Timeout(_) => false,
        }
    }

    /// Errors after which the client connection must not be reused.
    fn closes_connection(&self) -> bool {
        match self {
            Self::BadRequest(_) | Self::PayloadTooLarge(_) | Self::ClientBody => true,
            Self::MethodNotAllowed
            | Self::NoBackend(_)
            | Self::Connect(_)
            | Self::Timeout(_)
            | Self::BadGatewayUpgrade
            | Self::Upstream(_) => false,
        }
    }

    fn body(&self) -> &'static str {
        match self {
            Self::BadRequest(_) | Self::ClientBody => "400 bad request\n",
            Self::MethodNotAllowed => "405 method not allowed\n",
            Self::NoBackend(_) => "503 no backend available\n",
            Self::PayloadTooLarge(_) => "413 request body too large\n",
            Self::Connect(_) => "502 bad gateway: backend unreachable\n",
            Self::Upstream(_) | Self::BadGatewayUpgrade => "502 bad gateway: backend failed\n",
            Self::Timeout(_) => "504 gateway timeout: backend too slow\n",
        }
    }
}

/// Proxies one request. Never fails: every error becomes a short response.
pub async fn handle(
    state: &AppState,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let snapshot = state.snapshot();
    let config = &snapshot.config;
    let now = upstream::now_ms();
    let (chosen, new_sticky_id) = choose_pool(&snapshot, conn, req.headers());
    let kind = if chosen == PoolKind::Canary && !snapshot.pools.canary.has_usable(now) {
        state.metrics.failover_requests.inc();
        note_canary_failover(state, true);
        PoolKind::Production
    } else {
        if chosen == PoolKind::Canary {
            note_canary_failover(state, false);
        }
        chosen
    };
    let request_id = match req.headers().get(REQUEST_ID) {
        Some(id) if valid_request_id(id.as_bytes()) => id.clone(),
        _ => header_value_from_id(&random_hex_id()),
    };

    let pool_metrics = state.metrics.pool(kind);
    let _in_flight = pool_metrics.in_flight_guard();
    let method = req.method().clone();
    let http1 = req.version() < Version::HTTP_2;
    // Path only, never the query: queries carry tokens and personal data.
    let path_and_query = req.uri().path_and_query().cloned();
    let ambiguous = conn.framing.next_request_is_bad();
    let checked = check_framing(&req, ambiguous, config.limits.max_body_bytes)
        .and_then(|()| upgrade_requested(&req, &config.routing.allowed_upgrades));
    let upgrade = match &checked {
        Ok(Some(upgrade)) => Some((upgrade.clone(), hyper::upgrade::on(&mut req))),
        Ok(None) | Err(_) => None,
    };
    let extra = UpstreamHeaders {
        request_id: &request_id,
        flags_header: &config.flags.header.0,
        flags: &snapshot.flags.header_value,
        max_body_bytes: config.limits.max_body_bytes,
        upgrade: upgrade.as_ref().map(|(upgrade, _)| upgrade),
    };
    let (result, backend) = match checked {
        Err(error) => (Err(error), None),
        Ok(_) => {
            let pool = snapshot.pools.get(kind);
            proxy_to_pool(state, &snapshot, pool, req, conn, &extra, now).await
        }
    };
    let backend_addr = backend.map_or("-", |b| b.authority.as_str());

    let mut response = match (result, upgrade) {
        (Ok(mut response), Some((upgrade, client_side)))
            if response.status() == StatusCode::SWITCHING_PROTOCOLS =>
        {
            match response.body_mut().take_upgraded() {
                // The body holds the connection of a 101 to an upgrade request; without
                // it there is nothing to hand over.
                None => error_response(&ProxyError::BadGatewayUpgrade),
                Some(upstream_side) => {
                    if upgrade.extended_connect {
                        // RFC 8441: an HTTP/2 client is told 200, without the HTTP/1.1
                        // handshake.
                        *response.status_mut() = StatusCode::OK;
                        strip_hop_by_hop(response.headers_mut());
                        response.headers_mut().remove(header::SEC_WEBSOCKET_ACCEPT);
                    } else {
                        keep_upgrade_headers(response.headers_mut());
                    }
                    conn.framing.set_idle(config.timeouts.websocket_idle());
                    let tunnel = tunnel(
                        client_side,
                        upstream_side,
                        pool_metrics.upgraded.clone(),
                        state.tunnel_cut.clone(),
                    );
                    state.tunnels.spawn(tunnel);
                    response.map(Either::Left)
                }
            }
        }
        (Ok(response), _) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            // A 101 nobody asked for: the connection cannot be handed over.
            warn!(
                pool = kind.as_str(),
                backend = backend_addr,
                "unrequested 101 from backend"
            );
            error_response(&ProxyError::BadGatewayUpgrade)
        }
        (Ok(mut response), _) => {
            strip_hop_by_hop(response.headers_mut());
            response.map(Either::Left)
        }
        (Err(error), _) => {
            let status = error.status();
            warn!(
                pool = kind.as_str(),
                backend = backend_addr,
                status = status.as_u16(),
                error = %error,
                cause = error_cause(&error),
                "proxy error"
            );
            let mut response = error_response(&error);
            if http1 && error.closes_connection() {
                // The request's framing cannot be trusted: never reuse this connection.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    let response_headers = response.headers_mut();
    response_headers.insert(POOL_HEADER, HeaderValue::from_static(kind.as_str()));
    response_headers.insert(REQUEST_ID, request_id);
    if let Some(id) = new_sticky_id {
        response_headers.append(header::SET_COOKIE, sticky_set_cookie(&id));
    }
    let elapsed = start.elapsed();
    pool_metrics.record(&method, response.status(), elapsed);
    info!(
        method = %method,
        path = path_and_query.as_ref().map_or("", http::uri::PathAndQuery::path),
        pool = kind.as_str(),
        backend = backend_addr,
        status = response.status().as_u16(),
        duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        "proxied"
    );
    response
}

/// The pool the routing rules choose (override header, then sticky bucket, with the
/// flags' percent and kill switch), and a new sticky id to set if one was made.
fn choose_pool(
    snapshot: &Snapshot,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> (PoolKind, Option<[u8; 32]>) {
    let routing = &snapshot.config.routing;
    let forced = routing
        .override_header
        .0
        .as_ref()
        .and_then(|name| headers.get(name))
        .and_then(|v| routing::parse_override(v.as_bytes()));
    let mut new_sticky_id = None;
    let bucket = match &routing.sticky {
        Sticky::Cookie => match sticky_cookie(headers) {
            Some(id) => routing::bucket(id),
            None => {
                let id = random_hex_id();
                let bucket = routing::bucket(&id);
                new_sticky_id = Some(id);
                bucket
            }
        },
        Sticky::Header(name) => headers
            .get(name)
            .map_or_else(random_bucket, |v| routing::bucket(v.as_bytes())),
        Sticky::Ip => conn.ip_bucket,
        Sticky::None => random_bucket(),
    };
    let flags = &snapshot.flags;
    let kind = routing::choose_pool(
        forced,
        bucket,
        flags.effective_percent(routing.canary_percent),
        // The kill switch wins over the override header too.
        flags.set.canary_enabled && !snapshot.pools.canary.is_empty(),
    );
    (kind, new_sticky_id)
}

/// Logs and records the start and the end of a canary failover, once each.
fn note_canary_failover(state: &AppState, active: bool) {
    // Read first: the usual case changes nothing and must not write a shared line.
    if state.canary_failover.load(Ordering::Relaxed) == active
        || state.canary_failover.swap(active, Ordering::Relaxed) == active
    {
        return;
    }
    if active {
        warn!("no usable canary backend; canary traffic goes to production");
        state.events.push(
            "proxy",
            "warn",
            "no usable canary backend: canary traffic fails over to production",
        );
    } else {
        info!("canary backends usable again; failover over");
        state.events.push(
            "proxy",
            "info",
            "canary backends usable again: failover over",
        );
    }
}

/// Refuses requests whose framing a proxy must not pass on (request smuggling, RFC
/// 9112 6.3): both Content-Length and Transfer-Encoding, more than one Content-Length
/// (as seen on the wire by [`crate::framing`], since hyper normalizes both away),
/// or an HTTP/1.1 request without Host. Also enforces `max_body_bytes` up front when
/// the length is declared.
fn check_framing(
    req: &Request<Incoming>,
    ambiguous: bool,
    max_body_bytes: Option<u64>,
) -> Result<(), ProxyError> {
    if ambiguous {
        return Err(ProxyError::BadRequest(
            "ambiguous framing: Content-Length with Transfer-Encoding, or repeated",
        ));
    }
    let h = req.headers();
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    let length = lengths.next();
    if lengths.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Content-Length"));
    }
    if length.is_some() && h.contains_key(header::TRANSFER_ENCODING) {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if req.version() == Version::HTTP_11 && !h.contains_key(header::HOST) {
        return Err(ProxyError::BadRequest("HTTP/1.1 request without Host"));
    }
    if let (Some(limit), Some(length)) = (max_body_bytes, length) {
        let declared = length
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::PayloadTooLarge(limit));
        }
    }
    Ok(())
}

/// Sends the request to a usable backend of `pool`; on a connect error or a reset
/// before any response, retries once on another backend when the request is
/// idempotent, has no body, and the retry budget allows.
async fn proxy_to_pool<'s>(
    state: &AppState,
    snapshot: &'s Snapshot,
    pool: &'s Pool,
    req: Request<Incoming>,
    conn: &ConnInfo,
    extra: &UpstreamHeaders<'_>,
    now: u64,
) -> (
    Result<Response<PooledBody>, ProxyError>,
    Option<&'s Backend>,
) {
    let Some((index, backend)) = pool.pick(now, None) else {
        return (Err(ProxyError::NoBackend(pool.kind.as_str())), None);
    };
    pool.retry_budget.record_request(now);
    let (request, set) = match upstream_request(req, conn, extra) {
        Ok(request) => request,
        Err(error) => return (Err(error), Some(backend)),
    };
    let retry = (pool.backends().len() > 1)
        .then(|| RetryCopy::of(&request))
        .flatten();
    let timeouts = &snapshot.config.timeouts;
    let deadline = timeouts.response_header();
    let settings = ConnectSettings {
        connect_timeout: timeouts.connect(),
        idle_ms: timeouts.idle_ms,
    };
    let first = forward(backend, request, &set, deadline, settings).await;
    record_outcome(state, pool, index, &first);
    let Err(error) = &first else {
        return (first, Some(backend));
    };
    if !error.retryable() {
        return (first, Some(backend));
    }
    let Some(retry) = retry else {
        return (first, Some(backend));
    };
    let now = upstream::now_ms();
    let Some((second_index, second_backend)) = pool.pick(now, Some(index)) else {
        return (first, Some(backend));
    };
    if !pool.retry_budget.try_retry(now) {
        debug!(
            pool = pool.kind.as_str(),
            "retry budget exhausted; not retrying"
        );
        return (first, Some(backend));
    }
    state.metrics.pool(pool.kind).retries.inc();
    debug!(pool = pool.kind.as_str(), from = %backend.authority, to = %second_backend.authority, "retrying");
    let second = forward(
        second_backend,
        retry.into_request(),
        &set,
        deadline,
        settings,
    )
    .await;
    record_outcome(state, pool, second_index, &second);
    (second, Some(second_backend))
}

/// Passive health: a connect error or a 5xx counts against the backend; ejections are
/// logged, counted and shown at once.
fn record_outcome(
    state: &AppState,
    pool: &Pool,
    index: usize,
    result: &Result<Response<PooledBody>, ProxyError>,
) {
    let metrics = state.metrics.pool(pool.kind);
    let failed = match result {
        Ok(response) => response.status().is_server_error(),
        Err(error) => {
            if let Some(kind) = error.upstream_kind() {
                metrics.upstream_error(kind);
            }
            matches!(error, ProxyError::Connect(_))
        }
    };
    match pool.record_outcome(index, failed, upstream::now_ms()) {
        None => {}
        Some(Ejection::Ejected(length)) => {
            let backend = pool.backends()[index].authority.as_str();
            metrics.ejections.inc();
            state.metrics.backend_down(pool.kind, backend);
            let length_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
            warn!(
                pool = pool.kind.as_str(),
                backend, length_ms, "backend ejected"
            );
            state.events.push(
                "health",
                "warn",
                format!(
                    "{} backend {backend} ejected for {length_ms} ms after consecutive failures",
                    pool.kind.as_str()
                ),
            );
        }
        Some(Ejection::Capped) => {
            debug!(
                pool = pool.kind.as_str(),
                "ejection skipped: max_ejected_percent reached"
            );
        }
    }
}

/// What is needed to send a request again: only for idempotent methods (RFC 9110
/// 9.2.2) with no body, so nothing of the body can have been consumed.
struct RetryCopy {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl RetryCopy {
    fn of(request: &Request<UpstreamBody>) -> Option<Self> {
        let idempotent = matches!(
            *request.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        (idempotent && request.body().is_end_stream()).then(|| Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        })
    }

    fn into_request(self) -> Request<UpstreamBody> {
        let mut request = Request::new(UpstreamBody::Empty);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        request
    }
}

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
fn upgrade_requested(
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
fn websocket_key() -> HeaderValue {
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
fn keep_upgrade_headers(headers: &mut HeaderMap) {
    let protocol = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(protocol) = protocol {
        headers.insert(header::UPGRADE, protocol);
    }
}

/// Splices an upgraded client connection and its backend connection both ways until
/// either side closes (or the connection goes idle, or the drain deadline cuts it).
async fn tunnel(
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
    let _open = crate::metrics::GaugeGuard::new(open);
    let mut client = hyper_util::rt::TokioIo::new(client);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match result {
            Ok((up, down)) => debug!(up, down, "tunnel closed"),
            Err(error) => debug!(%error, "tunnel ended"),
        },
        () = cut.cancelled() => debug!("tunnel cut by the drain deadline"),
    }
}

/// Sends the request to `backend` on a pooled connection and waits for the response
/// headers, at most `deadline`.
async fn forward(
    backend: &Backend,
    req: Request<UpstreamBody>,
    set: &[(HeaderName, HeaderValue)],
    deadline: Duration,
    settings: ConnectSettings,
) -> Result<Response<PooledBody>, ProxyError> {
    let exchange = backend
        .conns
        .local()
        .send(&backend.authority, req, set, settings);
    match tokio::time::timeout(deadline, exchange).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(ExchangeError::ClientBody(cause))) => Err(client_side_cause(&*cause)),
        // The request never reached the backend.
        Ok(Err(e @ (ExchangeError::Connect(..) | ExchangeError::ConnectTimeout(..)))) => {
            Err(ProxyError::Connect(e))
        }
        Ok(Err(
            e @ (ExchangeError::Closed
            | ExchangeError::Incomplete
            | ExchangeError::Io(_)
            | ExchangeError::Protocol(_)),
        )) => Err(ProxyError::Upstream(e)),
        Err(_) => Err(ProxyError::Timeout(deadline)),
    }
}

/// What the client's failed body means: too large (413), or malformed / cut short
/// (400). The backend is not to blame for either.
fn client_side_cause(cause: &(dyn std::error::Error + 'static)) -> ProxyError {
    match cause.downcast_ref::<BodyTooLarge>() {
        Some(BodyTooLarge(limit)) => ProxyError::PayloadTooLarge(*limit),
        None => ProxyError::ClientBody,
    }
}

/// An error and its sources, outermost first.
fn error_chain<'e>(
    error: &'e (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'e (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// Headers and limits the proxy applies to every upstream request.
struct UpstreamHeaders<'a> {
    request_id: &'a HeaderValue,
    flags_header: &'a HeaderName,
    flags: &'a HeaderValue,
    max_body_bytes: Option<u64>,
    /// A valid, allowed upgrade request, passed through.
    upgrade: Option<&'a UpgradeRequest>,
}

/// Rewrites a client request into the request sent upstream: the client's header
/// fields minus the hop-by-hop ones, and the fields the proxy sets (`Host` when the
/// client sent `:authority`, `X-Forwarded-*`, `X-Request-Id`, the flags header, an
/// allowed upgrade's `Connection` and `Upgrade`), which replace any the client sent.
/// Those are returned apart and written straight into the request head: inserting
/// them into the client's map made it grow and rehash on most requests.
fn upstream_request(
    req: Request<Incoming>,
    conn: &ConnInfo,
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
    parts.version = Version::HTTP_11;

    let h = &parts.headers;
    let mut set = Vec::with_capacity(8);
    // HTTP/2 clients send :authority instead of Host; HTTP/1.1 ones a Host header.
    match h.get(header::HOST) {
        Some(host) => set.push((X_FORWARDED_HOST, host.clone())),
        None => {
            if let Some(host) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                set.push((header::HOST, host.clone()));
                set.push((X_FORWARDED_HOST, host));
            }
        }
    }
    if let Some(upgrade) = extra.upgrade {
        // The one exception to hop-by-hop stripping: a valid upgrade keeps its headers.
        set.push((header::CONNECTION, HeaderValue::from_static("upgrade")));
        set.push((header::UPGRADE, upgrade.protocol.clone()));
    }
    set.push((
        X_FORWARDED_FOR,
        forwarded_for(h.get(X_FORWARDED_FOR), &conn.forwarded_for),
    ));
    set.push((X_FORWARDED_PROTO, HeaderValue::from_static(conn.scheme)));
    set.push((REQUEST_ID, extra.request_id.clone()));
    // Replaces every client-sent value: flags come only from the proxy.
    set.push((extra.flags_header.clone(), extra.flags.clone()));
    Ok((
        Request::from_parts(parts, UpstreamBody::new(body, extra.max_body_bytes)),
        set,
    ))
}

/// Removes hop-by-hop headers: the fixed set, and every header the Connection header
/// names (RFC 9110 7.6.1). Used on both the request and the response path.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names present (standard
    // names compare as enum tags) is cheaper than seven hashed removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // Connection values are cloned out first (cheap: they share their bytes) because
        // removing the headers they name needs the map mutably.
        let named: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for token in list_items(&named) {
            if let Ok(name) = std::str::from_utf8(token) {
                headers.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The trimmed items of comma-separated field values (RFC 9110 5.6.1), in order,
/// empty ones included: `Connection` tokens, `Content-Length` lists.
pub(crate) fn list_items<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a [u8]> {
    values
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii))
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

fn random_bucket() -> u8 {
    fastrand::u8(0..100)
}

/// The sticky id from the client's cookies, if there is a valid one.
fn sticky_cookie(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .find_map(|v| routing::find_cookie(v.as_bytes(), routing::STICKY_COOKIE))
        .filter(|id| routing::valid_sticky_id(id))
}

/// 128 random bits as 32 lowercase hex characters: sticky ids and request ids.
fn random_hex_id() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut out = [0u8; 32];
    for byte in out.iter_mut().rev() {
        *byte = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    out
}

fn header_value_from_id(id: &[u8; 32]) -> HeaderValue {
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn sticky_set_cookie(id: &[u8; 32]) -> HeaderValue {
    let mut value = Vec::with_capacity(128);
    value.extend_from_slice(routing::STICKY_COOKIE.as_bytes());
    value.push(b'=');
    value.extend_from_slice(id);
    let _ = write!(
        value,
        "; Path=/; Max-Age={STICKY_COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Lax"
    );
    HeaderValue::from_bytes(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A client-sent request id is kept when it is 1 to 128 visible ASCII characters;
/// otherwise the proxy generates one, so logs never carry arbitrary bytes.
fn valid_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len()) && id.iter().all(|&b| b.is_ascii_graphic())
}

fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        error.body().as_bytes(),
    ))));
    *response.status_mut() = error.status();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let ProxyError::NoBackend(_) = error {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// A failed exchange after connecting: `reset` when the connection closed or broke
/// early, `protocol` when the backend sent something that is not HTTP.
fn classify_upstream(error: &ExchangeError) -> UpstreamErrorKind {
    match error {
        ExchangeError::Closed | ExchangeError::Incomplete | ExchangeError::Io(_) => {
            UpstreamErrorKind::Reset
        }
        ExchangeError::Protocol(_) => UpstreamErrorKind::Protocol,
        ExchangeError::Connect(..) | ExchangeError::ConnectTimeout(..) => {
            UpstreamErrorKind::Connect
        }
        // Mapped to 400/413 in `forward`, never to an upstream error; counted as the
        // catch-all if that ever changes.
        ExchangeError::ClientBody(_) => UpstreamErrorKind::Protocol,
    }
}

/// The innermost cause of an error, for the log line.
fn error_cause(error: &ProxyError) -> String {
    error_chain(error)
        .last()
        .map_or_else(String::new, ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-other"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "x-kept"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let conn = |ip: &str| {
            ConnInfo::new(
                SocketAddr::new(ip.parse().unwrap(), 1),
                "http",
                std::sync::Arc::default(),
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
    fn websocket_keys_are_16_random_bytes_in_base64() {
        let a = websocket_key();
        let b = websocket_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(a.to_str().unwrap().ends_with("=="));
    }

    #[test]
    fn request_id_validation() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id(&[b'a'; 129]));
    }

    #[test]
    fn every_error_maps_to_its_status() {
        assert_eq!(ProxyError::BadRequest("x").status(), 400);
        assert_eq!(ProxyError::MethodNotAllowed.status(), 405);
        assert_eq!(ProxyError::NoBackend("canary").status(), 503);
        assert_eq!(ProxyError::PayloadTooLarge(1).status(), 413);
        assert_eq!(ProxyError::Timeout(Duration::from_secs(1)).status(), 504);
    }
}
