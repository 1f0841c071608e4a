//! `canarygate_upstream_*` for the backends' connection limits: the requests they
//! refused, and the connections and queue each backend has now (read from the pools
//! at scrape time, so the gauges are never older than the scrape).

use prometheus::core::Collector;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use super::metric_def::must;
use crate::routing::PoolKind;

/// The families, registered by [`crate::observe::metrics::Metrics::new`].
pub struct ConnMetrics {
    pending_rejected: IntCounterVec,
    connections: IntGaugeVec,
    pending: IntGaugeVec,
}

impl ConnMetrics {
    pub fn new(reg: &mut dyn FnMut(Box<dyn Collector>)) -> Self {
        let labels = ["pool", "backend"];
        let metrics = Self {
            pending_rejected: must(IntCounterVec::new(
                Opts::new(
                    "canarygate_upstream_pending_rejected_total",
                    "Requests answered 503 because a backend was at its connection limits, \
                     by pool, backend and reason: queue_full (max_connections open and \
                     max_pending waiting) or timeout (no connection free within \
                     pending_timeout_ms).",
                ),
                &["pool", "backend", "reason"],
            )),
            connections: must(IntGaugeVec::new(
                Opts::new(
                    "canarygate_upstream_connections",
                    "Connections open to a backend (connecting, idle, busy, upgraded), \
                     counted against its max_connections.",
                ),
                &labels,
            )),
            pending: must(IntGaugeVec::new(
                Opts::new(
                    "canarygate_upstream_pending_requests",
                    "Requests waiting for a connection to a backend (at most max_pending).",
                ),
                &labels,
            )),
        };
        reg(Box::new(metrics.pending_rejected.clone()));
        reg(Box::new(metrics.connections.clone()));
        reg(Box::new(metrics.pending.clone()));
        metrics
    }

    /// A request a backend's limits refused (rare: the label lookup is fine here).
    pub fn rejected(&self, pool: PoolKind, backend: &str, reason: &'static str) {
        self.pending_rejected
            .with_label_values(&[pool.as_str(), backend, reason])
            .inc();
    }

    /// Publishes each backend's open connections and queued requests; backends no
    /// longer configured leave the scrape.
    pub fn observe<'a>(&self, backends: impl IntoIterator<Item = (PoolKind, &'a str, u64, usize)>) {
        self.connections.reset();
        self.pending.reset();
        for (pool, backend, open, waiting) in backends {
            let labels = [pool.as_str(), backend];
            self.connections
                .with_label_values(&labels)
                .set(i64::try_from(open).unwrap_or(i64::MAX));
            self.pending
                .with_label_values(&labels)
                .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        }
    }
}
