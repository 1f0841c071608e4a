//! A fleet (issue 21): several proxies on one Redis, a Sentinel group, a Redis
//! Cluster, all real `redis-server` processes on loopback ports started here.
//! (One analysis rollback obeyed by three proxies is in `analysis.rs`.)

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// A proxy on `redis_url` named `id`, heartbeats every 200 ms, listed for 1 s.
fn fleet_toml(
    production: std::net::SocketAddr,
    canary: std::net::SocketAddr,
    redis_url: &str,
    id: &str,
    extra: &str,
) -> String {
    config_toml(
        &[production],
        &[canary],
        &format!(
            "{extra}\n[server]\ninstance_id = \"{id}\"\n[flags]\nredis_url = \"{redis_url}\"\n\
             poll_ms = 300\n[fleet]\nheartbeat_ms = 200\nseen_ms = 1000\n"
        ),
    )
}

async fn fleet_of(proxy: &Proxy) -> serde_json::Value {
    get_json(&client(), &format!("http://{}/fleet", proxy.admin_addr)).await
}

async fn flags_of(proxy: &Proxy) -> serde_json::Value {
    get_json(&client(), &format!("http://{}/flags", proxy.admin_addr)).await
}

/// Waits until every proxy lists exactly `ids`, in sync.
async fn wait_fleet(proxies: &[&Proxy], ids: &[&str]) {
    for proxy in proxies {
        eventually(Duration::from_secs(15), "the fleet listed", || async {
            let fleet = fleet_of(proxy).await;
            let listed: Vec<&str> = fleet["instances"]
                .as_array()
                .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
                .unwrap_or_default();
            listed == ids && fleet["flags_in_sync"] == true
        })
        .await;
    }
}

/// Waits until every proxy applies flag `name` = `value`; how long each took from
/// `since`.
async fn wait_flag(proxies: &[&Proxy], name: &str, value: &str, since: Instant) -> Vec<Duration> {
    let mut took = Vec::new();
    for proxy in proxies {
        eventually(Duration::from_secs(15), "the flip applied", || async {
            proxy
                .state
                .snapshot()
                .flags
                .set
                .values
                .get(name)
                .is_some_and(|v| v.as_str() == value)
        })
        .await;
        took.push(since.elapsed());
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_on_one_redis_agree_and_the_fleet_lists_them() {
    within(60, async {
        let redis = RedisServer::start();
        let (prod, canary) = two_pools().await;
        let start = |id: &'static str| {
            let toml = fleet_toml(prod.addr, canary.addr, &redis.url(), id, "");
            async move { Proxy::start(&toml).await }
        };
        let (a, b, c) = (
            start("edge-a").await,
            start("edge-b").await,
            start("edge-c").await,
        );
        let all = [&a, &b, &c];
        wait_fleet(&all, &["edge-a", "edge-b", "edge-c"]).await;
        for proxy in all {
            let fleet = fleet_of(proxy).await;
            assert_eq!(fleet["count"], 3);
            assert_eq!(fleet["store_connected"], true);
            let scrape = scrape_metrics(&client(), proxy.admin_addr).await;
            assert_eq!(scrape["canarygate_fleet_instances"], 3.0);
            assert_eq!(scrape["canarygate_fleet_flags_in_sync"], 1.0);
            // The id is in /flags and /analysis too.
            let id = fleet["instance"].as_str().unwrap().to_owned();
            assert_eq!(flags_of(proxy).await["instance"], id.as_str());
            let analysis =
                get_json(&client(), &format!("http://{}/analysis", proxy.admin_addr)).await;
            assert_eq!(analysis["instance"], id.as_str());
        }

        // A flip reaches all three; the fleet agrees again, on the new digest.
        let flipped = Instant::now();
        redis.cli(&[
            "HSET",
            "canarygate:flags",
            "beta",
            "on",
            "canary_percent",
            "50",
        ]);
        let took = wait_flag(&all, "beta", "on", flipped).await;
        println!("flip applied by all three within {:?}", took.iter().max());
        let digest = flags_of(&a).await["digest"].as_str().unwrap().to_owned();
        for proxy in all {
            eventually(Duration::from_secs(5), "in sync on the flip", || async {
                let fleet = fleet_of(proxy).await;
                fleet["flags_in_sync"] == true
                    && fleet["instances"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|m| m["flags_digest"] == digest.as_str())
            })
            .await;
        }

        // The same sticky user lands in the same pool on all three.
        let c1 = client();
        for _ in 0..10 {
            let first = get(&c1, &a.url("/"), &[]).await;
            let cookie = first.cookie();
            assert!(!cookie.is_empty());
            for proxy in [&b, &c] {
                let again = get(&c1, &proxy.url("/"), &[("cookie", &cookie)]).await;
                assert_eq!(again.pool(), first.pool(), "{cookie}");
            }
        }

        // One stops: after its TTL the others list two.
        c.stop().await;
        wait_fleet(&[&a, &b], &["edge-a", "edge-b"]).await;
        let scrape = scrape_metrics(&client(), a.admin_addr).await;
        assert_eq!(scrape["canarygate_fleet_instances"], 2.0);
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_redis_keeps_its_flags_says_so_and_catches_up() {
    within(60, async {
        let mut redis = RedisServer::start();
        let (prod, canary) = two_pools().await;
        let toml = fleet_toml(prod.addr, canary.addr, &redis.url(), "edge-a", "");
        let a = Proxy::start(&toml).await;
        let b = Proxy::start(&toml.replace("edge-a", "edge-b")).await;
        redis.cli(&["HSET", "canarygate:flags", "beta", "on"]);
        wait_flag(&[&a, &b], "beta", "on", Instant::now()).await;
        wait_fleet(&[&a], &["edge-a", "edge-b"]).await;

        redis.kill();
        eventually(Duration::from_secs(10), "the partition noticed", || async {
            fleet_of(&a).await["store_connected"] == false
        })
        .await;
        // The last snapshot stays; /flags, /fleet and the metrics say why.
        assert_eq!(flags_of(&a).await["flags"]["beta"], "on");
        assert_eq!(flags_of(&a).await["store_connected"], false);
        let fleet = fleet_of(&a).await;
        assert_eq!(fleet["count"], 2, "the last fleet seen: {fleet}");
        let scrape = scrape_metrics(&client(), a.admin_addr).await;
        assert_eq!(scrape["canarygate_flag_store_up"], 0.0);
        assert!(scrape["canarygate_fleet_heartbeat_errors_total"] >= 1.0);
        let page = get(&client(), &format!("http://{}/", a.admin_addr), &[]).await;
        assert!(
            page.text().contains("Redis unreachable: as of"),
            "status page"
        );
        // Requests go on meanwhile.
        assert_eq!(get(&client(), &a.url("/"), &[]).await.status, 200);

        // Redis is back (empty): the proxies re-read, and a new flip arrives.
        redis.restart();
        redis.cli(&["HSET", "canarygate:flags", "beta", "off", "gamma", "on"]);
        wait_flag(&[&a, &b], "gamma", "on", Instant::now()).await;
        eventually(Duration::from_secs(10), "connected again", || async {
            fleet_of(&a).await["store_connected"] == true
        })
        .await;
        wait_fleet(&[&a, &b], &["edge-a", "edge-b"]).await;
        a.stop().await;
        b.stop().await;
    })
    .await;
}

/// `redis-server <conf> --sentinel` in `dir`, killed on drop.
fn sentinel(dir: &Path, port: u16, master_port: u16) -> KillOnDrop {
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
             sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 1\n",
            dir.display(),
            dir.join(format!("sentinel-{port}.log")).display()
        ),
    )
    .unwrap();
    KillOnDrop(
        Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (sentinel mode)"),
    )
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_loses_no_request_and_no_flip() {
    within(90, async {
        let mut master = RedisServer::start();
        let replica = RedisServer::start_with(
            free_port(),
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
        );
        let dir = TempDir::new("sentinels");
        let ports = [free_port(), free_port(), free_port()];
        let _sentinels: Vec<KillOnDrop> = ports
            .iter()
            .map(|p| sentinel(&dir.0, *p, master.port))
            .collect();
        for port in ports {
            wait_port(port).await;
        }
        // The sentinels know the replica before anything is killed.
        eventually(
            Duration::from_secs(20),
            "sentinels see the replica",
            || async {
                cli(ports[0], &["SENTINEL", "replicas", "mymaster"])
                    .contains(&replica.port.to_string())
            },
        )
        .await;
        let url = format!(
            "redis+sentinel://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}/mymaster/0",
            ports[0], ports[1], ports[2]
        );
        let (prod, canary) = two_pools().await;
        let ids = ["edge-a", "edge-b", "edge-c"];
        let mut fleet = Vec::new();
        for id in ids {
            fleet.push(Proxy::start(&fleet_toml(prod.addr, canary.addr, &url, id, "")).await);
        }
        let all: Vec<&Proxy> = fleet.iter().collect();
        master.cli(&["HSET", "canarygate:flags", "before", "on"]);
        wait_flag(&all, "before", "on", Instant::now()).await;
        wait_fleet(&all, &ids).await;

        // A steady request loop over all three proxies, through the failover.
        let failed = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut load = tokio::task::JoinSet::new();
        for proxy in &fleet {
            let (url, failed, sent, stop) =
                (proxy.url("/"), failed.clone(), sent.clone(), stop.clone());
            load.spawn(async move {
                let c = client();
                while !stop.is_cancelled() {
                    match try_get(&c, &url).await {
                        Ok(got) if got.status == 200 => {}
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }

        master.kill(); // SIGKILL
        eventually(
            Duration::from_secs(30),
            "the sentinels promote the replica",
            || async {
                cli(
                    ports[0],
                    &["SENTINEL", "get-master-addr-by-name", "mymaster"],
                )
                .contains(&replica.port.to_string())
                    && cli(replica.port, &["ROLE"]).starts_with("master")
            },
        )
        .await;
        // A flip right after the failover reaches all three.
        let flipped = Instant::now();
        replica.cli(&["HSET", "canarygate:flags", "after", "on"]);
        let took = wait_flag(&all, "after", "on", flipped).await;
        println!(
            "after failover, the flip reached all three within {:?}",
            took.iter().max()
        );
        wait_fleet(&all, &ids).await;
        stop.cancel();
        load.join_all().await;
        let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        assert!(sent > 100, "{sent} requests");
        assert_eq!(failed, 0, "{failed} of {sent} requests failed");
        for proxy in fleet {
            proxy.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_carries_flags_and_heartbeats() {
    within(90, async {
        let ports = [free_port(), free_port(), free_port()];
        let nodes: Vec<RedisServer> = ports
            .iter()
            .map(|p| {
                RedisServer::start_with(
                    *p,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &format!("nodes-{p}.conf"),
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = Command::new("redis-cli").args(&create).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        eventually(Duration::from_secs(20), "the cluster is ok", || async {
            ports
                .iter()
                .all(|p| cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        })
        .await;
        let url = format!("redis+cluster://{},{}", addrs[0], addrs[1]);
        // The analysis on too: its record and its compare-and-set script live on the
        // cluster, beside the flags (one hash tag).
        let keys = "[analysis]\nredis_key = \"{canarygate}:analysis\"\nenabled = true\n\
                    interval_ms = 250\nwindow_ms = 3000\nmin_requests = 50\n";
        let (prod, canary) = two_pools().await;
        let toml = |id: &str| {
            fleet_toml(prod.addr, canary.addr, &url, id, keys)
                .replace(
                    "poll_ms = 300",
                    "poll_ms = 300\nkey = \"{canarygate}:flags\"",
                )
                .replace(
                    "seen_ms = 1000",
                    "seen_ms = 1000\nkey = \"{canarygate}:fleet\"",
                )
        };
        let (a, b) = (
            Proxy::start(&toml("edge-a")).await,
            Proxy::start(&toml("edge-b")).await,
        );
        cli(
            ports[2],
            &[
                "-c",
                "HSET",
                "{canarygate}:flags",
                "beta",
                "on",
                "canary_percent",
                "10",
            ],
        );
        wait_flag(&[&a, &b], "beta", "on", Instant::now()).await;
        assert_eq!(flags_of(&a).await["effective_canary_percent"], 10);
        wait_fleet(&[&a, &b], &["edge-a", "edge-b"]).await;
        let members: HashMap<String, String> = [("edge-a", ""), ("edge-b", "")]
            .iter()
            .map(|(id, _)| {
                let key = format!("{{canarygate}}:fleet:{id}");
                ((*id).to_owned(), cli(ports[0], &["-c", "GET", &key]))
            })
            .collect();
        for (id, beat) in &members {
            assert!(beat.contains(&format!("\"id\":\"{id}\"")), "{id}: {beat}");
        }
        eventually(
            Duration::from_secs(10),
            "the analysis record written",
            || async {
                !cli(ports[1], &["-c", "HGET", "{canarygate}:analysis", "state"]).is_empty()
            },
        )
        .await;
        // canary status reads it from the cluster as the deploy playbook does.
        let dir = TempDir::new("cluster-status");
        let config = dir.write("c.toml", &toml("edge-status"));
        let out = Command::new(binary())
            .args(["canary", "status", "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(status["state"].is_string(), "{status}");
        a.stop().await;
        b.stop().await;
        drop(nodes);
    })
    .await;
}

#[test]
fn a_cluster_url_needs_keys_with_one_hash_tag() {
    let base = "[pools.production]\nbackends = [\"127.0.0.1:9\"]\n[flags]\n\
                redis_url = \"redis+cluster://127.0.0.1:7000\"\n";
    for (extra, key) in [
        ("", "flags.key"),
        ("key = \"{cg}:flags\"\n", "fleet.key"),
        (
            "key = \"{cg}:flags\"\n[fleet]\nkey = \"{cg}:fleet\"\n",
            "analysis.redis_key",
        ),
    ] {
        let error = canarygate::config::from_toml(&format!("{base}{extra}"), "c.toml")
            .expect_err(extra)
            .to_string();
        assert!(error.contains(&format!("key `{key}`")), "{error}");
        assert!(error.contains("hash tag"), "{error}");
    }
    let ok = format!(
        "{base}key = \"{{cg}}:flags\"\n[fleet]\nkey = \"{{cg}}:fleet\"\n[analysis]\n\
         redis_key = \"{{cg}}:analysis\"\n"
    );
    canarygate::config::from_toml(&ok, "c.toml").expect("one tag everywhere");
    let error = canarygate::config::from_toml(
        "[pools.production]\nbackends = [\"127.0.0.1:9\"]\n[flags]\n\
         redis_url = \"redis+sentinel://127.0.0.1:26379\"\n",
        "c.toml",
    )
    .expect_err("no master name")
    .to_string();
    assert!(error.contains("key `flags.redis_url`"), "{error}");
    assert!(error.contains("needs the master's name"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_id_is_on_the_proxys_log_lines() {
    within(30, async {
        let (prod, canary) = two_pools().await;
        let mut proxy = ProxyProcess::spawn(
            &config_toml(&[prod.addr], &[canary.addr], ""),
            "instance_id = \"edge-logged\"\n",
        );
        // A reload's lines come from a signal handler: they carry it too.
        proxy.signal("HUP");
        let lines = proxy.log_until("config reloaded", Duration::from_secs(10));
        assert!(lines.len() >= 2, "{lines:?}");
        for line in &lines {
            assert!(line.contains("\"instance\":\"edge-logged\""), "{line}");
        }
    })
    .await;
}

/// Redis's own clock (`TIME`), in Unix ms.
fn redis_ms(redis: &RedisServer) -> u64 {
    let out = redis.cli(&["TIME"]);
    let mut parts = out.lines().map(|l| l.trim().parse::<u64>().unwrap());
    let (seconds, micros) = (parts.next().unwrap(), parts.next().unwrap());
    seconds * 1_000 + micros / 1_000
}

/// The instance ids a `/fleet` answer lists.
fn listed(fleet: &serde_json::Value) -> Vec<String> {
    fleet["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Issue 29 item 8: heartbeats, membership and the analysis' step timing use Redis
/// `TIME`. Two hosts whose clocks are an hour off (child processes with the
/// test-only `CANARYGATE_TEST_CLOCK_OFFSET_MS`, which shifts their wall clock) stay
/// in everyone's `/fleet`, and the one behind steps the rollout exactly when the
/// record written on Redis time says so (before: the one behind vanished from the
/// others' view, the one ahead dropped everyone else, and the one behind never
/// stepped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_whose_clocks_are_off_stay_in_the_fleet_and_step_on_redis_time() {
    const HOUR_MS: i64 = 3_600_000;
    const STEP_MS: u64 = 1_500;
    within(90, async {
        let redis = RedisServer::start();
        let (prod, canary) = two_pools().await;
        // Host A, whose clock is right: in this process, no analysis.
        let a = Proxy::start(&fleet_toml(prod.addr, canary.addr, &redis.url(), "edge-a", "")).await;
        // The rollout at its first step, as a host with a right clock writes it.
        let since = redis_ms(&redis);
        redis.cli(&["HSET", "canarygate:flags", "canary_percent", "5", "canary_auto", "on"]);
        redis.cli(&[
            "HSET",
            "canarygate:analysis",
            "state",
            "progressing",
            "step",
            "0",
            "step_since_ms",
            &since.to_string(),
            "percent",
            "5",
            "switch",
            "on",
        ]);
        let child = |id: &str, offset: i64, extra: &str| {
            let toml = config_toml(
                &[prod.addr],
                &[canary.addr],
                &format!(
                    "{extra}\n[flags]\nredis_url = \"{}\"\npoll_ms = 300\n[fleet]\n\
                     heartbeat_ms = 200\nseen_ms = 1000\n",
                    redis.url()
                ),
            );
            ProxyProcess::spawn_with_env(
                &toml,
                &format!("instance_id = \"{id}\""),
                &[(canarygate::clock::TEST_OFFSET_ENV, &offset.to_string())],
            )
        };
        // B, an hour behind, runs the analysis; C is an hour ahead.
        let b = child(
            "edge-b",
            -HOUR_MS,
            &format!(
                "[analysis]\nenabled = true\ninterval_ms = 250\nwindow_ms = 3000\n\
                 min_requests = 20\nfailure_threshold = 2\nsteps = [5, 10, 25]\nstep_ms = {STEP_MS}\n"
            ),
        );
        let c = child("edge-c", HOUR_MS, "");
        let all = ["edge-a", "edge-b", "edge-c"];
        wait_fleet(&[&a], &all).await;
        for proxy in [&b, &c] {
            let url = format!("http://{}/fleet", proxy.admin_addr);
            eventually(Duration::from_secs(15), "every host listed", || async {
                listed(&get_json(&client(), &url).await) == all
            })
            .await;
        }
        // Their heartbeats are scored on Redis's clock, not their own.
        let scores = redis.cli(&["ZRANGE", "canarygate:fleet", "0", "-1", "WITHSCORES"]);
        let now = redis_ms(&redis);
        for pair in scores.lines().collect::<Vec<_>>().chunks(2) {
            let score: u64 = pair[1].trim().parse().unwrap();
            assert!(score.abs_diff(now) < 5_000, "{} at {score}, Redis at {now}", pair[0]);
        }
        let age = &get_json(&client(), &format!("http://{}/fleet", b.admin_addr)).await["instances"];
        assert!(
            age.as_array().unwrap().iter().all(|m| m["age_ms"].as_u64().unwrap() < 5_000),
            "{age}"
        );

        // B steps on Redis time: not before since + step_ms, and it does step.
        // Ordinary users from many addresses: one client counts for little.
        let traffic = support::app::Traffic::start(&[format!("http://{}/", b.addr)], 6);
        eventually(Duration::from_secs(30), "the host behind steps up", || async {
            redis.cli(&["HGET", "canarygate:analysis", "step"]) == "1"
        })
        .await;
        drop(traffic);
        let stepped: u64 = redis
            .cli(&["HGET", "canarygate:analysis", "step_since_ms"])
            .parse()
            .unwrap();
        assert!(stepped >= since + STEP_MS, "stepped at {stepped}, step began {since}");
        assert!(
            stepped.abs_diff(redis_ms(&redis)) < 10_000,
            "the step is stamped on Redis time: {stepped}"
        );
        assert_eq!(redis.cli(&["HGET", "canarygate:flags", "canary_percent"]), "10");
        drop((b, c));
        a.stop().await;
    })
    .await;
}
