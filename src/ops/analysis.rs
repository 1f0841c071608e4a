//! The canary analysis task: every `[analysis] interval_ms` it judges the canary
//! from this proxy's own request records ([`crate::canary`]), then acts on the
//! verdict through the shared record, so every proxy on the same Redis follows.
//!
//! With Redis, the record is the hash `canarygate:analysis` and the levers are the
//! reserved fields of the flag hash: a rollback writes `canary_percent 0` and
//! `canary_auto off` there, and the flag watchers of every instance apply it at once.
//! Every write is one Lua script that first compares the record's `state` and `step`
//! with what this round read (compare-and-set): when two instances act at once, the
//! second finds the record changed, writes nothing and follows on its next round.
//! Without Redis the same decisions apply to this instance only, through its
//! snapshot. A round that cannot reach Redis logs, counts
//! `canarygate_canary_store_errors_total` and goes on; if the canary must be rolled
//! back meanwhile, it is rolled back locally at once and in Redis as soon as it answers.
//!
//! The task also keeps the error rule's evidence from check to check (a
//! [`Detector`]: each complete slot of the window folded in once), off the request
//! path. It starts again exactly where the window does (a canary back in judgement
//! after a rollback or a manual spell: the recorder is cleared), and also when the
//! slots change length (a new `window_ms`) or the analysis stops judging (off, or
//! no canary pool), since the slots it would next see are not the ones it counted.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::canary::board::Entry;
use crate::canary::judge::{Check, Rules, judge};
use crate::canary::sequential::Detector;
use crate::canary::verdict::{Action, Levers, Record, Run, State};
use crate::clock::{fleet_epoch, fleet_ms, now_ms};
use crate::config::FlagsConfig;
use crate::config::alerts::Severity;
use crate::config::analysis::AnalysisConfig;
use crate::flags::model::{CANARY, CANARY_AUTO, CANARY_PERCENT, FlagSet, build};
use crate::flags::store::{Conn, Store as RedisDeployment};
use crate::observe::events::{Level, Source};
use crate::ops::alerts::Dispatcher;
use crate::shadow::gate;
use crate::state::AppState;

/// Alert kinds.
const ROLLBACK_ALERT: &str = "canary_rollback";
const MANUAL_FAILING_ALERT: &str = "canary_failing_manual";
const HEALTHY_ALERT: &str = "canary_healthy";
const SHADOW_FAILED_ALERT: &str = "canary_shadow_failed";

/// Why the shared record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot use flags.redis_url: {0}")]
    Settings(String),
}

/// Compare-and-set of the record and the levers in one step. KEYS: the flag hash,
/// the analysis hash. ARGV: the expected state ('' for none) and step, the number of
/// flag fields n, n field/value pairs for the flag hash, then the record's pairs.
const WRITE_SCRIPT: &str = r"
local state = redis.call('HGET', KEYS[2], 'state') or ''
local step = tonumber(redis.call('HGET', KEYS[2], 'step') or '0') or 0
if state ~= ARGV[1] or step ~= tonumber(ARGV[2]) then return 0 end
local n = tonumber(ARGV[3])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + 2 * n)) end
redis.call('HSET', KEYS[2], unpack(ARGV, 4 + 2 * n))
return 1
";

/// Where the record and the levers live.
enum Store {
    Redis(Box<RedisStore>),
    /// No Redis: the record is kept here, the levers are this instance's flags.
    Local {
        record: Record,
    },
}

struct RedisStore {
    deployment: RedisDeployment,
    conn: Option<Conn>,
    /// The settings it was opened with (the flag hash is `flags.key`): others
    /// mean a new store.
    flags: FlagsConfig,
    record_key: String,
}

impl Store {
    fn open(flags: &FlagsConfig, record_key: &str) -> Result<Self, StoreError> {
        let Some(url) = &flags.redis_url else {
            return Ok(Self::Local {
                record: Record::default(),
            });
        };
        Ok(Self::Redis(Box::new(RedisStore {
            deployment: RedisDeployment::open(url, flags).map_err(StoreError::Settings)?,
            conn: None,
            flags: flags.clone(),
            record_key: record_key.to_owned(),
        })))
    }

    fn serves(&self, flags: &FlagsConfig, record_key: &str) -> bool {
        match self {
            Self::Redis(redis) => {
                !redis.flags.store_differs(flags) && redis.record_key == record_key
            }
            Self::Local { .. } => flags.redis_url.is_none(),
        }
    }

    /// The record and the levers as they are now. From Redis both come from one
    /// atomic read; a lever with an invalid value keeps this instance's last good one.
    async fn read(&mut self, state: &AppState) -> Result<(Record, Levers), StoreError> {
        let current = std::sync::Arc::clone(&state.snapshot().flags);
        match self {
            Self::Local { record } => Ok((record.clone(), levers(&current.set))),
            Self::Redis(redis) => {
                let conn = connection(&redis.deployment, &mut redis.conn).await?;
                let (record, raw) = read_raw(conn, &redis.flags.key, &redis.record_key).await?;
                let (set, _) = build(raw.iter().map(|(k, v)| (*k, v.as_str())), &current.set);
                Ok((record, levers(&set)))
            }
        }
    }

    /// Writes `flags` and `record` if the record still has `expected`'s state and
    /// step. Returns whether it was written.
    async fn write(
        &mut self,
        state: &AppState,
        expected: &Record,
        flags: &[(&str, String)],
        record: &Record,
    ) -> Result<bool, StoreError> {
        match self {
            Self::Local { record: kept } => {
                if kept.state != expected.state || kept.step != expected.step {
                    return Ok(false);
                }
                apply_locally(state, flags);
                kept.clone_from(record);
                Ok(true)
            }
            Self::Redis(redis) => {
                let conn = connection(&redis.deployment, &mut redis.conn).await?;
                let script = redis::Script::new(WRITE_SCRIPT);
                let mut invocation = script.key(&redis.flags.key);
                invocation
                    .key(&redis.record_key)
                    .arg(expected.state.map_or("", State::as_str))
                    .arg(expected.step)
                    .arg(flags.len());
                for (field, value) in flags {
                    invocation.arg(*field).arg(value);
                }
                for (field, value) in record.to_fields() {
                    invocation.arg(field).arg(value);
                }
                let written: i64 = invocation.invoke_async(conn).await?;
                Ok(written == 1)
            }
        }
    }

    /// Forgets a broken connection, so the next round reconnects.
    fn reset(&mut self) {
        if let Self::Redis(redis) = self {
            redis.conn = None;
        }
    }
}

/// The record and the reserved flags' raw values, in one atomic read.
async fn read_raw(
    conn: &mut Conn,
    flags_key: &str,
    record_key: &str,
) -> Result<(Record, Vec<(&'static str, String)>), StoreError> {
    const LEVERS: [&str; 3] = [CANARY_PERCENT, CANARY, CANARY_AUTO];
    let (fields, raw): (HashMap<String, String>, Vec<Option<String>>) = redis::pipe()
        .atomic()
        .hgetall(record_key)
        .cmd("HMGET")
        .arg(flags_key)
        .arg(&LEVERS)
        .query_async(conn)
        .await?;
    let levers = LEVERS
        .into_iter()
        .zip(raw)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    Ok((Record::from_fields(&fields), levers))
}

/// `canarygate canary status`: the shared record and the reserved flags' raw
/// values (absent fields left out), read from the Redis `flags` names.
pub async fn shared_status(
    flags: &FlagsConfig,
    record_key: &str,
) -> Result<(Record, Vec<(&'static str, String)>), StoreError> {
    let url = flags.redis_url.as_deref().ok_or_else(|| {
        StoreError::Settings(
            "no flags.redis_url: without Redis the state lives in the proxy (GET /analysis)"
                .to_owned(),
        )
    })?;
    let deployment = RedisDeployment::open(url, flags).map_err(StoreError::Settings)?;
    let mut conn = deployment.connect().await?;
    read_raw(&mut conn, &flags.key, record_key).await
}

async fn connection<'a>(
    deployment: &RedisDeployment,
    conn: &'a mut Option<Conn>,
) -> Result<&'a mut Conn, StoreError> {
    if conn.is_none() {
        *conn = Some(deployment.connect().await?);
    }
    Ok(conn.as_mut().unwrap_or_else(|| unreachable!("set above")))
}

fn levers(set: &FlagSet) -> Levers {
    Levers {
        percent: set.canary_percent,
        switch: set.canary_enabled,
        auto: set.canary_auto,
    }
}

/// Sets reserved flags in this instance's snapshot only (no Redis to write them to).
pub fn apply_locally(state: &AppState, flags: &[(&str, String)]) {
    let current = std::sync::Arc::clone(&state.snapshot().flags);
    let mut set = current.set.clone();
    for (field, value) in flags {
        let (changed, _) = build([(*field, value.as_str())], &set);
        match *field {
            CANARY_PERCENT => set.canary_percent = changed.canary_percent,
            CANARY_AUTO => set.canary_auto = changed.canary_auto,
            _ => set.canary_enabled = changed.canary_enabled,
        }
    }
    state.publish_flags(&set, current.source);
}

/// Runs the analysis until `cancel`; idle while `[analysis] enabled` is false.
pub async fn run(state: AppState, alerts: Dispatcher, instance: String, cancel: CancellationToken) {
    let mut analysis = Analysis {
        state,
        alerts,
        instance,
        store: None,
        run: Run::default(),
        seen: None,
        store_down: false,
        rolled_back_locally: false,
        clock_epoch: None,
        errors: Detector::default(),
        errors_window_ms: 0,
    };
    let mut period = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let interval_ms = analysis.state.snapshot().config.analysis.interval_ms.max(1);
        if interval_ms != period {
            // A reload changed the interval: start a new tick (its first fires at once).
            period = interval_ms;
            tick = tokio::time::interval(Duration::from_millis(interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => analysis.round().await,
        }
    }
}

struct Analysis {
    state: AppState,
    alerts: Dispatcher,
    instance: String,
    store: Option<Store>,
    run: Run,
    /// The record state seen last round, to notice what another instance did.
    seen: Option<Option<State>>,
    store_down: bool,
    rolled_back_locally: bool,
    /// The fleet clock's epoch at the last round.
    clock_epoch: Option<u64>,
    /// The error rule's evidence, kept across checks.
    errors: Detector,
    /// The `window_ms` its slots were counted in.
    errors_window_ms: u64,
}

impl Analysis {
    async fn round(&mut self) {
        let snapshot = self.state.snapshot();
        let config = snapshot.config.analysis.clone();
        let flags_config = snapshot.config.flags.clone();
        let has_canary = !snapshot.pools.canary.is_empty();
        drop(snapshot);
        // The fleet's time (Redis TIME, see `clock`): `step_since_ms` in the shared
        // record may have been written by another host, whose clock this one's may
        // not match. A passing streak measured across a jump of that clock (its
        // first reading, Redis changing time) starts again: never a step too soon.
        let now = fleet_ms();
        let epoch = fleet_epoch();
        if self.clock_epoch.replace(epoch).is_some_and(|e| e != epoch) {
            self.run.passing_since_ms = None;
        }
        if !config.enabled || !has_canary {
            self.errors = Detector::default();
            self.publish(config.enabled, State::Idle, &Record::default(), now);
            return;
        }
        if self.errors_window_ms != config.window_ms {
            self.errors_window_ms = config.window_ms;
            self.errors = Detector::default();
        }
        let window = self.state.metrics.recorder.judged(now_ms());
        let check = judge(&Rules::new(&config), &window, &mut self.errors);
        self.state.metrics.analysis.observe(&check);
        self.run.observe(&check, config.failure_threshold, now);
        self.state.analysis.push(Entry {
            at_ms: now,
            check: check.clone(),
        });

        if !self
            .store
            .as_ref()
            .is_some_and(|s| s.serves(&flags_config, &config.redis_key))
        {
            match Store::open(&flags_config, &config.redis_key) {
                Ok(store) => self.store = Some(store),
                Err(error) => return self.store_failed(&error, &config, &check, now),
            }
        }
        let Some(mut store) = self.store.take() else {
            return;
        };
        let result = self.act(&mut store, &config, &check, now).await;
        if let Err(error) = result {
            store.reset();
            self.store_failed(&error, &config, &check, now);
        } else if self.store_down {
            self.store_down = false;
            self.state.events.report(
                Source::Analysis,
                Level::Info,
                "analysis store reachable again",
                "",
            );
        }
        self.store = Some(store);
    }

    /// Reads the record, follows what others did, decides and writes.
    async fn act(
        &mut self,
        store: &mut Store,
        config: &AnalysisConfig,
        check: &Check,
        now: u64,
    ) -> Result<(), StoreError> {
        let (record, levers) = store.read(&self.state).await?;
        self.follow(&record);
        let shadow = self.shadow_gate();
        let gated = shadow.is_some();
        let action = gate::decide(config, shadow, &record, &levers, &self.run, now);
        let mut next = record.clone();
        next.at = crate::ops::alerts::alert::now_rfc3339();
        next.instance.clone_from(&self.instance);
        let mut figures = serde_json::json!({
            "production": check.production,
            "canary": check.canary,
        });
        if gated {
            figures["shadow"] = serde_json::json!(self.state.shadow.totals());
        }
        next.figures = figures.to_string();
        let mut flags: Vec<(&str, String)> = Vec::new();
        match &action {
            Action::Nothing => {}
            Action::Start { percent } => {
                next.state = Some(State::Progressing);
                next.percent = percent.or(levers.percent);
                next.switch = levers.switch;
                next.step = 0;
                next.step_since_ms = now;
                next.reason = match percent {
                    Some(p) => format!("canary at the first step, {p}%"),
                    None => "judging the canary at its current split".to_owned(),
                };
                if let Some(p) = percent {
                    flags.push((CANARY_PERCENT, p.to_string()));
                }
            }
            Action::Step { index, percent } => {
                next.step = *index;
                next.step_since_ms = now;
                next.percent = Some(*percent);
                next.reason = format!(
                    "step {} of {}: canary at {percent}%",
                    index + 1,
                    config.steps.len()
                );
                flags.push((CANARY_PERCENT, percent.to_string()));
            }
            Action::Healthy => {
                next.state = Some(State::Healthy);
                next.reason = format!(
                    "canary healthy at {}% after {} steps",
                    record.percent.unwrap_or(0),
                    config.steps.len()
                );
            }
            Action::RollBack => {
                next.state = Some(State::RolledBack);
                next.percent = Some(0);
                next.reason.clone_from(&check.reason);
                flags.push((CANARY_PERCENT, "0".to_owned()));
                flags.push((CANARY_AUTO, "off".to_owned()));
            }
            Action::Manual { reason } => {
                next.state = Some(State::Manual);
                next.percent = levers.percent;
                next.switch = levers.switch;
                next.reason.clone_from(reason);
                if levers.auto {
                    flags.push((CANARY_AUTO, "off".to_owned()));
                }
            }
            Action::Shadow => {
                let shadow = &self.state.snapshot().config.shadow;
                next.state = Some(State::Shadowing);
                next.percent = levers.percent;
                next.switch = levers.switch;
                next.step = 0;
                next.step_since_ms = now;
                next.reason = format!(
                    "shadowing: no users until {} mirrored requests compare with at most \
                     {:.2}% differing",
                    shadow.min_samples,
                    shadow.max_diff_ratio * 100.0
                );
            }
            Action::ShadowFailed { reason, .. } => {
                next.state = Some(State::ShadowFailed);
                next.percent = Some(0);
                next.reason.clone_from(reason);
                flags.push((CANARY_PERCENT, "0".to_owned()));
                flags.push((CANARY_AUTO, "off".to_owned()));
            }
        }
        // While shadowing, each round rewrites the record's figures and why users are
        // still held (one small write a round), so `canary status` and `/analysis`
        // show the shadow's progress, or its lack of traffic, as it is now.
        let shadowing = gated && record.state == Some(State::Shadowing);
        if action == Action::Nothing && shadowing {
            let snapshot = self.state.snapshot();
            next.reason = gate::waiting(&snapshot.config.shadow, &self.state.shadow.totals());
        }
        // Nothing else to do writes nothing: Redis sees a write per action, not per check.
        let progress = action == Action::Nothing
            && shadowing
            && (next.reason != record.reason || next.figures != record.figures);
        let acted = (action != Action::Nothing || progress)
            && store.write(&self.state, &record, &flags, &next).await?;
        let shown = if acted { next } else { record };
        if acted {
            self.announce(&action, &shown, check);
            if self.seen.replace(shown.state) != Some(shown.state) {
                self.restart_run(shown.state);
            }
        }
        if shown.state == Some(State::Manual) && self.run.failures >= config.failure_threshold {
            self.alerts.fire(
                Severity::Warning,
                MANUAL_FAILING_ALERT,
                "canary failing while an operator holds the levers; not rolled back",
                &check.reason,
            );
        }
        let display = match shown.state {
            None => State::Idle,
            Some(State::Progressing)
                if self.run.last == Some(crate::canary::judge::Outcome::Hold) =>
            {
                State::Holding
            }
            Some(state) => state,
        };
        self.publish(true, display, &shown, now);
        // Read by routing only with `[shadow] gate` on; after the publish, so while
        // `/analysis` shows a state that holds users, they are held.
        self.state.shadow.set_hold(gate::holds_users(shown.state));
        if self.rolled_back_locally && shown.state == Some(State::RolledBack) {
            self.rolled_back_locally = false;
        }
        Ok(())
    }

    /// Notices what another instance (or an operator) did to the record since the
    /// last round: a new state restarts this instance's run of checks.
    fn follow(&mut self, record: &Record) {
        match self.seen.replace(record.state) {
            // The first round keeps the check it just made.
            None => return,
            Some(seen) if seen == record.state => return,
            Some(_) => self.restart_run(record.state),
        }
        if record.state == Some(State::RolledBack) && record.instance != self.instance {
            self.state.events.report(
                Source::Analysis,
                Level::Warn,
                "canary rolled back by another instance",
                format_args!("{}: {}", record.instance, record.reason),
            );
        }
    }

    /// A new state starts a new run of checks; a canary back in judgement starts
    /// from an empty window and no error evidence (both may hold the requests of
    /// the canary that was rolled back).
    fn restart_run(&mut self, state: Option<State>) {
        self.run = Run::default();
        if state == Some(State::Progressing) {
            self.state.metrics.recorder.clear();
            self.errors = Detector::default();
        }
        if state == Some(State::Shadowing) {
            self.state.shadow.clear();
        }
    }

    /// Logs, reports and alerts one action this instance took.
    fn announce(&self, action: &Action, record: &Record, check: &Check) {
        let events = &self.state.events;
        match action {
            Action::Nothing => {}
            Action::Start { .. } => {
                self.alerts
                    .resolve(ROLLBACK_ALERT, "canary analysis back in charge");
                events.report(
                    Source::Analysis,
                    Level::Info,
                    "canary analysis in charge",
                    &record.reason,
                );
            }
            Action::Step { .. } => {
                events.report(
                    Source::Analysis,
                    Level::Info,
                    "canary stepped up",
                    &record.reason,
                );
            }
            Action::Healthy => {
                events.report(
                    Source::Analysis,
                    Level::Info,
                    "canary healthy",
                    &record.reason,
                );
                self.alerts.fire(
                    Severity::Info,
                    HEALTHY_ALERT,
                    &record.reason,
                    &figures(check),
                );
            }
            Action::RollBack => {
                events.report(
                    Source::Analysis,
                    Level::Warn,
                    "canary rolled back",
                    &record.reason,
                );
                self.alerts.fire(
                    Severity::Critical,
                    ROLLBACK_ALERT,
                    &format!("canary rolled back: {}", record.reason),
                    &figures(check),
                );
            }
            Action::Manual { reason } => {
                events.report(
                    Source::Analysis,
                    Level::Warn,
                    "canary analysis paused: an operator holds the levers",
                    reason,
                );
            }
            Action::Shadow => {
                self.alerts
                    .resolve(SHADOW_FAILED_ALERT, "the canary is shadowed again");
                events.report(
                    Source::Analysis,
                    Level::Info,
                    "canary shadowing",
                    &record.reason,
                );
            }
            Action::ShadowFailed { reason, details } => {
                events.report(
                    Source::Analysis,
                    Level::Warn,
                    "canary failed its shadow",
                    reason,
                );
                self.alerts.fire(
                    Severity::Critical,
                    SHADOW_FAILED_ALERT,
                    &format!("canary failed its shadow; it keeps no users: {reason}"),
                    details,
                );
            }
        }
    }

    /// A round that could not reach the store: logged once per outage and counted;
    /// a rollback that is due is applied locally meanwhile.
    fn store_failed(
        &mut self,
        error: &StoreError,
        config: &AnalysisConfig,
        check: &Check,
        now: u64,
    ) {
        self.state.metrics.analysis.store_error();
        if !self.store_down {
            self.store_down = true;
            self.state.events.report(
                Source::Analysis,
                Level::Warn,
                "analysis store unreachable; judging on, acting locally",
                error,
            );
        }
        if self.run.failures >= config.failure_threshold && !self.rolled_back_locally {
            self.rolled_back_locally = true;
            apply_locally(&self.state, &[(CANARY_PERCENT, "0".to_owned())]);
            let reason = format!(
                "{} (locally: the analysis store is unreachable)",
                check.reason
            );
            self.state
                .events
                .report(Source::Analysis, Level::Warn, "canary rolled back", &reason);
            self.alerts.fire(
                Severity::Critical,
                ROLLBACK_ALERT,
                &format!("canary rolled back: {reason}"),
                &figures(check),
            );
        }
        let shown = Record {
            reason: format!("analysis store unreachable: {error}"),
            ..Record::default()
        };
        let state = if self.rolled_back_locally {
            State::RolledBack
        } else {
            State::Holding
        };
        self.publish(true, state, &shown, now);
    }

    /// The shadow's verdict with `[shadow] gate` on, else `None`.
    fn shadow_gate(&self) -> Option<gate::Verdict> {
        let snapshot = self.state.snapshot();
        let config = &snapshot.config.shadow;
        config.gate.then(|| {
            let shadow = &self.state.shadow;
            gate::verdict(config, &shadow.totals(), || shadow.failure_details())
        })
    }

    fn publish(&self, enabled: bool, state: State, record: &Record, now: u64) {
        self.state.metrics.analysis.set_state(state);
        self.state.analysis.set(enabled, state, record, now);
    }
}

/// Both pools' figures, for an alert's details.
fn figures(check: &Check) -> String {
    let pool = |name: &str, f: &crate::canary::judge::Figures| {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
        format!(
            "{name}: {} requests judged, {} errors ({:.2}%), p50 {}, p99 {}; not judged: {} past the client cap of {}, {} placed apart",
            f.requests,
            f.errors,
            f.error_ratio * 100.0,
            ms(f.p50_ms),
            ms(f.p99_ms),
            f.capped,
            f.client_cap,
            f.apart
        )
    };
    format!(
        "{}\n{}\n{}",
        check.reason,
        pool("canary", &check.canary),
        pool("production", &check.production)
    )
}
