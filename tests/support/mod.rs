//! Shared test harness: real backends on ephemeral ports, the proxy in-process or as
//! a child process, and small HTTP clients. Everything binds 127.0.0.1 port 0 and is
//! torn down on drop (tokens cancelled, child processes killed by PID).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod app;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use canarygate::config;
use canarygate::routing::PoolKind;
use canarygate::server::{self, ServeOptions};
use canarygate::state::AppState;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const LOCALHOST: [u8; 4] = [127, 0, 0, 1];

/// Fails the test if `fut` takes longer than `secs`: no test can hang CI.
pub async fn within<F: std::future::Future>(secs: u64, fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs}s"))
}

// ---------------------------------------------------------------------------------
// Backends

/// A test backend: a real hyper server on 127.0.0.1 with diagnostic endpoints.
///
/// - `/` and any other path: body = the backend's name, header `x-backend`.
/// - `/headers`: the request headers, one `name: value` line each.
/// - `/hop`: a response carrying hop-by-hop headers (some named only in Connection).
/// - `/sleep?ms=N`: answers after N ms.
/// - `/download?bytes=N`: N pattern bytes, streamed in 64 KiB chunks.
/// - `/upload` (POST): consumes the body streaming; answers `<len> <sha256 hex>`.
/// - `/status?code=N`: answers with status N.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub name: &'static str,
    /// When non-zero, every path but `/health` answers with this status.
    pub forced_status: Arc<AtomicU16>,
    /// Requests received, `/health` excluded.
    pub requests: Arc<AtomicU64>,
    shutdown: CancellationToken,
}

/// A listener on an ephemeral loopback port with the proxy's own backlog (4096).
///
/// tokio's `TcpListener::bind` listens with a backlog of 128, like std. A test that
/// makes the proxy open hundreds of upstream connections at once (one per HTTP/2
/// stream) overflowed it: the kernel dropped the SYNs past 128
/// (`TcpExtListenOverflows`), Linux resends a SYN after 1 s, and on a slow run
/// (coverage) a resend that met a still-full queue outlived `connect_ms` (2 s): a
/// 502 that came from the test's backend, not from the proxy.
pub fn local_listener() -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(SocketAddr::from((LOCALHOST, 0))).unwrap();
    socket.listen(4096).unwrap()
}

impl TestBackend {
    pub async fn start(name: &'static str) -> Self {
        let listener = local_listener();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let forced_status = Arc::new(AtomicU16::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (forced, counter) = (Arc::clone(&forced_status), Arc::clone(&requests));
        let options = ServeOptions::basic(
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_millis(100),
        );
        tokio::spawn(server::serve(
            "test-backend",
            listener,
            options,
            shutdown.clone(),
            move |_, _| {
                let (forced, counter) = (Arc::clone(&forced), Arc::clone(&counter));
                service_fn(move |req| {
                    let forced = forced.load(Ordering::Relaxed);
                    if req.uri().path() != "/health" {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    backend_respond(name, forced, req)
                })
            },
        ));
        Self {
            addr,
            name,
            forced_status,
            requests,
            shutdown,
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

fn query_u64(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn backend_respond(
    name: &'static str,
    forced_status: u16,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let mut response = match req.uri().path() {
        "/health" => Response::new(full("ok")),
        _ if forced_status != 0 => Response::builder()
            .status(forced_status)
            .body(full("forced"))
            .unwrap(),
        "/headers" => {
            let text: String = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{}: {}\n", k, v.to_str().unwrap_or("<bin>")))
                .collect();
            Response::new(full(text))
        }
        "/hop" => Response::builder()
            .header("connection", "x-hop-resp, keep-alive")
            .header("x-hop-resp", "secret")
            .header("keep-alive", "timeout=5")
            .header("trailer", "x-checksum")
            .header("proxy-connection", "keep-alive")
            .header("x-end-to-end", "kept")
            .body(full("hop"))
            .unwrap(),
        "/sleep" => {
            tokio::time::sleep(Duration::from_millis(query_u64(&req, "ms"))).await;
            Response::new(full("slept"))
        }
        "/download" => Response::new(PatternBody::new(query_u64(&req, "bytes")).boxed()),
        "/status" => Response::builder()
            .status(u16::try_from(query_u64(&req, "code")).unwrap_or(500))
            .body(full("status"))
            .unwrap(),
        "/upload" => {
            let mut body = req.into_body();
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            len += data.len() as u64;
                            hasher.update(data);
                        }
                    }
                    Err(_) => {
                        return Ok(Response::builder()
                            .status(StatusCode::BAD_REQUEST)
                            .body(full("body error"))
                            .unwrap());
                    }
                }
            }
            Response::new(full(format!("{len} {}", hex(&hasher.finalize()))))
        }
        _ => Response::new(full(name)),
    };
    response
        .headers_mut()
        .insert("x-backend", http::HeaderValue::from_static(name));
    Ok(response)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A body of `len` deterministic bytes (byte i = i * 7 mod 251), generated in 64 KiB
/// chunks so neither side ever holds it whole.
pub struct PatternBody {
    offset: u64,
    len: u64,
}

impl PatternBody {
    pub fn new(len: u64) -> Self {
        Self { offset: 0, len }
    }

    /// SHA-256 of the whole pattern of `len` bytes, computed the same chunked way.
    pub fn sha256(len: u64) -> String {
        let mut hasher = Sha256::new();
        let mut body = Self::new(len);
        while let Some(chunk) = body.next_chunk() {
            hasher.update(&chunk);
        }
        hex(&hasher.finalize())
    }

    /// The next chunk: bytes `(i * 7) % 251` for its offsets `i`. The pattern repeats
    /// every 251 bytes, so a chunk is a slice of one buffer made once. Computed byte
    /// by byte (about 1 ms a chunk in a debug build, more under coverage), the chunks
    /// were most of what the HTTP/2 memory test cost: 400 downloads each filling its
    /// socket's buffers took ~20 s of CPU, and the loaded gate ran out of its 30 s.
    fn next_chunk(&mut self) -> Option<Bytes> {
        const CHUNK: u64 = 64 * 1024;
        const PERIOD: u64 = 251;
        static CYCLES: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| {
            (0..CHUNK + PERIOD)
                .map(|i| ((i * 7) % PERIOD) as u8)
                .collect::<Vec<u8>>()
                .into()
        });
        if self.offset >= self.len {
            return None;
        }
        let n = (self.len - self.offset).min(CHUNK);
        let start = usize::try_from(self.offset % PERIOD).unwrap();
        let chunk = CYCLES.slice(start..start + usize::try_from(n).unwrap());
        self.offset += n;
        Some(chunk)
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.get_mut().next_chunk().map(|c| Ok(Frame::data(c))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.len - self.offset)
    }
}

/// A production and a canary test backend, the two-pool setup most tests start from.
pub async fn two_pools() -> (TestBackend, TestBackend) {
    (
        TestBackend::start("production").await,
        TestBackend::start("canary").await,
    )
}

/// The demo app (`canarygate::demo`) in-process on an ephemeral port: pages, and a
/// WebSocket echo on `/ws`. Runs until the test's runtime ends.
pub async fn demo_app(name: &str, version: &str) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let identity = canarygate::demo::AppIdentity {
        name: name.to_owned(),
        version: version.to_owned(),
        broken: false,
    };
    let options = ServeOptions::basic(
        Duration::from_secs(10),
        Duration::from_secs(60),
        Duration::from_millis(100),
    );
    tokio::spawn(canarygate::demo::run(
        listener,
        identity,
        options,
        CancellationToken::new(),
    ));
    addr
}

/// An address nothing listens on: bound, then released.
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0)))
        .await
        .unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------
// The proxy, in-process

/// A config with the given pools and extra TOML (sections after the pools).
pub fn config_toml(production: &[SocketAddr], canary: &[SocketAddr], extra: &str) -> String {
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[pools.production]\nbackends = [{}]\n[pools.canary]\nbackends = [{}]\n{extra}\n",
        list(production),
        list(canary)
    )
}

/// The proxy running in this process on ephemeral ports.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: AppState,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(toml: &str) -> Self {
        let mut config = config::from_toml(toml, "test.toml").expect("test config is valid");
        // The default access log is standard output: the test's own, not captured.
        if !toml.contains("access_log") {
            config.server.access_log = config::AccessLogTarget::Off;
        }
        let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0)))
            .await
            .unwrap();
        let admin = TcpListener::bind(SocketAddr::from((LOCALHOST, 0)))
            .await
            .unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let state = AppState::new(config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(canarygate::run_with_state(
            listener,
            admin,
            state.clone(),
            shutdown.clone(),
        ));
        Self {
            addr,
            admin_addr,
            state,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `n` requests are in flight (both pools), as the gauge counts them.
    pub async fn wait_in_flight(&self, n: i64) {
        let metrics = &self.state.metrics;
        eventually(Duration::from_secs(5), "requests in flight", || async {
            metrics.pool(PoolKind::Production).in_flight.get()
                + metrics.pool(PoolKind::Canary).in_flight.get()
                == n
        })
        .await;
    }

    /// Stops accepting and waits for the drain to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------------------------
// The proxy as a child process (the real binary)

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_canarygate")
}

/// Headless Chromium with the flags this machine needs (a closed network: no
/// background connections; root: no sandbox) and a new profile in `profile`; the
/// caller adds its own arguments and the URL.
pub fn headless_chromium(profile: &TempDir) -> Command {
    let mut command = Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()));
    command
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "canarygate-test-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A full config for a child process: `[server]` on ephemeral loopback ports plus
/// `server_extra` keys, then `toml`.
pub fn server_toml(server_extra: &str, toml: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server_extra}\n{toml}"
    )
}

/// `canarygate run` as a child process, listening on ephemeral ports it reports in its
/// JSON log. Killed (by PID) on drop if still running.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The HTTPS listener, when the config has `[server.tls]`.
    pub tls_addr: Option<SocketAddr>,
    /// The config file the process was started with (rewrite it, then SIGHUP).
    pub config_path: PathBuf,
    pub log: mpsc::Receiver<String>,
    /// The log lines up to and including `listening`.
    pub startup_log: Vec<String>,
    _dir: TempDir,
}

impl ProxyProcess {
    /// Starts the binary with `toml` (its `[server]` section is written here).
    pub fn spawn(toml: &str, server_extra: &str) -> Self {
        Self::spawn_with_env(toml, server_extra, &[])
    }

    /// [`Self::spawn`] with extra environment variables for the child.
    pub fn spawn_with_env(toml: &str, server_extra: &str, env: &[(&str, &str)]) -> Self {
        Self::start(toml, server_extra, env, &[])
    }

    /// [`Self::spawn`] with `run --workers N`.
    pub fn spawn_with_workers(toml: &str, workers: usize) -> Self {
        Self::spawn_with_workers_and(toml, "", workers)
    }

    /// [`Self::spawn`] with `run --workers N` and more `[server]` settings.
    pub fn spawn_with_workers_and(toml: &str, server_extra: &str, workers: usize) -> Self {
        Self::start(
            toml,
            server_extra,
            &[],
            &["--workers", &workers.to_string()],
        )
    }

    /// [`Self::spawn`] run through `wrapper` (a command that execs its arguments,
    /// e.g. `prlimit --nofile=1024:65536 --`), so the PID is still the proxy's.
    pub fn spawn_under(wrapper: &[&str], toml: &str, server_extra: &str) -> Self {
        Self::start_wrapped(wrapper, toml, server_extra, &[], &[])
    }

    fn start(toml: &str, server_extra: &str, env: &[(&str, &str)], run_args: &[&str]) -> Self {
        Self::start_wrapped(&[], toml, server_extra, env, run_args)
    }

    fn start_wrapped(
        wrapper: &[&str],
        toml: &str,
        server_extra: &str,
        env: &[(&str, &str)],
        run_args: &[&str],
    ) -> Self {
        let dir = TempDir::new("proc");
        let path = dir.write("config.toml", &server_toml(server_extra, toml));
        let mut command = match wrapper.split_first() {
            None => Command::new(binary()),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary());
                command
            }
        };
        let mut child = command
            .args(["--log-format", "json", "run"])
            .args(run_args)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn canarygate");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Self {
            child,
            addr: SocketAddr::from((LOCALHOST, 0)),
            admin_addr: SocketAddr::from((LOCALHOST, 0)),
            tls_addr: None,
            config_path: path,
            log,
            startup_log: Vec::new(),
            _dir: dir,
        };
        process.startup_log = process.log_until("\"listening\"", Duration::from_secs(20));
        let line = process.startup_log.last().cloned().unwrap();
        let fields: HashMap<String, serde_json::Value> = serde_json::from_str(&line).unwrap();
        process.addr = fields["proxy"].as_str().unwrap().parse().unwrap();
        process.admin_addr = fields["admin"].as_str().unwrap().parse().unwrap();
        process.tls_addr = fields["tls"].as_str().and_then(|a| a.parse().ok());
        process
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.log_until(needle, timeout).pop().unwrap()
    }

    /// Every log line up to and including the first one containing `needle`.
    /// The log lines written since the last read, without waiting.
    pub fn log_so_far(&mut self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    pub fn log_until(&mut self, needle: &str, timeout: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(e) => panic!("no log line containing {needle} within {timeout:?}: {e}"),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `n` requests are in flight (both pools), read from `/metrics`.
    pub async fn wait_in_flight(&self, n: f64) {
        let (c, admin) = (client(), self.admin_addr);
        eventually(Duration::from_secs(5), "requests in flight", || {
            let c = c.clone();
            async move {
                let m = scrape_metrics(&c, admin).await;
                let pool = |p| {
                    m.get(&format!("canarygate_in_flight_requests{{pool=\"{p}\"}}"))
                        .copied()
                };
                pool("production").unwrap_or(0.0) + pool("canary").unwrap_or(0.0) == n
            }
        })
        .await;
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Peak resident memory (VmHWM) in bytes, from /proc.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/pid/status");
        kb * 1024
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------
// Clients

pub type TestClient = Client<HttpConnector, TestBody>;

/// An HTTP/1.1 client with keep-alive.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A `Cookie` header placing a user by sticky id `id`, signed with this process's
/// key (the in-process proxies' without `routing.sticky_secret_env`).
pub fn sticky_cookie(id: &str) -> String {
    format!(
        "canarygate_id={}",
        canarygate::sticky::StickySigner::per_process().signed(id)
    )
}

/// A client whose connections come from `local` (any 127.0.0.0/8 address is this
/// host's): another client as the proxy sees it.
pub fn client_from(local: std::net::IpAddr) -> TestClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(local));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A finished response: status, headers and the whole body.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or(""))
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    pub fn pool(&self) -> &str {
        self.header("x-canarygate-pool")
    }

    /// The `name=value` of the `Set-Cookie` it carries, to send back as `Cookie`.
    pub fn cookie(&self) -> String {
        self.header("set-cookie")
            .split(';')
            .next()
            .unwrap_or("")
            .to_owned()
    }
}

/// GET `url` with extra headers.
pub async fn get(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(
        client,
        req.body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap(),
    )
    .await
}

pub async fn send(client: &TestClient, req: Request<TestBody>) -> Got {
    try_send(client, req).await.expect("request failed")
}

/// GET that reports failures instead of panicking (for loops that count them).
pub async fn try_get(client: &TestClient, url: &str) -> Result<Got, String> {
    let req = Request::get(url)
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    try_send(client, req).await
}

pub async fn try_send(client: &TestClient, req: Request<TestBody>) -> Result<Got, String> {
    let response = client.request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Got {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Sends raw bytes over a new TCP connection and returns everything read until the
/// server closes it (or 5 s pass).
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------
// Redis

/// A free TCP port on 127.0.0.1 (bound, then released; redis-server cannot take 0).
/// A port nothing listens on now, for a process that binds it later (Ansible's
/// services, child processes given a port). Taken below the kernel's ephemeral range
/// (`ip_local_port_range`, 32768 and up by default), in turn from a random start: a
/// port-0 bind or an outbound connection elsewhere in the run is never given it
/// between this check and the later bind, which a port the kernel chose could be
/// (the site test once found its app's port taken that way).
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let (first, span) = (10_000u16, low.saturating_sub(10_000).max(1_000));
    let _ = NEXT.compare_exchange(0, fastrand::u16(..span), Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = first + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let free = |ip: [u8; 4]| std::net::TcpListener::bind(SocketAddr::from((ip, port))).is_ok();
        if free([0, 0, 0, 0]) && free(LOCALHOST) {
            return port;
        }
    }
}

/// A real `redis-server` child process on 127.0.0.1, persistence off, in its own temp
/// dir. Killed by PID on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    extra_args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(free_port(), &[])
    }

    /// Starts on `port` with extra `redis-server` arguments. For TLS, pass
    /// `--port 0 --tls-port <port> ...`: readiness is then checked by the log line.
    pub fn start_with(port: u16, extra_args: &[&str]) -> Self {
        let mut server = Self {
            port,
            child: None,
            dir: TempDir::new("redis"),
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.restart();
        server
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir.0
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// (Re)starts the server process on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        let log = self.dir.0.join("redis.log");
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&self.dir.0)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Ready to accept connections") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Kills the server (SIGKILL, by PID) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Runs the real `redis-cli` binary against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("redis-cli must be installed");
        assert!(out.status.success(), "redis-cli failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 10 ms until it returns true, or panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("not within {timeout:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GET a JSON document.
pub async fn get_json(client: &TestClient, url: &str) -> serde_json::Value {
    let got = get(client, url, &[]).await;
    assert_eq!(got.status, 200, "{url}");
    serde_json::from_slice(&got.body).unwrap()
}

/// Parses a Prometheus text exposition into `series -> value` (series as written,
/// e.g. `canarygate_requests_total{code="200",method="GET",pool="canary"}`).
pub fn parse_scrape(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The proxy's metrics, scraped from its admin listener and parsed (see
/// [`parse_scrape`]).
pub async fn scrape_metrics(c: &TestClient, admin: SocketAddr) -> HashMap<String, f64> {
    parse_scrape(get(c, &format!("http://{admin}/metrics"), &[]).await.text())
}

/// Where tests keep artifacts for a person to open (screenshots): target/test-artifacts.
pub fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `canarygate backend` as a child process (the real demo app), killed by PID on drop.
pub struct BackendProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl BackendProcess {
    pub fn spawn(name: &str) -> Self {
        Self::spawn_with(name, &[])
    }

    /// With extra `canarygate backend` arguments (e.g. `--app-version v2`).
    pub fn spawn_with(name: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(binary())
            .args([
                "--log-format",
                "json",
                "backend",
                "--listen",
                "127.0.0.1:0",
                "--name",
                name,
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("backend log line").unwrap();
            if line.contains("backend listening") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                break v["addr"].as_str().unwrap().parse().unwrap();
            }
        };
        // Keep draining its log so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Self { child, addr }
    }

    /// SIGKILL: the backend dies without closing anything gracefully.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------
// Peers that receive what the proxy sends out (alert channels)

/// How a [`Peer`] answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 201 with a JSON body shaped like Twilio's message resource.
    Created,
    /// 500 with Twilio's error JSON.
    TwilioError,
    /// Never answers.
    Hang,
}

/// One request a peer received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub authorization: String,
    pub content_type: String,
    pub body: String,
    pub at: std::time::Instant,
}

/// An HTTP server on loopback that records every request (an alert channel's peer).
pub struct Peer {
    pub addr: SocketAddr,
    received: Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Peer {
    pub async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let log = Arc::clone(&log);
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .map(|v| v.to_str().unwrap_or("").to_owned())
                                    .unwrap_or_default()
                            };
                            let path = req.uri().path().to_owned();
                            let (authorization, content_type) =
                                (header("authorization"), header("content-type"));
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            log.lock().unwrap().push(Received {
                                path,
                                authorization,
                                content_type,
                                body: String::from_utf8_lossy(&body).into_owned(),
                                at: std::time::Instant::now(),
                            });
                            let (status, body) = match mode {
                                Mode::Created => (201, r#"{"sid": "SM123", "status": "queued"}"#),
                                Mode::TwilioError => (
                                    500,
                                    r#"{"code": 20500, "message": "Internal Server Error", "status": 500}"#,
                                ),
                                Mode::Hang => {
                                    std::future::pending::<()>().await;
                                    (500, "")
                                }
                            };
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            received,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, n: usize, what: &str) -> Vec<Received> {
        let received = Arc::clone(&self.received);
        eventually(Duration::from_secs(20), what, || {
            let ok = received.lock().unwrap().len() >= n;
            async move { ok }
        })
        .await;
        self.received()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A child process (a peer server a test started) killed by PID on drop.
/// The binary's `run` with `toml` (and `[server]` lines), its standard output and
/// error piped to the test: stderr is read up to the `listening` line (which gives
/// the ports), the rest is left to the test.
pub struct PipedProxy {
    pub child: KillOnDrop,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stdout: Option<std::process::ChildStdout>,
    pub stderr: Option<BufReader<std::process::ChildStderr>>,
    _dir: TempDir,
}

impl PipedProxy {
    pub fn spawn(toml: &str, server_extra: &str) -> Self {
        let dir = TempDir::new("piped");
        let path = dir.write("config.toml", &server_toml(server_extra, toml));
        let mut child = Command::new(binary())
            .args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let child = KillOnDrop(child);
        let mut line = String::new();
        while !line.contains("\"listening\"") {
            line.clear();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "no listening line"
            );
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = |key: &str| v[key].as_str().unwrap().parse().unwrap();
        Self {
            addr: addr("proxy"),
            admin: addr("admin"),
            child,
            stdout,
            stderr: Some(stderr),
            _dir: dir,
        }
    }
}

/// Sends SIGTERM to `child` and waits up to `timeout` for it to exit; its status, or
/// `None` if it is still running (then it is killed on drop).
pub async fn terminate(
    mut child: KillOnDrop,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap()
}

pub struct KillOnDrop(pub Child);

/// A real SMTP server (aiosmtpd) on 127.0.0.1:`port` whose Mailbox handler delivers
/// each message into the Maildir `maildir`; killed on drop. Wait for the port
/// before sending.
pub fn smtp_mailbox(port: u16, maildir: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd (pip install aiosmtpd)"),
    )
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (up to 20 s) until something listens on 127.0.0.1:`port`.
pub async fn wait_port(port: u16) {
    eventually(
        Duration::from_secs(20),
        "the peer listening",
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
}
