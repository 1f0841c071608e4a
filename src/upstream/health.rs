//! Health of one backend: what active checks say (`rise` passes make it up, `fall`
//! failures down) and whether passive outlier detection has ejected it. A backend is
//! *usable* when both allow. The state lives in an `Arc` per backend address, so it
//! survives config reloads.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::HealthConfig;

/// Health of one backend address, shared across config reloads.
#[derive(Debug)]
pub struct BackendHealth {
    pub(crate) active_up: AtomicBool,
    /// Active check streak: positive = passes in a row, negative = failures in a row.
    check_streak: std::sync::atomic::AtomicI32,
    /// Passive: connect errors or 5xx in a row.
    pub(crate) failures_in_row: AtomicU32,
    pub(crate) successes_in_row: AtomicU32,
    /// `now_ms()` until which the backend is ejected; 0 = not ejected.
    pub(crate) ejected_until_ms: AtomicU64,
    /// Ejections in a row, for the doubling.
    pub(crate) ejections_in_row: AtomicU32,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
