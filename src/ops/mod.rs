//! The operations half: tasks that look after the host and the proxy itself.
//!
//! - [`alerts`]: the one way to tell a human (Twilio SMS, email, Alertmanager,
//!   webhook), with noise control.
//! - [`resources`]: the host resource watch (CPU, memory, disks) and its alerts.
//! - [`disk`]: what "disk used" means, for every process and threshold (`df`'s).
//! - [`memory`]: returns the memory idle connections hold.
//! - [`analysis`]: the canary analysis task: judges, rolls back, steps up.
//! - [`fleet`]: heartbeats to Redis and the fleet view (`/fleet`).
//! - [`cmdline`]: other users' command lines as they may appear in an alert.
//! - [`doctor`]: `canarygate doctor`, a process of its own: stops CPU hogs.
//! - [`maintenance`]: `canarygate maintenance`, a process of its own: archives logs
//!   to secondary storage, verified, before the disk fills.
//! - [`control`]: an operator's change to the rollout (SMS and `canarygate canary`).
//! - [`sms`]: commands by SMS (Twilio's webhook): ACK, ROLLBACK, CANARY, STATUS.
//! - [`service`], [`sidecar`]: what those two share (the proxy's metrics as they
//!   read them; their own metrics, admin listener and alert channels).

pub mod alerts;
pub mod analysis;
pub mod cmdline;
pub mod control;
pub mod disk;
pub mod doctor;
pub mod fleet;
pub mod maintenance;
pub mod memory;
pub mod resources;
pub mod service;
pub mod sidecar;
pub mod sms;
