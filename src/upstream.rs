//! Upstream side: the pools of backends and the pooled keep-alive client that talks
//! to them.
//!
//! One [`Client`] serves every backend: hyper-util keeps an idle-connection pool per
//! `host:port`, so a busy proxy reuses warm connections instead of paying a TCP
//! handshake per request. Sockets get `TCP_NODELAY` because a proxy forwards small
//! writes (headers) that must not wait for Nagle's algorithm.

use std::sync::atomic::{AtomicUsize, Ordering};

use http::uri::Authority;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{PoolConfig, TimeoutsConfig};
use crate::routing::{self, PoolKind};

/// The client that forwards requests; the body is streamed from the client's request.
pub type Client = HyperClient<HttpConnector, Incoming>;

/// Builds the pooled upstream client.
pub fn client(timeouts: &TimeoutsConfig) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeouts.connect()));
    connector.enforce_http(true);
    HyperClient::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle())
        .build(connector)
}

/// One backend of a pool.
#[derive(Debug)]
pub struct Backend {
    pub authority: Authority,
}

/// The backends of one pool, balanced round robin.
#[derive(Debug)]
pub struct Pool {
    pub kind: PoolKind,
    backends: Box<[Backend]>,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(kind: PoolKind, config: &PoolConfig) -> Self {
        Self {
            kind,
            backends: config
                .backends
                .iter()
                .map(|b| Backend {
                    authority: b.0.clone(),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The next backend in round-robin order, or `None` for an empty pool.
    pub fn pick(&self) -> Option<&Backend> {
        if self.backends.is_empty() {
            return None;
        }
        // Relaxed: the counter only spreads load; no other memory depends on it.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.backends
            .get(routing::round_robin(n, self.backends.len()))
    }
}

/// Both pools, built from one config.
#[derive(Debug)]
pub struct Pools {
    pub production: Pool,
    pub canary: Pool,
}

impl Pools {
    pub fn new(config: &crate::config::PoolsConfig) -> Self {
        Self {
            production: Pool::new(PoolKind::Production, &config.production),
            canary: Pool::new(PoolKind::Canary, &config.canary),
        }
    }

    pub fn get(&self, kind: PoolKind) -> &Pool {
        match kind {
            PoolKind::Production => &self.production,
            PoolKind::Canary => &self.canary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendAddr;

    fn pool(addrs: &[&str]) -> Pool {
        let config = PoolConfig {
            backends: addrs
                .iter()
                .map(|a| BackendAddr::try_from((*a).to_owned()).unwrap())
                .collect(),
        };
        Pool::new(PoolKind::Production, &config)
    }

    #[test]
    fn pick_cycles_through_backends_in_order() {
        let p = pool(&["a:1", "b:2", "c:3"]);
        let picked: Vec<&str> = (0..6)
            .map(|_| p.pick().unwrap().authority.as_str())
            .collect();
        assert_eq!(picked, ["a:1", "b:2", "c:3", "a:1", "b:2", "c:3"]);
    }

    #[test]
    fn empty_pool_picks_nothing() {
        assert!(pool(&[]).pick().is_none());
    }
}
