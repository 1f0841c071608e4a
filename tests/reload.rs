//! SIGHUP reloads every section (issue #34, part 4): the proxy as a child process
//! re-reads its file, rebuilds its `[alerts]` channels at once and keeps them on a
//! bad file; a real SMTP server (aiosmtpd) receives the next alert. Every wait is
//! a poll with a deadline.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::app::{AppBackend, Traffic};
use support::*;

/// An analysis that rolls a canary failing one request in five back within seconds.
const FAST: &str = "[analysis]\nenabled = true\ninterval_ms = 250\nwindow_ms = 3000\n\
                    min_requests = 50\nfailure_threshold = 2\n";

fn proxy_toml(production: SocketAddr, canary: SocketAddr, alerts: &str) -> String {
    config_toml(&[production], &[canary], &format!("{FAST}{alerts}"))
}

fn messages(maildir: &Path) -> Vec<String> {
    std::fs::read_dir(maildir.join("new"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_that_adds_an_email_channel_mails_the_next_alert_and_a_bad_file_keeps_it() {
    within(90, async {
        let dir = TempDir::new("reload-smtp");
        let maildir = dir.0.join("mail");
        let port = free_port();
        let _smtp = smtp_mailbox(port, &maildir);
        wait_port(port).await;
        let production = AppBackend::start(0, 0).await;
        let canary = AppBackend::start(5, 0).await;
        // No alert channel at start.
        let mut proxy = ProxyProcess::spawn(&proxy_toml(production.addr, canary.addr, ""), "");

        // SIGHUP with an email channel: applied, and the log names the section.
        let email = format!(
            "[alerts.email]\nsmtp_url = \"smtp://127.0.0.1:{port}\"\nfrom = \"canarygate@example.com\"\n\
             to = [\"oncall@example.com\"]\n"
        );
        std::fs::write(
            &proxy.config_path,
            server_toml("", &proxy_toml(production.addr, canary.addr, &email)),
        )
        .unwrap();
        proxy.signal("HUP");
        let reloaded = proxy.wait_log("config reloaded", Duration::from_secs(10));
        assert!(reloaded.contains("sections changed: alerts"), "{reloaded}");
        let channels = proxy.wait_log("alert channels reloaded", Duration::from_secs(10));
        assert!(channels.contains("email"), "{channels}");

        // A bad file on the next SIGHUP: refused with file, line and key; the email
        // channel stays.
        let bad = format!(
            "{}\n[alerts.webhook]\nurl = 5\n",
            proxy_toml(production.addr, canary.addr, &email)
        );
        let bad = server_toml("", &bad);
        let line = bad.lines().position(|l| l == "url = 5").unwrap() + 1;
        std::fs::write(&proxy.config_path, &bad).unwrap();
        proxy.signal("HUP");
        let refused = proxy.wait_log("config reload refused", Duration::from_secs(10));
        let place = format!("{}:{line}", proxy.config_path.display());
        assert!(refused.contains(&place), "{place} in {refused}");
        assert!(refused.contains("alerts.webhook.url"), "{refused}");

        // The next alert (the analysis rolls the failing canary back) is mailed,
        // with no restart.
        let traffic = Traffic::start(&[format!("http://{}/", proxy.addr)], 8);
        eventually(Duration::from_secs(30), "the rollback alert mailed", || async {
            messages(&maildir)
                .iter()
                .any(|m| m.contains("CRITICAL canary_rollback"))
        })
        .await;
        drop(traffic);
        assert!(proxy.child.try_wait().unwrap().is_none(), "still the same process");
    })
    .await;
}
