//! The admin listener: operational endpoints, on their own address so they are never
//! exposed on the public port (`[server] admin_listen`, loopback by default).
//!
//! `GET /healthz` (the process is up) and `GET /flags` (the flag snapshot as JSON);
//! metrics, readiness and the status page join them in later issues.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::state::AppState;

/// Answers one admin request.
pub fn respond<B>(state: &AppState, req: &Request<B>) -> Response<Full<Bytes>> {
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/healthz" if readable => text(StatusCode::OK, "ok\n"),
        "/flags" if readable => json_response(&flags_json(state)),
        "/healthz" | "/flags" => text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "404 not found\n"),
    }
}

/// The flag snapshot as operators and scripts read it.
pub fn flags_json(state: &AppState) -> serde_json::Value {
    let snapshot = state.snapshot();
    let flags = &snapshot.flags;
    let values: serde_json::Map<String, serde_json::Value> = flags
        .set
        .values
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.as_str())))
        .collect();
    json!({
        "version": flags.version,
        "source": flags.source.as_str(),
        "updated_at": humantime::format_rfc3339_millis(flags.updated_at).to_string(),
        "store_connected": state.flag_store_up.load(std::sync::atomic::Ordering::Relaxed),
        "flags": values,
        "reserved": {
            "canary_percent": flags.set.canary_percent,
            "canary": if flags.set.canary_enabled { "on" } else { "off" },
        },
        "effective_canary_percent": flags.effective_percent(snapshot.config.routing.canary_percent),
        "header": flags.header_value.to_str().unwrap_or(""),
        "rejected_total": state.flag_rejected_counts(),
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond_with(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn json_response(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    respond_with(StatusCode::OK, "application/json", Bytes::from(body))
}

fn respond_with(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
