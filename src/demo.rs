//! The demo: the web application `canarygate backend` serves, and
//! `canarygate demo`, which starts two of them (production v1, canary v2) with the
//! proxy in front.
//!
//! A tiny app standing in for the operator's real one, so the proxy can be tried,
//! tested, benchmarked and deployed without anything else: HTML pages on GET, 200 on
//! `/health`, and its name in the page and in the `x-backend` response header, so it
//! is always visible which version answered.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

use crate::config;
use crate::observe::html::escape_html;
use crate::server::{self, ServeOptions};

/// Identity of one demo app instance.
#[derive(Debug, Clone)]
pub struct AppIdentity {
    /// Shown in the page and sent as `x-backend`, e.g. `production`.
    pub name: String,
    /// Shown in the page, e.g. `v1`.
    pub version: String,
    /// Started broken (`canarygate backend --broken`): fails one page in three,
    /// whatever its name and the flags (a bad release, for deploy tests).
    pub broken: bool,
}

/// Serves the demo app on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    identity: AppIdentity,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let identity = Arc::new(identity);
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    server::serve(
        "backend",
        listener,
        options,
        shutdown,
        move |_peer, _framing| {
            let (identity, served) = (Arc::clone(&identity), Arc::clone(&served));
            service_fn(move |mut req| {
                let response = if req.uri().path() == "/ws" {
                    websocket(&identity, &mut req)
                } else {
                    respond(&identity, &req, &served)
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

/// A fixed 1 MiB body on `/static-1m`: the target for benchmarks of large responses.
fn large_page() -> Bytes {
    static PAGE: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    PAGE.get_or_init(|| {
        let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
        Bytes::from(line.repeat((1 << 20) / line.len()))
    })
    .clone()
}

/// `canarygate demo`'s key `b` (and `f`): the canary app fails without Redis too.
static BROKEN_BY_KEY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set when `canarygate backend` got SIGTERM: `/readyz` says 503 from then on, so the
/// proxy's health checks take it out of rotation before it stops (`--drain-ms`).
static DRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `/readyz` answers 503 from now on (the process stops after its drain delay).
pub fn start_draining() {
    DRAINING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the flag `demo_canary_errors` is on in the flags the proxy sent.
fn canary_errors_flag(req: &Request<Incoming>) -> bool {
    req.headers()
        .get("x-feature-flags")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|flags| flags.split(';').any(|pair| pair == "demo_canary_errors=on"))
}

fn respond(
    identity: &AppIdentity,
    req: &Request<Incoming>,
    served: &std::sync::atomic::AtomicU64,
) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering;
    let broken = identity.broken
        || (identity.name == "canary"
            && (BROKEN_BY_KEY.load(Ordering::Relaxed) || canary_errors_flag(req)));
    // A broken canary fails one page in three (never /health: the proxy would
    // eject it, and the point is to watch the analysis, not the health checks).
    let fail = broken
        && req.uri().path() != "/health"
        && req.uri().path() != "/readyz"
        && served.fetch_add(1, Ordering::Relaxed).is_multiple_of(3);
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        _ if fail => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            Bytes::from_static(b"500 the demo app is broken (demo_canary_errors or --broken)\n"),
        ),
        (&Method::GET | &Method::HEAD, "/health") => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
        }
        (&Method::GET | &Method::HEAD, "/readyz") if DRAINING.load(Ordering::Relaxed) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"draining\n"),
        ),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
        }
        (&Method::GET | &Method::HEAD, "/static") => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(STATIC_PAGE.as_bytes()),
        ),
        (&Method::GET | &Method::HEAD, "/static-1m") => {
            (StatusCode::OK, "text/plain", large_page())
        }
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

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot bind the {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, DemoError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind { what, addr, source })
}

/// Settings of the demo apps' listeners: the proxy's default timeouts.
pub fn serve_options() -> ServeOptions {
    let defaults = config::TimeoutsConfig::default();
    ServeOptions::basic(
        defaults.client_header_read(),
        defaults.idle(),
        Duration::from_secs(5),
    )
}

/// Whether a Redis answers PING on the default local port, within a short time.
async fn local_redis_answers() -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(DEMO_REDIS_ADDR).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await.ok()?;
        (&buf == b"+PONG\r\n").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(300), probe).await,
        Ok(Some(()))
    )
}

const DEMO_REDIS_ADDR: &str = "127.0.0.1:6379";

/// `canarygate demo`: two demo apps and the proxy in front of them, until
/// `shutdown`. Prints how to try it.
pub async fn demo(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    redis_url: Option<String>,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    let mut backends = Vec::new();
    for (name, version) in [("production", "v1"), ("canary", "v2")] {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "demo app").await?;
        let addr = listener.local_addr()?;
        let identity = AppIdentity {
            name: name.to_owned(),
            version: version.to_owned(),
            broken: false,
        };
        tokio::spawn(run(listener, identity, serve_options(), shutdown.clone()));
        backends.push(addr);
    }
    let redis_url = match redis_url {
        Some(url) => Some(url),
        None if local_redis_answers().await => Some(format!("redis://{DEMO_REDIS_ADDR}/0")),
        None => None,
    };
    let redis_line = match &redis_url {
        Some(url) => format!("flags from Redis at {url}, hash canarygate:flags"),
        None => {
            "no Redis answered on 127.0.0.1:6379: built-in static flags (new_banner=off)".to_owned()
        }
    };
    // The demo config goes through the same parser and validation as a real one.
    // The analysis runs with short intervals so a newcomer sees it act in seconds. No
    // access log: the demo's own 25 requests a second would bury its instructions.
    let toml = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin_listen}\"\naccess_log = \"off\"\n\
         [pools.production]\nbackends = [\"{}\"]\n[pools.canary]\nbackends = [\"{}\"]\n\
         [analysis]\nenabled = true\ninterval_ms = 2000\nwindow_ms = 20000\nmin_requests = 20\n\
         [flags]\n{}\n[flags.static]\nnew_banner = \"off\"\ndark_mode = \"off\"\n",
        backends[0],
        backends[1],
        redis_url
            .as_ref()
            .map(|u| format!("redis_url = {u:?}"))
            .unwrap_or_default(),
    );
    let config = config::from_toml(&toml, "<demo>")?;
    let listener = bind(
        listen,
        "proxy listener (pass --listen to pick another port)",
    )
    .await?;
    let admin = bind(
        admin_listen,
        "admin listener (pass --admin-listen to pick another)",
    )
    .await?;
    let (proxy_addr, admin_addr) = (listener.local_addr()?, admin.local_addr()?);
    println!(
        "canarygate demo\n\
         \x20 proxy       http://{proxy_addr}/   ({}% canary, sticky by cookie)\n\
         \x20 admin       http://{admin_addr}/healthz   http://{admin_addr}/flags\n\
         \x20 flags       {redis_line}\n\
         \x20 production  http://{}/   (v1)\n\
         \x20 canary      http://{}/   (v2)\n\
         try:  for i in $(seq 9); do curl -s http://{proxy_addr}/ | grep -o '(v[12])'; done\n\
         \x20     curl -si -H 'x-canary: always' http://{proxy_addr}/ | grep -i x-canarygate-pool\n\
         \x20     redis-cli HSET canarygate:flags new_banner on    # then reload the page\n\
         canary analysis: a check every 2 s over 20 s of the demo's own traffic ({DEMO_RPS} req/s)\n\
         \x20 watch:   http://{admin_addr}/   (section Canary analysis)   http://{admin_addr}/analysis\n\
         \x20 break:   redis-cli HSET canarygate:flags demo_canary_errors on     (or type b, Enter)\n\
         \x20 restore: redis-cli HSET canarygate:flags demo_canary_errors off canary_percent {} canary_auto on\n\
         \x20          (or type f, Enter to fix the app, then r, Enter to hand the canary back)\n\
         Ctrl-C stops everything.",
        config.routing.canary_percent, backends[0], backends[1], config.routing.canary_percent
    );
    let state = crate::state::AppState::new(config);
    spawn_keys(state.clone());
    tokio::spawn(traffic(proxy_addr, shutdown.clone()));
    crate::run_with_state(listener, admin, state, shutdown).await;
    Ok(())
}

/// The demo's own steady traffic, so the analysis has something to judge.
const DEMO_RPS: u64 = 25;

/// Sends [`DEMO_RPS`] requests a second through the proxy until `shutdown`, each
/// without a cookie (so each is split anew, a third to the canary).
async fn traffic(proxy: SocketAddr, shutdown: CancellationToken) {
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .user_agent("canarygate-demo-traffic")
        .build()
    else {
        return;
    };
    let url = format!("http://{proxy}/demo-traffic");
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / DEMO_RPS));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let request = client.get(&url).send();
                tokio::spawn(async move {
                    if let Ok(response) = request.await {
                        let _ = response.bytes().await;
                    }
                });
            }
        }
    }
}

/// Keys for a demo without Redis: `b` breaks the canary app, `f` fixes it, `r`
/// hands the canary back to the analysis after a rollback (the static flags again).
fn spawn_keys(state: crate::state::AppState) {
    use std::io::BufRead as _;
    use std::sync::atomic::Ordering;
    let spawned = std::thread::Builder::new()
        .name("demo-keys".to_owned())
        .spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                match line.trim() {
                    "b" => {
                        BROKEN_BY_KEY.store(true, Ordering::Relaxed);
                        println!("canary app broken: one page in three answers 500");
                    }
                    "f" => {
                        BROKEN_BY_KEY.store(false, Ordering::Relaxed);
                        println!("canary app fixed");
                    }
                    "r" if state.snapshot().config.flags.redis_url.is_some() => {
                        println!("with Redis: redis-cli HSET canarygate:flags canary_auto on");
                    }
                    "r" => {
                        let flags = state.snapshot().config.flags.static_set();
                        state.publish_flags(&flags, crate::flags::model::Source::Static);
                        println!("static flags published again: canary_auto on");
                    }
                    _ => {
                        println!("keys: b (break the canary), f (fix it), r (resume the analysis)");
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "demo keys unavailable");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn static_page_is_100_bytes() {
        assert_eq!(super::STATIC_PAGE.len(), 100);
    }
}
