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
//!
//! And the error evidence, kept from check to check, starts again where the
//! window does: a canary handed back after a rollback is judged on its own
//! requests, not on the evidence of the version that was pulled.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use support::app::{AppBackend, PacedTraffic, Traffic};
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

/// The `at` of the checks `/analysis` returns with this result.
fn checks_at(analysis: &serde_json::Value, result: &str) -> Vec<String> {
    analysis["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["result"] == result)
        .map(|c| c["at"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_handed_back_after_a_rollback_starts_from_no_error_evidence() {
    within(60, async {
        let redis = RedisServer::start();
        let production = AppBackend::start(0, 0).await;
        // A fifth of the canary's requests fail: rolled back, with evidence far
        // above the threshold (the detector keeps it while the canary gets nothing).
        let canary = AppBackend::start(5, 0).await;
        let proxy = Proxy::start(&config_toml(
            &[production.addr],
            &[canary.addr],
            &format!(
                "[analysis]\nenabled = true\ninterval_ms = 250\nwindow_ms = 3000\n\
                 min_requests = 50\n[flags]\nredis_url = \"{}\"\npoll_ms = 200\n",
                redis.url()
            ),
        ))
        .await;
        let _traffic = Traffic::start(&[proxy.url("/")], 8);
        let state = || redis.cli(&["HGET", "canarygate:analysis", "state"]);
        eventually(
            Duration::from_secs(20),
            "the canary rolled back",
            || async { analysis(&proxy).await["state"] == "rolled_back" },
        )
        .await;
        // Once the pulled version's requests have left the window, checks hold (no
        // canary traffic): the window is empty of it, the detector is not.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let a = analysis(&proxy).await;
            let newest = &a["checks"][0];
            if newest["result"] == "hold" {
                break;
            }
            assert!(Instant::now() < deadline, "no check held: {newest}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The fix is deployed and the canary handed back at half the traffic.
        canary.error_every.store(0, Ordering::Relaxed);
        redis.cli(&[
            "HSET",
            "canarygate:flags",
            "canary_percent",
            "50",
            "canary_auto",
            "on",
        ]);
        eventually(
            Duration::from_secs(10),
            "the analysis back in charge",
            || async { state() == "progressing" },
        )
        .await;
        // The round that took charge judged before it read the record, on what it
        // had (the window's old requests, the old evidence), and its verdict was
        // dropped with the run: count from it on.
        let since = analysis(&proxy).await["checks"][0]["at"]
            .as_str()
            .unwrap()
            .to_owned();
        // Judged and passed at check after check on its own requests: the old
        // version's evidence would fail the first of them and roll it back again.
        eventually(Duration::from_secs(20), "eight passing checks", || async {
            let a = analysis(&proxy).await;
            assert_eq!(state(), "progressing", "rolled back again: {}", a["reason"]);
            checks_at(&a, "pass")
                .iter()
                .filter(|at| **at > since)
                .count()
                >= 8
        })
        .await;
        let a = analysis(&proxy).await;
        let failed_since: Vec<_> = checks_at(&a, "fail")
            .into_iter()
            .filter(|at| *at > since)
            .collect();
        assert!(
            failed_since.is_empty(),
            "{failed_since:?}: {}",
            a["checks"][0]
        );
        // No error since the hand-back: no evidence at all (the detector started
        // again), where the old one would still show the pulled version's.
        let last = &a["checks"][0];
        assert!(last["error_evidence"].is_null(), "{last}");
        proxy.stop().await;
    })
    .await;
}
