//! Feature flags.
//!
//! - [`model`]: the pure model and its validation (no I/O).
//! - [`store`]: where the shared state lives (one Redis, Sentinel, Cluster) and
//!   connections to it, for everything that talks to Redis.
//! - [`watcher`]: the task that follows the Redis hash into the snapshot.

pub mod model;
pub mod store;
pub mod watcher;
