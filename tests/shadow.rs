//! The shadow stage (issue 32), end to end: a real proxy, real JSON backends on
//! loopback (two production ones and a canary), real Redis for the gate.
//!
//! - a canary that changes one JSON field on one route is reported on that route
//!   with the field's path, and only there; a field that differs between two
//!   production answers (a timestamp) is noise; examples carry no credentials;
//! - a POST is never mirrored unless listed;
//! - a canary that sleeps 5 s leaves the client's latency where it was, and the
//!   mirrors past `max_in_flight` are dropped and counted;
//! - the next request on a keep-alive connection is answered while the canary still
//!   sleeps on the mirror of the one before;
//! - a client cannot mark its own request as a shadow;
//! - a dead canary is a canary error at once, with no replay sent to production;
//! - the gate keeps users off a canary that differs and lets them on when not, and
//!   says why it waits while it has no traffic.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use canarygate::server::{self, ServeOptions};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use support::*;

/// Every answer of every app gets a new `at`: two answers never agree on it.
static CLOCK: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    /// Production's answers.
    Same,
    /// `/users/{n}` answers another `price`; every other route as production.
    PriceChanged,
    /// Every answer after 5 s.
    Sleeps,
}

/// One request an app received: method, path, whether it was marked a shadow.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    shadow: bool,
}

/// A small JSON API: `/users/{n}` and `/orders/{n}`.
struct JsonApp {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    shutdown: CancellationToken,
}

impl JsonApp {
    async fn start(version: Version) -> Self {
        let listener = local_listener();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let options = ServeOptions::basic(
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_millis(100),
        );
        let log = Arc::clone(&seen);
        tokio::spawn(server::serve(
            "json-app",
            listener,
            options,
            shutdown.clone(),
            move |_, _| {
                let log = Arc::clone(&log);
                service_fn(move |req| answer(version, Arc::clone(&log), req))
            },
        ));
        Self {
            addr,
            seen,
            shutdown,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests that were not mirrors: users' requests.
    fn users(&self) -> usize {
        self.seen().iter().filter(|s| !s.shadow).count()
    }
}

impl Drop for JsonApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An app's answer: with a length, or, for a target with the query `chunked`, of
/// unknown length (chunked on the wire: the proxy's server must poll the body to
/// its end before the connection can take the next request).
enum AppBody {
    Sized(Full<Bytes>),
    Chunked(Option<Bytes>),
}

impl hyper::body::Body for AppBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Sized(full) => std::pin::Pin::new(full).poll_frame(cx),
            Self::Chunked(data) => {
                std::task::Poll::Ready(data.take().map(|d| Ok(hyper::body::Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Sized(full) => full.is_end_stream(),
            Self::Chunked(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Sized(full) => full.size_hint(),
            Self::Chunked(_) => hyper::body::SizeHint::default(),
        }
    }
}

async fn answer(
    version: Version,
    log: Arc<Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
    let chunked = req.uri().query() == Some("chunked");
    let path = req.uri().path().to_owned();
    if path != "/health" {
        log.lock().unwrap().push(Seen {
            method: req.method().to_string(),
            path: path.clone(),
            shadow: req.headers().get("x-canarygate-shadow").is_some(),
        });
    }
    if version == Version::Sleeps {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let at = CLOCK.fetch_add(1, Ordering::Relaxed);
    let id: u64 = path
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let body = if path.starts_with("/users/") {
        let price = if version == Version::PriceChanged {
            12
        } else {
            10
        };
        format!(r#"{{"id":{id},"name":"user {id}","price":{price},"at":{at},"tags":["a","b"]}}"#)
    } else {
        format!(r#"{{"id":{id},"total":99,"at":{at}}}"#)
    };
    let body = Bytes::from(body);
    let mut response = Response::new(if chunked {
        AppBody::Chunked(Some(body))
    } else {
        AppBody::Sized(Full::new(body))
    });
    let h = response.headers_mut();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        "set-cookie",
        http::HeaderValue::from_static("session=s3cr3t-set-cookie"),
    );
    Ok(response)
}

/// Credentials every test request carries: none may appear in `/shadow`.
const SECRETS: [(&str, &str); 4] = [
    ("authorization", "Bearer s3cr3t-token"),
    ("cookie", "sid=s3cr3t-cookie"),
    ("x-api-key", "s3cr3t-key"),
    ("referer", "https://shop.test/cart?token=s3cr3t-referer"),
];

fn shadow_toml(production: &[SocketAddr], canary: SocketAddr, shadow: &str) -> String {
    config_toml(
        production,
        &[canary],
        &format!(
            "[routing]\ncanary_percent = 0\n[shadow]\nenabled = true\npercent = 100\n{shadow}\n"
        ),
    )
}

async fn shadow_json(proxy: &Proxy) -> serde_json::Value {
    get_json(&client(), &format!("http://{}/shadow", proxy.admin_addr)).await
}

/// Waits until `n` mirrors were compared or failed and none is in flight.
async fn settled(proxy: &Proxy, n: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = shadow_json(proxy).await;
        let t = &s["totals"];
        let done = t["samples"].as_u64().unwrap() + t["secondary_errors"].as_u64().unwrap();
        if done >= n && s["in_flight"] == 0 {
            return s;
        }
        assert!(Instant::now() < deadline, "mirrors not settled: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn route<'a>(shadow: &'a serde_json::Value, template: &str) -> &'a serde_json::Value {
    shadow["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == template)
        .unwrap_or_else(|| panic!("no route {template}: {shadow}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_field_is_reported_on_its_route_with_its_path_and_noise_is_not() {
    within(60, async {
        let (p1, p2) = (
            JsonApp::start(Version::Same).await,
            JsonApp::start(Version::Same).await,
        );
        let canary = JsonApp::start(Version::PriceChanged).await;
        let proxy = Proxy::start(&shadow_toml(&[p1.addr, p2.addr], canary.addr, "")).await;
        let c = client();
        for n in 0..20 {
            // A credential in the query: never in `/shadow` either.
            for path in [
                format!("/users/{n}?token=s3cr3t-query"),
                format!("/orders/{}", 1000 + n),
            ] {
                let got = get(&c, &proxy.url(&path), &SECRETS).await;
                assert_eq!((got.status.as_u16(), got.pool()), (200, "production"));
                // The client gets production's answer, never the canary's.
                assert!(got.text().contains("\"price\":10") || path.starts_with("/orders"));
            }
        }
        let s = settled(&proxy, 40).await;
        let users = route(&s, "GET /users/{n}");
        assert_eq!(users["samples"], 20, "{users}");
        assert_eq!(users["diffs"], 20, "{users}");
        assert_eq!(
            users["differing_fields"],
            serde_json::json!({ "$.price": 20 }),
            "only the changed field: {users}"
        );
        assert_eq!(
            users["noise_fields"],
            serde_json::json!(["$.at"]),
            "{users}"
        );
        let orders = route(&s, "GET /orders/{n}");
        assert_eq!(
            (orders["samples"].as_u64(), orders["diffs"].as_u64()),
            (Some(20), Some(0))
        );
        assert_eq!(orders["noise"], 20, "the timestamp is noise: {orders}");
        assert_eq!(
            orders["differing_fields"],
            serde_json::json!({}),
            "{orders}"
        );
        assert_eq!(s["routes"].as_array().unwrap().len(), 2, "{s}");
        // Examples: at most 3, the field named, the bodies shown, no credential.
        let examples = users["examples"].as_array().unwrap();
        assert_eq!(examples.len(), 3);
        assert_eq!(examples[0]["fields"], serde_json::json!(["$.price"]));
        assert!(
            examples[0]["candidate"]["body"]
                .as_str()
                .unwrap()
                .contains("\"price\":12")
        );
        let text = s.to_string();
        assert!(!text.contains("s3cr3t"), "a credential in /shadow: {text}");
        assert!(text.contains("[redacted]"), "{text}");
        // Every mirror was marked; the canary had no user.
        let seen = canary.seen();
        assert_eq!(seen.len(), 40);
        assert!(seen.iter().all(|r| r.shadow));
        // The secondary went to the other production backend.
        assert_eq!(p1.seen().len() + p2.seen().len(), 80);
        assert_eq!(p1.users() + p2.users(), 40);
        let m = scrape_metrics(&c, proxy.admin_addr).await;
        let result = |r: &str| m[&format!("canarygate_shadow_requests_total{{result=\"{r}\"}}")];
        assert_eq!(
            (result("diff"), result("noise"), result("match")),
            (20.0, 20.0, 0.0)
        );
        assert!(
            (m["canarygate_shadow_diff_ratio"] - 0.5).abs() < 1e-9,
            "{m:?}"
        );
        // The status page has the section.
        let page = get(&c, &format!("http://{}/", proxy.admin_addr), &[]).await;
        assert!(page.text().contains("id=\"shadow\"") && page.text().contains("$.price"));
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_mirrored_unless_listed() {
    within(60, async {
        let production = JsonApp::start(Version::Same).await;
        let canary = JsonApp::start(Version::Same).await;
        let c = client();
        let post = |url: String, body: &'static str| {
            let c = c.clone();
            async move {
                let req = Request::post(url)
                    .body(
                        Full::new(Bytes::from_static(body.as_bytes()))
                            .map_err(|e| match e {})
                            .boxed(),
                    )
                    .unwrap();
                send(&c, req).await
            }
        };
        // The defaults: GET and HEAD only.
        let proxy = Proxy::start(&shadow_toml(&[production.addr], canary.addr, "")).await;
        assert_eq!(post(proxy.url("/users/1"), "").await.status, 200);
        assert_eq!(post(proxy.url("/users/2"), "{\"x\":1}").await.status, 200);
        assert_eq!(get(&c, &proxy.url("/users/3"), &[]).await.status, 200);
        settled(&proxy, 1).await;
        let methods: Vec<String> = canary.seen().into_iter().map(|s| s.method).collect();
        assert_eq!(methods, ["GET"], "only the GET was mirrored");
        proxy.stop().await;

        // Listed: a body-less POST is mirrored; one with a body is dropped, counted.
        let proxy = Proxy::start(&shadow_toml(
            &[production.addr],
            canary.addr,
            "methods = [\"GET\", \"POST\"]",
        ))
        .await;
        assert_eq!(post(proxy.url("/users/4"), "").await.status, 200);
        assert_eq!(post(proxy.url("/users/5"), "{\"x\":1}").await.status, 200);
        settled(&proxy, 1).await;
        let posts: Vec<String> = (canary.seen().into_iter())
            .filter(|s| s.method == "POST")
            .map(|s| s.path)
            .collect();
        assert_eq!(posts, ["/users/4"]);
        let m = scrape_metrics(&c, proxy.admin_addr).await;
        assert_eq!(
            m["canarygate_shadow_requests_total{result=\"dropped\"}"],
            1.0
        );
        proxy.stop().await;
    })
    .await;
}

/// The latency below which `share` of `samples` lie.
fn quantile(samples: &mut [Duration], share: f64) -> Duration {
    samples.sort();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((samples.len() as f64 * share).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_sleeping_5_s_leaves_the_client_latency_and_the_drops_are_counted() {
    within(60, async {
        let production = JsonApp::start(Version::Same).await;
        let canary = JsonApp::start(Version::Sleeps).await;
        let shadow = "max_in_flight = 4\ntimeout_ms = 8000";
        let proxy = Proxy::start(&shadow_toml(&[production.addr], canary.addr, shadow)).await;
        let c = client();
        const REQUESTS: u32 = 200;
        let mut latencies = Vec::new();
        // One client, one keep-alive connection, one request after the other: a
        // request waiting for a mirror would take 5 s.
        for n in 0..REQUESTS {
            let started = Instant::now();
            let got = get(&c, &proxy.url(&format!("/users/{n}")), &[]).await;
            latencies.push(started.elapsed());
            assert_eq!(got.status, 200);
        }
        let p99 = quantile(&mut latencies, 0.99);
        let max = *latencies.last().unwrap();
        println!("client p99 {p99:?}, max {max:?} with a canary sleeping 5 s");
        assert!(
            max < Duration::from_secs(1),
            "a client request waited: max {max:?}"
        );
        let m = scrape_metrics(&c, proxy.admin_addr).await;
        let dropped = m["canarygate_shadow_requests_total{result=\"dropped\"}"];
        assert!(dropped >= f64::from(REQUESTS - 4), "{dropped} dropped");
        assert_eq!(m["canarygate_shadow_in_flight"], 4.0);
        // The same traffic with the shadow off, for the figure beside it.
        let plain = Proxy::start(&config_toml(
            &[production.addr],
            &[canary.addr],
            "[routing]\ncanary_percent = 0\n",
        ))
        .await;
        let mut off = Vec::new();
        for n in 0..REQUESTS {
            let started = Instant::now();
            get(&c, &plain.url(&format!("/users/{n}")), &[]).await;
            off.push(started.elapsed());
        }
        println!(
            "client p99 {:?} with the shadow off",
            quantile(&mut off, 0.99)
        );
        plain.stop().await;
        proxy.stop().await;
    })
    .await;
}

/// Sends `GET path` on `conn` and reads the answer (Content-Length or chunked):
/// its status line, lower case.
async fn raw_get(conn: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body = &buf[end + 4..];
            let complete = if head.contains("transfer-encoding: chunked") {
                body.ends_with(b"0\r\n\r\n")
            } else {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                assert!(body.len() <= length, "more than one answer");
                body.len() == length
            };
            if complete {
                return head.lines().next().unwrap_or("").to_owned();
            }
        }
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed after {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_keep_alive_request_is_answered_while_the_canary_still_sleeps() {
    within(60, async {
        let production = JsonApp::start(Version::Same).await;
        let canary = JsonApp::start(Version::Sleeps).await;
        let shadow = "timeout_ms = 8000";
        let proxy = Proxy::start(&shadow_toml(&[production.addr], canary.addr, shadow)).await;
        // One connection, written by hand: a client library might open a second one
        // if the first were held, and hide it.
        let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
        // Both framings: with a length, and chunked (the proxy's server then polls
        // the body to its end before it reads the next request: the end must not
        // wait for the mirror).
        for n in 0..4 {
            let started = Instant::now();
            let query = if n % 2 == 0 { "" } else { "?chunked" };
            let status = raw_get(&mut conn, &format!("/users/{n}{query}")).await;
            let took = started.elapsed();
            assert!(status.starts_with("http/1.1 200"), "{status}");
            assert!(
                took < Duration::from_secs(1),
                "request {n} on the kept-alive connection waited {took:?}"
            );
        }
        // Every mirror is still at the canary (it sleeps 5 s): the four answers did
        // not wait for any of them.
        let s = shadow_json(&proxy).await;
        assert_eq!(s["in_flight"], 4, "{s}");
        assert_eq!(s["totals"]["samples"], 0, "{s}");
        drop(conn);
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_mark_its_own_request_as_a_shadow() {
    within(60, async {
        let production = JsonApp::start(Version::Same).await;
        let canary = JsonApp::start(Version::Same).await;
        let forged = [("x-canarygate-shadow", "1")];
        let c = client();
        // Production-bound, with the shadow on: the user's request reaches production
        // unmarked; only the proxy's own replays carry the mark.
        let proxy = Proxy::start(&shadow_toml(&[production.addr], canary.addr, "")).await;
        assert_eq!(get(&c, &proxy.url("/users/1"), &forged).await.status, 200);
        settled(&proxy, 1).await;
        let marks = |app: &JsonApp| app.seen().iter().map(|s| s.shadow).collect::<Vec<_>>();
        let mut production_marks = marks(&production);
        production_marks.sort_unstable();
        assert_eq!(
            production_marks,
            [false, true],
            "user request, then the secondary"
        );
        assert_eq!(marks(&canary), [true]);
        proxy.stop().await;
        // Canary-bound, with the shadow off.
        let proxy = Proxy::start(&config_toml(
            &[production.addr],
            &[canary.addr],
            "[routing]\ncanary_percent = 100\n",
        ))
        .await;
        let got = get(&c, &proxy.url("/users/2"), &forged).await;
        assert_eq!((got.status.as_u16(), got.pool()), (200, "canary"));
        assert_eq!(
            marks(&canary),
            [true, false],
            "the user's request was marked"
        );
        proxy.stop().await;
    })
    .await;
}

fn gate_toml(
    production: SocketAddr,
    canary: SocketAddr,
    redis: &RedisServer,
    hook: &str,
) -> String {
    config_toml(
        &[production],
        &[canary],
        &format!(
            "[routing]\ncanary_percent = 50\nsticky = \"none\"\n\
             [analysis]\nenabled = true\ninterval_ms = 200\nwindow_ms = 2000\nsteps = [50]\nstep_ms = 600000\n\
             [flags]\nredis_url = \"{}\"\npoll_ms = 100\n\
             [alerts.webhook]\nurl = \"{hook}/hook\"\nmin_severity = \"info\"\n\
             [shadow]\nenabled = true\npercent = 100\ngate = true\nmin_samples = 30\nmax_diff_ratio = 0.05\n",
            redis.url()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_keeps_users_off_a_differing_canary_and_lets_them_on_when_not() {
    within(90, async {
        let production = JsonApp::start(Version::Same).await;
        let (differs, same) = (
            JsonApp::start(Version::PriceChanged).await,
            JsonApp::start(Version::Same).await,
        );
        let (redis_differs, redis_same) = (RedisServer::start(), RedisServer::start());
        let hook = Peer::start(Mode::Created).await;
        let proxy_differs = Proxy::start(&gate_toml(
            production.addr,
            differs.addr,
            &redis_differs,
            &hook.url(),
        ))
        .await;
        let proxy_same = Proxy::start(&gate_toml(
            production.addr,
            same.addr,
            &redis_same,
            &hook.url(),
        ))
        .await;
        let c = client();
        let state = |redis: &RedisServer| redis.cli(&["HGET", "canarygate:analysis", "state"]);

        // The differing canary: shadowed, failed, and never a user.
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut n = 0;
        while state(&redis_differs) != "shadow_failed" {
            assert!(
                Instant::now() < deadline,
                "no shadow_failed: {}",
                state(&redis_differs)
            );
            let got = get(&c, &proxy_differs.url(&format!("/users/{n}")), &[]).await;
            assert_eq!(
                got.pool(),
                "production",
                "a user reached a canary being shadowed"
            );
            n += 1;
        }
        for n in 0..50 {
            let got = get(&c, &proxy_differs.url(&format!("/users/{n}")), &[]).await;
            assert_eq!(
                got.pool(),
                "production",
                "a user reached a canary that failed its shadow"
            );
        }
        assert_eq!(differs.users(), 0, "the differing canary had a user");
        let reason = redis_differs.cli(&["HGET", "canarygate:analysis", "reason"]);
        assert!(reason.starts_with("shadow: "), "{reason}");
        assert_eq!(
            redis_differs.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "0"
        );
        let analysis = get_json(&c, &format!("http://{}/analysis", proxy_differs.admin_addr)).await;
        assert_eq!(analysis["state"], "shadow_failed", "{analysis}");
        // The alert names the route and the field, with an example.
        let alerts = hook.wait_for(1, "the shadow alert").await;
        let alert = alerts
            .iter()
            .find(|a| a.body.contains("canary_shadow_failed"))
            .unwrap_or_else(|| panic!("no shadow alert: {alerts:?}"));
        assert!(
            alert.body.contains("GET /users/{n}") && alert.body.contains("$.price"),
            "{}",
            alert.body
        );

        // The canary answering like production: shadowed, passed, then users.
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut canary_users = 0;
        let mut n = 0;
        while canary_users < 5 {
            assert!(
                Instant::now() < deadline,
                "no user reached the passing canary: {}",
                state(&redis_same)
            );
            let before = state(&redis_same);
            let got = get(&c, &proxy_same.url(&format!("/users/{n}")), &[]).await;
            n += 1;
            if got.pool() == "canary" {
                assert!(
                    !matches!(before.as_str(), "" | "shadowing"),
                    "a user reached the canary while it was {before:?}"
                );
                canary_users += 1;
            }
        }
        let shadow = shadow_json(&proxy_same).await;
        assert!(
            shadow["totals"]["samples"].as_u64().unwrap() >= 30,
            "{shadow}"
        );
        assert_eq!(state(&redis_same), "progressing");
        proxy_differs.stop().await;
        proxy_same.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_without_traffic_says_why_the_canary_waits_and_its_figures_follow() {
    within(60, async {
        let production = JsonApp::start(Version::Same).await;
        let canary = JsonApp::start(Version::Same).await;
        let redis = RedisServer::start();
        let hook = Peer::start(Mode::Created).await;
        let toml = gate_toml(production.addr, canary.addr, &redis, &hook.url());
        let proxy = Proxy::start(&toml).await;
        let c = client();
        let field = |name: &str| redis.cli(&["HGET", "canarygate:analysis", name]);
        // No traffic: shadowing, and the record says why nothing moves.
        eventually(Duration::from_secs(10), "a waiting reason", || async {
            field("state") == "shadowing" && field("reason").contains("no mirrored request")
        })
        .await;
        let analysis = get_json(&c, &format!("http://{}/analysis", proxy.admin_addr)).await;
        let reason = analysis["record"]["reason"].to_string();
        assert!(reason.contains("30 needed"), "{analysis}");
        let page = get(&c, &format!("http://{}/", proxy.admin_addr), &[]).await;
        assert!(page.text().contains("no mirrored request compared yet"));
        // Some traffic: the record's figures and reason follow each round, not only
        // when the state changes (`canary status` reads them).
        for n in 0..5 {
            get(&c, &proxy.url(&format!("/users/{n}")), &[]).await;
        }
        settled(&proxy, 5).await;
        eventually(
            Duration::from_secs(10),
            "the figures of 5 samples",
            || async {
                let figures: serde_json::Value =
                    serde_json::from_str(&field("figures")).unwrap_or_default();
                figures["shadow"]["samples"] == 5
                    && field("reason").starts_with("shadowing: 5 of 30 mirrored requests compared")
            },
        )
        .await;
        assert_eq!(field("state"), "shadowing");
        assert_eq!(canary.users(), 0);
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_canary_is_an_error_at_once_and_costs_production_no_secondary() {
    within(60, async {
        let production = JsonApp::start(Version::Same).await;
        let dead = dead_addr().await;
        let shadow = "[health]\ninterval_ms = 100\nfall = 2";
        let proxy = Proxy::start(&shadow_toml(&[production.addr], dead, shadow)).await;
        let c = client();
        let up = format!(r#"canarygate_backend_up{{backend="{dead}",pool="canary"}}"#);
        eventually(Duration::from_secs(5), "the canary marked down", || {
            let (c, up) = (c.clone(), up.clone());
            async move { scrape_metrics(&c, proxy.admin_addr).await.get(&up) == Some(&0.0) }
        })
        .await;
        for n in 0..10 {
            assert_eq!(
                get(&c, &proxy.url(&format!("/users/{n}")), &[])
                    .await
                    .status,
                200
            );
        }
        let s = settled(&proxy, 10).await;
        assert_eq!(s["totals"]["candidate_errors"], 10, "{s}");
        assert_eq!(
            s["totals"]["diff_ratio"], 1.0,
            "a dead canary fails the gate: {s}"
        );
        // Production saw the users' requests and no replay: nothing to compare it with.
        assert_eq!(production.seen().len(), 10);
        assert_eq!(production.users(), 10);
        proxy.stop().await;
    })
    .await;
}
