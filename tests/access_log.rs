//! The access log (issue 22): on standard output by default, in the combined and
//! JSON formats to a file, and never a stall: a writer that cannot write makes the
//! proxy drop lines and count them while every request is answered.

mod support;

use std::io::{BufRead as _, BufReader};
use std::time::Duration;

use support::*;

/// The binary with `toml`, standard output piped to the test, its log drained.
fn run(toml: &str, server_extra: &str) -> PipedProxy {
    let mut proxy = PipedProxy::spawn(toml, server_extra);
    // Drained, so the proxy's own log never waits on the test.
    let stderr = proxy.stderr.take().unwrap();
    std::thread::spawn(move || for _ in stderr.lines() {});
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_each_request_is_one_line_on_standard_output() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let mut proxy = run(&config_toml(&[prod.addr], &[], ""), "");
        let c = client();
        for i in 0..3 {
            let got = get(
                &c,
                &format!("http://{}/page?q={i}", proxy.addr),
                &[("x-request-id", &format!("stdout-{i}")), ("x-canary", "never")],
            )
            .await;
            assert_eq!(got.status, 200);
        }
        let stdout = proxy.stdout.take().unwrap();
        let mut lines = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .take(3)
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        // Each worker thread writes its own buffer: lines of requests served by two
        // workers (the client may open a second connection) can come out of order.
        lines.sort_by_key(|line| line.rsplit(' ').next().unwrap_or("").to_owned());
        for (i, line) in lines.iter().enumerate() {
            assert!(
                line.ends_with(&format!(
                    " 127.0.0.1 \"GET /page?q={i} HTTP/1.1\" 200 production override {} {} stdout-{i}",
                    prod.addr,
                    line.split(' ').nth_back(1).unwrap()
                )),
                "{line}"
            );
            let duration: u64 = line.split(' ').nth_back(1).unwrap().parse().unwrap();
            assert!(duration > 0, "{line}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_and_json_lines_to_a_file() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let canary = TestBackend::start("canary").await;
        let dir = TempDir::new("access-log-formats");
        for format in ["combined", "json"] {
            let path = dir.0.join(format!("{format}.log"));
            let proxy = Proxy::start(&config_toml(
                &[prod.addr],
                &[canary.addr],
                &format!(
                    "[server]\naccess_log = \"{}\"\naccess_log_format = \"{format}\"\n",
                    path.display()
                ),
            ))
            .await;
            let c = client();
            let got = get(
                &c,
                &proxy.url("/a%20b?x=1"),
                &[
                    ("user-agent", "agent \"007\""),
                    ("referer", "https://example.com/from"),
                    ("x-canary", "always"),
                ],
            )
            .await;
            assert_eq!(got.status, 200);
            let request_id = got.header("x-request-id").to_owned();
            let length = got.header("content-length").to_owned();
            let text = {
                let path = path.clone();
                eventually(Duration::from_secs(5), "the line is written", || {
                    let path = path.clone();
                    async move { std::fs::read_to_string(&path).is_ok_and(|t| t.ends_with('\n')) }
                })
                .await;
                std::fs::read_to_string(&path).unwrap()
            };
            assert_eq!(text.lines().count(), 1, "{text}");
            let line = text.trim_end();
            if format == "combined" {
                // `%h %l %u [%t] "%r" %>s %b "%{Referer}i" "%{User-agent}i"`
                let (head, rest) = line.split_once(" [").unwrap();
                assert_eq!(head, "127.0.0.1 - -");
                let (time, rest) = rest.split_once("] ").unwrap();
                assert_eq!(time.len(), 26, "{time}");
                assert!(time.ends_with(" +0000") && time.as_bytes()[2] == b'/', "{time}");
                assert_eq!(
                    rest,
                    format!(
                        "\"GET /a%20b?x=1 HTTP/1.1\" 200 {length} \"https://example.com/from\" \"agent\\x20\\x22007\\x22\""
                    )
                );
            } else {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["target"], "/a%20b?x=1");
                assert_eq!(v["method"], "GET");
                assert_eq!(v["protocol"], "HTTP/1.1");
                assert_eq!(v["status"], 200);
                assert_eq!(v["bytes"].to_string(), length);
                assert_eq!(v["pool"], "canary");
                assert_eq!(v["reason"], "override");
                assert_eq!(v["backend"], canary.addr.to_string());
                assert_eq!(v["request_id"], request_id);
                assert_eq!(v["user_agent"], "agent \"007\"");
                assert_eq!(v["referer"], "https://example.com/from");
                assert_eq!(v["client"], "127.0.0.1");
                let time = v["time"].as_str().unwrap();
                assert!(time.len() == 24 && time.ends_with('Z'), "{time}");
            }
            proxy.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_cannot_write_drops_counted_lines_and_no_request_waits() {
    within(120, async {
        let prod = TestBackend::start("production").await;
        // Standard output is a pipe nobody reads: it fills (64 KiB), the writer
        // blocks on it, its queue fills (4 MiB), and then lines must be dropped.
        // Long user agents make each line about 4 KiB, so that is some 1,100 lines.
        let proxy = run(
            &config_toml(&[prod.addr], &[], ""),
            "access_log_format = \"combined\"\n",
        );
        let agent = "a".repeat(4000);
        let c = client();
        let url = format!("http://{}/", proxy.addr);
        for _ in 0..2000 {
            let got = get(&c, &url, &[("user-agent", &agent)]).await;
            assert_eq!(got.status, 200);
        }
        let m = scrape_metrics(&c, proxy.admin).await;
        let dropped = m["canarygate_log_dropped_total"];
        assert!(
            (100.0..2000.0).contains(&dropped),
            "lines dropped, not waited for: {dropped}"
        );
        // And the shutdown is not held by the blocked writer.
        let status = terminate(proxy.child, Duration::from_secs(20)).await;
        let status = status.expect("the proxy exits though its stdout is stuck");
        assert_eq!(status.code(), Some(0));
        drop(proxy.stdout);
    })
    .await;
}
