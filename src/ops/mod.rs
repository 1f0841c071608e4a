//! The operations half: tasks that look after the host and the proxy itself.
//!
//! - [`memory`]: returns the memory idle connections hold.
//!
//! Alerts, resources, canary analysis, the doctor and maintenance will live here.

pub mod memory;
