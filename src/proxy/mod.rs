//! The request path, from a client request to the backend's answer.
//!
//! - [`mod@handle`]: one request: decide, check, forward, answer, record.
//! - [`error`]: why a request got no upstream answer, classified in one place.
//! - [`headers`]: the request as the backend sees it; ids and cookies.
//! - [`forward`]: sending to a pool, passive health, the one retry.
//! - [`upgrade`]: WebSocket upgrades and their tunnels.
//! - [`abandon`]: requests the client reset, and bodies the backend cut, after
//!   forwarding: counted and logged.

pub mod abandon;
pub mod error;
pub mod forward;
pub mod handle;
pub mod headers;
pub mod upgrade;

pub use handle::{ProxyBody, handle};
pub use headers::{ClientPeer, POOL_HEADER, REQUEST_ID};
