//! `canarygate_shadow_*`: what the shadow stage mirrored and what it found. Apart
//! from the request metrics because the shadow owns their meaning
//! (`crate::shadow`).

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts};

use super::metric_def::must;

/// The `result` label of `canarygate_shadow_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowResult {
    /// Primary and candidate agree.
    Match,
    /// They differ, but only in fields that are noise or ignored.
    Noise,
    /// They differ in a field that is not noise.
    Diff,
    /// Not compared: `max_in_flight` reached, a body the mirror cannot copy, or the
    /// primary's body not complete in time (the client reset or was slow).
    Dropped,
    /// An exchange failed: the candidate's, the secondary's or the primary's.
    Error,
}

impl ShadowResult {
    pub const ALL: [Self; 5] = [
        Self::Match,
        Self::Noise,
        Self::Diff,
        Self::Dropped,
        Self::Error,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::Noise => "noise",
            Self::Diff => "diff",
            Self::Dropped => "dropped",
            Self::Error => "error",
        }
    }
}

/// The shadow's families; cheap to clone (each handle is shared).
#[derive(Clone)]
pub struct ShadowMetrics {
    requests: IntCounterVec,
    /// Its counters, resolved once each, in [`ShadowResult::ALL`]'s order.
    counters: [IntCounter; 5],
    pub diff_ratio: Gauge,
    pub in_flight: IntGauge,
}

impl Default for ShadowMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ShadowMetrics {
    pub fn new() -> Self {
        let requests = must(IntCounterVec::new(
            Opts::new(
                "canarygate_shadow_requests_total",
                "Mirrored requests by result: match, noise (differed only in noise or \
                 ignored fields), diff, dropped (max_in_flight reached, a body not \
                 copied, the primary not complete in time), error (an exchange failed).",
            ),
            &["result"],
        ));
        let counters = ShadowResult::ALL.map(|r| requests.with_label_values(&[r.as_str()]));
        Self {
            requests,
            counters,
            diff_ratio: must(Gauge::new(
                "canarygate_shadow_diff_ratio",
                "Share of compared mirrors since the shadow started that differed (after \
                 noise) or that the canary failed to answer; the gate's figure.",
            )),
            in_flight: must(IntGauge::new(
                "canarygate_shadow_in_flight",
                "Mirrors in flight now (at most shadow.max_in_flight).",
            )),
        }
    }

    /// The families, for the registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.diff_ratio.clone()),
            Box::new(self.in_flight.clone()),
        ]
    }

    pub fn count(&self, result: ShadowResult) {
        let index = ShadowResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        self.counters[index].inc();
    }
}
