//! Feature flags from a real `redis-server` started by the tests: flips reach the
//! application header and the routing, bad values change nothing, and Redis going
//! away never fails a request.

mod support;

use std::time::Duration;

use redis::AsyncCommands as _;
use support::*;

const KEY: &str = "canarygate:flags";

/// The `x-feature-flags` value the backend received for one request.
async fn flags_seen(c: &TestClient, proxy: &Proxy) -> String {
    let got = get(c, &proxy.url("/headers"), &[]).await;
    got.text()
        .lines()
        .find_map(|l| l.strip_prefix("x-feature-flags: "))
        .unwrap_or("<absent>")
        .to_owned()
}

fn flags_config(redis_url: &str, extra: &str) -> String {
    format!("[flags]\nredis_url = \"{redis_url}\"\n{extra}\n")
}

async fn wait_header(c: &TestClient, proxy: &Proxy, expected: &str, timeout: Duration) {
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        last = flags_seen(c, proxy).await;
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("header is `{last}`, expected `{expected}` within {timeout:?}");
}

async fn pools_of(
    c: &TestClient,
    proxy: &Proxy,
    n: usize,
    headers: &[(&str, &str)],
) -> Vec<String> {
    let mut pools = Vec::with_capacity(n);
    for _ in 0..n {
        pools.push(get(c, &proxy.url("/"), headers).await.pool().to_owned());
    }
    pools
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flips_reach_the_application_header() {
    within(60, async {
        let redis = RedisServer::start();
        let backend = TestBackend::start("production").await;
        // A poll period far beyond the test: only keyspace notifications can be fast.
        let proxy = Proxy::start(&config_toml(
            &[backend.addr],
            &[],
            &flags_config(
                &redis.url(),
                "poll_ms = 600000\n[flags.static]\nstart = \"on\"",
            ),
        ))
        .await;
        let c = client();
        let mut r = redis.conn().await;
        let _: () = r.hset(KEY, "new_checkout", "on").await.unwrap();
        // Redis replaces the static flags once read.
        wait_header(&c, &proxy, "new_checkout=on", Duration::from_secs(5)).await;

        // Once with the real redis-cli binary.
        assert_eq!(redis.cli(&["HSET", KEY, "dark_mode", "OFF"]), "1");
        wait_header(
            &c,
            &proxy,
            "dark_mode=off;new_checkout=on",
            Duration::from_secs(2),
        )
        .await;
        let _: () = r.hset(KEY, "theme", "blue v2").await.unwrap();
        let _: () = r.hset(KEY, "canary_percent", "10").await.unwrap();
        wait_header(
            &c,
            &proxy,
            "dark_mode=off;new_checkout=on;theme=blue v2",
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(redis.cli(&["HDEL", KEY, "new_checkout"]), "1");
        wait_header(
            &c,
            &proxy,
            "dark_mode=off;theme=blue v2",
            Duration::from_secs(2),
        )
        .await;

        // A client cannot inject flags.
        let got = get(
            &c,
            &proxy.url("/headers"),
            &[("x-feature-flags", "admin=on")],
        )
        .await;
        assert!(
            got.text()
                .contains("x-feature-flags: dark_mode=off;theme=blue v2\n"),
            "{}",
            got.text()
        );
        assert!(!got.text().contains("admin=on"));

        // The admin endpoint shows the snapshot.
        let flags = get_json(&c, &format!("http://{}/flags", proxy.admin_addr)).await;
        assert_eq!(flags["source"], "redis");
        assert_eq!(flags["store_connected"], true);
        assert_eq!(flags["flags"]["dark_mode"], "off");
        assert_eq!(flags["flags"]["theme"], "blue v2");
        assert_eq!(flags["reserved"]["canary_percent"], 10);
        assert_eq!(flags["effective_canary_percent"], 10);
        assert!(flags["version"].as_u64().unwrap() >= 5);
        assert!(flags["updated_at"].as_str().unwrap().ends_with('Z'));

        // An unchanged re-read swaps nothing: the version stays.
        let version = proxy.state.snapshot().flags.version;
        let _: () = r.hset(KEY, "theme", "blue v2").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(proxy.state.snapshot().flags.version, version);
    })
    .await;
}

/// HSET one field and wait until the proxy's snapshot holds that value. (Waiting for
/// any new version raced with the watcher's first read of the hash: a version
/// published just before the HSET was taken for the flip.)
async fn flip(r: &mut redis::aio::MultiplexedConnection, proxy: &Proxy, field: &str, value: &str) {
    let _: () = r.hset(KEY, field, value).await.unwrap();
    let state = proxy.state.clone();
    let (field, value) = (field.to_owned(), value.to_owned());
    eventually(Duration::from_secs(3), "flip applied", move || {
        let set = &state.snapshot().flags.set;
        let ok = match field.as_str() {
            "canary_percent" => set.canary_percent.map(|p| p.to_string()) == Some(value.clone()),
            "canary" => set.canary_enabled == (value == "on"),
            name => {
                set.values
                    .get(name)
                    .map(canarygate::flags::model::FlagValue::as_str)
                    == Some(value.as_str())
            }
        };
        async move { ok }
    })
    .await;
}

/// Asserts that `n` requests are all served by `pool`.
async fn assert_all(c: &TestClient, proxy: &Proxy, n: usize, headers: &[(&str, &str)], pool: &str) {
    let pools = pools_of(c, proxy, n, headers).await;
    assert!(
        pools.iter().all(|p| p == pool),
        "expected all on {pool}: {pools:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_fields_steer_traffic_and_bad_values_change_nothing() {
    within(60, async {
        let redis = RedisServer::start();
        let (prod, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[canary.addr],
            &format!(
                "[routing]\nsticky = \"none\"\n{}",
                flags_config(&redis.url(), "poll_ms = 100")
            ),
        ))
        .await;
        let c = client();
        let mut r = redis.conn().await;
        for (percent, expected) in [("0", "production"), ("100", "canary")] {
            flip(&mut r, &proxy, "canary_percent", percent).await;
            assert_all(&c, &proxy, 60, &[], expected).await;
        }

        // Kill switch: everything to production, whatever the percent or the override.
        flip(&mut r, &proxy, "canary", "off").await;
        assert_all(&c, &proxy, 40, &[], "production").await;
        assert_all(&c, &proxy, 10, &[("x-canary", "always")], "production").await;
        flip(&mut r, &proxy, "canary", "on").await;
        assert_all(&c, &proxy, 40, &[], "canary").await;

        // Invalid reserved values are ignored (and counted); traffic does not move.
        let admin_flags = format!("http://{}/flags", proxy.admin_addr);
        for (i, bad) in ["abc", "150", "-1"].iter().enumerate() {
            let _: () = r.hset(KEY, "canary_percent", *bad).await.unwrap();
            let want = i as u64 + 1;
            let c2 = c.clone();
            let url = admin_flags.clone();
            eventually(Duration::from_secs(3), "rejection counted", move || {
                let (c2, url) = (c2.clone(), url.clone());
                async move { get_json(&c2, &url).await["rejected_total"]["canary_percent"] == want }
            })
            .await;
            assert_all(&c, &proxy, 30, &[], "canary").await;
        }
        let _: () = r.hset(KEY, "canary", "maybe").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_all(&c, &proxy, 30, &[], "canary").await;
        let flags = get_json(&c, &admin_flags).await;
        assert_eq!(flags["reserved"]["canary_percent"], 100);
        assert_eq!(flags["reserved"]["canary"], "on");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_fails_no_request_and_a_restart_is_picked_up() {
    within(60, async {
        let mut redis = RedisServer::start();
        let backend = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[backend.addr],
            &[],
            &flags_config(&redis.url(), "poll_ms = 200"),
        ))
        .await;
        let c = client();
        let _: () = redis
            .conn()
            .await
            .hset(KEY, "feature_a", "on")
            .await
            .unwrap();
        wait_header(&c, &proxy, "feature_a=on", Duration::from_secs(3)).await;

        // A steady request loop while Redis is killed.
        let loop_task = {
            let (c, url) = (c.clone(), proxy.url("/headers"));
            tokio::spawn(async move {
                let mut failures = 0;
                let mut headers = std::collections::HashSet::new();
                for _ in 0..300 {
                    match try_get(&c, &url).await {
                        Ok(got) if got.status == 200 => {
                            headers.insert(
                                got.text()
                                    .lines()
                                    .find(|l| l.starts_with("x-feature-flags"))
                                    .unwrap_or("")
                                    .to_owned(),
                            );
                        }
                        _ => failures += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                (failures, headers)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.kill();
        let (failures, headers) = loop_task.await.unwrap();
        assert_eq!(failures, 0);
        assert_eq!(
            headers.into_iter().collect::<Vec<_>>(),
            ["x-feature-flags: feature_a=on"]
        );
        let admin_flags = format!("http://{}/flags", proxy.admin_addr);
        let flags = get_json(&c, &admin_flags).await;
        assert_eq!(flags["store_connected"], false);
        assert_eq!(flags["flags"]["feature_a"], "on");

        // Back with other values: picked up after the reconnect.
        redis.restart();
        let _: () = redis
            .conn()
            .await
            .hset(KEY, "feature_b", "off")
            .await
            .unwrap();
        wait_header(&c, &proxy, "feature_b=off", Duration::from_secs(10)).await;
        assert_eq!(get_json(&c, &admin_flags).await["store_connected"], true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_on_static_flags_while_redis_is_down() {
    within(60, async {
        let port = free_port();
        let backend = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[backend.addr],
            &[],
            &flags_config(
                &format!("redis://127.0.0.1:{port}/0"),
                "poll_ms = 200\n[flags.static]\ndark_mode = \"off\"\nbeta = true",
            ),
        ))
        .await;
        let c = client();
        assert_eq!(flags_seen(&c, &proxy).await, "beta=on;dark_mode=off");
        let flags = get_json(&c, &format!("http://{}/flags", proxy.admin_addr)).await;
        assert_eq!(
            (flags["source"].as_str(), flags["store_connected"].as_bool()),
            (Some("static"), Some(false))
        );

        let redis = RedisServer::start_with(port, &[]);
        let _: () = redis
            .conn()
            .await
            .hset(KEY, "dark_mode", "on")
            .await
            .unwrap();
        wait_header(&c, &proxy, "dark_mode=on", Duration::from_secs(10)).await;
        let flags = get_json(&c, &format!("http://{}/flags", proxy.admin_addr)).await;
        assert_eq!(flags["source"], "redis");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refusing_config_still_propagates_by_polling() {
    within(60, async {
        let redis = RedisServer::start();
        // An ACL user that may read the hash and subscribe, but not run CONFIG.
        assert_eq!(
            redis.cli(&[
                "ACL",
                "SETUSER",
                "flagreader",
                "on",
                ">s3cr@t/pw",
                "~canarygate:*",
                "&*",
                "+@all",
                "-config"
            ]),
            "OK"
        );
        let backend = TestBackend::start("production").await;
        // The password comes from the environment, named in the config.
        let proxy = ProxyProcess::spawn_with_env(
            &config_toml(
                &[backend.addr],
                &[],
                &flags_config(
                    &format!(
                        "redis://flagreader:${{CG_TEST_REDIS_PW}}@127.0.0.1:{}/0",
                        redis.port
                    ),
                    "poll_ms = 300",
                ),
            ),
            "",
            &[("CG_TEST_REDIS_PW", "s3cr@t/pw")],
        );
        let mut proxy = proxy;
        proxy.wait_log(
            "cannot enable keyspace notifications",
            Duration::from_secs(10),
        );
        let c = client();
        let url = format!("http://{}/headers", proxy.addr);
        redis.cli(&["HSET", KEY, "polled", "on"]);
        eventually(Duration::from_secs(3), "polled flag applied", || {
            let (c, url) = (c.clone(), url.clone());
            async move {
                get(&c, &url, &[])
                    .await
                    .text()
                    .contains("x-feature-flags: polled=on\n")
            }
        })
        .await;
        // Notifications were never enabled: polling alone carried the change.
        assert_eq!(
            redis.cli(&["CONFIG", "GET", "notify-keyspace-events"]),
            "notify-keyspace-events"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_redis_agree() {
    within(60, async {
        let redis = RedisServer::start();
        let (prod, canary) = two_pools().await;
        let toml = config_toml(
            &[prod.addr],
            &[canary.addr],
            &flags_config(&redis.url(), "poll_ms = 500"),
        );
        let a = Proxy::start(&toml).await;
        let b = Proxy::start(&toml).await;
        let c = client();
        redis.cli(&["HSET", KEY, "canary_percent", "50", "shared_flag", "on"]);
        for proxy in [&a, &b] {
            wait_header(&c, proxy, "shared_flag=on", Duration::from_secs(3)).await;
            eventually(Duration::from_secs(3), "percent applied", || {
                let ok = proxy.state.snapshot().flags.set.canary_percent == Some(50);
                async move { ok }
            })
            .await;
        }
        let mut canaries = 0;
        for i in 0..200 {
            let cookie = sticky_cookie(&format!("user-{i}"));
            let pa = get(&c, &a.url("/"), &[("cookie", &cookie)])
                .await
                .pool()
                .to_owned();
            let pb = get(&c, &b.url("/"), &[("cookie", &cookie)])
                .await
                .pool()
                .to_owned();
            assert_eq!(pa, pb, "user-{i}");
            canaries += usize::from(pa == "canary");
        }
        assert!(
            (70..=130).contains(&canaries),
            "{canaries} of 200 on canary at 50%"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    within(60, async {
        // A CA and a server certificate for 127.0.0.1, made here.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "canarygate test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        let port = free_port();
        let dir = TempDir::new("tls");
        let ca_path = dir.write("ca.pem", &ca.pem());
        let cert_path = dir.write("server.pem", &cert.pem());
        let key_path = dir.write("server.key", &key.serialize_pem());
        let tls_port = port.to_string();
        let redis = RedisServer::start_with(
            0,
            &[
                "--tls-port", &tls_port,
                "--tls-cert-file", cert_path.to_str().unwrap(),
                "--tls-key-file", key_path.to_str().unwrap(),
                "--tls-ca-cert-file", ca_path.to_str().unwrap(),
                "--tls-auth-clients", "no",
            ],
        );
        let backend = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[backend.addr],
            &[],
            &format!(
                "[flags]\nredis_url = \"rediss://127.0.0.1:{port}/0\"\ntls_ca_path = \"{}\"\npoll_ms = 200\n",
                ca_path.display()
            ),
        ))
        .await;
        let out = std::process::Command::new("redis-cli")
            .args(["--tls", "--cacert", ca_path.to_str().unwrap(), "-p", &tls_port, "HSET", KEY, "over_tls", "on"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let c = client();
        wait_header(&c, &proxy, "over_tls=on", Duration::from_secs(5)).await;
        drop(redis);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_logs_one_warning_not_one_per_retry() {
    within(60, async {
        let mut redis = RedisServer::start();
        let backend = TestBackend::start("production").await;
        let mut proxy = ProxyProcess::spawn(
            &config_toml(
                &[backend.addr],
                &[],
                &flags_config(&redis.url(), "poll_ms = 100"),
            ),
            "",
        );
        proxy.wait_log("flag store connected", Duration::from_secs(10));
        redis.kill();
        // 2 s of retries (backoff 0.1, 0.2, 0.4, 0.8 s ...), then Redis comes back.
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.restart();
        let lines = proxy.log_until("flag store connected", Duration::from_secs(10));
        let warnings = lines
            .iter()
            .filter(|l| l.contains("flag store unreachable"))
            .count();
        assert_eq!(warnings, 1, "{lines:#?}");
    })
    .await;
}

/// Writes a config with `extra` flag settings and applies it as SIGHUP does.
fn reload_with(proxy: &Proxy, dir: &TempDir, backend: std::net::SocketAddr, extra: &str) {
    let path = dir.write("canarygate.toml", &config_toml(&[backend], &[], extra));
    canarygate::reload(&proxy.state, &path).expect("the reloaded config is valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_the_flag_store_settings_and_static_flags() {
    within(60, async {
        let backend = TestBackend::start("production").await;
        let dir = TempDir::new("flag-reload");
        let c = client();
        let proxy = Proxy::start(&config_toml(
            &[backend.addr],
            &[],
            "[flags.static]\ntheme = \"red\"",
        ))
        .await;
        assert_eq!(flags_seen(&c, &proxy).await, "theme=red");

        // Without Redis, new static values apply at once.
        reload_with(
            &proxy,
            &dir,
            backend.addr,
            "[flags.static]\ntheme = \"green\"",
        );
        assert_eq!(flags_seen(&c, &proxy).await, "theme=green");

        // A store named by a reload is followed from then on (notifications only:
        // the poll period is far beyond the test).
        let redis = RedisServer::start();
        let mut r = redis.conn().await;
        let _: () = r.hset("first:flags", "new_checkout", "on").await.unwrap();
        let store =
            |key: &str| flags_config(&redis.url(), &format!("key = \"{key}\"\npoll_ms = 600000"));
        reload_with(&proxy, &dir, backend.addr, &store("first:flags"));
        wait_header(&c, &proxy, "new_checkout=on", Duration::from_secs(5)).await;

        // Another key at the next reload: the watcher restarts on it, and follows
        // its flips, not the old key's.
        let _: () = r.hset("second:flags", "dark_mode", "on").await.unwrap();
        reload_with(&proxy, &dir, backend.addr, &store("second:flags"));
        wait_header(&c, &proxy, "dark_mode=on", Duration::from_secs(5)).await;
        let _: () = r.hset("first:flags", "stale", "on").await.unwrap();
        let _: () = r.hset("second:flags", "fresh", "on").await.unwrap();
        wait_header(&c, &proxy, "dark_mode=on;fresh=on", Duration::from_secs(5)).await;

        // Redis taken out of the config: the static flags are back.
        reload_with(
            &proxy,
            &dir,
            backend.addr,
            "[flags.static]\ntheme = \"blue\"",
        );
        assert_eq!(flags_seen(&c, &proxy).await, "theme=blue");
        let flags = get_json(&c, &format!("http://{}/flags", proxy.admin_addr)).await;
        assert_eq!(flags["source"], "static");
        // And the old watcher is gone: a flip in Redis changes nothing any more.
        let version = proxy.state.snapshot().flags.version;
        let _: () = r.hset("second:flags", "late", "on").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(proxy.state.snapshot().flags.version, version);
        assert_eq!(flags_seen(&c, &proxy).await, "theme=blue");
        proxy.stop().await;
    })
    .await;
}
