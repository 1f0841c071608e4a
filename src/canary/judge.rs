//! One check: canary against production over the same window, by two rules.
//!
//! - Errors: the canary fails when its error ratio exceeds production's by more than
//!   `max_error_ratio_delta` AND a one-sided two-proportion z-test says the
//!   difference is significant.
//! - Latency: the canary fails when its p99 exceeds both production's p99 times
//!   `max_latency_ratio` and production's p99 plus `min_latency_delta`, AND the share
//!   of canary requests slower than that line is significantly above 1% (a
//!   one-proportion z-test: a p99 from a small window is noisy, the count behind it
//!   is not).
//!
//! Checks run every interval over overlapping windows, so one request is seen by
//! about `window / interval` checks. Testing each at the bare confidence would
//! inflate false alarms that many times over; instead each check tests at
//! `alpha / looks` (Bonferroni over the looks that share data), where
//! `alpha = 1 - confidence`. Evidence strong enough to pass `failure_threshold`
//! independent checks at once (`p < (alpha / looks)^failure_threshold`) is
//! *decisive*: it counts as that many failed checks, so a canary failing a fifth of
//! its requests goes at the first check rather than the second.
//!
//! Fewer than `min_requests` in either pool gives *hold*: no verdict without data.

use std::fmt::Write as _;

use serde::Serialize;

use super::settings::AnalysisConfig;
use super::stats::{normal_quantile, proportion_above_z, two_proportion_z};
use super::window::PoolWindow;

/// What a check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Hold,
}

impl Outcome {
    pub const ALL: [Self; 3] = [Self::Pass, Self::Fail, Self::Hold];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Hold => "hold",
        }
    }
}

/// The thresholds of the rules, with the multiple-looks correction worked out once.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub min_requests: u64,
    pub max_error_ratio_delta: f64,
    pub max_latency_ratio: f64,
    pub min_latency_delta_us: u64,
    /// Critical z of one look: `Φ⁻¹(1 - alpha / looks)`.
    pub z_critical: f64,
    /// Critical z of decisive evidence: `Φ⁻¹(1 - (alpha / looks)^failure_threshold)`.
    pub z_decisive: f64,
}

impl Rules {
    pub fn new(s: &AnalysisConfig) -> Self {
        let alpha = 1.0 - s.confidence;
        let alpha_look = alpha / looks(s.window_ms, s.interval_ms);
        let threshold = i32::try_from(s.failure_threshold.max(1)).unwrap_or(i32::MAX);
        Self {
            min_requests: s.min_requests,
            max_error_ratio_delta: s.max_error_ratio_delta,
            max_latency_ratio: s.max_latency_ratio,
            min_latency_delta_us: s.min_latency_delta_ms.saturating_mul(1_000),
            z_critical: normal_quantile(1.0 - alpha_look),
            // For tiny p, Φ⁻¹(1 - p) = -Φ⁻¹(p) keeps the precision 1 - p would lose.
            z_decisive: -normal_quantile(alpha_look.powi(threshold)),
        }
    }
}

/// How many checks see one request: `ceil(window / interval)`, at least 1.
pub fn looks(window_ms: u64, interval_ms: u64) -> f64 {
    super::stats::to_f64(window_ms.div_ceil(interval_ms.max(1)).max(1))
}

/// One pool's figures in a check.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figures {
    /// Requests judged; the errors, ratio and quantiles are of these alone.
    pub requests: u64,
    pub errors: u64,
    pub error_ratio: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Placed by the bucket, past their client's cap: not judged.
    pub capped: u64,
    /// Placed by the override, failover or the kill switch: not judged.
    pub apart: u64,
    /// The most one client counted for per slot.
    pub client_cap: u64,
}

impl Figures {
    pub fn of(window: &PoolWindow) -> Self {
        let ms = |q| {
            window
                .quantile_us(q)
                .map(|us| super::stats::to_f64(us) / 1_000.0)
        };
        Self {
            requests: window.requests,
            errors: window.errors,
            error_ratio: window.error_ratio(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            capped: window.capped,
            apart: window.apart,
            client_cap: window.client_cap,
        }
    }
}

/// The result of one check, with the figures it was made from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub outcome: Outcome,
    /// Decisive evidence: counts as `failure_threshold` failed checks.
    pub decisive: bool,
    /// In words, with the figures: why it passed, failed or held.
    pub reason: String,
    pub production: Figures,
    pub canary: Figures,
    /// z of the error-ratio test (canary above production), when it could be made.
    pub error_z: Option<f64>,
    /// z of the latency test (canary share above the line, against 1%).
    pub latency_z: Option<f64>,
    pub z_critical: f64,
}

#[cfg(test)]
impl Check {
    /// A check with `outcome` and no figures, for the tests of what reads checks.
    pub fn sample(outcome: Outcome, decisive: bool) -> Self {
        let none = Figures {
            requests: 0,
            errors: 0,
            error_ratio: 0.0,
            p50_ms: None,
            p99_ms: None,
            capped: 0,
            apart: 0,
            client_cap: 1,
        };
        Self {
            outcome,
            decisive,
            reason: String::new(),
            production: none,
            canary: none,
            error_z: None,
            latency_z: None,
            z_critical: 3.0,
        }
    }
}

/// Judges the canary against production over one window.
pub fn judge(rules: &Rules, production: &PoolWindow, canary: &PoolWindow) -> Check {
    let mut check = Check {
        outcome: Outcome::Pass,
        decisive: false,
        reason: String::new(),
        production: Figures::of(production),
        canary: Figures::of(canary),
        error_z: None,
        latency_z: None,
        z_critical: rules.z_critical,
    };
    if production.requests < rules.min_requests || canary.requests < rules.min_requests {
        check.outcome = Outcome::Hold;
        check.reason = format!(
            "too few requests to judge: canary {}, production {} (min_requests {})",
            canary.requests, production.requests, rules.min_requests
        );
        return check;
    }
    let mut failures = Vec::new();

    // Rule (a): errors.
    let (pe, ce) = (check.production.error_ratio, check.canary.error_ratio);
    check.error_z = two_proportion_z(
        canary.errors.min(canary.requests),
        canary.requests,
        production.errors.min(production.requests),
        production.requests,
    );
    if ce - pe > rules.max_error_ratio_delta
        && let Some(z) = check.error_z.filter(|z| *z > rules.z_critical)
    {
        check.decisive |= z > rules.z_decisive;
        failures.push(format!(
            "canary error ratio {} vs production {} (z {z:.2} > {:.2})",
            percent(ce),
            percent(pe),
            rules.z_critical
        ));
    }

    // Rule (b): latency.
    if let (Some(p99_production), Some(p99_canary)) =
        (production.quantile_us(0.99), canary.quantile_us(0.99))
    {
        let scaled = super::stats::to_f64(p99_production) * rules.max_latency_ratio;
        let line = scaled.max(super::stats::to_f64(
            p99_production.saturating_add(rules.min_latency_delta_us),
        ));
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let line_us = line.ceil() as u64;
        if p99_canary > line_us {
            check.latency_z =
                proportion_above_z(canary.count_above(line_us), canary.requests, 0.01);
            if let Some(z) = check.latency_z.filter(|z| *z > rules.z_critical) {
                check.decisive |= z > rules.z_decisive;
                failures.push(format!(
                    "canary p99 {} vs production {} (line {}; z {z:.2} > {:.2})",
                    millis(p99_canary),
                    millis(p99_production),
                    millis(line_us),
                    rules.z_critical
                ));
            }
        }
    }

    if failures.is_empty() {
        let mut reason = format!("canary error ratio {} vs {}", percent(ce), percent(pe));
        if let (Some(c), Some(p)) = (check.canary.p99_ms, check.production.p99_ms) {
            let _ = write!(reason, ", p99 {c:.1} ms vs {p:.1} ms");
        }
        check.reason = reason;
    } else {
        check.outcome = Outcome::Fail;
        check.reason = failures.join("; ");
        if check.decisive {
            check.reason.push_str(" [decisive]");
        }
    }
    check
}

fn percent(ratio: f64) -> String {
    format!("{:.2}%", ratio * 100.0)
}

fn millis(us: u64) -> String {
    format!("{:.1} ms", super::stats::to_f64(us) / 1_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults: checks every 10 s over 120 s, min_requests 100, delta 0.02,
    /// confidence 0.99, latency 1.5x and +50 ms, failure_threshold 2.
    fn settings() -> AnalysisConfig {
        AnalysisConfig::default()
    }

    /// `n` requests, the first `errors` of them errors, latencies spread evenly
    /// over `from_ms..to_ms`.
    fn window(n: u64, errors: u64, from_ms: u64, to_ms: u64) -> PoolWindow {
        let mut w = PoolWindow::default();
        for i in 0..n {
            w.record(
                (from_ms * 1_000) + (to_ms - from_ms) * 1_000 * i / n,
                i < errors,
            );
        }
        w
    }

    #[test]
    fn the_looks_correction_by_hand() {
        let rules = Rules::new(&settings());
        // 12 looks: alpha per look 0.01 / 12 = 8.333e-4, Φ⁻¹(1 - 8.333e-4) = 3.1440;
        // decisive: (8.333e-4)^2 = 6.944e-7, Φ⁻¹(1 - 6.944e-7) = 4.8266.
        assert!(
            (rules.z_critical - 3.143_980_3).abs() < 1e-6,
            "{}",
            rules.z_critical
        );
        assert!(
            (rules.z_decisive - 4.826_592).abs() < 1e-5,
            "{}",
            rules.z_decisive
        );
        assert_eq!(looks(120_000, 10_000), 12.0);
        assert_eq!(looks(1_000, 300), 4.0);
        assert_eq!(looks(100, 1_000), 1.0);
    }

    #[test]
    fn too_few_requests_hold() {
        let rules = Rules::new(&settings());
        let check = judge(&rules, &window(1_000, 0, 1, 5), &window(99, 99, 1, 5));
        assert_eq!(check.outcome, Outcome::Hold);
        assert!(check.reason.contains("canary 99"), "{}", check.reason);
    }

    #[test]
    fn a_fifth_of_errors_fails_decisively() {
        let rules = Rules::new(&settings());
        // 200/1000 against 10/2000: z = 19.73 (worked out in stats).
        let check = judge(&rules, &window(2_000, 10, 1, 5), &window(1_000, 200, 1, 5));
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.decisive);
        assert!((check.error_z.unwrap() - 19.733_244).abs() < 1e-5);
        assert!(
            check.reason.contains("20.00% vs production 0.50%"),
            "{}",
            check.reason
        );
    }

    #[test]
    fn the_error_rule_needs_both_the_delta_and_significance() {
        let rules = Rules::new(&settings());
        // 3% against 0.5%: delta 0.025 > 0.02; 30/1000 vs 10/2000: pooled 40/3000,
        // z = 0.025 / sqrt(0.013333 * 0.986667 * 0.0015) = 5.6278: decisive.
        let check = judge(&rules, &window(2_000, 10, 1, 5), &window(1_000, 30, 1, 5));
        assert_eq!((check.outcome, check.decisive), (Outcome::Fail, true));
        assert!(
            (check.error_z.unwrap() - 5.627_815).abs() < 1e-5,
            "{:?}",
            check.error_z
        );
        // The same ratios on 100 requests: delta still 0.025, z = 0.025 / sqrt(
        // (4/300)(296/300)(0.015)) = 1.7797 < 3.14: not significant, pass.
        let check = judge(&rules, &window(200, 1, 1, 5), &window(100, 3, 1, 5));
        assert_eq!(check.outcome, Outcome::Pass, "{}", check.reason);
        assert!(
            (check.error_z.unwrap() - 1.779_671).abs() < 1e-5,
            "{:?}",
            check.error_z
        );
        // Significant but inside the delta: 2% against 0.5% (delta 0.015), pass.
        let check = judge(
            &rules,
            &window(20_000, 100, 1, 5),
            &window(10_000, 200, 1, 5),
        );
        assert_eq!(check.outcome, Outcome::Pass);
        assert!(check.error_z.unwrap() > rules.z_decisive);
    }

    #[test]
    fn the_latency_rule_needs_both_lines_and_a_count() {
        let rules = Rules::new(&settings());
        // Production 1..=20 ms (p99 about 19.8 ms): the line is max(29.7, 69.8) = 69.8 ms.
        let production = window(2_000, 0, 1, 21);
        // Canary 200 ms slower: every request above the line; decisive.
        let slow = window(1_000, 0, 201, 221);
        let check = judge(&rules, &production, &slow);
        assert_eq!(
            (check.outcome, check.decisive),
            (Outcome::Fail, true),
            "{}",
            check.reason
        );
        assert!(check.reason.contains("canary p99 22"), "{}", check.reason);
        // 40 ms slower: above 1.5x but under +50 ms: pass.
        let check = judge(&rules, &production, &window(1_000, 0, 41, 61));
        assert_eq!(check.outcome, Outcome::Pass, "{}", check.reason);
        // 2 of 100 canary requests at 500 ms: the p99 is over the line, but 2% of 100
        // is not significantly above 1% (z = 1.005): pass.
        let mut few = window(98, 0, 1, 21);
        few.record(500_000, false);
        few.record(500_000, false);
        let check = judge(&rules, &production, &few);
        assert_eq!(check.outcome, Outcome::Pass, "{}", check.reason);
        assert!(
            (check.latency_z.unwrap() - 1.005_037_8).abs() < 1e-6,
            "{:?}",
            check.latency_z
        );
    }
}
