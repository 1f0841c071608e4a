//! The shadow's findings per route template: samples, differences, the noise
//! learned, and a few examples, for `GET /shadow`, the status page, the gate and
//! its alert.
//!
//! Bounded whatever the traffic: at most [`MAX_ROUTES`] templates (a client sending
//! random paths that no template folds would otherwise grow it without end; past
//! the cap, samples go to the route `(other)` and are counted as overflow), at most
//! [`crate::shadow::compare::MAX_FIELDS`] fields per route and list, and
//! [`MAX_EXAMPLES`] examples of at most [`EXAMPLE_BODY_BYTES`] per body.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use http::HeaderMap;
use serde::Serialize;

use super::compare::{Answer, MAX_FIELDS, Outcome, body_hash, classify};

/// Route templates kept.
pub const MAX_ROUTES: usize = 256;
/// Where samples of routes past [`MAX_ROUTES`] go.
pub const OVERFLOW_ROUTE: &str = "(other)";
/// Examples kept per route.
pub const MAX_EXAMPLES: usize = 3;
/// Bytes of a body shown in an example.
pub const EXAMPLE_BODY_BYTES: usize = 1024;
const REDACTED: &str = "[redacted]";

/// Whether a header's value is never shown: credentials by name, and any name that
/// says it holds one (`x-api-key`, `x-auth-token`, `x-session-secret`).
pub fn secret_header(name: &str) -> bool {
    matches!(
        name,
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
    ) || ["auth", "token", "secret", "key", "session", "password"]
        .iter()
        .any(|word| name.contains(word))
}

/// Headers as shown: values of secret ones replaced.
pub fn shown_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = name.as_str();
            let value = if secret_header(name) {
                REDACTED.to_owned()
            } else {
                without_query(&String::from_utf8_lossy(value.as_bytes()))
            };
            (name.to_owned(), value)
        })
        .collect()
}

/// Bytes of a header value shown in an example (a client's headers may be as long
/// as the server's limits allow; each of the 3 examples of 256 routes keeps them).
const EXAMPLE_HEADER_BYTES: usize = 256;

/// A value with its query, if any, redacted: a `Referer` or `Location` URL may
/// carry `?token=...` (the request's own query is never shown at all); then cut to
/// [`EXAMPLE_HEADER_BYTES`].
fn without_query(value: &str) -> String {
    let mut shown = match value.split_once('?') {
        Some((before, _)) => format!("{before}?{REDACTED}"),
        None => value.to_owned(),
    };
    if shown.len() > EXAMPLE_HEADER_BYTES {
        let mut end = EXAMPLE_HEADER_BYTES;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push('…');
    }
    shown
}

/// One answer in an example.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body's first [`EXAMPLE_BODY_BYTES`], lossily as text.
    pub body: String,
    pub body_bytes: usize,
    /// The body was longer than `max_body_bytes`: only that much was compared.
    pub body_over_limit: bool,
    /// FNV-1a of the compared body, hex.
    pub body_hash: String,
}

impl Shown {
    pub fn of(answer: &Answer) -> Self {
        let cut = answer.body.len().min(EXAMPLE_BODY_BYTES);
        Self {
            status: answer.status,
            headers: shown_headers(&answer.headers),
            body: String::from_utf8_lossy(&answer.body[..cut]).into_owned(),
            body_bytes: answer.body.len(),
            body_over_limit: answer.over,
            body_hash: format!("{:016x}", body_hash(&answer.body)),
        }
    }
}

/// One differing mirrored request, for a person to read.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// Method and path; never the query.
    pub request: String,
    pub request_headers: Vec<(String, String)>,
    pub fields: Vec<String>,
    pub primary: Shown,
    pub candidate: Shown,
}

/// The three answers of one mirrored request, as far as they came.
pub struct Sample<'a> {
    pub primary: &'a Answer,
    pub candidate: &'a Answer,
    /// `None`: the secondary failed; no noise is learned from this sample.
    pub secondary_fields: Option<&'a BTreeSet<String>>,
    /// Primary against candidate.
    pub fields: &'a BTreeSet<String>,
}

/// What one route showed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Route {
    pub matches: u64,
    pub noise: u64,
    pub diffs: u64,
    /// The canary did not answer in time, or broke the exchange.
    pub candidate_errors: u64,
    /// Production's second answer failed: the sample was not compared.
    pub secondary_errors: u64,
    /// Fields seen differing between two production answers.
    pub noise_fields: BTreeSet<String>,
    /// Differences (not noise) by field, with how many samples showed each.
    pub differing_fields: BTreeMap<String, u64>,
    pub examples: Vec<Example>,
}

impl Route {
    /// Samples that count for the gate: compared, or failed by the canary.
    pub fn samples(&self) -> u64 {
        self.matches + self.noise + self.diffs + self.candidate_errors
    }

    fn failed(&self) -> u64 {
        self.diffs + self.candidate_errors
    }
}

/// All routes and the totals.
#[derive(Debug, Default)]
pub struct Report {
    routes: HashMap<String, Route>,
    /// Samples put in [`OVERFLOW_ROUTE`] because [`MAX_ROUTES`] were taken.
    overflow: u64,
    total: Route,
}

/// The totals of a report, as the gate and the metrics read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    pub samples: u64,
    pub matches: u64,
    pub noise: u64,
    pub diffs: u64,
    pub candidate_errors: u64,
    pub secondary_errors: u64,
    /// (diffs + candidate errors) / samples; 0 with no samples.
    pub diff_ratio: f64,
}

/// The route of `template`, or [`OVERFLOW_ROUTE`] once [`MAX_ROUTES`] are taken.
fn route<'a>(
    routes: &'a mut HashMap<String, Route>,
    overflow: &mut u64,
    template: String,
) -> &'a mut Route {
    let full = routes.len() >= MAX_ROUTES && !routes.contains_key(&template);
    let key = if full {
        *overflow += 1;
        OVERFLOW_ROUTE.to_owned()
    } else {
        template
    };
    routes.entry(key).or_default()
}

impl Report {
    /// Learns the noise of one sample, classifies it, and keeps it (an example is
    /// made by `example` only when the route still wants one).
    pub fn compared(
        &mut self,
        template: String,
        sample: &Sample<'_>,
        ignored: &[String],
        example: impl FnOnce(&[String]) -> Example,
    ) -> Outcome {
        let route = route(&mut self.routes, &mut self.overflow, template);
        if let Some(noise) = sample.secondary_fields {
            for field in noise {
                if route.noise_fields.len() < MAX_FIELDS {
                    route.noise_fields.insert(field.clone());
                }
            }
        }
        let noise = &route.noise_fields;
        let outcome = classify(sample.fields, |f| noise.contains(f), ignored);
        match &outcome {
            Outcome::Match => {
                route.matches += 1;
                self.total.matches += 1;
            }
            Outcome::Noise => {
                route.noise += 1;
                self.total.noise += 1;
            }
            Outcome::Diff(fields) => {
                route.diffs += 1;
                self.total.diffs += 1;
                for field in fields {
                    let known = route.differing_fields.len() < MAX_FIELDS;
                    if let Some(n) = route.differing_fields.get_mut(field) {
                        *n += 1;
                    } else if known {
                        route.differing_fields.insert(field.clone(), 1);
                    }
                }
                if route.examples.len() < MAX_EXAMPLES {
                    route.examples.push(example(fields));
                }
            }
        }
        outcome
    }

    /// A mirror whose candidate failed (counts against the canary) or whose
    /// secondary failed (not compared).
    pub fn failed(&mut self, template: String, candidate: bool) {
        let route = route(&mut self.routes, &mut self.overflow, template);
        if candidate {
            route.candidate_errors += 1;
            self.total.candidate_errors += 1;
        } else {
            route.secondary_errors += 1;
            self.total.secondary_errors += 1;
        }
    }

    pub fn totals(&self) -> Totals {
        let t = &self.total;
        let samples = t.samples();
        Totals {
            samples,
            matches: t.matches,
            noise: t.noise,
            diffs: t.diffs,
            candidate_errors: t.candidate_errors,
            secondary_errors: t.secondary_errors,
            diff_ratio: ratio(t.failed(), samples),
        }
    }

    /// The routes, most differing first, with their diff ratio.
    pub fn routes(&self) -> Vec<(&str, &Route, f64)> {
        let mut routes: Vec<_> = self
            .routes
            .iter()
            .map(|(t, r)| (t.as_str(), r, ratio(r.failed(), r.samples())))
            .collect();
        routes.sort_by(|a, b| {
            b.1.failed()
                .cmp(&a.1.failed())
                .then_with(|| b.1.samples().cmp(&a.1.samples()))
                .then_with(|| a.0.cmp(b.0))
        });
        routes
    }

    pub fn overflow(&self) -> u64 {
        self.overflow
    }

    /// Forgets everything (a new canary is shadowed from scratch).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderValue;

    fn answer(body: &str) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert("set-cookie", HeaderValue::from_static("sid=s3cr3t"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        Answer {
            status: 200,
            headers,
            body: Bytes::from(body.to_owned()),
            over: false,
        }
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn example(fields: &[String]) -> Example {
        let a = answer(&"x".repeat(5_000));
        Example {
            request: "GET /a".to_owned(),
            request_headers: Vec::new(),
            fields: fields.to_vec(),
            primary: Shown::of(&a),
            candidate: Shown::of(&a),
        }
    }

    #[test]
    fn noise_is_learned_per_route_and_differences_kept_with_examples() {
        let mut report = Report::default();
        let (p, c) = (answer("a"), answer("b"));
        let none: Vec<String> = Vec::new();
        let sample = |fields: &'static [&'static str],
                      secondary: Option<&'static [&'static str]>| {
            (set(fields), secondary.map(set))
        };
        let mut outcomes = Vec::new();
        for (route, (fields, secondary)) in [
            ("GET /a", sample(&["$.at"], Some(&["$.at"]))),
            ("GET /a", sample(&["$.at"], None)),
            ("GET /b", sample(&["$.at"], None)),
            ("GET /a", sample(&["$.price", "$.at"], Some(&[]))),
            ("GET /a", sample(&[], Some(&[]))),
        ] {
            let s = Sample {
                primary: &p,
                candidate: &c,
                secondary_fields: secondary.as_ref(),
                fields: &fields,
            };
            outcomes.push(report.compared(route.to_owned(), &s, &none, example));
        }
        assert_eq!(
            outcomes,
            [
                Outcome::Noise,
                Outcome::Noise,
                Outcome::Diff(vec!["$.at".to_owned()]),
                Outcome::Diff(vec!["$.price".to_owned()]),
                Outcome::Match,
            ]
        );
        report.failed("GET /a".to_owned(), true);
        report.failed("GET /a".to_owned(), false);
        let totals = report.totals();
        assert_eq!(
            (
                totals.samples,
                totals.diffs,
                totals.candidate_errors,
                totals.secondary_errors
            ),
            (6, 2, 1, 1)
        );
        assert!((totals.diff_ratio - 0.5).abs() < 1e-9);
        let routes = report.routes();
        assert_eq!(routes[0].0, "GET /a");
        let a = routes[0].1;
        assert_eq!(
            a.differing_fields,
            BTreeMap::from([("$.price".to_owned(), 1)])
        );
        assert_eq!(a.noise_fields, set(&["$.at"]));
        assert_eq!(a.examples.len(), 1);
        // Bodies cut to 1 KiB, cookies never shown.
        let shown = &a.examples[0].primary;
        assert_eq!(
            (shown.body.len(), shown.body_bytes),
            (EXAMPLE_BODY_BYTES, 5_000)
        );
        assert!(
            shown
                .headers
                .contains(&("set-cookie".to_owned(), REDACTED.to_owned()))
        );
        report.clear();
        assert_eq!(report.totals(), Totals::default());
    }

    #[test]
    fn routes_are_capped_and_the_overflow_counted() {
        let mut report = Report::default();
        let a = answer("a");
        let none: Vec<String> = Vec::new();
        let empty = BTreeSet::new();
        for i in 0..MAX_ROUTES + 50 {
            let s = Sample {
                primary: &a,
                candidate: &a,
                secondary_fields: None,
                fields: &empty,
            };
            report.compared(format!("GET /r{i}"), &s, &none, example);
        }
        assert_eq!(report.routes().len(), MAX_ROUTES + 1);
        assert_eq!(report.overflow(), 50);
        assert!(report.routes().iter().any(|r| r.0 == OVERFLOW_ROUTE));
        assert_eq!(report.totals().samples, (MAX_ROUTES + 50) as u64);
    }

    #[test]
    fn secrets_are_redacted_by_name() {
        for name in [
            "authorization",
            "proxy-authorization",
            "cookie",
            "set-cookie",
            "x-api-key",
            "x-auth-token",
        ] {
            assert!(secret_header(name), "{name}");
        }
        for name in ["content-type", "location", "cache-control", "accept"] {
            assert!(!secret_header(name), "{name}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            "referer",
            "https://a.test/login?token=s3cr3t".parse().unwrap(),
        );
        headers.insert("location", "/next".parse().unwrap());
        headers.insert("x-long", "a".repeat(10_000).parse().unwrap());
        let mut shown = shown_headers(&headers);
        let long = shown.pop().unwrap().1;
        assert_eq!(long.len(), EXAMPLE_HEADER_BYTES + "…".len());
        assert_eq!(
            shown,
            [
                (
                    "referer".to_owned(),
                    "https://a.test/login?[redacted]".to_owned()
                ),
                ("location".to_owned(), "/next".to_owned()),
            ]
        );
    }
}
