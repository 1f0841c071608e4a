//! `[tracing]`: OpenTelemetry spans to a real OTLP/HTTP receiver (decoded with the
//! official protobuf definitions), the W3C trace context and baggage the backends
//! receive, and what a dead collector costs.

#[path = "support/otlp.rs"]
mod otlp;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use canarygate::routing::PoolKind;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use otlp::Collector;
use support::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(trace: &str, sampled: bool) -> String {
    format!(
        "00-{trace}-{CALLER_SPAN}-{}",
        if sampled { "01" } else { "00" }
    )
}

/// The request headers a test backend's `/headers` saw, by name.
fn seen(got: &Got) -> HashMap<String, String> {
    got.text()
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn tracing_toml(collector: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "[tracing]\notlp_endpoint = \"http://{collector}\"\nsample_ratio = 1.0\n\
         service_name = \"edge\"\nbaggage_flags = [\"theme\"]\n{extra}\n\
         [flags.static]\ntheme = \"blue\"\nsecret_flag = \"on\"\n"
    )
}

#[tokio::test]
async fn a_callers_trace_continues_with_a_client_span_per_attempt_and_reaches_the_backend() {
    within(60, async {
        let collector = Collector::start().await;
        let live = TestBackend::start("production").await;
        let dead = dead_addr().await;
        // Round robin starts at the first backend: the dead one, then a retry.
        let toml = config_toml(
            &[dead, live.addr],
            &[],
            &format!(
                "[routing]\ncanary_percent = 0\n{}",
                tracing_toml(collector.addr, "")
            ),
        );
        let proxy = Proxy::start(&toml).await;
        let client = client();
        let retries = &proxy.state.metrics.pool(PoolKind::Production).retries;
        let mut retried = None;
        for i in 0..10 {
            let trace = format!("{TRACE:.28}{i:04x}");
            let got = get(
                &client,
                &proxy.url("/headers"),
                &[("traceparent", &traceparent(&trace, true))],
            )
            .await;
            assert_eq!(got.status, 200);
            if retries.get() > 0 {
                retried = Some((trace, got));
                break;
            }
        }
        let (trace, got) = retried.expect("a request was retried on the second backend");
        let spans = collector.wait_trace(&trace, 3).await;
        let server: Vec<_> = spans
            .iter()
            .filter(|s| s.span.kind == SpanKind::Server as i32)
            .collect();
        let mut clients: Vec<_> = spans
            .iter()
            .filter(|s| s.span.kind == SpanKind::Client as i32)
            .collect();
        assert_eq!(server.len(), 1, "{spans:#?}");
        assert_eq!(clients.len(), 2, "one client span per attempt: {spans:#?}");
        let server = server[0];
        assert_eq!(server.service, "edge");
        assert_eq!(
            server.parent_id(),
            CALLER_SPAN,
            "the caller's span is the parent"
        );
        assert_eq!(server.span.name, "GET");
        assert_eq!(
            server.attr("canarygate.pool").as_deref(),
            Some("production")
        );
        assert_eq!(server.attr("canarygate.reason").as_deref(), Some("bucket"));
        assert_eq!(
            server.attr("http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(
            server.attr("canarygate.backend"),
            Some(live.addr.to_string())
        );
        assert_eq!(
            server.attr("canarygate.request_id").as_deref(),
            Some(got.header("x-request-id"))
        );
        assert!(
            server
                .attr("canarygate.flags_digest")
                .is_some_and(|d| d.len() == 16)
        );
        assert!(
            server
                .attr("canarygate.instance")
                .is_some_and(|i| !i.is_empty())
        );
        clients.sort_by_key(|c| c.attr("http.request.resend_count"));
        let (first, retry) = (clients[0], clients[1]);
        assert_eq!(first.attr("canarygate.backend"), Some(dead.to_string()));
        assert_eq!(first.attr("error.type").as_deref(), Some("connect"));
        assert_eq!(
            retry.attr("http.request.resend_count").as_deref(),
            Some("1")
        );
        assert_eq!(
            retry.attr("canarygate.backend"),
            Some(live.addr.to_string())
        );
        for c in [first, retry] {
            assert_eq!(c.parent_id(), server.span_id());
        }
        // The backend got the retry's span as its parent, and the version in baggage.
        let headers = seen(&got);
        assert_eq!(
            headers["traceparent"],
            format!("00-{trace}-{}-01", retry.span_id())
        );
        let mut members: Vec<&str> = headers["baggage"].split(',').collect();
        members.sort_unstable();
        assert_eq!(members, ["canarygate.pool=production", "theme=blue"]);
    })
    .await;
}

#[tokio::test]
async fn a_sampled_out_request_exports_nothing_but_still_carries_the_trace() {
    within(60, async {
        let collector = Collector::start().await;
        let (production, canary) = two_pools().await;
        let toml = config_toml(
            &[production.addr],
            &[canary.addr],
            &tracing_toml(collector.addr, "").replace("sample_ratio = 1.0", "sample_ratio = 0.0"),
        );
        let proxy = Proxy::start(&toml).await;
        let client = client();
        let unsampled = format!("{TRACE:.28}aaaa");
        let got = get(
            &client,
            &proxy.url("/headers"),
            &[("traceparent", &traceparent(&unsampled, false))],
        )
        .await;
        let tp = &seen(&got)["traceparent"];
        assert!(
            tp.starts_with(&format!("00-{unsampled}-")) && tp.ends_with("-00"),
            "{tp}"
        );
        // No parent, ratio 0: not sampled either.
        get(&client, &proxy.url("/"), &[]).await;
        // A sampled caller afterwards: once its spans are in, anything queued before
        // would be too (one queue, in order).
        let sampled = format!("{TRACE:.28}bbbb");
        get(
            &client,
            &proxy.url("/"),
            &[("traceparent", &traceparent(&sampled, true))],
        )
        .await;
        collector.wait_trace(&sampled, 2).await;
        let others: Vec<_> = collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id() != sampled)
            .collect();
        assert!(
            others.is_empty(),
            "sampled-out requests exported spans: {others:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_pool_in_baggage_counts_only_from_a_trusted_source() {
    within(60, async {
        let collector = Collector::start().await;
        let (production, canary) = two_pools().await;
        let toml = config_toml(
            &[production.addr],
            &[canary.addr],
            &format!(
                "[routing]\ncanary_percent = 0\nsticky = \"none\"\noverride_trusted = [\"127.0.0.1/32\"]\n{}",
                tracing_toml(collector.addr, "")
            ),
        );
        let proxy = Proxy::start(&toml).await;
        let asks_canary = [("baggage", "canarygate.pool=canary,userId=alice")];
        // An internal service (trusted) keeps its caller's version.
        let trusted = get(&client(), &proxy.url("/headers"), &asks_canary).await;
        assert_eq!(trusted.pool(), "canary");
        assert!(seen(&trusted)["baggage"].contains("canarygate.pool=canary"));
        // Anyone else: ignored, and not passed on to the services behind, however
        // it is spelled or hidden.
        let untrusted_client = client_from([127, 0, 0, 2].into());
        let fillers: Vec<String> = (0..200).map(|i| format!("k{i}=v")).collect();
        let crowd = format!("{},canarygate.pool=canary", fillers.join(","));
        for forged in [
            "canarygate.pool=canary,userId=alice",
            "Canarygate.Pool=canary,userId=alice",
            "canarygate%252Epool=canary,canarygate%2Epool=canary,userId=alice",
            "userId=alice;p=%2Ccanarygate.pool%3Dcanary",
            crowd.as_str(),
        ] {
            let got = get(&untrusted_client, &proxy.url("/headers"), &[("baggage", forged)]).await;
            assert_eq!(got.pool(), "production", "{forged}");
            let baggage = &seen(&got)["baggage"];
            assert!(baggage.starts_with("canarygate.pool=production,theme=blue"), "{baggage}");
            let pools = baggage.to_ascii_lowercase().matches("canarygate").count();
            assert_eq!(pools, 1 + usize::from(forged.contains("%2Ccanarygate")), "{baggage}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_dead_collector_leaves_requests_untouched_and_every_span_is_counted() {
    within(60, async {
        let dead = dead_addr().await;
        let (production, canary) = two_pools().await;
        let toml = config_toml(
            &[production.addr],
            &[canary.addr],
            &tracing_toml(dead, "max_queue = 8"),
        );
        let proxy = Proxy::start(&toml).await;
        let client = client();
        let requests = 20;
        for _ in 0..requests {
            assert_eq!(get(&client, &proxy.url("/"), &[]).await.status, 200);
        }
        // One server and one client span each: every one dropped (queue full, or
        // its batch refused), none lost without a count.
        let trace = &proxy.state.metrics.trace;
        eventually(
            Duration::from_secs(20),
            "every span counted as dropped",
            || async { trace.dropped.get() == 2 * requests },
        )
        .await;
        assert_eq!(trace.exported.get(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_websocket_is_one_span_that_ends_with_the_tunnel() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    within(60, async {
        let collector = Collector::start().await;
        let app = demo_app("production", "v1").await;
        let toml = config_toml(&[app], &[], &tracing_toml(collector.addr, ""));
        let proxy = Proxy::start(&toml).await;
        let trace = format!("{TRACE:.28}cccc");
        let mut request = format!("ws://{}/ws", proxy.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("traceparent", traceparent(&trace, true).parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        assert!(ws.next().await.unwrap().unwrap().is_text());
        // While the tunnel is open, only the attempt's span has ended.
        collector.wait_trace(&trace, 1).await;
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
        drop(ws);
        let spans = collector.wait_trace(&trace, 2).await;
        let server = spans
            .iter()
            .find(|s| s.span.kind == SpanKind::Server as i32)
            .expect("the server span ends with the tunnel");
        assert_eq!(
            server.attr("http.response.status_code").as_deref(),
            Some("101")
        );
        let closed = server
            .span
            .events
            .iter()
            .find(|e| e.name == "tunnel closed")
            .expect("a tunnel closed event");
        assert!(
            closed
                .attributes
                .iter()
                .any(|a| a.key == "canarygate.tunnel.duration_s")
        );
    })
    .await;
}

#[tokio::test]
async fn with_tracing_off_a_clients_canarygate_members_never_reach_the_backend() {
    within(60, async {
        let (production, canary) = two_pools().await;
        let proxy = Proxy::start(&config_toml(&[production.addr], &[canary.addr], "")).await;
        let client = client_from([127, 0, 0, 2].into());
        let got = get(
            &client,
            &proxy.url("/headers"),
            &[
                ("baggage", "userId=alice,canarygate.pool=canary"),
                ("traceparent", &traceparent(TRACE, true)),
            ],
        )
        .await;
        let headers = seen(&got);
        assert_eq!(headers["baggage"], "userId=alice");
        // Nothing else of the trace context is touched while tracing is off.
        assert_eq!(headers["traceparent"], traceparent(TRACE, true));
        let got = get(
            &client,
            &proxy.url("/headers"),
            &[("baggage", "canarygate.pool=canary")],
        )
        .await;
        assert!(!seen(&got).contains_key("baggage"));
        let got = get(&client, &proxy.url("/headers"), &[("baggage", "a=1, b=2")]).await;
        assert_eq!(
            seen(&got)["baggage"],
            "a=1, b=2",
            "passed through untouched"
        );
    })
    .await;
}
