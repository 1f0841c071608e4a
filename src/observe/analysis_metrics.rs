//! `canarygate_canary_*` and `canarygate_analysis_requests_total`: what the canary
//! analysis counted and concluded. Apart from the request metrics because the
//! analysis owns their meaning (`crate::canary`).

use std::sync::OnceLock;

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts};

use super::metric_def::must;
use crate::canary::window::Counted;
use crate::routing::{PoolKind, Reason};

/// `canarygate_canary_*`: the canary analysis' state and its last check's figures.
pub struct AnalysisMetrics {
    state: IntGauge,
    checks: IntCounterVec,
    error_ratio: GaugeVec,
    latency: GaugeVec,
    /// `canarygate_analysis_requests_total{pool,counted}`.
    requests: IntCounterVec,
    /// Its counters, resolved once each: a label look-up (two hashes and a lock)
    /// per request showed in the request path's profile.
    request_counters: [[OnceLock<IntCounter>; COUNTED_LABELS.len()]; 2],
    store_errors: IntCounter,
}

/// The `counted` label's values, in the order of [`counted_index`].
const COUNTED_LABELS: [&str; 8] = [
    "judged",
    "capped",
    "refused",
    Reason::Override.as_str(),
    Reason::Bucket.as_str(),
    Reason::KillSwitch.as_str(),
    Reason::NoCanaryBackends.as_str(),
    Reason::Failover.as_str(),
];

/// Where a request's `counted` label is in [`COUNTED_LABELS`] (`None`: not counted).
const fn counted_index(counted: Counted, reason: Reason) -> Option<usize> {
    Some(match counted {
        Counted::Off => return None,
        Counted::Judged => 0,
        Counted::Capped => 1,
        Counted::Refused => 2,
        Counted::Apart => match reason {
            Reason::Override => 3,
            Reason::Bucket => 4,
            Reason::KillSwitch => 5,
            Reason::NoCanaryBackends => 6,
            Reason::Failover => 7,
        },
    })
}

impl Default for AnalysisMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AnalysisMetrics {
    pub fn new() -> Self {
        let analysis = Self {
            state: must(IntGauge::new(
                "canarygate_canary_state",
                "Canary analysis state: 0 idle, 1 progressing, 2 holding, 3 rolled back, \
                     4 healthy, 5 manual, 6 shadowing, 7 shadow failed.",
            )),
            checks: must(IntCounterVec::new(
                Opts::new(
                    "canarygate_canary_checks_total",
                    "Canary analysis checks, by result: pass, fail, hold.",
                ),
                &["result"],
            )),
            error_ratio: must(GaugeVec::new(
                Opts::new(
                    "canarygate_canary_error_ratio",
                    "Error ratio (5xx and upstream errors) over the analysis window at the \
                         last check, by pool.",
                ),
                &["pool"],
            )),
            latency: must(GaugeVec::new(
                Opts::new(
                    "canarygate_canary_latency_seconds",
                    "Latency quantiles (HDR histogram) over the analysis window at the last \
                         check, by pool and quantile (0.5, 0.99).",
                ),
                &["pool", "quantile"],
            )),
            requests: must(IntCounterVec::new(
                Opts::new(
                    "canarygate_analysis_requests_total",
                    "Requests as the canary analysis counted them, by pool and `counted`: \
                         judged; capped (placed by the bucket, past their client's cap); \
                         refused (by the proxy, before any backend); or the routing reason of a request placed otherwise and never judged \
                         (override, failover, kill_switch, no_canary_backends).",
                ),
                &["pool", "counted"],
            )),
            request_counters: Default::default(),
            store_errors: must(IntCounter::new(
                "canarygate_canary_store_errors_total",
                "Canary analysis rounds that could not read or write the shared record \
                     (Redis).",
            )),
        };
        for outcome in crate::canary::judge::Outcome::ALL {
            analysis.checks.with_label_values(&[outcome.as_str()]);
        }
        analysis
    }

    /// The families, for the registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.state.clone()),
            Box::new(self.checks.clone()),
            Box::new(self.error_ratio.clone()),
            Box::new(self.latency.clone()),
            Box::new(self.requests.clone()),
            Box::new(self.store_errors.clone()),
        ]
    }

    /// Counts one request as the analysis took it (`reason`: why it went to `pool`,
    /// the label of a request counted apart).
    pub fn count(&self, pool: PoolKind, counted: Counted, reason: Reason) {
        let Some(label) = counted_index(counted, reason) else {
            return;
        };
        let p = usize::from(pool == PoolKind::Canary);
        self.request_counters[p][label]
            .get_or_init(|| {
                self.requests
                    .with_label_values(&[pool.as_str(), COUNTED_LABELS[label]])
            })
            .inc();
    }

    /// A round that could not read or write the shared record.
    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    pub fn set_state(&self, state: crate::canary::verdict::State) {
        self.state.set(state.code());
    }

    /// Counts a check and publishes its figures (a quantile without requests
    /// leaves the scrape rather than reading 0).
    pub fn observe(&self, check: &crate::canary::judge::Check) {
        self.checks
            .with_label_values(&[check.outcome.as_str()])
            .inc();
        for (pool, figures) in [
            (PoolKind::Production, &check.production),
            (PoolKind::Canary, &check.canary),
        ] {
            let pool = pool.as_str();
            self.error_ratio
                .with_label_values(&[pool])
                .set(figures.error_ratio);
            for (quantile, ms) in [("0.5", figures.p50_ms), ("0.99", figures.p99_ms)] {
                match ms {
                    Some(ms) => self
                        .latency
                        .with_label_values(&[pool, quantile])
                        .set(ms / 1_000.0),
                    None => {
                        let _ = self.latency.remove_label_values(&[pool, quantile]);
                    }
                }
            }
        }
    }
}
