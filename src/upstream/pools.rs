//! The backend pools: production and canary, each a list of backends balanced round
//! robin over the usable ones, with its retry budget. Passive ejection (outlier
//! detection) happens here, on the request path: `consecutive_failures` connect
//! errors or 5xx in a row eject a backend for `ejection_ms`, doubling on each
//! ejection in a row (up to 16x), never more than `max_ejected_percent` of a pool at
//! once. A passing active check does not end an ejection early: the ejection runs its
//! time, then the backend is usable again if the active check still says up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Authority;

use crate::client::conn_pool::ConnPools;
use crate::config::{HealthConfig, PoolConfig, PoolsConfig};
use crate::routing::{self, PoolKind};
use crate::upstream::budget::RetryBudget;
use crate::upstream::health::{BackendHealth, Ejection, OutlierPolicy};

/// One backend of a pool.
#[derive(Debug)]
pub struct Backend {
    pub authority: Authority,
    pub health: Arc<BackendHealth>,
    /// Its keep-alive connections (idle per worker thread) and their limits.
    pub conns: Arc<ConnPools>,
}

/// The backends of one pool, balanced round robin over the usable ones.
#[derive(Debug)]
pub struct BackendPool {
    pub kind: PoolKind,
    backends: Box<[Backend]>,
    next: AtomicUsize,
    policy: OutlierPolicy,
    pub retry_budget: RetryBudget,
}

impl BackendPool {
    pub fn new(
        kind: PoolKind,
        config: &PoolConfig,
        policy: OutlierPolicy,
        previous: Option<&BackendPool>,
    ) -> Self {
        let backends = config
            .backends
            .iter()
            .map(|b| {
                let old = previous.and_then(|p| p.backends.iter().find(|old| old.authority == b.0));
                let conns = match old {
                    Some(old) => {
                        old.conns.set_limits(config.limits());
                        Arc::clone(&old.conns)
                    }
                    None => Arc::new(ConnPools::new(b.0.clone(), config.limits())),
                };
                Backend {
                    authority: b.0.clone(),
                    health: old.map_or_else(Arc::default, |old| Arc::clone(&old.health)),
                    conns,
                }
            })
            .collect();
        Self {
            kind,
            backends,
            next: AtomicUsize::new(0),
            policy,
            retry_budget: RetryBudget::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    pub fn has_usable(&self, now_ms: u64) -> bool {
        self.backends.iter().any(|b| b.health.usable_at(now_ms))
    }

    /// The next usable backend in round-robin order, skipping `exclude` (the backend a
    /// retried request already failed on). `None` when no backend is usable.
    pub fn pick(&self, now_ms: u64, exclude: Option<usize>) -> Option<(usize, &Backend)> {
        let len = self.backends.len();
        if len == 0 {
            return None;
        }
        // Relaxed: the counter only spreads load; no other memory depends on it.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|offset| routing::round_robin(start.wrapping_add(offset), len))
            .filter(|i| Some(*i) != exclude)
            .find(|i| self.backends[*i].health.usable_at(now_ms))
            .map(|i| (i, &self.backends[i]))
    }

    /// Records a request's outcome on backend `index` (a connect error or a 5xx is a
    /// failure) and ejects it when the policy says so.
    pub fn record_outcome(&self, index: usize, failed: bool, now_ms: u64) -> Option<Ejection> {
        let health = &self.backends.get(index)?.health;
        if !failed {
            health.failures_in_row.store(0, Ordering::Relaxed);
            let successes = health.successes_in_row.fetch_add(1, Ordering::Relaxed) + 1;
            if successes >= self.policy.consecutive_failures.max(1) {
                health.ejections_in_row.store(0, Ordering::Relaxed);
            }
            return None;
        }
        health.successes_in_row.store(0, Ordering::Relaxed);
        let failures = health.failures_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = self.policy.consecutive_failures;
        if threshold == 0 || failures < threshold || health.ejected_at(now_ms) {
            return None;
        }
        let ejected_now = self
            .backends
            .iter()
            .filter(|b| b.health.ejected_at(now_ms))
            .count();
        if (ejected_now + 1) * 100
            > usize::from(self.policy.max_ejected_percent) * self.backends.len()
        {
            return Some(Ejection::Capped);
        }
        let previous = health.ejected_until_ms.load(Ordering::Relaxed);
        let in_row = health.ejections_in_row.fetch_add(1, Ordering::Relaxed);
        let length = self.policy.ejection_ms.saturating_mul(1 << in_row.min(4));
        // Only one of several concurrent failures performs the ejection.
        if health
            .ejected_until_ms
            .compare_exchange(
                previous,
                now_ms + length,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_err()
        {
            health.ejections_in_row.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        health.failures_in_row.store(0, Ordering::Relaxed);
        Some(Ejection::Ejected(Duration::from_millis(length)))
    }
}

/// Both pools, built from one config.
#[derive(Debug)]
pub struct Pools {
    pub production: BackendPool,
    pub canary: BackendPool,
}

impl Pools {
    /// Builds the pools; backends also in `previous` keep their health state.
    pub fn new(config: &PoolsConfig, health: &HealthConfig, previous: Option<&Pools>) -> Self {
        let policy = OutlierPolicy::from(health);
        Self {
            production: BackendPool::new(
                PoolKind::Production,
                &config.production,
                policy,
                previous.map(|p| &p.production),
            ),
            canary: BackendPool::new(
                PoolKind::Canary,
                &config.canary,
                policy,
                previous.map(|p| &p.canary),
            ),
        }
    }

    /// Every backend with its pool and whether it is usable at `now_ms`.
    pub fn backend_states(&self, now_ms: u64) -> impl Iterator<Item = (PoolKind, &str, bool)> {
        [&self.production, &self.canary]
            .into_iter()
            .flat_map(move |pool| {
                pool.backends
                    .iter()
                    .map(move |b| (pool.kind, b.authority.as_str(), b.health.usable_at(now_ms)))
            })
    }

    /// Every backend with its pool, open connections and queued requests.
    pub fn conn_states(&self) -> impl Iterator<Item = (PoolKind, &str, u64, usize)> {
        [&self.production, &self.canary]
            .into_iter()
            .flat_map(move |pool| {
                pool.backends.iter().map(move |b| {
                    let (open, waiting) = b.conns.open_and_waiting();
                    (pool.kind, b.authority.as_str(), open, waiting)
                })
            })
    }

    pub fn get(&self, kind: PoolKind) -> &BackendPool {
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

    fn pool_with(addrs: &[&str], policy: OutlierPolicy) -> BackendPool {
        let config = PoolConfig {
            backends: addrs
                .iter()
                .map(|a| BackendAddr::try_from((*a).to_owned()).unwrap())
                .collect(),
            ..PoolConfig::default()
        };
        BackendPool::new(PoolKind::Production, &config, policy, None)
    }

    const POLICY: OutlierPolicy = OutlierPolicy {
        consecutive_failures: 3,
        ejection_ms: 1_000,
        max_ejected_percent: 50,
    };

    fn picks(p: &BackendPool, now: u64, n: usize) -> Vec<&str> {
        (0..n)
            .map(|_| p.pick(now, None).unwrap().1.authority.as_str())
            .collect()
    }

    #[test]
    fn pick_cycles_through_backends_in_order() {
        let p = pool_with(&["a:1", "b:2", "c:3"], POLICY);
        assert_eq!(picks(&p, 0, 6), ["a:1", "b:2", "c:3", "a:1", "b:2", "c:3"]);
    }

    #[test]
    fn empty_pool_picks_nothing() {
        assert!(pool_with(&[], POLICY).pick(0, None).is_none());
    }

    #[test]
    fn unusable_backends_are_skipped_and_exclude_is_honoured() {
        let p = pool_with(&["a:1", "b:2", "c:3"], POLICY);
        p.backends[1]
            .health
            .active_up
            .store(false, Ordering::Relaxed);
        assert_eq!(picks(&p, 0, 4), ["a:1", "c:3", "c:3", "a:1"]);
        let (i, _) = p.pick(0, Some(0)).unwrap();
        assert_eq!(i, 2);
        p.backends[0]
            .health
            .active_up
            .store(false, Ordering::Relaxed);
        assert!(p.pick(0, Some(2)).is_none());
    }

    #[test]
    fn consecutive_failures_eject_with_doubling() {
        let p = pool_with(&["a:1", "b:2"], POLICY);
        assert_eq!(p.record_outcome(0, true, 0), None);
        assert_eq!(p.record_outcome(0, true, 0), None);
        // A success in between resets the streak.
        assert_eq!(p.record_outcome(0, false, 0), None);
        for _ in 0..2 {
            assert_eq!(p.record_outcome(0, true, 0), None);
        }
        assert_eq!(
            p.record_outcome(0, true, 10),
            Some(Ejection::Ejected(Duration::from_millis(1_000)))
        );
        assert!(!p.backends[0].health.usable_at(500));
        assert_eq!(picks(&p, 500, 2), ["b:2", "b:2"]);
        // Back after the ejection; failing again doubles the time.
        assert!(p.backends[0].health.usable_at(1_010));
        for _ in 0..2 {
            assert_eq!(p.record_outcome(0, true, 1_100), None);
        }
        assert_eq!(
            p.record_outcome(0, true, 1_100),
            Some(Ejection::Ejected(Duration::from_millis(2_000)))
        );
        assert!(!p.backends[0].health.usable_at(3_000));
        assert!(p.backends[0].health.usable_at(3_100));
        // Enough successes in a row reset the doubling.
        for _ in 0..3 {
            p.record_outcome(0, false, 3_200);
        }
        for _ in 0..2 {
            p.record_outcome(0, true, 3_300);
        }
        assert_eq!(
            p.record_outcome(0, true, 3_300),
            Some(Ejection::Ejected(Duration::from_millis(1_000)))
        );
    }

    #[test]
    fn never_more_than_max_ejected_percent() {
        let p = pool_with(&["a:1", "b:2"], POLICY);
        for _ in 0..2 {
            p.record_outcome(0, true, 0);
            p.record_outcome(1, true, 0);
        }
        assert!(matches!(
            p.record_outcome(0, true, 0),
            Some(Ejection::Ejected(_))
        ));
        // Ejecting b too would empty half + half = 100% > 50%.
        assert_eq!(p.record_outcome(1, true, 0), Some(Ejection::Capped));
        assert!(p.backends[1].health.usable_at(0));
    }

    #[test]
    fn passing_checks_do_not_end_an_ejection_early() {
        let p = pool_with(&["a:1", "b:2"], POLICY);
        for _ in 0..3 {
            p.record_outcome(0, true, 0);
        }
        let h = &p.backends[0].health;
        for _ in 0..5 {
            assert_eq!(h.record_check(true, 2, 3), None);
        }
        assert!(!h.usable_at(999));
        assert!(h.usable_at(1_000));
    }

    #[test]
    fn health_survives_a_rebuild_for_the_same_address() {
        let health = HealthConfig::default();
        let config = |addrs: &[&str]| PoolsConfig {
            production: PoolConfig {
                backends: addrs
                    .iter()
                    .map(|a| BackendAddr::try_from((*a).to_owned()).unwrap())
                    .collect(),
                ..PoolConfig::default()
            },
            canary: PoolConfig::default(),
        };
        let old = Pools::new(&config(&["a:1", "b:2"]), &health, None);
        old.production.backends[1]
            .health
            .active_up
            .store(false, Ordering::Relaxed);
        let new = Pools::new(&config(&["b:2", "c:3"]), &health, Some(&old));
        assert!(!new.production.backends[0].health.active_up());
        assert!(new.production.backends[1].health.active_up());
    }
}
