//! The host resource watch (issue 15) against a real CPU burner. In a test binary of
//! its own: cargo runs test binaries one after another, so no other test's load
//! can make (or hide) the spike.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use support::*;

/// A webhook receiver on loopback: every request body it got.
struct Hook {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hook {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&bodies);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let log = Arc::clone(&log);
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            log.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&body).into_owned());
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, bodies, task }
    }

    /// The first `n` alerts received, as JSON, waiting up to 30 s.
    async fn alerts(&self, n: usize, what: &str) -> Vec<serde_json::Value> {
        let bodies = Arc::clone(&self.bodies);
        eventually(Duration::from_secs(30), what, || {
            let ok = bodies.lock().unwrap().len() >= n;
            async move { ok }
        })
        .await;
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
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
        let hook = Hook::start().await;
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            &format!(
                "[resources]\ninterval_ms = 250\nsustain_ms = 1500\ncpu_percent = 90\n\
                 memory_percent = 100\ndisk_percent = 100\n[alerts.webhook]\nurl = \"http://{}/hook\"\n",
                hook.addr
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

        // Both cores busy for longer than sustain_ms.
        let burners = [Burner::start(), Burner::start()];
        let got = hook.alerts(1, "the cpu_spike warning").await;
        let firing = &got[0];
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

        let got = hook.alerts(2, "the resolved message").await;
        let resolved = &got[1];
        assert_eq!(
            (resolved["kind"].as_str(), resolved["state"].as_str()),
            (Some("cpu_spike"), Some("resolved"))
        );
        assert_eq!(resolved["id"], firing["id"]);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            hook.bodies.lock().unwrap().len(),
            2,
            "one warning, one resolved"
        );
    })
    .await;
}
