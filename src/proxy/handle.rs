//! The request path: route one client request to a backend and stream the answer back.
//!
//! `handle` loads the snapshot once, takes the routing decision from
//! [`crate::routing::decide`], rewrites headers ([`crate::proxy::headers`]),
//! forwards through the pooled client with a response-header deadline
//! ([`crate::proxy::forward`]), and answers every failure from the one
//! classification in [`crate::proxy::error`]. Bodies are never buffered: they stream
//! both ways with backpressure, so a 64 MiB upload costs the proxy a few buffers,
//! not 64 MiB.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::canary::clients::ClientKeys;
use crate::canary::window::{Counted, Placed};
use crate::clock::ms_at;
use crate::config::Sticky;
use crate::http1::strip_hop_by_hop;
use crate::observe::access_log;
use crate::observe::events::{Level, Source};
use crate::observe::trace::{RequestTrace, Routed, Tracing};
use crate::proxy::abandon::{RequestNote, TrackedBody, Unanswered};
use crate::proxy::error::ProxyError;
use crate::proxy::forward::proxy_to_pool;
use crate::proxy::headers::{
    ClientPeer, POOL_HEADER, REQUEST_ID, UpstreamHeaders, check_host, header_value_from_id,
    random_bucket, random_hex_id, sticky_cookie, sticky_set_cookie, valid_request_id,
};
use crate::proxy::upgrade::{keep_upgrade_headers, tunnel, upgrade_requested};
use crate::routing::{self, Canary, Decision, PoolKind, Reason};
use crate::state::{AppState, Snapshot};

/// Response body: the upstream's streamed body, or a short body the proxy wrote.
pub type ProxyBody = Either<TrackedBody, Full<Bytes>>;

/// Proxies one request. Never fails: every error becomes a short response.
pub async fn handle(
    state: &AppState,
    peer: &ClientPeer,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let snapshot = state.snapshot();
    let config = &snapshot.config;
    // One clock read at each end of the request (each read showed in the profile).
    let now = ms_at(start);
    let tracing = state.tracing();
    let trace = tracing.map(|t| {
        let trusted = config.routing.override_trusted_from(peer.peer.ip());
        t.server_span(req.headers(), req.method().as_str(), trusted)
    });
    let Route {
        decision,
        new_sticky_id,
        client,
    } = route(
        state,
        &snapshot,
        peer,
        req.headers(),
        trace.as_deref().and_then(RequestTrace::asked_pool),
        now,
    );
    match (decision.pool, decision.reason) {
        (PoolKind::Production, Reason::Failover) => {
            state.metrics.failover_requests.inc();
            note_canary_failover(state, true);
        }
        (PoolKind::Canary, _) => note_canary_failover(state, false),
        (PoolKind::Production, _) => {}
    }
    let kind = decision.pool;
    let request_id = match req.headers().get(REQUEST_ID) {
        Some(id) if valid_request_id(id.as_bytes()) => id.clone(),
        _ => header_value_from_id(&random_hex_id()),
    };

    let pool_metrics = state.metrics.pool(kind);
    let _in_flight = pool_metrics.in_flight_guard();
    let unanswered = Unanswered::new(&state.metrics, kind, &request_id, start, trace);
    let method = req.method().clone();
    let version = req.version();
    let http1 = version < Version::HTTP_2;
    // Path only, never the query: queries carry tokens and personal data.
    let path_and_query = req.uri().path_and_query().cloned();
    let ambiguous = peer.conn.next_request_is_bad();
    let checked = check_framing(&req, ambiguous, config.limits.max_body_bytes)
        .and_then(|()| upgrade_requested(&req, &config.routing.allowed_upgrades));
    let upgrade = match &checked {
        Ok(Some(upgrade)) => Some((upgrade.clone(), hyper::upgrade::on(&mut req))),
        Ok(None) | Err(_) => None,
    };
    // Kept only for a log format that writes them (a reference count each).
    let keeps_agent = state
        .access_log
        .as_ref()
        .is_some_and(|log| log.wants_agent());
    let (referer, user_agent) = if keeps_agent {
        let headers = req.headers();
        (
            headers.get(header::REFERER).cloned(),
            headers.get(header::USER_AGENT).cloned(),
        )
    } else {
        (None, None)
    };
    // Only a request with a body pays for the cell.
    let upload_done =
        (!hyper::body::Body::is_end_stream(req.body())).then(|| Arc::new(AtomicU64::new(0)));
    let baggage = tracing
        .zip(unanswered.trace())
        .and_then(|(t, trace)| t.baggage(trace, kind, &snapshot.flags.set));
    let extra = UpstreamHeaders {
        trace: tracing.zip(unanswered.trace()),
        baggage: baggage.as_ref(),
        upload_done: upload_done.as_ref(),
        request_id: &request_id,
        flags_header: &config.flags.header.0,
        flags: &snapshot.flags.header_value,
        max_body_bytes: config.limits.max_body_bytes,
        upgrade: upgrade.as_ref().map(|(upgrade, _)| upgrade),
    };
    // The shadow's copy of this request, when it is mirrored (`crate::shadow`).
    let mut mirror = None;
    let (result, backend) = match checked {
        Err(error) => (Err(error), None),
        Ok(_) => {
            let flags = (&config.flags.header.0, &snapshot.flags.header_value);
            let (pools, id) = (&snapshot.pools, &request_id);
            mirror = state.shadow.sample(config, pools, flags, kind, &req, id);
            let pool = snapshot.pools.get(kind);
            let _waiting = peer.conn.wait_for_backend();
            proxy_to_pool(state, &snapshot, pool, req, peer, &extra, now).await
        }
    };
    let backend_addr = backend.map_or("-", |b| b.authority.as_str());
    let tracked = |body, tee| {
        let note = RequestNote {
            metrics: Arc::clone(&state.metrics),
            pool: kind,
            request_id: request_id.clone(),
            judged: None,
            trace: None,
        };
        Either::Left(TrackedBody::new(body, note).teed(tee))
    };

    // Whether the request failed for the canary analysis: a 5xx from the backend or
    // an upstream error; refusals of the client's own request (4xx, no backend) not.
    // Those refusals say nothing of either version: never judged.
    let refused = matches!(&result, Err(error) if error.class().kind.is_none());
    let mut opened = None;
    let (mut response, failed) = match (result, upgrade) {
        (Ok(mut response), Some((upgrade, client_side)))
            if response.status() == StatusCode::SWITCHING_PROTOCOLS =>
        {
            match response.body_mut().take_upgraded() {
                // The body holds the connection of a 101 to an upgrade request; without
                // it there is nothing to hand over.
                None => (error_response(&ProxyError::BadGatewayUpgrade), true),
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
                    peer.conn.set_switched();
                    peer.conn.set_idle(config.timeouts.websocket_idle());
                    // Spawned once the request is recorded (its trace goes with it).
                    opened = Some(tunnel(
                        client_side,
                        upstream_side,
                        pool_metrics.upgraded.clone(),
                        state.tunnel_cut.clone(),
                    ));
                    (response.map(|body| tracked(body, None)), false)
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
            (error_response(&ProxyError::BadGatewayUpgrade), true)
        }
        (Ok(mut response), _) => {
            strip_hop_by_hop(response.headers_mut());
            let failed = response.status().is_server_error();
            let tee = mirror.take().map(|m| m.start(&response, backend));
            (response.map(|body| tracked(body, tee)), failed)
        }
        (Err(error), _) => {
            let class = error.class();
            warn!(
                request_id = request_id.to_str().unwrap_or(""),
                pool = kind.as_str(),
                backend = backend_addr,
                status = class.status.as_u16(),
                error = %error,
                cause = error.cause(),
                "proxy error"
            );
            let mut response = error_response(&error);
            if http1 && class.closes_connection {
                // The request's framing cannot be trusted: never reuse this connection.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            (response, class.kind.is_some())
        }
    };
    let trace = unanswered.answered();
    let answered_at = Instant::now();
    let elapsed = answered_at.saturating_duration_since(start);
    pool_metrics.record(&method, response.status(), elapsed);
    let placed = match client {
        _ if refused => Placed::Refused,
        Some(client) => Placed::Bucket(client),
        None => Placed::Apart,
    };
    // The time of the answer, not of the request: a slot is only ever counted in
    // while it is current, whatever a slow client or backend did.
    let recorded_ms = ms_at(answered_at);
    let judged_latency = latency_after_upload(elapsed, now, upload_done.as_deref());
    let counted = state
        .metrics
        .recorder
        .record(kind, recorded_ms, judged_latency, failed, placed);
    state.metrics.analysis.count(kind, counted, decision.reason);
    if let Either::Left(body) = response.body_mut() {
        body.judged((counted == Counted::Judged && !failed).then_some(recorded_ms));
    }
    let duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    debug!(
        request_id = request_id.to_str().unwrap_or(""),
        method = %method,
        path = path_and_query.as_ref().map_or("", http::uri::PathAndQuery::path),
        pool = kind.as_str(),
        reason = decision.reason.as_str(),
        backend = backend_addr,
        status = response.status().as_u16(),
        duration_us,
        "proxied"
    );
    if let Some(log) = &state.access_log {
        log.record(&access_log::Entry {
            peer: peer.peer.ip(),
            method: &method,
            target: path_and_query
                .as_ref()
                .map_or("", http::uri::PathAndQuery::as_str),
            version,
            status: response.status().as_u16(),
            bytes: response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok()),
            pool: kind.as_str(),
            reason: decision.reason.as_str(),
            backend: backend.map_or("", |b| b.authority.as_str()),
            duration_us,
            request_id: request_id.to_str().unwrap_or(""),
            referer: referer.as_ref().map(HeaderValue::as_bytes),
            user_agent: user_agent.as_ref().map(HeaderValue::as_bytes),
        });
    }
    if let Some(mut trace) = trace {
        trace.answered(&Routed {
            pool: kind,
            reason: decision.reason.as_str(),
            backend: backend.map(|b| b.authority.as_str()),
            instance: tracing.map_or("", Tracing::instance),
            flags_digest: snapshot.flags.digest_str(),
            request_id: request_id.to_str().unwrap_or(""),
            path: path_and_query
                .as_ref()
                .map_or("", http::uri::PathAndQuery::path),
            scheme: peer.scheme,
            version: protocol_version(version),
            client: peer.peer.ip(),
            status: response.status().as_u16(),
        });
        // The span ends with the response body, or with the tunnel an upgrade opened.
        match (opened.take(), response.body_mut()) {
            (Some(tunnel), _) => {
                state.tunnels.spawn(async move {
                    let open = Instant::now();
                    tunnel.await;
                    trace.tunnel_closed(open.elapsed().as_secs_f64());
                });
            }
            (None, Either::Left(body)) => body.trace(trace),
            (None, Either::Right(_)) => {}
        }
    }
    if let Some(tunnel) = opened {
        state.tunnels.spawn(tunnel);
    }
    let response_headers = response.headers_mut();
    response_headers.insert(POOL_HEADER, HeaderValue::from_static(kind.as_str()));
    response_headers.insert(REQUEST_ID, request_id);
    if let Some(id) = new_sticky_id {
        let signed = state.sticky.sign(&id);
        response_headers.append(header::SET_COOKIE, sticky_set_cookie(&signed));
    }
    response
}

/// `network.protocol.version` of a request.
fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// The latency the canary analysis judges: from the end of the client's upload (no
/// backend can answer a request before it has it all; a client holding its body
/// back must not make a version look slow) to the response head. `start_ms` is the
/// request's start on the same clock as the cell.
fn latency_after_upload(
    elapsed: Duration,
    start_ms: u64,
    upload_done: Option<&AtomicU64>,
) -> Duration {
    let done_ms = upload_done.map_or(0, |cell| cell.load(Ordering::Relaxed));
    elapsed.saturating_sub(Duration::from_millis(done_ms.saturating_sub(start_ms)))
}

/// A request's routing: the decision, a new sticky id to set if one was made, and,
/// when the bucket placed it and the analysis records, who the client is for the
/// per-client cap (`None`: the request is not judged).
struct Route {
    decision: Decision,
    new_sticky_id: Option<[u8; 32]>,
    client: Option<ClientKeys>,
}

/// The routing decision for a request (see [`routing::decide`]), from the override
/// header or baggage member (honoured only from `routing.override_trusted`), the sticky key (a cookie
/// counts only with the proxy's signature), the flags and the canary pool's health.
fn route(
    state: &AppState,
    snapshot: &Snapshot,
    peer: &ClientPeer,
    headers: &HeaderMap,
    baggage_pool: Option<PoolKind>,
    now_ms: u64,
) -> Route {
    let routing = &snapshot.config.routing;
    // The override header, else a `canarygate.pool` baggage member (an internal
    // service keeping its caller's version): both only from trusted sources.
    let forced = routing
        .override_header
        .0
        .as_ref()
        .and_then(|name| headers.get(name))
        .and_then(|v| routing::parse_override(v.as_bytes()))
        .or(baggage_pool.map(|pool| match pool {
            PoolKind::Canary => routing::Override::Always,
            PoolKind::Production => routing::Override::Never,
        }))
        .filter(|_| routing.override_trusted_from(peer.peer.ip()));
    let mut new_sticky_id = None;
    let (bucket, sticky_key) = match &routing.sticky {
        Sticky::Cookie => match sticky_cookie(headers, &state.sticky) {
            Some(id) => (routing::bucket(id), Some(id)),
            None => {
                let id = new_sticky_id.insert(random_hex_id());
                (routing::bucket(&id[..]), None)
            }
        },
        Sticky::Header(name) => headers.get(name).map_or_else(
            || (random_bucket(), None),
            |v| (routing::bucket(v.as_bytes()), Some(v.as_bytes())),
        ),
        Sticky::Ip => (peer.ip_bucket, None),
        Sticky::None => (random_bucket(), None),
    };
    let flags = &snapshot.flags.set;
    let canary = &snapshot.pools.canary;
    let mut percent = flags.canary_percent.unwrap_or(routing.canary_percent);
    if snapshot.config.shadow.gate && state.shadow.holds_users() {
        // `[shadow] gate`: no users on a canary the shadow has not passed.
        percent = 0;
    }
    let mut canary_state = Canary {
        enabled: flags.canary_enabled,
        configured: !canary.is_empty(),
        usable: true,
    };
    let mut decision = routing::decide(forced, bucket, percent, canary_state);
    // The canary backends' health is read only for a request bound for canary (the
    // production-bound majority skips the scan); decided again, that is failover.
    if decision.pool == PoolKind::Canary && !canary.has_usable(now_ms) {
        canary_state.usable = false;
        decision = routing::decide(forced, bucket, percent, canary_state);
    }
    let recorder = &state.metrics.recorder;
    // An id minted for this request is no client's yet: only the address counts
    // (a flood of cookie-less requests would otherwise fill the sketch with keys).
    let client = (decision.reason == Reason::Bucket && recorder.is_enabled())
        .then(|| recorder.client_keys(sticky_key, peer.peer.ip()));
    Route {
        decision,
        new_sticky_id,
        client,
    }
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
        state.events.report(
            Source::Proxy,
            Level::Warn,
            "no usable canary backend; canary traffic fails over to production",
            "",
        );
    } else {
        state.events.report(
            Source::Proxy,
            Level::Info,
            "canary backends usable again; failover over",
            "",
        );
    }
}

/// Refuses requests whose framing a proxy must not pass on (request smuggling, RFC
/// 9112 6.3): both Content-Length and Transfer-Encoding, more than one Content-Length
/// (as seen on the wire by [`crate::server::guard`], since hyper normalizes both away),
/// and a missing, repeated or invalid Host ([`check_host`]). Also enforces `max_body_bytes` up front when
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
    check_host(req)?;
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

fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    error.response().map(Either::Right)
}
