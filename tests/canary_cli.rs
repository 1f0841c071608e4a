//! `canarygate canary set|pause|resume|rollback|promote` end to end (issue #34,
//! part 2): the command as a child process against a real `redis-server`, two
//! proxies (child processes of the binary) following it through their flag
//! watchers, real backends and steady traffic so the analysis really could move
//! the canary, and a real webhook peer for the audit alert. Every wait is a poll
//! with a deadline.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::app::{AppBackend, Traffic};
use support::*;

/// Analysis that steps 20 -> 60 after half a second of passing checks, on little
/// traffic: anything that lets it act moves the canary within a second or two.
fn fleet_toml(
    production: SocketAddr,
    canary: SocketAddr,
    redis: &RedisServer,
    hook: &Peer,
) -> String {
    config_toml(
        &[production],
        &[canary],
        &format!(
            "[analysis]\nenabled = true\ninterval_ms = 100\nwindow_ms = 2000\nmin_requests = 5\n\
             failure_threshold = 2\nsteps = [20, 60]\nstep_ms = 500\n\
             [flags]\nredis_url = \"{}\"\npoll_ms = 100\n\
             [fleet]\nheartbeat_ms = 100\nseen_ms = 1000\n\
             [alerts.webhook]\nurl = \"{}/hook\"\nmin_severity = \"info\"\n",
            redis.url(),
            hook.url()
        ),
    )
}

fn canary(config: &Path, args: &[&str]) -> Output {
    let (verb, rest) = args.split_first().unwrap();
    Command::new(binary())
        .args(["canary", verb])
        .args(rest)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    scrape_metrics(&client(), admin).await.get(series).copied()
}

/// Polls until every proxy's `series` equals `value`.
async fn every_proxy(proxies: &[&ProxyProcess], series: &str, value: f64) {
    for proxy in proxies {
        let admin = proxy.admin_addr;
        eventually(
            Duration::from_secs(10),
            &format!("{series} = {value} on {admin}"),
            || async move { metric(admin, series).await == Some(value) },
        )
        .await;
    }
}

/// The number of checks the proxy's analysis has made (it judges while paused).
async fn checks(admin: SocketAddr) -> f64 {
    let scrape = scrape_metrics(&client(), admin).await;
    scrape
        .iter()
        .filter(|(k, _)| k.starts_with("canarygate_canary_checks_total{"))
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_command_moves_two_proxies_through_redis() {
    within(90, async {
        let redis = RedisServer::start();
        let hook = Peer::start(Mode::Created).await;
        let production = AppBackend::start(0, 0).await;
        let canary_app = AppBackend::start(0, 0).await;
        let toml = fleet_toml(production.addr, canary_app.addr, &redis, &hook);
        let a = ProxyProcess::spawn(&toml, "instance_id = \"a\"");
        let b = ProxyProcess::spawn(&toml, "instance_id = \"b\"");
        let proxies = [&a, &b];
        let traffic = Traffic::start(
            &[format!("http://{}/", a.addr), format!("http://{}/", b.addr)],
            4,
        );
        let dir = TempDir::new("canary-cli");
        let config = dir.write("c.toml", &server_toml("", &toml));

        // The analysis starts at its first step on its own.
        every_proxy(&proxies, "canarygate_canary_percent", 20.0).await;

        // set 5: both proxies route 5%, the analysis hands over, the audit goes out.
        let text = ok(&canary(&config, &["set", "5"]));
        assert!(text.contains("canary_percent 5 on every proxy"), "{text}");
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "5"
        );
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_auto"]),
            "off"
        );
        assert_eq!(
            redis.cli(&["HGET", "canarygate:analysis", "state"]),
            "manual"
        );
        let reason = redis.cli(&["HGET", "canarygate:analysis", "reason"]);
        assert!(
            reason.starts_with("canary_percent 5 set by the CLI from "),
            "{reason}"
        );
        every_proxy(&proxies, "canarygate_canary_percent", 5.0).await;
        every_proxy(
            &proxies,
            "canarygate_canary_commands_total{command=\"set\",source=\"cli\"}",
            1.0,
        )
        .await;
        let audits = hook.wait_for(1, "the audit alert").await;
        assert!(
            audits.iter().any(|r| r.body.contains("canary_command")
                && r.body.contains("canary_percent 5 set by the CLI")),
            "{audits:?}"
        );

        // resume: the analysis takes over again, from its first step.
        ok(&canary(&config, &["resume"]));
        every_proxy(&proxies, "canarygate_canary_percent", 20.0).await;

        // pause: the analysis goes on judging, and nothing moves although it would
        // have stepped to 60% (step_ms 500) many times over.
        ok(&canary(&config, &["pause"]));
        eventually(Duration::from_secs(5), "paused in Redis", || async {
            redis.cli(&["HGET", "canarygate:analysis", "state"]) == "manual"
        })
        .await;
        let before = checks(a.admin_addr).await;
        eventually(
            Duration::from_secs(10),
            "30 more checks while paused",
            || async { checks(a.admin_addr).await >= before + 30.0 },
        )
        .await;
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "20"
        );
        for proxy in proxies {
            assert_eq!(
                metric(proxy.admin_addr, "canarygate_canary_percent").await,
                Some(20.0)
            );
        }

        // rollback: everyone to production.
        let text = ok(&canary(&config, &["rollback"]));
        assert!(text.starts_with("Rolled back"), "{text}");
        assert_eq!(
            redis.cli(&["HGET", "canarygate:analysis", "state"]),
            "rolled_back"
        );
        every_proxy(&proxies, "canarygate_canary_percent", 0.0).await;
        drop(traffic);
        let c = client();
        for proxy in proxies {
            for _ in 0..30 {
                let got = get(&c, &format!("http://{}/", proxy.addr), &[]).await;
                assert_eq!(got.pool(), "production");
            }
        }

        // promote: 100%, and the operator is told what comes next.
        let text = ok(&canary(&config, &["promote"]));
        assert!(text.contains("Next: deploy the canary's release"), "{text}");
        every_proxy(&proxies, "canarygate_canary_percent", 100.0).await;
        every_proxy(
            &proxies,
            "canarygate_canary_commands_total{command=\"promote\",source=\"cli\"}",
            1.0,
        )
        .await;

        // A bad argument: 64, with what is wrong, and nothing written.
        for bad in ["101", "five", "-3"] {
            let out = canary(&config, &["set", bad]);
            assert_eq!(out.status.code(), Some(64), "{bad}: {out:?}");
            let error = String::from_utf8_lossy(&out.stderr);
            assert!(
                error.contains("a whole number from 0 to 100"),
                "{bad}: {error}"
            );
        }
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "100"
        );
        // A config without Redis: 64.
        let no_redis = dir.write(
            "n.toml",
            &server_toml("", &config_toml(&[production.addr], &[canary_app.addr], "")),
        );
        let out = canary(&no_redis, &["rollback"]);
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        // Redis down: 69, and it says nothing changed.
        drop(redis);
        let out = canary(&config, &["rollback"]);
        assert_eq!(out.status.code(), Some(69), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("nothing changed"),
            "{out:?}"
        );
    })
    .await;
}
