//! A real OTLP/HTTP trace receiver: it decodes each export with the official
//! OpenTelemetry protobuf definitions (`opentelemetry-proto`) and keeps the spans.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use canarygate::server::{self, ServeOptions};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// One exported span with its resource's `service.name`.
#[derive(Debug, Clone)]
pub struct Exported {
    pub service: String,
    pub span: Span,
}

impl Exported {
    pub fn trace_id(&self) -> String {
        crate::support::hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        crate::support::hex(&self.span.span_id)
    }

    pub fn parent_id(&self) -> String {
        crate::support::hex(&self.span.parent_span_id)
    }

    /// A string or integer attribute, as text.
    pub fn attr(&self, key: &str) -> Option<String> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::DoubleValue(d) => Some(d.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// The receiver on 127.0.0.1; stops on drop.
pub struct Collector {
    pub addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Exported>>>,
    shutdown: CancellationToken,
}

impl Collector {
    pub async fn start() -> Self {
        let listener = crate::support::local_listener();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let kept = Arc::clone(&spans);
        tokio::spawn(server::serve(
            "otlp",
            listener,
            ServeOptions::basic(
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_millis(100),
            ),
            shutdown.clone(),
            move |_, _| {
                let kept = Arc::clone(&kept);
                service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        let path_ok = req.uri().path() == "/v1/traces";
                        let protobuf = req
                            .headers()
                            .get(http::header::CONTENT_TYPE)
                            .is_some_and(|v| v == "application/x-protobuf");
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(http_body_util::Collected::to_bytes);
                        let decoded = body
                            .ok()
                            .filter(|_| path_ok && protobuf)
                            .and_then(|b| ExportTraceServiceRequest::decode(b).ok());
                        let Some(request) = decoded else {
                            let mut bad = Response::new(Full::new(Bytes::new()));
                            *bad.status_mut() = StatusCode::BAD_REQUEST;
                            return Ok::<_, Infallible>(bad);
                        };
                        let mut spans = kept.lock().unwrap_or_else(PoisonError::into_inner);
                        for resource_spans in request.resource_spans {
                            let service = resource_spans
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                    Value::StringValue(s) => Some(s.clone()),
                                    _ => None,
                                })
                                .unwrap_or_default();
                            for scope in resource_spans.scope_spans {
                                for span in scope.spans {
                                    spans.push(Exported {
                                        service: service.clone(),
                                        span,
                                    });
                                }
                            }
                        }
                        let mut ok = Response::new(Full::new(Bytes::from(
                            ExportTraceServiceResponse::default().encode_to_vec(),
                        )));
                        ok.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok(ok)
                    }
                })
            },
        ));
        Self {
            addr,
            spans,
            shutdown,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Exported> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The spans of trace `trace_id` (hex), once at least `n` arrived (at most 15 s).
    pub async fn wait_trace(&self, trace_id: &str, n: usize) -> Vec<Exported> {
        let of_trace = || {
            self.spans()
                .into_iter()
                .filter(|s| s.trace_id() == trace_id)
                .collect::<Vec<_>>()
        };
        crate::support::eventually(Duration::from_secs(15), "spans exported", || async {
            of_trace().len() >= n
        })
        .await;
        of_trace()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
