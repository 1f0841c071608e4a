//! What the analysis shows: its state, the shared record and the checks of the last
//! 15 minutes, for `/analysis`, the status page and its chart. Written once per
//! check by the analysis task, read by the admin listener.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use super::judge::Check;
use super::verdict::{Record, State};

/// How long checks are kept.
pub const HISTORY_MS: u64 = 15 * 60 * 1_000;

/// One check and when it was made (Unix ms).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub at_ms: u64,
    #[serde(flatten)]
    pub check: Check,
}

/// A copy of the board.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub enabled: bool,
    pub state: Option<State>,
    pub record: Record,
    /// When this instance saw the canary rolled back (Unix ms), for the chart.
    pub rolled_back_at_ms: Option<u64>,
    pub checks: Vec<Entry>,
}

#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    enabled: bool,
    state: Option<State>,
    record: Record,
    rolled_back_at_ms: Option<u64>,
    checks: VecDeque<Entry>,
}

impl Board {
    /// Keeps a check, dropping those older than [`HISTORY_MS`].
    pub fn push(&self, entry: Entry) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let horizon = entry.at_ms.saturating_sub(HISTORY_MS);
        while inner.checks.front().is_some_and(|e| e.at_ms < horizon) {
            inner.checks.pop_front();
        }
        inner.checks.push_back(entry);
    }

    /// Publishes the state and the record as of `now_ms`.
    pub fn set(&self, enabled: bool, state: State, record: &Record, now_ms: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if state == State::RolledBack && inner.state != Some(State::RolledBack) {
            inner.rolled_back_at_ms = Some(now_ms);
        }
        inner.enabled = enabled;
        inner.state = Some(state);
        inner.record.clone_from(record);
    }

    pub fn view(&self) -> View {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        View {
            enabled: inner.enabled,
            state: inner.state,
            record: inner.record.clone(),
            rolled_back_at_ms: inner.rolled_back_at_ms,
            checks: inner.checks.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::judge::Outcome;

    fn entry(at_ms: u64) -> Entry {
        Entry {
            at_ms,
            check: Check::sample(Outcome::Hold, false),
        }
    }

    #[test]
    fn keeps_fifteen_minutes_and_marks_the_rollback_once() {
        let board = Board::default();
        for s in 0..=1_000u64 {
            board.push(entry(s * 1_000));
        }
        let view = board.view();
        assert_eq!(view.checks.first().unwrap().at_ms, 100_000);
        assert_eq!(view.checks.len(), 901);
        board.set(true, State::RolledBack, &Record::default(), 5);
        board.set(true, State::RolledBack, &Record::default(), 9);
        assert_eq!(board.view().rolled_back_at_ms, Some(5));
    }
}
