//! OpenTelemetry traces of proxied requests, and the version carried downstream.
//!
//! Why the proxy traces at all: it is the one hop that knows which version served a
//! request and why. So each request gets a server span (continuing the caller's W3C
//! `traceparent`, or starting a trace) with the pool, the reason, the backend, the
//! instance and the flags' digest on it, and each attempt at a backend a client
//! span of its own (a retry shows as a second attempt). The backend receives the
//! attempt's `traceparent` and a W3C `baggage` carrying `canarygate.pool` and the
//! allow-listed flags, so any service that propagates baggage (every OpenTelemetry
//! SDK does) can keep its own calls on the same version.
//!
//! A `canarygate.pool` member arriving from a client is a request to be routed to
//! that pool: honoured only from `routing.override_trusted` sources (an internal
//! service calling through the proxy), like the override header; from anyone else
//! it is dropped, and never passed on, so a client cannot steer the services behind.
//!
//! Cost: a request that is not sampled gets a non-recording span (ids only, no
//! attributes, nothing exported); spans are built with the SDK
//! (`opentelemetry_sdk`) and exported by `opentelemetry-otlp` from a bounded queue
//! off the request path ([`crate::observe::trace_export`]).

use std::time::SystemTime;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::baggage::{BaggageExt as _, KeyValueMetadata};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::Span as _;
use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};

use crate::routing::PoolKind;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// The baggage member naming the pool that served a request.
pub const POOL_MEMBER: &str = "canarygate.pool";

/// The tracer and what every request's trace needs; `None` in the state when
/// `[tracing]` is off.
pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    baggage_flags: Vec<String>,
    instance: String,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// A tracer whose finished, sampled spans go to `provider`'s processor.
    pub fn new(provider: SdkTracerProvider, baggage_flags: Vec<String>, instance: String) -> Self {
        Self {
            tracer: provider.tracer("canarygate"),
            provider,
            baggage_flags,
            instance,
        }
    }

    /// The sampler: parent-based, new traces sampled at `ratio`.
    pub fn sampler(ratio: f64) -> Sampler {
        Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
    }

    /// Ends the provider: spans still queued are the exporter's to flush.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }

    /// The server span of a request, continuing the caller's trace if it sent one;
    /// the incoming baggage is read (and its `canarygate.*` members taken out).
    pub fn server_span(
        &self,
        headers: &HeaderMap,
        method: &str,
        start: SystemTime,
    ) -> RequestTrace {
        let extractor = Headers(headers);
        let parent = TraceContextPropagator::new().extract(&extractor);
        let incoming = if headers.contains_key(BAGGAGE) {
            BaggagePropagator::new().extract(&extractor)
        } else {
            Context::new()
        };
        let asked_pool =
            incoming
                .baggage()
                .get(POOL_MEMBER)
                .and_then(|value| match value.as_str() {
                    "canary" => Some(PoolKind::Canary),
                    "production" => Some(PoolKind::Production),
                    _ => None,
                });
        // The caller's own members go on; `canarygate.*` are the proxy's to set.
        let baggage = incoming
            .baggage()
            .iter()
            .filter(|(key, _)| !key.as_str().starts_with("canarygate."))
            .map(|(key, (value, meta))| {
                KeyValueMetadata::new(key.clone(), value.clone(), meta.clone())
            })
            .collect();
        let span = self
            .tracer
            .span_builder(method.to_owned())
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .start_with_context(&self.tracer, &parent);
        RequestTrace {
            span,
            baggage,
            asked_pool,
        }
    }

    /// A client span for one attempt at a backend, child of the request's span.
    pub fn attempt(
        &self,
        trace: &RequestTrace,
        method: &str,
        backend: &str,
        resend: u32,
    ) -> AttemptSpan {
        let sc = trace.span.span_context();
        // The server span, as a local parent of its attempts.
        let parent = Context::new().with_remote_span_context(SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags(),
            false,
            sc.trace_state().clone(),
        ));
        let mut span = self
            .tracer
            .span_builder(method.to_owned())
            .with_kind(SpanKind::Client)
            .start_with_context(&self.tracer, &parent);
        if span.is_recording() {
            let (host, port) = backend.rsplit_once(':').unwrap_or((backend, ""));
            span.set_attribute(KeyValue::new("http.request.method", method.to_owned()));
            span.set_attribute(KeyValue::new("server.address", host.to_owned()));
            if let Ok(port) = port.parse::<i64>() {
                span.set_attribute(KeyValue::new("server.port", port));
            }
            span.set_attribute(KeyValue::new("canarygate.backend", backend.to_owned()));
            if resend > 0 {
                span.set_attribute(KeyValue::new(
                    "http.request.resend_count",
                    i64::from(resend),
                ));
            }
        }
        AttemptSpan { span }
    }

    /// The `baggage` sent upstream: the caller's members (minus `canarygate.*`),
    /// `canarygate.pool` and the allow-listed flags.
    pub fn baggage(
        &self,
        trace: &RequestTrace,
        pool: PoolKind,
        flags: &crate::flags::model::FlagSet,
    ) -> Option<HeaderValue> {
        let mut members = trace.baggage.clone();
        // Flags first, so a flag can never take the pool member's place.
        for name in &self.baggage_flags {
            if let Some(value) = flags.values.get(name) {
                members.push(KeyValueMetadata::new(
                    name.clone(),
                    value.as_str().to_owned(),
                    "",
                ));
            }
        }
        members.push(KeyValueMetadata::new(POOL_MEMBER, pool.as_str(), ""));
        let cx = Context::new().with_baggage(members);
        let mut out = OneHeader(None);
        BaggagePropagator::new().inject_context(&cx, &mut out);
        out.0
    }

    /// The instance id spans carry (`server.instance_id`, or `hostname:port`).
    pub fn instance(&self) -> &str {
        &self.instance
    }
}

/// A request's server span and the caller's baggage. Dropping it ends the span.
pub struct RequestTrace {
    span: Span,
    /// The caller's baggage members, without `canarygate.*`.
    baggage: Vec<KeyValueMetadata>,
    asked_pool: Option<PoolKind>,
}

impl std::fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTrace").finish_non_exhaustive()
    }
}

/// What the server span records of the routing and the answer.
pub struct Routed<'a> {
    pub pool: PoolKind,
    pub reason: &'a str,
    pub backend: Option<&'a str>,
    pub instance: &'a str,
    pub flags_digest: &'a str,
    pub request_id: &'a str,
    pub path: &'a str,
    pub scheme: &'static str,
    pub version: &'static str,
    pub client: std::net::IpAddr,
    pub status: u16,
}

impl RequestTrace {
    /// The pool the caller's baggage asked for (`canarygate.pool`); the caller of
    /// this decides whether that source is trusted.
    pub fn asked_pool(&self) -> Option<PoolKind> {
        self.asked_pool
    }

    /// Whether this request's spans are recorded and exported.
    pub fn is_sampled(&self) -> bool {
        self.span.is_recording()
    }

    /// Records the routing and the response head on the server span.
    pub fn answered(&mut self, r: &Routed<'_>) {
        if !self.span.is_recording() {
            return;
        }
        let span = &mut self.span;
        span.set_attribute(KeyValue::new("url.path", r.path.to_owned()));
        span.set_attribute(KeyValue::new("url.scheme", r.scheme));
        span.set_attribute(KeyValue::new("network.protocol.version", r.version));
        span.set_attribute(KeyValue::new("client.address", r.client.to_string()));
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(r.status),
        ));
        span.set_attribute(KeyValue::new("canarygate.pool", r.pool.as_str()));
        span.set_attribute(KeyValue::new("canarygate.reason", r.reason.to_owned()));
        if let Some(backend) = r.backend {
            span.set_attribute(KeyValue::new("canarygate.backend", backend.to_owned()));
        }
        span.set_attribute(KeyValue::new("canarygate.instance", r.instance.to_owned()));
        span.set_attribute(KeyValue::new(
            "canarygate.flags_digest",
            r.flags_digest.to_owned(),
        ));
        span.set_attribute(KeyValue::new(
            "canarygate.request_id",
            r.request_id.to_owned(),
        ));
        if r.status >= 500 {
            // A server span's error is a 5xx (the semantic conventions).
            span.set_attribute(KeyValue::new("error.type", r.status.to_string()));
            span.set_status(Status::error(""));
        }
    }

    /// The client went away before the response ended: an event and an error.
    pub fn client_reset(&mut self, stage: &'static str) {
        if self.span.is_recording() {
            self.span.add_event(
                "client reset",
                vec![KeyValue::new("canarygate.stage", stage)],
            );
            self.span.set_status(Status::error("client reset"));
        }
    }

    /// The backend cut the response body: an event and an error.
    pub fn body_cut(&mut self, error: &str) {
        if self.span.is_recording() {
            self.span.add_event(
                "response body cut",
                vec![KeyValue::new("exception.message", error.to_owned())],
            );
            self.span.set_status(Status::error("response body cut"));
        }
    }

    /// An upgraded connection (a WebSocket) closed after `seconds` open.
    pub fn tunnel_closed(&mut self, seconds: f64) {
        if self.span.is_recording() {
            self.span.add_event(
                "tunnel closed",
                vec![KeyValue::new("canarygate.tunnel.duration_s", seconds)],
            );
        }
    }
}

/// One attempt at a backend. Dropping it ends the span.
pub struct AttemptSpan {
    span: Span,
}

impl AttemptSpan {
    /// The `traceparent` the backend receives: this attempt's span as its parent.
    pub fn traceparent(&self) -> HeaderValue {
        let sc = self.span.span_context();
        let value = format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        );
        HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static(""))
    }

    /// The `tracestate` the backend receives, if the trace has one.
    pub fn tracestate(&self) -> Option<HeaderValue> {
        let state = self.span.span_context().trace_state().header();
        (!state.is_empty())
            .then(|| HeaderValue::from_str(&state).ok())
            .flatten()
    }

    /// The attempt's outcome: the backend's status, or the error that ended it.
    pub fn finish(mut self, status: Option<u16>, error: Option<&str>) {
        if !self.span.is_recording() {
            return;
        }
        if let Some(status) = status {
            self.span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 400 {
                self.span
                    .set_attribute(KeyValue::new("error.type", status.to_string()));
                self.span.set_status(Status::error(""));
            }
        }
        if let Some(error) = error {
            self.span
                .set_attribute(KeyValue::new("error.type", error.to_owned()));
            self.span.set_status(Status::error(error.to_owned()));
        }
    }
}

/// Header lookups for the propagators.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Receives the one header a propagator writes.
struct OneHeader(Option<HeaderValue>);

impl Injector for OneHeader {
    fn set(&mut self, _key: &str, value: String) {
        self.0 = HeaderValue::from_str(&value).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing() -> Tracing {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Tracing::sampler(1.0))
            .build();
        Tracing::new(provider, vec!["theme".to_owned()], "test:1".to_owned())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_callers_trace_is_continued_with_a_new_span_per_attempt() {
        let t = tracing();
        let trace = t.server_span(
            &headers(&[("traceparent", PARENT)]),
            "GET",
            SystemTime::now(),
        );
        let first = t.attempt(&trace, "GET", "127.0.0.1:80", 0).traceparent();
        let second = t.attempt(&trace, "GET", "127.0.0.1:81", 1).traceparent();
        let first = first.to_str().unwrap();
        assert!(
            first.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{first}"
        );
        assert!(first.ends_with("-01"), "{first}");
        assert_ne!(first, second.to_str().unwrap());
        assert!(
            !first.contains("00f067aa0ba902b7"),
            "the attempt is a new span: {first}"
        );
    }

    #[test]
    fn an_unsampled_caller_stays_unsampled() {
        let t = tracing();
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let trace = t.server_span(
            &headers(&[("traceparent", unsampled)]),
            "GET",
            SystemTime::now(),
        );
        assert!(!trace.is_sampled());
        let tp = t.attempt(&trace, "GET", "b:1", 0).traceparent();
        assert!(tp.to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn baggage_carries_the_pool_and_allowed_flags_and_drops_a_forged_pool() {
        let t = tracing();
        let trace = t.server_span(
            &headers(&[(
                "baggage",
                "userId=alice,canarygate.pool=canary,canarygate.x=1",
            )]),
            "GET",
            SystemTime::now(),
        );
        assert_eq!(trace.asked_pool(), Some(PoolKind::Canary));
        let mut flags = crate::flags::model::FlagSet::default();
        flags.values.insert(
            "theme".to_owned(),
            crate::flags::model::FlagValue::Text("blue".to_owned()),
        );
        flags.values.insert(
            "secret".to_owned(),
            crate::flags::model::FlagValue::Bool(true),
        );
        let out = t.baggage(&trace, PoolKind::Production, &flags).unwrap();
        let mut members: Vec<&str> = out.to_str().unwrap().split(',').collect();
        members.sort_unstable();
        assert_eq!(
            members,
            ["canarygate.pool=production", "theme=blue", "userId=alice"]
        );
    }
}
