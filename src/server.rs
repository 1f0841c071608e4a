//! The accept loop shared by the proxy, the admin listener and the demo backend.
//!
//! Each connection is served by hyper-util's auto builder (HTTP/1.1, and HTTP/2 with
//! prior knowledge or by TLS ALPN, told apart by the connection preface) in a task
//! tracked for the drain. On shutdown the listener is dropped at once (new connections
//! are refused), every connection is asked to shut down gracefully (idle keep-alive
//! ones close, requests in flight finish) and gets up to `drain_timeout` before the
//! rest are cut. `max_connections` is a semaphore taken before `accept`, so excess
//! clients wait in the kernel backlog instead of being accepted and dropped.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::framing::{ConnShared, FramingGuard};
use tracing::{debug, info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A service the accept loop can run on a connection (one place for the bounds).
pub trait HttpService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Send
        + 'static
{
}

/// TLS settings a listener reads per connection, so a reload swaps certificates for
/// new connections without touching open ones.
pub type TlsSource = Arc<ArcSwap<rustls::ServerConfig>>;

/// Per-listener connection settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A client must send a request's headers within this time (slowloris guard).
    /// hyper also applies it to an idle HTTP/1.1 keep-alive connection waiting for its
    /// next request. Also bounds a TLS handshake.
    pub header_read_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    pub idle_timeout: Duration,
    /// How long in-flight requests may run after shutdown begins.
    pub drain_timeout: Duration,
    /// Gauge of open connections, if this listener is counted.
    pub connections: Option<prometheus::IntGauge>,
    /// At most this many open connections; past it, new ones wait in the backlog.
    pub max_connections: Option<usize>,
    /// Request line plus headers (HTTP/1.1: 431 past it; HTTP/2: header list size).
    pub max_header_bytes: Option<usize>,
    /// Terminate TLS on this listener.
    pub tls: Option<TlsSource>,
}

impl ServeOptions {
    /// Plain settings with no limits, for the admin listener, the demo app and tests.
    pub fn basic(
        header_read_timeout: Duration,
        idle_timeout: Duration,
        drain_timeout: Duration,
    ) -> Self {
        Self {
            header_read_timeout,
            idle_timeout,
            drain_timeout,
            connections: None,
            max_connections: None,
            max_header_bytes: None,
            tls: None,
        }
    }
}

/// Serves `listener` until `shutdown` is cancelled, then drains.
///
/// `service_for` builds the service for one connection from the peer address and the
/// connection's framing verdicts (see [`crate::framing`]).
pub async fn serve<F, S, B>(
    name: &'static str,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: CancellationToken,
    service_for: F,
) where
    F: Fn(SocketAddr, Arc<ConnShared>) -> S,
    S: HttpService<B>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    {
        let mut http1 = builder.http1();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout);
        if let Some(max) = options.max_header_bytes {
            // hyper's read buffer bounds the head; it answers 431 when it overflows.
            http1.max_buf_size(max.max(8192));
        }
    }
    {
        let mut http2 = builder.http2();
        // RFC 8441: WebSockets over HTTP/2 (extended CONNECT).
        http2.timer(TokioTimer::new()).enable_connect_protocol();
        if let Some(max) = options.max_header_bytes {
            http2.max_header_list_size(u32::try_from(max).unwrap_or(u32::MAX));
        }
    }
    let builder = Arc::new(builder);
    let limit = options.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let tracker = TaskTracker::new();
    // `drain` asks every connection to finish gracefully; `force_close` cuts them when
    // the drain deadline passes.
    let drain = CancellationToken::new();
    let force_close = CancellationToken::new();

    loop {
        let permit = match &limit {
            None => None,
            Some(limit) => tokio::select! {
                () = shutdown.cancelled() => break,
                permit = Arc::clone(limit).acquire_owned() => permit.ok(),
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE: back off briefly instead of spinning on the error.
                    warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(listener = name, %error, "set_nodelay failed");
        }
        let framing = Arc::new(ConnShared::default());
        let io = IdleTimeout::new(stream, options.idle_timeout, Arc::clone(&framing));
        let service = service_for(peer, Arc::clone(&framing));
        let counted = options
            .connections
            .clone()
            .map(crate::metrics::GaugeGuard::new);
        let builder = Arc::clone(&builder);
        let (drain, force_close) = (drain.clone(), force_close.clone());
        let tls = options
            .tls
            .as_ref()
            .map(|t| TlsAcceptor::from(t.load_full()));
        let handshake_timeout = options.header_read_timeout;
        tracker.spawn(async move {
            let _held = (permit, counted);
            match tls {
                None => {
                    let io = TokioIo::new(FramingGuard::new(io, framing));
                    drive(name, peer, &builder, io, service, &drain, &force_close).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                        Ok(Ok(tls_stream)) => {
                            let io = TokioIo::new(FramingGuard::new(tls_stream, framing));
                            drive(name, peer, &builder, io, service, &drain, &force_close).await;
                        }
                        Ok(Err(error)) => {
                            debug!(listener = name, %peer, %error, "TLS handshake failed");
                        }
                        Err(_) => debug!(listener = name, %peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }

    drop(listener);
    info!(listener = name, "stopped accepting; draining");
    drain.cancel();
    tracker.close();
    match tokio::time::timeout(options.drain_timeout, tracker.wait()).await {
        Ok(()) => info!(listener = name, "drained"),
        Err(_) => {
            warn!(
                listener = name,
                timeout_ms = u64::try_from(options.drain_timeout.as_millis()).unwrap_or(u64::MAX),
                "drain timeout; closing remaining connections"
            );
            force_close.cancel();
        }
    }
}

/// Serves one connection: until it ends, or gracefully once `drain` fires, or cut
/// when `force_close` fires.
async fn drive<I, S, B>(
    name: &'static str,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    drain: &CancellationToken,
    force_close: &CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: HttpService<B>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = drain.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                () = force_close.cancelled() => return,
            }
        }
        () = force_close.cancelled() => return,
    };
    if let Err(error) = result {
        debug!(listener = name, %peer, %error, "connection ended with error");
    }
}

/// A TCP stream that fails with `TimedOut` once no byte has moved for `idle`.
///
/// I/O only bumps a counter (no clock read per read or write, which showed in
/// profiles); a timer ticks every quarter of `idle` and the connection expires after
/// four ticks in a row without activity, so a silent connection is closed after
/// between `idle` and 1.25 x `idle`.
pub struct IdleTimeout {
    inner: TcpStream,
    idle: Duration,
    /// The idle timeout the current tick length was computed from.
    armed_for: Duration,
    shared: Arc<ConnShared>,
    activity: u64,
    seen: u64,
    quiet_ticks: u8,
    timer: Pin<Box<Sleep>>,
}

const IDLE_TICKS: u8 = 4;

impl IdleTimeout {
    pub fn new(inner: TcpStream, idle: Duration, shared: Arc<ConnShared>) -> Self {
        let tick = (idle / u32::from(IDLE_TICKS)).max(Duration::from_millis(1));
        Self {
            inner,
            idle,
            armed_for: idle,
            shared,
            activity: 0,
            seen: 0,
            quiet_ticks: 0,
            timer: Box::pin(tokio::time::sleep(tick)),
        }
    }

    /// Records activity when the I/O made progress; otherwise checks the deadline.
    fn track<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.activity = self.activity.wrapping_add(1);
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_expired(cx).map(Err),
        }
    }

    /// Ready when the connection has been quiet for `IDLE_TICKS` ticks in a row.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let idle = self.shared.idle_override().unwrap_or(self.idle);
        if idle != self.armed_for {
            // The handler changed the timeout (an upgraded tunnel): start counting anew.
            self.armed_for = idle;
            self.quiet_ticks = 0;
            self.seen = self.activity;
            let tick = (idle / u32::from(IDLE_TICKS)).max(Duration::from_millis(1));
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + tick);
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if self.activity == self.seen {
                self.quiet_ticks += 1;
                if self.quiet_ticks >= IDLE_TICKS {
                    return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
            } else {
                self.seen = self.activity;
                self.quiet_ticks = 0;
            }
            let tick = (self.armed_for / u32::from(IDLE_TICKS)).max(Duration::from_millis(1));
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + tick);
        }
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.track(cx, poll)
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.track(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.track(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
