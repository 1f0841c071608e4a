//! Upstream side: pools of backends, their health, and their keep-alive connections
//! (see [`crate::pool`]).
//!
//! A backend is *usable* when its active health check says up **and** it is not
//! ejected. Active checks (see [`crate::health`]) flip `active_up` after `rise`
//! passes or `fall` failures. Passive ejection (outlier detection) happens on the
//! request path: `consecutive_failures` connect errors or 5xx in a row eject a backend
//! for `ejection_ms`, doubling on each ejection in a row (up to 16x), never more than
//! `max_ejected_percent` of a pool at once. A passing active check does not end an
//! ejection early: the ejection runs its time, then the backend is usable again if
//! the active check still says up. Health state lives in an `Arc` per backend address
//! and survives config reloads.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::config::{HealthConfig, PoolConfig, PoolsConfig};
use crate::pool::WorkerPools;
use crate::routing::{self, PoolKind};

/// Milliseconds on a monotonic clock shared by the process (ejection deadlines).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------
// Request bodies

/// A request body exceeded `limits.max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds max_body_bytes ({0})")]
pub struct BodyTooLarge(pub u64);

/// Reading the client's request body failed (malformed chunking, client gone): the
/// client's fault, not the backend's.
#[derive(Debug, thiserror::Error)]
#[error("reading the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// The body sent upstream: the client's body streamed through (with an optional size
/// limit), or nothing (a retried request, which only ever has an empty body).
pub enum UpstreamBody {
    Client {
        inner: Incoming,
        limit: Option<u64>,
        seen: u64,
    },
    Empty,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> Self {
        Self::Client {
            inner,
            limit,
            seen: 0,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Client { inner, limit, seen } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        *seen += data.len() as u64;
                        if let Some(limit) = *limit
                            && *seen > limit
                        {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Client { inner, .. } => inner.size_hint(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Backend health

/// Health of one backend address, shared across config reloads.
#[derive(Debug)]
pub struct BackendHealth {
    active_up: AtomicBool,
    /// Active check streak: positive = passes in a row, negative = failures in a row.
    check_streak: std::sync::atomic::AtomicI32,
    /// Passive: connect errors or 5xx in a row.
    failures_in_row: AtomicU32,
    successes_in_row: AtomicU32,
    /// `now_ms()` until which the backend is ejected; 0 = not ejected.
    ejected_until_ms: AtomicU64,
    /// Ejections in a row, for the doubling.
    ejections_in_row: AtomicU32,
}

impl Default for BackendHealth {
    fn default() -> Self {
        // A new backend starts up: traffic flows at once, and a dead one is found by
        // the first failed connects (retried, then ejected) or by the active check.
        Self {
            active_up: AtomicBool::new(true),
            check_streak: std::sync::atomic::AtomicI32::new(0),
            failures_in_row: AtomicU32::new(0),
            successes_in_row: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections_in_row: AtomicU32::new(0),
        }
    }
}

/// A change of a backend's active state, for logs and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveChange {
    BecameUp,
    BecameDown,
}

impl BackendHealth {
    pub fn active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    pub fn ejected_at(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn usable_at(&self, now_ms: u64) -> bool {
        self.active_up() && !self.ejected_at(now_ms)
    }

    /// Records one active check. Returns a change when `rise`/`fall` is reached.
    pub fn record_check(&self, passed: bool, rise: u32, fall: u32) -> Option<ActiveChange> {
        let streak = self.check_streak.load(Ordering::Relaxed);
        let streak = match (passed, streak) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        self.check_streak.store(streak, Ordering::Relaxed);
        let up = self.active_up();
        let rise = i32::try_from(rise).unwrap_or(i32::MAX);
        let fall = i32::try_from(fall).unwrap_or(i32::MAX);
        if !up && streak >= rise {
            self.active_up.store(true, Ordering::Relaxed);
            Some(ActiveChange::BecameUp)
        } else if up && -streak >= fall {
            self.active_up.store(false, Ordering::Relaxed);
            Some(ActiveChange::BecameDown)
        } else {
            None
        }
    }
}

/// Passive ejection settings of a pool.
#[derive(Debug, Clone, Copy)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub ejection_ms: u64,
    pub max_ejected_percent: u8,
}

impl From<&HealthConfig> for OutlierPolicy {
    fn from(h: &HealthConfig) -> Self {
        Self {
            consecutive_failures: h.consecutive_failures,
            ejection_ms: h.ejection_ms,
            max_ejected_percent: h.max_ejected_percent,
        }
    }
}

/// What a request's outcome did to its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// Ejected for this long.
    Ejected(Duration),
    /// It should have been ejected, but `max_ejected_percent` was reached.
    Capped,
}

// ---------------------------------------------------------------------------------
// Retry budget

/// At most 20% extra requests from retries over a sliding 10 s window, with a floor of
/// 10 retries per window so a quiet proxy can still retry (the Finagle RetryBudget
/// shape). Approximate under races, which is all a budget needs.
#[derive(Debug, Default)]
pub struct RetryBudget {
    slots: [BudgetSlot; RETRY_WINDOW_S],
}

#[derive(Debug, Default)]
struct BudgetSlot {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

pub const RETRY_WINDOW_S: usize = 10;
pub const RETRY_PERCENT: u64 = 20;
pub const RETRY_FLOOR: u64 = 10;

impl RetryBudget {
    fn slot(&self, second: u64) -> &BudgetSlot {
        let slot = &self.slots[usize::try_from(second % RETRY_WINDOW_S as u64).unwrap_or(0)];
        if slot.second.swap(second, Ordering::Relaxed) != second {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    pub fn record_request(&self, now_ms: u64) {
        self.slot(now_ms / 1000)
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is one.
    pub fn try_retry(&self, now_ms: u64) -> bool {
        let now_s = now_ms / 1000;
        let (mut requests, mut retries) = (0, 0);
        for slot in &self.slots {
            let s = slot.second.load(Ordering::Relaxed);
            if s + RETRY_WINDOW_S as u64 > now_s {
                requests += slot.requests.load(Ordering::Relaxed);
                retries += slot.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = (requests * RETRY_PERCENT / 100).max(RETRY_FLOOR);
        if retries >= allowed {
            return false;
        }
        self.slot(now_s).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

// ---------------------------------------------------------------------------------
// Pools

/// One backend of a pool.
#[derive(Debug)]
pub struct Backend {
    pub authority: Authority,
    pub health: Arc<BackendHealth>,
    /// Its idle keep-alive connections, per worker thread.
    pub conns: Arc<WorkerPools>,
}

/// The backends of one pool, balanced round robin over the usable ones.
#[derive(Debug)]
pub struct Pool {
    pub kind: PoolKind,
    backends: Box<[Backend]>,
    next: AtomicUsize,
    policy: OutlierPolicy,
    pub retry_budget: RetryBudget,
}

impl Pool {
    pub fn new(
        kind: PoolKind,
        config: &PoolConfig,
        policy: OutlierPolicy,
        previous: Option<&Pool>,
    ) -> Self {
        let backends = config
            .backends
            .iter()
            .map(|b| {
                let old = previous.and_then(|p| p.backends.iter().find(|old| old.authority == b.0));
                Backend {
                    authority: b.0.clone(),
                    health: old.map_or_else(Arc::default, |old| Arc::clone(&old.health)),
                    conns: old.map_or_else(Arc::default, |old| Arc::clone(&old.conns)),
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
    pub production: Pool,
    pub canary: Pool,
}

impl Pools {
    /// Builds the pools; backends also in `previous` keep their health state.
    pub fn new(config: &PoolsConfig, health: &HealthConfig, previous: Option<&Pools>) -> Self {
        let policy = OutlierPolicy::from(health);
        Self {
            production: Pool::new(
                PoolKind::Production,
                &config.production,
                policy,
                previous.map(|p| &p.production),
            ),
            canary: Pool::new(
                PoolKind::Canary,
                &config.canary,
                policy,
                previous.map(|p| &p.canary),
            ),
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

    fn pool_with(addrs: &[&str], policy: OutlierPolicy) -> Pool {
        let config = PoolConfig {
            backends: addrs
                .iter()
                .map(|a| BackendAddr::try_from((*a).to_owned()).unwrap())
                .collect(),
        };
        Pool::new(PoolKind::Production, &config, policy, None)
    }

    const POLICY: OutlierPolicy = OutlierPolicy {
        consecutive_failures: 3,
        ejection_ms: 1_000,
        max_ejected_percent: 50,
    };

    fn picks(p: &Pool, now: u64, n: usize) -> Vec<&str> {
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
    fn rise_and_fall() {
        let h = BackendHealth::default();
        assert_eq!(h.record_check(false, 2, 3), None);
        assert_eq!(h.record_check(false, 2, 3), None);
        assert_eq!(h.record_check(false, 2, 3), Some(ActiveChange::BecameDown));
        assert_eq!(h.record_check(true, 2, 3), None);
        assert_eq!(h.record_check(false, 2, 3), None);
        assert_eq!(h.record_check(true, 2, 3), None);
        assert_eq!(h.record_check(true, 2, 3), Some(ActiveChange::BecameUp));
        assert!(h.active_up());
    }

    #[test]
    fn retry_budget_is_twenty_percent_with_a_floor() {
        let b = RetryBudget::default();
        // Quiet: the floor allows 10 per window.
        assert_eq!((0..20).filter(|_| b.try_retry(500)).count(), 10);
        let b = RetryBudget::default();
        for i in 0..1000 {
            b.record_request(i * 10); // 1000 requests over 10 s
        }
        assert_eq!((0..500).filter(|_| b.try_retry(9_999)).count(), 200);
        // The window slides: 10 s later the old requests no longer count.
        assert_eq!((0..500).filter(|_| b.try_retry(25_000)).count(), 10);
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
