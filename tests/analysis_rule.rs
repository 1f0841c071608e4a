//! The error rule's promise at the default settings, end to end: a canary failing
//! 2% of requests against a production failing 0.5% (four times worse) is rolled
//! back within 150 s at about 100 req/s, and a canary failing 0.5% like production
//! is kept over the same time. A real proxy per case (both run at once), real
//! backends failing requests at random, a real `redis-server` each, and paced
//! traffic from 320 loopback users.
//!
//! Time is scaled down 4 times, with the rate scaled up as much: checks every
//! 2.5 s over 30 s (slots of 1.25 s) at 400 req/s instead of every 10 s over 120 s
//! at 100 req/s, for 37.5 s instead of 150 s. The judge sees only counts per slot
//! and per window, and the number of checks per window and of slots is the same,
//! so each check here sees the numbers a check at the defaults would: the same
//! statistics, four times faster. Every other `[analysis]` key is at its default.
//! The canary's judged requests per window do not depend on the scale (a third of
//! 100 req/s over 120 s, 4,000, a little less at a check, whose current slot is
//! partly filled), and the test checks that at least three quarters of them came:
//! on a machine too loaded to send the rate, it says so rather than test less.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::app::{AppBackend, PacedTraffic};
use support::*;

/// Time runs this many times faster than at the defaults, the rate this many
/// times higher.
const SCALE: u32 = 4;
/// The promise: rolled back within this, at the defaults.
const WITHIN_S: u32 = 150;
/// About 100 req/s at the defaults (both pools).
const RATE: u32 = 100;

fn toml(production: SocketAddr, canary: SocketAddr, redis: &RedisServer) -> String {
    config_toml(
        &[production],
        &[canary],
        &format!(
            "[analysis]\nenabled = true\ninterval_ms = {}\nwindow_ms = {}\n\
             [flags]\nredis_url = \"{}\"\npoll_ms = 200\n",
            10_000 / SCALE,
            120_000 / SCALE,
            redis.url()
        ),
    )
}

async fn analysis(proxy: &Proxy) -> serde_json::Value {
    get_json(&client(), &format!("http://{}/analysis", proxy.admin_addr)).await
}

/// The checks `/analysis` returns with a verdict (pass or fail).
fn verdicts(analysis: &serde_json::Value) -> usize {
    analysis["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["result"] != "hold")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_four_times_worse_is_rolled_back_in_150_s_and_a_healthy_one_kept() {
    within(120, async {
        let (redis_worse, redis_healthy) = (RedisServer::start(), RedisServer::start());
        let production = AppBackend::failing_at_random(0.005).await;
        let worse = AppBackend::failing_at_random(0.02).await;
        let healthy = AppBackend::failing_at_random(0.005).await;
        let proxy_worse = Proxy::start(&toml(production.addr, worse.addr, &redis_worse)).await;
        let proxy_healthy =
            Proxy::start(&toml(production.addr, healthy.addr, &redis_healthy)).await;
        let started = Instant::now();
        let _traffic = PacedTraffic::start(
            &[proxy_worse.url("/"), proxy_healthy.url("/")],
            RATE * SCALE,
        );
        let promised = Duration::from_secs(u64::from(WITHIN_S / SCALE));

        while redis_worse.cli(&["HGET", "canarygate:analysis", "state"]) != "rolled_back" {
            let a = analysis(&proxy_worse).await;
            assert!(
                started.elapsed() < promised,
                "not rolled back within {promised:?}; the last check: {}",
                a["checks"][0]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = started.elapsed();
        let a = analysis(&proxy_worse).await;
        // Explained: the rule, the figures, the evidence and its threshold.
        let reason = redis_worse.cli(&["HGET", "canarygate:analysis", "reason"]);
        assert!(
            reason.starts_with("canary error ratio ")
                && reason.contains("rule: at least 2.00x")
                && reason.contains("evidence "),
            "{reason}"
        );
        let failed = a["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["result"] == "fail")
            .unwrap();
        assert!(
            failed["error_evidence"].as_f64().unwrap()
                > failed["evidence_threshold"].as_f64().unwrap(),
            "{failed}"
        );
        println!(
            "rolled back after {:.1} s (x{SCALE}: {:.0} s at the defaults): {reason}",
            took.as_secs_f64(),
            took.as_secs_f64() * f64::from(SCALE)
        );

        // The healthy canary, over the same time.
        tokio::time::sleep_until((started + promised).into()).await;
        let a = analysis(&proxy_healthy).await;
        assert_eq!(a["state"], "progressing", "{}", a["reason"]);
        assert_eq!(
            redis_healthy.cli(&["HGET", "canarygate:analysis", "state"]),
            "progressing"
        );
        // Not by accident: it was judged at every check after the first window's
        // first moments, on the traffic the promise is about, errors included.
        let checks = a["checks"].as_array().unwrap();
        let last = &checks[0];
        assert!(verdicts(&a) >= 12, "{} verdicts: {a}", verdicts(&a));
        assert!(checks.iter().all(|c| c["result"] != "fail"), "{a}");
        let canary = &last["canary"];
        // A third of the rate over a window: 4,000 at any scale (about 3,650 seen).
        let judged = canary["requests"].as_u64().unwrap();
        assert!(
            judged > 3_000,
            "the traffic fell short: {judged} canary requests judged: {last}"
        );
        println!("the healthy canary: {judged} requests judged in its last window");
        assert!(canary["errors"].as_u64().unwrap() > 5, "{last}");
        assert!(
            last["error_evidence"].as_f64().unwrap() < last["evidence_threshold"].as_f64().unwrap()
        );
        proxy_worse.stop().await;
        proxy_healthy.stop().await;
    })
    .await;
}
