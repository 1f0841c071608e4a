//! Shared state: one immutable [`Snapshot`] behind an `ArcSwap`, plus the handles
//! every task needs.
//!
//! A request loads the snapshot once and sees one consistent view (config and pools
//! together) for its whole life, even if an operator swaps in a new one meanwhile.
//! Loading is lock-free, so no request ever waits for a writer.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::upstream::{self, Client, Pools};

/// Everything a request needs to be routed, frozen at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub pools: Pools,
}

impl Snapshot {
    pub fn new(config: Arc<Config>) -> Self {
        let pools = Pools::new(&config.pools);
        Self { config, pools }
    }
}

/// Cheap to clone: every field is shared.
#[derive(Clone)]
pub struct AppState {
    snapshot: Arc<ArcSwap<Snapshot>>,
    pub client: Arc<Client>,
}

impl AppState {
    pub fn new(config: Config) -> Self {
        let client = Arc::new(upstream::client(&config.timeouts));
        Self {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::new(Arc::new(config)))),
            client,
        }
    }

    /// The current snapshot; hold it for the whole request.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Swaps in a new, already validated config. Requests in flight keep the snapshot
    /// they loaded.
    pub fn apply_config(&self, config: Config) {
        self.snapshot
            .store(Arc::new(Snapshot::new(Arc::new(config))));
    }
}
