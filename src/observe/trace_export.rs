//! Getting finished spans to the collector without the request path ever waiting.
//!
//! A span ends on a request's task; [`QueueProcessor`] only tries to put it in a
//! bounded queue (`tracing.max_queue`): full, the span is dropped and counted
//! (`canarygate_trace_spans_dropped_total`), so a slow or dead collector costs
//! spans, never latency or memory. [`run`] takes the queue out in batches and hands
//! them to `opentelemetry-otlp`'s exporter (OTLP/HTTP, protobuf); a batch the
//! collector refuses or never answers is dropped and counted too. The SDK's own
//! batch processor is not used because it drops without telling anyone.
//!
//! The exporter's HTTP client is the crate's `reqwest` (rustls), adapted to
//! `opentelemetry-http`'s trait.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::Context;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter as _, SpanProcessor};
use prometheus::core::Collector;
use prometheus::{IntCounter, Opts};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::traces::TracingConfig;
use crate::observe::metric_def::must;

/// Spans per export request.
const BATCH: usize = 512;
/// How long spans wait for more to fill a batch.
const LINGER: Duration = Duration::from_secs(1);
/// One export's deadline: a collector that does not answer costs one batch.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// What the shutdown gives the spans still queued.
const FINAL_EXPORT: Duration = Duration::from_secs(2);

/// `canarygate_trace_spans_*`.
#[derive(Clone)]
pub struct TraceMetrics {
    pub exported: IntCounter,
    pub dropped: IntCounter,
}

impl TraceMetrics {
    pub fn new(reg: &mut dyn FnMut(Box<dyn Collector>)) -> Self {
        let exported = must(IntCounter::with_opts(Opts::new(
            "canarygate_trace_spans_exported_total",
            "Spans the OTLP collector accepted.",
        )));
        let dropped = must(IntCounter::with_opts(Opts::new(
            "canarygate_trace_spans_dropped_total",
            "Sampled spans never exported: the queue (tracing.max_queue) was full, or the \
             collector refused or did not answer their batch.",
        )));
        reg(Box::new(exported.clone()));
        reg(Box::new(dropped.clone()));
        Self { exported, dropped }
    }
}

/// Puts finished spans in the export queue, or counts them dropped.
#[derive(Debug)]
pub struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    dropped: IntCounter,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export side of the queue: run it with [`run`].
pub struct Export {
    queue: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    metrics: TraceMetrics,
    url: String,
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("tracing.headers_env: {0}")]
    Headers(String),
    #[error("tracing.otlp_endpoint: cannot build the exporter: {0}")]
    Exporter(String),
}

/// The tracer provider (sampler, resource, the queue) and its export side.
pub fn pipeline(
    config: &TracingConfig,
    instance: &str,
    metrics: &TraceMetrics,
) -> Result<(opentelemetry_sdk::trace::SdkTracerProvider, Export), TraceError> {
    let url = config.traces_url().unwrap_or_default();
    let headers: HashMap<String, String> = match &config.headers_env {
        Some(name) => crate::config::traces::collector_headers(name)
            .map_err(TraceError::Headers)?
            .into_iter()
            .collect(),
        None => HashMap::new(),
    };
    // No redirects: the collector's auth headers must not follow one elsewhere.
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| TraceError::Exporter(e.to_string()))?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Http(client))
        .with_endpoint(url.clone())
        .with_headers(headers)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TraceError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attributes([
            opentelemetry::KeyValue::new("service.instance.id", instance.to_owned()),
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::channel(config.max_queue);
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_sampler(crate::observe::trace::Tracing::sampler())
        .with_resource(resource)
        .with_span_processor(QueueProcessor {
            queue: tx,
            dropped: metrics.dropped.clone(),
        })
        .build();
    Ok((
        provider,
        Export {
            queue: rx,
            exporter,
            metrics: metrics.clone(),
            // Logged: without userinfo or query, which may carry credentials.
            url: crate::redact::url(&url),
        },
    ))
}

/// Exports queued spans in batches until `cancel`. Then what is still queued gets
/// one last try of at most `FINAL_EXPORT` (2 s) (none when the collector is failing):
/// a dead collector must not hold the shutdown; what is left is counted dropped.
pub async fn run(mut export: Export, cancel: CancellationToken) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            n = export.queue.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
            }
        }
        // A lone span waits a little for company (one request per span otherwise).
        if batch.len() < BATCH {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(LINGER) => {}
            }
            while batch.len() < BATCH {
                match export.queue.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
        }
        let n = batch.len() as u64;
        let sent = send(&export, std::mem::take(&mut batch), failing, EXPORT_TIMEOUT);
        tokio::select! {
            ok = sent => failing = !ok,
            () = cancel.cancelled() => {
                export.metrics.dropped.inc_by(n);
                break;
            }
        }
    }
    export.queue.close();
    let deadline = tokio::time::Instant::now() + FINAL_EXPORT;
    loop {
        batch.clear();
        while batch.len() < BATCH {
            match export.queue.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if failing || left.is_zero() {
            export.metrics.dropped.inc_by(batch.len() as u64);
            continue;
        }
        failing = !send(&export, std::mem::take(&mut batch), failing, left).await;
    }
}

/// Exports one batch within `limit`; returns whether it went through. A failure is
/// logged once when the collector starts failing (`failing` false), not per batch.
async fn send(export: &Export, batch: Vec<SpanData>, failing: bool, limit: Duration) -> bool {
    let n = batch.len() as u64;
    let result = tokio::time::timeout(limit, export.exporter.export(batch)).await;
    let error = match result {
        Ok(Ok(())) => {
            export.metrics.exported.inc_by(n);
            if failing {
                info!(collector = %export.url, "trace export works again");
            }
            return true;
        }
        Ok(Err(error)) => crate::redact::urls_in(&error.to_string()),
        Err(_) => "timed out".to_owned(),
    };
    export.metrics.dropped.inc_by(n);
    if !failing {
        warn!(collector = %export.url, %error, spans = n, "trace export failed; spans dropped and counted");
    }
    false
}

/// `opentelemetry-http`'s client trait over the crate's `reqwest`.
#[derive(Debug, Clone)]
struct Http(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Http {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        let mut out = http::Response::new(body);
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        Ok(out)
    }
}
