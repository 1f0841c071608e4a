//! canarygate: a reverse proxy that splits live traffic between an application's
//! production and canary servers.
//!
//! Crate map:
//! - [`config`]: the TOML config, its parsing and validation (errors name file, line, key).
//! - [`state`]: [`state::AppState`] and the immutable [`state::Snapshot`] behind an `ArcSwap`.
//! - [`server`]: the accept loop (HTTP/1.1 + h2c), idle timeouts, graceful drain.
//! - [`proxy`]: the request path: route, rewrite headers, forward, map errors.
//! - [`routing`]: pure decisions: sticky bucket, pool choice, backend choice.
//! - [`upstream`]: pools and the pooled keep-alive client.
//! - [`flags`]: feature flags from Redis (or static) into the snapshot; the watcher task.
//! - [`admin`]: the admin listener: metrics, health, readiness, flags, events, status page.
//! - [`metrics`]: the owned Prometheus registry and per-pool handles.
//! - [`stats`]: short-term history (rates, error ratios, percentiles) for the status page.
//! - [`events`]: recent operational events for the status page and `/events`.
//! - [`backend`]: the demo web app (`canarygate backend`, `canarygate demo`).
//!
//! [`run`] takes already-bound listeners so tests (and the demo) can bind port 0.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod config;
pub mod events;
pub mod flags;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod state;
pub mod stats;
pub mod upstream;

use std::convert::Infallible;

use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use crate::config::Config;
use crate::proxy::ConnInfo;
use crate::server::ServeOptions;
use crate::state::AppState;

/// Runs the proxy and the admin listener until `shutdown` is cancelled, then drains
/// both and returns.
pub async fn run(
    listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) {
    let state = AppState::new(config);
    run_with_state(listener, admin_listener, state, shutdown).await;
}

/// [`run`] with a state the caller keeps, e.g. to swap configs in tests.
pub async fn run_with_state(
    listener: TcpListener,
    admin_listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) {
    let options = serve_options(&state.snapshot().config);
    if let (Ok(proxy), Ok(admin)) = (listener.local_addr(), admin_listener.local_addr()) {
        info!(%proxy, %admin, "listening");
    }

    // Background tasks stop after both servers have drained.
    let tasks = CancellationToken::new();
    let background = [
        tokio::spawn(flags::run(state.clone(), tasks.clone()).instrument(info_span!("flags"))),
        tokio::spawn(stats::run(state.clone(), tasks.clone()).instrument(info_span!("stats"))),
    ];

    // The admin listener outlives the proxy's drain, so /readyz can say 503 meanwhile.
    let admin_shutdown = CancellationToken::new();
    let admin_state = state.clone();
    let admin = tokio::spawn(
        server::serve(
            "admin",
            admin_listener,
            options.clone(),
            admin_shutdown.clone(),
            move |_peer| {
                let state = admin_state.clone();
                service_fn(move |req| {
                    let response = admin::respond(&state, &req);
                    async move { Ok::<_, Infallible>(response) }
                })
            },
        )
        .instrument(info_span!("admin")),
    );

    let proxy_state = state.clone();
    let proxy_options = ServeOptions {
        connections: Some(state.metrics.client_connections.clone()),
        ..options
    };
    let drain_state = state.clone();
    let proxy_shutdown = CancellationToken::new();
    let forward_shutdown = {
        let proxy_shutdown = proxy_shutdown.clone();
        async move {
            shutdown.cancelled().await;
            drain_state.start_draining();
            proxy_shutdown.cancel();
        }
    };
    let proxy = server::serve(
        "proxy",
        listener,
        proxy_options,
        proxy_shutdown,
        move |peer| {
            let state = proxy_state.clone();
            let conn = ConnInfo {
                peer,
                scheme: "http",
            };
            service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(proxy::handle(&state, conn, req).await) }
            })
        },
    )
    .instrument(info_span!("proxy"));
    tokio::join!(proxy, forward_shutdown);

    admin_shutdown.cancel();
    let _ = admin.await;
    tasks.cancel();
    for task in background {
        let _ = task.await;
    }
    info!("stopped");
}

/// Connection settings from the config.
pub fn serve_options(config: &Config) -> ServeOptions {
    ServeOptions {
        header_read_timeout: config.timeouts.client_header_read(),
        idle_timeout: config.timeouts.idle(),
        drain_timeout: std::time::Duration::from_millis(config.server.drain_timeout_ms),
        connections: None,
    }
}
