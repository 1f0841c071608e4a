//! What the co-located processes (`canarygate doctor`, `canarygate maintenance`)
//! share: a metrics registry of their own, an admin listener with `/metrics` and
//! `/healthz`, and alert channels of their own from the same `[alerts]` section.
//! Each is a process apart from the proxy so it holds only its own privileges.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use prometheus::{
    Encoder as _, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, info_span};

use crate::config::alerts::AlertsConfig;
use crate::observe::events::Events;
use crate::ops::alerts::Dispatcher;

/// Why a co-located process could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot bind the admin listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("[alerts]: {0}")]
    Alerts(#[from] crate::ops::alerts::channels::SendError),
}

/// A process's own metrics, with `canarygate_alerts_total` for its dispatcher.
pub struct SidecarMetrics {
    registry: Registry,
    pub alerts: IntCounterVec,
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        let metrics = Self {
            registry: Registry::new(),
            alerts: IntCounterVec::new(
                Opts::new(
                    "canarygate_alerts_total",
                    "Alerts by channel and result (sent, failed, dropped, suppressed).",
                ),
                &["channel", "result"],
            )
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
        };
        metrics.register(metrics.alerts.clone());
        metrics
    }
}

impl SidecarMetrics {
    fn register(&self, metric: impl prometheus::core::Collector + 'static) {
        // Names are constants of this crate: a clash is a bug found by the first test.
        if let Err(e) = self.registry.register(Box::new(metric)) {
            panic!("metric definition: {e}");
        }
    }

    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("metric definition: {e}"));
        self.register(c.clone());
        c
    }

    /// A counter without labels.
    pub fn total(&self, name: &str, help: &str) -> IntCounter {
        let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric definition: {e}"));
        self.register(c.clone());
        c
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric definition: {e}"));
        self.register(g.clone());
        g
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("metric definition: {e}"));
        self.register(g.clone());
        g
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Binds `addr`, serves `/metrics` and `/healthz` there and starts the alert
/// channels of `alerts`, all as tasks of `tasks` that end with `stop`. Returns the
/// dispatcher to raise alerts with. `instance` names the process in its alerts.
pub async fn start(
    name: &'static str,
    addr: SocketAddr,
    metrics: &Arc<SidecarMetrics>,
    alerts: &AlertsConfig,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Dispatcher, SidecarError> {
    let instance = format!("{}:{name}", crate::ops::alerts::alert::hostname());
    let (dispatcher, channels) = Dispatcher::new(
        alerts,
        &instance,
        metrics.alerts.clone(),
        Arc::new(Events::default()),
    )?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind { addr, source })?;
    for channel in channels {
        let span = info_span!("alerts", channel = channel.channel());
        tasks.spawn(channel.run(stop.clone()).instrument(span));
    }
    let admin_metrics = Arc::clone(metrics);
    let defaults = crate::config::TimeoutsConfig::default();
    tasks.spawn(crate::server::serve(
        name,
        listener,
        crate::server::ServeOptions::side(
            defaults.client_header_read(),
            defaults.idle(),
            Duration::from_secs(1),
        ),
        stop.clone(),
        move |_, _| {
            let metrics = Arc::clone(&admin_metrics);
            service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let response = match req.uri().path() {
                    "/metrics" => text(StatusCode::OK, Bytes::from(metrics.render())),
                    "/healthz" => text(StatusCode::OK, Bytes::from_static(b"ok\n")),
                    _ => text(
                        StatusCode::NOT_FOUND,
                        Bytes::from_static(b"404 not found\n"),
                    ),
                };
                async move { Ok::<_, Infallible>(response) }
            })
        },
    ));
    Ok(dispatcher)
}

/// A dispatcher with no channels (`--once` runs: nothing is sent).
pub fn silent(metrics: &SidecarMetrics) -> Dispatcher {
    match Dispatcher::new(
        &AlertsConfig::default(),
        "once",
        metrics.alerts.clone(),
        Arc::default(),
    ) {
        Ok((dispatcher, _no_channels)) => dispatcher,
        Err(e) => panic!("an empty [alerts] has no channel to fail: {e}"),
    }
}

fn text(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}

/// Runs a co-located process (`run`, with its sections `F` of `path`) until
/// `shutdown`, re-reading `path` on SIGHUP: a file that does not load is logged
/// with its file, line and key and the running settings stay; a valid one that
/// differs stops the running round loop (as SIGTERM would, so a kill or an archive
/// under way finishes) and starts it again with the new settings, logging the
/// sections that changed. `sections` names what differs between two files.
pub async fn run_reloading<F, R, E>(
    name: &'static str,
    path: &std::path::Path,
    load: impl Fn(&std::path::Path) -> Result<F, crate::config::ConfigError>,
    sections: impl Fn(&F, &F) -> Vec<&'static str>,
    mut file: F,
    run: impl Fn(F, CancellationToken) -> R,
    shutdown: CancellationToken,
) -> Result<(), E>
where
    F: Clone,
    R: std::future::Future<Output = Result<(), E>>,
{
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).ok();
    loop {
        let generation = shutdown.child_token();
        let running = run(file.clone(), generation.clone());
        tokio::pin!(running);
        let next = loop {
            tokio::select! {
                result = &mut running => return result,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!(process = name, signal = "SIGHUP", "reloading config");
                    match load(path) {
                        Err(error) => tracing::warn!(process = name, %error, "config reload refused; keeping the running config"),
                        Ok(new) => {
                            let changed = sections(&file, &new);
                            if changed.is_empty() {
                                tracing::info!(process = name, sections = "none", "config reloaded");
                            } else {
                                break (new, changed);
                            }
                        }
                    }
                }
            }
        };
        let (new, changed) = next;
        generation.cancel();
        running.await?;
        if shutdown.is_cancelled() {
            return Ok(());
        }
        tracing::info!(process = name, sections = %changed.join(", "), "config reloaded");
        file = new;
    }
}
