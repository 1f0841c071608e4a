//! What the analysis does after a check: a pure decision from the shared record
//! (the Redis hash `canarygate:analysis`, or a local copy without Redis), the
//! reserved flags as they are now, and this instance's own run of checks.
//!
//! The shared record makes a fleet agree: every instance judges its own traffic, and
//! every write is a compare-and-set on the record's `state` and `step`, so the first
//! failing verdict rolls back for all and the others, reading `rolled_back`, follow
//! it. The operator always wins: a `canary_percent` or `canary` value the analysis
//! did not write, or `canary_auto off`, hands control over (`manual`) until
//! `canary_auto on`. A rollback also sets `canary_auto off`, so it is never undone
//! automatically: `canary_auto on` is the one gesture that restarts the analysis.

use std::collections::HashMap;

use serde::Serialize;

use super::judge::{Check, Outcome};
use super::settings::AnalysisConfig;

/// The analysis' state; the number is `canarygate_canary_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not judging: analysis off, or no canary pool.
    Idle,
    /// Judging; with steps, moving the canary up.
    Progressing,
    /// Judging, but the last check had too little traffic for a verdict.
    Holding,
    /// Pulled out; waits for `canary_auto on`.
    RolledBack,
    /// Passed the last step; still judged (a late failure still rolls back).
    Healthy,
    /// An operator took over; waits for `canary_auto on`.
    Manual,
    /// `[shadow] gate`: the canary answers mirrored requests only, no users yet.
    Shadowing,
    /// The shadow found the canary answering differently; it keeps no users and
    /// waits for `canary_auto on` (which shadows it again from scratch).
    ShadowFailed,
}

impl State {
    pub const ALL: [Self; 8] = [
        Self::Idle,
        Self::Progressing,
        Self::Holding,
        Self::RolledBack,
        Self::Healthy,
        Self::Manual,
        Self::Shadowing,
        Self::ShadowFailed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Progressing => "progressing",
            Self::Holding => "holding",
            Self::RolledBack => "rolled_back",
            Self::Healthy => "healthy",
            Self::Manual => "manual",
            Self::Shadowing => "shadowing",
            Self::ShadowFailed => "shadow_failed",
        }
    }

    pub const fn code(self) -> i64 {
        match self {
            Self::Idle => 0,
            Self::Progressing => 1,
            Self::Holding => 2,
            Self::RolledBack => 3,
            Self::Healthy => 4,
            Self::Manual => 5,
            Self::Shadowing => 6,
            Self::ShadowFailed => 7,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// The analysis holds the levers in this state (it may roll back and step).
    pub const fn in_charge(self) -> bool {
        matches!(self, Self::Progressing | Self::Holding | Self::Healthy)
    }
}

/// The shared record: the Redis hash `canarygate:analysis`, field for field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// `None`: no record yet (or an operator deleted it).
    pub state: Option<State>,
    pub reason: String,
    /// The last check's figures, as JSON.
    pub figures: String,
    /// When the record was last written (RFC 3339) and by which instance.
    pub at: String,
    pub instance: String,
    /// `canary_percent` and `canary` as the analysis last wrote or adopted them:
    /// other values in the flag hash were written by hand.
    pub percent: Option<u8>,
    pub switch: bool,
    /// The current step (index into `steps`) and since when (Unix ms).
    pub step: usize,
    pub step_since_ms: u64,
}

impl Record {
    /// The hash's fields, as written.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("state", self.state.map_or("", State::as_str).to_owned()),
            ("reason", self.reason.clone()),
            ("figures", self.figures.clone()),
            ("at", self.at.clone()),
            ("instance", self.instance.clone()),
            (
                "percent",
                self.percent.map(|p| p.to_string()).unwrap_or_default(),
            ),
            ("switch", if self.switch { "on" } else { "off" }.to_owned()),
            ("step", self.step.to_string()),
            ("step_since_ms", self.step_since_ms.to_string()),
        ]
    }

    /// Reads the hash; unknown or unreadable fields take their defaults (the record
    /// is the analysis' own, but an operator may have edited it).
    pub fn from_fields(fields: &HashMap<String, String>) -> Self {
        let get = |k: &str| fields.get(k).map_or("", String::as_str);
        Self {
            state: State::parse(get("state")),
            reason: get("reason").to_owned(),
            figures: get("figures").to_owned(),
            at: get("at").to_owned(),
            instance: get("instance").to_owned(),
            percent: get("percent").parse().ok().filter(|p| *p <= 100),
            switch: get("switch") != "off",
            step: get("step").parse().unwrap_or(0),
            step_since_ms: get("step_since_ms").parse().unwrap_or(0),
        }
    }
}

/// The reserved flags as they are now: `canary_percent` (`None`: the config's),
/// the `canary` switch and `canary_auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levers {
    pub percent: Option<u8>,
    pub switch: bool,
    pub auto: bool,
}

/// This instance's run of checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Run {
    /// Failed checks in a row (a decisive one counts `failure_threshold`); a pass
    /// resets it, a hold leaves it (no data is no evidence either way).
    pub failures: u32,
    /// Since when (Unix ms) every check passed; `None` after a fail or a hold.
    pub passing_since_ms: Option<u64>,
    pub last: Option<Outcome>,
}

impl Run {
    pub fn observe(&mut self, check: &Check, failure_threshold: u32, now_ms: u64) {
        self.last = Some(check.outcome);
        match check.outcome {
            Outcome::Pass => {
                self.failures = 0;
                self.passing_since_ms.get_or_insert(now_ms);
            }
            Outcome::Fail => {
                let weight = if check.decisive { failure_threshold } else { 1 };
                self.failures = self.failures.saturating_add(weight);
                self.passing_since_ms = None;
            }
            Outcome::Hold => self.passing_since_ms = None,
        }
    }
}

/// What to do this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Take charge: write a new record (`progressing`, step 0) and, with steps, set
    /// `canary_percent` to the first one; without, adopt the split as it is.
    Start {
        percent: Option<u8>,
    },
    /// Move to step `index`: `canary_percent` = `percent`.
    Step {
        index: usize,
        percent: u8,
    },
    /// The last step passed: record `healthy`.
    Healthy,
    /// Set `canary_percent` 0 and `canary_auto off`; record `rolled_back`.
    RollBack,
    /// Record `manual` (and `canary_auto off`): someone else holds the levers.
    Manual {
        reason: String,
    },
    /// `[shadow] gate`: record `shadowing`; the canary gets no users meanwhile.
    Shadow,
    /// `[shadow] gate`: the shadow failed; record `shadow_failed`, set
    /// `canary_percent` 0 and `canary_auto off` (as a rollback does).
    ShadowFailed {
        reason: String,
        details: String,
    },
}

/// The decision; `now_ms` is Unix time in ms.
/// The rollout comes from `plan`'s `steps`, `step_ms` and `failure_threshold`.
pub fn decide(
    plan: &AnalysisConfig,
    record: &Record,
    levers: &Levers,
    run: &Run,
    now_ms: u64,
) -> Action {
    let state = record.state;
    if !levers.auto {
        return match state {
            Some(State::RolledBack | State::Manual) => Action::Nothing,
            _ => Action::Manual {
                reason: "canary_auto is off".to_owned(),
            },
        };
    }
    let Some(state) = state.filter(|s| s.in_charge()) else {
        // No record, or `canary_auto on` after a rollback or a manual spell.
        return Action::Start {
            percent: plan.steps.first().copied(),
        };
    };
    if levers.percent != record.percent || levers.switch != record.switch {
        let shown = |p: Option<u8>| p.map_or_else(|| "unset".to_owned(), |p| p.to_string());
        return Action::Manual {
            reason: format!(
                "set by hand: canary_percent {} (analysis set {}), canary {}",
                shown(levers.percent),
                shown(record.percent),
                if levers.switch { "on" } else { "off" }
            ),
        };
    }
    if run.failures >= plan.failure_threshold.max(1) {
        return Action::RollBack;
    }
    let passed_a_step = |since: u64| since.saturating_add(plan.step_ms) <= now_ms;
    if state == State::Progressing
        && !plan.steps.is_empty()
        && passed_a_step(record.step_since_ms)
        && run.passing_since_ms.is_some_and(passed_a_step)
    {
        let next = record.step + 1;
        return match plan.steps.get(next) {
            Some(&percent) => Action::Step {
                index: next,
                percent,
            },
            None => Action::Healthy,
        };
    }
    Action::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(steps: &[u8]) -> AnalysisConfig {
        AnalysisConfig {
            steps: steps.to_vec(),
            step_ms: 1_000,
            failure_threshold: 2,
            ..AnalysisConfig::default()
        }
    }

    fn progressing(percent: Option<u8>, step: usize, since: u64) -> Record {
        Record {
            state: Some(State::Progressing),
            percent,
            switch: true,
            step,
            step_since_ms: since,
            ..Record::default()
        }
    }

    const AUTO: Levers = Levers {
        percent: None,
        switch: true,
        auto: true,
    };

    fn check(outcome: Outcome, decisive: bool) -> Check {
        Check::sample(outcome, decisive)
    }

    #[test]
    fn the_run_counts_consecutive_failures() {
        let mut run = Run::default();
        run.observe(&check(Outcome::Fail, false), 2, 10);
        run.observe(&check(Outcome::Hold, false), 2, 20);
        assert_eq!(run.failures, 1, "a hold is no evidence either way");
        run.observe(&check(Outcome::Pass, false), 2, 30);
        assert_eq!((run.failures, run.passing_since_ms), (0, Some(30)));
        run.observe(&check(Outcome::Pass, false), 2, 40);
        assert_eq!(run.passing_since_ms, Some(30));
        run.observe(&check(Outcome::Fail, true), 2, 50);
        assert_eq!((run.failures, run.passing_since_ms), (2, None));
    }

    #[test]
    fn starts_with_the_first_step_or_adopts_the_split() {
        let none = Record::default();
        let run = Run::default();
        assert_eq!(
            decide(&plan(&[5, 10]), &none, &AUTO, &run, 0),
            Action::Start { percent: Some(5) }
        );
        assert_eq!(
            decide(&plan(&[]), &none, &AUTO, &run, 0),
            Action::Start { percent: None }
        );
        // canary_auto on after a rollback restarts.
        let rolled = Record {
            state: Some(State::RolledBack),
            ..Record::default()
        };
        assert_eq!(
            decide(&plan(&[5]), &rolled, &AUTO, &run, 0),
            Action::Start { percent: Some(5) }
        );
    }

    #[test]
    fn rolls_back_at_the_threshold_and_never_by_itself_undoes_it() {
        let record = progressing(None, 0, 0);
        let mut run = Run {
            failures: 1,
            ..Run::default()
        };
        assert_eq!(decide(&plan(&[]), &record, &AUTO, &run, 0), Action::Nothing);
        run.failures = 2;
        assert_eq!(
            decide(&plan(&[]), &record, &AUTO, &run, 0),
            Action::RollBack
        );
        // After the rollback the flags say canary_auto off: nothing more happens.
        let rolled = Record {
            state: Some(State::RolledBack),
            percent: Some(0),
            ..record
        };
        let off = Levers {
            percent: Some(0),
            switch: true,
            auto: false,
        };
        assert_eq!(decide(&plan(&[]), &rolled, &off, &run, 0), Action::Nothing);
    }

    #[test]
    fn steps_advance_after_step_ms_of_passing_checks() {
        let p = plan(&[5, 10, 25]);
        let record = progressing(Some(5), 0, 1_000);
        let levers = Levers {
            percent: Some(5),
            ..AUTO
        };
        let mut run = Run {
            passing_since_ms: Some(1_500),
            ..Run::default()
        };
        // The step is 1 s old at 2_000, but passing only since 1_500.
        assert_eq!(decide(&p, &record, &levers, &run, 2_000), Action::Nothing);
        assert_eq!(
            decide(&p, &record, &levers, &run, 2_500),
            Action::Step {
                index: 1,
                percent: 10
            }
        );
        // A hold stops the clock.
        run.passing_since_ms = None;
        assert_eq!(decide(&p, &record, &levers, &run, 9_000), Action::Nothing);
        // The last step passed: healthy.
        let last = progressing(Some(25), 2, 1_000);
        let run = Run {
            passing_since_ms: Some(1_000),
            ..Run::default()
        };
        let levers = Levers {
            percent: Some(25),
            ..AUTO
        };
        assert_eq!(decide(&p, &last, &levers, &run, 2_000), Action::Healthy);
        let healthy = Record {
            state: Some(State::Healthy),
            ..last
        };
        assert_eq!(decide(&p, &healthy, &levers, &run, 9_000), Action::Nothing);
    }

    #[test]
    fn a_hand_written_lever_hands_over() {
        let record = progressing(Some(10), 1, 0);
        let run = Run {
            failures: 5,
            passing_since_ms: None,
            last: None,
        };
        let by_hand = Levers {
            percent: Some(50),
            ..AUTO
        };
        let Action::Manual { reason } = decide(&plan(&[5, 10]), &record, &by_hand, &run, 0) else {
            panic!("expected manual")
        };
        assert!(
            reason.contains("canary_percent 50 (analysis set 10)"),
            "{reason}"
        );
        let switched_off = Levers {
            percent: Some(10),
            switch: false,
            auto: true,
        };
        assert!(matches!(
            decide(&plan(&[]), &record, &switched_off, &run, 0),
            Action::Manual { .. }
        ));
        let auto_off = Levers {
            percent: Some(10),
            switch: true,
            auto: false,
        };
        assert!(matches!(
            decide(&plan(&[]), &record, &auto_off, &run, 0),
            Action::Manual { .. }
        ));
        // In manual, nothing moves until canary_auto on, which restarts.
        let manual = Record {
            state: Some(State::Manual),
            ..record
        };
        assert_eq!(
            decide(&plan(&[5]), &manual, &auto_off, &run, 0),
            Action::Nothing
        );
        assert_eq!(
            decide(&plan(&[5]), &manual, &by_hand, &run, 0),
            Action::Start { percent: Some(5) }
        );
    }

    #[test]
    fn the_record_round_trips_through_the_hash() {
        let record = Record {
            state: Some(State::RolledBack),
            reason: "canary error ratio 20%".to_owned(),
            figures: "{}".to_owned(),
            at: "2026-11-28T19:00:00Z".to_owned(),
            instance: "host:8080".to_owned(),
            percent: Some(0),
            switch: true,
            step: 2,
            step_since_ms: 123,
        };
        let fields: HashMap<String, String> = record
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(Record::from_fields(&fields), record);
        assert_eq!(
            Record::from_fields(&HashMap::new()),
            Record {
                switch: true,
                ..Record::default()
            }
        );
        for state in State::ALL {
            assert_eq!(State::parse(state.as_str()), Some(state));
        }
    }
}
