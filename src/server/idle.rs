//! The idle timeout of a client connection.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::server::conn_state::ConnState;
use crate::server::gate::Gate;
use crate::server::io::{Hook, Wrapped};

/// A TCP stream that fails with `TimedOut` once no byte has moved for its idle
/// timeout (see [`IdleTimer`]).
pub type IdleTimeout = Wrapped<IdleTimer>;

/// Wraps `inner` so that it times out after `idle` without a byte moved (or the
/// override the handler sets in `state`).
pub fn idle_timeout(inner: TcpStream, idle: Duration, state: Arc<ConnState>) -> IdleTimeout {
    Wrapped::new(IdleTimer::new(inner, idle, state))
}

/// A TCP stream that fails with `TimedOut` once no byte has moved for `idle`.
///
/// I/O only bumps a counter (no clock read per read or write, which showed in
/// profiles); a timer ticks every quarter of `idle` and the connection expires after
/// four ticks in a row without activity, so a silent connection is closed after
/// between `idle` and 1.25 x `idle`. A tick while a request waits for its backend
/// (see [`ConnState::waiting_for_backend`]) is not quiet: the client is waiting too.
/// The timer is polled behind a [`Gate`]: a read or write that waits polls it only
/// when it has fired (or was reset), not on every wait.
pub struct IdleTimer {
    inner: TcpStream,
    idle: Duration,
    /// The idle timeout the current tick length was computed from.
    armed_for: Duration,
    state: Arc<ConnState>,
    seen: u64,
    quiet_ticks: u8,
    timer: Pin<Box<Sleep>>,
    gate: Gate,
}

const IDLE_TICKS: u8 = 4;

impl IdleTimer {
    fn new(inner: TcpStream, idle: Duration, state: Arc<ConnState>) -> Self {
        let tick = (idle / u32::from(IDLE_TICKS)).max(Duration::from_millis(1));
        Self {
            inner,
            idle,
            armed_for: idle,
            state,
            seen: 0,
            quiet_ticks: 0,
            timer: Box::pin(tokio::time::sleep(tick)),
            gate: Gate::new(),
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
        let idle = self.state.idle_override().unwrap_or(self.idle);
        if idle != self.armed_for {
            // The handler changed the timeout (an upgraded tunnel): start counting anew.
            self.armed_for = idle;
            self.quiet_ticks = 0;
            self.seen = self.state.activity();
            let tick = (idle / u32::from(IDLE_TICKS)).max(Duration::from_millis(1));
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + tick);
            self.gate.rearm();
        }
        if !self.gate.open(cx) {
            return Poll::Pending;
        }
        loop {
            ready!(self.timer.as_mut().poll(&mut self.gate.context()));
            let activity = self.state.activity();
            // Quiet while a request waits for its backend is the backend's slowness,
            // bounded by `response_header_ms`: cutting the client then turned a slow
            // answer into a connection closed before it (seen with idle_ms = 1500).
            if activity == self.seen && !self.state.waiting_for_backend() {
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

impl Hook for IdleTimer {
    type Io = TcpStream;

    fn io(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(&mut self.inner)
    }

    fn io_ref(&self) -> &TcpStream {
        &self.inner
    }

    /// Records activity when the I/O made progress; otherwise checks the deadline.
    fn on_poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.state.bump_activity();
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_expired(cx).map(Err),
        }
    }
}
