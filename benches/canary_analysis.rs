//! How fast and how safe the canary analysis is, measured by driving the real
//! recorder, judge and verdict (`canarygate::canary`) with simulated request streams
//! on a simulated clock: no sockets, so a 10-minute run takes milliseconds and a
//! thousand of them fit in a bench.
//!
//! The traffic: Poisson arrivals, the canary getting a third (its rate is the row's
//! req/s, production twice that); latencies log-normal (median 20 ms, sigma 0.5,
//! plus 2 ms: p99 about 66 ms); errors independent with the row's probability. The
//! canary is bad from its first request, as after a deploy. Checks run every
//! `interval_ms` from then on.
//!
//! `cargo bench --bench canary_analysis` prints the tables in docs/canary-analysis.md (about 5 min on
//! 2 cores); `CANARY_BENCH_RUNS` sets the runs per failing-canary row (default 200)
//! and `CANARY_BENCH_HEALTHY_RUNS` per false-rollback row (default 3000 at 10 and
//! 100 req/s, a tenth of it at 1000 req/s): 0 false rollbacks in 3000 runs bounds
//! the rate below 0.1% at 95% confidence (the rule of three).

use std::time::{Duration, Instant};

use canarygate::canary::judge::{Rules, judge};
use canarygate::canary::stats::{normal_quantile, to_f64};
use canarygate::canary::verdict::{Action, Levers, Record, Run, State, decide};
use canarygate::canary::window::{Placed, Recorder};
use canarygate::config::analysis::AnalysisConfig;
use canarygate::routing::PoolKind;

/// One pool's simulated traffic.
#[derive(Clone, Copy)]
struct Pool {
    rate_per_s: f64,
    error_ratio: f64,
    extra_latency_ms: f64,
}

struct Outcome {
    /// When the rollback happened (ms from the canary's start), if it did.
    rollback_ms: Option<u64>,
    /// Failed canary requests served before the rollback (or in the whole run).
    canary_errors: u64,
}

/// One run of `duration_ms`: returns when (if) the canary was rolled back.
fn simulate(
    config: &AnalysisConfig,
    rules: &Rules,
    canary: Pool,
    production: Pool,
    duration_ms: u64,
    seed: u64,
) -> Outcome {
    let mut rng = fastrand::Rng::with_seed(seed);
    let recorder = Recorder::new(1);
    recorder.configure(true, config.window_ms, &config.client_limit());
    let mut run = Run::default();
    let mut record = Record {
        state: Some(State::Progressing),
        switch: true,
        ..Record::default()
    };
    let levers = Levers {
        percent: None,
        switch: true,
        auto: true,
    };
    let mut next = [
        next_arrival(&mut rng, 0.0, production),
        next_arrival(&mut rng, 0.0, canary),
    ];
    let mut canary_errors = 0;
    let mut check_at = config.interval_ms;
    while check_at <= duration_ms {
        // Every request up to this check.
        loop {
            let (i, at) = if next[0] <= next[1] {
                (0, next[0])
            } else {
                (1, next[1])
            };
            if at > to_f64(check_at) {
                break;
            }
            let (kind, pool) = if i == 0 {
                (PoolKind::Production, production)
            } else {
                (PoolKind::Canary, canary)
            };
            let error = rng.f64() < pool.error_ratio;
            canary_errors += u64::from(error && i == 1);
            let latency_ms = 2.0 + 20.0 * (0.5 * normal(&mut rng)).exp() + pool.extra_latency_ms;
            // Each request from a client of its own, as from many users: the
            // per-client cap never binds (it is the guard against one client).
            let client =
                recorder.client_keys(None, std::net::IpAddr::from(rng.u32(..).to_be_bytes()));
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            recorder.record(
                kind,
                at as u64,
                Duration::from_micros((latency_ms * 1_000.0) as u64),
                error,
                Placed::Bucket(client),
            );
            next[i] = next_arrival(&mut rng, at, pool);
        }
        let [p, c] = recorder.window(check_at);
        let check = judge(rules, &p, &c);
        run.observe(&check, config.failure_threshold, check_at);
        match decide(config, &record, &levers, &run, check_at) {
            Action::RollBack => {
                return Outcome {
                    rollback_ms: Some(check_at),
                    canary_errors,
                };
            }
            Action::Healthy => record.state = Some(State::Healthy),
            Action::Nothing
            | Action::Start { .. }
            | Action::Step { .. }
            | Action::Manual { .. } => {}
        }
        check_at += config.interval_ms;
    }
    Outcome {
        rollback_ms: None,
        canary_errors,
    }
}

/// The next Poisson arrival after `now_ms`.
fn next_arrival(rng: &mut fastrand::Rng, now_ms: f64, pool: Pool) -> f64 {
    now_ms - (1.0 - rng.f64()).ln() * 1_000.0 / pool.rate_per_s
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let (u1, u2) = (1.0 - rng.f64(), rng.f64());
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
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

fn runs(default: usize) -> usize {
    env_runs("CANARY_BENCH_RUNS", default)
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
    let healthy = |rate: f64| Pool {
        rate_per_s: rate,
        error_ratio: 0.005,
        extra_latency_ms: 0.0,
    };
    let ten_minutes = 600_000;
    let started = Instant::now();
    println!(
        "canary analysis, simulated: defaults (check every {} s over {} s, min_requests {}, \
         delta {}, confidence {}, failure_threshold {}); production 0.5% errors at twice the canary's rate\n",
        defaults.interval_ms / 1_000,
        defaults.window_ms / 1_000,
        defaults.min_requests,
        defaults.max_error_ratio_delta,
        defaults.confidence,
        defaults.failure_threshold
    );
    println!(
        "| canary | req/s | runs | rolled back | time to rollback p50 / p95 | failed canary requests before it p50 / p95 |"
    );
    println!("|---|---|---|---|---|---|");
    let delta_01 = AnalysisConfig {
        max_error_ratio_delta: 0.01,
        ..defaults.clone()
    };
    let scenarios: [(&str, &AnalysisConfig, f64, f64); 5] = [
        ("2% errors", &defaults, 0.02, 0.0),
        (
            "2% errors, max_error_ratio_delta 0.01",
            &delta_01,
            0.02,
            0.0,
        ),
        ("5% errors", &defaults, 0.05, 0.0),
        ("20% errors", &defaults, 0.20, 0.0),
        ("100 ms slower", &defaults, 0.005, 100.0),
    ];
    for (name, config, error_ratio, extra) in scenarios {
        for rate in [10.0, 100.0, 1000.0] {
            let n = runs(200);
            let canary = Pool {
                rate_per_s: rate,
                error_ratio,
                extra_latency_ms: extra,
            };
            let rules = Rules::new(config);
            let outcomes = many(n, |seed| {
                simulate(
                    config,
                    &rules,
                    canary,
                    healthy(rate * 2.0),
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
                        "{} s / {} s",
                        quantile(&times, 0.5) / 1_000,
                        quantile(&times, 0.95) / 1_000
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
        "\nfalse rollbacks: healthy canary (0.5% errors, same latency as production), 10-minute runs \
         (60 checks each). \"bare\": every check tested at the bare confidence, without the \
         correction for repeated looks; \"delta 0.01\" and \"delta 0\": max_error_ratio_delta \
         set so (0: the z-test alone)\n"
    );
    println!("| req/s | runs | defaults | defaults, bare | delta 0.01 | delta 0 | delta 0, bare |");
    println!("|---|---|---|---|---|---|---|");
    let no_delta = AnalysisConfig {
        max_error_ratio_delta: 0.0,
        ..defaults.clone()
    };
    let alpha = 1.0 - defaults.confidence;
    let bare = |rules: Rules| Rules {
        z_critical: -normal_quantile(alpha),
        z_decisive: -normal_quantile(alpha.powi(2)),
        ..rules
    };
    let variants = [
        (&defaults, Rules::new(&defaults)),
        (&defaults, bare(Rules::new(&defaults))),
        (&delta_01, Rules::new(&delta_01)),
        (&no_delta, Rules::new(&no_delta)),
        (&no_delta, bare(Rules::new(&no_delta))),
    ];
    let healthy_runs = env_runs("CANARY_BENCH_HEALTHY_RUNS", 3000);
    for (rate, n) in [
        (10.0, healthy_runs),
        (100.0, healthy_runs),
        (1000.0, healthy_runs / 10),
    ] {
        let cells: Vec<String> = variants
            .iter()
            .map(|(config, rules)| {
                let k = many(n, |seed| {
                    simulate(
                        config,
                        rules,
                        healthy(rate),
                        healthy(rate * 2.0),
                        ten_minutes,
                        1_000_000 + seed,
                    )
                })
                .iter()
                .filter(|o| o.rollback_ms.is_some())
                .count();
                #[allow(clippy::cast_precision_loss)]
                let percent = k as f64 * 100.0 / n as f64;
                format!("{k} ({percent:.1}%)")
            })
            .collect();
        println!("| {rate} | {n} | {} |", cells.join(" | "));
    }
    println!("\n(bench took {:.0} s)", started.elapsed().as_secs_f64());
}
