//! Parking idle keep-alive connections.
//!
//! hyper keeps its read and write buffers (16 KiB and more) for as long as a
//! connection is open, which made 10,000 idle keep-alive clients cost over half a
//! gigabyte. Once a plain-TCP connection has been quiet for [`PARK_AFTER`] with every
//! request answered and nothing of a next one read (the smuggling guard's scan
//! knows), hyper's connection is shut down without closing the socket, its state
//! freed, and the socket waits for readability alone; the next request starts a
//! fresh hyper connection on the same socket. The client sees nothing (no
//! `Connection: close`, no reconnect). TLS connections are not parked: rustls may
//! hold decrypted bytes that socket readiness would not report.
//!
//! Here: the I/O wrapper that hands the socket back instead of closing it, and the
//! service wrapper that counts open exchanges so the park check knows a connection
//! stands between requests. The parking loop itself is in
//! [`crate::server::connection`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::server::conn_state::{ConnState, OpenExchange};
use crate::server::io::{Hook, Wrapped};

/// How long a keep-alive connection stays quiet between requests before it is
/// parked (checked on ticks of this length, so it parks after one to two ticks).
/// Short enough that idle clients hold no buffers within a second, long enough that
/// a busy connection (requests microseconds apart) never pays for a re-park.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// The I/O hyper serves a connection through. While the connection is being parked
/// it leaves the socket open on shutdown, and when hyper drops it, it hands the
/// I/O back to the accept loop instead of closing it.
pub struct Parkable<T> {
    /// Always `Some` until dropped.
    io: Option<T>,
    slot: Arc<Mutex<Option<T>>>,
    state: Arc<ConnState>,
}

impl<T> Parkable<T> {
    pub fn new(io: T, slot: Arc<Mutex<Option<T>>>, state: Arc<ConnState>) -> Wrapped<Self> {
        Wrapped::new(Self {
            io: Some(io),
            slot,
            state,
        })
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Hook for Parkable<T> {
    type Io = T;

    fn io(&mut self) -> Pin<&mut T> {
        Pin::new(
            self.io
                .as_mut()
                .expect("Parkable holds its I/O until dropped"),
        )
    }

    fn io_ref(&self) -> &T {
        self.io
            .as_ref()
            .expect("Parkable holds its I/O until dropped")
    }

    /// hyper flushed before asking; while parking, the socket stays open for the
    /// next request.
    fn shuts_down(&self) -> bool {
        !self.state.parking()
    }
}

impl<T> Drop for Parkable<T> {
    fn drop(&mut self) {
        if self.state.parking() {
            *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = self.io.take();
        }
    }
}

/// The service, counting each exchange open from the request until hyper is done
/// with the response body (so the park check knows a connection is between requests).
#[derive(Clone)]
pub struct Tracked<S> {
    pub inner: S,
    pub state: Arc<ConnState>,
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
            exchange: Some(self.state.open_exchange()),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The service's future; moves the open exchange into the response body.
    pub struct TrackedFuture<F> {
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
    pub struct TrackedBody<B> {
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
