//! Alerts (issue 15) against real peers on loopback: a server speaking the Twilio
//! Messages API's shape, a webhook receiver, an SMTP server (aiosmtpd), an
//! Alertmanager. (The resource watch is in `resources.rs`.)

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canarygate::observe::events::Events;
use canarygate::observe::metrics::Metrics;
use canarygate::ops::alerts::{AlertsConfig, Dispatcher, Severity};
use support::*;
use tokio_util::sync::CancellationToken;

/// Form fields of a URL-encoded body.
fn form(body: &str) -> HashMap<String, String> {
    url_decode_pairs(body)
}

fn url_decode_pairs(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((decode(k), decode(v)))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// `[alerts]` from TOML (the env variables it names must be set by the caller).
fn alerts_config(toml: &str) -> AlertsConfig {
    let full = format!("[pools.production]\nbackends = [\"127.0.0.1:9\"]\n{toml}");
    canarygate::config::from_toml(&full, "alerts.toml")
        .expect("valid alerts config")
        .alerts
}

/// A dispatcher with its channel tasks running until the token is cancelled.
fn dispatcher(config: &AlertsConfig) -> (Dispatcher, Arc<Metrics>, Arc<Events>, CancellationToken) {
    let metrics = Arc::new(Metrics::new());
    let events = Arc::new(Events::default());
    let (dispatcher, tasks) = Dispatcher::new(
        config,
        "test-host:8080",
        metrics.alerts.clone(),
        Arc::clone(&events),
    )
    .unwrap();
    let cancel = CancellationToken::new();
    for task in tasks {
        tokio::spawn(task.run(cancel.clone()));
    }
    (dispatcher, metrics, events, cancel)
}

fn counted(metrics: &Metrics, channel: &str, result: &str) -> u64 {
    metrics.alerts.with_label_values(&[channel, result]).get()
}

/// In-process tests cannot set environment variables (`unsafe_code` is forbidden),
/// so the secret is one cargo sets for every test: the token is `canarygate`.
const TOKEN_ENV: &str = "CARGO_PKG_NAME";
const TOKEN: &str = "canarygate";

fn twilio_toml(api_base: &str, extra: &str) -> String {
    format!(
        "[alerts]\nretry_base_ms = 50\ntimeout_ms = 500\n{extra}\n[alerts.twilio]\naccount_sid = \"AC0123456789\"\n\
         auth_token_env = \"{TOKEN_ENV}\"\nfrom = \"+15550000000\"\nto = [\"+15551111111\", \"+15552222222\"]\n\
         api_base = \"{api_base}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_gets_one_form_post_per_recipient_with_basic_auth() {
    within(30, async {
        let twilio = Peer::start(Mode::Created).await;
        let config = alerts_config(&twilio_toml(&twilio.url(), ""));
        let (alerts, metrics, _, cancel) = dispatcher(&config);
        alerts.fire(
            Severity::Critical,
            "cpu_spike",
            "host CPU 97% for 30 s",
            "top by CPU: 4242 burner",
        );
        let got = twilio.wait_for(2, "two messages").await;
        let expected_auth = format!(
            "Basic {}",
            base64_encode(format!("AC0123456789:{TOKEN}").as_bytes())
        );
        let mut recipients = Vec::new();
        for message in &got {
            assert_eq!(
                message.path,
                "/2010-04-01/Accounts/AC0123456789/Messages.json"
            );
            assert_eq!(message.authorization, expected_auth);
            assert_eq!(message.content_type, "application/x-www-form-urlencoded");
            let fields = form(&message.body);
            assert_eq!(fields["From"], "+15550000000");
            assert!(
                fields["Body"].starts_with("[canarygate] CRITICAL cpu_spike on "),
                "{fields:?}"
            );
            assert!(fields["Body"].contains("host CPU 97% for 30 s"));
            assert!(fields["Body"].chars().count() <= 1600);
            recipients.push(fields["To"].clone());
        }
        recipients.sort();
        assert_eq!(recipients, ["+15551111111", "+15552222222"]);
        eventually(Duration::from_secs(5), "counted as sent", || async {
            counted(&metrics, "twilio", "sent") == 1
        })
        .await;
        // Below the channel's min_severity (critical by default): not sent.
        alerts.fire(Severity::Warning, "memory_spike", "memory 95%", "");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(twilio.received().len(), 2);
        cancel.cancel();
    })
    .await;
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hanging_channel_is_retried_counted_and_holds_up_nobody() {
    within(60, async {
        // Twilio answering 500 with its error JSON: three tries, then one failure.
        let failing = Peer::start(Mode::TwilioError).await;
        let config = alerts_config(&twilio_toml(&failing.url(), ""));
        let (alerts, metrics, _, cancel) = dispatcher(&config);
        alerts.fire(
            Severity::Critical,
            "canary_rollback",
            "canary rolled back",
            "",
        );
        eventually(Duration::from_secs(10), "counted as failed", || async {
            counted(&metrics, "twilio", "failed") == 1
        })
        .await;
        let tries = failing.received();
        assert_eq!(
            tries.len(),
            3,
            "one POST per try (the first recipient fails)"
        );
        // Doubling delays from retry_base_ms (50 ms): at least 50 + 100 ms in all.
        assert!(tries[2].at - tries[0].at >= Duration::from_millis(150));
        cancel.cancel();

        // A Twilio that never answers, beside a working webhook: the webhook gets
        // every alert at once, and a proxy in the same process serves as usual.
        let hanging = Peer::start(Mode::Hang).await;
        let hook = Peer::start(Mode::Created).await;
        let config = alerts_config(&format!(
            "{}[alerts.webhook]\nurl = \"{}/hook\"\nmin_severity = \"info\"\n",
            twilio_toml(&hanging.url(), ""),
            hook.url()
        ));
        let (alerts, metrics, _, cancel) = dispatcher(&config);
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let c = client();
        for round in 0..2 {
            let started = Instant::now();
            for i in 0..40 {
                alerts.fire(
                    Severity::Critical,
                    &format!("kind_{round}_{i}"),
                    "burst",
                    "",
                );
            }
            assert!(
                started.elapsed() < Duration::from_millis(50),
                "firing never waits"
            );
            hook.wait_for(40 * (round + 1), "the webhook got every alert")
                .await;
        }
        for _ in 0..20 {
            let t = Instant::now();
            assert_eq!(get(&c, &proxy.url("/"), &[]).await.status, 200);
            assert!(
                t.elapsed() < Duration::from_millis(200),
                "{:?}",
                t.elapsed()
            );
        }
        // The hanging channel holds one in its send and 64 queued; the oldest of the
        // rest were dropped and counted.
        assert_eq!(counted(&metrics, "twilio", "dropped"), 80 - 1 - 64);
        // Each try times out (timeout_ms 500): after three, a counted failure.
        eventually(
            Duration::from_secs(10),
            "the hanging send counted as failed",
            || async { counted(&metrics, "twilio", "failed") >= 1 },
        )
        .await;
        cancel.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_the_structured_alert_and_noise_is_controlled() {
    within(60, async {
        let hook = Peer::start(Mode::Created).await;
        let config = alerts_config(&format!(
            "[alerts]\nrepeat_ms = 700\nretry_base_ms = 50\n[alerts.webhook]\nurl = \"{}/hook\"\n\
             headers = {{ \"X-Token\" = \"abc\" }}\n",
            hook.url()
        ));
        let (alerts, metrics, events, cancel) = dispatcher(&config);
        alerts.fire(
            Severity::Warning,
            "memory_spike",
            "host memory 93%",
            "top by memory: ...",
        );
        // Still firing, before repeat_ms: nothing more.
        alerts.fire(Severity::Warning, "memory_spike", "host memory 94%", "");
        let got = hook.wait_for(1, "the first alert").await;
        let first: serde_json::Value = serde_json::from_str(&got[0].body).unwrap();
        assert_eq!(got[0].content_type, "application/json");
        assert_eq!(first["state"], "firing");
        assert_eq!(first["severity"], "warning");
        assert_eq!(first["kind"], "memory_spike");
        assert_eq!(first["summary"], "host memory 93%");
        assert_eq!(first["instance"], "test-host:8080");
        assert!(
            first["text"]
                .as_str()
                .unwrap()
                .contains("[canarygate] WARNING memory_spike")
        );
        let id = first["id"].as_str().unwrap().to_owned();
        assert_eq!(id.len(), 6);
        assert!(
            events
                .firing()
                .iter()
                .any(|l| l.contains("memory_spike") && l.contains(&id))
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            hook.received().len(),
            1,
            "a repeat before repeat_ms is not sent"
        );

        // After repeat_ms, once more, with the episode's id.
        tokio::time::sleep(Duration::from_millis(500)).await;
        alerts.fire(Severity::Warning, "memory_spike", "host memory 95%", "");
        let got = hook.wait_for(2, "the repeat").await;
        let repeat: serde_json::Value = serde_json::from_str(&got[1].body).unwrap();
        assert_eq!(
            (repeat["id"].as_str(), repeat["summary"].as_str()),
            (Some(id.as_str()), Some("host memory 95%"))
        );

        // Resolved once, then nothing for a kind that is not firing.
        alerts.resolve("memory_spike", "host memory 60%, back under 90%");
        alerts.resolve("memory_spike", "again");
        alerts.resolve("never_fired", "nothing");
        let got = hook.wait_for(3, "the resolved message").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(hook.received().len(), 3);
        let resolved: serde_json::Value = serde_json::from_str(&got[2].body).unwrap();
        assert_eq!(resolved["state"], "resolved");
        assert_eq!(resolved["id"].as_str(), Some(id.as_str()));
        assert!(events.firing().is_empty());
        // Counted once the answer reached the sender (after the peer recorded it).
        eventually(Duration::from_secs(5), "three counted as sent", || async {
            counted(&metrics, "webhook", "sent") == 3
        })
        .await;
        cancel.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sms_cap_suppresses_and_counts() {
    within(30, async {
        let twilio = Peer::start(Mode::Created).await;
        let config = alerts_config(&twilio_toml(&twilio.url(), "sms_max_per_hour = 2"));
        let (alerts, metrics, _, cancel) = dispatcher(&config);
        for kind in ["a", "b", "c", "d"] {
            alerts.fire(Severity::Critical, kind, "spike", "");
        }
        eventually(
            Duration::from_secs(10),
            "two sent, two suppressed",
            || async {
                counted(&metrics, "twilio", "sent") == 2
                    && counted(&metrics, "twilio", "suppressed") == 2
            },
        )
        .await;
        // Two alerts to two recipients each; the suppressed ones sent nothing.
        assert_eq!(twilio.received().len(), 4);
        cancel.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_unset_secret_variable_and_exits_64() {
    within(30, async {
        let dir = TempDir::new("alerts-check");
        let path = dir.write(
            "bad.toml",
            "[pools.production]\nbackends = [\"127.0.0.1:9\"]\n\n[alerts.twilio]\naccount_sid = \"AC1\"\n\
             auth_token_env = \"CANARYGATE_TEST_UNSET_TOKEN\"\nfrom = \"+1555\"\nto = [\"+1556\"]\n",
        );
        let out = std::process::Command::new(binary())
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("CANARYGATE_TEST_UNSET_TOKEN")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("bad.toml:6: key `alerts.twilio.auth_token_env`")
                && stderr.contains("CANARYGATE_TEST_UNSET_TOKEN is not set"),
            "{stderr}"
        );
        // Set, the same file is fine.
        let out = std::process::Command::new(binary())
            .args(["check", "--config"])
            .arg(&path)
            .env("CANARYGATE_TEST_UNSET_TOKEN", "x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_test_reports_each_channel_and_fails_if_one_does() {
    within(60, async {
        let failing = Peer::start(Mode::TwilioError).await;
        let hook = Peer::start(Mode::Created).await;
        let dir = TempDir::new("alert-test");
        let webhook = format!(
            "[alerts.webhook]\nurl = \"{}/hook\"\nmin_severity = \"critical\"\n",
            hook.url()
        );
        let both = dir.write(
            "both.toml",
            &format!(
                "[pools.production]\nbackends = [\"127.0.0.1:9\"]\n{}{webhook}",
                twilio_toml(&failing.url(), "").replace(TOKEN_ENV, "CANARYGATE_TEST_TOKEN")
            ),
        );
        let run = |path: std::path::PathBuf| {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(binary())
                    .args(["alert-test", "--config"])
                    .arg(path)
                    .env("CANARYGATE_TEST_TOKEN", "secret")
                    .output()
                    .unwrap()
            })
        };
        let out = run(both).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(
            stdout.contains("twilio: error: Twilio error 20500: Internal Server Error (HTTP 500)"),
            "{stdout}"
        );
        assert!(stdout.contains("webhook: ok"), "{stdout}");
        // An info alert went out although the webhook's min_severity is critical.
        let got = hook.wait_for(1, "the test alert").await;
        let alert: serde_json::Value = serde_json::from_str(&got[0].body).unwrap();
        assert_eq!(
            (alert["severity"].as_str(), alert["kind"].as_str()),
            (Some("info"), Some("alert_test"))
        );

        let only_webhook = dir.write(
            "webhook.toml",
            &format!("[pools.production]\nbackends = [\"127.0.0.1:9\"]\n{webhook}"),
        );
        let out = run(only_webhook).await.unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "webhook: ok\n");
    })
    .await;
}

/// A secret a webhook URL carries in its path (as chat webhooks do), and a Redis
/// password: neither may appear in any output, error or log.
const PATH_SECRET: &str = "T0SECRET/B0SECRET/xyzzy";
const REDIS_PASSWORD: &str = "hunter2-redis";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_url_from_the_environment_is_used_and_never_printed() {
    within(60, async {
        let hook = Peer::start(Mode::Created).await;
        let dir = TempDir::new("url-env");
        let path = dir.write(
            "hook.toml",
            "[pools.production]\nbackends = [\"127.0.0.1:9\"]\n\
             [alerts.webhook]\nurl_env = \"CANARYGATE_TEST_HOOK_URL\"\n",
        );
        let run = |url: String| {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(binary())
                    .args(["alert-test", "--config"])
                    .arg(path)
                    .env("CANARYGATE_TEST_HOOK_URL", url)
                    .output()
                    .unwrap()
            })
        };
        // The URL from the environment is where the alert goes.
        let out = run(format!("{}/hook/{PATH_SECRET}", hook.url()))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "webhook: ok\n");
        hook.wait_for(1, "the test alert").await;
        // Nobody answers there: the error says so without the URL.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let out = run(format!("http://127.0.0.1:{port}/services/{PATH_SECRET}"))
            .await
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{all}");
        assert!(all.contains("webhook: error: request failed"), "{all}");
        assert!(!all.contains("SECRET"), "{all}");
        // A variable that does not hold a URL is named, its value is not.
        let out = run(format!("ftp://{PATH_SECRET}")).await.unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            all.contains("CANARYGATE_TEST_HOOK_URL does not hold an http:// or https:// URL"),
            "{all}"
        );
        assert!(!all.contains("SECRET"), "{all}");
        // Both `url` and `url_env`: a config error naming the key.
        let both = dir.write(
            "both.toml",
            "[pools.production]\nbackends = [\"127.0.0.1:9\"]\n\
             [alerts.webhook]\nurl = \"http://h/\"\nurl_env = \"X\"\n",
        );
        let out = std::process::Command::new(binary())
            .args(["check", "--config"])
            .arg(&both)
            .env("X", "y")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("key `alerts.webhook.url_env`: give `url` or `url_env`"),
            "{stderr}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_a_url_never_reaches_a_config_error_or_the_log() {
    within(60, async {
        let dir = TempDir::new("redact");
        // A misspelt parameter: the config error quotes the URL, without its password.
        let path = dir.write(
            "bad.toml",
            &format!(
                "[pools.production]\nbackends = [\"127.0.0.1:9\"]\n\
                 [flags]\nredis_url = \"redis+sentinel://:{REDIS_PASSWORD}@127.0.0.1:26379/m?sentinel_pass=x\"\n"
            ),
        );
        let out = std::process::Command::new(binary())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("key `flags.redis_url`"), "{stderr}");
        assert!(
            stderr.contains("redis+sentinel://***@127.0.0.1:26379/m?sentinel_pass=***"),
            "{stderr}"
        );
        assert!(!stderr.contains(REDIS_PASSWORD), "{stderr}");
        // A proxy whose Redis is down logs its failures without the password.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let prod = TestBackend::start("production").await;
        let mut proxy = ProxyProcess::spawn(
            &format!(
                "{}[flags]\nredis_url = \"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0\"\npoll_ms = 100\n",
                config_toml(&[prod.addr], &[], "")
            ),
            "",
        );
        let log = proxy
            .log_until("flag store unreachable", Duration::from_secs(10))
            .join("\n");
        assert!(log.contains("flag store unreachable"), "{log}");
        assert!(!log.contains(REDIS_PASSWORD), "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_reaches_a_real_smtp_server() {
    within(60, async {
        let dir = TempDir::new("smtp");
        let maildir = dir.0.join("mail");
        let port = free_port();
        // aiosmtpd's Mailbox handler delivers each message into a Maildir.
        let _smtp = smtp_mailbox(port, &maildir);
        wait_port(port).await;
        let config = alerts_config(&format!(
            "[alerts.email]\nsmtp_url = \"smtp://127.0.0.1:{port}\"\nfrom = \"canarygate@example.com\"\n\
             to = [\"oncall@example.com\", \"sre@example.com\"]\n"
        ));
        let (alerts, metrics, _, cancel) = dispatcher(&config);
        alerts.fire(Severity::Critical, "cpu_spike", "host CPU 97% for 30 s", "top by CPU: 4242 burner");
        let new = maildir.join("new");
        eventually(Duration::from_secs(10), "a delivered message", || {
            let new = new.clone();
            async move { std::fs::read_dir(&new).is_ok_and(|d| d.count() == 1) }
        })
        .await;
        let file = std::fs::read_dir(&new).unwrap().next().unwrap().unwrap().path();
        let message = std::fs::read_to_string(file).unwrap();
        assert!(message.contains("Subject: [canarygate] CRITICAL cpu_spike on "), "{message}");
        assert!(message.contains("From: canarygate@example.com"), "{message}");
        assert!(message.contains("oncall@example.com") && message.contains("sre@example.com"), "{message}");
        assert!(message.contains("top by CPU: 4242 burner"), "{message}");
        assert!(message.contains("instance: test-host:8080"), "{message}");
        // The server writes the message before its final reply reaches the sender.
        eventually(Duration::from_secs(5), "counted as sent", || async {
            counted(&metrics, "email", "sent") == 1
        })
        .await;
        cancel.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_alertmanager_lists_the_alert_firing_then_resolved() {
    within(90, async {
        let dir = TempDir::new("alertmanager");
        let config_path = dir.write(
            "alertmanager.yml",
            "route:\n  receiver: nobody\nreceivers:\n  - name: nobody\n",
        );
        let port = free_port();
        let _am = KillOnDrop(
            std::process::Command::new("prometheus-alertmanager")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--cluster.listen-address=")
                .arg(format!("--storage.path={}", dir.0.join("data").display()))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("prometheus-alertmanager (apt-get install prometheus-alertmanager)"),
        );
        wait_port(port).await;
        let config = alerts_config(&format!(
            "[alerts]\nretry_base_ms = 200\n[alerts.alertmanager]\nurl = \"http://127.0.0.1:{port}\"\n"
        ));
        let (alerts, metrics, _, cancel) = dispatcher(&config);
        alerts.fire(Severity::Warning, "memory_spike", "host memory 93%", "top by memory: ...");
        let c = client();
        let listed = |c: TestClient| async move {
            let got = get(&c, &format!("http://127.0.0.1:{port}/api/v2/alerts"), &[]).await;
            let alerts: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
            alerts
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["labels"]["alertname"] == "memory_spike")
                .cloned()
                .collect::<Vec<_>>()
        };
        eventually(Duration::from_secs(20), "listed as active", || {
            let c = c.clone();
            async move {
                listed(c).await.iter().any(|a| {
                    a["status"]["state"] == "active"
                        && a["labels"]["severity"] == "warning"
                        && a["labels"]["instance"] == "test-host:8080"
                        && a["annotations"]["summary"] == "host memory 93%"
                })
            }
        })
        .await;
        alerts.resolve("memory_spike", "host memory 60%");
        // Resolved (endsAt now): no longer listed among the active alerts.
        eventually(Duration::from_secs(20), "no longer active", || {
            let c = c.clone();
            async move { listed(c).await.iter().all(|a| a["status"]["state"] != "active") }
        })
        .await;
        eventually(Duration::from_secs(5), "both counted as sent", || async {
            counted(&metrics, "alertmanager", "sent") == 2
        })
        .await;
        cancel.cancel();
    })
    .await;
}

/// Issue 29 item 4: a full channel queue gives up the least severe alert first, so
/// a flood of warnings (refused SMS notices, say) never pushes out a critical one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_warnings_never_pushes_a_queued_critical_out() {
    within(60, async {
        let hook = Peer::start(Mode::Created).await;
        let config = alerts_config(&format!(
            "[alerts]\nretry_base_ms = 50\n[alerts.webhook]\nurl = \"{}/hook\"\n\
             min_severity = \"info\"\n",
            hook.url()
        ));
        let metrics = Arc::new(Metrics::new());
        let (alerts, tasks) = Dispatcher::new(
            &config,
            "test-host:8080",
            metrics.alerts.clone(),
            Arc::new(Events::default()),
        )
        .unwrap();
        // The channel is not sending yet (as when it is slow or down): everything
        // waits in its queue of 64.
        alerts.notify(Severity::Info, "note", "an info first", "");
        alerts.notify(Severity::Critical, "disk_full", "the real one", "");
        let flood = 3 * canarygate::ops::alerts::dispatch::QUEUE;
        for n in 0..flood {
            alerts.notify(Severity::Warning, "sms_refused", &format!("noise {n}"), "");
        }
        let cancel = CancellationToken::new();
        for task in tasks {
            tokio::spawn(task.run(cancel.clone()));
        }
        let queue = canarygate::ops::alerts::dispatch::QUEUE;
        let got = hook.wait_for(queue, "the queue delivered").await;
        eventually(Duration::from_secs(10), "the queue counted", || async {
            counted(&metrics, "webhook", "sent") == queue as u64
        })
        .await;
        let summaries: Vec<String> = got
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                v["summary"].as_str().unwrap().to_owned()
            })
            .collect();
        assert!(
            summaries.iter().any(|s| s == "the real one"),
            "the critical alert was dropped: {summaries:?}"
        );
        assert!(!summaries.iter().any(|s| s == "an info first"));
        // The newest warnings stayed (the oldest of the least severe went first).
        assert!(
            summaries
                .iter()
                .any(|s| s == &format!("noise {}", flood - 1))
        );
        assert_eq!(
            counted(&metrics, "webhook", "dropped"),
            (flood + 2 - queue) as u64
        );
        cancel.cancel();
    })
    .await;
}
