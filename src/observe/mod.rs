//! What operators see: metrics, short-term stats, events, and the admin listener.
//!
//! - [`metrics`]: the owned Prometheus registry and per-pool handles.
//! - [`conn_metrics`]: the backends' connection limits: refusals, connections, queue.
//! - [`stats`]: short-term history (rates, error ratios, percentiles) for the status page.
//! - [`events`]: the event funnel (log line + recent events).
//! - [`admin`]: the admin listener: metrics, health, readiness, flags, events, status page.
//! - [`analysis_page`]: the canary analysis on the admin listener (`/analysis`, the
//!   status page's section and chart).
//! - [`html`]: HTML escaping for the pages the proxy renders.
//! - [`trace`]: OpenTelemetry spans of proxied requests, and the W3C trace context
//!   and baggage carried upstream; [`trace_export`]: their queue and OTLP export.
//! - [`access_log`]: the access log (`[server] access_log`: stdout, a file or off;
//!   canarygate, combined or JSON lines), formatted per worker and written off the
//!   request path.

pub mod access_log;
pub mod admin;
pub mod analysis_metrics;
pub mod analysis_page;
pub mod baggage;
pub mod conn_metrics;
pub mod events;
pub mod html;
pub mod metric_def;
pub mod metrics;
pub mod shadow_metrics;
pub mod shadow_page;
pub mod stats;
pub mod trace;
pub mod trace_export;
