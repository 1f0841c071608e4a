//! What one client connection's parts share: the I/O wrappers, the accept loop and
//! the request handler each see the same [`ConnState`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Per-connection state shared by the I/O wrappers, the accept loop and the request
/// handler: what the scan learned, the idle timeout the handler may change (an
/// upgraded tunnel uses `websocket_idle_ms` instead of `idle_ms`), and what the
/// accept loop needs to know before parking an idle connection.
///
/// The connection's own task writes the scan and activity fields (plain stores);
/// the request and exchange counters take atomic increments because HTTP/2 streams
/// run and end on tasks of their own. Nothing here is contended across connections.
#[derive(Debug)]
pub struct ConnState {
    /// Index (0-based) of the first request head with ambiguous framing.
    first_bad: AtomicU64,
    /// Requests the handler has seen on this connection.
    handled: AtomicU64,
    /// Idle timeout override in ms; `u64::MAX` = none.
    idle_ms: AtomicU64,
    /// Reads and writes that moved bytes (a clock-free activity count).
    activity: AtomicU64,
    /// Complete request heads the scan has read.
    heads: AtomicU64,
    /// The scan stands between messages with nothing half-read (and is still on).
    at_rest: AtomicBool,
    /// Requests handed to the service on this connection.
    calls: AtomicU64,
    /// Requests whose response has not been fully handed to hyper yet.
    open_exchanges: AtomicU64,
    /// The accept loop is parking the connection: hyper's shutdown must not close it.
    parking: AtomicBool,
    /// A 101 answered an upgrade request: the connection is a tunnel from now on.
    switched: AtomicBool,
    /// Exchanges waiting for their backend (connect, request, response head): the
    /// client is not idle then, the backend is slow, and `connect_ms` and
    /// `response_header_ms` bound that wait, not the client's idle timeout.
    backend_waits: AtomicU64,
    /// Request bodies still arriving from the client. While one is, a quiet
    /// connection is the client's doing (a stalled upload), and the idle timeout runs.
    uploads: AtomicU64,
}

impl Default for ConnState {
    fn default() -> Self {
        Self {
            first_bad: AtomicU64::new(u64::MAX),
            handled: AtomicU64::new(0),
            idle_ms: AtomicU64::new(u64::MAX),
            activity: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            at_rest: AtomicBool::new(true),
            calls: AtomicU64::new(0),
            open_exchanges: AtomicU64::new(0),
            parking: AtomicBool::new(false),
            switched: AtomicBool::new(false),
            backend_waits: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
        }
    }
}

impl ConnState {
    /// Counts one read or write that moved bytes.
    pub fn bump_activity(&self) {
        // One writer: a plain load and store, no locked instruction per I/O call.
        let n = self.activity.load(Ordering::Relaxed);
        self.activity.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    /// A request was handed to the service; returns its guard, which ends the
    /// exchange when dropped (after the response body is done or abandoned).
    pub fn open_exchange(self: &Arc<Self>) -> OpenExchange {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.open_exchanges.fetch_add(1, Ordering::Relaxed);
        OpenExchange(Arc::clone(self))
    }

    /// Whether the connection stands between requests: every request read was handed
    /// to the service and answered in full, and no byte of a next one has been read.
    /// hyper's own buffer is then empty (the scan saw every byte hyper read).
    pub fn between_requests(&self) -> bool {
        self.at_rest.load(Ordering::Relaxed)
            && self.open_exchanges.load(Ordering::Relaxed) == 0
            && self.heads.load(Ordering::Relaxed) == self.calls.load(Ordering::Relaxed)
    }

    /// An exchange starts waiting for its backend; the wait ends when the guard drops.
    pub fn wait_for_backend(self: &Arc<Self>) -> BackendWait {
        self.backend_waits.fetch_add(1, Ordering::Relaxed);
        BackendWait(Arc::clone(self))
    }

    /// A request body starts arriving; the upload ends when the guard drops.
    pub fn upload_in_progress(self: &Arc<Self>) -> UploadInProgress {
        self.uploads.fetch_add(1, Ordering::Relaxed);
        UploadInProgress(Arc::clone(self))
    }

    /// Whether an exchange on this connection is waiting for its backend alone: no
    /// request body is still to come from the client.
    pub fn waiting_for_backend(&self) -> bool {
        self.backend_waits.load(Ordering::Relaxed) > 0 && self.uploads.load(Ordering::Relaxed) == 0
    }

    pub fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Relaxed);
    }

    pub fn parking(&self) -> bool {
        self.parking.load(Ordering::Relaxed)
    }

    /// The handler answered an upgrade request with 101: what the client sends next
    /// is the tunnel's, not HTTP/1.1 (the smuggling guard stops reading it).
    pub fn set_switched(&self) {
        self.switched.store(true, Ordering::Relaxed);
    }

    pub fn switched(&self) -> bool {
        self.switched.load(Ordering::Relaxed)
    }

    /// Changes the connection's idle timeout from now on.
    pub fn set_idle(&self, idle: std::time::Duration) {
        let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX - 1);
        self.idle_ms.store(ms, Ordering::Relaxed);
    }

    pub fn idle_override(&self) -> Option<std::time::Duration> {
        match self.idle_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// The scan found ambiguous framing in request head number `index` (0-based).
    pub fn flag_bad_request(&self, index: u64) {
        self.first_bad.fetch_min(index, Ordering::Relaxed);
    }

    /// Publishes where the scan stands after a read: whether it is between messages
    /// with nothing half-read, and how many complete heads it has read.
    pub fn publish_scan(&self, at_rest: bool, heads: u64) {
        self.at_rest.store(at_rest, Ordering::Relaxed);
        self.heads.store(heads, Ordering::Relaxed);
    }

    /// Called once per request, in order: whether this request's framing was
    /// ambiguous (or an earlier one on the connection was).
    pub fn next_request_is_bad(&self) -> bool {
        let index = self.handled.fetch_add(1, Ordering::Relaxed);
        index >= self.first_bad.load(Ordering::Relaxed)
    }
}

/// Ends an exchange on drop (see [`ConnState::open_exchange`]).
#[derive(Debug)]
pub struct OpenExchange(Arc<ConnState>);

impl Drop for OpenExchange {
    fn drop(&mut self) {
        self.0.open_exchanges.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ends a wait for the backend on drop (see [`ConnState::wait_for_backend`]).
#[derive(Debug)]
pub struct BackendWait(Arc<ConnState>);

impl Drop for BackendWait {
    fn drop(&mut self) {
        self.0.backend_waits.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ends an upload on drop (see [`ConnState::upload_in_progress`]).
#[derive(Debug)]
pub struct UploadInProgress(Arc<ConnState>);

impl Drop for UploadInProgress {
    fn drop(&mut self) {
        self.0.uploads.fetch_sub(1, Ordering::Relaxed);
    }
}
