//! Property-based fuzzing (proptest) of the parsers that take operator input: the
//! config file and flag values. Neither may panic on any input, and what they accept
//! must satisfy the documented rules.

use std::fmt::Write as _;

use canarygate::config;
use canarygate::flags::model::{self as flags, FlagSet, FlagValue};
use proptest::prelude::*;

const KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "drain_timeout_ms",
    "drain_delay_ms",
    "backends",
    "canary_percent",
    "sticky",
    "override_header",
    "connect_ms",
    "idle_ms",
    "redis_url",
    "poll_ms",
    "key",
    "path",
    "rise",
    "fall",
    "max_header_bytes",
    "max_body_bytes",
    "cert_path",
    "bogus",
];
const TABLES: &[&str] = &[
    "server",
    "pools.production",
    "pools.canary",
    "routing",
    "timeouts",
    "flags",
    "flags.static",
    "health",
    "limits",
    "server.tls",
    "nope",
];

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
        prop::collection::vec("[0-9.:a-z]{0,16}", 0..3).prop_map(|v| format!("{v:?}")),
    ]
}

/// Documents that look like configs: known tables and keys with random values.
fn config_like() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::sample::select(TABLES),
            prop::collection::vec((prop::sample::select(KEYS), toml_value()), 0..4),
        ),
        0..6,
    )
    .prop_map(|tables| {
        let mut doc = String::new();
        for (table, entries) in tables {
            let _ = writeln!(doc, "[{table}]");
            for (k, v) in entries {
                let _ = writeln!(doc, "{k} = {v}");
            }
        }
        doc
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn config_parsing_never_panics_on_bytes(src in "\\PC{0,300}") {
        let _ = config::from_toml(&src, "fuzz.toml");
    }

    #[test]
    fn config_like_documents_are_accepted_only_when_valid(src in config_like()) {
        match config::from_toml(&src, "fuzz.toml") {
            Ok(c) => {
                // Whatever is accepted satisfies the rules validate() promises.
                prop_assert!(!c.pools.production.backends.is_empty());
                prop_assert!(c.routing.canary_percent <= 100);
                prop_assert!(c.timeouts.connect_ms > 0 && c.health.rise > 0);
                prop_assert!(c.validate().is_ok());
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(text.starts_with("fuzz.toml"), "{}", text);
            }
        }
    }

    #[test]
    fn flag_building_keeps_only_valid_values(
        fields in prop::collection::vec(("[a-zA-Z0-9_.;= -]{0,70}", "\\PC{0,300}"), 0..12),
        previous_percent in prop::option::of(0u8..=100),
    ) {
        let previous = FlagSet { canary_percent: previous_percent, ..FlagSet::default() };
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (set, rejected) = flags::build(pairs.iter().copied(), &previous);
        for (name, value) in &set.values {
            prop_assert!(flags::valid_name(name));
            prop_assert!(name != flags::CANARY && name != flags::CANARY_PERCENT);
            if let FlagValue::Text(t) = value {
                prop_assert!(t.len() <= flags::MAX_VALUE_LEN && !t.contains(';'));
            }
        }
        prop_assert!(set.canary_percent.is_none_or(|p| p <= 100));
        // The rendered header is always a valid header value of name=value pairs.
        let header = flags::render_header(&set);
        let text = header.to_str().unwrap();
        prop_assert_eq!(text.split(';').filter(|p| !p.is_empty()).count(), set.values.len());
        // Every input field is either in the result, reserved, or reported.
        for (k, _) in &pairs {
            let reserved = *k == flags::CANARY || *k == flags::CANARY_PERCENT;
            prop_assert!(reserved || set.values.contains_key(*k) || rejected.iter().any(|r| r.field == *k));
        }
    }

    #[test]
    fn percent_parsing_matches_its_rule(raw in "\\PC{0,8}") {
        match flags::parse_percent(&raw) {
            Ok(p) => prop_assert!(p <= 100 && raw.trim().parse::<u8>() == Ok(p)),
            Err(_) => prop_assert!(raw.trim().parse::<u8>().map_or(true, |p| p > 100)),
        }
    }
}
