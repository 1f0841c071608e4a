//! What operators see: metrics, short-term stats, events, and the admin listener.
//!
//! - [`metrics`]: the owned Prometheus registry and per-pool handles.
//! - [`stats`]: short-term history (rates, error ratios, percentiles) for the status page.
//! - [`events`]: the event funnel (log line + recent events).
//! - [`admin`]: the admin listener: metrics, health, readiness, flags, events, status page.

pub mod admin;
pub mod events;
pub mod metrics;
pub mod stats;
