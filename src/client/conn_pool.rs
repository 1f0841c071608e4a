//! Keep-alive connections to one backend, reused across requests, and the limits
//! that keep a burst of requests from becoming a connection storm on it.
//!
//! hyper-util's general-purpose client showed in profiles (a mutex shared by all
//! threads and a hash lookup per checkout, boxed connect futures per request), so the
//! proxy keeps its own small pool per backend and worker thread: a stack of idle
//! HTTP/1.1 connections ([`BackendConn`]) behind a lock only that worker takes
//! (uncontended). A connection goes back when its response ended cleanly (see
//! [`crate::client::body::PooledBody`]); a body dropped early takes its connection with it,
//! since its state is unknown. A connection the backend closed while it was idle is
//! seen at checkout (the socket turned readable) and dropped.
//!
//! Last in, first out: the connections in use stay warm at the top, and the ones a
//! burst left behind sink to the bottom, where [`ConnPool::purge`] closes them (as
//! HAProxy's pool-purge-delay does): after a 512-connection load the pools held
//! hundreds of sockets. Connections older than `idle_ms` are also closed when met.
//!
//! The limits are per backend, over all workers (issue 29): four HTTP/2 clients
//! opening 100 streams each made a fresh proxy open 400 connections at once, the
//! backend's accept queue (128) overflowed, and with `connect_ms = 500` the dropped
//! SYNs (resent after 1 s) became 502s. Now at most `max_connections` are open
//! (connecting, idle, busy or upgraded: each [`BackendConn`] holds a `Slot`) and at
//! most `max_connecting` connects are in progress. A request that finds no idle
//! connection connects itself while nobody queues and both limits allow (the path
//! of today, no task hop); otherwise it takes an idle connection from another
//! worker's stack, or queues (`max_pending`, for `pending_timeout`) and is handed the
//! next connection that is returned or newly opened for the queue, whichever comes
//! first (HAProxy's server queue, Envoy's pending requests). The shared state is
//! atomics; the queue's lock is taken only by requests that queue and by returns
//! while someone queues, so a proxy under its limits takes no lock across workers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::uri::Authority;
use tokio::sync::oneshot;

use crate::client::conn::{BackendConn, Held};
use crate::client::error::ExchangeError;
use crate::clock::now_ms;

/// Idle connections kept per backend and worker thread; more are closed when returned.
pub const MAX_IDLE: usize = 256;

/// Idle connections unused for this long are purged, half of them per purge.
pub const PURGE_AFTER_MS: u64 = 5_000;

/// One backend's connection limits (`[pools.<pool>]`, applied to each backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at most: connecting, idle, busy and upgraded.
    pub max_connections: u32,
    /// Requests waiting for a connection at most; past it: refused at once.
    pub max_pending: u32,
    /// Connects in progress at most.
    pub max_connecting: u32,
    /// The longest wait for a connection.
    pub pending_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending: 10_000,
            max_connecting: 16,
            pending_timeout: Duration::from_millis(2_000),
        }
    }
}

/// `open` in the low half of [`Shared::counts`], `connecting` in the high half: one
/// compare-and-swap checks both limits.
const ONE_OPEN: u64 = 1;
const ONE_CONNECTING: u64 = 1 << 32;

/// What a queued request is handed.
enum Grant {
    /// A connection, and whether it served before (see `send`'s resend rule).
    Conn(BackendConn, bool),
    /// The connect opened for the queue failed: the first in line gets the error,
    /// as it would have connecting itself.
    Failed(ExchangeError),
}

struct Idle {
    conn: BackendConn,
    since_ms: u64,
}

/// The state of one backend's connections that every worker shares.
struct Shared {
    authority: Authority,
    /// The idle connections, one stack per worker: oldest at the bottom (so
    /// `since_ms` never decreases from bottom to top).
    stacks: Box<[Mutex<Vec<Idle>>]>,
    max_connections: AtomicU64,
    max_pending: AtomicUsize,
    max_connecting: AtomicU64,
    pending_timeout_ms: AtomicU64,
    /// The connect timeout of the last request, for connects opened for the queue.
    connect_timeout_ms: AtomicU64,
    /// Open connections (low 32 bits) and connects in progress (high 32 bits).
    counts: AtomicU64,
    /// Requests queued (cancelled ones leave at once, their queue entry later).
    waiting: AtomicUsize,
    /// Connects in progress whose connection goes to the queue.
    queued_connects: AtomicUsize,
    queue: Mutex<VecDeque<oneshot::Sender<Grant>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts one open connection against its backend's `max_connections` while it
/// lives; dropping it (the connection closed) may let a queued request connect.
struct Slot(Arc<Shared>);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.counts.fetch_sub(ONE_OPEN, Ordering::SeqCst);
        self.0.pump();
    }
}

/// A connect in progress: it holds an open slot and a connecting one, and gives
/// both back if it fails or is cancelled.
struct Connecting(Option<Arc<Shared>>);

impl Connecting {
    /// The connect worked: the connecting slot is free, the open one goes with the
    /// connection.
    fn done(mut self, mut conn: BackendConn) -> BackendConn {
        if let Some(shared) = self.0.take() {
            shared.counts.fetch_sub(ONE_CONNECTING, Ordering::SeqCst);
            shared.pump();
            conn.slot = Some(Held::new(Slot(shared)));
        }
        conn
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared
                .counts
                .fetch_sub(ONE_CONNECTING + ONE_OPEN, Ordering::SeqCst);
            shared.pump();
        }
    }
}

/// A request in the queue; leaving it (served, timed out, cancelled) passes on a
/// connection that was handed to it too late.
struct Waiter {
    shared: Arc<Shared>,
    rx: oneshot::Receiver<Grant>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        self.rx.close();
        if let Ok(Grant::Conn(conn, reused)) = self.rx.try_recv() {
            self.shared.offer(conn, reused);
        }
    }
}

impl Shared {
    fn counts(&self) -> (u64, u64) {
        let c = self.counts.load(Ordering::SeqCst);
        (c & 0xffff_ffff, c >> 32)
    }

    /// Takes an open and a connecting slot if both limits allow.
    fn try_start_connect(self: &Arc<Self>) -> Option<Connecting> {
        let max_open = self.max_connections.load(Ordering::Relaxed);
        let max_connecting = self.max_connecting.load(Ordering::Relaxed);
        self.counts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                let (open, connecting) = (c & 0xffff_ffff, c >> 32);
                (open < max_open && connecting < max_connecting)
                    .then_some(c + ONE_OPEN + ONE_CONNECTING)
            })
            .ok()
            .map(|_| Connecting(Some(Arc::clone(self))))
    }

    /// Starts connects for the queue while it holds more requests than connects
    /// already started for it, and the limits allow. Called whenever a slot frees
    /// or a request queues, so a queued request never waits on a free slot.
    fn pump(self: &Arc<Self>) {
        loop {
            let queued = self.queued_connects.load(Ordering::SeqCst);
            if self.waiting.load(Ordering::SeqCst) <= queued {
                return;
            }
            if self
                .queued_connects
                .compare_exchange(queued, queued + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            let Some(connecting) = self.try_start_connect() else {
                self.queued_connects.fetch_sub(1, Ordering::SeqCst);
                return;
            };
            // Outside a runtime (a pool dropped at exit) nothing is started: the queue
            // then ends in its timeouts.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                self.queued_connects.fetch_sub(1, Ordering::SeqCst);
                return;
            };
            let shared = Arc::clone(self);
            runtime.spawn(async move {
                let timeout =
                    Duration::from_millis(shared.connect_timeout_ms.load(Ordering::Relaxed));
                let result = BackendConn::connect(&shared.authority, timeout).await;
                shared.queued_connects.fetch_sub(1, Ordering::SeqCst);
                match result {
                    Ok(conn) => shared.offer(connecting.done(conn), false),
                    Err(error) => {
                        drop(connecting);
                        shared.fail_first(error);
                    }
                }
            });
        }
    }

    /// Hands `conn` to the first request in the queue, or onto the idle stack of
    /// the worker whose runtime it is registered with.
    fn offer(&self, conn: BackendConn, reused: bool) {
        let mut grant = Grant::Conn(conn, reused);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let mut queue = lock(&self.queue);
            while let Some(tx) = queue.pop_front() {
                match tx.send(grant) {
                    Ok(()) => return,
                    Err(back) => grant = back, // that request left the queue
                }
            }
        }
        let Grant::Conn(conn, _) = grant else { return };
        let stack = &self.stacks[conn.worker % self.stacks.len()];
        let mut stack = lock(stack);
        if stack.len() < MAX_IDLE {
            stack.push(Idle {
                conn,
                since_ms: now_ms(),
            });
        } else {
            drop(stack);
            drop(conn); // a full pool closes the connection (outside the lock)
        }
    }

    fn fail_first(&self, error: ExchangeError) {
        let mut grant = Grant::Failed(error);
        let mut queue = lock(&self.queue);
        while let Some(tx) = queue.pop_front() {
            match tx.send(grant) {
                Ok(()) => return,
                Err(back) => grant = back,
            }
        }
    }

    /// An idle connection ready for a request from worker `worker`'s stack,
    /// dropping closed and expired ones (outside the lock).
    fn pop(&self, worker: usize, idle_ms: u64) -> Option<BackendConn> {
        let now = now_ms();
        let stack = &self.stacks[worker % self.stacks.len()];
        loop {
            let Idle { conn, since_ms } = lock(stack).pop()?;
            if conn.still_idle() && now.saturating_sub(since_ms) <= idle_ms {
                return Some(conn);
            }
        }
    }

    /// An idle connection from any worker's stack, moved to this worker's runtime.
    fn steal(&self, idle_ms: u64) -> Option<Result<BackendConn, ExchangeError>> {
        let here = crate::worker::index();
        (0..self.stacks.len())
            .map(|i| (here + i) % self.stacks.len())
            .find_map(|worker| self.pop(worker, idle_ms))
            .map(|conn| conn.rehome().map_err(ExchangeError::Io))
    }
}

/// The connections of one backend: one idle stack per worker thread, and the limits.
pub struct ConnPools {
    shared: Arc<Shared>,
    locals: Box<[Arc<ConnPool>]>,
}

impl std::fmt::Debug for ConnPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (open, connecting) = self.shared.counts();
        f.debug_struct("ConnPools")
            .field("authority", &self.shared.authority)
            .field("open", &open)
            .field("connecting", &connecting)
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl ConnPools {
    pub fn new(authority: Authority, limits: ConnLimits) -> Self {
        let workers = crate::worker::workers();
        let shared = Arc::new(Shared {
            authority,
            stacks: (0..workers).map(|_| Mutex::default()).collect(),
            max_connections: AtomicU64::new(0),
            max_pending: AtomicUsize::new(0),
            max_connecting: AtomicU64::new(0),
            pending_timeout_ms: AtomicU64::new(0),
            connect_timeout_ms: AtomicU64::new(2_000),
            counts: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            queued_connects: AtomicUsize::new(0),
            queue: Mutex::default(),
        });
        let pools = Self {
            locals: (0..workers)
                .map(|worker| {
                    Arc::new(ConnPool {
                        shared: Arc::clone(&shared),
                        worker,
                    })
                })
                .collect(),
            shared,
        };
        pools.set_limits(limits);
        pools
    }

    /// Applies reloaded limits; connections already open stay (a lower
    /// `max_connections` is reached as they close).
    pub fn set_limits(&self, limits: ConnLimits) {
        let s = &self.shared;
        s.max_connections
            .store(u64::from(limits.max_connections), Ordering::Relaxed);
        s.max_pending.store(
            usize::try_from(limits.max_pending).unwrap_or(usize::MAX),
            Ordering::Relaxed,
        );
        s.max_connecting
            .store(u64::from(limits.max_connecting), Ordering::Relaxed);
        s.pending_timeout_ms.store(
            u64::try_from(limits.pending_timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        s.pump();
    }

    /// The pool of the calling worker thread.
    pub fn local(&self) -> &Arc<ConnPool> {
        let index = crate::worker::index();
        &self.locals[index % self.locals.len()]
    }

    pub fn idle_count(&self) -> usize {
        self.locals.iter().map(|p| p.idle_count()).sum()
    }

    /// Connections open now (connecting, idle, busy, upgraded) and requests queued.
    pub fn open_and_waiting(&self) -> (u64, usize) {
        (
            self.shared.counts().0,
            self.shared.waiting.load(Ordering::Relaxed),
        )
    }

    /// Purges every worker's pool (see [`ConnPool::purge`]); returns how many closed.
    pub fn purge(&self, now_ms: u64) -> usize {
        self.locals.iter().map(|p| p.purge(now_ms)).sum()
    }

    /// A connection for a request, and whether it served before: this worker's idle
    /// one, a new one, another worker's idle one, or the next one free after a wait
    /// in the queue (see the module docs for the order and why).
    pub async fn acquire(
        &self,
        idle_ms: u64,
        connect_timeout: Duration,
    ) -> Result<(BackendConn, bool), ExchangeError> {
        let shared = &self.shared;
        if let Some(conn) = self.local().checkout(idle_ms) {
            return Ok((conn, true));
        }
        let timeout_ms = u64::try_from(connect_timeout.as_millis()).unwrap_or(u64::MAX);
        if shared.connect_timeout_ms.load(Ordering::Relaxed) != timeout_ms {
            shared
                .connect_timeout_ms
                .store(timeout_ms, Ordering::Relaxed);
        }
        if shared.waiting.load(Ordering::SeqCst) == 0
            && let Some(connecting) = shared.try_start_connect()
        {
            let conn = BackendConn::connect(&shared.authority, connect_timeout).await?;
            return Ok((connecting.done(conn), false));
        }
        if let Some(conn) = shared.steal(idle_ms) {
            return conn.map(|conn| (conn, true));
        }
        let max_pending = shared.max_pending.load(Ordering::Relaxed);
        if shared.waiting.fetch_add(1, Ordering::SeqCst) >= max_pending {
            shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ExchangeError::PendingFull(max_pending));
        }
        let (tx, rx) = oneshot::channel();
        let mut waiter = Waiter {
            shared: Arc::clone(shared),
            rx,
        };
        lock(&shared.queue).push_back(tx);
        shared.pump();
        // A connection returned just before this request queued went to a stack.
        if let Some(conn) = shared.steal(idle_ms) {
            return conn.map(|conn| (conn, true));
        }
        let wait = Duration::from_millis(shared.pending_timeout_ms.load(Ordering::Relaxed));
        match tokio::time::timeout(wait, &mut waiter.rx).await {
            Ok(Ok(Grant::Conn(conn, reused))) => conn
                .rehome()
                .map(|conn| (conn, reused))
                .map_err(ExchangeError::Io),
            Ok(Ok(Grant::Failed(error))) => Err(error),
            Ok(Err(_)) | Err(_) => Err(ExchangeError::PendingTimeout(wait)),
        }
    }
}

/// One worker's handle on a backend's connections: its idle stack, where the
/// connections its requests used go back.
pub struct ConnPool {
    shared: Arc<Shared>,
    worker: usize,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("worker", &self.worker)
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl ConnPool {
    pub fn idle_count(&self) -> usize {
        self.stack().len()
    }

    fn stack(&self) -> MutexGuard<'_, Vec<Idle>> {
        lock(&self.shared.stacks[self.worker % self.shared.stacks.len()])
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

    /// An idle connection ready for a request, dropping closed and expired ones.
    pub fn checkout(&self, idle_ms: u64) -> Option<BackendConn> {
        self.shared.pop(self.worker, idle_ms)
    }

    /// A connection whose response ended cleanly: to the first queued request, or
    /// onto the idle stack.
    pub(crate) fn put_back(&self, mut conn: BackendConn) {
        conn.shed_buffer();
        self.shared.offer(conn, true);
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
