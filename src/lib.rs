//! canarygate: a reverse proxy that splits live traffic between an application's
//! production and canary servers.
//!
//! Crate map, from the top down: a module imports only modules below it, but for
//! the two imports named after the list.
//! - [`run`] and [`serve_all`] (here): wire the state, the background tasks and the
//!   listeners together; [`reload`] applies a new config file.
//! - [`demo`]: the demo web app (`canarygate backend`) and `canarygate demo`.
//! - [`ops`]: the operations half: tasks that look after the host and the proxy, and
//!   the co-located processes (`canarygate doctor`, `canarygate maintenance`).
//! - [`proxy`]: the request path: decide, check, rewrite headers, forward, answer.
//! - [`state`]: [`state::AppState`] and the immutable [`state::Snapshot`]
//!   (config, flags, pools) behind one `ArcSwap`; [`state::Snapshots`], the handle
//!   a task receives when it only reads or swaps the snapshot.
//! - [`shadow`]: the shadow stage: mirrors production's requests to the canary,
//!   compares the answers per route, and gates a new canary (`[shadow]`).
//! - [`flags`]: the pure flag model, the Redis store (one server, Sentinel, Cluster)
//!   and the watcher that follows it, publishing through
//!   [`flags::watcher::FlagSink`] (the state implements it).
//! - [`upstream`]: backend pools, health state, the retry budget, and the active
//!   checks, which read the pools through [`upstream::checks::CheckedPools`] (the
//!   state implements it).
//! - [`server`]: the client side: accept loop, workers, limits, parking, idle
//!   timeout, the smuggling guard, the drain.
//! - [`tls`]: TLS termination: config from PEM files, session tickets, the provider.
//! - [`observe`]: metrics, stats, the event funnel, the access log, the admin
//!   listener.
//! - [`config`]: the TOML config, its parsing and validation (errors name file, line, key).
//! - [`client`]: the HTTP/1.1 client to the backends and its connection pool.
//! - [`canary`]: canary analysis, the pure half: request windows, statistics, the
//!   judge and the verdict (the task is `ops::analysis`).
//! - [`routing`]: pure decisions: sticky bucket, pool and reason, backend choice.
//! - [`sticky`]: the signed sticky cookie (the key is the fleet's secret).
//! - [`http1`]: field rules both sides share (lists, hop-by-hop).
//! - [`redact`]: URLs without their secrets, for every log line, error and alert.
//! - [`glob`]: shell-style file-name globs (maintenance's patterns).
//! - [`fleet`]: the fleet as this instance last read it (the heartbeats' model).
//! - [`clock`]: the process's monotonic millisecond clock.
//! - [`worker`]: which worker thread this is (per-worker state is indexed by it).
//!
//! Two imports run up, each from a folder that holds a low part and a high one:
//! - `observe::admin`, the admin listener, reads [`state::AppState`]: it shows
//!   nearly all of it. The rest of `observe` (metrics, events, stats, the access
//!   log) stands below everything that reports through it.
//! - `config::flags` checks `[flags.static]` values with the pure [`flags::model`],
//!   so the config refuses exactly what the watcher would.
//!
//! [`run`] takes already-bound listeners so tests (and the demo) can bind port 0.
// One module allows `unsafe` (`ops::maintenance::lease`: `fcntl(F_SETLEASE)`, which
// rustix does not wrap); everywhere else it is an error.
#![deny(unsafe_code)]

pub mod canary;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod flags;
pub mod fleet;
pub mod glob;
pub mod http1;
pub mod observe;
pub mod ops;
pub mod proxy;
pub mod redact;
pub mod routing;
pub mod server;
pub mod shadow;
pub mod state;
pub mod sticky;
pub mod tls;
pub mod upstream;
pub mod worker;

use std::convert::Infallible;

use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::config::Config;
use crate::observe::events::{Level, Source};
use crate::observe::{admin, stats};
use crate::proxy::ClientPeer;
use crate::server::ServeOptions;
use crate::server::balance::Balance;
use crate::state::AppState;
use crate::tls::TlsSource;

/// The sockets a proxy serves, bound by the caller (tests and the demo bind port 0).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    /// The HTTPS listener of `[server.tls]`, if configured.
    pub tls: Option<TcpListener>,
    /// More sockets on the HTTPS address, one per extra worker thread like
    /// `workers` (the same count, or none: then worker 0 serves all of HTTPS).
    pub tls_workers: Vec<std::net::TcpListener>,
    /// More sockets on the proxy address (`SO_REUSEPORT`), one per extra worker
    /// thread: each runs its own single-threaded runtime, so a client connection, its
    /// upstream connections and their tasks stay on one core (no cross-thread wakeups).
    pub workers: Vec<std::net::TcpListener>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("[server.tls] is configured but no TLS listener was bound")]
    TlsListenerMissing,
    #[error("[alerts]: {0}")]
    Alerts(#[from] ops::alerts::channels::SendError),
    #[error("cannot listen on [alerts.twilio] inbound_listen {addr}: {error}")]
    Inbound {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("[tracing]: {0}")]
    Tracing(#[from] observe::trace_export::TraceError),
}

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
    let listeners = Listeners {
        proxy: listener,
        admin: admin_listener,
        tls: None,
        tls_workers: Vec::new(),
        workers: Vec::new(),
    };
    if let Err(error) = serve_all(listeners, state, shutdown).await {
        tracing::error!(%error, "cannot start");
    }
}

/// Everything: the proxy (and HTTPS) listeners, the admin listener and the background
/// tasks, until `shutdown`; then `/readyz` turns 503 for `drain_delay_ms` while traffic
/// is still served, the listeners stop and in-flight requests get `drain_timeout_ms`.
pub async fn serve_all(
    listeners: Listeners,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let config = state.snapshot().config.clone();
    let tls_source = match (&config.server.tls, &listeners.tls) {
        (None, _) => None,
        (Some(_), None) => return Err(StartError::TlsListenerMissing),
        (Some(tls_config), Some(_)) => {
            let source: TlsSource = Arc::new(tls::Tls::new(tls_config)?);
            state.set_tls(Arc::clone(&source));
            Some(source)
        }
    };
    let mut options = serve_options(&config);
    // max_connections is for the whole proxy: each worker's listener gets its share.
    let threads = listeners.workers.len() + 1;
    options.max_connections = options.max_connections.map(|n| n.div_ceil(threads));
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(
        proxy = addr(&listeners.proxy),
        admin = addr(&listeners.admin),
        tls = listeners.tls.as_ref().map(addr).unwrap_or_default(),
        "listening"
    );

    // Background tasks stop after every server has drained.
    let tasks = CancellationToken::new();
    let instance = state.set_instance(instance_id(
        &config,
        listeners.proxy.local_addr().map_or(0, |a| a.port()),
    ));
    // Built before any task starts: a bad [tracing] stops the start with nothing running.
    let trace_export = if config.tracing.enabled() {
        let (provider, export) =
            observe::trace_export::pipeline(&config.tracing, &instance, &state.metrics.trace)?;
        state.set_tracing(observe::trace::Tracing::new(
            provider,
            config.tracing.sample_ratio,
            config.tracing.baggage_flags.clone(),
            instance.clone(),
        ));
        Some(export)
    } else {
        None
    };
    let (alerts, channels) = ops::alerts::Dispatcher::new(
        &config.alerts,
        &instance,
        state.metrics.alerts.clone(),
        Arc::clone(&state.events),
    )?;
    // SMS commands: on their own listener when one is configured (bound here, so a
    // taken port stops the start), else on the admin listener.
    let sms = ops::sms::Sms::new(state.clone(), alerts.clone(), instance.clone());
    let inbound_addr = config
        .alerts
        .twilio
        .as_ref()
        .filter(|t| t.inbound())
        .and_then(|t| t.inbound_listen);
    let inbound = match inbound_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|error| StartError::Inbound { addr, error })?,
        ),
        None => None,
    };
    let mut background: Vec<_> = channels
        .into_iter()
        .map(|channel| {
            let span = info_span!("alerts", channel = channel.channel());
            tokio::spawn(channel.run(tasks.clone()).instrument(span))
        })
        .collect();
    background.push(tokio::spawn(
        ops::analysis::run(
            state.clone(),
            alerts.clone(),
            instance.clone(),
            tasks.clone(),
        )
        .instrument(info_span!("analysis")),
    ));
    background.push(tokio::spawn(
        ops::alerts::dispatch::follow(alerts.clone(), state.alerts_settings(), tasks.clone())
            .instrument(info_span!("alerts")),
    ));
    background.push(tokio::spawn(
        ops::resources::run(state.clone(), alerts, tasks.clone())
            .instrument(info_span!("resources")),
    ));
    if let Some(export) = trace_export {
        background.push(tokio::spawn(
            observe::trace_export::run(export, tasks.clone()).instrument(info_span!("traces")),
        ));
    }
    if let Some(writer) = state.access_log.as_ref().and_then(|log| log.take_writer()) {
        background.push(tokio::spawn(
            observe::access_log::run(writer, tasks.clone()).instrument(info_span!("access_log")),
        ));
    }
    background.extend([
        tokio::spawn(
            flags::watcher::run(
                state.snapshots(),
                state.flag_settings(),
                Arc::clone(&state.events),
                Arc::clone(&state.metrics),
                tasks.clone(),
            )
            .instrument(info_span!("flags")),
        ),
        tokio::spawn(ops::fleet::run(state.clone(), tasks.clone()).instrument(info_span!("fleet"))),
        tokio::spawn(
            stats::run(
                Arc::clone(&state.stats),
                Arc::clone(&state.metrics),
                tasks.clone(),
            )
            .instrument(info_span!("stats")),
        ),
        tokio::spawn(
            upstream::checks::run(
                state.snapshots(),
                Arc::clone(&state.events),
                Arc::clone(&state.metrics),
                tasks.clone(),
            )
            .instrument(info_span!("health")),
        ),
        tokio::spawn(
            ops::memory::run(state.clone(), tasks.clone()).instrument(info_span!("memory")),
        ),
    ]);

    // The admin listener outlives the proxy's drain, so /readyz can say 503 meanwhile.
    let admin_shutdown = CancellationToken::new();
    let admin_state = state.clone();
    // Its own small cap and header limit: a flood of connections here must not take
    // descriptors the proxy needs (see `server::accept::SIDE_MAX_CONNECTIONS`).
    let admin_options = ServeOptions::side(
        options.header_read_timeout,
        options.idle_timeout,
        options.drain_timeout,
    );
    let sms_on_admin = inbound.is_none();
    let admin_sms = Arc::clone(&sms);
    let admin = tokio::spawn(
        server::serve(
            "admin",
            listeners.admin,
            admin_options.clone(),
            admin_shutdown.clone(),
            move |_peer, _framing| {
                let (state, sms) = (admin_state.clone(), Arc::clone(&admin_sms));
                service_fn(move |req| {
                    let (state, sms) = (state.clone(), Arc::clone(&sms));
                    async move {
                        let response = if sms_on_admin && req.uri().path() == ops::sms::PATH {
                            sms.respond(req).await
                        } else {
                            admin::respond(&state, &req)
                        };
                        Ok::<_, Infallible>(response)
                    }
                })
            },
        )
        .instrument(info_span!("admin")),
    );
    let inbound = inbound.map(|listener| {
        tokio::spawn(
            server::serve(
                "sms",
                listener,
                admin_options,
                admin_shutdown.clone(),
                move |_peer, _framing| {
                    let sms = Arc::clone(&sms);
                    service_fn(move |req| {
                        let sms = Arc::clone(&sms);
                        async move { Ok::<_, Infallible>(sms.respond_inbound(req).await) }
                    })
                },
            )
            .instrument(info_span!("sms")),
        )
    });

    let proxy_shutdown = CancellationToken::new();
    let delay = Duration::from_millis(config.server.drain_delay_ms);
    let drain_state = state.clone();
    let begin_drain = {
        let proxy_shutdown = proxy_shutdown.clone();
        async move {
            shutdown.cancelled().await;
            drain_state.start_draining();
            // Still serving: give outer load balancers time to see /readyz say 503.
            tokio::time::sleep(delay).await;
            proxy_shutdown.cancel();
        }
    };
    // One balance per address (a connection is handed to the same listener kind on
    // another worker); both count into the same per-worker gauges, so a worker's
    // load is its plain and TLS connections together.
    let balance = (!listeners.workers.is_empty())
        .then(|| Balance::new(listeners.workers.len() + 1, &state.metrics));
    let tls_balance = (!listeners.tls_workers.is_empty())
        .then(|| Balance::new(listeners.tls_workers.len() + 1, &state.metrics));
    let plain = proxy_server(
        "proxy",
        listeners.proxy,
        &state,
        ServeOptions {
            balance: balance.as_ref().map(|b| b.worker(0)),
            ..options.clone()
        },
        proxy_shutdown.clone(),
    );
    let https = async {
        if let (Some(listener), Some(source)) = (listeners.tls, tls_source.clone()) {
            let options = ServeOptions {
                tls: Some(source),
                balance: tls_balance.as_ref().map(|b| b.worker(0)),
                ..options.clone()
            };
            proxy_server(
                "proxy-tls",
                listener,
                &state,
                options,
                proxy_shutdown.clone(),
            )
            .await;
        }
    };
    let mut tls_workers = listeners.tls_workers.into_iter();
    let worker_listeners = listeners
        .workers
        .into_iter()
        .map(|plain| {
            let tls = tls_workers.next().zip(tls_source.clone());
            (plain, tls)
        })
        .collect();
    let workers = spawn_workers(
        worker_listeners,
        &state,
        &options,
        (balance.as_ref(), tls_balance.as_ref()),
        &proxy_shutdown,
    );
    let workers_done = async {
        for done in workers {
            let _ = done.await;
        }
    };
    let tunnels_done = drain_tunnels_on(&state, &proxy_shutdown, options.drain_timeout);
    tokio::join!(plain, https, begin_drain, workers_done, tunnels_done);

    admin_shutdown.cancel();
    let _ = admin.await;
    if let Some(inbound) = inbound {
        let _ = inbound.await;
    }
    tasks.cancel();
    for task in background {
        let _ = task.await;
    }
    info!("stopped");
    Ok(())
}

/// This instance's id: `server.instance_id`, else `hostname:port` of the proxy
/// listener.
pub fn instance_id(config: &Config, port: u16) -> String {
    config
        .server
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("{}:{port}", ops::alerts::alert::hostname()))
}

/// One extra worker's sockets: the proxy address, and the HTTPS address with its
/// TLS settings when configured.
type WorkerListeners = (
    std::net::TcpListener,
    Option<(std::net::TcpListener, TlsSource)>,
);

/// Starts one thread per extra worker, each with a single-threaded runtime serving
/// the proxy (and HTTPS); the returned receivers complete when a thread has drained.
fn spawn_workers(
    listeners: Vec<WorkerListeners>,
    state: &AppState,
    options: &ServeOptions,
    (balance, tls_balance): (Option<&Arc<Balance>>, Option<&Arc<Balance>>),
    shutdown: &CancellationToken,
) -> Vec<tokio::sync::oneshot::Receiver<()>> {
    let mut done = Vec::new();
    for (i, (listener, tls)) in listeners.into_iter().enumerate() {
        let options = ServeOptions {
            balance: balance.map(|b| b.worker(i + 1)),
            ..options.clone()
        };
        let tls_options = ServeOptions {
            balance: tls_balance.map(|b| b.worker(i + 1)),
            ..options.clone()
        };
        let (state, shutdown) = (state.clone(), shutdown.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("canarygate-worker-{}", i + 1))
            .spawn(move || {
                worker::set_index(i + 1);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => runtime.block_on(async {
                        let drain = options.drain_timeout;
                        let tunnels = drain_tunnels_on(&state, &shutdown, drain);
                        let plain = serve_std("proxy", listener, &state, options, &shutdown);
                        let https = async {
                            if let Some((listener, source)) = tls {
                                let options = ServeOptions {
                                    tls: Some(source),
                                    ..tls_options
                                };
                                serve_std("proxy-tls", listener, &state, options, &shutdown).await;
                            }
                        };
                        // This runtime also runs the tunnels it accepted: it lives
                        // until they have drained too.
                        tokio::join!(plain, https, tunnels);
                    }),
                    Err(error) => tracing::error!(%error, "worker cannot start its runtime"),
                }
                let _ = tx.send(());
            });
        match spawned {
            Ok(_) => done.push(rx),
            Err(error) => tracing::error!(%error, "cannot start a worker thread"),
        }
    }
    done
}

/// [`proxy_server`] on a worker's `std` socket, registered with this thread's runtime.
async fn serve_std(
    name: &'static str,
    listener: std::net::TcpListener,
    state: &AppState,
    options: ServeOptions,
    shutdown: &CancellationToken,
) {
    match TcpListener::from_std(listener) {
        Ok(listener) => proxy_server(name, listener, state, options, shutdown.clone()).await,
        Err(error) => tracing::error!(listener = name, %error, "worker cannot use its listener"),
    }
}

/// Once `shutdown` fires, waits for the upgraded tunnels (WebSockets) to end, at most
/// `timeout`, then cuts the rest.
async fn drain_tunnels_on(state: &AppState, shutdown: &CancellationToken, timeout: Duration) {
    shutdown.cancelled().await;
    state.drain_tunnels(timeout).await;
}

/// `n` listening sockets on `addr` sharing it with `SO_REUSEPORT` (the kernel spreads
/// new connections over them). With port 0 they all take the port the first one got.
pub fn reuseport_listeners(
    addr: std::net::SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        if listeners.is_empty() {
            addr = listener.local_addr()?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

/// One proxy listener (plain or TLS), serving [`proxy::handle`].
async fn proxy_server(
    name: &'static str,
    listener: TcpListener,
    state: &AppState,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let options = ServeOptions {
        connections: Some(state.metrics.client_connections.clone()),
        parked: Some(state.metrics.parked_connections.clone()),
        accept_errors: Some(state.metrics.accept_errors.clone()),
        ..options
    };
    // One Arc each, so a request costs one reference count, not one per field.
    let state = Arc::new(state.clone());
    server::serve(name, listener, options, shutdown, move |addr, conn| {
        let state = Arc::clone(&state);
        let peer = Arc::new(ClientPeer::new(addr, scheme, conn));
        service_fn(move |req| {
            let (state, peer) = (Arc::clone(&state), Arc::clone(&peer));
            // Boxed: the request's future is about 4 KiB, and hyper and the service
            // wrappers move it by value; copying it showed as 3% of the proxy's CPU.
            Box::pin(async move { Ok::<_, Infallible>(proxy::handle(&state, &peer, req).await) })
        })
    })
    .instrument(info_span!("proxy", listener = name))
    .await;
}

/// Connection settings of the proxy listeners, from the config.
pub fn serve_options(config: &Config) -> ServeOptions {
    ServeOptions {
        header_read_timeout: config.timeouts.client_header_read(),
        idle_timeout: config.timeouts.idle(),
        drain_timeout: Duration::from_millis(config.server.drain_timeout_ms),
        connections: None,
        max_connections: usize::try_from(config.limits.max_connections).ok(),
        max_header_bytes: usize::try_from(config.limits.max_header_bytes).ok(),
        tls: None,
        parked: None,
        balance: None,
        accept_errors: None,
        over_limit: server::accept::OverLimit::Wait,
    }
}

/// Re-reads the config file (SIGHUP): a valid one is swapped in atomically (pools,
/// percent, timeouts, health, limits on the request path; TLS certificates for new
/// connections); an invalid one is refused, logged, and the old one kept. Listen
/// addresses and connection limits cannot change without a restart: a change is
/// logged and ignored.
pub fn reload(state: &AppState, path: &std::path::Path) -> Result<(), config::ConfigError> {
    let result = config::load(path).and_then(|new| {
        if let Some(source) = state.tls()
            && let Some(tls_config) = &new.server.tls
        {
            source
                .reload(tls_config)
                .map_err(|e| config::ConfigError::Invalid {
                    file: path.display().to_string(),
                    line: 0,
                    key: "server.tls".to_owned(),
                    message: e.to_string(),
                })?;
        }
        Ok(new)
    });
    match result {
        Ok(new) => {
            let old = state.snapshot().config.clone();
            if old.server != new.server || old.limits.max_connections != new.limits.max_connections
            {
                warn!(
                    "listen addresses, drain settings and max_connections apply at the next restart"
                );
            }
            if old.tracing != new.tracing {
                warn!("[tracing] applies at the next restart");
            }
            let inbound = |c: &Config| c.alerts.twilio.as_ref().and_then(|t| t.inbound_listen);
            if inbound(&old) != inbound(&new) {
                warn!("[alerts.twilio] inbound_listen applies at the next restart");
            }
            let sections = new.changed_sections(&old);
            let sections = if sections.is_empty() {
                "none".to_owned()
            } else {
                sections.join(", ")
            };
            state.apply_config(new);
            state.metrics.count_reload(true);
            state.events.report(
                Source::Config,
                Level::Info,
                "config reloaded",
                format_args!("{}: sections changed: {sections}", path.display()),
            );
            Ok(())
        }
        Err(error) => {
            state.metrics.count_reload(false);
            state.events.report(
                Source::Config,
                Level::Warn,
                "config reload refused; keeping the running config",
                &error,
            );
            Err(error)
        }
    }
}
