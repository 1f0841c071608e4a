//! One check: canary against production over the same window, by two relative
//! rules, each decided by the sequential test of [`super::sequential`].
//!
//! - Errors: the canary fails when the test finds its error ratio at least
//!   `max_error_ratio_factor` times production's and at least
//!   `min_error_ratio_delta` above it. The two make one alternative,
//!   `θ1 = max(factor, 1 + delta / q)`, `q` both pools' error ratio together (what
//!   production's is if the canary is no worse): the factor where errors are
//!   common, the floor where they are rare (against 0.01%, twice is noise to a
//!   user; half a point is not).
//! - Latency: the line is `max(p99_p × max_latency_ratio, p99_p + min_latency_delta)`;
//!   the canary fails when the test finds its share of requests slower than the
//!   line at least 1% (its p99 over the line) and at least twice the pools' share
//!   together.
//!
//! Each test weighs "the canary is that much worse" against "it is no worse", slot
//! by slot (what hits both pools in a slot cancels out), and fails the check when
//! its evidence, the log of a mixture likelihood ratio, is above `ln A`,
//! `A = RUN_WINDOWS × SLOTS / (1 - confidence)` (720 / 0.01 at the defaults):
//!
//! - errors: the Shiryaev–Roberts detector of [`Detector`], kept by the analysis
//!   task across checks, each complete slot folded in once. It makes at most one
//!   update per slot, so at most `RUN_WINDOWS × SLOTS` in a run, and reaches `A`
//!   within `n` updates with probability at most `n / A`: at most
//!   `1 - confidence` in a run for a canary no worse than production.
//! - latency: the ratio over the window; one window start's ratio reaches `A` with
//!   probability at most `1 / A` however often it is looked at (Ville's
//!   inequality), and a window starts every slot: the same bound by a union over
//!   the run's `RUN_WINDOWS × SLOTS` starts.
//!
//! Both whatever `interval_ms`. Evidence above `failure_threshold` times that
//! (`A^failure_threshold`) is *decisive*: it counts as that many failed checks.
//!
//! Between "no worse" and the rule the test may go either way: at high traffic it
//! tips toward a rollback at about `(θ1 - 1) / ln θ1` times production's ratio
//! (1.44 for θ1 = 2). The fixed-sample z statistics of the previous rules are still
//! computed and shown (`error_z`, `latency_z`), but decide nothing.
//!
//! Fewer than `min_requests` in either pool gives *hold*: no verdict without data.

use std::fmt::Write as _;

use serde::Serialize;

use super::sequential::{Counts, Detector, SlotCounts, log_evidence, smoothed_rate};
use super::settings::AnalysisConfig;
use super::stats::{normal_quantile, proportion_above_z, to_f64, two_proportion_z};
use super::window::{PoolWindow, SLOTS, Window};

/// The latency rule's share of canary requests above the line: its p99 is over it.
pub const SLOW_SHARE: f64 = 0.01;
/// ... and that share at least this many times production's.
pub const SLOW_FACTOR: f64 = 2.0;
/// The run the false-rollback bound is stated over, in windows: an hour at the
/// defaults. Why not the bench's 10 minutes: the error detector's bound is tight
/// where the window's union bound was loose; stated over 10 minutes (`ln A` 9.39)
/// it let 3 of 3,000 healthy 10-minute runs at 10 req/s roll back, within its 1%
/// but not within the 0.1% we measure against. Over an hour (`ln A` 11.18) the
/// bench finds none, and a 2%-error canary at 10 req/s is still caught in every
/// run (docs/canary-analysis.md, "Measured"). A canary stays judged long after
/// its steps, so an hour is also the more useful promise.
pub const RUN_WINDOWS: u64 = 30;
/// The largest alternative tried (production with no error at all and a floor of
/// half a point give `θ1` in the thousands; beyond this it changes nothing).
const MAX_THETA: f64 = 1e6;

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

/// The rules' parameters, with the test's threshold worked out once.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub min_requests: u64,
    pub max_error_ratio_factor: f64,
    pub min_error_ratio_delta: f64,
    pub max_latency_ratio: f64,
    pub min_latency_delta_us: u64,
    /// `ln A`, `A = RUN_WINDOWS × SLOTS / (1 - confidence)`: a check fails above it.
    pub evidence_threshold: f64,
    /// `failure_threshold × ln A`: decisive evidence.
    pub evidence_decisive: f64,
    /// `Φ⁻¹(1 - 1 / A)`: the z a fixed-sample test at the same level would need,
    /// shown beside `error_z` and `latency_z` for comparison.
    pub z_critical: f64,
}

impl Rules {
    pub fn new(s: &AnalysisConfig) -> Self {
        let alpha = 1.0 - s.confidence;
        let level = alpha / to_f64(RUN_WINDOWS * SLOTS);
        let threshold = (1.0 / level).ln();
        Self {
            min_requests: s.min_requests,
            max_error_ratio_factor: s.max_error_ratio_factor,
            min_error_ratio_delta: s.min_error_ratio_delta,
            max_latency_ratio: s.max_latency_ratio,
            min_latency_delta_us: s.min_latency_delta_ms.saturating_mul(1_000),
            evidence_threshold: threshold,
            evidence_decisive: threshold * f64::from(s.failure_threshold.max(1)),
            // For tiny p, Φ⁻¹(1 - p) = -Φ⁻¹(p) keeps the precision 1 - p would lose.
            z_critical: -normal_quantile(level),
        }
    }

    /// The error rule's alternative for production's error ratio `production`.
    pub fn error_alternative(&self, production: f64) -> f64 {
        self.max_error_ratio_factor
            .max(1.0 + self.min_error_ratio_delta / production)
            .min(MAX_THETA)
    }
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
        let ms = |q| window.quantile_us(q).map(|us| to_f64(us) / 1_000.0);
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
    /// In words, with the figures: the rule, the evidence and its threshold.
    pub reason: String,
    pub production: Figures,
    pub canary: Figures,
    /// The fixed-sample z of the error ratios (canary above production): shown, not
    /// decisive.
    pub error_z: Option<f64>,
    /// The fixed-sample z of the canary's share above the latency line against 1%:
    /// shown, not decisive.
    pub latency_z: Option<f64>,
    /// The z a fixed-sample test at the sequential test's level would need.
    pub z_critical: f64,
    /// The sequential test's evidence (ln of the likelihood ratio) on errors.
    pub error_evidence: Option<f64>,
    /// The error rule's alternative: canary errors `θ1` times production's.
    pub error_factor: Option<f64>,
    /// The sequential test's evidence on the share of requests above the line.
    pub latency_evidence: Option<f64>,
    /// The latency line (ms) and the alternative on the share above it.
    pub latency_line_ms: Option<f64>,
    pub latency_factor: Option<f64>,
    /// Slow requests (above the line) per pool, canary then production.
    pub slow: Option<(u64, u64)>,
    /// `ln A`: a check fails when an evidence is above it.
    pub evidence_threshold: f64,
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
            error_evidence: None,
            error_factor: None,
            latency_evidence: None,
            latency_line_ms: None,
            latency_factor: None,
            slow: None,
            evidence_threshold: 7.8,
        }
    }
}

/// Judges the canary against production over one window, after folding the
/// window's complete slots into `errors`, the error rule's detector (kept by the
/// caller from check to check, reset when the canary changes).
pub fn judge(rules: &Rules, window: &Window, errors: &mut Detector) -> Check {
    let (production, canary) = (&window.production, &window.canary);
    // Folded before anything is decided: a check that holds still learns.
    let error_theta = rules.error_alternative(smoothed_rate(
        production.errors.min(production.requests) + canary.errors.min(canary.requests),
        production.requests + canary.requests,
    ));
    errors.fold(
        window
            .complete()
            .map(|(epoch, slot)| (epoch, slot_counts(slot, |w| w.errors))),
        error_theta,
    );
    let mut check = Check {
        outcome: Outcome::Pass,
        decisive: false,
        reason: String::new(),
        production: Figures::of(production),
        canary: Figures::of(canary),
        error_z: None,
        latency_z: None,
        z_critical: rules.z_critical,
        error_evidence: None,
        error_factor: None,
        latency_evidence: None,
        latency_line_ms: None,
        latency_factor: None,
        slow: None,
        evidence_threshold: rules.evidence_threshold,
    };
    if production.requests < rules.min_requests || canary.requests < rules.min_requests {
        check.outcome = Outcome::Hold;
        check.reason = format!(
            "too few requests to judge: canary {}, production {} (min_requests {})",
            canary.requests, production.requests, rules.min_requests
        );
        return check;
    }
    let threshold = rules.evidence_threshold;
    let mut findings = Findings::default();

    // Rule (a): errors.
    let (pe, ce) = (check.production.error_ratio, check.canary.error_ratio);
    check.error_z = two_proportion_z(
        canary.errors.min(canary.requests),
        canary.requests,
        production.errors.min(production.requests),
        production.requests,
    );
    check.error_factor = Some(error_theta);
    check.error_evidence = errors.log_evidence();
    let (ce, pe) = (percent(ce), percent(pe));
    match check.error_evidence {
        Some(evidence) => {
            let words = format!(
                "canary error ratio {ce} vs production {pe} (rule: at least {error_theta:.2}x; \
                 evidence {evidence:.2} {} {threshold:.2} over {} slots with errors)",
                above(evidence, threshold),
                errors.updates().1,
            );
            findings.add(rules, evidence, words);
        }
        None => findings.passes.push(format!(
            "canary error ratio {ce} vs production {pe} (rule: at least {error_theta:.2}x; \
             no evidence yet: no complete slot with errors)"
        )),
    }

    // Rule (b): latency.
    if let (Some(p99_production), Some(p99_canary)) =
        (production.quantile_us(0.99), canary.quantile_us(0.99))
    {
        let scaled = to_f64(p99_production) * rules.max_latency_ratio;
        let line = scaled.max(to_f64(
            p99_production.saturating_add(rules.min_latency_delta_us),
        ));
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let line_us = line.ceil() as u64;
        let slots = per_slot(window, |w| w.count_above(line_us));
        let slow = slots
            .iter()
            .fold((0, 0), |(c, p), (sc, sp)| (c + sc.events, p + sp.events));
        let share = smoothed_rate(slow.0 + slow.1, production.requests + canary.requests);
        let theta = (SLOW_SHARE / share).clamp(SLOW_FACTOR, MAX_THETA);
        let evidence = log_evidence(&slots, theta);
        check.latency_z = proportion_above_z(slow.0, canary.requests, SLOW_SHARE);
        check.latency_evidence = Some(evidence);
        check.latency_line_ms = Some(line / 1_000.0);
        check.latency_factor = Some(theta);
        check.slow = Some(slow);
        let words = format!(
            "canary p99 {} vs production {} (line {}: {} of canary requests above it vs {}; \
             rule: at least 1% and {:.2}x; evidence {evidence:.2} {} {threshold:.2})",
            millis(p99_canary),
            millis(p99_production),
            millis(line_us),
            percent(to_f64(slow.0) / to_f64(canary.requests)),
            percent(to_f64(slow.1) / to_f64(production.requests)),
            theta,
            above(evidence, threshold),
        );
        findings.add(rules, evidence, words);
    }

    check.decisive = findings.decisive;
    if findings.failures.is_empty() {
        check.reason = findings.passes.join("; ");
    } else {
        check.outcome = Outcome::Fail;
        check.reason = findings.failures.join("; ");
        if check.decisive {
            let _ = write!(
                check.reason,
                " [decisive: > {:.2}]",
                rules.evidence_decisive
            );
        }
    }
    check
}

/// What each rule found, in words: failed (evidence above the threshold) or passed.
#[derive(Default)]
struct Findings {
    failures: Vec<String>,
    passes: Vec<String>,
    /// A failure's evidence was above the decisive threshold.
    decisive: bool,
}

impl Findings {
    fn add(&mut self, rules: &Rules, evidence: f64, words: String) {
        if evidence > rules.evidence_threshold {
            self.decisive |= evidence > rules.evidence_decisive;
            self.failures.push(words);
        } else {
            self.passes.push(words);
        }
    }
}

/// How evidence compares with the threshold, as the reason writes it.
fn above(evidence: f64, threshold: f64) -> &'static str {
    if evidence > threshold { ">" } else { "<=" }
}

/// Each slot's requests and events (`events` of a pool's records), canary first.
fn per_slot(window: &Window, events: impl Fn(&PoolWindow) -> u64) -> Vec<SlotCounts> {
    window
        .slots
        .iter()
        .map(|slot| slot_counts(slot, &events))
        .collect()
}

/// One slot's requests and events of both pools, canary first.
fn slot_counts(
    [production, canary]: &[Option<PoolWindow>; 2],
    events: impl Fn(&PoolWindow) -> u64,
) -> SlotCounts {
    let counts = |w: &Option<PoolWindow>| {
        w.as_ref().map_or_else(Counts::default, |w| Counts {
            requests: w.requests,
            events: events(w),
        })
    };
    (counts(canary), counts(production))
}

fn percent(ratio: f64) -> String {
    format!("{:.2}%", ratio * 100.0)
}

fn millis(us: u64) -> String {
    format!("{:.1} ms", to_f64(us) / 1_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults: checks every 10 s over 120 s, min_requests 100, factor 2 and
    /// floor 0.005, confidence 0.99, latency 1.5x and +50 ms, failure_threshold 2.
    fn rules() -> Rules {
        Rules::new(&AnalysisConfig::default())
    }

    /// `n` requests, the first `errors` of them errors, latencies spread evenly
    /// over `from_ms..to_ms`.
    fn pool(n: u64, errors: u64, from_ms: u64, to_ms: u64) -> PoolWindow {
        let mut w = PoolWindow::default();
        for i in 0..n {
            w.record(
                (from_ms * 1_000) + (to_ms - from_ms) * 1_000 * i / n,
                i < errors,
            );
        }
        w
    }

    /// A window of `slots` slots, each holding these production and canary records.
    fn window(slots: usize, production: &PoolWindow, canary: &PoolWindow) -> Window {
        Window::from_slots(
            (0..slots)
                .map(|_| [Some(production.clone()), Some(canary.clone())])
                .collect(),
        )
    }

    fn evidence(check: &Check) -> f64 {
        check.error_evidence.unwrap()
    }

    #[test]
    fn the_threshold_by_hand() {
        let rules = rules();
        // A = 30 × 24 / 0.01 = 72,000: ln 72000 = 11.184421; decisive twice that;
        // z_critical = Φ⁻¹(1 - 1/72000) = 4.190959.
        assert!((rules.evidence_threshold - 11.184_421_397_998_193).abs() < 1e-9);
        assert!((rules.evidence_decisive - 22.368_842_795_996_386).abs() < 1e-9);
        assert!(
            (rules.z_critical - 4.190_959).abs() < 1e-6,
            "{}",
            rules.z_critical
        );
        // The alternative: the factor where errors are common, the floor where rare.
        assert!((rules.error_alternative(0.005) - 2.0).abs() < 1e-12);
        assert!((rules.error_alternative(0.02) - 2.0).abs() < 1e-12);
        assert!((rules.error_alternative(0.001) - 6.0).abs() < 1e-12);
        assert!((rules.error_alternative(1e-12) - 1e6).abs() < 1e-6);
    }

    #[test]
    fn too_few_requests_hold() {
        let check = judge(
            &rules(),
            &window(1, &pool(1_000, 0, 1, 5), &pool(99, 99, 1, 5)),
            &mut Detector::default(),
        );
        assert_eq!(check.outcome, Outcome::Hold);
        assert!(check.reason.contains("canary 99"), "{}", check.reason);
        assert_eq!(check.error_evidence, None);
    }

    #[test]
    fn the_error_rule_table() {
        // (production requests, errors, canary requests, errors, slots) per slot,
        // and the evidence worked out with sequential's formula:
        // θ1 = max(2, 1 + 0.005 / ((x_p + 0.5) / (n_p + 1))) over the window,
        // then ln Σ_k e^{Σ_slots x ln θ_k - m ln((1 + θ_k r) / (1 + r))} / 4.
        let cases: [(&str, [u64; 5], f64, Outcome, bool); 8] = [
            // A fifth of errors in the first 10 s at 100 req/s: decisive at once.
            (
                "20% vs 0.5%, 10 s",
                [2_000, 10, 1_000, 200, 1],
                176.168_815,
                Outcome::Fail,
                true,
            ),
            // 2% vs 0.5% over a full window at 100 req/s: decisive.
            (
                "2% vs 0.5%, 100/s",
                [1_000, 5, 500, 10, 24],
                82.484_514,
                Outcome::Fail,
                true,
            ),
            // The same ratios over 60 s at 10 req/s (24 vs 12 errors): not yet.
            (
                "2% vs 0.5%, 10/s",
                [200, 1, 100, 2, 12],
                7.737_536,
                Outcome::Pass,
                false,
            ),
            // 1% vs 0.5% at 1000 req/s: the boundary itself, caught.
            (
                "1% vs 0.5%, 1000/s",
                [10_000, 50, 5_000, 50, 24],
                139.260_201,
                Outcome::Fail,
                true,
            ),
            // Healthy: evidence against the canary being worse.
            (
                "0.5% vs 0.5%",
                [10_000, 50, 5_000, 25, 24],
                -104.018_864,
                Outcome::Pass,
                false,
            ),
            // Significant for a z-test (z about 18), but under the factor.
            (
                "0.65% vs 0.5%",
                [100_000, 500, 50_000, 325, 24],
                -291.636_468,
                Outcome::Pass,
                false,
            ),
            // Three times production, 0.02 points: the floor makes θ1 31.
            (
                "0.03% vs 0.01%",
                [100_000, 10, 50_000, 15, 24],
                -204.417_125,
                Outcome::Pass,
                false,
            ),
            // Ten times production but 0.09 points: the floor is an alternative, not
            // a wall (θ1 13.5); on 3.6 million requests ten times is caught.
            (
                "0.1% vs 0.01%",
                [100_000, 10, 50_000, 50, 24],
                756.357_640,
                Outcome::Fail,
                true,
            ),
        ];
        let rules = rules();
        for (name, [np, xp, nc, xc, slots], want, outcome, decisive) in cases {
            let slots = usize::try_from(slots).unwrap();
            let check = judge(
                &rules,
                &window(slots, &pool(np, xp, 1, 5), &pool(nc, xc, 1, 5)),
                &mut Detector::default(),
            );
            let got = evidence(&check);
            assert!(
                (got - want).abs() < 1e-4,
                "{name}: evidence {got}, want {want}"
            );
            assert_eq!(
                (check.outcome, check.decisive),
                (outcome, decisive),
                "{name}: {}",
                check.reason
            );
        }
    }

    #[test]
    fn a_shared_burst_in_one_slot_is_not_the_canarys_fault() {
        // 23 quiet slots at 1,000 and 250 requests with 0.5% and 0.4% errors, and
        // one where a shared dependency fails a fifth of both pools' requests while
        // the canary has half the traffic (a step up from a fifth).
        let mut slots: Vec<[Option<PoolWindow>; 2]> = (0..23)
            .map(|_| [Some(pool(1_000, 5, 1, 5)), Some(pool(250, 1, 1, 5))])
            .collect();
        slots.push([Some(pool(1_000, 200, 1, 5)), Some(pool(1_000, 200, 1, 5))]);
        let check = judge(
            &rules(),
            &Window::from_slots(slots),
            &mut Detector::default(),
        );
        assert_eq!(check.outcome, Outcome::Pass, "{}", check.reason);
        // The totals alone (3.3% vs 1.3%: 2.5 times production, z 11) would have failed
        // it; slot by slot the evidence is against it.
        assert!(check.canary.error_ratio > 2.0 * check.production.error_ratio);
        assert!(check.error_z.unwrap() > rules().z_critical);
        assert!(
            (evidence(&check) + 34.854_038).abs() < 1e-4,
            "{}",
            check.reason
        );
    }

    #[test]
    fn the_latency_rule_needs_the_share_above_the_line() {
        let rules = rules();
        // Production 1..=20 ms (p99 about 19.8 ms): the line is max(29.7, 69.8) = 69.8 ms.
        let production = pool(2_000, 0, 1, 21);
        // Canary 200 ms slower: every request above the line; decisive.
        let check = judge(
            &rules,
            &window(1, &production, &pool(1_000, 0, 201, 221)),
            &mut Detector::default(),
        );
        assert_eq!(
            (check.outcome, check.decisive),
            (Outcome::Fail, true),
            "{}",
            check.reason
        );
        assert!(check.reason.contains("canary p99 22"), "{}", check.reason);
        assert_eq!(check.slow, Some((1_000, 0)));
        // 40 ms slower: above 1.5x but under +50 ms: pass.
        let check = judge(
            &rules,
            &window(1, &production, &pool(1_000, 0, 41, 61)),
            &mut Detector::default(),
        );
        assert_eq!(check.outcome, Outcome::Pass, "{}", check.reason);
        assert_eq!(check.slow, Some((0, 0)));
        // 2 of 100 canary requests at 500 ms: the p99 is over the line, but two
        // requests are no evidence of a share above 1% (z = 1.005 as before).
        let mut few = pool(98, 0, 1, 21);
        few.record(500_000, false);
        few.record(500_000, false);
        let check = judge(
            &rules,
            &window(1, &production, &few),
            &mut Detector::default(),
        );
        assert_eq!(check.outcome, Outcome::Pass, "{}", check.reason);
        assert!(
            (check.latency_z.unwrap() - 1.005_037_8).abs() < 1e-6,
            "{:?}",
            check.latency_z
        );
    }
}
