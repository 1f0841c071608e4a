//! The host resource watch (issue 15) against a real CPU burner. In a test binary of
//! its own: cargo runs test binaries one after another, so no other test's load
//! can make (or hide) the spike.

mod support;

use std::time::Duration;

use support::*;

/// The first `n` alerts `hook` received, as JSON.
async fn alerts(hook: &Peer, n: usize, what: &str) -> Vec<serde_json::Value> {
    hook.wait_for(n, what)
        .await
        .iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect()
}

/// A process that spins one core until killed (by PID, on drop).
struct Burner(std::process::Child);

impl Burner {
    fn start() -> Self {
        Self(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_spike_raises_one_warning_and_one_resolved() {
    within(90, async {
        let hook = Peer::start(Mode::Created).await;
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            &format!(
                "[resources]\ninterval_ms = 250\nsustain_ms = 1500\ncpu_percent = 90\n\
                 memory_percent = 100\ndisk_percent = 100\n[alerts.webhook]\nurl = \"{}/hook\"\n",
                hook.url()
            ),
        ))
        .await;
        // The gauges the doctor and maintenance read.
        let c = client();
        eventually(Duration::from_secs(5), "host gauges exported", || {
            let c = c.clone();
            let admin = proxy.admin_addr;
            async move {
                let m = scrape_metrics(&c, admin).await;
                m.get("canarygate_host_memory_ratio")
                    .is_some_and(|r| *r > 0.0)
                    && m.contains_key(r#"canarygate_host_disk_used_ratio{path="/"}"#)
            }
        })
        .await;

        // A shared machine may be busy on its own (CI ran into it: the episode began
        // before the burners, and its process list could not name them): start them
        // on a quiet host and count the alerts from there.
        eventually(Duration::from_secs(60), "a quiet host", || {
            let c = c.clone();
            let admin = proxy.admin_addr;
            async move {
                let m = scrape_metrics(&c, admin).await;
                m.get("canarygate_host_cpu_ratio").is_some_and(|r| *r < 0.5)
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = hook.received().len();

        // Both cores busy for longer than sustain_ms.
        let burners = [Burner::start(), Burner::start()];
        let got = alerts(&hook, before + 1, "the cpu_spike warning").await;
        let firing = &got[before];
        assert_eq!(
            (firing["kind"].as_str(), firing["state"].as_str()),
            (Some("cpu_spike"), Some("firing"))
        );
        assert_eq!(firing["severity"], "warning");
        let details = firing["details"].as_str().unwrap();
        assert!(
            details.contains("top by CPU") && details.contains("top by memory"),
            "{details}"
        );
        let burner_pid = burners[0].0.id().to_string();
        let burner_pid2 = burners[1].0.id().to_string();
        assert!(
            details.contains(&burner_pid) || details.contains(&burner_pid2),
            "{details}"
        );
        let status = get(&c, &format!("http://{}/", proxy.admin_addr), &[]).await;
        let page = status.text();
        let firing_list = page.split("<h3>Alerts firing</h3>").nth(1).unwrap_or("");
        assert!(
            firing_list
                .split("</ul>")
                .next()
                .unwrap_or("")
                .contains("cpu_spike"),
            "the status page lists it as firing"
        );
        assert!(
            page.contains("<h2>Host</h2><p>CPU "),
            "the status page shows the host"
        );
        drop(burners);

        let got = alerts(&hook, before + 2, "the resolved message").await;
        let resolved = &got[before + 1];
        assert_eq!(
            (resolved["kind"].as_str(), resolved["state"].as_str()),
            (Some("cpu_spike"), Some("resolved"))
        );
        assert_eq!(resolved["id"], firing["id"]);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            hook.received().len(),
            before + 2,
            "one warning, one resolved"
        );
    })
    .await;
}
