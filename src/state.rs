//! Shared state: one immutable [`Snapshot`] behind an `ArcSwap`, plus the handles
//! every task needs.
//!
//! A request loads the snapshot once and sees one consistent view (config, pools and
//! flags together) for its whole life, even if a writer swaps in a new one meanwhile.
//! Loading is lock-free, so no request ever waits for a writer. Writers (the flag
//! watcher, a config reload) replace only their part with a read-copy-update, so two
//! writers never lose each other's change.
//!
//! A background task that only reads or swaps the snapshot receives [`Snapshots`],
//! not the whole [`AppState`]. The flag watcher and the health checks see it
//! through a trait of their own ([`FlagSink`], [`CheckedPools`]), so `flags` and
//! `upstream` never import this module, which imports them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use tokio::sync::watch;
use tracing::warn;

use crate::canary::board::Board;
use crate::clock::now_ms;
use crate::config::{Config, FlagsConfig, HealthConfig};
use crate::flags::model::{FlagSet, Flags, Source as FlagSource};
use crate::flags::watcher::FlagSink;
use crate::observe::events::{Events, Level, Source};
use crate::observe::metrics::Metrics;
use crate::observe::stats::Stats;
use crate::sticky::StickySigner;
use crate::tls::TlsSource;
use crate::upstream::checks::CheckedPools;
use crate::upstream::pools::Pools;

/// Everything a request needs to be routed, frozen at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    /// Shared between snapshots that differ only in flags, so balancing state
    /// (round-robin counters) survives a flag flip.
    pub pools: Arc<Pools>,
    pub flags: Arc<Flags>,
}

/// Sets the flag gauges to `snapshot`'s flags.
fn observe_flags(metrics: &Metrics, snapshot: &Snapshot) {
    let flags = &snapshot.flags;
    metrics.observe_flags(
        flags.effective_percent(snapshot.config.routing.canary_percent),
        flags.version,
        flags.set.switches(),
    );
}

/// The snapshot in force, and what publishing into it updates: the handle for a
/// task that reads or swaps the snapshot. Cheap to clone: every field is shared.
#[derive(Clone)]
pub struct Snapshots {
    current: Arc<ArcSwap<Snapshot>>,
    /// Whether the flag store (Redis) answered on its last attempt: kept here because
    /// the watcher that publishes flags is the one that knows.
    flag_store_up: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    events: Arc<Events>,
}

impl Snapshots {
    /// The current snapshot; hold it for the whole request.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Publishes a flag set read from `source`. Swaps nothing, and keeps the version,
    /// when neither the content nor the source changed. Returns the version in force.
    pub fn publish_flags(&self, set: &FlagSet, source: FlagSource) -> u64 {
        let current = self.current.load();
        if current.flags.set == *set && current.flags.source == source {
            return current.flags.version;
        }
        drop(current);
        let mut version = 0;
        self.current.rcu(|current| {
            let flags = &current.flags;
            version = flags.version;
            if flags.set == *set && flags.source == source {
                return Arc::clone(current);
            }
            version = flags.version + 1;
            Arc::new(Snapshot {
                config: Arc::clone(&current.config),
                pools: Arc::clone(&current.pools),
                flags: Arc::new(Flags::new(set.clone(), version, source)),
            })
        });
        let snapshot = self.load();
        observe_flags(&self.metrics, &snapshot);
        self.events.report(
            Source::Flags,
            Level::Info,
            "flags published",
            format_args!(
                "flags v{version} from {}: {} (canary {}%)",
                source.as_str(),
                snapshot.flags.header_value.to_str().unwrap_or(""),
                snapshot
                    .flags
                    .effective_percent(snapshot.config.routing.canary_percent)
            ),
        );
        version
    }

    pub fn flag_store_up(&self) -> bool {
        self.flag_store_up.load(Ordering::Relaxed)
    }

    pub fn set_flag_store_up(&self, up: bool) {
        self.flag_store_up.store(up, Ordering::Relaxed);
        self.metrics.set_flag_store_up(up);
    }
}

impl FlagSink for Snapshots {
    fn flags_in_force(&self, store: &FlagsConfig) -> Option<Arc<Flags>> {
        let snapshot = self.load();
        (!snapshot.config.flags.store_differs(store)).then(|| Arc::clone(&snapshot.flags))
    }

    fn publish(&self, set: &FlagSet, source: FlagSource) -> u64 {
        self.publish_flags(set, source)
    }

    fn set_store_up(&self, up: bool) {
        self.set_flag_store_up(up);
    }
}

impl CheckedPools for Snapshots {
    fn pools_in_force(&self) -> (Arc<Pools>, HealthConfig) {
        let snapshot = self.load();
        (Arc::clone(&snapshot.pools), snapshot.config.health.clone())
    }
}

/// Cheap to clone: every field is shared.
#[derive(Clone)]
pub struct AppState {
    snapshots: Snapshots,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    draining: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<Events>,
    pub stats: Arc<Stats>,
    /// What the canary analysis shows (`/analysis`, the status page).
    pub analysis: Arc<Board>,
    /// Whether canary traffic is currently failing over to production (to log the
    /// start and the end once, not per request).
    pub canary_failover: Arc<AtomicBool>,
    /// Upgraded tunnels (WebSockets), for the drain to wait on.
    pub tunnels: tokio_util::task::TaskTracker,
    /// Cut every tunnel still open when the drain deadline passes.
    pub tunnel_cut: tokio_util::sync::CancellationToken,
    /// The TLS listener's certificate source, swapped on reload.
    tls: Arc<std::sync::OnceLock<TlsSource>>,
    /// The flag settings in force; receivers are told only when a reload changes
    /// where flags are read from: the watcher restarts with them.
    flag_settings: Arc<watch::Sender<FlagsConfig>>,
    /// The `[alerts]` in force; receivers are told when a reload changes it (the
    /// dispatcher rebuilds its channels).
    alerts_settings: Arc<watch::Sender<crate::config::alerts::AlertsConfig>>,
    /// `[server] access_log`, unless it is `"off"`.
    pub access_log: Option<Arc<crate::observe::access_log::AccessLog>>,
    /// This instance's id (`server.instance_id`, or `hostname:port`), set once the
    /// proxy listener is bound.
    instance: Arc<std::sync::OnceLock<String>>,
    /// The fleet as the heartbeat task last read it (`/fleet`, the status page).
    pub fleet: Arc<crate::fleet::Board>,
    /// Signs and checks the sticky cookie; the key is read once, at start.
    pub sticky: Arc<StickySigner>,
    /// The tracer, set once at start when `[tracing]` has an endpoint (changing
    /// `[tracing]` needs a restart).
    tracing: Arc<std::sync::OnceLock<crate::observe::trace::Tracing>>,
    /// The shadow stage: mirrors in flight, findings, the gate's hold.
    pub shadow: Arc<crate::shadow::Shadow>,
}

impl AppState {
    pub fn new(config: Config) -> Self {
        let flags = Arc::new(Flags::new(config.flags.static_set(), 1, FlagSource::Static));
        let pools = Arc::new(Pools::new(&config.pools, &config.health, None));
        let snapshot = Snapshot {
            config: Arc::new(config),
            pools,
            flags,
        };
        let metrics = Arc::new(Metrics::new());
        observe_flags(&metrics, &snapshot);
        let analysis = &snapshot.config.analysis;
        metrics.recorder.configure(
            analysis.enabled,
            analysis.window_ms,
            &analysis.client_limit(),
        );
        metrics.observe_backends(snapshot.pools.backend_states(now_ms()));
        let flag_settings = Arc::new(watch::Sender::new(snapshot.config.flags.clone()));
        let alerts_settings = Arc::new(watch::Sender::new(snapshot.config.alerts.clone()));
        let server = &snapshot.config.server;
        let access_log = crate::observe::access_log::AccessLog::new(
            &server.access_log,
            server.access_log_format,
            metrics.log_dropped.clone(),
        )
        .map(Arc::new);
        let events: Arc<Events> = Arc::default();
        let secret_env = snapshot.config.routing.sticky_secret_env.as_deref();
        let sticky = Arc::new(StickySigner::from_env(secret_env));
        if sticky.per_process {
            warn!(
                secret_env,
                "sticky cookies are signed with a key of this process only: users are \
                 placed anew after a restart and by every other proxy of a fleet; set \
                 routing.sticky_secret_env to a variable holding a shared secret"
            );
        }
        Self {
            access_log,
            snapshots: Snapshots {
                current: Arc::new(ArcSwap::from_pointee(snapshot)),
                flag_store_up: Arc::new(AtomicBool::new(false)),
                metrics: Arc::clone(&metrics),
                events: Arc::clone(&events),
            },
            canary_failover: Arc::new(AtomicBool::new(false)),
            tls: Arc::default(),
            tunnels: tokio_util::task::TaskTracker::new(),
            tunnel_cut: tokio_util::sync::CancellationToken::new(),
            draining: Arc::new(AtomicBool::new(false)),
            flag_settings,
            alerts_settings,
            metrics: Arc::clone(&metrics),
            events,
            stats: Arc::default(),
            analysis: Arc::default(),
            instance: Arc::default(),
            fleet: Arc::default(),
            sticky,
            tracing: Arc::default(),
            shadow: Arc::new(crate::shadow::Shadow::new(metrics.shadow.clone())),
        }
    }

    /// Names this instance (`serve_all`, once the proxy listener is bound). The
    /// first call wins; returns the id in force.
    pub fn set_instance(&self, id: String) -> String {
        self.instance.get_or_init(|| id).clone()
    }

    /// Sets the tracer (once, at start).
    pub fn set_tracing(&self, tracing: crate::observe::trace::Tracing) {
        let _ = self.tracing.set(tracing);
    }

    /// The tracer, when `[tracing]` is on.
    pub fn tracing(&self) -> Option<&crate::observe::trace::Tracing> {
        self.tracing.get()
    }

    /// This instance's id ("" before the proxy is listening).
    pub fn instance(&self) -> &str {
        self.instance.get().map_or("", String::as_str)
    }

    /// The current snapshot; hold it for the whole request.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshots.load()
    }

    /// The snapshot's handle, for a task that needs no more of the state.
    pub fn snapshots(&self) -> Snapshots {
        self.snapshots.clone()
    }

    /// Swaps in a new, already validated config, keeping the flags, and the health state
    /// and warm connections of backends that stay. Requests in flight keep the snapshot
    /// they loaded. The flag settings apply too: new store settings restart the
    /// watcher, and without a Redis the new `[flags.static]` values are published.
    pub fn apply_config(&self, config: Config) {
        let config = Arc::new(config);
        let current = self.snapshot();
        let pools = Arc::new(Pools::new(
            &config.pools,
            &config.health,
            Some(&current.pools),
        ));
        let old_flags = current.config.flags.clone();
        drop(current);
        self.snapshots.current.rcu(|current| Snapshot {
            config: Arc::clone(&config),
            pools: Arc::clone(&pools),
            flags: Arc::clone(&current.flags),
        });
        let snapshot = self.snapshot();
        observe_flags(&self.metrics, &snapshot);
        self.metrics
            .observe_backends(snapshot.pools.backend_states(now_ms()));
        self.metrics.recorder.configure(
            config.analysis.enabled,
            config.analysis.window_ms,
            &config.analysis.client_limit(),
        );
        let new_flags = &config.flags;
        let store_changed = old_flags.store_differs(new_flags);
        if new_flags.redis_url.is_none()
            && (store_changed || old_flags.static_flags != new_flags.static_flags)
        {
            self.set_flag_store_up(false);
            self.publish_flags(&new_flags.static_set(), FlagSource::Static);
        }
        self.flag_settings.send_if_modified(|settings| {
            settings.clone_from(new_flags);
            store_changed
        });
        self.alerts_settings.send_if_modified(|settings| {
            let changed = *settings != config.alerts;
            if changed {
                settings.clone_from(&config.alerts);
            }
            changed
        });
    }

    /// The `[alerts]` in force, for the dispatcher: told when a reload changes it.
    pub fn alerts_settings(&self) -> watch::Receiver<crate::config::alerts::AlertsConfig> {
        self.alerts_settings.subscribe()
    }

    /// The flag settings in force, for the flag watcher: it is told when a reload
    /// changes where flags are read from.
    pub fn flag_settings(&self) -> watch::Receiver<FlagsConfig> {
        self.flag_settings.subscribe()
    }

    /// Publishes a flag set read from `source` (see [`Snapshots::publish_flags`]).
    pub fn publish_flags(&self, set: &FlagSet, source: FlagSource) -> u64 {
        self.snapshots.publish_flags(set, source)
    }

    pub fn flag_store_up(&self) -> bool {
        self.snapshots.flag_store_up()
    }

    pub fn set_flag_store_up(&self, up: bool) {
        self.snapshots.set_flag_store_up(up);
    }

    /// Waits for open tunnels to end, at most `timeout`, then cuts the rest.
    pub async fn drain_tunnels(&self, timeout: std::time::Duration) {
        self.tunnels.close();
        if tokio::time::timeout(timeout, self.tunnels.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tunnels.len(),
                "drain timeout; closing open tunnels"
            );
            self.tunnel_cut.cancel();
            self.tunnels.wait().await;
        }
    }

    pub fn set_tls(&self, source: TlsSource) {
        let _ = self.tls.set(source);
    }

    pub fn tls(&self) -> Option<&TlsSource> {
        self.tls.get()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.events.report(
            Source::Proxy,
            Level::Info,
            "draining: stopped accepting",
            "",
        );
    }
}
