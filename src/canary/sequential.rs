//! The sequential test the judge decides by: a mixture likelihood ratio (an mSPRT
//! whose mixing distribution is a few points) on "the canary's events are `θ` times
//! production's", computed slot by slot over the window and conditioned on each
//! slot's events.
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
//! No I/O, no state: the judge calls [`log_evidence`] on the window every check.

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
    // Log-sum-exp, from the largest term: exact where exp alone would overflow.
    let top = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    top + terms.iter().map(|l| (l - top).exp()).sum::<f64>().ln()
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
