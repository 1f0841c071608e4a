//! One accepted client connection for its whole life: hyper serves it until it
//! ends, idles into parking (and wakes again), drains or is cut.

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::debug;

use crate::observe::metrics::GaugeGuard;
use crate::server::conn_state::ConnState;
use crate::server::gate::Gate;
use crate::server::guard::FramingGuard;
use crate::server::idle::IdleTimeout;
use crate::server::park::{PARK_AFTER, Parkable, Tracked};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

/// How a connection's service ends: gracefully once `drain` fires, cut when
/// `force_close` fires.
pub struct Ends {
    pub drain: CancellationToken,
    pub force_close: CancellationToken,
}

/// One accepted connection, for its whole life.
pub struct ConnectionTask<'a> {
    pub name: &'static str,
    pub peer: SocketAddr,
    pub builder: &'a auto::Builder<TokioExecutor>,
    pub state: &'a Arc<ConnState>,
    pub ends: &'a Ends,
}

impl ConnectionTask<'_> {
    /// Serves a plain TCP connection, parking it whenever it idles between requests.
    pub async fn serve_tcp<S, B>(
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
            io.hook_mut().release_buffers();
            let _parked = parked.clone().map(GaugeGuard::new);
            // The wait is kept small: it is what 10,000 idle clients cost.
            let woke = tokio::select! {
                woke = std::future::poll_fn(|cx| io.hook_mut().get_mut().hook_mut().poll_parked(cx)) => woke,
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
    pub async fn serve_once<T, S, B>(
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
        let io = TokioIo::new(Parkable::new(io, Arc::clone(&slot), Arc::clone(self.state)));
        let service = Tracked {
            inner: service,
            state: Arc::clone(self.state),
        };
        // Boxed so that a parked connection's task does not keep hyper's state inline.
        let mut connection = Box::pin(self.builder.serve_connection_with_upgrades(io, service));
        let mut watch = Watch {
            drain: Box::pin(self.ends.drain.cancelled()),
            force_close: Box::pin(self.ends.force_close.cancelled()),
            tick: park_after.map(|every| Box::pin(tokio::time::sleep(every))),
            gate: Gate::new(),
        };
        let mut seen = self.state.activity();
        let force_close = &self.ends.force_close;
        let result = loop {
            let event = tokio::select! {
                biased;
                result = connection.as_mut() => break result,
                event = std::future::poll_fn(|cx| watch.poll(cx)) => event,
            };
            match event {
                Event::ForceClose => return None,
                Event::Drain => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection.as_mut() => break result,
                        () = force_close.cancelled() => return None,
                    }
                }
                Event::Tick => {
                    let activity = self.state.activity();
                    if activity == seen && self.state.between_requests() {
                        // hyper is idle: a graceful shutdown ends it at once, flushing
                        // first; `Parkable` skips the socket shutdown and hands it back.
                        self.state.set_parking(true);
                        connection.as_mut().graceful_shutdown();
                        let result = tokio::select! {
                            result = connection.as_mut() => result,
                            () = force_close.cancelled() => return None,
                        };
                        drop(connection);
                        self.state.set_parking(false);
                        let io = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                        if io.is_some() && self.state.between_requests() {
                            return io;
                        }
                        break result;
                    }
                    seen = activity;
                    if let (Some(tick), Some(every)) = (watch.tick.as_mut(), park_after) {
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

/// What ends or checks a served connection, besides hyper finishing it.
enum Event {
    Drain,
    ForceClose,
    /// The park check's tick.
    Tick,
}

/// The drain and force-close tokens and the park tick, polled behind one [`Gate`]:
/// only when one of them fired, not on every wake of the connection's task.
struct Watch<'a> {
    drain: Pin<Box<WaitForCancellationFuture<'a>>>,
    force_close: Pin<Box<WaitForCancellationFuture<'a>>>,
    tick: Option<Pin<Box<Sleep>>>,
    gate: Gate,
}

impl Watch<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if !self.gate.open(cx) {
            return Poll::Pending;
        }
        let mut gated = self.gate.context();
        let event = if self.force_close.as_mut().poll(&mut gated).is_ready() {
            Event::ForceClose
        } else if self.drain.as_mut().poll(&mut gated).is_ready() {
            Event::Drain
        } else if let Some(tick) = self.tick.as_mut()
            && tick.as_mut().poll(&mut gated).is_ready()
        {
            Event::Tick
        } else {
            return Poll::Pending;
        };
        // Whatever fired is handled (a tick is reset): poll all of them next time.
        self.gate.rearm();
        Poll::Ready(event)
    }
}
