//! The admin listener: operational endpoints, on their own address so they are never
//! exposed on the public port (`[server] admin_listen`, loopback by default).
//!
//! For now `GET /healthz` (the process is up); metrics, readiness, flags and the
//! status page join it in later issues.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

/// Answers one admin request.
pub fn respond<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n"),
        (_, "/healthz") => (StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n"),
        _ => (StatusCode::NOT_FOUND, "404 not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
