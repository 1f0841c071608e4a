//! WebSocket (HTTP/1.1 Upgrade) pass-through with real WebSocket clients and servers
//! (tokio-tungstenite): echo, the canary split, closes both ways, refusal of other
//! protocols, idle tunnels and the drain.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use support::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// A WebSocket server: text comes back as `<name>: <text>`, binary as is, `close`
/// makes the server close; every ended socket is reported on `closed`.
struct WsBackend {
    addr: SocketAddr,
    closed: mpsc::UnboundedReceiver<&'static str>,
    task: tokio::task::JoinHandle<()>,
}

impl WsBackend {
    async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, closed) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(message)) = ws.next().await {
                        let reply = match message {
                            Message::Text(t) if t.as_str() == "close" => {
                                let _ = ws.close(None).await;
                                break;
                            }
                            Message::Text(t) => Message::text(format!("{name}: {}", t.as_str())),
                            Message::Binary(b) => Message::Binary(b),
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                    let _ = tx.send(name);
                });
            }
        });
        Self { addr, closed, task }
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(
    addr: SocketAddr,
    headers: &[(&'static str, &str)],
) -> (Client, http::Response<Option<Vec<u8>>>) {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(*k, v.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket handshake through the proxy")
}

async fn say(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
        other => panic!("expected a text reply, got {other:?}"),
    }
}

async fn metric(c: &TestClient, admin: SocketAddr, series: &str) -> f64 {
    let text = get(c, &format!("http://{admin}/metrics"), &[]).await;
    parse_scrape(text.text())
        .get(series)
        .copied()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_text_and_a_1_mib_binary_message_intact() {
    within(60, async {
        let prod = WsBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let (mut ws, response) = connect(proxy.addr, &[]).await;
        assert_eq!(response.status(), 101);
        assert_eq!(response.headers()["x-canarygate-pool"], "production");
        assert_eq!(say(&mut ws, "hello").await, "production: hello");
        let payload: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        ws.send(Message::binary(payload.clone())).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                assert!(b.as_ref() == payload.as_slice(), "1 MiB message changed");
            }
            other => panic!("{other:?}"),
        }
        let c = client();
        let open = r#"canarygate_upgraded_connections{pool="production"}"#;
        assert_eq!(metric(&c, proxy.admin_addr, open).await, 1.0);
        assert_eq!(
            metric(
                &c,
                proxy.admin_addr,
                r#"canarygate_requests_total{code="101",method="GET",pool="production"}"#
            )
            .await,
            1.0
        );
        ws.close(None).await.unwrap();
        // The close handshake ends; then the client closes its TCP connection.
        while ws.next().await.is_some() {}
        drop(ws);
        eventually(Duration::from_secs(3), "tunnel gauge back to 0", || {
            let c = c.clone();
            let admin = proxy.admin_addr;
            async move { metric(&c, admin, open).await == 0.0 }
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_user_gets_sockets_from_the_version_of_its_pages() {
    within(60, async {
        // The demo app serves both the pages and /ws, so page and socket can be compared.
        let (v1, v2) = (
            demo_app("production", "v1").await,
            demo_app("canary", "v2").await,
        );
        let proxy = Proxy::start(&config_toml(
            &[v1],
            &[v2],
            "[routing]\ncanary_percent = 50\n",
        ))
        .await;
        let c = client();
        let mut versions = std::collections::HashSet::new();
        for user in 0..12 {
            let cookie = sticky_cookie(&format!("user-{user}"));
            let page = get(&c, &proxy.url("/"), &[("cookie", &cookie)]).await;
            let version = if page.text().contains("(v1)") {
                "production v1"
            } else {
                "canary v2"
            };
            let (mut ws, _) = connect(proxy.addr, &[("cookie", &cookie)]).await;
            assert_eq!(
                say(&mut ws, "hi").await,
                format!("{version}: hi"),
                "user-{user}"
            );
            versions.insert(version);
        }
        assert_eq!(versions.len(), 2, "both versions exercised");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sockets_split_two_to_one() {
    within(60, async {
        let prod = WsBackend::start("production").await;
        let canary = WsBackend::start("canary").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[canary.addr],
            "[routing]\nsticky = \"header:X-User\"\n",
        ))
        .await;
        // 200 users with fixed keys: each socket must land where its bucket says
        // (33% canary by default), so the count is exact, not a chance.
        let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        let mut sockets = Vec::new();
        for user in &users {
            sockets.push(connect(proxy.addr, &[("x-user", user)]).await.0);
        }
        let mut canaries = 0;
        for (ws, user) in sockets.iter_mut().zip(&users) {
            let on_canary = say(ws, "x").await.starts_with("canary");
            assert_eq!(
                on_canary,
                canarygate::routing::bucket(user.as_bytes()) < 33,
                "{user}"
            );
            canaries += usize::from(on_canary);
        }
        let c = client();
        let open = metric(
            &c,
            proxy.admin_addr,
            r#"canarygate_upgraded_connections{pool="canary"}"#,
        )
        .await
            + metric(
                &c,
                proxy.admin_addr,
                r#"canarygate_upgraded_connections{pool="production"}"#,
            )
            .await;
        assert_eq!(open, 200.0);
        assert!(
            (46..=86).contains(&canaries),
            "{canaries} of 200 sockets on canary"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_travel_both_ways() {
    within(60, async {
        let mut prod = WsBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;

        // The backend closes: the client sees the close frame.
        let (mut ws, _) = connect(proxy.addr, &[]).await;
        ws.send(Message::text("close")).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Close(_))) | None => {}
            other => panic!("expected the backend's close, got {other:?}"),
        }
        assert_eq!(prod.closed.recv().await, Some("production"));

        // The client closes: the backend sees it.
        let (mut ws, _) = connect(proxy.addr, &[]).await;
        assert_eq!(say(&mut ws, "a").await, "production: a");
        ws.close(None).await.unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(3), prod.closed.recv()).await;
        assert_eq!(seen.ok().flatten(), Some("production"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_upgrades_are_refused_with_400() {
    within(30, async {
        let prod = WsBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let addr = proxy.addr;
        let h2c = tokio::task::spawn_blocking(move || {
            raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        })
        .await
        .unwrap();
        assert!(h2c.starts_with("HTTP/1.1 400"), "{h2c}");

        // With websocket not listed, WebSockets are refused too.
        let strict = Proxy::start(&config_toml(&[prod.addr], &[], "[routing]\nallowed_upgrades = []\n")).await;
        let request = format!("ws://{}/ws", strict.addr).into_client_request().unwrap();
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400),
            other => panic!("expected 400, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tunnels_close_after_websocket_idle_ms() {
    within(30, async {
        let prod = WsBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            "[timeouts]\nwebsocket_idle_ms = 400\n",
        ))
        .await;
        let (mut ws, _) = connect(proxy.addr, &[]).await;
        assert_eq!(say(&mut ws, "a").await, "production: a");
        let started = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("tunnel closed");
        assert!(
            matches!(end, None | Some(Err(_) | Ok(Message::Close(_)))),
            "{end:?}"
        );
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(350) && after < Duration::from_secs(2),
            "{after:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_open_sockets_then_cuts_them_at_drain_timeout() {
    within(30, async {
        let prod = WsBackend::start("production").await;
        let mut proxy = ProxyProcess::spawn(
            &config_toml(&[prod.addr], &[], ""),
            "drain_timeout_ms = 1500",
        );
        let (mut ws, _) = connect(proxy.addr, &[]).await;
        assert_eq!(say(&mut ws, "before").await, "production: before");
        let started = Instant::now();
        proxy.signal("TERM");
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Still open while draining.
        assert_eq!(say(&mut ws, "during").await, "production: during");
        let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("socket cut");
        assert!(
            matches!(end, None | Some(Err(_) | Ok(Message::Close(_)))),
            "{end:?}"
        );
        let cut_after = started.elapsed();
        assert!(
            cut_after >= Duration::from_millis(1300) && cut_after < Duration::from_secs(4),
            "{cut_after:?}"
        );
        let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(0));
    })
    .await;
}

/// Chromium driven over the DevTools protocol (its own WebSocket): the page is
/// opened, then `expression` is evaluated in it every 100 ms, in real time, until
/// `done` says so or `timeout` passes; the last value. (`--dump-dom` with a
/// virtual-time budget was flaky here: headless Chromium fast-forwards its virtual
/// clock past a socket's real round trip.)
async fn evaluate_until(
    url: &str,
    expression: &str,
    done: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    use std::io::BufRead as _;
    let profile = TempDir::new("chromium-cdp");
    let mut chromium = headless_chromium(&profile)
        .arg("--remote-debugging-port=0")
        .arg("about:blank")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("chromium (apt-get install chromium)");
    let stderr = chromium.stderr.take().unwrap();
    let endpoint = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split("DevTools listening on ").nth(1).map(str::to_owned))
    })
    .await
    .unwrap()
    .expect("chromium says where DevTools listens");
    let (mut cdp, _) = tokio_tungstenite::connect_async(endpoint.trim())
        .await
        .unwrap();
    let mut next_id = 0;
    let mut call = async |session: Option<&str>, method: &str, params: serde_json::Value| {
        next_id += 1;
        let mut message = serde_json::json!({"id": next_id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = session.into();
        }
        cdp.send(Message::text(message.to_string())).await.unwrap();
        loop {
            let Some(Ok(Message::Text(text))) = cdp.next().await else {
                panic!("DevTools closed");
            };
            let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == next_id {
                return reply["result"].clone();
            }
        }
    };
    let target = call(None, "Target.createTarget", serde_json::json!({"url": url})).await;
    let session = call(
        None,
        "Target.attachToTarget",
        serde_json::json!({"targetId": target["targetId"], "flatten": true}),
    )
    .await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = Instant::now();
    let mut value = String::new();
    while started.elapsed() < timeout {
        let result = call(
            Some(&session),
            "Runtime.evaluate",
            serde_json::json!({"expression": expression, "returnByValue": true}),
        )
        .await;
        value = result["result"]["value"].as_str().unwrap_or("").to_owned();
        if done(&value) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = chromium.kill();
    let _ = chromium.wait();
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_widget_shows_which_version_answered_over_the_socket() {
    within(90, async {
        let v1 = demo_app("production", "v1").await;
        let proxy = Proxy::start(&config_toml(&[v1], &[], "")).await;
        let widget = evaluate_until(
            &proxy.url("/"),
            "(document.getElementById('ws') || {}).textContent || ''",
            |text| text.starts_with("socket answered") || text.contains("failed"),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(widget, "socket answered by production v1: hello");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_extended_connect_is_bridged_to_the_http11_backend() {
    within(30, async {
        let prod = WsBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        // An HTTP/2 (prior knowledge) client opening a WebSocket per RFC 8441.
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("http://{}/ws", proxy.addr))
            .header("sec-websocket-version", "13")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let mut response = send.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-canarygate-pool"], "production");
        let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        ws.send(Message::text("over h2")).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "production: over h2"),
            other => panic!("{other:?}"),
        }
        // Another :protocol is refused.
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("http://{}/x", proxy.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("connect-udp"));
        assert_eq!(send.send_request(req).await.unwrap().status(), 400);
    })
    .await;
}
