//! The upstream side: the backends, their health and the retry budget.
//!
//! - [`health`]: one backend's health (active checks, passive ejection).
//! - [`budget`]: the retry budget of a pool.
//! - [`pools`]: the production and canary pools, balancing and ejection.
//! - [`checks`]: the active health-check task.
//!
//! A backend is *usable* when its active health check says up **and** it is not
//! ejected. Its keep-alive connections are the client's ([`crate::client::conn_pool`]).

pub mod budget;
pub mod checks;
pub mod health;
pub mod pools;
