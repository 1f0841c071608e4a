//! The real binary as a child process: config errors and exit codes, signals and
//! drain, memory while streaming large bodies, and the `backend` and `demo` commands.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use support::*;

fn check(config: &str) -> (i32, String) {
    let dir = TempDir::new("check");
    let path = dir.write("bad.toml", config);
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(path.to_str().unwrap(), "FILE");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn check_names_file_line_and_key_and_exits_64() {
    let good = "[pools.production]\nbackends = [\"127.0.0.1:3001\"]\n";
    let (code, _) = check(good);
    assert_eq!(code, 0);

    let cases = [
        (
            format!("{good}[routing]\ncanary_percent = 150\n"),
            "FILE:4: key `routing.canary_percent`: 150 is out of range",
        ),
        (
            format!("{good}[routing]\nstickyness = \"ip\"\n"),
            "FILE:4: key `routing.stickyness`: unknown field `stickyness`",
        ),
        (
            "[server]\nlisten = \"localhost\"\n".to_owned() + good,
            "FILE:2: key `server.listen`",
        ),
        (
            "[pools.production]\nbackends = []\n".to_owned(),
            "FILE:2: key `pools.production.backends`: the production pool is empty",
        ),
        (
            format!("{good}[routing]\nsticky = \"session\"\n"),
            "FILE:4: key `routing.sticky`",
        ),
        ("[pools.production\nbackends = []\n".to_owned(), "FILE:1:"),
    ];
    for (config, expected) in cases {
        let (code, stderr) = check(&config);
        assert_eq!(code, 64, "config:\n{config}\nstderr: {stderr}");
        assert!(
            stderr.contains(expected),
            "expected `{expected}` in: {stderr}"
        );
    }

    let out = Command::new(binary())
        .args(["check", "--config", "/nonexistent/canarygate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("/nonexistent/canarygate.toml: cannot read config")
    );
}

#[test]
fn run_refuses_a_bad_config_before_binding() {
    // The listen port is taken: had `run` bound first it would fail on the bind, not
    // on the config.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = TempDir::new("run-bad");
    let path = dir.write(
        "c.toml",
        &format!(
            "[server]\nlisten = \"{}\"\n[pools.production]\nbackends = [\"127.0.0.1:1\"]\n[routing]\ncanary_percent = 101\n",
            taken.local_addr().unwrap()
        ),
    );
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":6: key `routing.canary_percent`"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_then_exits_0() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let mut proxy = ProxyProcess::spawn(
            &config_toml(&[prod.addr], &[], ""),
            "drain_timeout_ms = 5000",
        );
        let url = format!("http://{}/sleep?ms=1500", proxy.addr);
        let slow = tokio::spawn(async move { get(&client(), &url, &[]).await });
        proxy.wait_in_flight(1.0).await;
        proxy.signal("TERM");
        proxy.wait_log("stopped accepting", Duration::from_secs(5));
        // New connections are refused while the old request drains (every worker's
        // listener closes on the same signal; each logs its own line).
        let addr = proxy.addr;
        eventually(
            Duration::from_secs(1),
            "all listeners closed",
            || async move { tokio::net::TcpStream::connect(addr).await.is_err() },
        )
        .await;
        let got = slow.await.unwrap();
        assert_eq!((got.status.as_u16(), got.text()), (200, "slept"));
        let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("proxy exited");
        assert_eq!(status.code(), Some(0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_cuts_requests_that_run_too_long() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let mut proxy = ProxyProcess::spawn(
            &config_toml(&[prod.addr], &[], ""),
            "drain_timeout_ms = 300",
        );
        let url = format!("http://{}/sleep?ms=10000", proxy.addr);
        let slow = tokio::spawn(async move {
            client()
                .request(
                    Request::get(url)
                        .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
                        .unwrap(),
                )
                .await
        });
        proxy.wait_in_flight(1.0).await;
        let started = std::time::Instant::now();
        proxy.signal("TERM");
        let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(5)))
            .await
            .unwrap()
            .expect("proxy exited within the drain timeout");
        assert_eq!(status.code(), Some(0));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(
            slow.await.unwrap().is_err(),
            "the cut request cannot have succeeded"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_intact_in_bounded_memory() {
    within(120, async {
        const SIZE: u64 = 64 * 1024 * 1024;
        let prod = TestBackend::start("production").await;
        let proxy = ProxyProcess::spawn(&config_toml(&[prod.addr], &[], ""), "");
        let expected = PatternBody::sha256(SIZE);
        let c = client();

        // Upload: the backend hashes what it received.
        let req = Request::post(format!("http://{}/upload", proxy.addr))
            .body(PatternBody::new(SIZE).boxed())
            .unwrap();
        let got = send(&c, req).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), format!("{SIZE} {expected}"));

        // Download: hash it here chunk by chunk, never holding it whole.
        let req = Request::get(format!("http://{}/download?bytes={SIZE}", proxy.addr))
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let response = c.request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let mut len = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.unwrap().data_ref() {
                len += data.len() as u64;
                sha2::Digest::update(&mut hasher, data);
            }
        }
        assert_eq!(len, SIZE);
        assert_eq!(hex(&sha2::Digest::finalize(hasher)), expected);

        let peak = proxy.peak_rss_bytes();
        eprintln!(
            "proxy peak RSS after 64 MiB up and down: {} KiB",
            peak / 1024
        );
        assert!(
            peak < 64 * 1024 * 1024,
            "proxy peak RSS {} MiB",
            peak / 1024 / 1024
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_command_serves_the_demo_app() {
    within(30, async {
        let backend = BackendProcess::spawn_with("canary", &["--app-version", "v2"]);
        let addr = backend.addr;
        let c = client();
        let page = get(&c, &format!("http://{addr}/"), &[]).await;
        assert_eq!(page.status, 200);
        assert_eq!(page.header("x-backend"), "canary");
        assert!(page.header("content-type").starts_with("text/html"));
        assert!(
            page.text().contains("Hello from canary (v2)"),
            "{}",
            page.text()
        );
        let health = get(&c, &format!("http://{addr}/health"), &[]).await;
        assert_eq!((health.status.as_u16(), health.text()), (200, "ok\n"));
        // The demo's broken canary: with the flag on, one page in three is a 500,
        // and /health stays up.
        let broken = [("x-feature-flags", "new_banner=off;demo_canary_errors=on")];
        let mut errors = 0;
        for _ in 0..30 {
            let page = get(&c, &format!("http://{addr}/"), &broken).await;
            if page.status == 500 {
                errors += 1;
            }
            let health = get(&c, &format!("http://{addr}/health"), &broken).await;
            assert_eq!(health.status, 200);
        }
        assert_eq!(errors, 10);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_splits_two_to_one_and_stops_on_ctrl_c() {
    within(60, async {
        let mut child = Command::new(binary())
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut url = None;
        let mut admin = None;
        for line in lines.by_ref().take(4) {
            let line = line.unwrap();
            let field = |l: &str| l.split_whitespace().nth(1).unwrap().to_owned();
            if line.trim_start().starts_with("proxy") {
                url = Some(field(&line));
            } else if line.trim_start().starts_with("admin") {
                admin = Some(field(&line));
            }
        }
        let (url, admin) = (
            url.expect("proxy url printed"),
            admin.expect("admin url printed"),
        );
        let c = client();
        let mut v1 = 0;
        for _ in 0..300 {
            let page = get(&c, &url, &[]).await;
            assert_eq!(page.status, 200);
            if page.text().contains("(v1)") {
                v1 += 1;
            } else {
                assert!(page.text().contains("(v2)"));
            }
        }
        assert!((170..=230).contains(&v1), "{v1} of 300 on v1");
        assert_eq!(get(&c, &admin, &[]).await.text(), "ok\n");

        let kill = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert_eq!(status.code(), Some(0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_spread_evenly_over_the_workers() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let proxy = ProxyProcess::spawn_with_workers(&config_toml(&[prod.addr], &[], ""), 3);
        // 30 keep-alive connections opened one after another. SO_REUSEPORT's hash
        // alone would leave them uneven over the 3 workers.
        let mut senders = Vec::new();
        for _ in 0..30 {
            let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let response = sender.send_request(get_static()).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
            senders.push(sender);
        }
        let scrape = scrape_metrics(&client(), proxy.admin_addr).await;
        let per_worker: Vec<f64> = (0..3)
            .map(|w| scrape[&format!("canarygate_worker_connections{{worker=\"{w}\"}}")])
            .collect();
        assert_eq!(per_worker, [10.0, 10.0, 10.0]);
        assert_eq!(scrape["canarygate_client_connections"], 30.0);
        assert!(scrape["canarygate_connections_handed_off_total"] >= 1.0);
        // Handed-off connections serve like any other, on their new worker.
        for sender in &mut senders {
            let response = sender.send_request(get_static()).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["x-canarygate-pool"], "production");
            response.into_body().collect().await.unwrap();
        }
    })
    .await;
}

fn get_static() -> Request<http_body_util::Empty<bytes::Bytes>> {
    Request::get("/static")
        .header("host", "test")
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    // As a new user would: `canarygate demo > demo.log` (here: the text log of
    // `canarygate backend` read through a pipe) must be plain text.
    let mut child = std::process::Command::new(binary())
        .args(["backend", "--listen", "127.0.0.1:0", "--name", "plain"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn canarygate backend");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("a log line");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("backend listening"), "{line:?}");
    assert!(line.contains(" INFO "), "{line:?}");
    assert!(
        !line.contains('\u{1b}'),
        "colour codes in a piped log: {line:?}"
    );
}

/// A log that can no longer be written (journald restarted, the pipe's reader gone)
/// loses its lines and nothing else: tracing-subscriber's complaint about a failed
/// write panicked the task that logged, the SIGTERM handler among them, and the proxy
/// never stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_loses_log_lines_but_not_requests_or_the_shutdown() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let mut proxy = PipedProxy::spawn(&config_toml(&[prod.addr], &[], ""), "");
        drop(proxy.stderr.take());
        let addr = proxy.addr;
        let c = client();
        for _ in 0..5 {
            assert_eq!(get(&c, &format!("http://{addr}/"), &[]).await.status, 200);
        }
        let exited = terminate(proxy.child, Duration::from_secs(20)).await;
        assert_eq!(exited.and_then(|s| s.code()), Some(0), "stopped, cleanly");
    })
    .await;
}
