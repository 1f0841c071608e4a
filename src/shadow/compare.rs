//! The comparison, pure (Diffy's method): which fields of two answers differ, and
//! what a mirrored request's differences mean once noise is taken out.
//!
//! A field is `status`, `header:<name>` for a header of `compare_headers`, a JSON
//! path (`$.user.name`, `$.items[*].price`: array elements are compared index by
//! index but named with `[*]`, so the noise learned on one element covers all), or
//! `body` for any other body (compared byte for byte; shown by length and hash). A
//! field that also differs between the primary and the secondary, two answers of
//! the same production, is noise: it changes by itself (a timestamp, a request id,
//! a random order), so it says nothing of the canary.

use std::collections::BTreeSet;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

/// Fields named in one comparison at most: a body that differs everywhere must not
/// make a report grow with its size.
pub const MAX_FIELDS: usize = 64;
/// Bytes of a field's path kept.
pub const MAX_PATH_BYTES: usize = 200;

/// One answer, as far as it is compared.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    /// The body's first `max_body_bytes`.
    pub body: Bytes,
    /// The body was longer than `max_body_bytes` (only its start was kept).
    pub over: bool,
}

/// What one mirrored request showed, after noise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Primary and candidate agree on every compared field.
    Match,
    /// They differ only in fields that are noise.
    Noise,
    /// They differ in these fields, which are not noise.
    Diff(Vec<String>),
}

/// The fields in which `a` and `b` differ, at most [`MAX_FIELDS`].
pub fn differences(a: &Answer, b: &Answer, compare_headers: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if a.status != b.status {
        out.insert("status".to_owned());
    }
    for name in compare_headers {
        let values = |h: &HeaderMap| -> Vec<Vec<u8>> {
            h.get_all(name.as_str())
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect()
        };
        if values(&a.headers) != values(&b.headers) {
            out.insert(format!("header:{name}"));
        }
    }
    match (json_of(a), json_of(b)) {
        (Some(x), Some(y)) => json_differences(&x, &y, &mut "$".to_owned(), &mut out),
        _ => {
            if a.body != b.body || a.over != b.over {
                out.insert("body".to_owned());
            }
        }
    }
    out
}

/// The body as JSON when it looks like JSON and parses; never a body cut at the
/// limit (it would not parse anyway).
fn json_of(answer: &Answer) -> Option<Value> {
    if answer.over {
        return None;
    }
    let first = answer.body.iter().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(first, b'{' | b'[') {
        return None;
    }
    serde_json::from_slice(&answer.body).ok()
}

/// Adds the paths under `path` where `a` and `b` differ.
fn json_differences(a: &Value, b: &Value, path: &mut String, out: &mut BTreeSet<String>) {
    if out.len() >= MAX_FIELDS {
        return;
    }
    let len = path.len();
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (key, value) in x {
                push_key(path, key);
                match y.get(key) {
                    Some(other) => json_differences(value, other, path, out),
                    None => insert(out, path),
                }
                path.truncate(len);
            }
            for key in y.keys().filter(|k| !x.contains_key(*k)) {
                push_key(path, key);
                insert(out, path);
                path.truncate(len);
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                // The array's own path: its length differs.
                insert(out, path);
            }
            path.push_str("[*]");
            for (value, other) in x.iter().zip(y) {
                json_differences(value, other, path, out);
            }
            path.truncate(len);
        }
        _ if a != b => insert(out, path),
        _ => {}
    }
}

fn insert(out: &mut BTreeSet<String>, path: &str) {
    if out.len() < MAX_FIELDS {
        out.insert(cut_path(path));
    }
}

/// A path as kept: at most [`MAX_PATH_BYTES`], then `…`. Keys come from the
/// answers (an API may echo a client's input as a key), and every route keeps up to
/// [`MAX_FIELDS`] of them twice (differing, noise): a cap on their length bounds
/// the report's memory.
fn cut_path(path: &str) -> String {
    if path.len() <= MAX_PATH_BYTES {
        return path.to_owned();
    }
    let mut end = MAX_PATH_BYTES;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

/// `.key` when it reads as a name, else `['key']`.
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        path.push('.');
        path.push_str(key);
    } else {
        path.push_str("['");
        path.push_str(&key.replace('\'', "\\'"));
        path.push_str("']");
    }
}

/// Whether `field` is `ignored` or lies under it (`$.meta` covers `$.meta.took`).
pub fn covered_by(field: &str, ignored: &str) -> bool {
    field
        .strip_prefix(ignored)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// What the primary-candidate differences `differing` mean, given the route's noise
/// and the configured `ignore_json_paths`.
pub fn classify(
    differing: &BTreeSet<String>,
    noise: impl Fn(&str) -> bool,
    ignored: &[String],
) -> Outcome {
    let real: Vec<String> = differing
        .iter()
        .filter(|f| !noise(f) && !ignored.iter().any(|i| covered_by(f, i)))
        .cloned()
        .collect();
    if !real.is_empty() {
        Outcome::Diff(real)
    } else if differing.is_empty() {
        Outcome::Match
    } else {
        Outcome::Noise
    }
}

/// FNV-1a of a body, shown in examples of non-JSON bodies.
pub fn body_hash(body: &[u8]) -> u64 {
    body.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn json(status: u16, body: &str) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        Answer {
            status,
            headers,
            body: Bytes::from(body.to_owned()),
            over: false,
        }
    }

    fn fields(a: &Answer, b: &Answer) -> Vec<String> {
        let headers = ["content-type".to_owned(), "location".to_owned()];
        differences(a, b, &headers).into_iter().collect()
    }

    #[test]
    fn differences_name_the_fields() {
        let base = r#"{"id":1,"items":[{"price":5,"name":"a"},{"price":6,"name":"b"}],"at":"x"}"#;
        for (other, want) in [
            (base, vec![]),
            (
                r#"{"items":[{"name":"a","price":5},{"price":6,"name":"b"}],"at":"x","id":1}"#,
                vec![],
            ),
            (
                r#"{"id":1,"items":[{"price":5,"name":"a"},{"price":7,"name":"b"}],"at":"x"}"#,
                vec!["$.items[*].price"],
            ),
            (
                r#"{"id":1,"items":[{"price":5,"name":"a"}],"at":"x"}"#,
                vec!["$.items"],
            ),
            (
                r#"{"id":"1","items":[{"price":5,"name":"a"},{"price":6,"name":"b"}],"at":"y","new":0}"#,
                vec!["$.at", "$.id", "$.new"],
            ),
            (
                r#"{"items":[{"price":5,"name":"a"},{"price":6,"name":"b"}],"at":"x"}"#,
                vec!["$.id"],
            ),
            (
                r#"{"id":1,"items":[{"price":5,"name":"a"},{"price":6,"name":"b"}],"at":"x","a b":1}"#,
                vec!["$['a b']"],
            ),
            // Both JSON, another type at the root: the root's path.
            ("[1,2]", vec!["$"]),
        ] {
            let got = fields(&json(200, base), &json(200, other));
            assert_eq!(got, want, "{other}");
        }
        assert_eq!(fields(&json(200, "{}"), &json(404, "{}")), ["status"]);
    }

    #[test]
    fn other_bodies_by_bytes_and_headers_from_the_list() {
        let text = |body: &'static str, ct: &'static str| {
            let mut a = json(200, body);
            a.headers
                .insert("content-type", HeaderValue::from_static(ct));
            a.headers.insert("date", HeaderValue::from_static(body));
            a
        };
        assert!(fields(&text("hello", "text/plain"), &text("hello", "text/plain")).is_empty());
        assert_eq!(
            fields(&text("hello", "text/plain"), &text("hellO", "text/plain")),
            ["body"]
        );
        assert_eq!(
            fields(&text("hello", "text/plain"), &text("hello", "text/html")),
            ["header:content-type"]
        );
        // Not JSON on one side: the bodies as bytes.
        assert_eq!(fields(&json(200, "{}"), &text("{", "text/plain")).len(), 2);
        let mut cut = text("hello", "text/plain");
        cut.over = true;
        assert_eq!(fields(&text("hello", "text/plain"), &cut), ["body"]);
    }

    #[test]
    fn noise_and_ignored_paths_are_not_differences() {
        let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        let noise = set(&["$.at"]);
        let is_noise = |f: &str| noise.contains(f);
        let ignored = vec!["$.meta".to_owned()];
        assert_eq!(classify(&set(&[]), is_noise, &ignored), Outcome::Match);
        assert_eq!(
            classify(&set(&["$.at"]), is_noise, &ignored),
            Outcome::Noise
        );
        assert_eq!(
            classify(&set(&["$.meta.took", "$.meta"]), is_noise, &ignored),
            Outcome::Noise
        );
        assert_eq!(
            classify(&set(&["$.at", "$.price", "$.metadata"]), is_noise, &ignored),
            Outcome::Diff(vec!["$.metadata".to_owned(), "$.price".to_owned()])
        );
        assert!(covered_by("$.items[*].id", "$.items"));
        assert!(!covered_by("$.itemsx", "$.items"));
    }

    #[test]
    fn a_body_different_everywhere_names_at_most_max_fields() {
        let a: String = format!(
            "{{{}}}",
            (0..500)
                .map(|i| format!("\"k{i}\":1"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let b = a.replace(":1", ":2");
        assert_eq!(fields(&json(200, &a), &json(200, &b)).len(), MAX_FIELDS);
    }

    #[test]
    fn a_long_key_is_cut() {
        let key = "k".repeat(5_000);
        let a = json(200, &format!(r#"{{"{key}": 1}}"#));
        let b = json(200, &format!(r#"{{"{key}": 2}}"#));
        let found = fields(&a, &b);
        let field = &found[0];
        assert_eq!(field.len(), MAX_PATH_BYTES + "…".len(), "{field}");
        assert!(field.starts_with("$.kkk") && field.ends_with('…'));
    }
}
