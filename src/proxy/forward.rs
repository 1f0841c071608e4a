//! Forwarding to a pool: pick a usable backend, send on a pooled connection with a
//! response-header deadline, record the outcome for passive health, and retry once
//! on another backend when that is safe and the retry budget allows.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::Uri;
use http::{Method, Request, Response};
use hyper::body::{Body as _, Incoming};
use tracing::debug;

use crate::client::body::PooledBody;
use crate::client::exchange::{ConnectSettings, send};
use crate::client::request_body::UpstreamBody;
use crate::clock::now_ms;
use crate::observe::events::{Level, Source};
use crate::observe::trace::{AttemptSpan, TRACEPARENT, TRACESTATE};
use crate::proxy::error::ProxyError;
use crate::proxy::headers::{ClientPeer, UpstreamHeaders, upstream_request};
use crate::state::{AppState, Snapshot};
use crate::upstream::health::Ejection;
use crate::upstream::pools::{Backend, BackendPool};

/// Sends the request to a usable backend of `pool`; on a connect error or a reset
/// before any response, retries once on another backend when the request is
/// idempotent, has no body, and the retry budget allows.
pub async fn proxy_to_pool<'s>(
    state: &AppState,
    snapshot: &'s Snapshot,
    pool: &'s BackendPool,
    req: Request<Incoming>,
    peer: &ClientPeer,
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
    let (request, mut set) = match upstream_request(req, peer, extra) {
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
        body_idle: timeouts.upstream_body_idle(),
    };
    let method = request.method().clone();
    let attempt = start_attempt(extra, &mut set, &method, backend, 0);
    let first = forward(backend, request, &set, deadline, settings).await;
    finish_attempt(attempt, &first);
    report_outcome(state, pool, index, &first);
    let Err(error) = &first else {
        return (first, Some(backend));
    };
    if !error.class().retryable {
        return (first, Some(backend));
    }
    let Some(retry) = retry else {
        return (first, Some(backend));
    };
    let now = now_ms();
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
    let attempt = start_attempt(extra, &mut set, &method, second_backend, 1);
    let second = forward(
        second_backend,
        retry.into_request(),
        &set,
        deadline,
        settings,
    )
    .await;
    finish_attempt(attempt, &second);
    report_outcome(state, pool, second_index, &second);
    (second, Some(second_backend))
}

/// A client span for an attempt at `backend` (`[tracing]` on), its `traceparent`
/// (and `tracestate`) replacing the previous attempt's in `set`.
fn start_attempt(
    extra: &UpstreamHeaders<'_>,
    set: &mut Vec<(HeaderName, HeaderValue)>,
    method: &Method,
    backend: &Backend,
    resend: u32,
) -> Option<AttemptSpan> {
    let (tracing, trace) = extra.trace?;
    let attempt = tracing.attempt(trace, method.as_str(), backend.authority.as_str(), resend);
    if resend > 0 {
        set.retain(|(name, _)| name != TRACEPARENT && name != TRACESTATE);
    }
    set.push((TRACEPARENT, attempt.traceparent()));
    if let Some(state) = attempt.tracestate() {
        set.push((TRACESTATE, state));
    }
    Some(attempt)
}

/// Ends an attempt's span with its outcome.
fn finish_attempt(attempt: Option<AttemptSpan>, result: &Result<Response<PooledBody>, ProxyError>) {
    let Some(attempt) = attempt else { return };
    match result {
        Ok(response) => attempt.finish(Some(response.status().as_u16()), None),
        Err(error) => {
            let kind = error.class().kind.map_or("refused", |k| k.as_str());
            attempt.finish(None, Some(kind));
        }
    }
}

/// Passive health: a connect error or a 5xx counts against the backend; ejections are
/// logged, counted and shown at once.
fn report_outcome(
    state: &AppState,
    pool: &BackendPool,
    index: usize,
    result: &Result<Response<PooledBody>, ProxyError>,
) {
    let metrics = state.metrics.pool(pool.kind);
    if let Err(error) = result
        && let Some(reason) = error.saturated_reason()
    {
        // The backend never saw the request: no outcome for passive health.
        let backend = pool.backends()[index].authority.as_str();
        state.metrics.conns.rejected(pool.kind, backend, reason);
        return;
    }
    let failed = match result {
        Ok(response) => response.status().is_server_error(),
        Err(error) => {
            if let Some(kind) = error.class().kind {
                metrics.upstream_error(kind);
            }
            matches!(error, ProxyError::Connect(_))
        }
    };
    match pool.record_outcome(index, failed, now_ms()) {
        None => {}
        Some(Ejection::Ejected(length)) => {
            let backend = pool.backends()[index].authority.as_str();
            metrics.ejections.inc();
            state.metrics.backend_down(pool.kind, backend);
            let length_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
            state.events.report(
                Source::Health,
                Level::Warn,
                "backend ejected",
                format_args!(
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

/// Sends the request to `backend` on a pooled connection and waits for the response
/// headers, at most `deadline`.
async fn forward(
    backend: &Backend,
    req: Request<UpstreamBody>,
    set: &[(HeaderName, HeaderValue)],
    deadline: Duration,
    settings: ConnectSettings,
) -> Result<Response<PooledBody>, ProxyError> {
    let exchange = send(&backend.conns, &backend.authority, req, set, settings);
    match tokio::time::timeout(deadline, exchange).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(error)) => Err(ProxyError::from_exchange(error)),
        Err(_) => Err(ProxyError::Timeout(deadline)),
    }
}
