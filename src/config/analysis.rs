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
        if let Some(delta) = self.max_error_ratio_delta {
            return fail(
                "max_error_ratio_delta",
                format!(
                    "{delta}: this key is retired (the error rule is relative now); \
                     set max_error_ratio_factor (default 2.0) and min_error_ratio_delta \
                     (default 0.005) instead, see docs/canary-analysis.md#the-rule"
                ),
            );
        }
        if !(self.max_error_ratio_factor >= 1.0 && self.max_error_ratio_factor.is_finite()) {
            return fail(
                "max_error_ratio_factor",
                format!(
                    "{} is out of range; it must be at least 1, e.g. 2.0",
                    self.max_error_ratio_factor
                ),
            );
        }
        if !(0.0..1.0).contains(&self.min_error_ratio_delta) {
            return fail(
                "min_error_ratio_delta",
                format!(
                    "{} is out of range; it must be in [0, 1), e.g. 0.005",
                    self.min_error_ratio_delta
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
        if !(self.max_client_share > 0.0 && self.max_client_share <= 1.0) {
            return fail(
                "max_client_share",
                format!(
                    "{} is out of range; it must be in (0, 1], e.g. 0.05 (1 turns the cap off)",
                    self.max_client_share
                ),
            );
        }
        if self.redis_key.is_empty() {
            return fail("redis_key", "must not be empty".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::from_toml;
    use crate::config::tests::{MINIMAL, err};

    #[test]
    fn analysis_defaults_and_bad_values_name_file_line_and_key() {
        let c = from_toml(MINIMAL, "t").unwrap();
        let a = &c.analysis;
        assert!(!a.enabled);
        assert_eq!(
            (a.interval_ms, a.window_ms, a.min_requests),
            (10_000, 120_000, 100)
        );
        assert_eq!(
            (a.failure_threshold, a.redis_key.as_str()),
            (2, "canarygate:analysis")
        );
        assert!(
            (a.max_error_ratio_factor - 2.0).abs() < 1e-12
                && (a.min_error_ratio_delta - 0.005).abs() < 1e-12
                && (a.confidence - 0.99).abs() < 1e-12
        );
        assert_eq!(a.max_error_ratio_delta, None);
        let ok = from_toml(
            &format!("{MINIMAL}[analysis]\nenabled = true\nsteps = [5, 10, 25, 33, 50]\nstep_ms = 30000\n"),
            "t",
        )
        .unwrap();
        assert_eq!(ok.analysis.steps, [5, 10, 25, 33, 50]);
        for (body, want) in [
            (
                "steps = [5, 25, 10]",
                "test.toml:4: key `analysis.steps`: 25 then 10: steps must increase",
            ),
            (
                "steps = [5, 101]",
                "test.toml:4: key `analysis.steps`: 101 is out of range; steps are percents 1..=100",
            ),
            (
                "confidence = 0.5",
                "test.toml:4: key `analysis.confidence`: 0.5 is out of range; it must be in (0.5, 1), e.g. 0.99",
            ),
            (
                "confidence = 1.0",
                "test.toml:4: key `analysis.confidence`: 1 is out of range; it must be in (0.5, 1), e.g. 0.99",
            ),
            (
                "interval_ms = 20000\nwindow_ms = 10000",
                "test.toml:5: key `analysis.window_ms`: 10000 is shorter than interval_ms (20000): checks would skip requests",
            ),
            (
                "max_error_ratio_delta = 0.02",
                "test.toml:4: key `analysis.max_error_ratio_delta`: 0.02: this key is retired \
                 (the error rule is relative now); set max_error_ratio_factor (default 2.0) and \
                 min_error_ratio_delta (default 0.005) instead, see docs/canary-analysis.md#the-rule",
            ),
            (
                "max_error_ratio_factor = 0.5",
                "test.toml:4: key `analysis.max_error_ratio_factor`: 0.5 is out of range; it must be at least 1, e.g. 2.0",
            ),
            (
                "min_error_ratio_delta = 1.0",
                "test.toml:4: key `analysis.min_error_ratio_delta`: 1 is out of range; it must be in [0, 1), e.g. 0.005",
            ),
            (
                "failure_threshold = 0",
                "test.toml:4: key `analysis.failure_threshold`: must be greater than 0",
            ),
        ] {
            assert_eq!(err(&format!("{MINIMAL}[analysis]\n{body}\n")), want);
        }
        let e = err(&format!("{MINIMAL}[analysis]\nsteps = [5, 300]\n"));
        assert!(e.starts_with("test.toml:4: key `analysis.steps"), "{e}");
        let e = err(&format!("{MINIMAL}[analysis]\nwindow = 5\n"));
        assert!(e.starts_with("test.toml:4: key `analysis"), "{e}");
    }
}
