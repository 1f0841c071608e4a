//! Canary analysis, the pure half: the proxy judges the canary from its own traffic.
//!
//! - [`clients`]: how much one client may weigh in a window (the per-client cap).
//! - [`window`]: per-worker request records (counts, errors, HDR latency histograms)
//!   over a sliding window, written by the request path.
//! - [`stats`]: the normal quantile and the z-tests (shown beside the verdict).
//! - [`sequential`]: the test the verdict rests on, a mixture likelihood ratio
//!   compared slot by slot, valid however often it is looked at.
//! - [`judge`]: one check of canary against production by the relative rules.
//! - [`verdict`]: what to do after a check (roll back, step, hand over), from the
//!   shared record and the reserved flags.
//! - [`board`]: what `/analysis` and the status page show.
//! - [`settings`]: `[analysis]`, the parameters of all of the above.
//!
//! No I/O here: the task that reads the clock, Redis and sends alerts is
//! `ops::analysis`, and the benchmark drives these pieces with simulated traffic.

pub mod board;
pub mod clients;
pub mod judge;
pub mod sequential;
pub mod settings;
pub mod stats;
pub mod verdict;
pub mod window;
