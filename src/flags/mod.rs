//! Feature flags.
//!
//! - [`model`]: the pure model and its validation (no I/O).
//! - [`watcher`]: the task that follows the Redis hash into the snapshot.

pub mod model;
pub mod watcher;
