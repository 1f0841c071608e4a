//! Keep-alive connections to one backend, reused across requests.
//!
//! hyper-util's general-purpose client showed in profiles (a mutex shared by all
//! threads and a hash lookup per checkout, boxed connect futures per request), so the
//! proxy keeps its own small pool per backend and worker thread: a stack of idle
//! HTTP/1.1 senders behind a lock only that worker takes (uncontended). A sender goes
//! back when the response body has been read to its end; a body dropped early takes
//! its connection with it, since its state is unknown. A request that a reused
//! connection refused before writing anything (it was closing) is sent again on
//! another one.
//!
//! Last in, first out: the connections in use stay warm at the top, and the ones a
//! burst left behind sink to the bottom, where [`ConnPool::purge`] closes them (as
//! HAProxy's pool-purge-delay does): each idle connection holds hyper's buffers, and
//! after a 512-connection load the pools held about 30 MiB. Connections older than
//! `idle_ms` are also closed when met.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::upstream::{UpstreamBody, now_ms};

/// Idle connections kept per backend and worker thread; more are closed when returned.
pub const MAX_IDLE: usize = 256;

/// Idle connections unused for this long are purged, half of them per purge.
pub const PURGE_AFTER_MS: u64 = 5_000;

static WORKERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Declares how many worker threads serve requests (once, before any pool is built).
/// Each worker gets its own idle connections per backend, so a connection's task and
/// its requests stay on one thread.
pub fn set_workers(n: usize) {
    let _ = WORKERS.set(n.max(1));
}

pub fn workers() -> usize {
    WORKERS.get().copied().unwrap_or(1)
}

/// Marks the current thread as worker `index` (0-based).
pub fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// Per-worker pools of one backend.
#[derive(Debug)]
pub struct WorkerPools(Box<[Arc<ConnPool>]>);

impl Default for WorkerPools {
    fn default() -> Self {
        Self((0..workers()).map(|_| Arc::default()).collect())
    }
}

impl WorkerPools {
    /// The pool of the calling worker thread.
    pub fn local(&self) -> &Arc<ConnPool> {
        let index = WORKER.with(std::cell::Cell::get);
        &self.0[index % self.0.len()]
    }

    pub fn idle_count(&self) -> usize {
        self.0.iter().map(|p| p.idle_count()).sum()
    }

    /// Purges every worker's pool (see [`ConnPool::purge`]); returns how many closed.
    pub fn purge(&self, now_ms: u64) -> usize {
        self.0.iter().map(|p| p.purge(now_ms)).sum()
    }
}

/// Why no response came back.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connect to {0} failed: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("connect to {0} timed out after {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("HTTP/1.1 handshake with {0} failed")]
    Handshake(String, #[source] hyper::Error),
    #[error("exchange failed")]
    Exchange(#[source] hyper::Error),
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since_ms: u64,
}

/// The idle connections of one backend on one worker: a stack, oldest at the bottom
/// (so `since_ms` never decreases from bottom to top).
#[derive(Default)]
pub struct ConnPool {
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("idle", &self.idle_count())
            .finish()
    }
}

/// Connection settings read per exchange, so a reload applies to new connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectSettings {
    pub connect_timeout: Duration,
    pub idle_ms: u64,
}

impl ConnPool {
    pub fn idle_count(&self) -> usize {
        self.stack().len()
    }

    fn stack(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes half (rounded up) of the idle connections unused for
    /// [`PURGE_AFTER_MS`]: called every second, a burst's leftovers are gone within
    /// seconds while connections in steady use are never touched. Returns how many
    /// it closed.
    pub fn purge(&self, now_ms: u64) -> usize {
        let closed: Vec<Idle> = {
            let mut stack = self.stack();
            let n = purge_count(stack.iter().map(|c| c.since_ms), now_ms);
            stack.drain(..n).collect()
        };
        closed.len() // dropped outside the lock
    }

    /// Sends `req` to `authority` on an idle connection, or a new one.
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        mut req: Request<UpstreamBody>,
        settings: ConnectSettings,
    ) -> Result<Response<PooledBody>, ExchangeError> {
        loop {
            let (mut sender, reused) = match self.checkout(settings.idle_ms).await {
                Some(sender) => (sender, true),
                None => (connect(authority, settings.connect_timeout).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let pool = Arc::clone(self);
                    return Ok(response.map(|body| PooledBody::new(body, sender, pool)));
                }
                Err(mut error) => match error.take_message() {
                    // Never written: the reused connection was closing. Try another.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(ExchangeError::Exchange(error.into_error())),
                },
            }
        }
    }

    /// An idle connection ready for a request, dropping closed and expired ones.
    async fn checkout(&self, idle_ms: u64) -> Option<SendRequest<UpstreamBody>> {
        loop {
            // The lock is released at the end of this statement, before any await.
            let Idle {
                mut sender,
                since_ms,
            } = self.stack().pop()?;
            if sender.is_closed() || now_ms().saturating_sub(since_ms) > idle_ms {
                continue;
            }
            // Usually ready at once; right after a body ended the connection task
            // may still be finishing the exchange.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn put_back(&self, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut stack = self.stack();
        if stack.len() < MAX_IDLE {
            stack.push(Idle {
                sender,
                since_ms: now_ms(),
            });
        } else {
            drop(stack);
            drop(sender); // a full pool closes the connection (outside the lock)
        }
    }
}

/// How many connections from the bottom of a stack idle since `since_ms` (oldest
/// first) a purge at `now_ms` closes: half of the stale ones, rounded up.
fn purge_count(since_ms: impl Iterator<Item = u64>, now_ms: u64) -> usize {
    since_ms
        .take_while(|&since| now_ms.saturating_sub(since) >= PURGE_AFTER_MS)
        .count()
        .div_ceil(2)
}

async fn connect(
    authority: &Authority,
    timeout: Duration,
) -> Result<SendRequest<UpstreamBody>, ExchangeError> {
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(ExchangeError::Connect(authority.to_string(), e)),
        Err(_) => {
            return Err(ExchangeError::ConnectTimeout(
                authority.to_string(),
                timeout,
            ));
        }
    };
    // Headers are small writes that must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ExchangeError::Handshake(authority.to_string(), e))?;
    let backend = authority.clone();
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            debug!(%backend, %error, "upstream connection ended with error");
        }
    });
    Ok(sender)
}

/// A response body that returns its connection to the pool once read to the end.
pub struct PooledBody {
    body: Incoming,
    home: Option<(SendRequest<UpstreamBody>, Arc<ConnPool>)>,
}

impl PooledBody {
    fn new(body: Incoming, sender: SendRequest<UpstreamBody>, pool: Arc<ConnPool>) -> Self {
        let mut this = Self {
            body,
            home: Some((sender, pool)),
        };
        if this.body.is_end_stream() {
            this.release();
        }
        this
    }

    fn release(&mut self) {
        if let Some((sender, pool)) = self.home.take() {
            pool.put_back(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.body).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            // An error leaves the connection in an unknown state: it is dropped.
            Poll::Ready(Some(Err(_))) => this.home = None,
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_closes_half_of_the_stale_bottom_rounded_up() {
        let now = 100_000;
        let stale = now - PURGE_AFTER_MS;
        // Oldest first; the fresh ones on top are never touched.
        assert_eq!(
            purge_count([stale - 9, stale, now - 1, now].into_iter(), now),
            1
        );
        assert_eq!(purge_count([stale; 7].into_iter(), now), 4);
        assert_eq!(purge_count([stale + 1; 7].into_iter(), now), 0);
        assert_eq!(purge_count(std::iter::empty(), now), 0);
        // Repeated purges of 10 stale connections: 10 -> 5 -> 2 -> 1 -> 0.
        let mut left = 10usize;
        let mut seen = Vec::new();
        while left > 0 {
            left -= purge_count(std::iter::repeat_n(stale, left), now);
            seen.push(left);
        }
        assert_eq!(seen, [5, 2, 1, 0]);
    }
}
