//! The flag watcher: follows the Redis hash into the snapshot.
//!
//! Operators write the hash with `redis-cli` (`HSET canarygate:flags new_checkout on`).
//! The watcher follows it two ways at once: keyspace notifications for speed, and a
//! full re-read every `poll_ms` because pub/sub is fire-and-forget and loses events
//! while disconnected. When Redis is down the proxy serves on with what it has.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::FlagsConfig;
use crate::flags::model::{FlagSet, Flags, Rejected, Source as FlagSource, build};
use crate::flags::store::{COMMAND_TIMEOUT, Conn, Store};
use crate::observe::events::{Events, Level, Source};
use crate::observe::metrics::Metrics;

/// Errors of one watcher session; any of them ends the session and reconnects.
#[derive(Debug, thiserror::Error)]
pub enum FlagStoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("notification stream closed")]
    Closed,
}

/// Reconnect backoff: doubles from the first value up to the cap (or `poll_ms`).
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Where the watcher's flags go: the proxy's snapshot. A trait, so the flags need
/// not know what else a snapshot holds (the state implements it).
pub trait FlagSink: Send + Sync {
    /// The flags in force, or `None` once the config in force reads flags from
    /// another store than `store`.
    fn flags_in_force(&self, store: &FlagsConfig) -> Option<Arc<Flags>>;
    /// Publishes a flag set read from `source`; returns the version in force.
    fn publish(&self, set: &FlagSet, source: FlagSource) -> u64;
    /// Whether the store answered on its last attempt (`/flags`, the status page,
    /// `canarygate_flag_store_up`).
    fn set_store_up(&self, up: bool);
}

/// Watches the flag hash until `cancel`, publishing into `sink`. `settings` are the
/// flag settings in force; a reload that changes the store settings (`redis_url`,
/// `tls_ca_path`, `key`, `poll_ms`) restarts the watcher with them; without a
/// `redis_url` it waits for one.
pub async fn run(
    sink: impl FlagSink,
    mut settings: watch::Receiver<FlagsConfig>,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    loop {
        let config = settings.borrow_and_update().clone();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = follow_store(&sink, &events, &metrics, &config) => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return; // the state is gone: nothing left to watch for
                }
                events.report(
                    Source::Flags,
                    Level::Info,
                    "flag store settings changed; watcher restarted",
                    "",
                );
            }
        }
    }
}

/// Follows the store `config` names, forever; pending at once when there is none
/// (or its settings cannot be used), so only a settings change or `cancel` ends it.
async fn follow_store<S: FlagSink>(
    sink: &S,
    events: &Events,
    metrics: &Metrics,
    config: &FlagsConfig,
) {
    let Some(url) = config.redis_url.as_deref() else {
        debug!("no redis_url; flags come from [flags.static]");
        return std::future::pending().await;
    };
    let store = match Store::open(url, config) {
        Ok(store) => store,
        Err(error) => {
            warn!(%error, "cannot use flags.redis_url; serving static flags");
            return std::future::pending().await;
        }
    };
    let mut watcher = Watcher {
        sink,
        events,
        metrics,
        settings: config.clone(),
        up: None,
        config_refused_logged: false,
        last_rejected: HashMap::new(),
    };
    let mut backoff = BACKOFF_FIRST;
    loop {
        if let Err(error) = watcher.session(&store).await {
            if watcher.session_reached_redis() {
                backoff = BACKOFF_FIRST;
            }
            watcher.set_up(false, Some(&error));
        }
        tokio::time::sleep(backoff).await;
        // Never longer than poll_ms: after a Sentinel failover a flip must arrive
        // within poll_ms of the new master taking writes.
        let cap = BACKOFF_CAP.min(Duration::from_millis(config.poll_ms).max(BACKOFF_FIRST));
        backoff = (backoff * 2).min(cap);
    }
}

struct Watcher<'a, S> {
    sink: &'a S,
    events: &'a Events,
    metrics: &'a Metrics,
    /// The settings this watcher was started with.
    settings: FlagsConfig,
    /// Last known store state, to log once per change rather than once per retry.
    up: Option<bool>,
    config_refused_logged: bool,
    /// The last refused value per field, so a bad value is logged and counted once,
    /// not on every poll.
    last_rejected: HashMap<String, String>,
}

impl<S: FlagSink> Watcher<'_, S> {
    fn session_reached_redis(&self) -> bool {
        self.up == Some(true)
    }

    fn set_up(&mut self, up: bool, error: Option<&FlagStoreError>) {
        self.sink.set_store_up(up);
        if self.up == Some(up) {
            return;
        }
        self.up = Some(up);
        let events = self.events;
        match (up, error) {
            (true, _) => events.report(
                Source::Flags,
                Level::Info,
                "flag store connected",
                &self.settings.key,
            ),
            (false, error) => events.report(
                Source::Flags,
                Level::Warn,
                "flag store unreachable; serving the last good flags",
                error.map_or_else(String::new, ToString::to_string),
            ),
        }
    }

    /// One connection's life: subscribe, read, then re-read on every notification
    /// and every poll tick. Returns on the first error. (A Redis Cluster sends
    /// keyspace notifications from the node holding the key only: there, polling.)
    async fn session(&mut self, store: &Store) -> Result<(), FlagStoreError> {
        let mut conn = timed(store.connect()).await?;
        let mut messages = if store.is_cluster() {
            futures_util::stream::pending().boxed()
        } else {
            self.enable_notifications(&mut conn).await;
            let client = timed(store.node_client()).await?;
            let db = client.get_connection_info().redis_settings().db();
            let mut pubsub = timed(client.get_async_pubsub()).await?;
            timed(pubsub.subscribe(format!("__keyspace@{db}__:{}", self.settings.key))).await?;
            pubsub.into_on_message().map(|_| ()).boxed()
        };

        self.refresh(&mut conn).await?;
        self.set_up(true, None);
        let mut tick = tokio::time::interval(Duration::from_millis(self.settings.poll_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the read above covered it
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(()) => self.refresh(&mut conn).await?,
                    None => return Err(FlagStoreError::Closed),
                },
                _ = tick.tick() => self.refresh(&mut conn).await?,
            }
        }
    }

    /// Turns on keyspace notifications for hashes ("Kh"), keeping the classes already
    /// set. Managed Redis often refuses CONFIG: then polling alone carries changes.
    async fn enable_notifications(&mut self, conn: &mut Conn) {
        let result: Result<(), redis::RedisError> = async {
            let (_, current): (String, String) = redis::cmd("CONFIG")
                .arg("GET")
                .arg("notify-keyspace-events")
                .query_async(conn)
                .await?;
            let has_keyspace = current.contains('K');
            let has_hash = current.contains('h') || current.contains('A');
            if !(has_keyspace && has_hash) {
                let mut wanted = current.clone();
                if !has_keyspace {
                    wanted.push('K');
                }
                if !has_hash {
                    wanted.push('h');
                }
                redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("notify-keyspace-events")
                    .arg(&wanted)
                    .query_async::<()>(conn)
                    .await?;
                info!(from = %current, to = %wanted, "enabled keyspace notifications");
            }
            Ok(())
        }
        .await;
        if let Err(error) = result
            && !self.config_refused_logged
        {
            self.config_refused_logged = true;
            warn!(%error, poll_ms = self.settings.poll_ms, "cannot enable keyspace notifications; relying on polling");
        }
    }

    /// Reads the whole hash and swaps in a new snapshot if anything changed.
    async fn refresh(&mut self, conn: &mut Conn) -> Result<(), FlagStoreError> {
        let raw: Vec<(String, String)> = timed(conn.hgetall(&self.settings.key)).await?;
        let Some(current) = self.sink.flags_in_force(&self.settings) else {
            // A reload moved the flags elsewhere while this read was under way: the
            // restarted watcher (or the static flags) speaks for them now.
            return Ok(());
        };
        let (set, rejected) = build(
            raw.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &current.set,
        );
        self.report(&rejected);
        self.sink.publish(&set, FlagSource::Redis);
        Ok(())
    }

    fn report(&mut self, rejected: &[Rejected]) {
        self.last_rejected
            .retain(|field, _| rejected.iter().any(|r| &r.field == field));
        for r in rejected {
            if self.last_rejected.get(&r.field) == Some(&r.value) {
                continue;
            }
            self.last_rejected.insert(r.field.clone(), r.value.clone());
            self.metrics.count_flag_rejected(&r.field);
            self.events.report(
                Source::Flags,
                Level::Warn,
                "ignored invalid flag value; last good value kept",
                format_args!("{}={:?}: {}", r.field, r.value, r.reason),
            );
        }
    }
}

async fn timed<T, E>(fut: impl Future<Output = Result<T, E>>) -> Result<T, FlagStoreError>
where
    FlagStoreError: From<E>,
{
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(result) => result.map_err(FlagStoreError::from),
        Err(_) => Err(FlagStoreError::Timeout(COMMAND_TIMEOUT)),
    }
}
