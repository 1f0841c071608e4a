//! The client side: accepting connections and serving them with hyper.
//!
//! - [`accept`]: the accept loop, connection limits, worker hand-off, the drain.
//! - [`connection`]: one connection's life (serve, park, wake, drain, cut).
//! - [`balance`]: evens client connections out over the worker threads.
//! - [`conn_state`]: what one connection's parts share.
//! - [`io`]: the one shape of the I/O wrappers below.
//! - [`guard`]: the request-smuggling guard.
//! - [`idle`]: the idle timeout.
//! - [`gate`]: polling a connection's watchers only when they fired.
//! - [`park`]: parking idle keep-alive connections.
//! - [`nofile`]: the descriptor limit `max_connections` needs, raised at start.

pub mod accept;
pub mod balance;
pub mod conn_state;
pub mod connection;
pub mod gate;
pub mod guard;
pub mod idle;
pub mod io;
pub mod nofile;
pub mod park;

pub use accept::{ServeOptions, serve};
