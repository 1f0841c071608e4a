//! Heartbeats and the fleet view. Every `fleet.heartbeat_ms` this instance writes
//! what it applies (id, version, flags version and digest, effective canary
//! percent, analysis state) to `<fleet.key>:<id>` with a TTL of `fleet.seen_ms`,
//! scores its id by time in the sorted set `<fleet.key>`, and reads everyone's back
//! in the same round trip: the view behind `/fleet`, the status page and
//! `canarygate_fleet_instances` / `canarygate_fleet_flags_in_sync`.
//!
//! Every time here is the fleet's: each round first reads Redis `TIME`, and the
//! heartbeat's `at_ms`, its score and the horizon of who is listed are taken from
//! it ([`crate::clock::fleet_ms`]), never from this host's clock, so a host whose
//! clock is off (by `seen_ms` or more) neither drops out of the others' view nor
//! drops them out of its own. The key's TTL is Redis's own.
//!
//! An instance that stops (or is cut off) stops writing: its key expires after
//! `seen_ms` and it drops out of everyone's view. Cut off from Redis, this instance
//! keeps the last view it read and says so (`connected: false`, and since when);
//! the flags it serves are the watcher's last good snapshot. Without Redis the fleet
//! is this instance alone.
//!
//! Each round also reads the fleet's count of operators' changes to the rollout
//! ([`crate::ops::control`]) into `canarygate_canary_commands_total`, since a change
//! from the CLI is made by a process nobody scrapes.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::{fleet_ms, from_redis_time, set_fleet_time};
use crate::config::{FlagsConfig, FleetConfig};
use crate::flags::store::{Conn, Store};
use crate::fleet::{Member, View};
use crate::observe::events::{Level, Source};
use crate::ops::control::{self, Change, Via};
use crate::state::AppState;

/// Why one heartbeat round failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("flags.redis_url: {0}")]
    Settings(String),
}

/// Beats until `cancel`.
pub async fn run(state: AppState, cancel: CancellationToken) {
    let mut fleet = Fleet {
        state,
        store: None,
        conn: None,
        connected: None,
        commands: None,
    };
    for change in Change::ALL {
        for via in Via::ALL {
            fleet
                .state
                .metrics
                .canary_commands
                .with_label_values(&[change.label(), via.as_str()]);
        }
    }
    loop {
        fleet.round().await;
        let period = fleet.state.snapshot().config.fleet.heartbeat_ms.max(1);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(period)) => {}
        }
    }
}

struct Fleet {
    state: AppState,
    /// The store and the settings it was opened with.
    store: Option<(Store, FlagsConfig)>,
    conn: Option<Conn>,
    /// Whether the last round reached Redis (to log changes once).
    connected: Option<bool>,
    /// Operators' changes counted in Redis, as last read (`None`: not read yet).
    commands: Option<HashMap<(&'static str, Via), u64>>,
}

impl Fleet {
    async fn round(&mut self) {
        let snapshot = self.state.snapshot();
        let config = snapshot.config.fleet.clone();
        let flags_config = snapshot.config.flags.clone();
        let analysis = self.state.analysis.view().state;
        let mut me = Member {
            id: self.state.instance().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            flags_version: snapshot.flags.version,
            flags_digest: snapshot.flags.digest(),
            effective_canary_percent: snapshot
                .flags
                .effective_percent(snapshot.config.routing.canary_percent),
            analysis_state: analysis.map_or("idle", |s| s.as_str()).to_owned(),
            at_ms: fleet_ms(),
        };
        drop(snapshot);
        let instance = me.id.clone();
        let mut read_at_ms = me.at_ms;
        if flags_config.redis_url.is_none() {
            self.store = None;
            self.conn = None;
            return self.publish(View {
                instance,
                members: vec![me],
                connected: true,
                read_at_ms,
                shared: false,
            });
        }
        let record_key = self.state.snapshot().config.analysis.redis_key.clone();
        match self.beat(&flags_config, &config, &mut me).await {
            Ok(members) => {
                self.follow_commands(&record_key).await;
                read_at_ms = me.at_ms;
                self.note_connected(true, None);
                self.publish(View {
                    instance,
                    members,
                    connected: true,
                    read_at_ms,
                    shared: true,
                });
            }
            Err(error) => {
                self.conn = None;
                self.state.metrics.fleet_heartbeat_errors.inc();
                self.note_connected(false, Some(&error));
                let mut view = self.state.fleet.view();
                view.instance = instance;
                view.connected = false;
                view.shared = true;
                if view.members.is_empty() {
                    view.members = vec![me];
                    view.read_at_ms = read_at_ms;
                }
                self.publish(view);
            }
        }
    }

    /// Reads Redis `TIME` (the fleet's clock, and `me`'s `at_ms`), writes this
    /// instance's heartbeat and reads the fleet's, in three round trips.
    async fn beat(
        &mut self,
        flags: &FlagsConfig,
        config: &FleetConfig,
        me: &mut Member,
    ) -> Result<Vec<Member>, FleetError> {
        if self
            .store
            .as_ref()
            .is_none_or(|(_, opened)| opened.store_differs(flags))
        {
            let url = flags.redis_url.as_deref().unwrap_or_default();
            let store = Store::open(url, flags).map_err(FleetError::Settings)?;
            self.store = Some((store, flags.clone()));
            self.conn = None;
        }
        let Some((store, _)) = &self.store else {
            return Ok(Vec::new());
        };
        if self.conn.is_none() {
            self.conn = Some(store.connect().await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
        me.at_ms = from_redis_time(seconds, micros);
        set_fleet_time(me.at_ms);
        let json = serde_json::to_string(me).unwrap_or_default();
        let horizon = me.at_ms.saturating_sub(config.seen_ms);
        let ids: Vec<String> = redis::pipe()
            .cmd("SET")
            .arg(format!("{}:{}", config.key, me.id))
            .arg(json)
            .arg("PX")
            .arg(config.seen_ms)
            .ignore()
            .cmd("ZADD")
            .arg(&config.key)
            .arg(me.at_ms)
            .arg(&me.id)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&config.key)
            .arg("-inf")
            .arg(format!("({horizon}"))
            .ignore()
            .cmd("ZRANGEBYSCORE")
            .arg(&config.key)
            .arg(horizon)
            .arg("+inf")
            .query_async::<(Vec<String>,)>(conn)
            .await?
            .0;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{}:{id}", config.key))
            .collect();
        let beats: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        // An expired key (an instance that stopped) reads as nil: not listed.
        let mut members: Vec<Member> = beats
            .iter()
            .flatten()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(members)
    }

    /// Reads the fleet's count of operators' changes ([`crate::ops::control`]) into
    /// `canarygate_canary_commands_total`; each one new since the last round is an
    /// event here (a change from the CLI shows nowhere else in the proxies).
    async fn follow_commands(&mut self, record_key: &str) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let counts = match control::read_counts(conn, record_key).await {
            Ok(counts) => counts,
            Err(error) => {
                warn!(%error, "cannot read the canary command counts");
                return;
            }
        };
        let first = self.commands.is_none();
        let seen = self.commands.get_or_insert_with(HashMap::new);
        for (change, via, count) in counts {
            let before = seen.insert((change.label(), via), count).unwrap_or(0);
            let new = count.saturating_sub(before);
            if new == 0 {
                continue;
            }
            self.state
                .metrics
                .canary_commands
                .with_label_values(&[change.label(), via.as_str()])
                .inc_by(new);
            if !first {
                info!(
                    command = change.label(),
                    source = via.as_str(),
                    count = new,
                    "canary command seen"
                );
                self.state.events.report(
                    Source::Analysis,
                    Level::Warn,
                    "canary command",
                    format_args!(
                        "{} by {via} ({new} since the last fleet round)",
                        change.label()
                    ),
                );
            }
        }
    }

    fn note_connected(&mut self, up: bool, error: Option<&FleetError>) {
        if self.connected == Some(up) {
            return;
        }
        self.connected = Some(up);
        match error {
            None => info!("fleet heartbeats reach Redis"),
            Some(error) => {
                warn!(%error, "fleet heartbeats cannot reach Redis; showing the last fleet seen");
            }
        }
    }

    fn publish(&self, view: View) {
        let metrics = &self.state.metrics;
        metrics
            .fleet_instances
            .set(i64::try_from(view.members.len()).unwrap_or(i64::MAX));
        metrics.fleet_flags_in_sync.set(i64::from(view.in_sync()));
        self.state.fleet.set(view);
    }
}
