//! The shadow stage (issue 32): copies of production's requests go to the canary
//! (the candidate) and again to production (the secondary); their answers are
//! compared with the one the client got (the primary) and thrown away, so a release
//! that answers differently is caught before any user meets it.
//!
//! The request path never waits for it. Whether a request is mirrored is decided
//! from a hash of its request id and its method, with no lock; a slot is taken from
//! one atomic counter (`max_in_flight`; none left: dropped and counted); the
//! method, target and headers are copied, and a task of its own sends the candidate
//! and the secondary once the primary's head is there. The primary's body reaches
//! the mirror through a [`Tee`] in the response body: it copies the chunks
//! streaming to the client, up to `max_body_bytes`, and never holds one back; a body that does not end (the client went away) drops the
//! comparison. The client's next keep-alive request therefore never waits either.
//!
//! - [`template`]: route templates (`/users/{n}`).
//! - [`compare`]: the comparison, pure.
//! - [`report`]: per-route findings, bounded, for `/shadow`.
//! - [`gate`]: `[shadow] gate`, the analysis' decision with the shadow in front.

pub mod compare;
pub mod gate;
pub mod report;
pub mod template;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt as _;
use tokio::sync::oneshot;
use tracing::debug;

use crate::client::body::PooledBody;
use crate::client::error::ExchangeError;
use crate::client::exchange::{ConnectSettings, send};
use crate::client::request_body::UpstreamBody;
use crate::clock::now_ms;
use crate::config::Config;
use crate::http1::strip_hop_by_hop;
use crate::observe::shadow_metrics::{ShadowMetrics, ShadowResult};
use crate::routing::PoolKind;
use crate::upstream::pools::{Backend, Pools};

use compare::{Answer, Outcome, differences};
use report::{Example, Report, Sample, Shown, Totals, shown_headers};

/// Marks a mirrored request, so an application can skip its side effects. The
/// secondary carries it too: it is a replay as well.
pub const SHADOW_HEADER: HeaderName = HeaderName::from_static("x-canarygate-shadow");
/// The proxy's request id header (`proxy::headers::REQUEST_ID`; this module sits
/// below `proxy`).
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Why a mirror's exchange gave no answer to compare.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("no usable {0} backend")]
    NoBackend(&'static str),
    #[error("exchange failed: {0}")]
    Exchange(#[from] ExchangeError),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
}

/// The shadow's shared state: the in-flight count, the report and the gate's hold.
pub struct Shadow {
    in_flight: AtomicUsize,
    report: Mutex<Report>,
    /// With `[shadow] gate`: the canary gets no users (set by the analysis from the
    /// shared record; on until its first round says otherwise).
    hold: AtomicBool,
    metrics: ShadowMetrics,
}

impl Shadow {
    pub fn new(metrics: ShadowMetrics) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            report: Mutex::default(),
            hold: AtomicBool::new(true),
            metrics,
        }
    }

    /// Whether the gate holds the canary's users off (only read with `gate` on).
    pub fn holds_users(&self) -> bool {
        self.hold.load(Ordering::Relaxed)
    }

    pub fn set_hold(&self, hold: bool) {
        self.hold.store(hold, Ordering::Relaxed);
    }

    pub fn totals(&self) -> Totals {
        self.lock().totals()
    }

    /// Forgets the findings: a new canary is shadowed from scratch.
    pub fn clear(&self) {
        self.lock().clear();
        self.metrics.diff_ratio.set(0.0);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `GET /shadow`: the totals and every route, most differing first.
    pub fn json(&self, config: &Config) -> serde_json::Value {
        let shadow = &config.shadow;
        let report = self.lock();
        let routes: Vec<serde_json::Value> = report
            .routes()
            .into_iter()
            .map(|(template, route, ratio)| {
                serde_json::json!({
                    "route": template,
                    "samples": route.samples(),
                    "diff_ratio": ratio,
                    "matches": route.matches,
                    "noise": route.noise,
                    "diffs": route.diffs,
                    "candidate_errors": route.candidate_errors,
                    "secondary_errors": route.secondary_errors,
                    "differing_fields": route.differing_fields,
                    "noise_fields": route.noise_fields,
                    "examples": route.examples,
                })
            })
            .collect();
        serde_json::json!({
            "enabled": shadow.enabled,
            "percent": shadow.percent,
            "gate": shadow.gate,
            "min_samples": shadow.min_samples,
            "max_diff_ratio": shadow.max_diff_ratio,
            "holding_users": shadow.gate && self.holds_users(),
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "totals": report.totals(),
            "overflow": report.overflow(),
            "routes": routes,
        })
    }

    /// For a failed gate's alert: the top differing routes and one example.
    pub fn failure_details(&self) -> String {
        let report = self.lock();
        let mut out = String::new();
        let routes = report.routes();
        for (template, route, ratio) in routes.iter().take(5) {
            let fields: Vec<&str> = route
                .differing_fields
                .keys()
                .map(String::as_str)
                .take(5)
                .collect();
            let _ = writeln!(
                out,
                "{template}: {} of {} differed ({:.1}%), {} canary errors; fields {}",
                route.diffs,
                route.samples(),
                ratio * 100.0,
                route.candidate_errors,
                fields.join(", ")
            );
        }
        if let Some(example) = routes.iter().find_map(|(_, r, _)| r.examples.first()) {
            let _ = write!(
                out,
                "example: {} differs in {}: production {} {:?}, canary {} {:?}",
                example.request,
                example.fields.join(", "),
                example.primary.status,
                cut(&example.primary.body, 200),
                example.candidate.status,
                cut(&example.candidate.body, 200),
            );
        }
        out
    }

    /// Decides whether this request is mirrored (production-bound, `percent` by the
    /// request id's hash, a listed method, no body, a slot free) and copies what the
    /// mirror needs. Lock-free; costs a hash for every production request and the
    /// copies only for a mirrored one.
    pub fn sample<B: hyper::body::Body>(
        self: &Arc<Self>,
        config: &Arc<Config>,
        pools: &Arc<Pools>,
        flags: (&HeaderName, &HeaderValue),
        kind: PoolKind,
        req: &Request<B>,
        request_id: &HeaderValue,
    ) -> Option<Box<Mirror>> {
        let shadow = &config.shadow;
        if !shadow.enabled || kind != PoolKind::Production || pools.canary.is_empty() {
            return None;
        }
        if !chosen(request_id.as_bytes(), shadow.percent) || !shadow.mirrors(req.method()) {
            return None;
        }
        if req.headers().contains_key(header::UPGRADE) {
            return None;
        }
        if !req.body().is_end_stream() {
            // The body streams to production as it arrives; copying it would hold the
            // upload back or buffer it. Counted, so an operator sees what is missed.
            self.metrics.count(ShadowResult::Dropped);
            return None;
        }
        let slot = Slot::take(self, shadow.max_in_flight as usize)?;
        let target = req.uri().path_and_query()?.clone();
        let mut headers = req.headers().clone();
        strip_hop_by_hop(&mut headers);
        let host = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| headers.get(header::HOST).cloned());
        let mut set = vec![
            (SHADOW_HEADER, HeaderValue::from_static("1")),
            (REQUEST_ID, request_id.clone()),
            (flags.0.clone(), flags.1.clone()),
        ];
        if let Some(host) = host {
            set.push((header::HOST, host));
        }
        // Boxed: the request's future holds it across the forward, and every request
        // would pay for its size in moves.
        Some(Box::new(Mirror {
            slot: Some(slot),
            template: template::template(req.method(), target.path()),
            method: req.method().clone(),
            target,
            headers,
            set,
            config: Arc::clone(config),
            pools: Arc::clone(pools),
        }))
    }
}

fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether the request with this id is in the sample: FNV-1a of the id, in parts
/// per million, so the same ids give the same sample.
fn chosen(id: &[u8], percent: f64) -> bool {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0..=1e6
    let threshold = (percent * 10_000.0).round() as u64;
    compare::body_hash(id) % 1_000_000 < threshold
}

/// One of `max_in_flight`; given back when dropped.
struct Slot(Arc<Shadow>);

impl Slot {
    fn take(shadow: &Arc<Shadow>, max: usize) -> Option<Self> {
        if shadow.in_flight.fetch_add(1, Ordering::Relaxed) >= max {
            shadow.in_flight.fetch_sub(1, Ordering::Relaxed);
            shadow.metrics.count(ShadowResult::Dropped);
            return None;
        }
        shadow.metrics.in_flight.inc();
        Some(Self(Arc::clone(shadow)))
    }

    fn count(&self, result: ShadowResult) {
        self.0.metrics.count(result);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.in_flight.dec();
    }
}

/// A request chosen for the shadow, waiting for the primary's head. Dropped
/// without [`Mirror::start`] (the primary failed, or was an upgrade): counted as
/// dropped.
pub struct Mirror {
    slot: Option<Slot>,
    template: String,
    method: Method,
    target: PathAndQuery,
    headers: HeaderMap,
    /// Fields set on the mirrors: the shadow mark, the request id, flags, Host.
    set: Vec<(HeaderName, HeaderValue)>,
    config: Arc<Config>,
    pools: Arc<Pools>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Some(slot) = &self.slot {
            slot.count(ShadowResult::Dropped);
        }
    }
}

impl Mirror {
    /// The primary's head is here (from `primary`, a production backend): spawns
    /// the mirror's task and returns the tee for the primary's body.
    pub fn start(mut self, response: &Response<PooledBody>, primary: Option<&Backend>) -> Tee {
        let (done, primary_body) = oneshot::channel();
        let shadow = &self.config.shadow;
        let limit = usize::try_from(shadow.max_body_bytes).unwrap_or(usize::MAX);
        let primary_index = primary.and_then(|p| {
            self.pools
                .production
                .backends()
                .iter()
                .position(|b| std::ptr::eq(b, p))
        });
        let tee = Tee {
            head: Some(Answer {
                status: response.status().as_u16(),
                headers: compared_headers(response.headers(), &shadow.compare_headers),
                ..Answer::default()
            }),
            body: Collected::new(limit),
            done: Some(done),
        };
        let job = Job {
            slot: self.slot.take(),
            template: std::mem::take(&mut self.template),
            method: self.method.clone(),
            target: self.target.clone(),
            headers: std::mem::take(&mut self.headers),
            set: std::mem::take(&mut self.set),
            config: Arc::clone(&self.config),
            pools: Arc::clone(&self.pools),
        };
        tokio::spawn(job.run(primary_body, primary_index));
        tee
    }
}

/// The primary's body on its way to the client: a copy of its first
/// `max_body_bytes`, handed to the mirror at its end. Never holds a chunk back;
/// dropped before the end, it drops the comparison.
pub struct Tee {
    head: Option<Answer>,
    body: Collected,
    done: Option<oneshot::Sender<Answer>>,
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee").finish_non_exhaustive()
    }
}

impl Tee {
    pub fn data(&mut self, data: &Bytes) {
        self.body.push(data);
    }

    /// The body ended: the mirror gets the primary (a one-shot send, which never
    /// waits).
    pub fn end(&mut self) {
        if let (Some(mut answer), Some(done)) = (self.head.take(), self.done.take()) {
            (answer.body, answer.over) = self.body.finish();
            let _ = done.send(answer);
        }
    }
}

/// A body's first `limit` bytes, copied. Not the chunks themselves: a chunk is a
/// slice of the connection's read buffer and keeps all of it alive (up to 32 KiB a
/// chunk, and a 1 MiB body in small reads is hundreds of chunks), so keeping them
/// would not bound memory by `max_body_bytes`. The copy is of bytes that are being
/// written to the client anyway, only for mirrored requests, and never more than
/// `limit` in capacity.
struct Collected {
    body: Vec<u8>,
    limit: usize,
    over: bool,
}

impl Collected {
    fn new(limit: usize) -> Self {
        Self {
            body: Vec::new(),
            limit,
            over: false,
        }
    }

    /// Keeps what fits; returns whether the body went over the limit.
    fn push(&mut self, data: &Bytes) -> bool {
        if self.over {
            return true;
        }
        let room = self.limit - self.body.len();
        let take = data.len().min(room);
        self.over = data.len() > room;
        let needed = self.body.len() + take;
        if needed > self.body.capacity() {
            // Doubling as a Vec would, but never past `limit`.
            let grown = needed.max(self.body.capacity() * 2).min(self.limit);
            self.body.reserve_exact(grown - self.body.len());
        }
        self.body.extend_from_slice(&data[..take]);
        self.over
    }

    fn finish(&mut self) -> (Bytes, bool) {
        (Bytes::from(std::mem::take(&mut self.body)), self.over)
    }
}

fn compared_headers(headers: &HeaderMap, names: &[String]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in names {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            for value in headers.get_all(&name) {
                out.append(name.clone(), value.clone());
            }
        }
    }
    out
}

/// What the mirror's task needs, owned.
struct Job {
    slot: Option<Slot>,
    template: String,
    method: Method,
    target: PathAndQuery,
    headers: HeaderMap,
    set: Vec<(HeaderName, HeaderValue)>,
    config: Arc<Config>,
    pools: Arc<Pools>,
}

impl Job {
    /// Sends the candidate and the secondary, waits for the three answers (at most
    /// `timeout_ms` from now), compares and records.
    async fn run(self, primary: oneshot::Receiver<Answer>, primary_index: Option<usize>) {
        let timeout = Duration::from_millis(self.config.shadow.timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let now = now_ms();
        let Some((_, canary)) = self.pools.canary.pick(now, None) else {
            // No usable canary (down, or failing its checks): a canary error for the
            // gate at once, and no secondary, which would be production's work for
            // nothing.
            let result = self.failed(&ShadowError::NoBackend("canary"), true);
            return self.done(result);
        };
        let production = &self.pools.production;
        let secondary = production
            .pick(now, primary_index)
            .or_else(|| production.pick(now, None));
        let bounded = |fetch| async move {
            tokio::time::timeout_at(deadline, fetch)
                .await
                .unwrap_or(Err(ShadowError::Timeout(timeout)))
        };
        let (candidate, secondary, primary) = tokio::join!(
            bounded(self.fetch(Some(canary), "canary")),
            bounded(self.fetch(secondary.map(|(_, b)| b), "production")),
            tokio::time::timeout_at(deadline, primary),
        );
        let result = self.record(candidate, secondary, primary.ok().and_then(Result::ok));
        self.done(result);
    }

    fn done(&self, result: ShadowResult) {
        debug!(
            route = self.template.as_str(),
            result = result.as_str(),
            "shadow compared"
        );
        if let Some(slot) = &self.slot {
            slot.count(result);
            let totals = slot.0.totals();
            slot.0.metrics.diff_ratio.set(totals.diff_ratio);
        }
    }

    /// A mirror that got no answer: the candidate's (`canary`) or the secondary's.
    fn failed(&self, error: &ShadowError, canary: bool) -> ShadowResult {
        let Some(shadow) = self.slot.as_ref().map(|s| &s.0) else {
            return ShadowResult::Dropped;
        };
        let who = if canary { "candidate" } else { "secondary" };
        debug!(route = self.template.as_str(), %error, "shadow {who} failed");
        shadow.lock().failed(self.template.clone(), canary);
        ShadowResult::Error
    }

    fn record(
        &self,
        candidate: Result<Answer, ShadowError>,
        secondary: Result<Answer, ShadowError>,
        primary: Option<Answer>,
    ) -> ShadowResult {
        let Some(shadow) = self.slot.as_ref().map(|s| &s.0) else {
            return ShadowResult::Dropped;
        };
        // No primary: the client went away or was slower than the timeout.
        let Some(primary) = primary else {
            return ShadowResult::Dropped;
        };
        let candidate = match candidate {
            Ok(answer) => answer,
            Err(error) => return self.failed(&error, true),
        };
        let secondary = match secondary {
            Ok(answer) => answer,
            Err(error) => return self.failed(&error, false),
        };
        let headers = &self.config.shadow.compare_headers;
        let fields = differences(&primary, &candidate, headers);
        let noise: BTreeSet<String> = differences(&primary, &secondary, headers);
        let sample = Sample {
            primary: &primary,
            candidate: &candidate,
            secondary_fields: Some(&noise),
            fields: &fields,
        };
        let ignored = &self.config.shadow.ignore_json_paths;
        let outcome = shadow
            .lock()
            .compared(self.template.clone(), &sample, ignored, |fields| Example {
                request: format!("{} {}", self.method, self.target.path()),
                request_headers: shown_headers(&self.headers),
                fields: fields.to_vec(),
                primary: Shown::of(&primary),
                candidate: Shown::of(&candidate),
            });
        match outcome {
            Outcome::Match => ShadowResult::Match,
            Outcome::Noise => ShadowResult::Noise,
            Outcome::Diff(_) => ShadowResult::Diff,
        }
    }

    /// One mirror exchange with `backend`, body read up to `max_body_bytes`.
    async fn fetch(
        &self,
        backend: Option<&Backend>,
        pool: &'static str,
    ) -> Result<Answer, ShadowError> {
        let backend = backend.ok_or(ShadowError::NoBackend(pool))?;
        let mut req = Request::new(UpstreamBody::Empty);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = Uri::from(self.target.clone());
        *req.headers_mut() = self.headers.clone();
        let timeouts = &self.config.timeouts;
        let settings = ConnectSettings {
            connect_timeout: timeouts.connect(),
            idle_ms: timeouts.idle_ms,
            body_idle: timeouts.upstream_body_idle(),
        };
        let response = send(&backend.conns, &backend.authority, req, &self.set, settings).await?;
        let shadow = &self.config.shadow;
        let (parts, mut body) = response.into_parts();
        let limit = usize::try_from(shadow.max_body_bytes).unwrap_or(usize::MAX);
        let mut collected = Collected::new(limit);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data()
                && collected.push(&data)
            {
                // Past the limit only the prefix is compared: stop reading (the
                // connection goes with the body).
                break;
            }
        }
        let (body, over) = collected.finish();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: compared_headers(&parts.headers, &shadow.compare_headers),
            body,
            over,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_is_reproducible_and_near_its_percent() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("{i:032x}")).collect();
        let share = |percent| {
            ids.iter()
                .filter(|id| chosen(id.as_bytes(), percent))
                .count()
        };
        assert_eq!(share(0.0), 0);
        assert_eq!(share(100.0), ids.len());
        let ten = share(10.0);
        assert!((1_700..2_300).contains(&ten), "{ten}");
        assert_eq!(share(10.0), ten);
    }

    #[test]
    fn collected_keeps_the_first_limit_bytes() {
        let mut c = Collected::new(5);
        assert!(!c.push(&Bytes::from_static(b"abc")));
        assert!(c.push(&Bytes::from_static(b"defg")));
        assert!(c.push(&Bytes::from_static(b"h")));
        assert_eq!(c.finish(), (Bytes::from_static(b"abcde"), true));
        let mut exact = Collected::new(3);
        assert!(!exact.push(&Bytes::from_static(b"abc")));
        assert_eq!(exact.finish(), (Bytes::from_static(b"abc"), false));
    }
}
