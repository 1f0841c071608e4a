//! How fast and how safe the canary analysis is, measured by driving the real judge
//! and verdict (`canarygate::canary`) with simulated request streams on a simulated
//! clock: no sockets, so a 10-minute run takes milliseconds.
//!
//! The traffic, drawn slot by slot (a slot is `window_ms / 24`, 5 s by default) as
//! the recorder would have filled it: Poisson arrivals, the canary getting a third
//! (its rate is the row's req/s, production twice that). A slot's errors and
//! successes are independent Poisson counts (the thinning of a Poisson process, so
//! this is exactly per-request Bernoulli errors, also when the error rate changes
//! inside the slot); every request's latency is drawn and recorded into the slot's
//! HDR histogram: log-normal, median 20 ms, sigma 0.5, plus 2 ms (p99 about 66 ms).
//! Drawing counts rather than requests is what lets 3,000 ten-minute runs at
//! 1,000 req/s fit on two cores. The canary is bad from its first request, as after
//! a deploy. Checks run every `interval_ms` from then on, on the last 24 slots,
//! the error rule's detector kept from check to check as the analysis task keeps it.
//!
//! `nice -n 10 cargo bench --bench canary_analysis` prints the tables in
//! docs/canary-analysis.md; `CANARY_BENCH_RUNS` sets the runs per failing-canary
//! row (default 200) and `CANARY_BENCH_HEALTHY_RUNS` per false-rollback row
//! (default 3000): 0 false rollbacks in 3000 runs bounds the rate below 0.1% at 95%
//! confidence (the rule of three). For exploring, not for the documented table:
//! `CANARY_BENCH_THRESHOLD` replaces the evidence threshold (ln A),
//! `CANARY_BENCH_ONLY=healthy` skips the failing rows, `CANARY_BENCH_RATES=10,100`
//! picks the healthy rows' rates, and `CANARY_BENCH_DEBUG=1` prints every failed
//! check with its slots.

use std::time::Instant;

use canarygate::canary::judge::{Outcome as Verdict, Rules, judge};
use canarygate::canary::sequential::Detector;
use canarygate::canary::stats::{normal_quantile, to_f64};
use canarygate::canary::verdict::{Action, Levers, Record, Run, State, decide};
use canarygate::canary::window::{PoolWindow, SLOTS, Window};
use canarygate::config::analysis::AnalysisConfig;

/// One pool's simulated traffic.
#[derive(Clone, Copy)]
struct Pool {
    rate_per_s: f64,
    error_ratio: f64,
    /// Latency `× slower + extra_ms` of the healthy distribution.
    slower: f64,
    extra_ms: f64,
}

/// Periods where a shared dependency fails requests of both pools.
#[derive(Clone, Copy)]
struct Bursts {
    count: u32,
    length_ms: u64,
    error_ratio: f64,
}

const NO_BURSTS: Bursts = Bursts {
    count: 0,
    length_ms: 0,
    error_ratio: 0.0,
};

struct Outcome {
    /// When the rollback happened (ms from the canary's start), if it did.
    rollback_ms: Option<u64>,
    /// Failed canary requests served before the rollback (or in the whole run).
    canary_errors: u64,
    /// The first check that failed (a rollback needs failure_threshold of them).
    failed_checks: u32,
}

/// The normal quantiles latencies are drawn from: 2^16 equally likely values
/// (the tail reaches Φ⁻¹(1 - 2^-17) = 4.0, 147 ms, the same for both pools).
struct Latencies(Vec<f64>);

impl Latencies {
    fn new() -> Self {
        let n = 1u32 << 16;
        Self(
            (0..n)
                .map(|i| {
                    2.0 + 20.0 * (0.5 * normal_quantile((f64::from(i) + 0.5) / f64::from(n))).exp()
                })
                .collect(),
        )
    }

    fn draw_us(&self, rng: &mut fastrand::Rng, pool: Pool) -> u64 {
        let ms = self.0[usize::from(rng.u16(..))] * pool.slower + pool.extra_ms;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let us = (ms * 1_000.0) as u64;
        us
    }
}

/// A Poisson draw: by multiplication for small means, else Hörmann's PTRS
/// (transformed rejection with squeeze, as numpy's `random_poisson_ptrs`).
fn poisson(rng: &mut fastrand::Rng, lambda: f64) -> u64 {
    if lambda <= 0.0 {
        return 0;
    }
    if lambda < 10.0 {
        let limit = (-lambda).exp();
        let (mut k, mut p) = (0, rng.f64());
        while p > limit {
            k += 1;
            p *= rng.f64();
        }
        return k;
    }
    let slam = lambda.sqrt();
    let loglam = lambda.ln();
    let b = 0.931 + 2.53 * slam;
    let a = -0.059 + 0.024_83 * b;
    let invalpha = 1.123_9 + 1.132_8 / (b - 3.4);
    let vr = 0.927_7 - 3.622_4 / (b - 2.0);
    loop {
        let u = rng.f64() - 0.5;
        let v = rng.f64();
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + lambda + 0.43).floor();
        if us >= 0.07 && v <= vr {
            return count(k);
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            continue;
        }
        if (v * invalpha / (a / (us * us) + b)).ln() <= -lambda + k * loglam - ln_gamma(k + 1.0) {
            return count(k);
        }
    }
}

/// A whole, non-negative draw as a count.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn count(k: f64) -> u64 {
    k as u64
}

/// ln Γ(x) for x >= 1 (Stirling's series after shifting x to 7 or more, as numpy).
fn ln_gamma(x: f64) -> f64 {
    const A: [f64; 10] = [
        8.333_333_333_333_333e-2,
        -2.777_777_777_777_778e-3,
        7.936_507_936_507_937e-4,
        -5.952_380_952_380_952e-4,
        8.417_508_417_508_418e-4,
        -1.917_526_917_526_918e-3,
        6.410_256_410_256_41e-3,
        -2.955_065_359_477_124e-2,
        1.796_443_723_688_307e-1,
        -1.392_432_216_905_9,
    ];
    if x == 1.0 || x == 2.0 {
        return 0.0;
    }
    let shift = if x <= 7.0 { (7.0 - x).floor() } else { 0.0 };
    let mut x0 = x + shift;
    let x2 = 1.0 / (x0 * x0);
    let gl0 = A.iter().rev().fold(0.0, |acc, &a| acc * x2 + a);
    let mut gl = gl0 / x0 + 0.5 * std::f64::consts::TAU.ln() + (x0 - 0.5) * x0.ln() - x0;
    let mut k = shift;
    while k >= 1.0 {
        x0 -= 1.0;
        gl -= x0.ln();
        k -= 1.0;
    }
    gl
}

/// One slot of one pool: `[from_ms, to_ms)`, with bursts at `bursts` (start times).
fn slot(
    rng: &mut fastrand::Rng,
    latencies: &Latencies,
    pool: Pool,
    from_ms: u64,
    to_ms: u64,
    bursts: (&[u64], Bursts),
) -> PoolWindow {
    // The share of the slot inside a burst.
    let inside: u64 = bursts
        .0
        .iter()
        .map(|&at| {
            (at + bursts.1.length_ms)
                .min(to_ms)
                .saturating_sub(at.max(from_ms))
        })
        .sum();
    let length = to_f64(to_ms - from_ms);
    let inside = to_f64(inside.min(to_ms - from_ms)) / length;
    let error_ratio =
        pool.error_ratio * (1.0 - inside) + bursts.1.error_ratio.max(pool.error_ratio) * inside;
    let expected = pool.rate_per_s * length / 1_000.0;
    let errors = poisson(rng, expected * error_ratio);
    let requests = errors + poisson(rng, expected * (1.0 - error_ratio));
    let mut window = PoolWindow::default();
    for i in 0..requests {
        window.record(latencies.draw_us(rng, pool), i < errors);
    }
    window
}

/// The verdict's bookkeeping for one run.
struct Verdicts<'a> {
    config: &'a AnalysisConfig,
    run: Run,
    record: Record,
}

impl<'a> Verdicts<'a> {
    fn new(config: &'a AnalysisConfig) -> Self {
        Self {
            config,
            run: Run::default(),
            record: Record {
                state: Some(State::Progressing),
                switch: true,
                ..Record::default()
            },
        }
    }

    /// True when this check's verdict rolls back.
    fn rolls_back(&mut self, check: &canarygate::canary::judge::Check, now_ms: u64) -> bool {
        let levers = Levers {
            percent: None,
            switch: true,
            auto: true,
        };
        self.run
            .observe(check, self.config.failure_threshold, now_ms);
        match decide(self.config, &self.record, &levers, &self.run, now_ms) {
            Action::RollBack => true,
            Action::Healthy => {
                self.record.state = Some(State::Healthy);
                false
            }
            Action::Nothing
            | Action::Start { .. }
            | Action::Step { .. }
            | Action::Manual { .. }
            // The shadow gate is not simulated here (`decide` never returns them).
            | Action::Shadow
            | Action::ShadowFailed { .. } => false,
        }
    }
}

/// What a run simulates.
#[derive(Clone, Copy)]
struct Case {
    canary: Pool,
    production: Pool,
    bursts: Bursts,
}

/// One run of `duration_ms`: returns when (if) the canary was rolled back.
fn simulate(
    config: &AnalysisConfig,
    rules: &Rules,
    latencies: &Latencies,
    case: Case,
    duration_ms: u64,
    seed: u64,
) -> Outcome {
    let Case {
        canary,
        production,
        bursts,
    } = case;
    let mut rng = fastrand::Rng::with_seed(seed);
    let slot_ms = config.window_ms.div_ceil(SLOTS).max(1);
    let starts: Vec<u64> = (0..bursts.count)
        .map(|_| rng.u64(..duration_ms.saturating_sub(bursts.length_ms).max(1)))
        .collect();
    let bursts = (starts.as_slice(), bursts);
    let mut verdicts = Verdicts::new(config);
    // The window as the recorder holds it: the last SLOTS slots, oldest first, the
    // newest being the current one (empty at a check on a slot boundary).
    let slots: Vec<[Option<PoolWindow>; 2]> = (0..SLOTS).map(|_| [None, None]).collect();
    let mut window = Window::from_slots(slots);
    window.filling = true;
    // The error rule's evidence, kept across checks as the analysis task keeps it.
    let mut errors = Detector::default();
    let mut canary_errors = 0;
    let mut failed_checks = 0;
    let mut filled_to = 0;
    let mut check_at = config.interval_ms;
    while check_at <= duration_ms {
        // Every full slot up to this check; the current one starts empty.
        while filled_to + slot_ms <= check_at {
            let (from, to) = (filled_to, filled_to + slot_ms);
            let p = slot(&mut rng, latencies, production, from, to, bursts);
            let c = slot(&mut rng, latencies, canary, from, to, bursts);
            canary_errors += c.errors;
            window.production.add(&p);
            window.canary.add(&c);
            // The oldest slot leaves (the one before the newest full slot's SLOTS - 1
            // predecessors), the new one enters before the empty current slot.
            let [old_p, old_c] = window.slots.remove(0);
            for (total, old) in [(&mut window.production, old_p), (&mut window.canary, old_c)] {
                if let Some(old) = old {
                    subtract(total, &old);
                }
            }
            let at = window.slots.len() - 1;
            window.slots.insert(at, [Some(p), Some(c)]);
            filled_to = to;
        }
        // The current slot, epoch `now / slot_ms + 1` as the recorder counts.
        window.epoch = filled_to / slot_ms + 1;
        let check = judge(rules, &window, &mut errors);
        if check.outcome == Verdict::Fail {
            failed_checks += 1;
            if std::env::var_os("CANARY_BENCH_DEBUG").is_some() {
                let slots: Vec<String> = window
                    .slots
                    .iter()
                    .map(|[p, c]| {
                        let f = |w: &Option<PoolWindow>| {
                            w.as_ref().map_or((0, 0), |w| (w.requests, w.errors))
                        };
                        format!("{:?}{:?}", f(c), f(p))
                    })
                    .collect();
                eprintln!(
                    "seed {seed} at {check_at}: {} | {}",
                    check.reason,
                    slots.join(" ")
                );
            }
        }
        if verdicts.rolls_back(&check, check_at) {
            return Outcome {
                rollback_ms: Some(check_at),
                canary_errors,
                failed_checks,
            };
        }
        check_at += config.interval_ms;
    }
    Outcome {
        rollback_ms: None,
        canary_errors,
        failed_checks,
    }
}

/// Removes a slot's records from the window's sums.
fn subtract(total: &mut PoolWindow, old: &PoolWindow) {
    total.requests -= old.requests;
    total.errors -= old.errors;
    let _ = total.latency.subtract(&old.latency);
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn env_runs(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `n` seeds over two threads (the machine's cores).
fn many(n: usize, f: impl Fn(u64) -> Outcome + Sync) -> Vec<Outcome> {
    let f = &f;
    std::thread::scope(|s| {
        let halves: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || {
                    (0..n as u64)
                        .filter(|i| i % 2 == t)
                        .map(f)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn main() {
    let defaults = AnalysisConfig::default();
    let mut rules = Rules::new(&defaults);
    // For exploring the threshold (not for the documented table).
    if let Some(t) = std::env::var("CANARY_BENCH_THRESHOLD")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        rules.evidence_threshold = t;
        rules.evidence_decisive = t * f64::from(defaults.failure_threshold);
    }
    let latencies = Latencies::new();
    let healthy = |rate: f64| Pool {
        rate_per_s: rate,
        error_ratio: 0.005,
        slower: 1.0,
        extra_ms: 0.0,
    };
    let ten_minutes = 600_000;
    let started = Instant::now();
    println!(
        "canary analysis, simulated: defaults (check every {} s over {} s, min_requests {}, \
         factor {}, floor {}, confidence {}, failure_threshold {}; evidence threshold {:.2}); \
         production 0.5% errors at twice the canary's rate\n",
        defaults.interval_ms / 1_000,
        defaults.window_ms / 1_000,
        defaults.min_requests,
        defaults.max_error_ratio_factor,
        defaults.min_error_ratio_delta,
        defaults.confidence,
        defaults.failure_threshold,
        rules.evidence_threshold,
    );
    println!(
        "| canary | req/s | runs | rolled back | time to rollback p50 / p95 / max | failed canary requests before it p50 / p95 |"
    );
    println!("|---|---|---|---|---|---|");
    let scenarios: [(&str, f64, f64, f64); 4] = [
        ("20% errors", 0.20, 1.0, 0.0),
        ("2% errors", 0.02, 1.0, 0.0),
        ("1% errors", 0.01, 1.0, 0.0),
        ("latency x1.5 + 50 ms (p99 149 vs 66 ms)", 0.005, 1.5, 50.0),
    ];
    let only = std::env::var("CANARY_BENCH_ONLY").unwrap_or_default();
    for (name, error_ratio, slower, extra_ms) in scenarios {
        if only == "healthy" {
            break;
        }
        for rate in [10.0, 100.0, 1000.0] {
            let n = env_runs("CANARY_BENCH_RUNS", 200);
            let canary = Pool {
                rate_per_s: rate,
                error_ratio,
                slower,
                extra_ms,
            };
            let outcomes = many(n, |seed| {
                simulate(
                    &defaults,
                    &rules,
                    &latencies,
                    Case {
                        canary,
                        production: healthy(rate * 2.0),
                        bursts: NO_BURSTS,
                    },
                    ten_minutes,
                    seed,
                )
            });
            let mut times: Vec<u64> = outcomes.iter().filter_map(|o| o.rollback_ms).collect();
            let mut failed: Vec<u64> = outcomes
                .iter()
                .filter(|o| o.rollback_ms.is_some())
                .map(|o| o.canary_errors)
                .collect();
            times.sort_unstable();
            failed.sort_unstable();
            let rolled = times.len();
            let shown = if rolled == 0 {
                ("never in 10 min".to_owned(), "-".to_owned())
            } else {
                (
                    format!(
                        "{} s / {} s / {} s",
                        quantile(&times, 0.5) / 1_000,
                        quantile(&times, 0.95) / 1_000,
                        times.last().copied().unwrap_or(0) / 1_000
                    ),
                    format!("{} / {}", quantile(&failed, 0.5), quantile(&failed, 0.95)),
                )
            };
            println!(
                "| {name} | {rate} | {n} | {rolled} | {} | {} |",
                shown.0, shown.1
            );
        }
    }
    println!(
        "\nfalse rollbacks: healthy canary (0.5% errors, same latency as production), \
         10-minute runs (60 checks each); \"bursts\": two bad minutes of a shared \
         dependency at random times, 20% errors on both pools\n"
    );
    println!(
        "| req/s | runs | healthy: rolled back | any check failed | with bursts: rolled back | any check failed |"
    );
    println!("|---|---|---|---|---|---|");
    let bursts = Bursts {
        count: 2,
        length_ms: 60_000,
        error_ratio: 0.20,
    };
    let n = env_runs("CANARY_BENCH_HEALTHY_RUNS", 3000);
    let rates: Vec<f64> = std::env::var("CANARY_BENCH_RATES").ok().map_or_else(
        || vec![10.0, 100.0, 1000.0],
        |v| v.split(',').filter_map(|r| r.parse().ok()).collect(),
    );
    for &rate in &rates {
        let cells: Vec<String> = [NO_BURSTS, bursts]
            .iter()
            .flat_map(|&bursts| {
                let outcomes = many(n, |seed| {
                    simulate(
                        &defaults,
                        &rules,
                        &latencies,
                        Case {
                            canary: healthy(rate),
                            production: healthy(rate * 2.0),
                            bursts,
                        },
                        ten_minutes,
                        1_000_000 + seed,
                    )
                });
                let rolled = outcomes.iter().filter(|o| o.rollback_ms.is_some()).count();
                let failed = outcomes.iter().filter(|o| o.failed_checks > 0).count();
                #[allow(clippy::cast_precision_loss)]
                let share = |k: usize| format!("{k} ({:.2}%)", k as f64 * 100.0 / n as f64);
                [share(rolled), share(failed)]
            })
            .collect();
        println!("| {rate} | {n} | {} |", cells.join(" | "));
    }
    println!("\n(bench took {:.0} s)", started.elapsed().as_secs_f64());
}
