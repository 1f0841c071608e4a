//! How long a flag flipped in Redis takes to reach the proxy's snapshot.
//!
//! `cargo bench --bench flag_propagation` starts a real redis-server on 127.0.0.1,
//! runs the flag watcher, flips a flag with HSET and times until the snapshot shows
//! it: first with keyspace notifications (target p99 <= 50 ms), then with polling
//! alone (an ACL user without CONFIG, as on managed Redis; target <= poll_ms).
//! Then a fleet: N instances (flag watcher and heartbeats each, as in a proxy) on
//! one Redis: the time until the LAST of them applies a flip, and the Redis load
//! (commands per second at rest, commands per flip), from `INFO stats`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use canarygate::flags::model::FlagValue;
use canarygate::state::AppState;
use redis::AsyncCommands as _;
use tokio_util::sync::CancellationToken;

async fn measure(
    redis_url: &str,
    poll_ms: u64,
    flips: usize,
    admin: &support::RedisServer,
) -> Vec<Duration> {
    let toml = format!(
        "[pools.production]\nbackends = [\"127.0.0.1:1\"]\n[flags]\nredis_url = \"{redis_url}\"\npoll_ms = {poll_ms}\n"
    );
    let state = AppState::new(canarygate::config::from_toml(&toml, "bench").unwrap());
    let cancel = CancellationToken::new();
    let watcher = tokio::spawn(watch_flags(&state, &cancel));
    let mut conn = admin.conn().await;
    // Wait for the first read.
    let _: () = conn
        .hset("canarygate:flags", "bench", "start")
        .await
        .unwrap();
    wait_for(&state, "start", Duration::from_secs(10)).await;

    let mut samples = Vec::with_capacity(flips);
    for i in 0..flips {
        let value = format!("v{i}");
        // Flip at a random point of the poll cycle, as an operator would.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=20))).await;
        let started = Instant::now();
        let _: () = conn
            .hset("canarygate:flags", "bench", &value)
            .await
            .unwrap();
        wait_for(&state, &value, Duration::from_millis(poll_ms + 5_000)).await;
        samples.push(started.elapsed());
    }
    cancel.cancel();
    let _ = watcher.await;
    samples.sort();
    samples
}

/// The flag watcher as `serve_all` starts it.
fn watch_flags(state: &AppState, cancel: &CancellationToken) -> impl Future<Output = ()> + use<> {
    canarygate::flags::watcher::run(
        state.snapshots(),
        state.flag_settings(),
        Arc::clone(&state.events),
        Arc::clone(&state.metrics),
        cancel.clone(),
    )
}

async fn wait_for(state: &AppState, value: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if state.snapshot().flags.set.values.get("bench")
            == Some(&FlagValue::Text(value.to_owned()))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "flag {value} not applied within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// `n` instances on `redis`: flip `flips` times; per flip, the time until all `n`
/// snapshots show it. Also the commands Redis processed at rest (per second) and
/// per flip.
async fn fleet(redis: &support::RedisServer, n: usize, flips: usize) -> (Vec<Duration>, f64, f64) {
    let toml = format!(
        "[pools.production]\nbackends = [\"127.0.0.1:1\"]\n[flags]\nredis_url = \"{}\"\npoll_ms = 1000\n",
        redis.url()
    );
    let cancel = CancellationToken::new();
    let mut states = Vec::with_capacity(n);
    for i in 0..n {
        let state = AppState::new(canarygate::config::from_toml(&toml, "bench").unwrap());
        state.set_instance(format!("bench-{i}"));
        tokio::spawn(watch_flags(&state, &cancel));
        tokio::spawn(canarygate::ops::fleet::run(state.clone(), cancel.clone()));
        states.push(state);
    }
    let mut conn = redis.conn().await;
    let _: () = conn
        .hset("canarygate:flags", "bench", "start")
        .await
        .unwrap();
    for state in &states {
        wait_for(state, "start", Duration::from_secs(30)).await;
    }
    let processed = || {
        let info = redis.cli(&["INFO", "stats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // At rest: 10 s of polls and heartbeats.
    let before = processed();
    let rest = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let at_rest = (processed() - before - 1.0) / rest.elapsed().as_secs_f64();

    let mut samples = Vec::with_capacity(flips);
    let mut per_flip = 0.0;
    for i in 0..flips {
        let value = format!("v{i}");
        tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=20))).await;
        let before = processed();
        let started = Instant::now();
        let _: () = conn
            .hset("canarygate:flags", "bench", &value)
            .await
            .unwrap();
        for state in &states {
            wait_for(state, &value, Duration::from_secs(10)).await;
        }
        let took = started.elapsed();
        samples.push(took);
        // What the flip cost beyond the background load of the same span (the two
        // INFO calls and the HSET included).
        per_flip += processed() - before - at_rest * took.as_secs_f64();
    }
    cancel.cancel();
    samples.sort();
    #[allow(clippy::cast_precision_loss)]
    (samples, at_rest, per_flip / flips as f64)
}

fn report(name: &str, samples: &[Duration]) {
    // Nearest-rank percentile over the sorted samples.
    let pct = |per_mille: usize| samples[(samples.len() - 1) * per_mille / 1000];
    println!(
        "{name:<34} n={:<4} p50={:>8.2?} p99={:>8.2?} max={:>8.2?}",
        samples.len(),
        pct(500),
        pct(990),
        samples[samples.len() - 1]
    );
}

fn main() {
    // `cargo test --benches` runs bench targets with --test-ish args; this one is a
    // measurement, not a test, so it only runs under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let redis = support::RedisServer::start();
        let samples = measure(&redis.url(), 60_000, 500, &redis).await;
        report("notifications (poll_ms = 60000)", &samples);

        let polled = support::RedisServer::start();
        polled.cli(&[
            "ACL", "SETUSER", "reader", "on", ">pw", "~*", "&*", "+@all", "-config",
        ]);
        let url = format!("redis://reader:pw@127.0.0.1:{}/0", polled.port);
        let samples = measure(&url, 1_000, 30, &polled).await;
        report("polling only (poll_ms = 1000)", &samples);

        for n in [10, 100, 300] {
            let redis = support::RedisServer::start();
            let (samples, at_rest, per_flip) = fleet(&redis, n, 100).await;
            report(&format!("fleet of {n}: the last one applies"), &samples);
            #[allow(clippy::cast_precision_loss)]
            let per_instance = at_rest / n as f64;
            println!(
                "{:<34} at rest {at_rest:.0} commands/s ({per_instance:.2} per instance), per flip {per_flip:.0} commands",
                format!("fleet of {n}: Redis load")
            );
        }
    });
}
