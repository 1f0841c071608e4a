//! The request path end to end: real backends and the proxy on 127.0.0.1 ephemeral
//! ports, real HTTP clients.

#![allow(clippy::cast_precision_loss)] // shares of request counts far below 2^52

mod support;

use std::time::{Duration, Instant};

use canarygate::config;
use support::*;

fn share_of_canary(pools: &[String]) -> f64 {
    pools.iter().filter(|p| *p == "canary").count() as f64 / pools.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsticky_split_is_one_third_canary() {
    within(60, async {
        let (prod, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[canary.addr],
            "[routing]\nsticky = \"none\"\n",
        ))
        .await;
        // 3000 requests over 8 keep-alive connections in parallel.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let url = proxy.url("/");
            tasks.push(tokio::spawn(async move {
                let c = client();
                let mut pools = Vec::new();
                for _ in 0..375 {
                    let got = get(&c, &url, &[]).await;
                    assert_eq!(got.status, 200);
                    // The pool header and the backend that answered always agree.
                    assert_eq!(got.pool(), got.text());
                    pools.push(got.pool().to_owned());
                }
                pools
            }));
        }
        let mut pools = Vec::new();
        for t in tasks {
            pools.extend(t.await.unwrap());
        }
        assert_eq!(pools.len(), 3000);
        let share = share_of_canary(&pools);
        assert!((0.30..=0.36).contains(&share), "canary share {share}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_keeps_a_client_on_one_pool() {
    within(30, async {
        let (prod, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[canary.addr], "")).await;
        let c = client();
        let mut seen_pools = std::collections::HashSet::new();
        // Several fresh clients, so both pools are exercised.
        for _ in 0..6 {
            let first = get(&c, &proxy.url("/"), &[]).await;
            let set_cookie = first.header("set-cookie").to_owned();
            assert!(set_cookie.starts_with("canarygate_id="), "{set_cookie}");
            for attr in ["Path=/", "HttpOnly", "SameSite=Lax", "Max-Age=31536000"] {
                assert!(set_cookie.contains(attr), "{set_cookie} lacks {attr}");
            }
            let cookie = set_cookie.split(';').next().unwrap().to_owned();
            for _ in 0..50 {
                let got = get(&c, &proxy.url("/page"), &[("cookie", &cookie)]).await;
                assert_eq!(got.pool(), first.pool(), "client moved between pools");
                assert_eq!(got.header("set-cookie"), "", "cookie re-issued");
            }
            seen_pools.insert(first.pool().to_owned());
        }
        // A client whose cookie is among others still keeps its pool.
        let first = get(&c, &proxy.url("/"), &[]).await;
        let cookie = first.cookie();
        let got = get(
            &c,
            &proxy.url("/"),
            &[("cookie", &format!("a=1; {cookie}; theme=dark"))],
        )
        .await;
        assert_eq!(got.pool(), first.pool());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_percent_only_moves_users_to_canary() {
    within(60, async {
        let (prod, canary) = two_pools().await;
        let toml10 = config_toml(
            &[prod.addr],
            &[canary.addr],
            "[routing]\ncanary_percent = 10\n",
        );
        let proxy = Proxy::start(&toml10).await;
        let c = client();
        let ids: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        let mut at10 = Vec::new();
        for id in &ids {
            let got = get(&c, &proxy.url("/"), &[("cookie", &sticky_cookie(id))]).await;
            at10.push(got.pool().to_owned());
        }
        let share10 = share_of_canary(&at10);
        assert!((0.07..=0.13).contains(&share10), "share at 10%: {share10}");

        let toml50 = config_toml(
            &[prod.addr],
            &[canary.addr],
            "[routing]\ncanary_percent = 50\n",
        );
        proxy
            .state
            .apply_config(config::from_toml(&toml50, "t").unwrap());
        let mut at50 = Vec::new();
        for id in &ids {
            let got = get(&c, &proxy.url("/"), &[("cookie", &sticky_cookie(id))]).await;
            at50.push(got.pool().to_owned());
        }
        let share50 = share_of_canary(&at50);
        assert!((0.45..=0.55).contains(&share50), "share at 50%: {share50}");
        for (i, (before, after)) in at10.iter().zip(&at50).enumerate() {
            if before == "canary" {
                assert_eq!(after, "canary", "user-{i} moved back to production");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_header_forces_either_pool() {
    within(30, async {
        let (prod, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[canary.addr],
            "[routing]\nsticky = \"none\"\ncanary_percent = 50\n",
        ))
        .await;
        let c = client();
        for _ in 0..30 {
            let got = get(&c, &proxy.url("/"), &[("x-canary", "always")]).await;
            assert_eq!((got.pool(), got.text()), ("canary", "canary"));
            let got = get(&c, &proxy.url("/"), &[("x-canary", "NEVER")]).await;
            assert_eq!((got.pool(), got.text()), ("production", "production"));
        }
        // The override also wins over a sticky cookie.
        proxy.state.apply_config(
            config::from_toml(
                &config_toml(
                    &[prod.addr],
                    &[canary.addr],
                    "[routing]\ncanary_percent = 0\n",
                ),
                "t",
            )
            .unwrap(),
        );
        let got = get(
            &c,
            &proxy.url("/"),
            &[("x-canary", "always"), ("cookie", "canarygate_id=u1")],
        )
        .await;
        assert_eq!(got.pool(), "canary");

        // override_header = "" turns it off.
        proxy.state.apply_config(
            config::from_toml(
                &config_toml(
                    &[prod.addr],
                    &[canary.addr],
                    "[routing]\ncanary_percent = 0\noverride_header = \"\"\n",
                ),
                "t",
            )
            .unwrap(),
        );
        for _ in 0..10 {
            let got = get(&c, &proxy.url("/"), &[("x-canary", "always")]).await;
            assert_eq!(got.pool(), "production");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_canary_pool_sends_everything_to_production() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            "[routing]\nsticky = \"none\"\ncanary_percent = 100\n",
        ))
        .await;
        let c = client();
        for _ in 0..20 {
            let got = get(&c, &proxy.url("/"), &[("x-canary", "always")]).await;
            assert_eq!((got.status.as_u16(), got.pool()), (200, "production"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_header_and_ip_modes_are_stable() {
    within(30, async {
        let (prod, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[canary.addr],
            "[routing]\nsticky = \"header:x-user\"\ncanary_percent = 50\n",
        ))
        .await;
        let c = client();
        let mut pools_by_user = std::collections::HashMap::new();
        for round in 0..3 {
            for u in 0..40 {
                let user = format!("u{u}");
                let got = get(&c, &proxy.url("/"), &[("x-user", &user)]).await;
                let expected = if canarygate::routing::bucket(user.as_bytes()) < 50 {
                    "canary"
                } else {
                    "production"
                };
                assert_eq!(got.pool(), expected, "round {round} user {user}");
                pools_by_user.insert(user, got.pool().to_owned());
            }
        }
        let canaries = pools_by_user.values().filter(|p| *p == "canary").count();
        assert!(canaries > 5 && canaries < 35, "{canaries} of 40 on canary");

        proxy.state.apply_config(
            config::from_toml(
                &config_toml(
                    &[prod.addr],
                    &[canary.addr],
                    "[routing]\nsticky = \"ip\"\ncanary_percent = 50\n",
                ),
                "t",
            )
            .unwrap(),
        );
        let expected = if canarygate::routing::bucket(b"127.0.0.1") < 50 {
            "canary"
        } else {
            "production"
        };
        for _ in 0..20 {
            assert_eq!(get(&c, &proxy.url("/"), &[]).await.pool(), expected);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_inside_a_pool() {
    within(30, async {
        let a = TestBackend::start("prod-a").await;
        let b = TestBackend::start("prod-b").await;
        let proxy = Proxy::start(&config_toml(&[a.addr, b.addr], &[], "")).await;
        let c = client();
        let names: Vec<String> = {
            let mut v = Vec::new();
            for _ in 0..6 {
                v.push(get(&c, &proxy.url("/"), &[]).await.text().to_owned());
            }
            v
        };
        assert_eq!(
            names,
            ["prod-a", "prod-b", "prod-a", "prod-b", "prod-a", "prod-b"]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_both_ways() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;

        // Request path, over raw TCP so the client's headers are exactly these.
        let request = "GET /headers HTTP/1.1\r\n\
            Host: app.example\r\n\
            Connection: close, X-Named-Only\r\n\
            X-Named-Only: secret\r\n\
            Keep-Alive: timeout=5\r\n\
            TE: trailers\r\n\
            Trailer: x-sum\r\n\
            Upgrade: h2c\r\n\
            Proxy-Connection: keep-alive\r\n\
            X-Forwarded-For: 203.0.113.9\r\n\
            X-Forwarded-Proto: https\r\n\
            X-Request-Id: client-id-123\r\n\
            X-End-To-End: yes\r\n\r\n";
        let response = tokio::task::spawn_blocking({
            let addr = proxy.addr;
            move || raw_exchange(addr, request.as_bytes())
        })
        .await
        .unwrap();
        let (head, upstream_saw) = response.split_once("\r\n\r\n").unwrap();
        let upstream_saw = upstream_saw.to_ascii_lowercase();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        for gone in [
            "x-named-only",
            "keep-alive:",
            "te:",
            "trailer:",
            "upgrade:",
            "proxy-connection",
            "connection:",
        ] {
            assert!(
                !upstream_saw.contains(gone),
                "{gone} reached the backend:\n{upstream_saw}"
            );
        }
        for kept in [
            "host: app.example",
            "x-forwarded-for: 203.0.113.9, 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: app.example",
            "x-request-id: client-id-123",
            "x-end-to-end: yes",
        ] {
            assert!(
                upstream_saw.contains(kept),
                "missing `{kept}` upstream:\n{upstream_saw}"
            );
        }
        assert!(
            head.to_ascii_lowercase()
                .contains("x-request-id: client-id-123"),
            "{head}"
        );

        // Response path.
        let c = client();
        let got = get(&c, &proxy.url("/hop"), &[]).await;
        assert_eq!(got.status, 200);
        for gone in ["x-hop-resp", "keep-alive", "trailer", "proxy-connection"] {
            assert!(got.headers.get(gone).is_none(), "{gone} reached the client");
        }
        assert_eq!(got.header("x-end-to-end"), "kept");
        assert_eq!(got.header("x-canarygate-pool"), "production");

        // A request without an id gets a generated one, the same upstream and back.
        let got = get(&c, &proxy.url("/headers"), &[]).await;
        let id = got.header("x-request-id").to_owned();
        assert_eq!(id.len(), 32, "generated id {id}");
        assert!(got.text().contains(&format!("x-request-id: {id}")));
        assert!(
            got.text().contains("x-forwarded-for: 127.0.0.1\n"),
            "{}",
            got.text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_clients_are_served() {
    within(30, async {
        let (prod, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[canary.addr], "")).await;
        let c = h2_client();
        let got = get(&c, &proxy.url("/headers"), &[("x-canary", "always")]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.pool(), "canary");
        // The :authority became a Host header for the HTTP/1.1 backend.
        assert!(
            got.text().contains(&format!("host: {}", proxy.addr)),
            "{}",
            got.text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_gives_502_and_slow_one_504() {
    within(30, async {
        let dead = dead_addr().await;
        let slow = TestBackend::start("slow").await;
        let proxy = Proxy::start(&config_toml(
            &[dead],
            &[slow.addr],
            "[timeouts]\nresponse_header_ms = 300\nconnect_ms = 500\n",
        ))
        .await;
        let c = client();
        let got = get(&c, &proxy.url("/"), &[("x-canary", "never")]).await;
        assert_eq!(got.status, 502);
        assert!(got.text().contains("bad gateway"), "{}", got.text());
        assert_eq!(got.pool(), "production");

        let started = Instant::now();
        let got = get(&c, &proxy.url("/sleep?ms=5000"), &[("x-canary", "always")]).await;
        let took = started.elapsed();
        assert_eq!(got.status, 504);
        assert!(got.text().contains("gateway timeout"));
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );

        // The proxy goes on serving after both.
        let got = get(&c, &proxy.url("/"), &[("x-canary", "always")]).await;
        assert_eq!(got.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_method_is_refused() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let addr = proxy.addr;
        let response = tokio::task::spawn_blocking(move || {
            raw_exchange(addr, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n")
        })
        .await
        .unwrap();
        assert!(response.starts_with("HTTP/1.1 405"), "{response}");
        let c = client();
        assert_eq!(get(&c, &proxy.url("/"), &[]).await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_shutdown_lets_a_slow_request_finish() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let url = proxy.url("/sleep?ms=800");
        let slow = tokio::spawn(async move { get(&client(), &url, &[]).await });
        proxy.wait_in_flight(1).await;
        let addr = proxy.addr;
        proxy.stop().await;
        let got = slow.await.unwrap();
        assert_eq!((got.status.as_u16(), got.text()), (200, "slept"));
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still accepting"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_idle_ms() {
    within(30, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            "[timeouts]\nidle_ms = 300\nclient_header_read_ms = 20000\nresponse_header_ms = 200\n",
        ))
        .await;
        let addr = proxy.addr;
        let (elapsed, response) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            // Half a request, then silence: only the idle timeout can end this.
            let response = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n");
            (started.elapsed(), response)
        })
        .await
        .unwrap();
        assert!(
            elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
            "closed after {elapsed:?}"
        );
        assert!(!response.contains("200 OK"), "{response}");
    })
    .await;
}
