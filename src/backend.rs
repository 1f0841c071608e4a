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
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use crate::admin::escape_html;
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
            service_fn(move |mut req| {
                let response = if req.uri().path() == "/ws" {
                    websocket(&identity, &mut req)
                } else {
                    respond(&identity, &req)
                };
                async move { Ok::<_, Infallible>(response) }
            })
        },
    )
    .await;
}

/// `GET /ws`: a WebSocket echo. Text comes back prefixed with the app's name and
/// version (so a client sees which version answered), binary comes back as is, and
/// the text `close` makes the app close the socket.
fn websocket(identity: &Arc<AppIdentity>, req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    let h = req.headers();
    let is_websocket = h
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY).filter(|_| is_websocket) else {
        let mut response = Response::new(Full::new(Bytes::from_static(
            b"400 expected a WebSocket upgrade\n",
        )));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    let app = Arc::clone(identity);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => echo(&app, TokioIo::new(upgraded)).await,
            Err(error) => tracing::debug!(%error, "websocket upgrade failed"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Ok(name) = HeaderValue::from_str(&identity.name) {
        h.insert("x-backend", name);
    }
    response
}

async fn echo<S>(identity: &AppIdentity, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut socket = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    while let Some(Ok(message)) = socket.next().await {
        let reply = match message {
            Message::Text(text) if text.as_str() == "close" => {
                let _ = socket.close(None).await;
                break;
            }
            Message::Text(text) => Message::text(format!(
                "{} {}: {}",
                identity.name,
                identity.version,
                text.as_str()
            )),
            Message::Binary(data) => Message::Binary(data),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
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
        name = escape_html(&identity.name),
        version = escape_html(&identity.version),
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
            escape_html(name),
            escape_html(value)
        );
    }
    html.push_str("</ul><h2>Request</h2><table><tr><td>path</td><td>");
    html.push_str(&escape_html(path));
    html.push_str("</td></tr>");
    html.push_str(
        "</table><h2>Live socket</h2><p id=\"ws\">connecting&hellip;</p><script>\
         (function(){var el=document.getElementById('ws');\
         try{var s=new WebSocket((location.protocol==='https:'?'wss://':'ws://')+location.host+'/ws');\
         s.onopen=function(){s.send('hello')};\
         s.onmessage=function(e){el.textContent='socket answered by '+e.data;s.close()};\
         s.onerror=function(){el.textContent='socket failed'};}\
         catch(e){el.textContent='no WebSocket here'}})();</script><table>",
    );
    for name in ["x-request-id", "x-forwarded-for", "x-forwarded-host"] {
        if let Some(value) = req.headers().get(name).and_then(|v| v.to_str().ok()) {
            let _ = write!(
                html,
                "<tr><td>{name}</td><td>{}</td></tr>",
                escape_html(value)
            );
        }
    }
    html.push_str("</table></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    #[test]
    fn static_page_is_100_bytes() {
        assert_eq!(super::STATIC_PAGE.len(), 100);
    }
}
