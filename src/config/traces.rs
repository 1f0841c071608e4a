//! `[tracing]`: OpenTelemetry traces to an OTLP collector, and the W3C trace context
//! and baggage the proxy passes upstream. Absent `otlp_endpoint`, tracing is off and
//! the proxy passes `traceparent`, `tracestate` and `baggage` through untouched.

use serde::Deserialize;

use crate::config::{Violation, fail};

/// `[tracing]`: where spans go and what the proxy tells the backends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP URL: a base (`http://127.0.0.1:4318`, to which
    /// `/v1/traces` is added) or the full traces URL. Absent: tracing is off.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf`; `grpc` is refused with a clear error (not built in).
    pub protocol: String,
    /// The share of new traces sampled (0.0 to 1.0). Parent-based: a request that
    /// comes with a `traceparent` keeps its caller's decision.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// An environment variable holding headers for the collector, as
    /// `name=value[,name=value]` (the `OTEL_EXPORTER_OTLP_HEADERS` format), e.g. an
    /// `authorization` header. Read at start; never logged.
    pub headers_env: Option<String>,
    /// Finished spans waiting for export; beyond it they are dropped and counted.
    pub max_queue: usize,
    /// Flags sent upstream as `baggage` members besides `canarygate.pool`.
    pub baggage_flags: Vec<String>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            protocol: "http/protobuf".to_owned(),
            sample_ratio: 0.01,
            service_name: "canarygate".to_owned(),
            headers_env: None,
            max_queue: 4096,
            baggage_flags: Vec::new(),
        }
    }
}

impl TracingConfig {
    /// Whether spans are made and the trace context is carried upstream.
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some()
    }

    /// The URL spans are posted to: `/v1/traces` added to a base URL.
    pub fn traces_url(&self) -> Option<String> {
        let endpoint = self.otlp_endpoint.as_deref()?;
        let uri: http::Uri = endpoint.parse().ok()?;
        Some(if matches!(uri.path(), "" | "/") {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        } else {
            endpoint.to_owned()
        })
    }

    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri = endpoint.parse::<http::Uri>().ok();
            let scheme = uri.as_ref().and_then(http::Uri::scheme_str);
            if !matches!(scheme, Some("http" | "https"))
                || uri.as_ref().and_then(http::Uri::host).is_none()
            {
                return fail(
                    "tracing.otlp_endpoint",
                    format!("`{endpoint}` is not an http:// or https:// URL"),
                );
            }
        }
        match self.protocol.as_str() {
            "http/protobuf" => {}
            "grpc" => {
                return fail(
                    "tracing.protocol",
                    "`grpc` is not built into canarygate: use `http/protobuf` (every \
                     OpenTelemetry collector accepts it, on port 4318)",
                );
            }
            other => {
                return fail(
                    "tracing.protocol",
                    format!("`{other}` is not `http/protobuf`"),
                );
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return fail(
                "tracing.sample_ratio",
                format!("{} is not between 0.0 and 1.0", self.sample_ratio),
            );
        }
        if self.service_name.is_empty() {
            return fail("tracing.service_name", "must not be empty");
        }
        if self.max_queue == 0 || self.max_queue > 1_000_000 {
            return fail("tracing.max_queue", "must be 1 to 1000000");
        }
        if let Some(name) = &self.headers_env
            && name.is_empty()
        {
            return fail("tracing.headers_env", "must name an environment variable");
        }
        for (i, flag) in self.baggage_flags.iter().enumerate() {
            // Baggage keys are tokens (W3C baggage, RFC 7230 token).
            if flag.is_empty() || !flag.bytes().all(is_token_byte) {
                return fail(
                    format!("tracing.baggage_flags[{i}]"),
                    format!("`{flag}` cannot be a baggage key"),
                );
            }
        }
        Ok(())
    }
}

/// Reads `headers_env`'s `name=value[,name=value]` pairs. The error names the
/// variable and the pair's position, never a value (it is a secret).
pub fn collector_headers(name: &str) -> Result<Vec<(String, String)>, String> {
    let raw = std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
    parse_headers(&raw).map_err(|item| {
        format!("environment variable {name}: item {item} is not a valid name=value header")
    })
}

/// The pairs of `name=value[,name=value]`, or the 1-based position of the first bad one.
fn parse_headers(raw: &str) -> Result<Vec<(String, String)>, usize> {
    let mut headers = Vec::new();
    for (i, pair) in raw.split(',').enumerate() {
        if pair.trim().is_empty() {
            continue;
        }
        let (key, value) = pair.split_once('=').ok_or(i + 1)?;
        let (key, value) = (key.trim(), value.trim());
        if http::HeaderName::from_bytes(key.as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            return Err(i + 1);
        }
        headers.push((key.to_owned(), value.to_owned()));
    }
    Ok(headers)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_toml;
    use crate::config::tests::{MINIMAL, err};

    #[test]
    fn off_by_default_with_documented_defaults() {
        let c = from_toml(MINIMAL, "t").unwrap().tracing;
        assert!(!c.enabled());
        assert_eq!(c, TracingConfig::default());
        assert!((c.sample_ratio - 0.01).abs() < f64::EPSILON);
        assert_eq!(c.max_queue, 4096);
    }

    #[test]
    fn the_traces_path_is_added_to_a_base_url_only() {
        let with = |e: &str| TracingConfig {
            otlp_endpoint: Some(e.to_owned()),
            ..TracingConfig::default()
        };
        assert_eq!(
            with("http://127.0.0.1:4318").traces_url().unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            with("http://c:4318/").traces_url().unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            with("https://c/otlp/v1/traces").traces_url().unwrap(),
            "https://c/otlp/v1/traces"
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let bad = |body: &str| err(&format!("{MINIMAL}[tracing]\n{body}\n"));
        let e = bad("otlp_endpoint = \"localhost:4318\"");
        assert!(
            e.starts_with("test.toml:4: key `tracing.otlp_endpoint`"),
            "{e}"
        );
        let e = bad("otlp_endpoint = \"http://c:4318\"\nprotocol = \"grpc\"");
        assert!(e.starts_with("test.toml:5: key `tracing.protocol`"), "{e}");
        assert!(e.contains("http/protobuf"), "{e}");
        let e = bad("sample_ratio = 1.5");
        assert!(
            e.starts_with("test.toml:4: key `tracing.sample_ratio`"),
            "{e}"
        );
        let e = bad("max_queue = 0");
        assert!(e.starts_with("test.toml:4: key `tracing.max_queue`"), "{e}");
        let e = bad("baggage_flags = [\"ok\", \"bad key\"]");
        assert!(
            e.starts_with("test.toml:4: key `tracing.baggage_flags[1]`"),
            "{e}"
        );
        let e = bad("sample_rate = 0.5");
        assert!(
            e.starts_with("test.toml:4: key `tracing.sample_rate`"),
            "{e}"
        );
    }

    #[test]
    fn collector_headers_are_name_value_pairs() {
        assert_eq!(
            parse_headers("authorization=Bearer s3cret, x-tenant = blue,").unwrap(),
            vec![
                ("authorization".to_owned(), "Bearer s3cret".to_owned()),
                ("x-tenant".to_owned(), "blue".to_owned())
            ]
        );
        assert_eq!(parse_headers("a=1,authorization:Bearer s3cret"), Err(2));
        assert_eq!(parse_headers("bad name=1"), Err(1));
        let e = collector_headers("CANARYGATE_TEST_OTLP_HEADERS_UNSET").unwrap_err();
        assert!(
            e.contains("CANARYGATE_TEST_OTLP_HEADERS_UNSET is not set"),
            "{e}"
        );
    }
}
