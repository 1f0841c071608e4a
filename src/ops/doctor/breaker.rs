//! The circuit breaker: at most `max_kills` kills within `window_ms`.
//!
//! It counts decisions, not kills already done: a hog decided `Kill` takes its place
//! in the window at that moment, before the next hog of the same round is decided.
//! Counting finished kills instead let every hog that crossed in one round through
//! (three hogs with `max_kills = 1` were all killed: all were decided before the first
//! kill was recorded). A pure rule over instants, table-tested below.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The kills decided, kept by the process across config reloads: a SIGHUP
/// restarts the doctor's loop with new settings, and must not give it a fresh
/// window of `max_kills`.
pub type KillLog = Arc<Mutex<VecDeque<Instant>>>;

/// Kills decided within the last `window`.
#[derive(Debug, Clone)]
pub struct Breaker {
    max: usize,
    window: Duration,
    kills: KillLog,
}

impl Breaker {
    pub fn new(max_kills: u32, window: Duration) -> Self {
        Self::sharing(max_kills, window, KillLog::default())
    }

    /// A breaker counting the kills in `log`, which outlives it.
    pub fn sharing(max_kills: u32, window: Duration, log: KillLog) -> Self {
        Self {
            max: usize::try_from(max_kills).unwrap_or(usize::MAX),
            window,
            kills: log,
        }
    }

    /// The kills still in the window at `now` (older ones forgotten).
    fn pruned(&self, now: Instant) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        let mut kills = self.kills.lock().unwrap_or_else(PoisonError::into_inner);
        while kills
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.window)
        {
            kills.pop_front();
        }
        kills
    }

    /// Takes one kill at `now` if the window has room: `Ok`, or `Err` with the kills
    /// already in it (the breaker is open).
    pub fn admit(&mut self, now: Instant) -> Result<(), usize> {
        let mut kills = self.pruned(now);
        if kills.len() >= self.max {
            return Err(kills.len());
        }
        kills.push_back(now);
        Ok(())
    }

    /// Whether a kill at `now` would be refused.
    pub fn is_open(&mut self, now: Instant) -> bool {
        self.pruned(now).len() >= self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_kills_per_window_however_many_arrive_at_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // (max_kills, window ms, decisions at these ms, expected admissions)
        let table: &[(u32, u64, &[u64], &[bool])] = &[
            (1, 1_000, &[0, 0, 0], &[true, false, false]),
            (2, 1_000, &[0, 0, 0, 0], &[true, true, false, false]),
            (
                1,
                1_000,
                &[0, 999, 1_000, 1_001],
                &[true, false, false, true],
            ),
            (
                3,
                600_000,
                &[0, 10, 20, 30, 600_011],
                &[true, true, true, false, true],
            ),
        ];
        for (max, window, at, want) in table {
            let mut b = Breaker::new(*max, ms(*window));
            let got: Vec<bool> = at.iter().map(|t| b.admit(t0 + ms(*t)).is_ok()).collect();
            assert_eq!(&got, want, "max {max} window {window} at {at:?}");
        }
        let mut b = Breaker::new(1, ms(100));
        assert!(!b.is_open(t0));
        assert_eq!(b.admit(t0), Ok(()));
        assert!(b.is_open(t0 + ms(50)));
        assert_eq!(b.admit(t0 + ms(50)), Err(1));
        assert!(!b.is_open(t0 + ms(101)));
    }

    #[test]
    fn a_reloaded_breaker_remembers_the_kills_of_the_one_before() {
        let log = KillLog::default();
        let t0 = Instant::now();
        let mut before = Breaker::sharing(2, Duration::from_secs(60), Arc::clone(&log));
        assert!(before.admit(t0).is_ok());
        assert!(before.admit(t0).is_ok());
        // A SIGHUP: a new breaker with new settings, the same process's log.
        let mut after = Breaker::sharing(3, Duration::from_secs(60), log);
        assert!(after.admit(t0).is_ok());
        assert_eq!(after.admit(t0), Err(3));
        assert!(after.is_open(t0));
    }
}
