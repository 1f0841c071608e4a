//! Fault injection with real processes: backends dying or failing, hostile clients,
//! TLS, limits and hot reload. The proxy must keep serving through all of it.

mod support;

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt as _;
use support::*;

fn m(map: &HashMap<String, f64>, series: &str) -> f64 {
    map.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_production_backend_fails_no_get() {
    within(60, async {
        let mut a = BackendProcess::spawn("production-a");
        let b = BackendProcess::spawn("production-b");
        let proxy = Proxy::start(&config_toml(
            &[a.addr, b.addr],
            &[],
            "[health]\ninterval_ms = 300\nconsecutive_failures = 3\nejection_ms = 10000\n",
        ))
        .await;
        let c = client();
        let loop_task = {
            let (c, url) = (c.clone(), proxy.url("/"));
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut served_by = HashMap::<String, u32>::new();
                for i in 0..600 {
                    match try_get(&c, &url).await {
                        Ok(got) if got.status == 200 => {
                            *served_by
                                .entry(got.header("x-backend").to_owned())
                                .or_default() += 1;
                        }
                        Ok(got) => failures.push(format!("request {i}: {}", got.status)),
                        Err(e) => failures.push(format!("request {i}: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (failures, served_by)
            })
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        a.kill();
        let (failures, served_by) = loop_task.await.unwrap();
        assert!(failures.is_empty(), "{failures:?}");
        assert!(
            served_by["production-a"] > 10 && served_by["production-b"] > 300,
            "{served_by:?}"
        );

        let scrape = scrape_metrics(&c, proxy.admin_addr).await;
        let retries = m(&scrape, r#"canarygate_retries_total{pool="production"}"#);
        let failed_attempts = m(
            &scrape,
            r#"canarygate_upstream_errors_total{kind="connect",pool="production"}"#,
        ) + m(
            &scrape,
            r#"canarygate_upstream_errors_total{kind="reset",pool="production"}"#,
        );
        // Every failed attempt was retried exactly once, and every retry succeeded.
        assert!(retries >= 1.0, "{retries}");
        assert_eq!(retries, failed_attempts);
        assert_eq!(
            m(
                &scrape,
                r#"canarygate_requests_total{code="200",method="GET",pool="production"}"#
            ),
            600.0
        );
        // The dead backend is out: ejected and, a little later, down by active checks.
        eventually(
            Duration::from_secs(5),
            "backend_up of the killed backend is 0",
            || {
                let (c, admin, dead) = (c.clone(), proxy.admin_addr, a.addr);
                async move {
                    let scrape = scrape_metrics(&c, admin).await;
                    scrape.get(&format!(
                        r#"canarygate_backend_up{{backend="{dead}",pool="production"}}"#
                    )) == Some(&0.0)
                }
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_canary_backend_means_production_serves_everything() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let dead = dead_addr().await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[dead],
            "[routing]\nsticky = \"none\"\ncanary_percent = 100\n[health]\ninterval_ms = 100\nfall = 2\n",
        ))
        .await;
        let c = client();
        eventually(Duration::from_secs(5), "canary marked down", || {
            let (c, admin) = (c.clone(), proxy.admin_addr);
            async move { m(&scrape_metrics(&c, admin).await, &format!(r#"canarygate_backend_up{{backend="{dead}",pool="canary"}}"#)) == 0.0 }
        })
        .await;
        for _ in 0..100 {
            let got = get(&c, &proxy.url("/"), &[]).await;
            assert_eq!((got.status.as_u16(), got.pool(), got.text()), (200, "production", "production"));
        }
        let scrape = scrape_metrics(&c, proxy.admin_addr).await;
        assert_eq!(m(&scrape, "canarygate_failover_requests_total"), 100.0);
        let events = get_json(&c, &format!("http://{}/events", proxy.admin_addr)).await;
        let failover_events = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["message"].as_str().unwrap().contains("fails over"))
            .count();
        assert_eq!(failover_events, 1, "logged once: {events}");

        // All production backends down: 503 with Retry-After.
        prod.forced_status.store(0, Ordering::Relaxed);
        drop(prod);
        eventually(Duration::from_secs(5), "production marked down", || {
            let (c, url) = (c.clone(), proxy.url("/"));
            async move { try_get(&c, &url).await.is_ok_and(|g| g.status == 503) }
        })
        .await;
        let got = get(&c, &proxy.url("/"), &[]).await;
        assert_eq!(got.header("retry-after"), "1");
        let ready = get(&c, &format!("http://{}/readyz", proxy.admin_addr), &[]).await;
        assert_eq!(ready.status, 503);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_returning_500s_is_ejected_and_comes_back() {
    within(60, async {
        let flaky = TestBackend::start("flaky").await;
        let good = TestBackend::start("good").await;
        let proxy = Proxy::start(&config_toml(
            &[flaky.addr, good.addr],
            &[],
            "[health]\nconsecutive_failures = 3\nejection_ms = 800\n",
        ))
        .await;
        let c = client();
        flaky.forced_status.store(500, Ordering::Relaxed);
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(get(&c, &proxy.url("/"), &[]).await.status.as_u16());
        }
        // Round robin gives the flaky one every other request until it is ejected.
        assert_eq!(
            statuses.iter().filter(|s| **s == 500).count(),
            3,
            "{statuses:?}"
        );
        assert!(statuses[10..].iter().all(|s| *s == 200));
        let scrape = scrape_metrics(&c, proxy.admin_addr).await;
        assert_eq!(
            m(
                &scrape,
                r#"canarygate_backend_ejections_total{pool="production"}"#
            ),
            1.0
        );
        assert_eq!(
            m(
                &scrape,
                &format!(
                    r#"canarygate_backend_up{{backend="{}",pool="production"}}"#,
                    flaky.addr
                )
            ),
            0.0
        );

        // It recovers; after the ejection it gets traffic again.
        flaky.forced_status.store(0, Ordering::Relaxed);
        let before = flaky.requests.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(900)).await;
        for _ in 0..10 {
            assert_eq!(get(&c, &proxy.url("/"), &[]).await.status, 200);
        }
        assert!(flaky.requests.load(Ordering::Relaxed) >= before + 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_while_others_are_served() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "[timeouts]\nclient_header_read_ms = 1000\n")).await;
        let addr = proxy.addr;
        let slow = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            let mut reader = stream.try_clone().unwrap();
            let started = Instant::now();
            // The reader sees the proxy close the connection (EOF or reset).
            let closed = std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let n = reader.read(&mut buf).unwrap_or(0);
                (started.elapsed(), n)
            });
            let request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
            for byte in request {
                if closed.is_finished() || stream.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            closed.join().unwrap()
        });
        let c = client();
        let started = Instant::now();
        for _ in 0..100 {
            assert_eq!(get(&c, &proxy.url("/"), &[]).await.status, 200);
        }
        let normal = started.elapsed();
        let (cut_after, bytes_before_close) = slow.await.unwrap();
        // Cut without a response being proxied (hyper may write a 408 first).
        assert!(bytes_before_close < 1024, "{bytes_before_close}");
        assert!(cut_after < Duration::from_secs(3), "slow client held on for {cut_after:?}");
        assert!(cut_after >= Duration::from_millis(900), "{cut_after:?}");
        assert!(normal < Duration::from_secs(5), "normal requests took {normal:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_smuggling_requests_are_refused() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "[limits]\nmax_header_bytes = 16384\n")).await;
        let big = "a".repeat(20_000);
        let corpus: Vec<(&str, String)> = vec![
            ("bad request line", "GET/ HTTP/1.1\r\nHost: x\r\n\r\n".into()),
            ("bad version", "GET / HTTP/9.9\r\nHost: x\r\n\r\n".into()),
            ("bad method", "G(T / HTTP/1.1\r\nHost: x\r\n\r\n".into()),
            ("bad header name", "GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n".into()),
            ("header without colon", "GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n".into()),
            ("NUL in header", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".into()),
            ("CL + TE", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into()),
            ("TE + CL", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n".into()),
            ("duplicate CL", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd".into()),
            ("conflicting CL", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".into()),
            ("CL list", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 5\r\n\r\nabcde".into()),
            ("negative CL", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".into()),
            ("TE not chunked", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".into()),
            ("TE chunked then gzip", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".into()),
            ("obs-fold", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n".into()),
            ("HTTP/1.1 without Host", "GET / HTTP/1.1\r\nX-A: 1\r\n\r\n".into()),
            ("bad chunk size", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".into()),
            ("oversized headers", format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n")),
        ];
        let addr = proxy.addr;
        let results = tokio::task::spawn_blocking(move || {
            corpus
                .into_iter()
                .map(|(name, raw)| (name, raw_exchange(addr, raw.as_bytes())))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for (name, response) in &results {
            let status_line = response.lines().next().unwrap_or("");
            assert!(
                response.is_empty() || status_line.starts_with("HTTP/1.1 4"),
                "{name}: {status_line:?}"
            );
        }
        let oversized = &results.iter().find(|(n, _)| *n == "oversized headers").unwrap().1;
        assert!(oversized.starts_with("HTTP/1.1 431"), "{oversized}");
        // None of them reached the backend, and the proxy still serves.
        assert_eq!(prod.requests.load(Ordering::Relaxed), 0);
        let c = client();
        assert_eq!(get(&c, &proxy.url("/"), &[]).await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_gives_413_and_connection_limit_queues() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            "[limits]\nmax_body_bytes = 1000\nmax_connections = 2\n",
        ))
        .await;
        let c = client();
        let post = |len: u64| {
            Request::post(proxy.url("/upload"))
                .body(PatternBody::new(len).boxed())
                .unwrap()
        };
        let small = send(&c, post(1000)).await;
        assert_eq!(
            (small.status.as_u16(), small.text().split(' ').next()),
            (200, Some("1000"))
        );
        assert_eq!(send(&c, post(1001)).await.status, 413);
        // Without a declared length (chunked), the limit still holds while streaming.
        let chunked = Request::post(proxy.url("/upload"))
            .body(
                http_body_util::StreamBody::new(futures_util::stream::iter((0..4).map(|_| {
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                        bytes::Bytes::from(vec![7u8; 400]),
                    ))
                })))
                .boxed(),
            )
            .unwrap();
        assert_eq!(send(&client(), chunked).await.status, 413);

        // Two connections are open (the pooled client's and one more): a third waits.
        let addr = proxy.addr;
        let hold = std::net::TcpStream::connect(addr).unwrap();
        let hold2 = std::net::TcpStream::connect(addr).unwrap();
        let waited = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let response = raw_exchange(
                addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            (started.elapsed(), response)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop((hold, hold2, c));
        let (elapsed, response) = waited.await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            elapsed >= Duration::from_millis(400),
            "not queued: {elapsed:?}"
        );
    })
    .await;
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made here.
fn test_certificates(
    dir: &TempDir,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    rustls::RootCertStore,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "canarygate test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let cert_path = dir.write("server.pem", &cert.pem());
    let key_path = dir.write("server.key", &key.serialize_pem());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    (cert_path, key_path, roots)
}

/// The `[server.tls]` lines for a listener on an ephemeral port with these files.
fn tls_section(cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "[server.tls]\nlisten = \"127.0.0.1:0\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// One request over TLS with the given ALPN protocol; returns (negotiated ALPN, body).
async fn tls_get(
    addr: std::net::SocketAddr,
    roots: rustls::RootCertStore,
    alpn: &[u8],
    path: &str,
) -> (Vec<u8>, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(server_name, tcp).await.unwrap();
    let negotiated = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
    let io = hyper_util::rt::TokioIo::new(tls);
    let req = Request::get(format!("https://localhost{path}"))
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = if negotiated == b"h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (negotiated, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_with_h2_and_http11_by_alpn() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let dir = TempDir::new("tls");
        let (cert, key, roots) = test_certificates(&dir);
        let proxy = ProxyProcess::spawn(
            &config_toml(&[prod.addr], &[], ""),
            &tls_section(&cert, &key),
        );
        let tls_addr = proxy.tls_addr.expect("TLS listener reported");
        for alpn in [&b"h2"[..], b"http/1.1"] {
            let (negotiated, body) =
                Box::pin(tls_get(tls_addr, roots.clone(), alpn, "/headers")).await;
            assert_eq!(negotiated, alpn);
            assert!(body.contains("x-forwarded-proto: https\n"), "{body}");
        }
        // Plain HTTP stays available on its own listener.
        let got = get(&client(), &format!("http://{}/headers", proxy.addr), &[]).await;
        assert!(got.text().contains("x-forwarded-proto: http\n"));
    })
    .await;
}

/// A TLS client connection that stays open after one request on it; and whether its
/// handshake resumed a session.
async fn tls_session(
    addr: std::net::SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    bool,
) {
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(server_name, tcp).await.unwrap();
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://localhost/")
        .header("host", "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = send.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    // Reading the answer also takes in the session tickets sent after the handshake.
    response.into_body().collect().await.unwrap();
    (send, resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_spreads_over_the_workers_and_tickets_resume_on_any_of_them_across_a_reload() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let dir = TempDir::new("tls-workers");
        let (cert, key, roots) = test_certificates(&dir);
        let mut proxy = ProxyProcess::spawn_with_workers_and(
            &config_toml(&[prod.addr], &[], ""),
            &tls_section(&cert, &key),
            2,
        );
        let tls_addr = proxy.tls_addr.expect("TLS listener reported");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);

        // Eight connections held open: the first a full handshake, the rest resumed
        // with a ticket from the one before, whichever worker issued it.
        let mut open = Vec::new();
        let mut resumed = Vec::new();
        for _ in 0..8 {
            let (conn, was_resumed) = tls_session(tls_addr, &config).await;
            open.push(conn);
            resumed.push(was_resumed);
        }
        assert_eq!(
            resumed,
            [false, true, true, true, true, true, true, true],
            "full handshake first, then resumption"
        );
        // Both workers serve TLS connections (they were on the first one only).
        let m = scrape_metrics(&client(), proxy.admin_addr).await;
        let per_worker = |w: &str| {
            m.get(&format!("canarygate_worker_connections{{worker=\"{w}\"}}"))
                .copied()
                .unwrap_or(0.0)
        };
        assert_eq!(
            (per_worker("0"), per_worker("1")),
            (4.0, 4.0),
            "eight TLS connections even over two workers"
        );

        // A reload builds a new TLS config; the ticket keys stay.
        proxy.signal("HUP");
        proxy.wait_log("config reloaded", Duration::from_secs(10));
        let (_conn, was_resumed) = tls_session(tls_addr, &config).await;
        assert!(
            was_resumed,
            "a ticket issued before the reload resumes after it"
        );
        drop(open);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_unreadable_certificate() {
    within(30, async {
        let dir = TempDir::new("tls-bad");
        let path = dir.write(
            "c.toml",
            &server_toml(
                "[server.tls]\nlisten = \"127.0.0.1:0\"\ncert_path = \"/nonexistent/cert.pem\"\nkey_path = \"/nonexistent/key.pem\"\n",
                "[pools.production]\nbackends = [\"127.0.0.1:1\"]\n",
            ),
        );
        let out = std::process::Command::new(binary()).args(["run", "--config"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(64));
        assert!(String::from_utf8_lossy(&out.stderr).contains("server.tls.cert_path /nonexistent/cert.pem"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_config_and_refuses_a_broken_one() {
    within(60, async {
        let (prod, canary) = two_pools().await;
        let pools = config_toml(&[prod.addr], &[canary.addr], "");
        let toml = |percent: u32| {
            format!("{pools}[routing]\nsticky = \"none\"\ncanary_percent = {percent}\n")
        };
        let mut proxy = ProxyProcess::spawn(&toml(0), "");
        let c = client();
        let admin = proxy.admin_addr;

        // A steady loop, with slow requests in flight across the reload.
        let url = format!("http://{}/sleep?ms=150", proxy.addr);
        let loop_task = {
            let url = url.clone();
            tokio::spawn(async move {
                let mut tasks = Vec::new();
                for _ in 0..4 {
                    let url = url.clone();
                    tasks.push(tokio::spawn(async move {
                        let c = client();
                        let mut failures = 0;
                        for _ in 0..12 {
                            match try_get(&c, &url).await {
                                Ok(g) if g.status == 200 => {}
                                _ => failures += 1,
                            }
                        }
                        failures
                    }));
                }
                let mut failures = 0;
                for t in tasks {
                    failures += t.await.unwrap();
                }
                failures
            })
        };
        // Reload while all four loops have a slow request in flight.
        proxy.wait_in_flight(4.0).await;
        std::fs::write(&proxy.config_path, server_toml("", &toml(100))).unwrap();
        proxy.signal("HUP");
        proxy.wait_log("config reloaded", Duration::from_secs(5));
        assert_eq!(
            loop_task.await.unwrap(),
            0,
            "requests failed across the reload"
        );
        for _ in 0..20 {
            assert_eq!(
                get(&c, &format!("http://{}/", proxy.addr), &[])
                    .await
                    .pool(),
                "canary"
            );
        }

        // A broken config is refused; the running one stays.
        std::fs::write(&proxy.config_path, "[routing]\ncanary_percent = 500\n").unwrap();
        proxy.signal("HUP");
        let line = proxy.wait_log("config reload refused", Duration::from_secs(5));
        assert!(
            line.contains("canary_percent") || line.contains("pools"),
            "{line}"
        );
        for _ in 0..20 {
            assert_eq!(
                get(&c, &format!("http://{}/", proxy.addr), &[])
                    .await
                    .pool(),
                "canary"
            );
        }
        let scrape = scrape_metrics(&c, admin).await;
        assert_eq!(
            m(
                &scrape,
                r#"canarygate_config_reloads_total{result="success"}"#
            ),
            1.0
        );
        assert_eq!(
            m(
                &scrape,
                r#"canarygate_config_reloads_total{result="failure"}"#
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_503_for_the_drain_delay_while_still_serving() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let mut proxy =
            ProxyProcess::spawn(&config_toml(&[prod.addr], &[], ""), "drain_delay_ms = 800");
        let c = client();
        proxy.signal("TERM");
        let readyz = format!("http://{}/readyz", proxy.admin_addr);
        eventually(Duration::from_secs(5), "/readyz says 503", || async {
            get(&c, &readyz, &[]).await.status == 503
        })
        .await;
        // Still serving during the delay.
        assert_eq!(
            get(&c, &format!("http://{}/", proxy.addr), &[])
                .await
                .status,
            200
        );
        let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(0));
    })
    .await;
}
