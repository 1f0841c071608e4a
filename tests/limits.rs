//! Limits an operator does not have to know about (issue 29, item 5), against the
//! real binary and real sockets: the proxy raises its soft descriptor limit to what
//! `max_connections` needs, and the side listeners (admin, SMS, the co-located
//! processes' metrics) have their own small connection cap and header limit.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use canarygate::server::accept::{SIDE_MAX_CONNECTIONS, SIDE_MAX_HEADER_BYTES};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one keep-alive `GET /` on `stream` and reads the whole answer; its status.
async fn exchange(stream: &mut TcpStream, extra_headers: &str) -> std::io::Result<u16> {
    let request = format!("GET / HTTP/1.1\r\nhost: limits.test\r\n{extra_headers}\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Ok(status);
        }
    }
}

/// A new connection to `addr` that got one answer and is held open.
async fn held_client(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(15), exchange(&mut stream, "")).await {
        Ok(Ok(200)) => Ok(stream),
        Ok(Ok(status)) => Err(format!("status {status}")),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer within 15 s".to_owned()),
    }
}

/// The soft limit of `pid`'s open files, from /proc.
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Issue 29: under systemd's default soft limit of 1024, 1,006 of 3,000 held
/// keep-alive clients were answered. The proxy now raises the soft limit to what
/// `max_connections` needs (up to the hard limit) at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_held_keepalive_clients_under_a_1024_soft_limit_are_all_answered() {
    const CLIENTS: usize = 3_000;
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(1 << 20);
    // This test holds the clients' ends itself.
    assert!(
        hard >= 2 * CLIENTS as u64 + 1_024,
        "hard RLIMIT_NOFILE {hard} too low for the test"
    );
    within(180, async {
        let backend = TestBackend::start("production").await;
        // 2 x 4,000 + 1,024 = 9,024 descriptors needed: under the hard limit.
        let toml = format!(
            "[limits]\nmax_connections = 4000\n[pools.production]\nbackends = [\"{}\"]\n",
            backend.addr
        );
        let nofile = format!("--nofile=1024:{hard}");
        let proxy = ProxyProcess::spawn_under(&["prlimit", &nofile, "--"], &toml, "");
        let line = proxy
            .startup_log
            .iter()
            .find(|l| l.contains("RLIMIT_NOFILE"))
            .expect("the start-up log says what it did to RLIMIT_NOFILE");
        assert!(line.contains("\"soft_before\":1024"), "{line}");
        assert_eq!(soft_nofile(proxy.pid()), 9_024);

        let addr = proxy.addr;
        let mut held = Vec::with_capacity(CLIENTS);
        let mut failed = Vec::new();
        // 100 connecting at a time; every one stays open once answered.
        for batch in 0..CLIENTS / 100 {
            let tasks: Vec<_> = (0..100).map(|_| tokio::spawn(held_client(addr))).collect();
            for task in tasks {
                match task.await.unwrap() {
                    Ok(stream) => held.push(stream),
                    Err(e) => failed.push(format!("batch {batch}: {e}")),
                }
            }
            if failed.len() > 10 {
                break;
            }
        }
        assert!(
            failed.is_empty(),
            "{} answered, {} failed, first: {:?}",
            held.len(),
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        assert_eq!(held.len(), CLIENTS);
        // Held connections still answer a second request.
        for stream in held.iter_mut().step_by(300) {
            assert_eq!(exchange(stream, "").await.unwrap(), 200);
        }
        drop(held);
        drop(proxy);
    })
    .await;
}

/// Issue 29: the admin listener had no connection cap. Past
/// [`SIDE_MAX_CONNECTIONS`] a new connection is closed at once; the proxy's data
/// path is untouched; headers past [`SIDE_MAX_HEADER_BYTES`] are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_closes_connections_past_its_cap_and_the_proxy_serves_on() {
    within(60, async {
        let (production, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(&[production.addr], &[canary.addr], "")).await;
        let admin = proxy.admin_addr;

        // Headers past the side limit: 431, well before the proxy's 64 KiB.
        let mut stream = TcpStream::connect(admin).await.unwrap();
        let big = format!("x-filler: {}\r\n", "a".repeat(SIDE_MAX_HEADER_BYTES + 1024));
        let status = exchange(&mut stream, &big).await.unwrap_or(0);
        assert_eq!(status, 431);
        drop(stream);

        // Fill the cap with answered, held keep-alive connections (the one above
        // may take a moment to be released).
        let mut held = Vec::new();
        while held.len() < SIDE_MAX_CONNECTIONS {
            match held_client(admin).await {
                Ok(stream) => held.push(stream),
                Err(e) => {
                    assert!(
                        held.len() + 1 >= SIDE_MAX_CONNECTIONS,
                        "{} held: {e}",
                        held.len()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        // Past the cap: accepted and closed at once, never answered.
        for _ in 0..20 {
            let mut extra = TcpStream::connect(admin).await.unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(5), exchange(&mut extra, ""))
                .await
                .expect("closed at once, not left waiting");
            assert!(answer.is_err(), "answered past the cap: {answer:?}");
        }
        // The data path is untouched.
        let c = client();
        for _ in 0..20 {
            assert_eq!(get(&c, &proxy.url("/"), &[]).await.status, 200);
        }
        // One held connection closes: there is room again.
        drop(held.pop());
        eventually(
            Duration::from_secs(5),
            "room on the admin listener",
            || async { held_client(admin).await.is_ok() },
        )
        .await;
        drop(held);
        proxy.stop().await;
    })
    .await;
}

/// Issue 29: a hard limit below what `max_connections` needs cannot be raised
/// without privilege; `check` and the start-up log say so, with what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_limit_too_low_is_named_by_check_and_at_start() {
    within(60, async {
        let backend = TestBackend::start("production").await;
        // The default max_connections (10,000) needs 21,024; the hard limit is 2,048.
        let toml = format!("[pools.production]\nbackends = [\"{}\"]\n", backend.addr);
        let dir = TempDir::new("nofile-check");
        let path = dir.write("canarygate.toml", &toml);
        let out = std::process::Command::new("prlimit")
            .args(["--nofile=1024:2048", "--", binary(), "check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("needs 21024 file descriptors; the hard limit here is 2048")
                && stderr.contains("LimitNOFILE=21024"),
            "{stderr}"
        );

        let proxy = ProxyProcess::spawn_under(&["prlimit", "--nofile=1024:2048", "--"], &toml, "");
        let line = proxy
            .startup_log
            .iter()
            .find(|l| l.contains("RLIMIT_NOFILE"))
            .expect("the start-up log names the limit");
        assert!(line.contains("\"level\":\"WARN\""), "{line}");
        assert!(line.contains("\"connections_held\":512"), "{line}");
        // Raised as far as it goes: the hard limit.
        assert_eq!(soft_nofile(proxy.pid()), 2048);
    })
    .await;
}
