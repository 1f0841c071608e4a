//! `[shadow] gate`: a new canary gets no users until the shadow passed. Pure: the
//! shadow's verdict from its totals, and the analysis' decision with the gate in
//! front of it ([`crate::canary::verdict::decide`] is left as it is).
//!
//! The gate sits where the analysis would start a canary (no record yet, or
//! `canary_auto on` after a rollback): instead it records `shadowing`, and only a
//! passing shadow lets the start (the first step) happen. A failing one records
//! `shadow_failed`, which, like `rolled_back`, waits for `canary_auto on`.

use crate::canary::settings::AnalysisConfig;
use crate::canary::verdict::{self, Action, Levers, Record, Run, State};
use crate::config::shadow::ShadowConfig;

use super::report::Totals;

/// What the shadow says of the canary so far.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Fewer than `min_samples` compared.
    Pending,
    Passed,
    /// The ratio is over `max_diff_ratio`; `details`: the top routes, an example.
    Failed {
        reason: String,
        details: String,
    },
}

/// The verdict from the totals; `details` is asked only for a failure.
pub fn verdict(
    config: &ShadowConfig,
    totals: &Totals,
    details: impl FnOnce() -> String,
) -> Verdict {
    if totals.samples < config.min_samples {
        return Verdict::Pending;
    }
    if totals.diff_ratio <= config.max_diff_ratio {
        return Verdict::Passed;
    }
    Verdict::Failed {
        reason: format!(
            "shadow: {:.2}% of {} mirrored requests differed from production (at most {:.2}%): \
             {} differences, {} canary errors",
            totals.diff_ratio * 100.0,
            totals.samples,
            config.max_diff_ratio * 100.0,
            totals.diffs,
            totals.candidate_errors
        ),
        details: details(),
    }
}

/// Why a shadowing canary still has no users, for the record's reason (`/analysis`,
/// the status page, `canary status`), rewritten each round: a shadow that gets no
/// traffic would otherwise hold the canary with nothing to show for it.
pub fn waiting(config: &ShadowConfig, totals: &Totals) -> String {
    if totals.samples == 0 {
        return format!(
            "shadowing: no mirrored request compared yet, {} needed before the canary gets \
             users; mirrored are {}% of production's {} requests without a body: with no such \
             traffic the canary waits here (`canary_auto off` hands it to the operator)",
            config.min_samples,
            config.percent,
            config.methods.join("/")
        );
    }
    format!(
        "shadowing: {} of {} mirrored requests compared, {:.2}% differing (at most {:.2}%); \
         no users until then",
        totals.samples,
        config.min_samples,
        totals.diff_ratio * 100.0,
        config.max_diff_ratio * 100.0
    )
}

/// The analysis' decision with the gate: `gate` is `None` when it is off.
pub fn decide(
    plan: &AnalysisConfig,
    gate: Option<Verdict>,
    record: &Record,
    levers: &Levers,
    run: &Run,
    now_ms: u64,
) -> Action {
    let action = verdict::decide(plan, record, levers, run, now_ms);
    let Some(gate) = gate else {
        return action;
    };
    match action {
        Action::Start { .. } if record.state != Some(State::Shadowing) => Action::Shadow,
        Action::Start { percent } => match gate {
            Verdict::Pending => Action::Nothing,
            Verdict::Passed => Action::Start { percent },
            Verdict::Failed { reason, details } => Action::ShadowFailed { reason, details },
        },
        other => other,
    }
}

/// Whether the canary's users are held off (the record's state, with the gate on):
/// before any record, while shadowing and after a failed shadow. An operator's
/// `manual` and every later state let the split in force apply.
pub fn holds_users(state: Option<State>) -> bool {
    matches!(state, None | Some(State::Shadowing | State::ShadowFailed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: Levers = Levers {
        percent: None,
        switch: true,
        auto: true,
    };

    fn plan() -> AnalysisConfig {
        AnalysisConfig {
            steps: vec![5, 25],
            ..AnalysisConfig::default()
        }
    }

    fn totals(samples: u64, diff_ratio: f64) -> Totals {
        Totals {
            samples,
            diff_ratio,
            ..Totals::default()
        }
    }

    #[test]
    fn the_verdict_waits_for_min_samples_then_compares_the_ratio() {
        let config = ShadowConfig {
            min_samples: 100,
            max_diff_ratio: 0.01,
            ..ShadowConfig::default()
        };
        let none = || String::new();
        assert_eq!(verdict(&config, &totals(99, 0.5), none), Verdict::Pending);
        assert_eq!(verdict(&config, &totals(100, 0.01), none), Verdict::Passed);
        let Verdict::Failed { reason, .. } = verdict(&config, &totals(100, 0.02), none) else {
            panic!("expected a failure")
        };
        assert!(
            reason.starts_with("shadow: 2.00% of 100 mirrored requests"),
            "{reason}"
        );
    }

    #[test]
    fn a_shadow_without_traffic_says_why_it_waits() {
        let config = ShadowConfig {
            min_samples: 200,
            ..ShadowConfig::default()
        };
        let idle = waiting(&config, &totals(0, 0.0));
        assert!(
            idle.contains("no mirrored request compared yet, 200 needed"),
            "{idle}"
        );
        assert!(
            idle.contains("10% of production's GET/HEAD requests"),
            "{idle}"
        );
        let going = waiting(&config, &totals(37, 0.0));
        assert!(
            going.starts_with("shadowing: 37 of 200 mirrored requests compared, 0.00%"),
            "{going}"
        );
    }

    #[test]
    fn a_new_canary_is_shadowed_before_its_first_step() {
        let run = Run::default();
        let none = Record::default();
        let shadowing = Record {
            state: Some(State::Shadowing),
            ..Record::default()
        };
        let failed = Verdict::Failed {
            reason: "r".to_owned(),
            details: "d".to_owned(),
        };
        // Gate off: as before.
        assert_eq!(
            decide(&plan(), None, &none, &AUTO, &run, 0),
            Action::Start { percent: Some(5) }
        );
        for gate in [Verdict::Pending, Verdict::Passed, failed.clone()] {
            assert_eq!(
                decide(&plan(), Some(gate), &none, &AUTO, &run, 0),
                Action::Shadow
            );
        }
        assert_eq!(
            decide(&plan(), Some(Verdict::Pending), &shadowing, &AUTO, &run, 0),
            Action::Nothing
        );
        assert_eq!(
            decide(&plan(), Some(Verdict::Passed), &shadowing, &AUTO, &run, 0),
            Action::Start { percent: Some(5) }
        );
        assert_eq!(
            decide(&plan(), Some(failed), &shadowing, &AUTO, &run, 0),
            Action::ShadowFailed {
                reason: "r".to_owned(),
                details: "d".to_owned()
            }
        );
        // canary_auto on after a failed shadow shadows again.
        let after = Record {
            state: Some(State::ShadowFailed),
            ..Record::default()
        };
        assert_eq!(
            decide(&plan(), Some(Verdict::Passed), &after, &AUTO, &run, 0),
            Action::Shadow
        );
        // An operator taking the levers while shadowing wins.
        let off = Levers {
            auto: false,
            ..AUTO
        };
        assert!(matches!(
            decide(&plan(), Some(Verdict::Pending), &shadowing, &off, &run, 0),
            Action::Manual { .. }
        ));
        assert!(holds_users(None) && holds_users(Some(State::ShadowFailed)));
        assert!(!holds_users(Some(State::Progressing)) && !holds_users(Some(State::Manual)));
    }
}
