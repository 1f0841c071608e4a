//! The demo web application: what `canarygate backend` and `canarygate demo` serve.
//!
//! A tiny app standing in for the operator's real one, so the proxy can be tried,
//! tested, benchmarked and deployed without anything else: HTML pages on GET, 200 on
//! `/health`, and its name in the page and in the `x-backend` response header, so it
//! is always visible which version answered.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::{self, ServeOptions};

/// Identity of one demo app instance.
#[derive(Debug, Clone)]
pub struct AppIdentity {
    /// Shown in the page and sent as `x-backend`, e.g. `production`.
    pub name: String,
    /// Shown in the page, e.g. `v1`.
    pub version: String,
}

/// Serves the demo app on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    identity: AppIdentity,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let identity = Arc::new(identity);
    server::serve(
        "backend",
        listener,
        options,
        shutdown,
        move |_peer, _framing| {
            let identity = Arc::clone(&identity);
            service_fn(move |req| {
                let response = respond(&identity, &req);
                async move { Ok::<_, Infallible>(response) }
            })
        },
    )
    .await;
}

/// A fixed 100-byte page: the load benchmark's target, the same for every proxy.
pub const STATIC_PAGE: &str = "<!doctype html><html><head><title>hi</title></head><body><p>hello from a demo app</p></body></html>\n";

fn respond(identity: &AppIdentity, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/health") => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
        }
        (&Method::GET | &Method::HEAD, "/static") => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(STATIC_PAGE.as_bytes()),
        ),
        (&Method::GET | &Method::HEAD, path) => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from(page(identity, path, req)),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"405 method not allowed\n"),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(name) = HeaderValue::from_str(&identity.name) {
        h.insert("x-backend", name);
    }
    if *req.method() == Method::GET || *req.method() == Method::HEAD {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn page(identity: &AppIdentity, path: &str, req: &Request<Incoming>) -> String {
    let accent = if identity.name == "canary" {
        "#b45309"
    } else {
        "#1d4ed8"
    };
    let mut html = String::with_capacity(2048);
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{name} {version}</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:3rem;color:#111}}\
         h1{{color:{accent}}}td{{padding:.2rem .8rem;font-family:monospace}}</style></head>\
         <body><h1>Hello from {name} ({version})</h1>\
         <p>This page was served by the <strong>{name}</strong> backend, version <strong>{version}</strong>.</p>",
        name = escape(&identity.name),
        version = escape(&identity.version),
    );
    let flags = req
        .headers()
        .get("x-feature-flags")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let flag_pairs: Vec<(&str, &str)> = flags
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    if flag_pairs.contains(&("new_banner", "on")) {
        html.push_str(
            "<div id=\"banner\" style=\"background:#fde68a;padding:1rem;border-radius:.5rem\">\
             New banner: this feature is on because the <code>new_banner</code> flag is on.</div>",
        );
    }
    html.push_str("<h2>Feature flags received</h2><ul id=\"flags\">");
    if flag_pairs.is_empty() {
        html.push_str("<li>(none)</li>");
    }
    for (name, value) in &flag_pairs {
        let _ = write!(
            html,
            "<li><code>{}</code> = <code>{}</code></li>",
            escape(name),
            escape(value)
        );
    }
    html.push_str("</ul><h2>Request</h2><table><tr><td>path</td><td>");
    html.push_str(&escape(path));
    html.push_str("</td></tr>");
    for name in ["x-request-id", "x-forwarded-for", "x-forwarded-host"] {
        if let Some(value) = req.headers().get(name).and_then(|v| v.to_str().ok()) {
            let _ = write!(html, "<tr><td>{name}</td><td>{}</td></tr>", escape(value));
        }
    }
    html.push_str("</table></body></html>\n");
    html
}

/// Minimal HTML escaping for text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn static_page_is_100_bytes() {
        assert_eq!(super::STATIC_PAGE.len(), 100);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
