//! The sequential tests the judge decides by: a mixture likelihood ratio (an mSPRT
//! whose mixing distribution is a few points) on "the canary's events are `θ` times
//! production's", computed slot by slot and conditioned on each slot's events.
//!
//! Why conditioned per slot: in one slot (a 24th of the window) both pools see the
//! same world. Given that a slot held `m` events (errors, or slow requests) of which
//! the canary got `x`, with `n_c` and `n_p` requests, the canary's share of them is
//! binomial with probability `θ r / (1 + θ r)`, `r = n_c / n_p`, whatever the slot's
//! own event rate: a bad minute of a shared dependency raises both pools' rates
//! alike and cancels out, where a test on the window's totals would count it
//! against whichever pool had more traffic then (Simpson's paradox).
//!
//! Why a likelihood ratio: under "the canary is no worse" (`θ ≤ 1`) the ratio of
//! the likelihoods at `θ` and at 1 is a non-negative supermartingale starting at 1,
//! so by Ville's inequality it ever reaches `A` with probability at most `1 / A`,
//! however often it is looked at. The fixed-sample z-test it replaces had to be
//! corrected for the number of looks; this needs no correction for them.
//!
//! Two ways to use it:
//! - [`log_evidence`], over one window, stateless: the latency rule, whose line
//!   moves with production's p99 and whose targets the window meets.
//! - [`Detector`], a Shiryaev–Roberts e-detector kept across checks by the
//!   analysis task: the error rule. A window forgets what a run accumulated (at
//!   10 req/s two minutes hold about 24 canary errors against 12, and a canary
//!   four times worse was missed in 1 run of 20); the detector keeps accumulating
//!   a bad present, and forgets a good past, since a new start is always in the
//!   sum.
//!
//! No I/O: the detector's state is the analysis task's.
/// One pool's requests and events (errors, or requests slower than a line) in one
/// slot of the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub events: u64,
}

/// Both pools in one slot: `(canary, production)`.
pub type SlotCounts = (Counts, Counts);

/// The mixture's alternatives, as multiples of the rule's boundary `θ1`, and their
/// weights (they sum to 1). One point at `θ1` would be Wald's SPRT; most of the
/// weight sits at twice the boundary, where the power matters at low traffic (a
/// canary four times worse than production when the rule says two), a little at
/// the boundary itself, which at high traffic is all it needs (1% against 0.5%),
/// and some far above, so that a canary failing a fifth of its requests is
/// decisive at once. Weight taken from near the boundary is also what keeps a
/// healthy canary's noise from looking like the boundary case.
pub const ALTERNATIVES: [(f64, f64); 4] = [(1.0, 0.125), (2.0, 0.5), (4.0, 0.25), (8.0, 0.125)];

/// The natural log of the likelihood ratio of `θ` against 1 for one slot, given its
/// events: `x ln θ - m ln((1 + θ r) / (1 + r))`. 0 (no evidence) when the slot had
/// no event or a pool had no request.
pub fn slot_log_lr(canary: Counts, production: Counts, theta: f64) -> f64 {
    let x = canary.events.min(canary.requests);
    let m = x + production.events.min(production.requests);
    if m == 0 || canary.requests == 0 || production.requests == 0 {
        return 0.0;
    }
    let r = super::stats::to_f64(canary.requests) / super::stats::to_f64(production.requests);
    let (x, m) = (super::stats::to_f64(x), super::stats::to_f64(m));
    x * theta.ln() - m * ((1.0 + theta * r) / (1.0 + r)).ln()
}

/// The natural log of the mixture likelihood ratio over the slots:
/// `ln Σ_k w_k exp(Σ_slots slot_log_lr(θ1 · c_k))` over [`ALTERNATIVES`] `(c_k, w_k)`.
/// Negative evidence favours "no worse than production"; the judge fails the
/// canary above its threshold.
pub fn log_evidence(slots: &[SlotCounts], theta1: f64) -> f64 {
    let terms: Vec<f64> = ALTERNATIVES
        .iter()
        .map(|&(times, weight)| {
            let theta = theta1 * times;
            weight.ln()
                + slots
                    .iter()
                    .map(|&(canary, production)| slot_log_lr(canary, production, theta))
                    .sum::<f64>()
        })
        .collect();
    log_sum_exp(terms.into_iter())
}

/// A Shiryaev–Roberts e-detector on the mixture: per alternative `k`,
/// `R_k ← (1 + R_k) · L_k`, `L_k` the likelihood ratio at `c_k θ1` of the slots
/// completed since the last update (each slot folded in once, in time order), and
/// the statistic `Σ_k w_k R_k`.
///
/// Why this bound: under "no worse", `E[L_k] ≤ 1` given all before, so
/// `Σ_k w_k R_k - t` (`t` updates) is a supermartingale from 0; stopped when the
/// statistic first reaches `A`, it gives `P(it reaches A within n updates) ≤ n / A`
/// (Pollak's argument). `R_k` is the sum over every start `s` of the likelihood
/// ratio since `s`: it adds a new start at every update (forgetting a good past)
/// and keeps multiplying a bad present. A CUSUM (the largest such ratio instead of
/// the sum) is below it at every step, so at the same threshold it has the same
/// bound and less power.
///
/// An update needs an informative slot (events, and requests in both pools): empty
/// slots add nothing, not even the `+ 1`, so a quiet night does not raise the
/// statistic toward `A` by itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    /// `ln R_k` per alternative of [`ALTERNATIVES`] (`-∞`: 0, before any update).
    log_r: [f64; ALTERNATIVES.len()],
    /// The epoch of the newest slot folded in (0: none).
    folded: u64,
    /// Updates made since the start (or the last reset).
    updates: u64,
    /// Informative slots folded in since then.
    slots: u64,
}

impl Default for Detector {
    fn default() -> Self {
        Self {
            log_r: [f64::NEG_INFINITY; ALTERNATIVES.len()],
            folded: 0,
            updates: 0,
            slots: 0,
        }
    }
}

impl Detector {
    /// Folds in those of `slots` (with their epochs, oldest first) newer than the
    /// newest already folded, as one update at the alternative `θ1`. Returns
    /// whether it was an update (at least one of them informative).
    pub fn fold(
        &mut self,
        slots: impl IntoIterator<Item = (u64, SlotCounts)>,
        theta1: f64,
    ) -> bool {
        let mut log_l = [0.0; ALTERNATIVES.len()];
        let mut informative = 0;
        for (epoch, (canary, production)) in slots {
            if epoch <= self.folded {
                continue;
            }
            self.folded = epoch;
            if !informs(canary, production) {
                continue;
            }
            informative += 1;
            for (l, &(times, _)) in log_l.iter_mut().zip(&ALTERNATIVES) {
                *l += slot_log_lr(canary, production, theta1 * times);
            }
        }
        if informative == 0 {
            return false;
        }
        for (r, l) in self.log_r.iter_mut().zip(log_l) {
            // ln((1 + R) L) = ln(1 + e^{ln R}) + ln L.
            *r = ln_one_plus_exp(*r) + l;
        }
        self.updates += 1;
        self.slots += informative;
        true
    }

    /// `ln Σ_k w_k R_k`; `None` before the first update (the statistic is 0).
    pub fn log_evidence(&self) -> Option<f64> {
        (self.updates > 0).then(|| {
            log_sum_exp(
                self.log_r
                    .iter()
                    .zip(&ALTERNATIVES)
                    .map(|(r, &(_, weight))| weight.ln() + r),
            )
        })
    }

    /// Updates made, and informative slots folded in, since the start or reset.
    pub const fn updates(&self) -> (u64, u64) {
        (self.updates, self.slots)
    }
}

/// A slot says something: it had events, and requests in both pools.
fn informs(canary: Counts, production: Counts) -> bool {
    canary.requests > 0
        && production.requests > 0
        && canary.events.min(canary.requests) + production.events.min(production.requests) > 0
}

/// `ln(1 + e^x)` without overflow (and exactly 0 for `x = -∞`).
fn ln_one_plus_exp(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `ln Σ e^{x_i}`, from the largest term: exact where exp alone would overflow.
fn log_sum_exp(terms: impl Iterator<Item = f64> + Clone) -> f64 {
    let top = terms.clone().fold(f64::NEG_INFINITY, f64::max);
    if top == f64::NEG_INFINITY {
        return top;
    }
    top + terms.map(|l| (l - top).exp()).sum::<f64>().ln()
}

/// A rate from a count, with half an event added (Jeffreys' prior): never 0, so a
/// window without an event still gives a finite ratio. The judge takes it over
/// both pools together: given each slot's events, that is the same whatever their
/// split, so the alternative it sets does not lean on the data being tested (a
/// production rate low by chance would raise `θ1` just when the canary's share of
/// the events is high by chance, and inflate the evidence of a healthy canary).
pub fn smoothed_rate(events: u64, requests: u64) -> f64 {
    (super::stats::to_f64(events.min(requests)) + 0.5) / (super::stats::to_f64(requests) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn counts(requests: u64, events: u64) -> Counts {
        Counts { requests, events }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn one_slot_by_hand() {
        // 1000 canary and 2000 production requests (r = 0.5), 24 and 12 errors, θ = 2:
        // 24 ln 2 - 36 ln(2 / 1.5) = 16.635532 - 10.356554 = 6.278978.
        let l = slot_log_lr(counts(1_000, 24), counts(2_000, 12), 2.0);
        assert!(close(l, 6.278_977_725_174_576), "{l}");
        // θ = 1 is no evidence at all; no event, or a pool without requests, neither.
        assert_eq!(slot_log_lr(counts(1_000, 24), counts(2_000, 12), 1.0), 0.0);
        assert_eq!(slot_log_lr(counts(1_000, 0), counts(2_000, 0), 2.0), 0.0);
        assert_eq!(slot_log_lr(counts(0, 0), counts(2_000, 12), 2.0), 0.0);
        assert_eq!(slot_log_lr(counts(1_000, 5), counts(0, 0), 2.0), 0.0);
        // Events at the canary's share of requests (a third) weigh against θ = 2:
        // 4 ln 2 - 12 ln(4/3) = 2.772589 - 3.452185 = -0.679596.
        let l = slot_log_lr(counts(1_000, 4), counts(2_000, 8), 2.0);
        assert!(close(l, -0.679_596_147_181_589), "{l}");
    }

    #[test]
    fn what_hits_both_pools_alike_cancels_out() {
        // A quiet slot with the canary at 1% of traffic, then a slot at 50% (a step
        // up) in which a shared dependency failed a fifth of both pools' requests.
        // Slot by slot, the canary's share of errors is its share of requests: the
        // evidence is strongly against it being worse.
        let quiet = (counts(100, 0), counts(9_900, 5));
        let burst = (counts(5_000, 1_000), counts(5_000, 1_000));
        let slotted = log_evidence(&[quiet, burst], 2.0);
        assert!(close(slotted, -119.912_228_852), "{slotted}");
        // The same counts as one slot: 1,000 of 5,100 canary requests failed (19.6%)
        // against 1,005 of 14,900 (6.7%), and the totals condemn the canary.
        let pooled = log_evidence(&[(counts(5_100, 1_000), counts(14_900, 1_005))], 2.0);
        assert!(close(pooled, 246.459_100_154), "{pooled}");
    }

    #[test]
    fn the_mixture_by_hand() {
        // One slot, r = 0.5, 24 of 36 errors on the canary. Per alternative:
        // θ = 2: 6.278978; θ = 4: 24 ln 4 - 36 ln 2 = 8.317766;
        // θ = 8: 24 ln 8 - 36 ln(5 / 1.5) = 49.906597 - 43.343021 = 6.563576;
        // θ = 16: 24 ln 16 - 36 ln(9 / 1.5) = 66.542129 - 64.503341 = 2.038788;
        // ln(e^6.278978 / 8 + e^8.317766 / 2 + e^6.563576 / 4 + e^2.038788 / 8)
        // = 7.737536.
        let slots = [(counts(1_000, 24), counts(2_000, 12))];
        let l = log_evidence(&slots, 2.0);
        assert!(close(l, 7.737_536_052_378), "{l}");
        // Slots add: two such slots give each alternative twice the evidence.
        let two = log_evidence(&[slots[0], slots[0]], 2.0);
        assert!(close(two, 15.961_413_647_194), "{two}");
        // No data: the mixture of ratios of 1 is 1, evidence 0.
        assert!(log_evidence(&[], 2.0).abs() < 1e-12);
        // Huge evidence does not overflow.
        let flood = [(counts(1_000_000, 500_000), counts(1_000_000, 0))];
        assert!(log_evidence(&flood, 2.0).is_finite());
    }

    /// `slots` as one check's complete slots, with epochs from `first`.
    fn epochs(first: u64, slots: &[SlotCounts]) -> Vec<(u64, SlotCounts)> {
        (first..).zip(slots.iter().copied()).collect()
    }

    #[test]
    fn the_detector_by_hand() {
        let bad = (counts(1_000, 24), counts(2_000, 12));
        let mut detector = Detector::default();
        assert_eq!(detector.log_evidence(), None, "no update, no statistic");
        // A first update is the likelihood ratio of its slots: R_k = (1 + 0) L_k,
        // the window's mixture of `the_mixture_by_hand`, 7.737536.
        assert!(detector.fold(epochs(1, &[bad]), 2.0));
        let one = detector.log_evidence().unwrap();
        assert!(close(one, 7.737_536_052_378), "{one}");
        // A second: R_k = (1 + L_k) L_k, with ln L_k = 6.278978, 8.317766, 6.563576,
        // 2.038788: ln Σ w_k (L_k + L_k²) = 15.961682, a little above the two
        // slots as one ratio (15.961414): the start at the second slot is added.
        assert!(detector.fold(epochs(2, &[bad]), 2.0));
        let two = detector.log_evidence().unwrap();
        assert!(close(two, 15.961_681_784_421), "{two}");
        assert_eq!(detector.updates(), (2, 2));
        // Huge evidence stays finite.
        let flood = (counts(1_000_000, 500_000), counts(1_000_000, 0));
        for epoch in 3..100 {
            detector.fold(epochs(epoch, &[flood]), 2.0);
        }
        assert!(detector.log_evidence().unwrap().is_finite());
    }

    #[test]
    fn each_slot_is_folded_in_once_and_empty_slots_not_at_all() {
        let bad = (counts(1_000, 24), counts(2_000, 12));
        let mut detector = Detector::default();
        assert!(detector.fold(epochs(1, &[bad, bad]), 2.0));
        let once = detector.log_evidence();
        // The next check's window still holds those slots: only the new one counts,
        // and none is new here.
        assert!(!detector.fold(epochs(1, &[bad, bad]), 2.0));
        assert_eq!(detector.log_evidence(), once);
        assert_eq!(detector.updates(), (1, 2));
        // Slots without an event, or without a pool's requests, are no update: no
        // `+ 1`, so hours of them do not carry a statistic toward the threshold.
        let quiet = [
            (counts(1_000, 0), counts(2_000, 0)),
            (counts(0, 0), counts(2_000, 9)),
            (counts(1_000, 3), counts(0, 0)),
        ];
        for epoch in (3..30_000).step_by(3) {
            assert!(!detector.fold(epochs(epoch, &quiet), 2.0));
        }
        assert_eq!(detector.log_evidence(), once);
    }

    #[test]
    fn a_null_stream_does_not_grow() {
        // Every slot with the canary's errors at its share of requests (a third):
        // each L_k < 1 (e^-0.849495, 1/32, ...), and R_k = (1 + R_k) L_k settles at
        // L_k / (1 - L_k): ln Σ w_k L_k / (1 - L_k) = -2.210577, for ever.
        let null = (counts(1_000, 5), counts(2_000, 10));
        let mut detector = Detector::default();
        for epoch in 1..=10_000 {
            detector.fold(epochs(epoch, &[null]), 2.0);
        }
        let settled = detector.log_evidence().unwrap();
        assert!(close(settled, -2.210_576_705_736), "{settled}");
        // Drawn at random (the canary's share of each slot's errors binomial, at
        // 10 req/s: 1.5 errors a slot): the statistic wanders but does not climb.
        // The median of ln R over the last 5,000 of 10,000 updates is no higher
        // than over the first 5,000, and both far under the threshold (11.18).
        let mut rng = fastrand::Rng::with_seed(31);
        let mut detector = Detector::default();
        let mut seen = Vec::new();
        for epoch in 1..=10_000 {
            let (mut x, mut y) = (0, 0);
            for _ in 0..150 {
                if rng.f64() < 0.005 {
                    if rng.u8(..3) == 0 { x += 1 } else { y += 1 }
                }
            }
            if detector.fold(epochs(epoch, &[(counts(50, x), counts(100, y))]), 2.0) {
                seen.push(detector.log_evidence().unwrap());
            }
        }
        let median = |v: &mut [f64]| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let half = seen.len() / 2;
        let (first, last) = seen.split_at_mut(half);
        let (first, last) = (median(first), median(last));
        assert!(last <= first + 0.5 && last < 3.0, "medians {first}, {last}");
    }

    #[test]
    fn it_forgets_a_good_past() {
        // 1,000 healthy slots, then one four times worse: the statistic is at least
        // what a fresh detector shows for that slot alone (7.737536): with the
        // good past at its settled R_k, (1 + R_k) L_k gives 7.786869.
        let null = (counts(1_000, 5), counts(2_000, 10));
        let bad = (counts(1_000, 24), counts(2_000, 12));
        let mut detector = Detector::default();
        for epoch in 1..=1_000 {
            detector.fold(epochs(epoch, &[null]), 2.0);
        }
        detector.fold(epochs(1_001, &[bad]), 2.0);
        let after = detector.log_evidence().unwrap();
        assert!(close(after, 7.786_868_933_311), "{after}");
        // A ratio kept over the whole run would still be deep under: 1,000 slots
        // of evidence against the canary outweigh one slot for.
        let mut run = vec![null; 1_000];
        run.push(bad);
        assert!(log_evidence(&run, 2.0) < -800.0);
    }

    #[test]
    fn smoothed_rates() {
        assert!(close(smoothed_rate(0, 999), 0.5 / 1_000.0));
        assert!(close(smoothed_rate(9, 1_999), 9.5 / 2_000.0));
        assert!(
            close(smoothed_rate(5, 3), 3.5 / 4.0),
            "events capped at requests"
        );
    }
}
