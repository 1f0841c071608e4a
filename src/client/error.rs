//! Why an exchange with a backend failed: one enum for the whole client, which the
//! proxy maps to a status in one place.

use std::time::Duration;

/// Why an exchange with a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connect to {0} failed: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("connect to {0} timed out after {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("backend closed the connection before sending anything")]
    Closed,
    #[error("backend closed the connection in the middle of a response")]
    Incomplete,
    #[error("backend connection failed")]
    Io(#[source] std::io::Error),
    #[error("backend sent no byte of the response body for {0:?}")]
    BodyIdle(Duration),
    #[error("backend response is not valid HTTP/1.1: {0}")]
    Protocol(&'static str),
    /// The backend had `max_connections` open and `max_pending` requests waiting.
    #[error("backend has max_connections open and {0} requests waiting (max_pending)")]
    PendingFull(usize),
    /// No connection to the backend became free within `pending_timeout_ms`.
    #[error("no connection to the backend became free within {0:?} (pending_timeout_ms)")]
    PendingTimeout(Duration),
    /// The client's request body failed (too large, malformed, cut short): not the
    /// backend's doing.
    #[error("client request body failed")]
    ClientBody(#[source] Box<dyn std::error::Error + Send + Sync>),
}
