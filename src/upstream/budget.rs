//! The retry budget: how many retries a pool may add on top of its requests, so that
//! retries never multiply load on a backend that is already failing.

use std::sync::atomic::{AtomicU64, Ordering};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
