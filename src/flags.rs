//! Feature flags: a Redis hash turned into one validated, immutable [`Flags`] value
//! that lives in the snapshot, so the request path reads flags lock-free and never
//! waits on Redis.
//!
//! Operators write the hash with `redis-cli` (`HSET canarygate:flags new_checkout on`).
//! The watcher ([`run`]) follows it two ways at once: keyspace notifications for
//! speed, and a full re-read every `poll_ms` because pub/sub is fire-and-forget and
//! loses events while disconnected. Every read goes through [`build`], which keeps the
//! last good value of any field whose new value is invalid: bad input never moves
//! traffic. When Redis is down the proxy serves on with what it has.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use http::HeaderValue;
use redis::AsyncCommands as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::FlagsConfig;
use crate::state::AppState;

/// Reserved field: overrides `[routing] canary_percent` live (0..=100).
pub const CANARY_PERCENT: &str = "canary_percent";
/// Reserved field: the kill switch; `off` sends all traffic to production.
pub const CANARY: &str = "canary";

/// Longest flag name and string value accepted.
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_VALUE_LEN: usize = 256;

/// One flag's value: booleans are normalized, anything else is passed on as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagValue {
    Bool(bool),
    Text(String),
}

impl FlagValue {
    /// The value as sent to the application: `on`/`off` for booleans.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Bool(true) => "on",
            Self::Bool(false) => "off",
            Self::Text(s) => s,
        }
    }
}

/// Why a field's value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("flag names are 1 to 64 characters of [a-z0-9_.-]")]
    BadName,
    #[error("values are at most 256 bytes of printable text without ';'")]
    BadValue,
    #[error("canary_percent must be an integer 0..=100")]
    BadPercent,
    #[error("canary must be on/off, true/false or 1/0")]
    BadSwitch,
}

/// Parses a boolean spelling: on/off, true/false, 1/0, any case.
pub fn parse_bool(raw: &str) -> Option<bool> {
    const TRUE: [&str; 3] = ["on", "true", "1"];
    const FALSE: [&str; 3] = ["off", "false", "0"];
    if TRUE.iter().any(|t| raw.eq_ignore_ascii_case(t)) {
        Some(true)
    } else if FALSE.iter().any(|f| raw.eq_ignore_ascii_case(f)) {
        Some(false)
    } else {
        None
    }
}

pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

/// A regular flag's value. Text must fit in the `name=value;...` header: printable
/// ASCII (space allowed) without `;`.
pub fn parse_value(raw: &str) -> Result<FlagValue, Rejection> {
    if let Some(b) = parse_bool(raw) {
        return Ok(FlagValue::Bool(b));
    }
    if raw.len() > MAX_VALUE_LEN || !raw.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b';') {
        return Err(Rejection::BadValue);
    }
    Ok(FlagValue::Text(raw.to_owned()))
}

pub fn parse_percent(raw: &str) -> Result<u8, Rejection> {
    raw.trim()
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 100)
        .ok_or(Rejection::BadPercent)
}

/// The validated content of the flag hash: what requests see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagSet {
    /// Regular flags, sorted by name.
    pub values: BTreeMap<String, FlagValue>,
    /// `canary_percent` from the hash; `None` means the config's value.
    pub canary_percent: Option<u8>,
    /// The kill switch; `true` unless the hash says `canary off`.
    pub canary_enabled: bool,
}

impl Default for FlagSet {
    fn default() -> Self {
        Self {
            values: BTreeMap::new(),
            canary_percent: None,
            canary_enabled: true,
        }
    }
}

/// A field whose value was ignored, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub field: String,
    pub value: String,
    pub reason: Rejection,
}

/// Builds the next flag set from the raw hash. A field with an invalid value keeps
/// its value from `previous` (or stays absent); a field with an invalid name is
/// skipped. Both are reported so the caller can log and count them.
pub fn build<'a>(
    raw: impl IntoIterator<Item = (&'a str, &'a str)>,
    previous: &FlagSet,
) -> (FlagSet, Vec<Rejected>) {
    let mut next = FlagSet::default();
    let mut rejected = Vec::new();
    let mut reject = |field: &str, value: &str, reason| {
        rejected.push(Rejected {
            field: field.to_owned(),
            value: value.to_owned(),
            reason,
        });
    };
    for (field, value) in raw {
        match field {
            CANARY_PERCENT => match parse_percent(value) {
                Ok(p) => next.canary_percent = Some(p),
                Err(reason) => {
                    next.canary_percent = previous.canary_percent;
                    reject(field, value, reason);
                }
            },
            CANARY => match parse_bool(value) {
                Some(on) => next.canary_enabled = on,
                None => {
                    next.canary_enabled = previous.canary_enabled;
                    reject(field, value, Rejection::BadSwitch);
                }
            },
            _ if !valid_name(field) => reject(field, value, Rejection::BadName),
            _ => match parse_value(value) {
                Ok(v) => {
                    next.values.insert(field.to_owned(), v);
                }
                Err(reason) => {
                    if let Some(old) = previous.values.get(field) {
                        next.values.insert(field.to_owned(), old.clone());
                    }
                    reject(field, value, reason);
                }
            },
        }
    }
    (next, rejected)
}

/// Renders the regular flags as the upstream header value:
/// `dark_mode=off;new_checkout=on`, sorted by name, reserved fields left out.
pub fn render_header(set: &FlagSet) -> HeaderValue {
    let mut out = String::new();
    for (name, value) in &set.values {
        if !out.is_empty() {
            out.push(';');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value.as_str());
    }
    // Names and values were validated as header-safe ASCII.
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Where the current flags came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Static,
    Redis,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Redis => "redis",
        }
    }
}

/// The flags in a snapshot: content plus bookkeeping, with the header pre-rendered
/// so a request only clones it.
#[derive(Debug, Clone)]
pub struct Flags {
    pub set: FlagSet,
    pub version: u64,
    pub source: Source,
    pub updated_at: SystemTime,
    pub header_value: HeaderValue,
}

impl Flags {
    pub fn new(set: FlagSet, version: u64, source: Source) -> Self {
        let header_value = render_header(&set);
        Self {
            set,
            version,
            source,
            updated_at: SystemTime::now(),
            header_value,
        }
    }

    /// The starting flags from `[flags.static]` (validated with the config).
    pub fn from_static(config: &FlagsConfig) -> Self {
        let raw: Vec<(&str, String)> = config
            .static_flags
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_raw()))
            .collect();
        let (set, _) = build(
            raw.iter().map(|(k, v)| (*k, v.as_str())),
            &FlagSet::default(),
        );
        Self::new(set, 1, Source::Static)
    }

    /// The canary share requests see: 0 while the kill switch is off.
    pub fn effective_percent(&self, configured: u8) -> u8 {
        if self.set.canary_enabled {
            self.set.canary_percent.unwrap_or(configured)
        } else {
            0
        }
    }
}

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

/// How long one Redis command may take before the session is considered broken.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff: doubles from the first value up to the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Watches the flag hash until `cancel`; returns at once when no Redis is configured.
pub async fn run(state: AppState, cancel: CancellationToken) {
    let config = state.snapshot().config.flags.clone();
    let Some(url) = config.redis_url.as_deref() else {
        debug!("no redis_url; flags come from [flags.static]");
        return;
    };
    // rustls needs a process-wide crypto provider for rediss://; a second install
    // (another proxy in the same process) is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match open_client(url, &config) {
        Ok(client) => client,
        Err(error) => {
            warn!(%error, "cannot use flags.redis_url; serving static flags");
            return;
        }
    };
    let mut watcher = Watcher {
        state,
        key: config.key.clone(),
        poll: Duration::from_millis(config.poll_ms),
        up: None,
        config_refused_logged: false,
        last_rejected: HashMap::new(),
    };
    let mut backoff = BACKOFF_FIRST;
    loop {
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            outcome = watcher.session(&client) => outcome,
        };
        if let Err(error) = outcome {
            if watcher.session_reached_redis() {
                backoff = BACKOFF_FIRST;
            }
            watcher.set_up(false, Some(&error));
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// Builds the Redis client: the URL with `${VAR}` expanded, and a private CA if set.
fn open_client(url: &str, config: &FlagsConfig) -> Result<redis::Client, String> {
    let url = crate::config::expand_env(url)?;
    match &config.tls_ca_path {
        None => redis::Client::open(url.as_str()).map_err(|e| e.to_string()),
        Some(path) => {
            let root_cert = std::fs::read(path)
                .map_err(|e| format!("cannot read flags.tls_ca_path {}: {e}", path.display()))?;
            redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
            .map_err(|e| e.to_string())
        }
    }
}

struct Watcher {
    state: AppState,
    key: String,
    poll: Duration,
    /// Last known store state, to log once per change rather than once per retry.
    up: Option<bool>,
    config_refused_logged: bool,
    /// The last refused value per field, so a bad value is logged and counted once,
    /// not on every poll.
    last_rejected: HashMap<String, String>,
}

impl Watcher {
    fn session_reached_redis(&self) -> bool {
        self.up == Some(true)
    }

    fn set_up(&mut self, up: bool, error: Option<&FlagStoreError>) {
        self.state.set_flag_store_up(up);
        if self.up == Some(up) {
            return;
        }
        self.up = Some(up);
        let events = &self.state.events;
        match (up, error) {
            (true, _) => {
                info!(key = %self.key, "flag store connected");
                events.push("flags", "info", "flag store connected");
            }
            (false, error) => {
                let error = error.map_or_else(String::new, ToString::to_string);
                warn!(%error, "flag store unreachable; serving the last good flags");
                events.push(
                    "flags",
                    "warn",
                    format!("flag store unreachable ({error}); serving the last good flags"),
                );
            }
        }
    }

    /// One connection's life: subscribe, read, then re-read on every notification
    /// and every poll tick. Returns on the first error.
    async fn session(&mut self, client: &redis::Client) -> Result<(), FlagStoreError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.enable_notifications(&mut conn).await;
        let db = client.get_connection_info().redis_settings().db();
        let mut pubsub = timed(client.get_async_pubsub()).await?;
        timed(pubsub.subscribe(format!("__keyspace@{db}__:{}", self.key))).await?;
        let mut messages = pubsub.into_on_message();

        self.refresh(&mut conn).await?;
        self.set_up(true, None);
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the read above covered it
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(_) => self.refresh(&mut conn).await?,
                    None => return Err(FlagStoreError::Closed),
                },
                _ = tick.tick() => self.refresh(&mut conn).await?,
            }
        }
    }

    /// Turns on keyspace notifications for hashes ("Kh"), keeping the classes already
    /// set. Managed Redis often refuses CONFIG: then polling alone carries changes.
    async fn enable_notifications(&mut self, conn: &mut redis::aio::MultiplexedConnection) {
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
            warn!(%error, poll_ms = u64::try_from(self.poll.as_millis()).unwrap_or(u64::MAX), "cannot enable keyspace notifications; relying on polling");
        }
    }

    /// Reads the whole hash and swaps in a new snapshot if anything changed.
    async fn refresh(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> Result<(), FlagStoreError> {
        let raw: Vec<(String, String)> = timed(conn.hgetall(&self.key)).await?;
        let current = self.state.snapshot().flags.clone();
        let (set, rejected) = build(
            raw.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &current.set,
        );
        self.report(&rejected);
        self.state.publish_flags(&set, Source::Redis);
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
            warn!(field = %r.field, value = %r.value, reason = %r.reason, "ignored invalid flag value; last good value kept");
            self.state.metrics.count_flag_rejected(&r.field);
            self.state.events.push(
                "flags",
                "warn",
                format!("ignored {}={:?}: {}", r.field, r.value, r.reason),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> (FlagSet, Vec<Rejected>) {
        build(pairs.iter().copied(), &FlagSet::default())
    }

    #[test]
    fn booleans_in_any_spelling_and_text_as_is() {
        let (s, rejected) = set(&[
            ("a", "ON"),
            ("b", "False"),
            ("c", "1"),
            ("d", "0"),
            ("e", "blue v2"),
        ]);
        assert!(rejected.is_empty());
        assert_eq!(s.values["a"], FlagValue::Bool(true));
        assert_eq!(s.values["b"], FlagValue::Bool(false));
        assert_eq!(s.values["c"], FlagValue::Bool(true));
        assert_eq!(s.values["d"], FlagValue::Bool(false));
        assert_eq!(s.values["e"], FlagValue::Text("blue v2".into()));
    }

    #[test]
    fn header_is_sorted_and_leaves_reserved_fields_out() {
        let (s, _) = set(&[
            ("new_checkout", "on"),
            ("dark_mode", "off"),
            ("canary_percent", "20"),
            ("canary", "on"),
            ("theme", "blue"),
        ]);
        assert_eq!(
            render_header(&s),
            "dark_mode=off;new_checkout=on;theme=blue"
        );
        assert_eq!(s.canary_percent, Some(20));
        assert!(s.canary_enabled);
    }

    #[test]
    fn invalid_names_are_skipped() {
        let (s, rejected) = set(&[
            ("Bad Name", "on"),
            ("ok.name-1_x", "on"),
            (&"x".repeat(65), "on"),
        ]);
        assert_eq!(s.values.keys().collect::<Vec<_>>(), ["ok.name-1_x"]);
        assert_eq!(rejected.len(), 2);
        assert!(rejected.iter().all(|r| r.reason == Rejection::BadName));
    }

    #[test]
    fn invalid_reserved_values_keep_the_last_good_value() {
        let (good, _) = set(&[("canary_percent", "20"), ("canary", "off")]);
        for bad in ["abc", "150", "-1", "", "2.5"] {
            let (next, rejected) = build([("canary_percent", bad), ("canary", "maybe")], &good);
            assert_eq!(next.canary_percent, Some(20), "{bad}");
            assert!(!next.canary_enabled);
            assert_eq!(rejected.len(), 2);
        }
        // Deleting the field returns to the config's value.
        let (next, _) = build([], &good);
        assert_eq!(next.canary_percent, None);
        assert!(next.canary_enabled);
    }

    #[test]
    fn invalid_regular_values_keep_the_last_good_value() {
        let (good, _) = set(&[("theme", "blue")]);
        let long = "x".repeat(257);
        for bad in ["a;b", long.as_str(), "tab\there"] {
            let (next, rejected) = build([("theme", bad)], &good);
            assert_eq!(next.values["theme"], FlagValue::Text("blue".into()));
            assert_eq!(rejected[0].reason, Rejection::BadValue);
        }
        let (next, _) = build([("theme", "x".repeat(256).as_str())], &good);
        assert_eq!(next.values["theme"].as_str().len(), 256);
    }

    #[test]
    fn kill_switch_zeroes_the_effective_percent() {
        let (s, _) = set(&[("canary_percent", "40")]);
        assert_eq!(Flags::new(s, 1, Source::Redis).effective_percent(33), 40);
        let (s, _) = set(&[("canary_percent", "40"), ("canary", "off")]);
        assert_eq!(Flags::new(s, 1, Source::Redis).effective_percent(33), 0);
        assert_eq!(
            Flags::new(FlagSet::default(), 1, Source::Static).effective_percent(33),
            33
        );
    }
}
