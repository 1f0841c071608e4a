//! The HTTP/1.1 client the proxy speaks to its backends, driven by the task of the
//! request it carries.
//!
//! hyper's client runs each connection as a task of its own: a request went to it
//! through a channel, its response head came back through a oneshot and its body
//! through a third channel, so every proxied request woke three tasks, and that
//! machinery was a third of the proxy's user-space instructions (callgrind,
//! benches/instructions.sh). Here the request's own future writes the head (and any
//! body), reads the response head, and the response body reads the socket itself:
//! one task, woken by the socket.
//!
//! Framing follows RFC 9112 6.3 to the letter, and a response that cannot be framed
//! exactly is an error, never a guess: a pooled connection that lost track of where
//! one response ends would hand its rest to the next client. A connection goes back
//! to the pool only when its response ended exactly at the bytes read.
//!
//! From the bottom up:
//! - [`error`]: why an exchange failed.
//! - [`request_body`]: the client's body as sent upstream, with its size limit.
//! - [`codec`]: request heads out, response heads in, where a response body ends.
//! - [`chunked`]: the chunked body decoder.
//! - [`conn`]: one backend connection and the bytes read from it.
//! - [`conn_pool`]: idle keep-alive connections per backend and worker thread, and
//!   the backend's connection limits (`max_connections`, the queue).
//! - [`upload`]: writing a request's head and body.
//! - [`body`]: the response body, which returns its connection to the pool.
//! - [`exchange`]: one request-response exchange, and `send` with the pool.

pub mod body;
pub mod chunked;
pub mod codec;
pub mod conn;
pub mod conn_pool;
pub mod error;
pub mod exchange;
pub mod request_body;
pub mod upload;
