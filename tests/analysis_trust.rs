//! The canary verdict is judged on a fair sample: one client cannot roll back a
//! canary that ordinary users see healthy, nor hide a canary that fails them.
//!
//! A real proxy in-process, real backends, ordinary users from 96 loopback
//! addresses (`support::app::Traffic`) and one attacker from an address of its own.
//! The attacker's weapon is a request that fails on every version (`/broken`, a
//! malformed input, say) aimed at the canary, or a flood of cheap successes aimed at
//! it. Checks every 250 ms over 3 s windows; every wait is bounded.

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use support::app::{AppBackend, Traffic};
use support::*;
use tokio_util::sync::CancellationToken;

/// The attacker's address: not in `override_trusted` below.
const ATTACKER: [u8; 4] = [127, 0, 0, 66];

fn analysis_toml(production: &AppBackend, canary: &AppBackend, routing: &str) -> String {
    config_toml(
        &[production.addr],
        &[canary.addr],
        &format!(
            "[analysis]\nenabled = true\ninterval_ms = 250\nwindow_ms = 3000\n\
             min_requests = 50\nfailure_threshold = 2\n\
             [routing]\n{routing}\n"
        ),
    )
}

/// `tasks` loops from the attacker's address sending GET `path` with `headers`,
/// counting the answers by pool, until dropped.
struct Attack {
    stop: CancellationToken,
    canary: Arc<AtomicU64>,
    production: Arc<AtomicU64>,
}

impl Attack {
    fn start(url: &str, tasks: usize, headers: &[(&'static str, String)]) -> Self {
        let stop = CancellationToken::new();
        let (canary, production) = (Arc::default(), Arc::default());
        for _ in 0..tasks {
            let (stop, url, headers) = (stop.clone(), url.to_owned(), headers.to_vec());
            let (canary, production): (Arc<AtomicU64>, Arc<AtomicU64>) =
                (Arc::clone(&canary), Arc::clone(&production));
            tokio::spawn(async move {
                let c = client_from(IpAddr::from(ATTACKER));
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                while !stop.is_cancelled() {
                    let mut req = http::Request::get(&url);
                    for (k, v) in &headers {
                        req = req.header(*k, *v);
                    }
                    let req = req
                        .body(Empty::new().map_err(|e| match e {}).boxed())
                        .unwrap();
                    if let Ok(got) = try_send(&c, req).await {
                        let seen = if got.pool() == "canary" {
                            &canary
                        } else {
                            &production
                        };
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        Self {
            stop,
            canary,
            production,
        }
    }

    /// (canary, production) answers so far.
    fn seen(&self) -> (u64, u64) {
        (
            self.canary.load(Ordering::Relaxed),
            self.production.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn analysis(proxy: &Proxy) -> serde_json::Value {
    get_json(&client(), &format!("http://{}/analysis", proxy.admin_addr)).await
}

/// Waits until the analysis has made `n` checks that saw requests.
async fn checks_under_way(proxy: &Proxy, n: usize) {
    eventually(Duration::from_secs(15), "checks under way", || async {
        analysis(proxy).await["checks"]
            .as_array()
            .is_some_and(|c| c.iter().filter(|c| c["result"] != "hold").count() >= n)
    })
    .await;
}

/// Holds the attack for `secs` seconds of checks and asserts the canary was never
/// rolled back while checks kept passing. (Not that no single check failed: with
/// the attacker's failures spread over both pools in proportion, a lone failed check
/// is the ordinary false alarm the judge allows, `1 - confidence` over its looks;
/// a rollback needs `failure_threshold` of them in a row or decisive evidence.)
async fn assert_no_verdict_against_canary(proxy: &Proxy, secs: u64) {
    let c = client();
    let before = scrape_metrics(&c, proxy.admin_addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        let a = analysis(proxy).await;
        assert_ne!(a["state"], "rolled_back", "rolled back: {}", a["reason"]);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = scrape_metrics(&c, proxy.admin_addr).await;
    let passes = after["canarygate_canary_checks_total{result=\"pass\"}"]
        - before["canarygate_canary_checks_total{result=\"pass\"}"];
    assert!(passes >= 8.0, "{passes} passing checks in {secs} s");
    let a = analysis(proxy).await;
    assert_ne!(a["state"], "rolled_back", "rolled back: {}", a["reason"]);
}

/// Sends `/broken` (failing on both versions) from the attacker with `headers` for
/// 5 s of checks: no rollback, and the attacker's requests reached both versions
/// as the bucket placed them (more production than canary at a 10% canary): its
/// header or cookie chose nothing.
async fn attack_chooses_nothing_and_rolls_nothing_back(
    proxy: &Proxy,
    headers: &[(&'static str, String)],
) {
    let attack = Attack::start(&proxy.url("/broken"), 4, headers);
    assert_no_verdict_against_canary(proxy, 5).await;
    let (on_canary, on_production) = attack.seen();
    assert!(
        on_production > on_canary && on_canary > 0,
        "attacker's requests: {on_canary} canary, {on_production} production"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_with_the_override_header_cannot_roll_back_a_healthy_canary() {
    within(60, async {
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(0, 0).await;
        // Only 192.0.2.0/24 may force a pool: the attacker's address may not. A
        // first step of 10%: the smaller the canary's share, the more one client
        // would weigh on it if its requests were not judged as they were placed.
        let proxy = Proxy::start(&analysis_toml(
            &production,
            &canary,
            "override_trusted = [\"192.0.2.0/24\"]\ncanary_percent = 10",
        ))
        .await;
        let _users = Traffic::start(&[proxy.url("/")], 6);
        checks_under_way(&proxy, 2).await;
        // The header is ignored: the bucket places the attacker's requests, on both
        // versions in proportion, so its failures weigh on both alike.
        attack_chooses_nothing_and_rolls_nothing_back(&proxy, &[("x-canary", "always".to_owned())])
            .await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_with_a_forged_cookie_cannot_roll_back_a_healthy_canary() {
    within(60, async {
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(0, 0).await;
        let proxy = Proxy::start(&analysis_toml(&production, &canary, "canary_percent = 10")).await;
        let _users = Traffic::start(&[proxy.url("/")], 6);
        checks_under_way(&proxy, 2).await;
        // An id the documented hash puts in the canary's buckets (< 10), unsigned.
        let id = (0..)
            .map(|i| format!("forged-{i}"))
            .find(|id| canarygate::routing::bucket(id.as_bytes()) < 10)
            .unwrap();
        let c = client_from(IpAddr::from(ATTACKER));
        let got = get(
            &c,
            &proxy.url("/broken"),
            &[("cookie", &format!("canarygate_id={id}"))],
        )
        .await;
        // Treated as a new user: a fresh, signed cookie.
        let fresh = got.header("set-cookie");
        assert!(fresh.starts_with("canarygate_id="), "{fresh}");
        assert!(!fresh.contains(&id), "{fresh}");
        attack_chooses_nothing_and_rolls_nothing_back(
            &proxy,
            &[("cookie", format!("canarygate_id={id}"))],
        )
        .await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_a_fifth_is_rolled_back_while_one_client_floods_it_with_successes() {
    within(60, async {
        let production = AppBackend::start(0, 0).await;
        // Every fifth request of the ordinary users fails on the canary.
        let canary = AppBackend::start(5, 0).await;
        let proxy = Proxy::start(&analysis_toml(
            &production,
            &canary,
            "override_trusted = [\"192.0.2.0/24\"]",
        ))
        .await;
        // The attacker holds a genuine canary cookie (asked until one came) and
        // floods the canary with cheap successes, with the override header too.
        let c = client_from(IpAddr::from(ATTACKER));
        let mut cookie = None;
        for _ in 0..200 {
            let got = get(&c, &proxy.url("/cheap"), &[]).await;
            if got.pool() == "canary" {
                let set = got.header("set-cookie");
                cookie = Some(set.split(';').next().unwrap().to_owned());
                break;
            }
        }
        let cookie = cookie.expect("one of 200 new users placed on the canary");
        let attack = Attack::start(
            &proxy.url("/cheap"),
            12,
            &[("cookie", cookie), ("x-canary", "always".to_owned())],
        );
        let _users = Traffic::start(&[proxy.url("/")], 2);
        eventually(
            Duration::from_secs(30),
            "the canary rolled back",
            || async { analysis(&proxy).await["state"] == "rolled_back" },
        )
        .await;
        let (on_canary, _) = attack.seen();
        let scrape = scrape_metrics(&client(), proxy.admin_addr).await;
        let capped =
            scrape["canarygate_analysis_requests_total{counted=\"capped\",pool=\"canary\"}"];
        let judged =
            scrape["canarygate_analysis_requests_total{counted=\"judged\",pool=\"canary\"}"];
        // The flood reached the canary, and past its cap it was not judged.
        assert!(
            capped > judged,
            "{capped} capped, {judged} judged, {on_canary} sent"
        );
        let a = analysis(&proxy).await;
        let last = &a["checks"][0]["canary"];
        assert!(last["capped"].as_u64().unwrap() > 0, "{last}");
        drop(attack);
        proxy.stop().await;
    })
    .await;
}
