//! The proxy's HTTP/1.1 client (src/client/) against hand-written backends on real
//! sockets: every way a backend may frame a response, sent in small pieces, and the
//! ways a keep-alive connection to a backend ends. What the client sees, and how many
//! connections the backend saw, show whether a connection was reused safely.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a scripted backend does with one request: write these pieces, each after its
/// pause, then close or keep going.
struct Reply {
    pieces: Vec<(Duration, Vec<u8>)>,
    close: bool,
}

/// `wire` in pieces of `piece` bytes, 2 ms apart, so the proxy reads partial messages.
fn reply(wire: &[u8], piece: usize, close: bool) -> Reply {
    Reply {
        pieces: wire
            .chunks(piece)
            .enumerate()
            .map(|(i, p)| {
                (
                    Duration::from_millis(if i == 0 { 0 } else { 2 }),
                    p.to_vec(),
                )
            })
            .collect(),
        close,
    }
}

impl Reply {
    /// Then `bytes`, `after_ms` later.
    fn then(mut self, after_ms: u64, bytes: &[u8]) -> Self {
        self.pieces
            .push((Duration::from_millis(after_ms), bytes.to_vec()));
        self
    }
}

/// (request head, index of the request on its connection) -> what to send back.
type Script = Arc<dyn Fn(&str, usize) -> Reply + Send + Sync>;

/// A backend answering from a script. Health checks are answered apart and not
/// counted, so `conns` counts the connections the proxied requests used.
struct RawBackend {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    async fn start(script: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Self {
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (c, h) = (Arc::clone(&conns), Arc::clone(&heads));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(
                    stream,
                    Arc::clone(&script),
                    Arc::clone(&c),
                    Arc::clone(&h),
                ));
            }
        });
        Self {
            addr,
            conns,
            heads,
            task,
        }
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn paths(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| h.split(' ').nth(1).unwrap_or("").to_owned())
            .collect()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    script: Script,
    conns: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    let mut index = 0;
    let mut counted = false;
    loop {
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = buf.drain(..end + 4).collect();
                break String::from_utf8(head).unwrap();
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if head.starts_with("GET /health ") {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
            continue;
        }
        if !counted {
            counted = true;
            conns.fetch_add(1, Ordering::SeqCst);
        }
        heads.lock().unwrap().push(head.clone());
        let Reply { pieces, close } = script(&head, index);
        index += 1;
        for (pause, piece) in pieces {
            tokio::time::sleep(pause).await;
            if stream.write_all(&piece).await.is_err() {
                return;
            }
        }
        if close {
            return;
        }
    }
}

/// The proxy in front of one scripted backend; health checks rarely.
async fn proxy_for(backend: &RawBackend) -> Proxy {
    Proxy::start(&config_toml(
        &[backend.addr],
        &[],
        "[health]\ninterval_ms = 600000\n",
    ))
    .await
}

fn empty() -> TestBody {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_with_extensions_and_trailers_arrive_whole_over_one_connection() {
    within(30, async {
        let backend = RawBackend::start(|_, _| {
            reply(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n\
                  5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n",
                7,
                false,
            )
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let c = client();
        for _ in 0..3 {
            let got = get(&c, &proxy.url("/chunked"), &[]).await;
            assert_eq!(got.status, 200);
            assert_eq!(got.text(), "hello world");
            assert_eq!(got.header("transfer-encoding"), "chunked");
        }
        assert_eq!(
            backend.conns(),
            1,
            "the connection was reused after each end"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_bodies_arrive_whole_and_end_their_connection() {
    within(30, async {
        let backend = RawBackend::start(|_, _| {
            reply(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the backend closes",
                5,
                true,
            )
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let c = client();
        for _ in 0..2 {
            let got = get(&c, &proxy.url("/stream"), &[]).await;
            assert_eq!(got.status, 200);
            assert_eq!(got.text(), "until the backend closes");
        }
        assert_eq!(backend.conns(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_responses_are_skipped_and_bodiless_ones_keep_the_connection() {
    within(30, async {
        let backend = RawBackend::start(|head, _| {
            let wire: &[u8] = match head.split(' ').nth(1) {
                Some("/early") => {
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                      HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                }
                Some("/204") => b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
                Some("/304") => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                // HEAD: the length of the body a GET would get, and no body.
                _ => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
            };
            reply(wire, 9, false)
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let c = client();
        let early = get(&c, &proxy.url("/early"), &[]).await;
        assert_eq!((early.status.as_u16(), early.text()), (200, "ok"));
        let no_content = get(&c, &proxy.url("/204"), &[]).await;
        assert_eq!((no_content.status.as_u16(), no_content.header("x-a")), (204, "1"));
        assert_eq!(get(&c, &proxy.url("/304"), &[]).await.status, 304);
        let head = send(
            &c,
            http::Request::head(proxy.url("/page"))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-length"), "1000");
        assert!(head.body.is_empty());
        assert_eq!(get(&c, &proxy.url("/early"), &[]).await.text(), "ok");
        assert_eq!(backend.conns(), 1, "every response ended cleanly");
        assert_eq!(backend.paths(), ["/early", "/204", "/304", "/page", "/early"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_that_cannot_be_framed_are_502_and_their_connection_is_dropped() {
    within(30, async {
        let backend = RawBackend::start(|head, _| {
            let wire: Vec<u8> = match head.split(' ').nth(1) {
                Some("/conflicting") => {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
                        .to_vec()
                }
                Some("/garbage") => b"HELLO THERE\r\n\r\n".to_vec(),
                Some("/bad-chunk") => {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
                        .to_vec()
                }
                Some("/huge-head") => {
                    let mut wire = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
                    wire.extend(std::iter::repeat_n(b'a', 70_000));
                    wire.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
                    wire
                }
                _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            };
            reply(&wire, 4096, false)
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let c = client();
        for path in ["/conflicting", "/garbage", "/huge-head"] {
            let got = get(&c, &proxy.url(path), &[]).await;
            assert_eq!(got.status, 502, "{path}");
        }
        // Framing broken mid-body: the head was already sent, so the client's
        // response is cut off rather than passed off as complete.
        let cut = try_get(&c, &proxy.url("/bad-chunk")).await;
        assert!(
            cut.is_err(),
            "a malformed chunked body reached the client whole"
        );
        let fine = get(&client(), &proxy.url("/fine"), &[]).await;
        assert_eq!((fine.status.as_u16(), fine.text()), (200, "ok"));
        // One connection per broken response (none was reused), one for the last.
        assert_eq!(backend.conns(), 5);
        // The three refused heads, and the chunking broken mid-body.
        let metrics = scrape_metrics(&c, proxy.admin_addr).await;
        assert_eq!(
            metrics[r#"canarygate_upstream_errors_total{kind="protocol",pool="production"}"#],
            4.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_unanswered_resends_only_idempotent_requests() {
    within(30, async {
        // Each connection answers its first request and closes on the second
        // without a word: the race with a backend's keep-alive timeout.
        let backend = RawBackend::start(|_, index| {
            if index == 0 {
                reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 64, false)
            } else {
                reply(b"", 1, true)
            }
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let c = client();
        assert_eq!(get(&c, &proxy.url("/a"), &[]).await.status, 200);
        let resent = get(&c, &proxy.url("/b"), &[]).await;
        assert_eq!((resent.status.as_u16(), resent.text()), (200, "ok"));
        assert_eq!(backend.conns(), 2);
        // A POST is not idempotent: it may have been acted on, so it is not sent again.
        let post = send(
            &c,
            http::Request::post(proxy.url("/c")).body(empty()).unwrap(),
        )
        .await;
        assert_eq!(post.status, 502);
        assert_eq!(backend.paths(), ["/a", "/b", "/b", "/c"]);
        let metrics = scrape_metrics(&c, proxy.admin_addr).await;
        assert_eq!(
            metrics[r#"canarygate_upstream_errors_total{kind="reset",pool="production"}"#],
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_backend_closed_while_idle_is_never_used() {
    within(30, async {
        // Answers as if keeping the connection, then closes it at once.
        let backend = RawBackend::start(|_, _| {
            reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 64, true)
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let c = client();
        // POSTs, which are never sent twice: a dead connection taken from the pool
        // would show as a 502 here.
        for _ in 0..3 {
            let post = http::Request::post(proxy.url("/x")).body(empty()).unwrap();
            let got = send(&c, post).await;
            assert_eq!((got.status.as_u16(), got.text()), (200, "ok"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Each was sent exactly once, on a connection of its own.
        assert_eq!(backend.conns(), 3);
        assert_eq!(backend.paths(), ["/x", "/x", "/x"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_the_backend_is_not_passed_off_as_complete() {
    within(30, async {
        let backend = RawBackend::start(|_, _| {
            reply(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..",
                64,
                true,
            )
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let c = client();
        let got = try_get(&c, &proxy.url("/short")).await;
        assert!(
            got.is_err(),
            "client got a complete response: {:?}",
            got.map(|g| g.body)
        );
        // The proxy goes on serving.
        let again = try_get(&client(), &proxy.url("/short")).await;
        assert!(again.is_err());
        assert_eq!(backend.conns(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_echo_flows_both_ways_at_once() {
    within(60, async {
        // The backend answers at once and echoes the body as it reads it: a client
        // that sent the whole body before reading would deadlock once the socket
        // buffers filled (16 MiB is far more than they hold).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(req.into_body()))
                        },
                    ),
                ));
            }
        });
        let proxy = Proxy::start(&config_toml(
            &[addr],
            &[],
            "[health]\ninterval_ms = 600000\n",
        ))
        .await;
        const SIZE: u64 = 16 * 1024 * 1024;
        let req = http::Request::post(proxy.url("/echo"))
            .body(PatternBody::new(SIZE).boxed())
            .unwrap();
        let got = send(&client(), req).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body.len() as u64, SIZE);
        assert_eq!(
            hex(&<sha2::Sha256 as sha2::Digest>::digest(&got.body)),
            PatternBody::sha256(SIZE)
        );
        echo.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_lets_the_body_through_once_asked_for() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        conn.write_all(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
        // The client holds its body until told to go on.
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before 100 Continue");
            seen.extend_from_slice(&chunk[..n]);
        }
        assert!(seen.starts_with(b"HTTP/1.1 100 Continue\r\n"), "{}", String::from_utf8_lossy(&seen));
        conn.write_all(b"hello").await.unwrap();
        // The backend answers `<length> <sha256>` of what it received.
        let sha = hex(&<sha2::Sha256 as sha2::Digest>::digest(b"hello"));
        let mut response = Vec::new();
        while !String::from_utf8_lossy(&response).contains(&sha) {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&response));
            response.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains(&format!("5 {sha}")), "{text}");
    })
    .await;
}

/// Three requests in a row, `pause_ms` apart, on one keep-alive client connection to a
/// proxy whose only backend answers every request with `reply()`: status and body
/// (or the error) of each, the framing headers of each, and the connections the
/// backend saw.
async fn three_through(
    method: &'static str,
    reply: impl Fn() -> Reply + Send + Sync + 'static,
    pause_ms: u64,
) -> (Vec<Result<(u16, String), String>>, Vec<Vec<String>>, usize) {
    let backend = RawBackend::start(move |_, _| reply()).await;
    let proxy = proxy_for(&backend).await;
    let c = client();
    let (mut got, mut lengths) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let req = http::Request::builder()
            .method(method)
            .uri(proxy.url("/"))
            .body(empty())
            .unwrap();
        match try_send(&c, req).await {
            Ok(g) => {
                lengths.push(
                    g.headers
                        .get_all("content-length")
                        .iter()
                        .map(|v| v.to_str().unwrap().to_owned())
                        .collect(),
                );
                got.push(Ok((g.status.as_u16(), g.text().to_owned())));
            }
            Err(e) => got.push(Err(e)),
        }
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
    (got, lengths, backend.conns())
}

/// The same answer to every request.
type Answer = fn() -> Reply;

const SPOOF: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nspoof!";
const BAD_GATEWAY: &str = "502 bad gateway: backend failed\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_backend_never_desyncs_the_pool_or_misframes_a_response() {
    within(90, async {
        let ok = |body: &str| vec![Ok((200, body.to_owned())); 3];
        // Control: a clean HTTP/1.1 response is reused (one connection), so a count
        // of three below means the pool refused to reuse.
        let (got, _, conns) = three_through(
            "GET",
            || reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 4096, false),
            0,
        )
        .await;
        assert_eq!((got, conns), (ok("hello"), 1));

        // A response RFC 9112 6.1 says to close after, and stray bytes that arrive
        // just after the next request went out on the connection: only not reusing
        // it keeps them from answering another client's request.
        let (got, _, conns) = three_through(
            "GET",
            || {
                reply(
                    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    4096,
                    false,
                )
                .then(20, SPOOF)
            },
            0,
        )
        .await;
        assert_eq!((got, conns), (ok("hello"), 3), "HTTP/1.0 chunked keep-alive");

        // (name, the backend's answer, what each of the three requests gets, the
        // connections it takes); requests 60 ms apart, so bytes that came while a
        // connection sat idle are seen at checkout.
        type Case = (&'static str, Answer, Vec<Result<(u16, String), String>>, usize);
        let cases: Vec<Case> = vec![
            (
                "Content-Length beside chunked",
                || reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 4096, false),
                ok("hello"),
                3,
            ),
            (
                "bytes after the body, same write",
                || reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nspoof!", 4096, false),
                ok("hello"),
                3,
            ),
            (
                "bytes after the body, later",
                || reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 4096, false).then(5, SPOOF),
                ok("hello"),
                3,
            ),
            (
                "204 with a body",
                || reply(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", 4096, false),
                vec![Ok((204, String::new())); 3],
                3,
            ),
            (
                "304 with a chunked body",
                || reply(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 4096, false),
                vec![Ok((304, String::new())); 3],
                3,
            ),
            (
                "interim responses first",
                || reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 4096, false),
                ok("hello"),
                1,
            ),
            (
                "Content-Length list",
                || reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello", 4096, false),
                ok("hello"),
                1,
            ),
            (
                "gzip then chunked",
                || reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 4096, false),
                vec![Ok((502, BAD_GATEWAY.to_owned())); 3],
                3,
            ),
            (
                "chunked then gzip",
                || reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello", 4096, false),
                vec![Ok((502, BAD_GATEWAY.to_owned())); 3],
                3,
            ),
            (
                "obs-fold",
                || reply(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello", 4096, false),
                vec![Ok((502, BAD_GATEWAY.to_owned())); 3],
                3,
            ),
            (
                "NUL in a value",
                || reply(b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 5\r\n\r\nhello", 4096, false),
                vec![Ok((502, BAD_GATEWAY.to_owned())); 3],
                3,
            ),
            (
                "101 header fields",
                || {
                    let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
                    reply(format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 2\r\n\r\nok").as_bytes(), 4096, false)
                },
                vec![Ok((502, BAD_GATEWAY.to_owned())); 3],
                3,
            ),
        ];
        for (name, answer, want, want_conns) in cases {
            let (got, lengths, conns) = three_through("GET", answer, 60).await;
            assert_eq!(got, want, "{name}");
            assert_eq!(conns, want_conns, "{name}: backend connections");
            // Exactly what is sent: never the backend's wrong length or a list.
            for (l, g) in lengths.iter().zip(&got) {
                if matches!(g, Ok((200, _))) {
                    assert!(l.is_empty() || l == &["5"], "{name}: content-length {l:?}");
                }
            }
        }

        // HEAD answered with a body anyway: the body is not read as the next response.
        let (got, _, conns) = three_through(
            "HEAD",
            || reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 4096, false),
            60,
        )
        .await;
        assert_eq!((got, conns), (vec![Ok((200, String::new())); 3], 3));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gets_the_proxys_http_version_not_the_backends() {
    within(30, async {
        let backend = RawBackend::start(|_, _| {
            reply(
                b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                4096,
                true,
            )
        })
        .await;
        let proxy = proxy_for(&backend).await;
        let addr = proxy.addr;
        let answer = tokio::task::spawn_blocking(move || {
            raw_exchange(
                addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stalls_mid_body_has_the_response_cut_not_completed() {
    within(60, async {
        let extra = "[timeouts]\nupstream_body_idle_ms = 400\n[health]\ninterval_ms = 600000\n";
        // Trickling: a byte every 150 ms, under the 400 ms limit: delivered whole.
        let backend = RawBackend::start(|_, _| {
            (0..8).fold(
                reply(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhe",
                    4096,
                    false,
                ),
                |r, _| r.then(150, b"l"),
            )
        })
        .await;
        let proxy = Proxy::start(&config_toml(&[backend.addr], &[], extra)).await;
        let got = get(&client(), &proxy.url("/"), &[]).await;
        assert_eq!(got.text(), "hellllllll");
        drop(proxy);

        // Stalled: a little of the body, then nothing for longer than the limit.
        let stalls: [(&str, Answer); 2] = [
            ("content-length", || {
                reply(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhe",
                    4096,
                    false,
                )
                .then(1500, b"llo!!!!!")
            }),
            ("chunked", || {
                reply(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n",
                    4096,
                    false,
                )
                .then(1500, b"3\r\nllo\r\n0\r\n\r\n")
            }),
        ];
        for (name, script) in stalls {
            let backend = RawBackend::start(move |_, _| script()).await;
            let proxy = Proxy::start(&config_toml(&[backend.addr], &[], extra)).await;
            let c = client();
            let started = std::time::Instant::now();
            let cut = try_get(&c, &proxy.url("/")).await;
            let took = started.elapsed();
            assert!(cut.is_err(), "{name}: a cut body must not look complete");
            assert!(
                took >= Duration::from_millis(350) && took < Duration::from_millis(1400),
                "{name}: cut after {took:?}"
            );
            let metrics = scrape_metrics(&c, proxy.admin_addr).await;
            assert_eq!(
                metrics[r#"canarygate_upstream_errors_total{kind="timeout",pool="production"}"#],
                1.0,
                "{name}"
            );
            // The stalled connection is not reused: the next request opens another.
            let _ = try_get(&c, &proxy.url("/")).await;
            assert_eq!(backend.conns(), 2, "{name}");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------
// Connection limits per backend (issue 29, item 9)

/// A backend that counts the connections open to it at once, listening with the
/// backlog most servers get by default (128, std's and tokio's) rather than the
/// harness's 4096: the queue a connection storm overflows. Every request but
/// `/health` (the active checks, on connections of their own, not counted) is
/// answered after `delay`; `/slow` after `slow`.
struct CountingBackend {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingBackend {
    fn start(delay: Duration, slow: Duration) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((LOCALHOST, 0))).unwrap();
        let listener = socket.listen(128).unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (o, p, r) = (Arc::clone(&open), Arc::clone(&peak), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (open, peak, requests) = (Arc::clone(&o), Arc::clone(&p), Arc::clone(&r));
                tokio::spawn(async move {
                    // Counted from its first proxied request to its close.
                    let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let c = Arc::clone(&counted);
                    let o = Arc::clone(&open);
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let path = req.uri().path().to_owned();
                        if path != "/health" {
                            requests.fetch_add(1, Ordering::SeqCst);
                            if !c.swap(true, Ordering::SeqCst) {
                                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                                peak.fetch_max(now, Ordering::SeqCst);
                            }
                        }
                        async move {
                            let pause = match path.as_str() {
                                "/health" => Duration::ZERO,
                                "/slow" => slow,
                                _ => delay,
                            };
                            tokio::time::sleep(pause).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                    if counted.load(Ordering::SeqCst) {
                        open.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Self {
            addr,
            open,
            peak,
            requests,
            task,
        }
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// 4 HTTP/2 clients x 100 streams at once to `url`: the count of each status (or
/// client error), printed with the backend's peak of connections at once.
async fn burst(url: &str, backend: &CountingBackend) -> std::collections::BTreeMap<String, usize> {
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let client = h2_client();
        for _ in 0..100 {
            let (client, url) = (client.clone(), url.to_owned());
            streams.spawn(async move { try_get(&client, &url).await.map(|g| g.status) });
        }
    }
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    while let Some(status) = streams.join_next().await {
        let status = match status.unwrap() {
            Ok(status) => status.as_u16().to_string(),
            Err(e) => e,
        };
        *statuses.entry(status).or_default() += 1;
    }
    eprintln!(
        "400 streams: {statuses:?}; backend peak {} connections, {} requests",
        backend.peak.load(Ordering::SeqCst),
        backend.requests.load(Ordering::SeqCst)
    );
    statuses
}

/// The issue's failing case: four HTTP/2 clients open 100 streams each at once
/// against a fresh proxy with `connect_ms = 500`, and the backend listens with a
/// backlog of 128. Before the limits the proxy opened a connection per stream: the
/// accept queue overflowed, a dropped SYN is resent after 1 s, and those requests
/// got 502; the backend saw 400 connections. Now at most 16 connects run at once,
/// the streams share what is open, and the backend never sees more than
/// `max_connections`. (`pending_timeout_ms` is long here so a slow run measures the
/// limits, not the queue's patience; the queue's own test is below.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_400_http2_streams_gets_no_502_and_the_backend_sees_at_most_max_connections() {
    within(60, async {
        let backend = CountingBackend::start(Duration::from_millis(20), Duration::ZERO);
        let proxy = Proxy::start(&format!(
            "[pools.production]\nbackends = [\"{}\"]\nmax_connections = 32\n\
             pending_timeout_ms = 20000\n[timeouts]\nconnect_ms = 500\n\
             [health]\ninterval_ms = 600000\n",
            backend.addr
        ))
        .await;
        let statuses = burst(&proxy.url("/"), &backend).await;
        let peak = backend.peak.load(Ordering::SeqCst);
        assert_eq!(statuses.get("200"), Some(&400), "{statuses:?}");
        assert!(peak <= 32, "the backend saw {peak} connections at once");
        assert!(backend.open.load(Ordering::SeqCst) <= 32);
        let scrape = scrape_metrics(&client(), proxy.admin_addr).await;
        let open = format!(
            "canarygate_upstream_connections{{backend=\"{}\",pool=\"production\"}}",
            backend.addr
        );
        assert!(
            scrape.get(&open).is_some_and(|&n| n <= 32.0),
            "{open}: {:?}",
            scrape.get(&open)
        );
    })
    .await;
}

/// The same burst through the real binary with two worker threads (the four client
/// connections spread over both): `max_connections` holds over both workers together,
/// and every request is served, also where a connection opened or returned on one
/// worker goes to a request queued on the other (moved to its event loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_hold_over_all_worker_threads() {
    within(60, async {
        let backend = CountingBackend::start(Duration::from_millis(20), Duration::ZERO);
        let proxy = ProxyProcess::spawn_with_workers(
            &format!(
                "[pools.production]\nbackends = [\"{}\"]\nmax_connections = 8\n\
                 pending_timeout_ms = 20000\n[timeouts]\nconnect_ms = 500\n\
                 [health]\ninterval_ms = 600000\n",
                backend.addr
            ),
            2,
        );
        let statuses = burst(&format!("http://{}/", proxy.addr), &backend).await;
        let peak = backend.peak.load(Ordering::SeqCst);
        assert_eq!(statuses.get("200"), Some(&400), "{statuses:?}");
        assert!(peak <= 8, "the backend saw {peak} connections at once");
    })
    .await;
}

/// `max_connections = 1`, `max_pending = 1`: one request holds the connection, the
/// next waits, and a third is refused at once with 503 and `Retry-After`; the one
/// waiting gets the same 503 once `pending_timeout_ms` passed. Each is counted by
/// reason, and none of them reached the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_pending_or_pending_timeout_a_request_gets_503_with_retry_after_and_is_counted() {
    within(30, async {
        let backend = CountingBackend::start(Duration::ZERO, Duration::from_secs(10));
        let proxy = Proxy::start(&format!(
            "[pools.production]\nbackends = [\"{}\"]\nmax_connections = 1\nmax_pending = 1\n\
             pending_timeout_ms = 1500\n[health]\ninterval_ms = 600000\n",
            backend.addr
        ))
        .await;
        let conns = Arc::clone(&proxy.state.snapshot().pools.production.backends()[0].conns);
        let c = client();
        let holder = tokio::spawn({
            let (c, url) = (c.clone(), proxy.url("/slow"));
            async move { try_get(&c, &url).await }
        });
        let requests = Arc::clone(&backend.requests);
        eventually(Duration::from_secs(10), "the backend holds the one connection", || {
            let requests = Arc::clone(&requests);
            async move { requests.load(Ordering::SeqCst) == 1 }
        })
        .await;
        let waiting = tokio::spawn({
            let (c, url) = (c.clone(), proxy.url("/"));
            async move { (std::time::Instant::now(), try_get(&c, &url).await) }
        });
        eventually(Duration::from_secs(10), "one request queued", || {
            let waiting = conns.open_and_waiting().1;
            async move { waiting == 1 }
        })
        .await;

        let refused = get(&c, &proxy.url("/"), &[]).await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.header("retry-after"), "1");
        assert!(refused.text().contains("connection limit"), "{}", refused.text());

        let (queued_at, timed_out) = waiting.await.unwrap();
        let timed_out = timed_out.unwrap();
        assert_eq!(timed_out.status, 503);
        assert_eq!(timed_out.header("retry-after"), "1");
        assert!(queued_at.elapsed() >= Duration::from_millis(1400));
        assert_eq!(backend.requests.load(Ordering::SeqCst), 1, "only the holder got through");
        assert_eq!(conns.open_and_waiting(), (1, 0));

        let scrape = scrape_metrics(&c, proxy.admin_addr).await;
        let series = |reason: &str| {
            format!(
                "canarygate_upstream_pending_rejected_total{{backend=\"{}\",pool=\"production\",reason=\"{reason}\"}}",
                backend.addr
            )
        };
        assert_eq!(scrape.get(&series("queue_full")), Some(&1.0));
        assert_eq!(scrape.get(&series("timeout")), Some(&1.0));
        holder.abort();
    })
    .await;
}
