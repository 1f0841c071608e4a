//! The admin listener: exact metrics under real traffic, `promtool` on a real scrape,
//! a real Prometheus server scraping it, readiness during a drain, and the status page
//! in headless Chromium.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt as _;
use support::*;

async fn scrape(c: &TestClient, admin: std::net::SocketAddr) -> (String, HashMap<String, f64>) {
    let got = get(c, &format!("http://{admin}/metrics"), &[]).await;
    assert_eq!(got.status, 200);
    assert!(
        got.header("content-type")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = got.text().to_owned();
    let parsed = parse_scrape(&text);
    (text, parsed)
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in scrape"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_the_traffic_exactly() {
    within(60, async {
        let (prod, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[canary.addr],
            "[routing]\nsticky = \"none\"\n",
        ))
        .await;
        let c = client();
        for _ in 0..37 {
            assert_eq!(
                get(&c, &proxy.url("/"), &[("x-canary", "always")])
                    .await
                    .status,
                200
            );
        }
        for _ in 0..11 {
            assert_eq!(
                get(&c, &proxy.url("/status?code=503"), &[("x-canary", "never")])
                    .await
                    .status,
                503
            );
        }
        for _ in 0..4 {
            let got = get(
                &c,
                &proxy.url("/status?code=404"),
                &[("x-canary", "always")],
            )
            .await;
            assert_eq!(got.status, 404);
        }
        for _ in 0..3 {
            let req = Request::post(proxy.url("/"))
                .header("x-canary", "never")
                .body(
                    http_body_util::Full::new(bytes::Bytes::from_static(b"x"))
                        .map_err(|e| match e {})
                        .boxed(),
                )
                .unwrap();
            assert_eq!(send(&c, req).await.status, 200);
        }
        let req = Request::builder()
            .method("PURGE")
            .uri(proxy.url("/"))
            .header("x-canary", "never")
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        assert_eq!(send(&c, req).await.status, 200);

        let (_, m) = scrape(&c, proxy.admin_addr).await;
        let expected = [
            (
                r#"canarygate_requests_total{code="200",method="GET",pool="canary"}"#,
                37.0,
            ),
            (
                r#"canarygate_requests_total{code="404",method="GET",pool="canary"}"#,
                4.0,
            ),
            (
                r#"canarygate_requests_total{code="503",method="GET",pool="production"}"#,
                11.0,
            ),
            (
                r#"canarygate_requests_total{code="200",method="POST",pool="production"}"#,
                3.0,
            ),
            (
                r#"canarygate_requests_total{code="200",method="OTHER",pool="production"}"#,
                1.0,
            ),
            (
                r#"canarygate_request_duration_seconds_count{pool="canary"}"#,
                41.0,
            ),
            (
                r#"canarygate_request_duration_seconds_count{pool="production"}"#,
                15.0,
            ),
            (
                r#"canarygate_request_duration_seconds_bucket{pool="canary",le="+Inf"}"#,
                41.0,
            ),
            (r#"canarygate_in_flight_requests{pool="canary"}"#, 0.0),
            ("canarygate_canary_percent", 33.0),
            ("canarygate_flags_version", 1.0),
            ("canarygate_flag_store_up", 0.0),
            (
                &format!(
                    "canarygate_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                ),
                1.0,
            ),
        ];
        for (series, want) in expected {
            assert_eq!(value(&m, series), want, "{series}");
        }
        let requests: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("canarygate_requests_total{"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(requests, 56.0, "no other request series");
        // The test client keeps one connection alive.
        assert!(value(&m, "canarygate_client_connections") >= 1.0);
        assert!(value(&m, "process_resident_memory_bytes") > 1e6);
        assert!(m.contains_key("process_cpu_seconds_total"));
        assert!(m.contains_key("process_open_fds"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_and_in_flight_are_counted() {
    within(60, async {
        let dead = dead_addr().await;
        let slow = TestBackend::start("canary").await;
        let proxy = Proxy::start(&config_toml(
            &[dead],
            &[slow.addr],
            "[timeouts]\nresponse_header_ms = 300\n",
        ))
        .await;
        let c = client();
        for _ in 0..2 {
            assert_eq!(
                get(&c, &proxy.url("/"), &[("x-canary", "never")])
                    .await
                    .status,
                502
            );
        }
        assert_eq!(
            get(&c, &proxy.url("/sleep?ms=2000"), &[("x-canary", "always")])
                .await
                .status,
            504
        );

        // A request in flight shows in the gauge while it runs.
        let url = proxy.url("/sleep?ms=250");
        let in_flight =
            tokio::spawn(async move { get(&client(), &url, &[("x-canary", "always")]).await });
        proxy.wait_in_flight(1).await;
        let (_, m) = scrape(&c, proxy.admin_addr).await;
        assert_eq!(
            value(&m, r#"canarygate_in_flight_requests{pool="canary"}"#),
            1.0
        );
        assert_eq!(in_flight.await.unwrap().status, 200);

        let (_, m) = scrape(&c, proxy.admin_addr).await;
        assert_eq!(
            value(
                &m,
                r#"canarygate_upstream_errors_total{kind="connect",pool="production"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                &m,
                r#"canarygate_upstream_errors_total{kind="timeout",pool="canary"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &m,
                r#"canarygate_upstream_errors_total{kind="reset",pool="canary"}"#
            ),
            0.0
        );
        assert_eq!(
            value(
                &m,
                r#"canarygate_requests_total{code="502",method="GET",pool="production"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                &m,
                r#"canarygate_requests_total{code="504",method="GET",pool="canary"}"#
            ),
            1.0
        );
        assert_eq!(
            value(&m, r#"canarygate_in_flight_requests{pool="canary"}"#),
            0.0
        );
    })
    .await;
}

fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is required: apt-get install -y {package} (.ci/run installs it)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape_and_the_shipped_rules() {
    within(60, async {
        require("promtool", "prometheus");
        let redis = RedisServer::start();
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            &format!("[flags]\nredis_url = \"{}\"\npoll_ms = 100\n", redis.url()),
        ))
        .await;
        redis.cli(&[
            "HSET",
            "canarygate:flags",
            "a",
            "on",
            "b",
            "off",
            "canary_percent",
            "oops",
        ]);
        let c = client();
        eventually(Duration::from_secs(5), "flags read", || {
            let ok = proxy.state.snapshot().flags.set.values.len() == 2;
            async move { ok }
        })
        .await;
        for _ in 0..5 {
            get(&c, &proxy.url("/"), &[]).await;
        }
        let (text, m) = scrape(&c, proxy.admin_addr).await;
        assert_eq!(value(&m, r#"canarygate_flag_enabled{flag="a"}"#), 1.0);
        assert_eq!(value(&m, r#"canarygate_flag_enabled{flag="b"}"#), 0.0);
        assert_eq!(value(&m, "canarygate_flag_store_up"), 1.0);
        assert_eq!(
            value(
                &m,
                r#"canarygate_flag_rejected_total{field="canary_percent"}"#
            ),
            1.0
        );

        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
        for args in [
            ["check", "config", "prometheus.yml"],
            ["test", "rules", "alerts_test.yml"],
        ] {
            let out = Command::new("promtool")
                .args(args)
                .current_dir(&deploy)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "promtool {args:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    })
    .await;
}

#[test]
fn grafana_dashboard_only_uses_exported_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/canarygate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let metrics = canarygate::observe::metrics::Metrics::new();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("canarygate_") || w.starts_with("process_"))
            {
                let base = name.trim_end_matches("_bucket");
                assert!(
                    metrics.names().iter().any(|n| n == base),
                    "{name} in panel {}",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "{checked}");
}

/// A Prometheus server child process; killed by PID on drop.
struct PrometheusServer {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_admin_port() {
    within(90, async {
        require("prometheus", "prometheus");
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let c = client();
        for _ in 0..7 {
            get(&c, &proxy.url("/"), &[]).await;
        }
        let dir = TempDir::new("prometheus");
        let config = dir.write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: canarygate\n    static_configs:\n      - targets: [\"{}\"]\n",
                proxy.admin_addr
            ),
        );
        let port = free_port();
        let server = PrometheusServer {
            child: Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            port,
            _dir: dir,
        };
        let query = format!(
            "http://127.0.0.1:{}/api/v1/query?query=canarygate_requests_total",
            server.port
        );
        let mut last = serde_json::Value::Null;
        for _ in 0..300 {
            if let Ok(got) = try_get(&c, &query).await
                && got.status == 200
            {
                last = serde_json::from_slice(&got.body).unwrap();
                if last["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let result = &last["data"]["result"][0];
        assert_eq!(result["metric"]["__name__"], "canarygate_requests_total", "{last}");
        assert_eq!(result["metric"]["pool"], "production");
        assert_eq!(result["metric"]["code"], "200");
        assert_eq!(result["value"][1], "7");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_draining() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let mut proxy = ProxyProcess::spawn(
            &config_toml(&[prod.addr], &[], ""),
            "drain_timeout_ms = 5000",
        );
        let c = client();
        let admin = proxy.admin_addr;
        assert_eq!(
            get(&c, &format!("http://{admin}/readyz"), &[]).await.status,
            200
        );
        assert_eq!(
            get(&c, &format!("http://{admin}/healthz"), &[])
                .await
                .text(),
            "ok\n"
        );
        let url = format!("http://{}/sleep?ms=1500", proxy.addr);
        let slow = tokio::spawn(async move { get(&client(), &url, &[]).await });
        proxy.wait_in_flight(1.0).await;
        proxy.signal("TERM");
        proxy.wait_log("stopped accepting", Duration::from_secs(5));
        let ready = get(&client(), &format!("http://{admin}/readyz"), &[]).await;
        assert_eq!((ready.status.as_u16(), ready.text()), (503, "draining\n"));
        let events = get_json(&client(), &format!("http://{admin}/events")).await;
        assert!(
            events["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["message"].as_str().unwrap().contains("draining")),
            "{events}"
        );
        assert_eq!(slow.await.unwrap().status, 200);
        let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(0));
    })
    .await;
}

#[test]
fn unknown_admin_paths_and_methods() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let c = client();
        let admin = proxy.admin_addr;
        assert_eq!(
            get(&c, &format!("http://{admin}/nope"), &[]).await.status,
            404
        );
        let req = Request::post(format!("http://{admin}/metrics"))
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        assert_eq!(send(&c, req).await.status, 405);
        // The admin port never proxies.
        assert_eq!(
            get(&c, &format!("http://{admin}/"), &[])
                .await
                .header("x-canarygate-pool"),
            ""
        );
    });
}

/// Runs headless Chromium on `url`: writes a screenshot and returns the console lines.
fn chromium(url: &str, screenshot: &Path) -> Vec<String> {
    let profile = TempDir::new("chromium");
    let out = headless_chromium(&profile)
        .args([
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,1100",
        ])
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium_without_console_errors() {
    within(90, async {
        require("chromium", "chromium");
        let redis = RedisServer::start();
        let (prod, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[canary.addr],
            &format!(
                "[routing]\nsticky = \"none\"\n[flags]\nredis_url = \"{}\"\npoll_ms = 100\n",
                redis.url()
            ),
        ))
        .await;
        redis.cli(&[
            "HSET",
            "canarygate:flags",
            "new_banner",
            "on",
            "canary_percent",
            "25",
        ]);
        let c = client();
        for i in 0..200 {
            let path = if i % 10 == 0 { "/status?code=500" } else { "/" };
            get(&c, &proxy.url(path), &[]).await;
        }
        // The page as served: self-contained and carrying the numbers.
        let page = get(&c, &format!("http://{}/", proxy.admin_addr), &[]).await;
        let html = page.text();
        assert!(page.header("content-type").starts_with("text/html"));
        for needle in [
            "<meta http-equiv=\"refresh\"",
            "<svg id=\"chart\"",
            "new_banner",
            "production",
            "canary",
            "observed canary share",
            "25%",
        ] {
            assert!(html.contains(needle), "missing {needle}");
        }
        for external in ["<script", "src=\"http", "href=\"http", "@import", "url("] {
            assert!(
                !html.contains(external),
                "page loads something external: {external}"
            );
        }

        let screenshot = artifacts_dir().join("status-page.png");
        let _ = std::fs::remove_file(&screenshot);
        let url = format!("http://{}/", proxy.admin_addr);
        let (console, shot) = tokio::task::spawn_blocking({
            let screenshot = screenshot.clone();
            move || {
                let console = chromium(&url, &screenshot);
                (console, std::fs::read(&screenshot).unwrap_or_default())
            }
        })
        .await
        .unwrap();
        assert!(console.is_empty(), "console messages: {console:#?}");
        assert!(
            shot.starts_with(b"\x89PNG") && shot.len() > 10_000,
            "screenshot at {}",
            screenshot.display()
        );

        // The console check itself can fail: a page with an error is caught.
        let bad = tokio::task::spawn_blocking(|| {
            let dir = TempDir::new("bad-page");
            chromium(
                "data:text/html,<script>console.error('boom')</script>",
                &dir.0.join("x.png"),
            )
        })
        .await
        .unwrap();
        assert!(bad.iter().any(|l| l.contains("boom")), "{bad:?}");
    })
    .await;
}
