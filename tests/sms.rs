//! SMS commands (issue 20) against a running proxy, a real Redis and real peers: the
//! requests are signed as Twilio signs them (the algorithm itself is checked against
//! Twilio's documented example in `ops::sms::signature`), sent over real sockets to
//! `POST /twilio/sms`, and the TwiML replies are parsed as XML.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use canarygate::ops::sms::signature;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

/// In-process tests cannot set environment variables (`unsafe_code` is forbidden),
/// so the auth token is one cargo sets for every test: `canarygate`.
const TOKEN_ENV: &str = "CARGO_PKG_NAME";
const TOKEN: &str = "canarygate";
const PUBLIC_URL: &str = "https://ops.example.com/twilio/sms";
const ACCOUNT: &str = "AC0123456789";
const ON_CALL: &str = "+14155556789";
const STRANGER: &str = "+19995550000";

/// `[flags]` on `redis` (if any), `[alerts]` with Twilio (to `twilio`, inbound on)
/// and a webhook to `hook`.
fn sms_toml(redis: Option<&str>, twilio: &Peer, hook: &Peer, extra: &str) -> String {
    let flags = redis.map_or_else(String::new, |url| {
        format!("[flags]\nredis_url = \"{url}\"\npoll_ms = 200\n")
    });
    format!(
        "{flags}[alerts]\nretry_base_ms = 50\ntimeout_ms = 1000\n{extra}\n[alerts.twilio]\n\
         account_sid = \"{ACCOUNT}\"\nauth_token_env = \"{TOKEN_ENV}\"\nfrom = \"+15550000000\"\n\
         to = [\"+15551111111\"]\napi_base = \"{}\"\nmin_severity = \"warning\"\n\
         inbound_public_url = \"{PUBLIC_URL}\"\nallowed_numbers = [\"{ON_CALL}\", \"+4915112345678\"]\n\
         [alerts.webhook]\nurl = \"{}/hook\"\n",
        twilio.url(),
        hook.url()
    )
}

static SID: AtomicU64 = AtomicU64::new(1);

/// Twilio's parameters for a message `body` from `from`, with a fresh MessageSid.
fn message(from: &str, body: &str) -> Vec<(String, String)> {
    let sid = format!("SM{:032x}", SID.fetch_add(1, Ordering::Relaxed));
    [
        ("ToCountry", "US"),
        ("SmsMessageSid", sid.as_str()),
        ("NumMedia", "0"),
        ("SmsSid", sid.as_str()),
        ("SmsStatus", "received"),
        ("Body", body),
        ("To", "+15550000000"),
        ("NumSegments", "1"),
        ("MessageSid", sid.as_str()),
        ("AccountSid", ACCOUNT),
        ("From", from),
        ("ApiVersion", "2010-04-01"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            b' ' => "+".to_owned(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

fn form(params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// POSTs `body` to `url` with `signature` (if any) as Twilio would.
async fn post_raw(url: &str, body: String, content_type: &str, signature: Option<&str>) -> Got {
    let mut req = Request::post(url).header("content-type", content_type);
    if let Some(signature) = signature {
        req = req.header("x-twilio-signature", signature);
    }
    let req = req
        .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
        .unwrap();
    send(&client(), req).await
}

/// POSTs `params`, signed with the right token over [`PUBLIC_URL`].
async fn post_signed(url: &str, params: &[(String, String)]) -> Got {
    let signature = signature::sign(TOKEN, PUBLIC_URL, params);
    post_raw(
        url,
        form(params),
        "application/x-www-form-urlencoded",
        Some(&signature),
    )
    .await
}

/// The reply of a 200 TwiML answer, read by an XML parser.
fn reply(got: &Got) -> String {
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("content-type"), "text/xml; charset=utf-8");
    let doc = roxmltree::Document::parse(got.text())
        .unwrap_or_else(|e| panic!("not XML ({e}): {}", got.text()));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "Response");
    let messages: Vec<_> = root
        .children()
        .filter(roxmltree::Node::is_element)
        .collect();
    assert_eq!(messages.len(), 1, "{}", got.text());
    assert_eq!(messages[0].tag_name().name(), "Message");
    messages[0].text().unwrap_or("").to_owned()
}

/// Texts `body` from `from` to the proxy's webhook on its admin listener.
async fn text(proxy: &Proxy, from: &str, body: &str) -> String {
    let url = format!("http://{}/twilio/sms", proxy.admin_addr);
    reply(&post_signed(&url, &message(from, body)).await)
}

fn sms_metric(proxy: &Proxy, command: &str, result: &str) -> u64 {
    proxy
        .state
        .metrics
        .sms_commands
        .with_label_values(&[command, result])
        .get()
}

fn hash(redis: &RedisServer, key: &str) -> HashMap<String, String> {
    let out = redis.cli(&["HGETALL", key]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_owned(), c[1].to_owned()))
        .collect()
}

/// A proxy with both pools, on a real Redis, Twilio inbound on, and its peers.
struct Stack {
    redis: RedisServer,
    twilio: Peer,
    hook: Peer,
    proxy: Proxy,
    _backends: (TestBackend, TestBackend),
}

impl Stack {
    async fn start() -> Self {
        let redis = RedisServer::start();
        let (twilio, hook) = (
            Peer::start(Mode::Created).await,
            Peer::start(Mode::Created).await,
        );
        let backends = two_pools().await;
        // A fleet name: it is in the STATUS reply and in every alert.
        let proxy = Proxy::start(&config_toml(
            &[backends.0.addr],
            &[backends.1.addr],
            &format!(
                "[server]\ninstance_id = \"edge-sms\"\n{}",
                sms_toml(Some(&redis.url()), &twilio, &hook, "")
            ),
        ))
        .await;
        Self {
            redis,
            twilio,
            hook,
            proxy,
            _backends: backends,
        }
    }

    async fn stop(self) {
        self.proxy.stop().await;
    }
}

/// The first alert `hook` received that contains `needle` (waits for it).
async fn heard(hook: &Peer, needle: &str) -> String {
    eventually(Duration::from_secs(10), needle, || async {
        hook.received().iter().any(|r| r.body.contains(needle))
    })
    .await;
    hook.received()
        .into_iter()
        .find(|r| r.body.contains(needle))
        .map(|r| r.body)
        .unwrap_or_default()
}

/// Waits until the proxy applies `canary_percent` `percent` (its `/flags`).
async fn wait_effective(proxy: &Proxy, percent: u64) {
    let url = format!("http://{}/flags", proxy.admin_addr);
    let c = client();
    eventually(Duration::from_secs(10), "the split applied", || async {
        get_json(&c, &url).await["effective_canary_percent"] == percent
    })
    .await;
}

/// The pools `n` requests with distinct sticky keys landed in.
async fn pools(proxy: &Proxy, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut seen = HashMap::new();
    for _ in 0..n {
        // No cookie: each request is a new visitor, bucketed afresh.
        let got = get(&c, &proxy.url("/"), &[]).await;
        *seen.entry(got.pool().to_owned()).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_twilios_signature_is_refused_and_changes_nothing() {
    within(60, async {
        let stack = Stack::start().await;
        let Stack { redis, proxy, .. } = &stack;
        redis.cli(&["HSET", "canarygate:flags", "canary_percent", "40"]);
        wait_effective(proxy, 40).await;
        let url = format!("http://{}/twilio/sms", proxy.admin_addr);
        let params = message(ON_CALL, "ROLLBACK");
        let right = signature::sign(TOKEN, PUBLIC_URL, &params);
        let form_type = "application/x-www-form-urlencoded";
        let mut tampered = params.clone();
        tampered[5].1 = "CANARY 100".to_owned();
        let mut other_account = message(ON_CALL, "ROLLBACK");
        other_account[9].1 = "AC999".to_owned();
        let other_account_signed = signature::sign(TOKEN, PUBLIC_URL, &other_account);
        let forbidden = [
            (form(&params), None),
            (form(&params), Some("not base64!".to_owned())),
            (
                form(&params),
                Some(signature::sign("wrong-token", PUBLIC_URL, &params)),
            ),
            (
                form(&params),
                Some(signature::sign(
                    TOKEN,
                    "https://ops.example.com/other",
                    &params,
                )),
            ),
            // Signed, then changed on the way.
            (form(&tampered), Some(right.clone())),
            (form(&other_account), Some(other_account_signed)),
        ];
        for (body, signature) in forbidden {
            let got = post_raw(&url, body, form_type, signature.as_deref()).await;
            assert_eq!(got.status, 403, "{signature:?}: {}", got.text());
        }
        assert_eq!(sms_metric(proxy, "none", "bad_signature"), 6);

        let bad_requests = [
            ("Body=%zz&From=x".to_owned(), form_type),
            (
                format!("{}&Pad={}", form(&params), "x".repeat(17 * 1024)),
                form_type,
            ),
            (form(&params), "application/json"),
        ];
        for (body, content_type) in bad_requests {
            let got = post_raw(&url, body, content_type, Some(&right)).await;
            assert_eq!(got.status, 400, "{}", got.text());
        }
        assert_eq!(sms_metric(proxy, "none", "malformed"), 3);
        let got = get(&client(), &url, &[]).await;
        assert_eq!((got.status.as_u16(), got.header("allow")), (405, "POST"));

        // Nothing moved: the split, Redis, the analysis record; the proxy serves on.
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "40"
        );
        assert!(hash(redis, "canarygate:analysis").is_empty());
        assert_eq!(sms_metric(proxy, "rollback", "ok"), 0);
        let split = pools(proxy, 40).await;
        assert!(split.get("canary").copied().unwrap_or(0) > 0, "{split:?}");
        // The genuine request still works afterwards.
        let got = post_raw(&url, form(&params), form_type, Some(&right)).await;
        assert!(reply(&got).starts_with("Rolled back"), "{}", got.text());
        stack.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_by_sms_moves_every_request_to_production_and_tells_the_team() {
    within(60, async {
        let stack = Stack::start().await;
        let Stack {
            redis,
            twilio,
            hook,
            proxy,
            ..
        } = &stack;
        redis.cli(&[
            "HSET",
            "canarygate:flags",
            "canary_percent",
            "50",
            "canary_auto",
            "on",
        ]);
        wait_effective(proxy, 50).await;
        let before = pools(proxy, 60).await;
        assert!(
            before.get("canary").copied().unwrap_or(0) > 10,
            "{before:?}"
        );

        let answer = text(proxy, ON_CALL, "  rollback ").await;
        assert!(
            answer.starts_with("Rolled back: canary_percent 0 on every proxy"),
            "{answer}"
        );
        let flags = hash(redis, "canarygate:flags");
        assert_eq!(flags["canary_percent"], "0");
        assert_eq!(flags["canary_auto"], "off");
        let record = hash(redis, "canarygate:analysis");
        assert_eq!(record["state"], "rolled_back");
        assert_eq!(record["reason"], "canary rolled back by SMS from +1...6789");
        wait_effective(proxy, 0).await;
        assert_eq!(
            pools(proxy, 60).await,
            HashMap::from([("production".to_owned(), 60)])
        );

        // The audit: the other channels hear of it (the sender has the reply), an
        // event, the counter.
        let audit = heard(hook, "canary rolled back by SMS from +1...6789").await;
        assert!(audit.contains("\"kind\":\"sms_command\""), "{audit}");
        assert!(audit.contains("\"instance\":\"edge-sms\""), "{audit}");
        assert_eq!(sms_metric(proxy, "rollback", "ok"), 1);
        let events = get_json(&client(), &format!("http://{}/events", proxy.admin_addr)).await;
        assert!(
            events.to_string().contains("rollback from +1...6789: ok"),
            "{events}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sms = twilio.received();
        assert!(
            !sms.iter().any(|r| r.body.contains("sms_command")),
            "no SMS for the audit"
        );
        stack.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_percent_and_the_kill_switch_by_sms() {
    within(60, async {
        let stack = Stack::start().await;
        let Stack { redis, proxy, .. } = &stack;
        let answer = text(proxy, ON_CALL, "Canary 50").await;
        assert_eq!(
            answer,
            "canary_percent 50 on every proxy (Redis) (canary_auto off)."
        );
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "50"
        );
        assert_eq!(hash(redis, "canarygate:analysis")["state"], "manual");
        wait_effective(proxy, 50).await;

        let answer = text(proxy, ON_CALL, "CANARY OFF").await;
        assert_eq!(
            answer,
            "Canary off on every proxy (Redis) (canary_auto off)."
        );
        assert_eq!(redis.cli(&["HGET", "canarygate:flags", "canary"]), "off");
        wait_effective(proxy, 0).await;
        assert_eq!(
            pools(proxy, 30).await,
            HashMap::from([("production".to_owned(), 30)])
        );
        let answer = text(proxy, "+4915112345678", "canary 20").await;
        assert!(
            answer.ends_with("The kill switch is off: no canary traffic until CANARY ON."),
            "{answer}"
        );
        assert!(
            text(proxy, ON_CALL, "canary on")
                .await
                .starts_with("Canary on")
        );
        wait_effective(proxy, 20).await;

        // A bad value changes nothing and says what is accepted.
        let answer = text(proxy, ON_CALL, "CANARY 150").await;
        assert!(answer.starts_with("CANARY takes 0 to 100, ON or OFF (not 150). Commands: STATUS"));
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "20"
        );
        assert_eq!(sms_metric(proxy, "canary_percent", "ok"), 2);
        assert_eq!(sms_metric(proxy, "canary_off", "ok"), 1);
        assert_eq!(sms_metric(proxy, "canary_on", "ok"), 1);
        assert_eq!(sms_metric(proxy, "canary_percent", "invalid"), 1);
        stack.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_with_the_split_both_pools_the_analysis_and_the_flags() {
    within(60, async {
        let stack = Stack::start().await;
        let Stack { redis, proxy, .. } = &stack;
        redis.cli(&[
            "HSET",
            "canarygate:flags",
            "new_checkout",
            "on",
            "theme",
            "dark",
        ]);
        let c = client();
        eventually(Duration::from_secs(10), "flags applied", || async {
            get_json(&c, &format!("http://{}/flags", proxy.admin_addr)).await["flags"]["theme"]
                == "dark"
        })
        .await;
        pools(proxy, 30).await;
        let status = text(proxy, ON_CALL, "status").await;
        let lines: Vec<&str> = status.lines().collect();
        assert_eq!(lines.len(), 6, "{status}");
        assert_eq!(lines[0], "canarygate edge-sms");
        assert_eq!(lines[1], "split: canary 33% (config 33%, canary on)");
        assert!(lines[2].starts_with("production: "), "{status}");
        assert!(lines[3].starts_with("canary: "), "{status}");
        for line in &lines[2..4] {
            assert!(line.contains("req/s, 5xx 0.00%, p99 "), "{status}");
        }
        assert!(lines[3].contains(" (last "), "{status}");
        assert_eq!(lines[4], "analysis: off");
        assert!(lines[5].starts_with("flags v"), "{status}");
        assert!(
            lines[5].ends_with(": new_checkout=on theme=dark"),
            "{status}"
        );
        assert_eq!(sms_metric(proxy, "status", "ok"), 1);
        // Anything else: the list of commands.
        let help = text(proxy, ON_CALL, "what now?").await;
        assert_eq!(
            help,
            "unknown command: what now?. Commands: STATUS | ROLLBACK | CANARY <0-100> | \
             CANARY ON | CANARY OFF | ACK <alert id>"
        );
        stack.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_not_allowed_is_refused_politely_and_the_team_is_told() {
    within(60, async {
        let stack = Stack::start().await;
        let Stack {
            redis, hook, proxy, ..
        } = &stack;
        redis.cli(&["HSET", "canarygate:flags", "canary_percent", "30"]);
        wait_effective(proxy, 30).await;
        let answer = text(proxy, STRANGER, "ROLLBACK").await;
        assert!(answer.starts_with("Sorry: this number may not command canarygate."));
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "30"
        );
        heard(
            hook,
            "SMS command refused from +1...0000 (not in allowed_numbers)",
        )
        .await;
        assert_eq!(sms_metric(proxy, "rollback", "refused"), 1);
        assert_eq!(sms_metric(proxy, "rollback", "ok"), 0);
        stack.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_stops_the_repeats_of_a_firing_alert() {
    within(60, async {
        let (twilio, hook) = (
            Peer::start(Mode::Created).await,
            Peer::start(Mode::Created).await,
        );
        let prod = TestBackend::start("production").await;
        let dir = TempDir::new("sms-ack");
        // Any disk is past 1%: disk_full fires every round; repeats every 300 ms.
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            &format!(
                "[resources]\ninterval_ms = 100\nsustain_ms = 100\ndisk_percent = 1\n\
                 disk_paths = [\"{}\"]\n{}",
                dir.0.display(),
                sms_toml(None, &twilio, &hook, "repeat_ms = 300")
            ),
        ))
        .await;
        let disk_alerts = |hook: &Peer| -> Vec<serde_json::Value> {
            hook.received()
                .iter()
                .map(|r| serde_json::from_str::<serde_json::Value>(&r.body).unwrap())
                .filter(|a| a["kind"] == "disk_full")
                .collect()
        };
        eventually(Duration::from_secs(15), "the alert repeated", || async {
            disk_alerts(&hook).len() >= 2
        })
        .await;
        let id = disk_alerts(&hook)[0]["id"].as_str().unwrap().to_owned();
        // The SMS carries the id and the hint.
        let sms = twilio.wait_for(1, "the alert SMS").await;
        let body = sms
            .iter()
            .map(|r| decode_form_value(&r.body, "Body"))
            .find(|b| b.contains("disk_full"))
            .expect("an SMS for disk_full");
        assert!(
            body.contains(&format!("(id {id}; reply ACK {id} or ROLLBACK)")),
            "{body}"
        );

        let unknown = text(&proxy, ON_CALL, "ACK zzzzzz").await;
        assert!(
            unknown.starts_with("No firing alert zzzzzz on "),
            "{unknown}"
        );
        let answer = text(&proxy, ON_CALL, &format!("ack {}", id.to_uppercase())).await;
        assert!(
            answer.starts_with(&format!("Acknowledged {id} (disk_full: disk of ")),
            "{answer}"
        );
        let acked_at = disk_alerts(&hook).len();
        // Five repeat periods later: no more repeats (still firing).
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let after: Vec<_> = disk_alerts(&hook);
        assert!(
            after.len() <= acked_at + 1,
            "{} then {}",
            acked_at,
            after.len()
        );
        assert!(after.iter().all(|a| a["id"] == id.as_str()));
        let firing = get_json(&client(), &format!("http://{}/events", proxy.admin_addr)).await;
        assert!(
            firing.to_string().contains("ack from +1...6789: ok"),
            "{firing}"
        );
        let audit: Vec<_> = hook
            .received()
            .into_iter()
            .filter(|r| r.body.contains("acknowledged by SMS from +1...6789"))
            .collect();
        assert_eq!(audit.len(), 1);
        assert_eq!(sms_metric(&proxy, "ack", "ok"), 1);
        assert_eq!(sms_metric(&proxy, "ack", "invalid"), 1);
        proxy.stop().await;
    })
    .await;
}

/// The value of `name` in a form body.
fn decode_form_value(body: &str, name: &str) -> String {
    let params = canarygate::ops::sms::command::parse_form(body.as_bytes()).unwrap();
    params
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_message_sid_acts_once_on_any_proxy() {
    within(60, async {
        let redis = RedisServer::start();
        let (twilio, hook) = (
            Peer::start(Mode::Created).await,
            Peer::start(Mode::Created).await,
        );
        let (prod, canary) = two_pools().await;
        let toml = config_toml(
            &[prod.addr],
            &[canary.addr],
            &sms_toml(Some(&redis.url()), &twilio, &hook, ""),
        );
        let (first, second) = (Proxy::start(&toml).await, Proxy::start(&toml).await);
        let params = message(ON_CALL, "CANARY 30");
        let to = |p: &Proxy| format!("http://{}/twilio/sms", p.admin_addr);
        let answer = reply(&post_signed(&to(&first), &params).await);
        assert!(answer.starts_with("canary_percent 30"), "{answer}");
        // An operator moves on by hand; then the same message comes again, to the
        // same proxy and to another one.
        redis.cli(&["HSET", "canarygate:flags", "canary_percent", "10"]);
        for proxy in [&first, &second] {
            let again = reply(&post_signed(&to(proxy), &params).await);
            assert_eq!(again, answer);
        }
        assert_eq!(
            redis.cli(&["HGET", "canarygate:flags", "canary_percent"]),
            "10"
        );
        assert_eq!(sms_metric(&first, "canary_percent", "ok"), 1);
        assert_eq!(sms_metric(&first, "canary_percent", "replayed"), 1);
        assert_eq!(sms_metric(&second, "canary_percent", "replayed"), 1);
        assert_eq!(sms_metric(&second, "canary_percent", "ok"), 0);
        let remembered = redis.cli(&["TTL", &format!("canarygate:sms:{}", params[8].1)]);
        assert!(remembered.parse::<u64>().unwrap() > 86_000, "{remembered}");
        first.stop().await;
        second.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_comes_back_as_valid_twiml() {
    within(30, async {
        let (twilio, hook) = (Peer::start(Mode::Created).await, Peer::start(Mode::Created).await);
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            &sms_toml(None, &twilio, &hook, ""),
        ))
        .await;
        let hostile = "</Message><Message>pwned</Message> &amp; \"'\u{1}\u{0}]]><!--";
        let answer = text(&proxy, ON_CALL, hostile).await;
        assert_eq!(
            answer,
            format!(
                "unknown command: </Message><Message>pwned</Message> &amp; \"'\u{fffd}\u{fffd}]]><!--. \
                 Commands: STATUS | ROLLBACK | CANARY <0-100> | CANARY ON | CANARY OFF | \
                 ACK <alert id>"
            )
        );
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_listen_serves_the_webhook_alone_and_without_redis_acts_locally() {
    within(30, async {
        let (twilio, hook) = (
            Peer::start(Mode::Created).await,
            Peer::start(Mode::Created).await,
        );
        let (prod, canary) = two_pools().await;
        let port = free_port();
        let toml = sms_toml(None, &twilio, &hook, "").replace(
            "[alerts.webhook]",
            &format!("inbound_listen = \"127.0.0.1:{port}\"\n[alerts.webhook]"),
        );
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[canary.addr], &toml)).await;
        wait_port(port).await;
        let inbound = format!("http://127.0.0.1:{port}");
        let answer = reply(
            &post_signed(
                &format!("{inbound}/twilio/sms"),
                &message(ON_CALL, "rollback"),
            )
            .await,
        );
        assert!(
            answer.starts_with("Rolled back: canary_percent 0 on this proxy (no Redis configured)"),
            "{answer}"
        );
        wait_effective(&proxy, 0).await;
        let c = client();
        for path in ["/metrics", "/flags", "/"] {
            assert_eq!(
                get(&c, &format!("{inbound}{path}"), &[]).await.status,
                404,
                "{path}"
            );
        }
        // The admin listener no longer takes it.
        let on_admin = post_signed(
            &format!("http://{}/twilio/sms", proxy.admin_addr),
            &message(ON_CALL, "status"),
        )
        .await;
        assert_eq!(on_admin.status, 404);
        proxy.stop().await;
    })
    .await;
}

#[test]
fn the_inbound_keys_are_checked_at_load() {
    let base = "[pools.production]\nbackends = [\"127.0.0.1:9\"]\n[alerts.twilio]\n\
                account_sid = \"AC1\"\nauth_token_env = \"CARGO_PKG_NAME\"\nfrom = \"+15550000000\"\n\
                to = [\"+15551111111\"]\n";
    for (extra, key, message) in [
        (
            "inbound_public_url = \"https://ops.example.com/twilio/sms\"\n",
            "alerts.twilio.allowed_numbers",
            "needs at least one number when inbound_public_url is set",
        ),
        (
            "inbound_public_url = \"ops.example.com\"\nallowed_numbers = [\"+14155556789\"]\n",
            "alerts.twilio.inbound_public_url",
            "must start with http:// or https://",
        ),
        (
            "inbound_public_url = \"https://ops.example.com/twilio/sms\"\nallowed_numbers = [\"0415 555 6789\"]\n",
            "alerts.twilio.allowed_numbers",
            "\"0415 555 6789\" is not an E.164 number",
        ),
        (
            "inbound_listen = \"127.0.0.1:9093\"\n",
            "alerts.twilio.inbound_listen",
            "needs inbound_public_url",
        ),
    ] {
        let error = canarygate::config::from_toml(&format!("{base}{extra}"), "sms.toml")
            .expect_err(extra)
            .to_string();
        assert!(error.contains(&format!("key `{key}`")), "{error}");
        assert!(error.contains(message), "{error}");
    }
}

/// The body of every alert `hook` received that contains `needle`.
fn all_heard(hook: &Peer, needle: &str) -> Vec<String> {
    hook.received()
        .into_iter()
        .filter(|r| r.body.contains(needle))
        .map(|r| r.body)
        .collect()
}

/// The `<Message>` of a TwiML answer, or `None` for a `<Response/>` that sends nothing.
fn maybe_reply(got: &Got) -> Option<String> {
    assert_eq!(got.status, 200, "{}", got.text());
    let doc = roxmltree::Document::parse(got.text()).unwrap();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "Response");
    root.children()
        .find(roxmltree::Node::is_element)
        .map(|m| m.text().unwrap_or("").to_owned())
}

/// Issue 29 item 4: texts from numbers not allowed are told to the team once per
/// sender per `repeat_ms` (the rest counted), their replies capped, and the
/// stranger's text quoted cut and with its control characters escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_flooding_texts_is_told_once_and_its_replies_are_capped() {
    within(90, async {
        let stack = Stack::start().await;
        let Stack { hook, proxy, .. } = &stack;
        let url = format!("http://{}/twilio/sms", proxy.admin_addr);
        let hostile = format!(
            "ROLLBACK\n2026-01-01 INFO forged line\u{1b}[31m {} TAIL",
            "x".repeat(400)
        );
        let first = message(STRANGER, &hostile);
        let mut replies = vec![maybe_reply(&post_signed(&url, &first).await)];
        for _ in 1..30 {
            replies.push(maybe_reply(
                &post_signed(&url, &message(STRANGER, &hostile)).await,
            ));
        }
        assert!(replies[0].as_deref().unwrap().starts_with("Sorry"));
        assert!(replies[1..].iter().all(Option::is_none), "{replies:?}");
        // Many other numbers: each told once, replies capped per hour over all.
        let others = 15;
        let mut answered = 1;
        for n in 0..others {
            let from = format!("+1888555{:04}", n + 1);
            answered += usize::from(
                maybe_reply(&post_signed(&url, &message(&from, "HELP")).await).is_some(),
            );
        }
        assert_eq!(answered, canarygate::ops::sms::REFUSED_REPLIES_PER_HOUR);
        // Everything queued before this audit has been delivered once it is heard.
        text(proxy, ON_CALL, "ROLLBACK").await;
        heard(hook, "canary rolled back by SMS").await;
        let notices = all_heard(hook, "SMS command refused from +1...0000");
        assert_eq!(notices.len(), 1, "{notices:?}");
        let notice = &notices[0];
        // Escaped in the quote (in JSON, the two characters `\` `n` read `\\n`), cut.
        assert!(
            notice.contains(r"ROLLBACK\\n2026-01-01 INFO forged line\\u{1b}[31m"),
            "{notice}"
        );
        assert!(!notice.contains("TAIL"), "{notice}");
        assert_eq!(
            all_heard(hook, "SMS command refused from").len(),
            1 + others
        );
        let withheld = |what| {
            proxy
                .state
                .metrics
                .sms_refusals_withheld
                .with_label_values(&[what])
                .get()
        };
        assert_eq!(withheld("notice"), 29);
        assert_eq!(
            withheld("reply"),
            (30 + others - canarygate::ops::sms::REFUSED_REPLIES_PER_HOUR) as u64
        );
        assert_eq!(sms_metric(proxy, "help", "refused"), 30 + others as u64);
        // Twilio retrying the first message: no second reply to a refused number.
        assert_eq!(maybe_reply(&post_signed(&url, &first).await), None);
        stack.stop().await;
    })
    .await;
}
