//! Canary analysis end to end: a real proxy (in-process, or two on one Redis), real
//! backends on ephemeral ports that fail or slow down on purpose, a real
//! `redis-server`, and steady client traffic. Intervals are short (250 ms checks
//! over 3 s windows) so each test takes seconds; every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::app::{AppBackend, Traffic};
use support::*;

const FAST: &str = "[analysis]\nenabled = true\ninterval_ms = 250\nwindow_ms = 3000\n\
                    min_requests = 50\nfailure_threshold = 2\n";

fn toml(
    production: SocketAddr,
    canary: SocketAddr,
    redis: Option<&RedisServer>,
    extra: &str,
) -> String {
    let flags = redis.map_or_else(String::new, |r| {
        format!("[flags]\nredis_url = \"{}\"\npoll_ms = 200\n", r.url())
    });
    config_toml(&[production], &[canary], &format!("{FAST}{extra}\n{flags}"))
}

async fn analysis(proxy: &Proxy) -> serde_json::Value {
    get_json(&client(), &format!("http://{}/analysis", proxy.admin_addr)).await
}

/// The checks `/analysis` returns (newest first) as (result, at).
fn results(analysis: &serde_json::Value) -> Vec<(String, String)> {
    analysis["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["result"].as_str().unwrap().to_owned(),
                c["at"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_a_fifth_of_requests_is_rolled_back_through_redis() {
    within(60, async {
        let redis = RedisServer::start();
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(5, 0).await;
        let proxy = Proxy::start(&toml(production.addr, canary.addr, Some(&redis), "")).await;
        let traffic = Traffic::start(&[proxy.url("/")], 8);

        eventually(
            Duration::from_secs(20),
            "the canary rolled back in Redis",
            || async { redis.cli(&["HGET", "canarygate:analysis", "state"]) == "rolled_back" },
        )
        .await;
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "0"
        );
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_auto"]),
            "off"
        );
        let reason = redis.cli(&["HGET", "canarygate:analysis", "reason"]);
        assert!(
            reason.starts_with("canary error ratio ") && reason.contains("vs production 0.00%"),
            "{reason}"
        );
        let figures = redis.cli(&["HGET", "canarygate:analysis", "figures"]);
        assert!(figures.contains("\"canary\""), "{figures}");
        // At most failure_threshold failed checks led to it: the first fail since the
        // start counts, and by the rollback there were no more than two.
        let a = analysis(&proxy).await;
        assert_eq!(a["state"], "rolled_back");
        let rolled_at = a["rolled_back_at"].as_str().unwrap().to_owned();
        let fails_before: Vec<_> = results(&a)
            .into_iter()
            .filter(|(result, at)| result == "fail" && *at <= rolled_at)
            .collect();
        assert!(
            (1..=2).contains(&fails_before.len()),
            "{fails_before:?} before {rolled_at}"
        );
        // Every instance follows through its flag watcher: no request reaches the canary.
        eventually(Duration::from_secs(5), "the snapshot follows", || async {
            proxy.state.snapshot().flags.set.canary_percent == Some(0)
        })
        .await;
        drop(traffic);
        let c = client();
        for _ in 0..30 {
            assert_eq!(get(&c, &proxy.url("/"), &[]).await.pool(), "production");
        }
        // Metrics and the page say so.
        let scrape = scrape_metrics(&c, proxy.admin_addr).await;
        assert_eq!(scrape["canarygate_canary_state"], 3.0);
        assert!(scrape["canarygate_canary_checks_total{result=\"fail\"}"] >= 1.0);
        assert!(scrape["canarygate_canary_error_ratio{pool=\"canary\"}"] > 0.1);
        assert!(
            scrape.contains_key(
                "canarygate_canary_latency_seconds{pool=\"canary\",quantile=\"0.99\"}"
            )
        );
        let page = get(&c, &format!("http://{}/", proxy.admin_addr), &[]).await;
        assert!(page.text().contains("id=\"analysis-state\">rolled_back<"));
        assert!(page.text().contains("id=\"rollback\""));
        assert!(page.text().contains("class=\"check fail\""));

        // The CLI reads the same verdict from Redis.
        let dir = TempDir::new("canary-status");
        let file = dir.write(
            "c.toml",
            &toml(production.addr, canary.addr, Some(&redis), ""),
        );
        let out = Command::new(binary())
            .args(["canary", "status", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(text.contains("state: rolled_back\n"), "{text}");
        assert!(text.contains("canary_percent: 0\n"), "{text}");
        assert!(text.contains("canary_auto: off\n"), "{text}");
        proxy.stop().await;
        // Redis down: 69; no Redis in the config: 64.
        drop(redis);
        let out = Command::new(binary())
            .args(["canary", "status", "--json", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(69), "{out:?}");
        let no_redis = dir.write("n.toml", &toml(production.addr, canary.addr, None, ""));
        let out = Command::new(binary())
            .args(["canary", "status", "--config"])
            .arg(&no_redis)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{out:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_matching_production_is_not_rolled_back_in_40_checks() {
    within(90, async {
        let redis = RedisServer::start();
        // Both pools fail 1% of requests.
        let production = AppBackend::start(100, 0).await;
        let canary = AppBackend::start(100, 0).await;
        let proxy = Proxy::start(&toml(production.addr, canary.addr, Some(&redis), "")).await;
        let _traffic = Traffic::start(&[proxy.url("/")], 8);
        let c = client();
        eventually(
            Duration::from_secs(60),
            "40 checks with a verdict",
            || async {
                let scrape = scrape_metrics(&c, proxy.admin_addr).await;
                scrape["canarygate_canary_checks_total{result=\"pass\"}"]
                    + scrape["canarygate_canary_checks_total{result=\"fail\"}"]
                    >= 40.0
            },
        )
        .await;
        let scrape = scrape_metrics(&c, proxy.admin_addr).await;
        assert_eq!(
            scrape["canarygate_canary_checks_total{result=\"fail\"}"],
            0.0
        );
        assert_eq!(scrape["canarygate_canary_state"], 1.0, "progressing");
        assert!(scrape["canarygate_canary_error_ratio{pool=\"canary\"}"] > 0.0);
        assert_eq!(
            redis.cli(&["HGET", "canarygate:analysis", "state"]),
            "progressing"
        );
        assert_eq!(
            redis.cli(&["HEXISTS", "canarygate:flags", "canary_percent"]),
            "0"
        );
        assert_eq!(proxy.state.snapshot().flags.set.canary_percent, None);
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_200_ms_slower_is_caught_by_the_latency_rule_without_redis() {
    within(60, async {
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(0, 200).await;
        let proxy = Proxy::start(&toml(production.addr, canary.addr, None, "")).await;
        let _traffic = Traffic::start(&[proxy.url("/")], 24);
        eventually(Duration::from_secs(30), "rolled back", || async {
            analysis(&proxy).await["state"] == "rolled_back"
        })
        .await;
        let a = analysis(&proxy).await;
        assert!(a["reason"].as_str().unwrap().contains("canary p99"), "{a}");
        // Without Redis the rollback is this instance's own.
        let flags = &proxy.state.snapshot().flags.set;
        assert_eq!((flags.canary_percent, flags.canary_auto), (Some(0), false));
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_requests_in_the_window_give_hold_never_a_verdict() {
    within(30, async {
        let production = AppBackend::start(0, 0).await;
        // The canary fails everything, but 10 requests are no evidence.
        let canary = AppBackend::start(1, 0).await;
        // A 10 s window: the ten requests stay in it through the checks below, however
        // slowly a loaded machine runs them.
        // Everyone's bucket is the canary's: ten users' requests are judged.
        let config = toml(
            production.addr,
            canary.addr,
            None,
            "[routing]\ncanary_percent = 100\n",
        )
        .replace("window_ms = 3000", "window_ms = 10000");
        let proxy = Proxy::start(&config).await;
        // The run starts with an empty window (the round that sees it progressing
        // clears it): send the ten only once checks are under way, or a loaded
        // machine's late first rounds clear some of them.
        eventually(Duration::from_secs(10), "checks under way", || async {
            analysis(&proxy).await["checks"]
                .as_array()
                .is_some_and(|c| c.len() >= 3)
        })
        .await;
        for user in 0..10 {
            let c = client_from([127, 2, 0, user + 1].into());
            assert_eq!(get(&c, &proxy.url("/"), &[]).await.pool(), "canary");
        }
        // Placed by the override header (from loopback, trusted by default): answered
        // by the canary, never judged.
        let c = client();
        for _ in 0..5 {
            let got = get(&c, &proxy.url("/"), &[("x-canary", "always")]).await;
            assert_eq!(got.pool(), "canary");
        }
        let before = scrape_metrics(&c, proxy.admin_addr).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let after = scrape_metrics(&c, proxy.admin_addr).await;
        let holds = after["canarygate_canary_checks_total{result=\"hold\"}"]
            - before["canarygate_canary_checks_total{result=\"hold\"}"];
        assert!(holds >= 3.0, "{holds} holds in 1.5 s of 250 ms checks");
        assert_eq!(
            after["canarygate_canary_checks_total{result=\"fail\"}"],
            0.0
        );
        assert_eq!(
            after["canarygate_canary_checks_total{result=\"pass\"}"],
            0.0
        );
        let a = analysis(&proxy).await;
        assert_eq!(a["state"], "holding");
        let last = &a["checks"][0];
        assert_eq!(last["result"], "hold");
        assert_eq!(last["canary"]["requests"], 10);
        assert_eq!(last["canary"]["apart"], 5);
        assert_eq!(
            after["canarygate_analysis_requests_total{counted=\"override\",pool=\"canary\"}"],
            5.0
        );
        assert_eq!(
            after["canarygate_analysis_requests_total{counted=\"judged\",pool=\"canary\"}"],
            10.0
        );
        assert!(
            last["reason"]
                .as_str()
                .unwrap()
                .contains("too few requests")
        );
        assert_eq!(after["canarygate_canary_state"], 2.0);
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_advance_on_a_healthy_canary_and_a_hand_written_percent_pauses_them() {
    within(90, async {
        let redis = RedisServer::start();
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(0, 0).await;
        let extra = "steps = [5, 10, 25, 50]\nstep_ms = 1000\n";
        let config = toml(production.addr, canary.addr, Some(&redis), extra)
            .replace("min_requests = 50", "min_requests = 20");
        let proxy = Proxy::start(&config).await;
        let _traffic = Traffic::start(&[proxy.url("/")], 8);
        // The percents the analysis writes, in order.
        let mut seen: Vec<String> = Vec::new();
        eventually(Duration::from_secs(40), "steps 5, 10, 25", || {
            let percent = redis.cli(&["HGET", "canarygate:flags", "canary_percent"]);
            if !percent.is_empty() && seen.last() != Some(&percent) {
                seen.push(percent);
            }
            let done = seen.iter().any(|p| p == "25");
            async move { done }
        })
        .await;
        assert_eq!(seen[..3], ["5", "10", "25"], "{seen:?}");
        // An operator sets the split by hand: the steps stop (state manual).
        redis.cli(&["HSET", "canarygate:flags", "canary_percent", "40"]);
        eventually(Duration::from_secs(10), "manual", || async {
            redis.cli(&["HGET", "canarygate:analysis", "state"]) == "manual"
        })
        .await;
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_auto"]),
            "off"
        );
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "40"
        );
        assert_eq!(analysis(&proxy).await["state"], "manual");
        // canary_auto on hands the canary back: the rollout restarts at 5%.
        redis.cli(&["HSET", "canarygate:flags", "canary_auto", "on"]);
        eventually(
            Duration::from_secs(10),
            "restarted at the first step",
            || async { redis.cli(&["HGET", "canarygate:flags", "canary_percent"]) == "5" },
        )
        .await;
        assert_eq!(
            redis.cli(&["HGET", "canarygate:analysis", "state"]),
            "progressing"
        );
        // A bad canary_auto value is ignored like any bad flag: control stays.
        redis.cli(&["HSET", "canarygate:flags", "canary_auto", "maybe"]);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_ne!(
            redis.cli(&["HGET", "canarygate:analysis", "state"]),
            "manual"
        );
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_on_one_redis_roll_back_once_and_all_obey() {
    within(60, async {
        let redis = RedisServer::start();
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(5, 0).await;
        let config = toml(production.addr, canary.addr, Some(&redis), "");
        let fleet = [
            Proxy::start(&config).await,
            Proxy::start(&config).await,
            Proxy::start(&config).await,
        ];
        let urls: Vec<String> = fleet.iter().map(|p| p.url("/")).collect();
        let traffic = Traffic::start(&urls, 8);
        eventually(Duration::from_secs(20), "rolled back", || async {
            redis.cli(&["HGET", "canarygate:analysis", "state"]) == "rolled_back"
        })
        .await;
        for proxy in &fleet {
            eventually(Duration::from_secs(5), "all follow", || async {
                proxy.state.snapshot().flags.set.canary_percent == Some(0)
            })
            .await;
        }
        // No flapping: for 8 more checks nothing moves on any instance.
        let versions: Vec<u64> = fleet
            .iter()
            .map(|p| p.state.snapshot().flags.version)
            .collect();
        let at = redis.cli(&["HGET", "canarygate:analysis", "at"]);
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        drop(traffic);
        let after: Vec<u64> = fleet
            .iter()
            .map(|p| p.state.snapshot().flags.version)
            .collect();
        assert_eq!(versions, after);
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "0"
        );
        assert_eq!(
            redis.cli(&["HGET", "canarygate:analysis", "at"]),
            at,
            "record unchanged"
        );
        // Exactly one instance rolled back; the others followed it.
        let rollbacks = |p: &Proxy| {
            p.state
                .events
                .recent(200)
                .iter()
                .filter(|e| e.message.starts_with("canary rolled back:"))
                .count()
        };
        assert_eq!(fleet.iter().map(rollbacks).sum::<usize>(), 1);
        for p in &fleet {
            assert_eq!(analysis(p).await["state"], "rolled_back");
        }
        for p in fleet {
            p.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_step_passed_is_healthy_and_says_so() {
    within(60, async {
        let redis = RedisServer::start();
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(0, 0).await;
        let extra = "steps = [10, 20]\nstep_ms = 500\n";
        let config = toml(production.addr, canary.addr, Some(&redis), extra)
            .replace("min_requests = 50", "min_requests = 20");
        let proxy = Proxy::start(&config).await;
        let _traffic = Traffic::start(&[proxy.url("/")], 8);
        eventually(Duration::from_secs(30), "healthy", || async {
            redis.cli(&["HGET", "canarygate:analysis", "state"]) == "healthy"
        })
        .await;
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "20"
        );
        let reason = redis.cli(&["HGET", "canarygate:analysis", "reason"]);
        assert_eq!(reason, "canary healthy at 20% after 2 steps");
        let events = proxy.state.events.recent(200);
        assert!(
            events.iter().any(|e| e.message.contains("canary_healthy")
                && e.message.contains("canary healthy at 20%")),
            "{events:?}"
        );
        let scrape = scrape_metrics(&client(), proxy.admin_addr).await;
        assert_eq!(scrape["canarygate_canary_state"], 4.0);
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_unresponsive_a_failing_canary_is_rolled_back_locally_then_in_redis() {
    within(60, async {
        let redis = RedisServer::start_with(free_port(), &["--enable-debug-command", "yes"]);
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(0, 0).await;
        let proxy = Proxy::start(&toml(production.addr, canary.addr, Some(&redis), "")).await;
        let _traffic = Traffic::start(&[proxy.url("/")], 8);
        eventually(Duration::from_secs(10), "in charge", || async {
            redis.cli(&["HGET", "canarygate:analysis", "state"]) == "progressing"
        })
        .await;
        // Redis stops answering for 8 s (its data kept); the canary starts failing.
        let port = redis.port.to_string();
        let sleeper = std::thread::spawn(move || {
            Command::new("redis-cli")
                .args(["-p", &port, "DEBUG", "SLEEP", "8"])
                .output()
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        canary.error_every.store(5, Ordering::Relaxed);
        eventually(Duration::from_secs(7), "rolled back locally", || async {
            proxy.state.snapshot().flags.set.canary_percent == Some(0)
        })
        .await;
        let events = proxy.state.events.recent(200);
        assert!(
            events
                .iter()
                .any(|e| e.message.starts_with("canary rolled back:")
                    && e.message
                        .contains("locally: the analysis store is unreachable")),
            "{events:?}"
        );
        let scrape = scrape_metrics(&client(), proxy.admin_addr).await;
        assert!(scrape["canarygate_canary_store_errors_total"] >= 1.0);
        // Redis answers again: the rollback is written there for every instance.
        let _ = tokio::task::spawn_blocking(move || sleeper.join()).await;
        eventually(Duration::from_secs(15), "rolled back in Redis", || async {
            redis.cli(&["HGET", "canarygate:analysis", "state"]) == "rolled_back"
        })
        .await;
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "0"
        );
        eventually(Duration::from_secs(5), "the snapshot agrees", || async {
            proxy.state.snapshot().flags.set.canary_percent == Some(0)
        })
        .await;
        proxy.stop().await;
    })
    .await;
}
