//! The pure flag model: a Redis hash (or `[flags.static]`) turned into one validated,
//! immutable [`Flags`] value that lives in the snapshot, so the request path reads
//! flags lock-free and never waits on Redis. Every read goes through [`build`], which
//! keeps the last good value of any field whose new value is invalid: bad input never
//! moves traffic. No I/O here; the watcher that reads Redis is
//! [`crate::flags::watcher`].

use std::collections::BTreeMap;
use std::time::SystemTime;

use http::HeaderValue;

/// Reserved field: overrides `[routing] canary_percent` live (0..=100).
pub const CANARY_PERCENT: &str = "canary_percent";
/// Reserved field: the kill switch; `off` sends all traffic to production.
pub const CANARY: &str = "canary";
/// Reserved field: whether the canary analysis may move the levers above (`on`, the
/// default) or an operator holds them (`off`; see `canary::verdict`).
pub const CANARY_AUTO: &str = "canary_auto";

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
    #[error("canary and canary_auto must be on/off, true/false or 1/0")]
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
    /// `canary_auto`; `true` unless the hash says `canary_auto off`.
    pub canary_auto: bool,
}

impl FlagSet {
    /// The boolean flags and their state, by name: what `canarygate_flag_enabled`
    /// shows (a text value has no gauge).
    pub fn switches(&self) -> impl Iterator<Item = (&str, bool)> {
        self.values.iter().filter_map(|(name, value)| match value {
            FlagValue::Bool(on) => Some((name.as_str(), *on)),
            FlagValue::Text(_) => None,
        })
    }

    /// See [`Flags::digest`].
    pub fn digest(&self) -> String {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        for (name, value) in &self.values {
            eat(name.as_bytes());
            eat(b"=");
            eat(value.as_str().as_bytes());
            eat(b";");
        }
        let percent = self
            .canary_percent
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        eat(format!(
            "canary_percent={percent};canary={};canary_auto={}",
            self.canary_enabled, self.canary_auto
        )
        .as_bytes());
        format!("{hash:016x}")
    }
}

impl Default for FlagSet {
    fn default() -> Self {
        Self {
            values: BTreeMap::new(),
            canary_percent: None,
            canary_enabled: true,
            canary_auto: true,
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
            CANARY_AUTO => match parse_bool(value) {
                Some(on) => next.canary_auto = on,
                None => {
                    next.canary_auto = previous.canary_auto;
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
    /// [`Flags::digest`], computed once (a request's span carries it).
    digest: String,
}

impl Flags {
    pub fn new(set: FlagSet, version: u64, source: Source) -> Self {
        let header_value = render_header(&set);
        let digest = set.digest();
        Self {
            set,
            version,
            source,
            updated_at: SystemTime::now(),
            header_value,
            digest,
        }
    }

    /// What the flags say, as 16 hex digits (FNV-1a 64 over every flag and the
    /// reserved fields): equal on two instances exactly when they apply the same
    /// flags, unlike `version`, which counts this process's changes.
    pub fn digest(&self) -> String {
        self.digest.clone()
    }

    /// [`Flags::digest`], borrowed.
    pub fn digest_str(&self) -> &str {
        &self.digest
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> (FlagSet, Vec<Rejected>) {
        build(pairs.iter().copied(), &FlagSet::default())
    }

    #[test]
    fn the_digest_changes_with_any_flag_and_only_then() {
        let (a, _) = set(&[("beta", "on"), ("theme", "dark")]);
        let (b, _) = set(&[("theme", "dark"), ("beta", "true")]);
        assert_eq!(a.digest(), b.digest(), "same flags, any order or spelling");
        assert_eq!(a.digest().len(), 16);
        for other in [
            set(&[("beta", "off"), ("theme", "dark")]).0,
            set(&[("beta", "on")]).0,
            set(&[("beta", "on"), ("theme", "dark"), ("canary_percent", "5")]).0,
            set(&[("beta", "on"), ("theme", "dark"), ("canary", "off")]).0,
            set(&[("beta", "on"), ("theme", "dark"), ("canary_auto", "off")]).0,
        ] {
            assert_ne!(a.digest(), other.digest(), "{other:?}");
        }
        // Fixed across releases and machines (FNV-1a 64 of
        // "beta=on;theme=dark;canary_percent=-;canary=true;canary_auto=true",
        // computed independently), so mixed versions in a fleet compare.
        assert_eq!(a.digest(), "1db9932b14672fbb");
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
        let (good, _) = set(&[
            ("canary_percent", "20"),
            ("canary", "off"),
            ("canary_auto", "off"),
        ]);
        assert!(!good.canary_auto);
        assert!(
            !good.values.contains_key("canary_auto"),
            "reserved, not sent upstream"
        );
        for bad in ["abc", "150", "-1", "", "2.5"] {
            let (next, rejected) = build(
                [
                    ("canary_percent", bad),
                    ("canary", "maybe"),
                    ("canary_auto", bad),
                ],
                &good,
            );
            assert_eq!(next.canary_percent, Some(20), "{bad}");
            assert!(!next.canary_enabled);
            assert!(!next.canary_auto, "{bad}");
            assert_eq!(rejected.len(), 3);
        }
        // Deleting the fields returns to the config's value and the defaults.
        let (next, _) = build([], &good);
        assert_eq!(next.canary_percent, None);
        assert!(next.canary_enabled);
        assert!(next.canary_auto);
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
    fn switches_are_the_boolean_flags() {
        let (s, _) = set(&[("a", "on"), ("b", "off"), ("t", "text"), ("canary", "off")]);
        assert_eq!(
            s.switches().collect::<Vec<_>>(),
            [("a", true), ("b", false)]
        );
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
