//! Short-term history for the status page: every few seconds the sampler copies the
//! per-pool request count, 5xx count and latency histogram, keeping 15 minutes. Rates,
//! error ratios and percentiles over the last minute are differences between two
//! samples, computed the way Prometheus' `histogram_quantile` does.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus::core::Metric as _;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics::{DURATION_BUCKETS, Metrics, PoolMetrics};
use crate::routing::PoolKind;

/// Sampling period and history length.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
pub const HISTORY: Duration = Duration::from_secs(15 * 60);

/// One pool's cumulative counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolSample {
    pub requests: u64,
    pub errors_5xx: u64,
    /// Cumulative counts per bucket of [`DURATION_BUCKETS`].
    pub buckets: Vec<u64>,
}

impl PoolSample {
    pub fn read(pool: &PoolMetrics) -> Self {
        let metric = pool.duration.metric();
        let histogram = metric.get_histogram();
        Self {
            requests: histogram.get_sample_count(),
            errors_5xx: pool.errors_5xx(),
            buckets: histogram
                .get_bucket()
                .iter()
                .map(prometheus::proto::Bucket::cumulative_count)
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub wall: SystemTime,
    pub production: PoolSample,
    pub canary: PoolSample,
}

impl Sample {
    pub fn read(metrics: &Metrics) -> Self {
        Self {
            at: Instant::now(),
            wall: SystemTime::now(),
            production: PoolSample::read(metrics.pool(PoolKind::Production)),
            canary: PoolSample::read(metrics.pool(PoolKind::Canary)),
        }
    }

    pub fn pool(&self, kind: PoolKind) -> &PoolSample {
        match kind {
            PoolKind::Production => &self.production,
            PoolKind::Canary => &self.canary,
        }
    }
}

/// What happened in one pool between two samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolWindow {
    pub requests: u64,
    pub rate_per_s: f64,
    pub error_ratio: f64,
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
}

/// Differences between two samples of one pool, `secs` apart.
pub fn window(older: &PoolSample, newer: &PoolSample, secs: f64) -> PoolWindow {
    let requests = newer.requests.saturating_sub(older.requests);
    let errors = newer.errors_5xx.saturating_sub(older.errors_5xx);
    let buckets: Vec<u64> = newer
        .buckets
        .iter()
        .zip(older.buckets.iter().chain(std::iter::repeat(&0)))
        .map(|(n, o)| n.saturating_sub(*o))
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let (rate_per_s, error_ratio) = (
        if secs > 0.0 {
            requests as f64 / secs
        } else {
            0.0
        },
        if requests > 0 {
            errors as f64 / requests as f64
        } else {
            0.0
        },
    );
    PoolWindow {
        requests,
        rate_per_s,
        error_ratio,
        p50_s: quantile(0.5, &DURATION_BUCKETS, &buckets, requests),
        p99_s: quantile(0.99, &DURATION_BUCKETS, &buckets, requests),
    }
}

/// `histogram_quantile`: the `q` quantile from cumulative bucket counts, linearly
/// interpolated inside the bucket; observations above the last bound report that
/// bound. `None` without observations.
pub fn quantile(q: f64, bounds: &[f64], cumulative: &[u64], total: u64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    let rank = q * total as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for (bound, &count) in bounds.iter().zip(cumulative) {
        #[allow(clippy::cast_precision_loss)]
        if count as f64 >= rank {
            let in_bucket = count - below;
            if in_bucket == 0 {
                return Some(*bound);
            }
            #[allow(clippy::cast_precision_loss)]
            let fraction = (rank - below as f64) / in_bucket as f64;
            return Some(lower + (bound - lower) * fraction);
        }
        lower = *bound;
        below = count;
    }
    bounds.last().copied()
}

/// The sample history.
#[derive(Debug, Default)]
pub struct Stats {
    samples: Mutex<VecDeque<Sample>>,
}

impl Stats {
    pub fn record(&self, sample: Sample) {
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while samples
            .front()
            .is_some_and(|s| sample.at.duration_since(s.at) > HISTORY + SAMPLE_EVERY)
        {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The newest sample at least `age` old, or the oldest one there is.
    pub fn at_least(&self, age: Duration, now: Instant) -> Option<Sample> {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        samples
            .iter()
            .rev()
            .find(|s| now.duration_since(s.at) >= age)
            .or_else(|| samples.front())
            .cloned()
    }

    pub fn all(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

/// Samples `metrics` into `stats` every [`SAMPLE_EVERY`] until `cancel`. It takes
/// the two parts of the state it uses, not the state, which holds a [`Stats`].
pub async fn run(stats: Arc<Stats>, metrics: Arc<Metrics>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => stats.record(Sample::read(&metrics)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_like_prometheus() {
        let bounds = [0.1, 0.2, 0.4];
        // 10 observations: 4 <= 0.1, 4 in (0.1, 0.2], 2 in (0.2, 0.4].
        let cumulative = [4, 8, 10];
        assert_eq!(quantile(0.5, &bounds, &cumulative, 10), Some(0.125));
        assert!((quantile(0.2, &bounds, &cumulative, 10).unwrap() - 0.05).abs() < 1e-12);
        assert!((quantile(0.9, &bounds, &cumulative, 10).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(quantile(0.5, &bounds, &[0, 0, 0], 0), None);
        // Everything above the last bound reports the last bound.
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 0], 5), Some(0.4));
    }

    #[test]
    fn window_is_the_difference_of_two_samples() {
        let older = PoolSample {
            requests: 100,
            errors_5xx: 10,
            buckets: vec![50; DURATION_BUCKETS.len()],
        };
        let mut newer = PoolSample {
            requests: 220,
            errors_5xx: 16,
            buckets: vec![170; DURATION_BUCKETS.len()],
        };
        newer.buckets[0] = 50; // none of the new ones in the first bucket
        let w = window(&older, &newer, 60.0);
        assert_eq!(w.requests, 120);
        assert!((w.rate_per_s - 2.0).abs() < 1e-12);
        assert!((w.error_ratio - 0.05).abs() < 1e-12);
        // All 120 new observations fall in the second bucket (0.0005, 0.001].
        let p50 = w.p50_s.unwrap();
        assert!(p50 > 0.0005 && p50 <= 0.001, "{p50}");
    }

    #[test]
    fn history_keeps_fifteen_minutes() {
        let stats = Stats::default();
        let start = Instant::now();
        let metrics = Metrics::new();
        for i in 0..400u32 {
            let mut s = Sample::read(&metrics);
            s.at = start + SAMPLE_EVERY * i;
            stats.record(s);
        }
        let all = stats.all();
        let span = all.last().unwrap().at.duration_since(all[0].at);
        assert!(span <= HISTORY + SAMPLE_EVERY, "{span:?}");
        assert!(span + SAMPLE_EVERY >= HISTORY, "{span:?}");
        let now = all.last().unwrap().at;
        let minute_ago = stats.at_least(Duration::from_secs(60), now).unwrap();
        assert_eq!(now.duration_since(minute_ago.at), Duration::from_secs(60));
    }
}
