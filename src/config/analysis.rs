//! `[analysis]`: the rules serde cannot check. The settings themselves are the
//! judge's parameters, so they are declared beside it ([`crate::canary::settings`])
//! and the pure half of the analysis needs nothing from the config.

pub use crate::canary::settings::AnalysisConfig;
use crate::config::Violation;

impl AnalysisConfig {
    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: format!("analysis.{key}"),
                message,
            })
        };
        for (key, value) in [
            ("interval_ms", self.interval_ms),
            ("window_ms", self.window_ms),
            ("min_requests", self.min_requests),
            ("step_ms", self.step_ms),
            ("failure_threshold", u64::from(self.failure_threshold)),
        ] {
            if value == 0 {
                return fail(key, "must be greater than 0".to_owned());
            }
        }
        if self.window_ms < self.interval_ms {
            return fail(
                "window_ms",
                format!(
                    "{} is shorter than interval_ms ({}): checks would skip requests",
                    self.window_ms, self.interval_ms
                ),
            );
        }
        if !(self.confidence > 0.5 && self.confidence < 1.0) {
            return fail(
                "confidence",
                format!(
                    "{} is out of range; it must be in (0.5, 1), e.g. 0.99",
                    self.confidence
                ),
            );
        }
        if !(0.0..1.0).contains(&self.max_error_ratio_delta) {
            return fail(
                "max_error_ratio_delta",
                format!(
                    "{} is out of range; it must be in [0, 1)",
                    self.max_error_ratio_delta
                ),
            );
        }
        if !(self.max_latency_ratio >= 1.0 && self.max_latency_ratio.is_finite()) {
            return fail(
                "max_latency_ratio",
                format!(
                    "{} is out of range; it must be at least 1",
                    self.max_latency_ratio
                ),
            );
        }
        if let Some(bad) = self.steps.iter().find(|p| **p == 0 || **p > 100) {
            return fail(
                "steps",
                format!("{bad} is out of range; steps are percents 1..=100"),
            );
        }
        if let Some(pair) = self.steps.windows(2).find(|w| w[0] >= w[1]) {
            return fail(
                "steps",
                format!("{} then {}: steps must increase", pair[0], pair[1]),
            );
        }
        if self.redis_key.is_empty() {
            return fail("redis_key", "must not be empty".to_owned());
        }
        Ok(())
    }
}
