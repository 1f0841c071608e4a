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

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::Span as _;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};

use crate::observe::baggage;
use crate::routing::PoolKind;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");

/// The tracer and what every request's trace needs; `None` in the state when
/// `[tracing]` is off.
pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    /// The share of new traces sampled.
    ratio: f64,
    baggage_flags: Vec<String>,
    instance: String,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// A tracer whose finished spans go to `provider`'s processor. The provider
    /// samples everything it is given ([`Tracing::sampler`]): the decision is made
    /// here first, parent-based with `ratio` for new traces, so a request that is not
    /// sampled never builds an SDK span (ids and headers only).
    pub fn new(
        provider: SdkTracerProvider,
        ratio: f64,
        baggage_flags: Vec<String>,
        instance: String,
    ) -> Self {
        Self {
            tracer: provider.tracer("canarygate"),
            provider,
            ratio,
            baggage_flags,
            instance,
        }
    }

    /// The provider's sampler: the decision is [`Tracing::server_span`]'s.
    pub fn sampler() -> Sampler {
        Sampler::AlwaysOn
    }

    /// Ends the provider: spans still queued are the exporter's to flush.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }

    /// A request's trace: the caller's continued if it sent a valid `traceparent`,
    /// else a new one. Whether it is sampled: the caller's flag when the caller is
    /// `trusted` (`routing.override_trusted`), else `ratio` (a client on the
    /// internet must not make every one of its requests cost a span). Sampled, it
    /// has a server span. The incoming baggage is read, its `canarygate.*` members
    /// taken out.
    pub fn server_span(
        &self,
        headers: &HeaderMap,
        method: &str,
        trusted: bool,
    ) -> Box<RequestTrace> {
        // One pass over the request's few fields: two map lookups of custom names
        // (hashed each time) cost more, on every request, than most requests hold.
        let (mut has_parent, mut has_baggage) = (false, false);
        for name in headers.keys() {
            has_parent |= *name == TRACEPARENT;
            has_baggage |= *name == BAGGAGE;
        }
        let parent = has_parent
            .then(|| TraceContextPropagator::new().extract(&HeaderExtractor(headers)))
            .filter(|cx| cx.span().span_context().is_valid());
        let baggage = if has_baggage {
            baggage::parse(headers.get_all(BAGGAGE).iter().map(HeaderValue::as_bytes))
        } else {
            baggage::Incoming::default()
        };
        let sampled = match &parent {
            Some(cx) if trusted => cx.span().span_context().is_sampled(),
            _ => self.ratio > 0.0 && fastrand::f64() < self.ratio,
        };
        let span = sampled.then(|| {
            let mut span = self
                .tracer
                .span_builder(span_name(method))
                .with_kind(SpanKind::Server)
                .start_with_context(&self.tracer, parent.as_ref().unwrap_or(&Context::new()));
            span.set_attribute(KeyValue::new("http.request.method", span_name(method)));
            span
        });
        let (trace_id, trace_state) = match (&span, &parent) {
            (Some(span), _) => (span.span_context().trace_id(), TraceState::NONE),
            (None, Some(cx)) => {
                let sc = cx.span().span_context().clone();
                (sc.trace_id(), sc.trace_state().clone())
            }
            (None, None) => (TraceId::from(fastrand::u128(1..)), TraceState::NONE),
        };
        Box::new(RequestTrace {
            span,
            trace_id,
            trace_state,
            baggage,
        })
    }

    /// An attempt at a backend: a client span, child of the request's span, when
    /// the request is sampled; a new span id for the backend's `traceparent` always.
    pub fn attempt(
        &self,
        trace: &RequestTrace,
        method: &str,
        backend: &str,
        resend: u32,
    ) -> AttemptSpan {
        let Some(server) = &trace.span else {
            return AttemptSpan {
                span: None,
                traceparent: traceparent(trace.trace_id, SpanId::from(fastrand::u64(1..)), false),
                tracestate: header_of_state(&trace.trace_state),
            };
        };
        let sc = server.span_context();
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
            .span_builder(span_name(method))
            .with_kind(SpanKind::Client)
            .start_with_context(&self.tracer, &parent);
        let (host, port) = backend.rsplit_once(':').unwrap_or((backend, ""));
        let host = host.trim_start_matches('[').trim_end_matches(']');
        span.set_attribute(KeyValue::new("http.request.method", span_name(method)));
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
        let own = span.span_context();
        AttemptSpan {
            traceparent: traceparent(own.trace_id(), own.span_id(), own.is_sampled()),
            tracestate: header_of_state(own.trace_state()),
            span: Some(span),
        }
    }

    /// The `baggage` sent upstream: `canarygate.pool` first, the allow-listed
    /// flags, then the caller's members that fit ([`baggage::render`]).
    pub fn baggage(
        &self,
        trace: &RequestTrace,
        pool: PoolKind,
        flags: &crate::flags::model::FlagSet,
    ) -> Option<HeaderValue> {
        if self.baggage_flags.is_empty() && trace.baggage.members.is_empty() {
            // The usual case, without an allocation.
            return Some(HeaderValue::from_static(match pool {
                PoolKind::Production => "canarygate.pool=production",
                PoolKind::Canary => "canarygate.pool=canary",
            }));
        }
        let flags: Vec<(&str, &str)> = self
            .baggage_flags
            .iter()
            .filter_map(|name| Some((name.as_str(), flags.values.get(name)?.as_str())))
            .collect();
        let out = baggage::render(Some(pool), &flags, &trace.baggage)?;
        HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
    }

    /// The instance id spans carry (`server.instance_id`, or `hostname:port`).
    pub fn instance(&self) -> &str {
        &self.instance
    }
}

/// A span's name and `http.request.method`: the method when it is a known one,
/// else `_OTHER` (a client must not mint span names).
fn span_name(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("_OTHER")
}

/// `traceparent` (W3C trace context, version 00), written by hand: `format!` with
/// the ids' `Display` was 2,200 instructions a request, more than the rest of an
/// unsampled trace.
fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(55);
    out.extend_from_slice(b"00-");
    let hex = |out: &mut Vec<u8>, bytes: &[u8]| {
        for &byte in bytes {
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        }
    };
    hex(&mut out, &trace_id.to_bytes());
    out.push(b'-');
    hex(&mut out, &span_id.to_bytes());
    out.extend_from_slice(if sampled { b"-01" } else { b"-00" });
    // No copy: the header shares the buffer.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).unwrap_or(HeaderValue::from_static(""))
}

/// `tracestate`, if the trace has one.
fn header_of_state(state: &TraceState) -> Option<HeaderValue> {
    let header = state.header();
    (!header.is_empty())
        .then(|| HeaderValue::from_maybe_shared(bytes::Bytes::from(header)).ok())
        .flatten()
}

/// A request's trace: its ids, its server span if sampled, the caller's baggage.
/// Dropping it ends the span.
pub struct RequestTrace {
    span: Option<Span>,
    trace_id: TraceId,
    /// The caller's `tracestate`, for a trace that is not sampled (a sampled one
    /// has it in its span).
    trace_state: TraceState,
    /// The caller's baggage: what it asked for, and its members to pass on.
    baggage: baggage::Incoming,
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
        self.baggage.asked_pool
    }

    /// Whether this request's spans are recorded and exported.
    pub fn is_sampled(&self) -> bool {
        self.span.is_some()
    }

    /// Records the routing and the response head on the server span.
    pub fn answered(&mut self, r: &Routed<'_>) {
        let Some(span) = &mut self.span else { return };
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
        if let Some(span) = &mut self.span {
            span.add_event(
                "client reset",
                vec![KeyValue::new("canarygate.stage", stage)],
            );
            span.set_status(Status::error("client reset"));
        }
    }

    /// The backend cut the response body: an event and an error.
    pub fn body_cut(&mut self, error: &str) {
        if let Some(span) = &mut self.span {
            span.add_event(
                "response body cut",
                vec![KeyValue::new("exception.message", error.to_owned())],
            );
            span.set_status(Status::error("response body cut"));
        }
    }

    /// An upgraded connection (a WebSocket) closed after `seconds` open.
    pub fn tunnel_closed(&mut self, seconds: f64) {
        if let Some(span) = &mut self.span {
            span.add_event(
                "tunnel closed",
                vec![KeyValue::new("canarygate.tunnel.duration_s", seconds)],
            );
        }
    }
}

/// One attempt at a backend: its `traceparent`, and its client span when sampled.
/// Dropping it ends the span.
pub struct AttemptSpan {
    span: Option<Span>,
    traceparent: HeaderValue,
    tracestate: Option<HeaderValue>,
}

impl AttemptSpan {
    /// The `traceparent` the backend receives: this attempt as its parent.
    pub fn traceparent(&self) -> HeaderValue {
        self.traceparent.clone()
    }

    /// The `tracestate` the backend receives, if the trace has one.
    pub fn tracestate(&self) -> Option<HeaderValue> {
        self.tracestate.clone()
    }

    /// The attempt's outcome: the backend's status, or the error that ended it.
    pub fn finish(self, status: Option<u16>, error: Option<&str>) {
        let Some(mut span) = self.span else { return };
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 400 {
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(""));
            }
        }
        if let Some(error) = error {
            span.set_attribute(KeyValue::new("error.type", error.to_owned()));
            span.set_status(Status::error(error.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing() -> Tracing {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Tracing::sampler())
            .build();
        Tracing::new(provider, 1.0, vec!["theme".to_owned()], "test:1".to_owned())
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
        let trace = t.server_span(&headers(&[("traceparent", PARENT)]), "GET", true);
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
        let trace = t.server_span(&headers(&[("traceparent", unsampled)]), "GET", true);
        assert!(!trace.is_sampled());
        let tp = t.attempt(&trace, "GET", "b:1", 0).traceparent();
        assert!(tp.to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn baggage_carries_the_pool_first_and_allowed_flags_and_drops_a_forged_pool() {
        let t = tracing();
        let trace = t.server_span(
            &headers(&[(
                "baggage",
                "userId=alice,canarygate.pool=canary,canarygate.x=1",
            )]),
            "GET",
            true,
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
        assert_eq!(out, "canarygate.pool=production,theme=blue,userId=alice");
    }

    #[test]
    fn an_untrusted_callers_sampled_flag_does_not_decide_but_its_trace_goes_on() {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Tracing::sampler())
            .build();
        let t = Tracing::new(provider, 0.0, Vec::new(), "test:1".to_owned());
        let h = headers(&[("traceparent", PARENT)]);
        let untrusted = t.server_span(&h, "GET", false);
        assert!(!untrusted.is_sampled());
        let tp = t.attempt(&untrusted, "GET", "b:1", 0).traceparent();
        let tp = tp.to_str().unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-00"),
            "{tp}"
        );
        assert!(t.server_span(&h, "GET", true).is_sampled());
    }

    #[test]
    fn traceparent_is_the_w3c_form() {
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        assert_eq!(
            traceparent(trace, span, true),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            traceparent(trace, span, false),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
    }

    #[test]
    fn a_client_mints_no_span_names() {
        assert_eq!(span_name("GET"), "GET");
        assert_eq!(span_name("BREW"), "_OTHER");
    }
}
