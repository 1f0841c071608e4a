//! `[shadow]`: the shadow stage (issue 32). Copies of production's requests go to
//! the canary and the answers are compared, so a release that answers differently
//! is caught before any user meets it. Its own file because `gate` ties it to
//! `[analysis]`: the gate is a stage of the analysis' rollout, so it needs it on.

use serde::Deserialize;

use crate::canary::settings::AnalysisConfig;
use crate::config::{Violation, fail};

/// The largest `max_body_bytes`: three bodies of this size are held per mirror in
/// flight (primary, candidate, secondary).
pub const MAX_BODY_BYTES_LIMIT: u64 = 16 << 20;

/// `[shadow]`: what is mirrored, how it is compared, and whether it gates the canary.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowConfig {
    pub enabled: bool,
    /// Share of production-bound requests mirrored, 0..=100 (fractions allowed),
    /// chosen by a hash of the request id: the same ids give the same sample.
    pub percent: f64,
    /// Methods mirrored; a write is never mirrored unless listed here.
    pub methods: Vec<String>,
    /// Mirrors at once (candidate and secondary together count one); past it,
    /// mirrors are dropped and counted.
    pub max_in_flight: u32,
    /// The whole exchange with the candidate and with the secondary, body included.
    pub timeout_ms: u64,
    /// Bodies are compared up to this many bytes; longer ones by the hash of that
    /// prefix and the fact that they are longer.
    pub max_body_bytes: u64,
    /// Response headers compared (lowercase names); others are ignored.
    pub compare_headers: Vec<String>,
    /// JSON fields never compared, as the paths `/shadow` shows (`$.meta.took_ms`).
    pub ignore_json_paths: Vec<String>,
    /// A new canary gets no users until the shadow passed (see `min_samples`).
    pub gate: bool,
    /// Compared mirrors needed before the gate decides.
    pub min_samples: u64,
    /// The gate's largest share of differing mirrors (after noise), 0..=1.
    pub max_diff_ratio: f64,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            percent: 10.0,
            methods: vec!["GET".to_owned(), "HEAD".to_owned()],
            max_in_flight: 64,
            timeout_ms: 2_000,
            max_body_bytes: 1 << 20,
            compare_headers: vec![
                "content-type".to_owned(),
                "location".to_owned(),
                "cache-control".to_owned(),
            ],
            ignore_json_paths: Vec::new(),
            gate: false,
            min_samples: 200,
            max_diff_ratio: 0.01,
        }
    }
}

impl ShadowConfig {
    /// The rules serde cannot check; `analysis` because the gate needs it.
    pub fn validate(&self, analysis: &AnalysisConfig) -> Result<(), Violation> {
        if !(0.0..=100.0).contains(&self.percent) {
            return fail(
                "shadow.percent",
                format!("{} is out of range; it must be in 0..=100", self.percent),
            );
        }
        for (i, method) in self.methods.iter().enumerate() {
            let valid = http::Method::from_bytes(method.as_bytes()).is_ok()
                && method.bytes().all(|b| b.is_ascii_uppercase());
            if !valid {
                return fail(
                    format!("shadow.methods[{i}]"),
                    format!("{method:?} is not an upper-case method name, e.g. \"GET\""),
                );
            }
            if method == "CONNECT" {
                return fail(
                    format!("shadow.methods[{i}]"),
                    "CONNECT opens a tunnel; it cannot be mirrored",
                );
            }
        }
        for (key, value) in [
            ("max_in_flight", u64::from(self.max_in_flight)),
            ("timeout_ms", self.timeout_ms),
            ("max_body_bytes", self.max_body_bytes),
            ("min_samples", self.min_samples),
        ] {
            if value == 0 {
                return fail(format!("shadow.{key}"), "must be greater than 0");
            }
        }
        if self.max_body_bytes > MAX_BODY_BYTES_LIMIT {
            return fail(
                "shadow.max_body_bytes",
                format!(
                    "{} is over {MAX_BODY_BYTES_LIMIT}: three bodies this large are held per \
                     mirror in flight",
                    self.max_body_bytes
                ),
            );
        }
        for (i, name) in self.compare_headers.iter().enumerate() {
            let valid = http::HeaderName::from_bytes(name.as_bytes())
                .is_ok_and(|h| h.as_str() == name.as_str());
            if !valid {
                return fail(
                    format!("shadow.compare_headers[{i}]"),
                    format!("{name:?} is not a lower-case header name"),
                );
            }
        }
        for (i, path) in self.ignore_json_paths.iter().enumerate() {
            if !(path == "$" || path.starts_with("$.") || path.starts_with("$[")) {
                return fail(
                    format!("shadow.ignore_json_paths[{i}]"),
                    format!("{path:?} is not a path like \"$.meta.took_ms\" or \"$.items[*].id\""),
                );
            }
        }
        if !(0.0..=1.0).contains(&self.max_diff_ratio) {
            return fail(
                "shadow.max_diff_ratio",
                format!(
                    "{} is out of range; it must be in 0..=1, e.g. 0.01",
                    self.max_diff_ratio
                ),
            );
        }
        if self.gate && !self.enabled {
            return fail(
                "shadow.gate",
                "the gate needs shadow.enabled = true: with no mirrors it would never open",
            );
        }
        if self.gate && !analysis.enabled {
            return fail(
                "shadow.gate",
                "the gate is a stage of the canary analysis: set analysis.enabled = true",
            );
        }
        Ok(())
    }

    /// Whether `method` is mirrored.
    pub fn mirrors(&self, method: &http::Method) -> bool {
        self.methods.iter().any(|m| m == method.as_str())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::from_toml;
    use crate::config::tests::{MINIMAL, err};

    #[test]
    fn shadow_defaults_and_bad_values_name_file_line_and_key() {
        let c = from_toml(MINIMAL, "t").unwrap();
        let s = &c.shadow;
        assert!(!s.enabled && !s.gate);
        assert_eq!(s.methods, ["GET", "HEAD"]);
        assert_eq!(
            (s.max_in_flight, s.timeout_ms, s.max_body_bytes),
            (64, 2_000, 1 << 20)
        );
        assert!(s.mirrors(&http::Method::GET) && !s.mirrors(&http::Method::POST));
        for (body, want) in [
            (
                "percent = 101",
                "test.toml:4: key `shadow.percent`: 101 is out of range",
            ),
            (
                "methods = [\"GET\", \"post\"]",
                "test.toml:4: key `shadow.methods[1]`: \"post\" is not an upper-case method",
            ),
            (
                "max_in_flight = 0",
                "test.toml:4: key `shadow.max_in_flight`: must be greater than 0",
            ),
            (
                "compare_headers = [\"Content-Type\"]",
                "test.toml:4: key `shadow.compare_headers[0]`",
            ),
            (
                "ignore_json_paths = [\"meta.took\"]",
                "test.toml:4: key `shadow.ignore_json_paths[0]`",
            ),
            (
                "max_diff_ratio = 2.0",
                "test.toml:4: key `shadow.max_diff_ratio`: 2 is out of range",
            ),
            (
                "gate = true",
                "test.toml:4: key `shadow.gate`: the gate needs",
            ),
            (
                "enabled = true\ngate = true",
                "test.toml:5: key `shadow.gate`: the gate is a stage of the canary analysis",
            ),
            (
                "timeout = 5",
                "test.toml:4: key `shadow.timeout`: unknown field `timeout`",
            ),
        ] {
            let e = err(&format!("{MINIMAL}[shadow]\n{body}\n"));
            assert!(e.starts_with(want), "{body}: {e}");
        }
        let ok = from_toml(
            &format!(
                "{MINIMAL}[analysis]\nenabled = true\n[shadow]\nenabled = true\ngate = true\n\
                 percent = 0.5\nmethods = [\"GET\", \"POST\"]\n"
            ),
            "t",
        )
        .unwrap();
        assert!(ok.shadow.gate && ok.shadow.mirrors(&http::Method::POST));
    }
}
