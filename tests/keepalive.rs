//! Idle keep-alive connections are parked (hyper's per-connection state dropped, the
//! socket kept) and served again on their next request: real sockets on 127.0.0.1,
//! raw HTTP/1.1 so the test sees exactly which socket carries which response.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off a keep-alive connection (Content-Length framing, which is
/// what the test backend sends).
struct RawResponse {
    status: u16,
    head: String,
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// A client connection that keeps whatever it read past the current response.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn get(&mut self, path: &str) -> RawResponse {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await;
        self.response().await
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await.unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn response(&mut self) -> RawResponse {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.fill().await > 0, "connection closed before a response");
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let status = head[9..12].parse().unwrap();
        let mut response = RawResponse {
            status,
            head,
            body: String::new(),
        };
        let len: usize = response
            .header("content-length")
            .expect("the test backend sends Content-Length")
            .parse()
            .unwrap();
        while self.buf.len() < head_end + len {
            assert!(self.fill().await > 0, "connection closed inside a body");
        }
        response.body = String::from_utf8_lossy(&self.buf[head_end..head_end + len]).into_owned();
        self.buf.drain(..head_end + len);
        response
    }

    /// Whether the server closed the connection (EOF) within `limit`.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(limit, self.stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

fn parked(proxy: &Proxy) -> i64 {
    proxy.state.metrics.parked_connections.get()
}

async fn parked_becomes(proxy: &Proxy, n: i64) {
    eventually(Duration::from_secs(5), &format!("{n} parked"), || async {
        parked(proxy) == n
    })
    .await;
}

async fn proxy_to(backend: &TestBackend, extra: &str) -> Proxy {
    Proxy::start(&config_toml(&[backend.addr], &[], extra)).await
}

/// A proxy (config `extra`) and one client connection that made a request and has
/// been parked since.
async fn one_parked_connection(extra: &str) -> (TestBackend, Proxy, Conn) {
    let backend = TestBackend::start("production").await;
    let proxy = proxy_to(&backend, extra).await;
    let mut conn = Conn::open(proxy.addr).await;
    assert_eq!(conn.get("/").await.status, 200);
    parked_becomes(&proxy, 1).await;
    (backend, proxy, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_parked_and_serve_their_next_request() {
    within(30, async {
        let backend = TestBackend::start("production").await;
        let proxy = proxy_to(&backend, "").await;
        let mut conns = Vec::new();
        for _ in 0..20 {
            let mut conn = Conn::open(proxy.addr).await;
            let got = conn.get("/").await;
            assert_eq!((got.status, got.body.as_str()), (200, "production"));
            conns.push(conn);
        }
        parked_becomes(&proxy, 20).await;
        assert_eq!(proxy.state.metrics.client_connections.get(), 20);

        // The same sockets carry the next requests: GETs, and a POST with a body.
        for (i, conn) in conns.iter_mut().enumerate() {
            let got = if i % 2 == 0 {
                conn.get("/").await
            } else {
                conn.send(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello")
                    .await;
                conn.response().await
            };
            assert_eq!(got.status, 200, "request {i} after parking");
            assert_eq!(got.header("connection"), None, "keep-alive stays on");
            if i % 2 == 1 {
                assert!(
                    got.body.starts_with("5 "),
                    "upload seen whole: {}",
                    got.body
                );
            }
        }
        // They park again once quiet, and still work.
        parked_becomes(&proxy, 20).await;
        for conn in &mut conns {
            assert_eq!(conn.get("/").await.body, "production");
        }
        drop(conns);
        parked_becomes(&proxy, 0).await;
        eventually(Duration::from_secs(5), "connections closed", || async {
            proxy.state.metrics.client_connections.get() == 0
        })
        .await;
        assert_eq!(
            backend.requests.load(std::sync::atomic::Ordering::Relaxed),
            60
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_read_request_or_a_slow_response_is_never_parked() {
    within(30, async {
        let backend = TestBackend::start("production").await;
        let proxy = proxy_to(&backend, "").await;

        // Half a request head, then silence: well past the park delay, not parked.
        let mut half = Conn::open(proxy.addr).await;
        half.send(b"GET / HTTP/1.1\r\nHost: te").await;
        // A response that takes 1.2 s: its connection is quiet but busy.
        let mut slow = Conn::open(proxy.addr).await;
        slow.send(b"GET /sleep?ms=1200 HTTP/1.1\r\nHost: test\r\n\r\n")
            .await;
        // A control connection that does park, so the gauge is known to work here.
        let mut idle = Conn::open(proxy.addr).await;
        idle.get("/").await;
        parked_becomes(&proxy, 1).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(parked(&proxy), 1, "only the idle connection is parked");

        half.send(b"st\r\n\r\n").await;
        let got = half.response().await;
        assert_eq!((got.status, got.body.as_str()), (200, "production"));
        // Parking it would have cut hyper short and turned keep-alive off.
        assert_eq!(got.header("connection"), None, "no forced close");
        let got = slow.response().await;
        assert_eq!((got.status, got.body.as_str()), (200, "slept"));
        assert_eq!(got.header("connection"), None, "no forced close");
        // Both stay usable.
        assert_eq!(slow.get("/").await.status, 200);
        assert_eq!(half.get("/").await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_wake_a_parked_connection_and_are_answered_in_order() {
    within(30, async {
        let (_backend, proxy, mut conn) = one_parked_connection("").await;
        conn.send(
            b"GET /sleep?ms=50 HTTP/1.1\r\nHost: test\r\n\r\nGET /status?code=201 HTTP/1.1\r\nHost: test\r\n\r\nGET / HTTP/1.1\r\nHost: test\r\n\r\n",
        )
        .await;
        let answers = [
            conn.response().await,
            conn.response().await,
            conn.response().await,
        ];
        let seen: Vec<(u16, &str)> = answers
            .iter()
            .map(|r| (r.status, r.body.as_str()))
            .collect();
        assert_eq!(
            seen,
            [(200, "slept"), (201, "status"), (200, "production")]
        );
        parked_becomes(&proxy, 1).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_closes_at_the_idle_timeout() {
    within(30, async {
        let started = Instant::now();
        let (_backend, proxy, mut conn) =
            one_parked_connection("[timeouts]\nidle_ms = 1500\n").await;
        assert!(conn.closed_within(Duration::from_secs(5)).await, "closed");
        let after = started.elapsed();
        // idle_ms after the answer, up to a quarter more (the idle timer's granularity);
        // `started` is a little before the answer, so the upper bound has slack.
        assert!(
            after >= Duration::from_millis(1400) && after < Duration::from_millis(2500),
            "closed after {after:?}"
        );
        parked_becomes(&proxy, 0).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_parked_connections_at_once() {
    within(30, async {
        let (_backend, proxy, mut conn) =
            one_parked_connection("[server]\ndrain_timeout_ms = 20000\n").await;
        let started = Instant::now();
        proxy.stop().await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the drain did not wait for a parked connection"
        );
        assert!(conn.closed_within(Duration::from_secs(2)).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_a_burst_left_idle_are_purged() {
    within(40, async {
        let backend = TestBackend::start("production").await;
        let proxy = proxy_to(&backend, "").await;
        let idle_upstream = || {
            proxy
                .state
                .snapshot()
                .pools
                .get(canarygate::routing::PoolKind::Production)
                .backends()[0]
                .conns
                .idle_count()
        };
        // 16 slow requests at once need 16 upstream connections.
        let burst: Vec<_> = (0..16)
            .map(|_| {
                let addr = proxy.addr;
                tokio::spawn(
                    async move { Conn::open(addr).await.get("/sleep?ms=300").await.status },
                )
            })
            .collect();
        for request in burst {
            assert_eq!(request.await.unwrap(), 200);
        }
        assert_eq!(idle_upstream(), 16);
        let used = Instant::now();
        // Kept while they may still be needed...
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(idle_upstream(), 16, "purged before 5 s idle");
        // ...then halved every second until none is left.
        let mut counts = Vec::new();
        while idle_upstream() > 0 {
            assert!(
                used.elapsed() < Duration::from_secs(20),
                "never purged: {counts:?}"
            );
            let n = idle_upstream();
            if counts.last() != Some(&n) {
                counts.push(n);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            used.elapsed() >= Duration::from_secs(5),
            "purged after {:?}",
            used.elapsed()
        );
        // Half of the stale ones per purge (16, 8, 4, 2, 1 when all went stale at
        // once): gradual, never all at once.
        assert_eq!(counts[0], 16);
        assert!(counts.len() >= 3, "gradual: {counts:?}");
        assert!(
            counts.windows(2).all(|w| w[1] < w[0] && w[1] >= w[0] / 4),
            "halving: {counts:?}"
        );
        // The pool still works afterwards.
        assert_eq!(Conn::open(proxy.addr).await.get("/").await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_are_never_parked_and_stay_usable() {
    within(30, async {
        let backend = TestBackend::start("production").await;
        let proxy = proxy_to(&backend, "").await;
        let h2 = h2_client();
        let got = get(&h2, &proxy.url("/"), &[]).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, "production"));
        // A plain HTTP/1.1 connection beside it parks, so the gauge works here.
        let mut idle = Conn::open(proxy.addr).await;
        idle.get("/").await;
        parked_becomes(&proxy, 1).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(parked(&proxy), 1, "the HTTP/2 connection is not parked");
        assert_eq!(proxy.state.metrics.client_connections.get(), 2);
        // The same HTTP/2 connection serves again (no second connection opened).
        assert_eq!(get(&h2, &proxy.url("/"), &[]).await.status, 200);
        assert_eq!(proxy.state.metrics.client_connections.get(), 2);
    })
    .await;
}
