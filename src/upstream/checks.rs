//! Active health checks: every `interval_ms`, a `GET <path>` to each backend of both
//! pools, concurrently, each bounded by `timeout_ms`. A 2xx or 3xx passes; any other
//! status, a timeout or a refused connection fails. `rise` passes in a row make a
//! backend up, `fall` failures in a row make it down (see [`crate::upstream::health`] for how
//! this combines with passive ejection). Each tick also refreshes
//! `canarygate_backend_up`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::HealthConfig;
use crate::observe::events::{Events, Level, Source};
use crate::observe::metrics::Metrics;
use crate::routing::PoolKind;
use crate::upstream::health::ActiveChange;
use crate::upstream::pools::{Backend, Pools};

type CheckClient = Client<HttpConnector, Empty<Bytes>>;

/// What the checks visit: the pools in force with their `[health]` settings, read
/// afresh each round so a reload applies. A trait, so the upstream side need not
/// know what else the proxy's snapshot holds (the state implements it).
pub trait CheckedPools: Send + Sync {
    fn pools_in_force(&self) -> (Arc<Pools>, HealthConfig);
}

/// Runs the checks until `cancel`, reporting changes to `events` and each round's
/// backend states to `metrics`.
pub async fn run(
    pools: impl CheckedPools,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    // Checks use their own short-lived connections: a check must see whether a new
    // connection can be opened, not reuse one that happens to be alive.
    let client: CheckClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    loop {
        let (in_force, health) = pools.pools_in_force();
        check_all(&client, &in_force, &health, &events).await;
        metrics.observe_backends(in_force.backend_states(now_ms()));
        let interval = Duration::from_millis(health.interval_ms);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn check_all(client: &CheckClient, pools: &Pools, health: &HealthConfig, events: &Events) {
    let timeout = Duration::from_millis(health.timeout_ms);
    let checks = [PoolKind::Production, PoolKind::Canary]
        .into_iter()
        .flat_map(|kind| pools.get(kind).backends().iter().map(move |b| (kind, b)))
        .map(|(kind, backend)| async move {
            let passed = check_one(client, backend, &health.path, timeout).await;
            (kind, backend, passed)
        });
    let results = futures_util::future::join_all(checks).await;
    for (kind, backend, passed) in results {
        match backend
            .health
            .record_check(passed, health.rise, health.fall)
        {
            Some(ActiveChange::BecameDown) => events.report(
                Source::Health,
                Level::Warn,
                "backend unhealthy",
                format_args!(
                    "{} backend {} failed {} checks: down",
                    kind.as_str(),
                    backend.authority,
                    health.fall
                ),
            ),
            Some(ActiveChange::BecameUp) => events.report(
                Source::Health,
                Level::Info,
                "backend healthy",
                format_args!(
                    "{} backend {} passed {} checks: up",
                    kind.as_str(),
                    backend.authority,
                    health.rise
                ),
            ),
            None => {}
        }
    }
}

async fn check_one(client: &CheckClient, backend: &Backend, path: &str, timeout: Duration) -> bool {
    let Ok(uri) = format!("http://{}{path}", backend.authority).parse::<http::Uri>() else {
        return false;
    };
    let Ok(req) = Request::get(uri)
        .header(header::USER_AGENT, "canarygate-health-check")
        .body(Empty::new())
    else {
        return false;
    };
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(response)) => {
            let status = response.status();
            status.is_success() || status.is_redirection()
        }
        Ok(Err(_)) | Err(_) => false,
    }
}
