//! The accept loop shared by the proxy, the admin listener and the demo backend.
//!
//! Each connection is served by hyper-util's auto builder (HTTP/1.1, and HTTP/2 with
//! prior knowledge or by TLS ALPN, told apart by the connection preface) in a task
//! tracked for the drain. On shutdown the listener is dropped at once (new connections
//! are refused), every connection is asked to shut down gracefully (idle keep-alive
//! ones close, requests in flight finish) and gets up to `drain_timeout` before the
//! rest are cut. `max_connections` is a semaphore taken before `accept`, so excess
//! clients wait in the kernel backlog instead of being accepted and dropped.
//!
//! Idle keep-alive connections are parked. hyper keeps its read and write buffers
//! (16 KiB and more) for as long as a connection is open, which made 10,000 idle
//! keep-alive clients cost over half a gigabyte. Once a plain-TCP connection has
//! been quiet for [`PARK_AFTER`] with every request answered and nothing of a next
//! one read (the framing scan knows), hyper's connection is shut down without closing
//! the socket, its state freed, and the socket waits for readability alone; the next
//! request starts a fresh hyper connection on the same socket. The client sees
//! nothing (no `Connection: close`, no reconnect). TLS connections are not parked:
//! rustls may hold decrypted bytes that socket readiness would not report.

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
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::framing::{ConnShared, FramingGuard, OpenExchange};
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
    /// Gauge of parked idle keep-alive connections, if this listener is counted.
    pub parked: Option<prometheus::IntGauge>,
    /// This listener's worker thread, when client connections are balanced over
    /// several (see [`crate::balance`]).
    pub balance: Option<crate::balance::Worker>,
}

/// How long a keep-alive connection stays quiet between requests before it is
/// parked (checked on ticks of this length, so it parks after one to two ticks).
/// Short enough that idle clients hold no buffers within a second, long enough that
/// a busy connection (requests microseconds apart) never pays for a re-park.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

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
            parked: None,
            balance: None,
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
    S: HttpService<B> + Clone,
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

    let mut inbox = options
        .balance
        .as_ref()
        .and_then(crate::balance::Worker::take_inbox);
    loop {
        let permit = match &limit {
            None => None,
            Some(limit) => tokio::select! {
                () = shutdown.cancelled() => break,
                permit = Arc::clone(limit).acquire_owned() => permit.ok(),
            },
        };
        let (stream, peer, permit) = tokio::select! {
            () = shutdown.cancelled() => break,
            // Another worker's connection: its permit comes with it, ours goes back.
            handoff = next_handoff(&mut inbox) => match TcpStream::from_std(handoff.stream) {
                Ok(stream) => (stream, handoff.peer, handoff.permit),
                Err(error) => {
                    debug!(listener = name, %error, "handed-off connection unusable");
                    continue;
                }
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match options.balance.as_ref().and_then(|w| w.target().map(|to| (w, to))) {
                    None => (stream, peer, permit),
                    Some((worker, to)) => match hand_off(worker, to, stream, peer, permit) {
                        None => continue,
                        Some(back) => back,
                    },
                },
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
        let serving = options
            .balance
            .as_ref()
            .map(crate::balance::Worker::serving);
        let builder = Arc::clone(&builder);
        let parked = options.parked.clone();
        let ends = Ends {
            drain: drain.clone(),
            force_close: force_close.clone(),
        };
        let tls = options
            .tls
            .as_ref()
            .map(|t| TlsAcceptor::from(t.load_full()));
        let handshake_timeout = options.header_read_timeout;
        tracker.spawn(async move {
            let _held = (permit, counted, serving);
            let scan_shared = Arc::clone(&framing);
            let conn = Conn {
                name,
                peer,
                builder: &builder,
                shared: &framing,
                ends: &ends,
            };
            match tls {
                None => {
                    let io = FramingGuard::new(io, scan_shared);
                    conn.serve_tcp(io, service, parked).await;
                }
                // Boxed: the handshake future is large, and inline it would size every
                // connection's task, plain ones included, for its whole life.
                Some(acceptor) => {
                    Box::pin(async {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                            Ok(Ok(tls_stream)) => {
                                let io = FramingGuard::new(tls_stream, scan_shared);
                                conn.serve_once(io, service, None).await;
                            }
                            Ok(Err(error)) => {
                                debug!(listener = name, %peer, %error, "TLS handshake failed");
                            }
                            Err(_) => debug!(listener = name, %peer, "TLS handshake timed out"),
                        }
                    })
                    .await;
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

/// The next connection another worker hands this one; never, without an inbox (or
/// once every sender is gone).
async fn next_handoff(
    inbox: &mut Option<tokio::sync::mpsc::UnboundedReceiver<crate::balance::Handoff>>,
) -> crate::balance::Handoff {
    if let Some(rx) = inbox
        && let Some(handoff) = rx.recv().await
    {
        return handoff;
    }
    *inbox = None;
    std::future::pending().await
}

/// Hands an accepted connection to worker `to`. Gives it back to serve here when that
/// worker stopped taking connections (shutdown), or `None` once it is sent (or lost:
/// a socket that cannot leave this runtime is closed).
fn hand_off(
    worker: &crate::balance::Worker,
    to: usize,
    stream: TcpStream,
    peer: SocketAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Option<(
    TcpStream,
    SocketAddr,
    Option<tokio::sync::OwnedSemaphorePermit>,
)> {
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => {
            debug!(%peer, %error, "cannot hand off connection");
            return None;
        }
    };
    let handoff = crate::balance::Handoff {
        stream,
        peer,
        permit,
    };
    let back = worker.hand_off(to, handoff).err()?;
    match TcpStream::from_std(back.stream) {
        Ok(stream) => Some((stream, back.peer, back.permit)),
        Err(error) => {
            debug!(%peer, %error, "cannot take back connection");
            None
        }
    }
}

/// How a connection's service ends: gracefully once `drain` fires, cut when
/// `force_close` fires.
struct Ends {
    drain: CancellationToken,
    force_close: CancellationToken,
}

/// One accepted connection, for its whole life.
struct Conn<'a> {
    name: &'static str,
    peer: SocketAddr,
    builder: &'a auto::Builder<TokioExecutor>,
    shared: &'a Arc<ConnShared>,
    ends: &'a Ends,
}

impl Conn<'_> {
    /// Serves a plain TCP connection, parking it whenever it idles between requests.
    async fn serve_tcp<S, B>(
        &self,
        mut io: FramingGuard<IdleTimeout>,
        service: S,
        parked: Option<prometheus::IntGauge>,
    ) where
        S: HttpService<B> + Clone,
        B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
    {
        loop {
            // Boxed: while parked, the task keeps none of a served connection's state.
            match Box::pin(self.serve_once(io, service.clone(), Some(PARK_AFTER))).await {
                Some(back) => io = back,
                None => return,
            }
            io.release_buffers();
            let _parked = parked.clone().map(crate::metrics::GaugeGuard::new);
            // The wait is kept small: it is what 10,000 idle clients cost.
            let woke = tokio::select! {
                woke = std::future::poll_fn(|cx| io.get_mut().poll_parked(cx)) => woke,
                // An idle connection closes at once on shutdown (`force_close` comes
                // only after `drain`).
                () = self.ends.drain.cancelled() => false,
            };
            if !woke {
                return;
            }
        }
    }

    /// Serves `io` with hyper until the connection ends (`None`), or until it is
    /// parked (`Some`: the I/O, between requests, with hyper's state dropped).
    /// `park_after: None` never parks.
    async fn serve_once<T, S, B>(
        &self,
        io: T,
        service: S,
        park_after: Option<Duration>,
    ) -> Option<T>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: HttpService<B>,
        B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None));
        let io = TokioIo::new(Parkable {
            io: Some(io),
            slot: Arc::clone(&slot),
            shared: Arc::clone(self.shared),
        });
        let service = Tracked {
            inner: service,
            shared: Arc::clone(self.shared),
        };
        // Boxed so that a parked connection's task does not keep hyper's state inline.
        let mut connection = Box::pin(self.builder.serve_connection_with_upgrades(io, service));
        let mut tick = park_after.map(|every| Box::pin(tokio::time::sleep(every)));
        let mut seen = self.shared.activity();
        let (drain, force_close) = (&self.ends.drain, &self.ends.force_close);
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result,
                () = drain.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection.as_mut() => break result,
                        () = force_close.cancelled() => return None,
                    }
                }
                () = force_close.cancelled() => return None,
                () = next_tick(tick.as_mut()) => {
                    let activity = self.shared.activity();
                    if activity == seen && self.shared.between_requests() {
                        // hyper is idle: a graceful shutdown ends it at once, flushing
                        // first; `Parkable` skips the socket shutdown and hands it back.
                        self.shared.set_parking(true);
                        connection.as_mut().graceful_shutdown();
                        let result = tokio::select! {
                            result = connection.as_mut() => result,
                            () = force_close.cancelled() => return None,
                        };
                        drop(connection);
                        self.shared.set_parking(false);
                        let io = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                        if io.is_some() && self.shared.between_requests() {
                            return io;
                        }
                        break result;
                    }
                    seen = activity;
                    if let (Some(tick), Some(every)) = (tick.as_mut(), park_after) {
                        tick.as_mut().reset(tokio::time::Instant::now() + every);
                    }
                }
            }
        };
        if let Err(error) = result {
            debug!(listener = self.name, peer = %self.peer, %error, "connection ended with error");
        }
        None
    }
}

/// Waits for the park check's next tick; never, without one.
async fn next_tick(tick: Option<&mut Pin<Box<Sleep>>>) {
    match tick {
        Some(tick) => tick.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The I/O hyper serves a connection through. While the connection is being parked
/// it leaves the socket open on shutdown, and when hyper drops it, it hands the
/// I/O back to the accept loop instead of closing it.
struct Parkable<T> {
    /// Always `Some` until dropped.
    io: Option<T>,
    slot: Arc<Mutex<Option<T>>>,
    shared: Arc<ConnShared>,
}

impl<T> Parkable<T> {
    fn io(&mut self) -> Pin<&mut T>
    where
        T: Unpin,
    {
        Pin::new(
            self.io
                .as_mut()
                .expect("Parkable holds its I/O until dropped"),
        )
    }
}

impl<T> Drop for Parkable<T> {
    fn drop(&mut self) {
        if self.shared.parking() {
            *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = self.io.take();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Parkable<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Parkable<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shared.parking() {
            // hyper flushed before asking; the socket stays open for the next request.
            return Poll::Ready(Ok(()));
        }
        this.io().poll_shutdown(cx)
    }
}

/// The service, counting each exchange open from the request until hyper is done
/// with the response body (so the park check knows a connection is between requests).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    shared: Arc<ConnShared>,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        TrackedFuture {
            exchange: Some(self.shared.open_exchange()),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The service's future; moves the open exchange into the response body.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        exchange: Option<OpenExchange>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let exchange = this.exchange.take();
        Poll::Ready(result.map(|response| {
            response.map(|inner| TrackedBody {
                inner,
                _exchange: exchange,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its exchange when hyper drops it.
    struct TrackedBody<B> {
        #[pin]
        inner: B,
        _exchange: Option<OpenExchange>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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
            seen: 0,
            quiet_ticks: 0,
            timer: Box::pin(tokio::time::sleep(tick)),
        }
    }

    /// Records activity when the I/O made progress; otherwise checks the deadline.
    fn track<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.shared.bump_activity();
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_expired(cx).map(Err),
        }
    }

    /// Ready when the connection has been quiet for `IDLE_TICKS` ticks in a row.
    /// While parked: `true` once the socket is readable (a request, or the client
    /// closing), `false` when the idle timeout expires first.
    pub fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.inner.poll_read_ready(cx).is_ready() {
            return Poll::Ready(true);
        }
        self.poll_expired(cx).map(|_| false)
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let idle = self.shared.idle_override().unwrap_or(self.idle);
        if idle != self.armed_for {
            // The handler changed the timeout (an upgraded tunnel): start counting anew.
            self.armed_for = idle;
            self.quiet_ticks = 0;
            self.seen = self.shared.activity();
            let tick = (idle / u32::from(IDLE_TICKS)).max(Duration::from_millis(1));
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + tick);
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let activity = self.shared.activity();
            if activity == self.seen {
                self.quiet_ticks += 1;
                if self.quiet_ticks >= IDLE_TICKS {
                    return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
            } else {
                self.seen = activity;
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
