//! The accept loop shared by the proxy, the admin listener and the demo backend.
//!
//! Each connection is served by hyper-util's auto builder (HTTP/1.1, and HTTP/2 with
//! prior knowledge, told apart by the connection preface) and watched by a
//! `GracefulShutdown`. On shutdown the listener is dropped at once (new connections
//! are refused), idle keep-alive connections are closed, and requests in flight get
//! up to `drain_timeout` to finish before the remaining connections are cut.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Per-listener connection settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A client must send a request's headers within this time (slowloris guard).
    /// hyper also applies it to an idle HTTP/1.1 keep-alive connection waiting for its
    /// next request.
    pub header_read_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    pub idle_timeout: Duration,
    /// How long in-flight requests may run after shutdown begins.
    pub drain_timeout: Duration,
    /// Gauge of open connections, if this listener is counted.
    pub connections: Option<prometheus::IntGauge>,
}

/// Serves `listener` until `shutdown` is cancelled, then drains.
///
/// `service_for` builds the service for one connection from the peer address.
pub async fn serve<F, S, B>(
    name: &'static str,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: CancellationToken,
    service_for: F,
) where
    F: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    // Cancelled when the drain deadline passes: cuts connections still open.
    let force_close = CancellationToken::new();

    loop {
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
        let io = TokioIo::new(IdleTimeout::new(stream, options.idle_timeout));
        let connection = builder
            .serve_connection_with_upgrades(io, service_for(peer))
            .into_owned();
        let connection = graceful.watch(connection);
        let force_close = force_close.clone();
        let counted = options.connections.clone().map(ConnectionCount::new);
        tokio::spawn(async move {
            let _counted = counted;
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        debug!(listener = name, %peer, %error, "connection ended with error");
                    }
                }
                () = force_close.cancelled() => {}
            }
        });
    }

    drop(listener);
    info!(listener = name, "stopped accepting; draining");
    match tokio::time::timeout(options.drain_timeout, graceful.shutdown()).await {
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

/// Counts a connection in a gauge while it lives.
struct ConnectionCount(prometheus::IntGauge);

impl ConnectionCount {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A TCP stream that fails with `TimedOut` once no byte has moved for `idle`.
///
/// The timer is reset lazily: a read or write only records the time, and the sleep is
/// re-armed when it fires early, so busy connections pay no timer cost per I/O.
pub struct IdleTimeout {
    inner: TcpStream,
    idle: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl IdleTimeout {
    pub fn new(inner: TcpStream, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            idle,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until((now + idle).into())),
        }
    }

    /// Records activity when the I/O made progress; otherwise checks the deadline.
    fn track<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.last_activity = Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_expired(cx).map(Err),
        }
    }

    /// Ready when the connection has been idle for the whole timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let deadline = self.last_activity + self.idle;
            if Instant::now() >= deadline {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
            }
            self.timer.as_mut().reset(deadline.into());
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
