//! The operations half: tasks that look after the host and the proxy itself.
//!
//! - [`alerts`]: the one way to tell a human (Twilio SMS, email, Alertmanager,
//!   webhook), with noise control.
//! - [`resources`]: the host resource watch (CPU, memory, disks) and its alerts.
//! - [`memory`]: returns the memory idle connections hold.
//! - [`analysis`]: the canary analysis task: judges, rolls back, steps up.
//! - [`doctor`]: `canarygate doctor`, a process of its own: stops CPU hogs.
//!
//! Maintenance will live here.

pub mod alerts;
pub mod analysis;
pub mod doctor;
pub mod memory;
pub mod resources;
