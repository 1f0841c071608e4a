//! The accept loop shared by the proxy, the admin listener and the demo backend.
//!
//! Each connection is served by hyper-util's auto builder (HTTP/1.1, and HTTP/2 with
//! prior knowledge or by TLS ALPN, told apart by the connection preface) in a task
//! tracked for the drain. On shutdown the listener is dropped at once (new connections
//! are refused), every connection is asked to shut down gracefully (idle keep-alive
//! ones close, requests in flight finish) and gets up to `drain_timeout` before the
//! rest are cut. `max_connections` is a semaphore taken before `accept`, so excess
//! clients wait in the kernel backlog instead of being accepted and dropped. The
//! side listeners (admin, SMS, the doctor's and maintenance's metrics) instead
//! close a connection past their small cap at once ([`OverLimit::Close`]): their
//! clients are a scraper and an operator, and a flood of idle connections there must
//! neither pin descriptors the proxy needs nor park a scrape in the backlog.
//!
//! Idle keep-alive connections are parked between requests (see
//! [`crate::server::park`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Body;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::observe::metrics::{AcceptErrorKind, GaugeGuard};
use crate::server::balance::{Handoff, Worker};
use crate::server::conn_state::ConnState;
use crate::server::connection::{BoxError, ConnectionTask, Ends, HttpService};
use crate::server::guard::SmugglingGuard;
use crate::server::idle::idle_timeout;
use crate::tls::TlsSource;

/// HTTP/2 streams open at once per connection (nginx: 128; hyper's default: 200).
pub const H2_MAX_STREAMS: u32 = 100;
/// Response bytes buffered per HTTP/2 stream beyond what the socket took (hyper's
/// default: 400 KiB). A stream's worst case adds the upstream read blocks it streams
/// from (32 KiB each, see `client::body`): a connection whose client opened its
/// windows and reads nothing pins about 100 x 85 KiB, 8.3 MiB measured (49.8 MiB
/// with hyper's defaults). A smaller buffer also raised large-body HTTP/2 throughput
/// (1.4-1.55 to 1.8-1.9 GB/s here): fewer bytes wait behind each stream.
pub const H2_SEND_BUF: usize = 16 * 1024;

/// Connections open at once on a side listener (admin, SMS, a co-located process's
/// metrics): a scraper, a load balancer's probes and a few operators.
pub const SIDE_MAX_CONNECTIONS: usize = 64;
/// Request line plus headers on a side listener.
pub const SIDE_MAX_HEADER_BYTES: usize = 16 * 1024;

/// What a listener does with a connection past `max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// Leave it in the kernel backlog until a connection closes (the proxy).
    Wait,
    /// Accept and close it at once (the side listeners).
    Close,
}

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
    /// several (see [`crate::server::balance`]).
    pub balance: Option<Worker>,
    /// Counter of failed accepts by `kind` ([`AcceptErrorKind`]), if counted.
    pub accept_errors: Option<prometheus::IntCounterVec>,
    /// Past `max_connections`: wait in the backlog, or close.
    pub over_limit: OverLimit,
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
            parked: None,
            balance: None,
            accept_errors: None,
            over_limit: OverLimit::Wait,
        }
    }

    /// A side listener's settings: [`SIDE_MAX_CONNECTIONS`] (past it, closed at
    /// once) and [`SIDE_MAX_HEADER_BYTES`].
    pub fn side(
        header_read_timeout: Duration,
        idle_timeout: Duration,
        drain_timeout: Duration,
    ) -> Self {
        Self {
            max_connections: Some(SIDE_MAX_CONNECTIONS),
            max_header_bytes: Some(SIDE_MAX_HEADER_BYTES),
            over_limit: OverLimit::Close,
            ..Self::basic(header_read_timeout, idle_timeout, drain_timeout)
        }
    }
}

/// Failed accepts on one listener, as episodes: the first failure of an episode is
/// logged at warn and the rest only counted, with a backoff that doubles from 10 ms
/// to 1 s (the pending connection waits in the kernel backlog meanwhile, and the
/// connections already open are served as usual); the first accept that works again
/// ends the episode with one info line.
struct AcceptErrors {
    listener: &'static str,
    counter: Option<prometheus::IntCounterVec>,
    /// Failures in the current episode, and when it began.
    episode: Option<(std::time::Instant, u64)>,
    backoff: Duration,
}

impl AcceptErrors {
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);

    fn new(listener: &'static str, counter: Option<prometheus::IntCounterVec>) -> Self {
        Self {
            listener,
            counter,
            episode: None,
            backoff: Self::FIRST_BACKOFF,
        }
    }

    /// Records a failure; returns how long to wait before accepting again.
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        let kind = AcceptErrorKind::of(error);
        if let Some(counter) = &self.counter {
            counter.with_label_values(&[kind.as_str()]).inc();
        }
        match &mut self.episode {
            Some((_, failures)) => *failures += 1,
            None => {
                warn!(listener = self.listener, kind = kind.as_str(), %error, "accept failing; backing off (connections already open are still served)");
                self.episode = Some((std::time::Instant::now(), 1));
            }
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
        wait
    }

    /// An accept worked: ends an episode, if one was running.
    fn succeeded(&mut self) {
        if let Some((since, failures)) = self.episode.take() {
            info!(
                listener = self.listener,
                failures,
                duration_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                "accept recovered"
            );
            self.backoff = Self::FIRST_BACKOFF;
        }
    }
}

/// Serves `listener` until `shutdown` is cancelled, then drains.
///
/// `service_for` builds the service for one connection from the peer address and the
/// connection's framing verdicts (see [`crate::server::guard`]).
pub async fn serve<F, S, B>(
    name: &'static str,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: CancellationToken,
    service_for: F,
) where
    F: Fn(SocketAddr, Arc<ConnState>) -> S,
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
        // What one connection may pin (see H2_* above): a client that opens its
        // windows and never reads holds at most this, not hyper's defaults (200
        // streams of 400 KiB send buffer each).
        http2
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_send_buf_size(H2_SEND_BUF);
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

    let mut inbox = options.balance.as_ref().and_then(Worker::take_inbox);
    let mut accept_errors = AcceptErrors::new(name, options.accept_errors.clone());
    loop {
        let permit = match &limit {
            None => None,
            Some(_) if options.over_limit == OverLimit::Close => None,
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
            accepted = listener.accept() => match accepted.inspect(|_| accept_errors.succeeded()) {
                Ok((stream, peer)) if options.over_limit == OverLimit::Close => {
                    match limit.as_ref().map(|l| Arc::clone(l).try_acquire_owned()) {
                        Some(Err(_)) => {
                            debug!(listener = name, %peer, "connection limit reached; closed");
                            continue;
                        }
                        Some(Ok(permit)) => (stream, peer, Some(permit)),
                        None => (stream, peer, None),
                    }
                }
                Ok((stream, peer)) => match options.balance.as_ref().and_then(|w| w.target().map(|to| (w, to))) {
                    None => (stream, peer, permit),
                    Some((worker, to)) => match hand_off(worker, to, stream, peer, permit) {
                        None => continue,
                        Some(back) => back,
                    },
                },
                Err(error) => {
                    // Usually EMFILE: the listener stays readable, so accepting again
                    // at once would spin on the same error.
                    let wait = accept_errors.failed(&error);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(wait) => continue,
                    }
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(listener = name, %error, "set_nodelay failed");
        }
        let framing = Arc::new(ConnState::default());
        let io = idle_timeout(stream, options.idle_timeout, Arc::clone(&framing));
        let service = service_for(peer, Arc::clone(&framing));
        let counted = options.connections.clone().map(GaugeGuard::new);
        let serving = options.balance.as_ref().map(Worker::serving);
        let builder = Arc::clone(&builder);
        let parked = options.parked.clone();
        let ends = Ends {
            drain: drain.clone(),
            force_close: force_close.clone(),
        };
        let tls = options.tls.as_ref().map(|t| t.acceptor());
        let handshake_timeout = options.header_read_timeout;
        tracker.spawn(async move {
            let _held = (permit, counted, serving);
            let scan_shared = Arc::clone(&framing);
            let conn = ConnectionTask {
                name,
                peer,
                builder: &builder,
                state: &framing,
                ends: &ends,
            };
            match tls {
                None => {
                    let io = SmugglingGuard::wrap(io, scan_shared);
                    conn.serve_tcp(io, service, parked).await;
                }
                // Boxed: the handshake future is large, and inline it would size every
                // connection's task, plain ones included, for its whole life.
                Some(acceptor) => {
                    Box::pin(async {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                            Ok(Ok(tls_stream)) => {
                                let io = SmugglingGuard::wrap(tls_stream, scan_shared);
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
    inbox: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Handoff>>,
) -> Handoff {
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
    worker: &Worker,
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
    let handoff = Handoff {
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
