//! Prometheus metrics in an owned [`Registry`] (no global registration, so every proxy
//! in a process, and every test, has its own).
//!
//! The request path never looks a label set up under a lock shared by all requests:
//! each pool resolves its handles once ([`PoolMetrics`]), and the per-(method, code)
//! request counters are resolved lazily into a lock-free `OnceLock` table the first
//! time a combination is seen.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use prometheus::core::Collector as _;
use prometheus::{
    Encoder as _, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::metric_def::must;
use crate::routing::PoolKind;

/// Request duration buckets, seconds: 0.5 ms to 10 s.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Methods with their own label value; anything else is `OTHER`.
const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];
const OTHER_METHOD: usize = METHODS.len();
const METHOD_LABELS: [&str; METHODS.len() + 1] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
];
/// Status codes 100..=599 get a cached counter each.
const CODE_MIN: u16 = 100;
const CODES: usize = 500;

/// Why an upstream exchange failed, the `kind` label of `canarygate_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Reset,
    Protocol,
}

impl UpstreamErrorKind {
    pub const ALL: [Self; 4] = [Self::Connect, Self::Timeout, Self::Reset, Self::Protocol];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Protocol => "protocol",
        }
    }
}

/// Why `accept` failed, the `kind` label of `canarygate_accept_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptErrorKind {
    /// EMFILE: the process is at its open-file limit (`ulimit -n`).
    Emfile,
    /// ENFILE: the whole system is at its open-file limit.
    Enfile,
    /// ENOBUFS or ENOMEM: the kernel could not allocate the socket.
    Nomem,
    Other,
}

impl AcceptErrorKind {
    pub const ALL: [Self; 4] = [Self::Emfile, Self::Enfile, Self::Nomem, Self::Other];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Emfile => "emfile",
            Self::Enfile => "enfile",
            Self::Nomem => "nomem",
            Self::Other => "other",
        }
    }

    pub fn of(error: &std::io::Error) -> Self {
        // Linux errno values (asm-generic/errno-base.h, errno.h).
        match error.raw_os_error() {
            Some(24) => Self::Emfile,
            Some(23) => Self::Enfile,
            Some(12 | 105) => Self::Nomem,
            _ => Self::Other,
        }
    }
}

/// When a client gave up on a request it had sent: the `stage` label of
/// `canarygate_client_resets_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetStage {
    /// Before the response headers went out (the backend may still be working).
    BeforeResponse,
    /// While the response body was streaming.
    DuringResponse,
}

impl ResetStage {
    pub const ALL: [Self; 2] = [Self::BeforeResponse, Self::DuringResponse];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BeforeResponse => "before_response",
            Self::DuringResponse => "during_response",
        }
    }
}

/// The metric families and the per-pool handles.
pub struct Metrics {
    registry: Registry,
    /// Every registered family name, also those with no sample yet.
    names: Vec<String>,
    canary_percent: IntGauge,
    flags_version: IntGauge,
    flag_store_up: IntGauge,
    flag_enabled: IntGaugeVec,
    flag_rejected: IntCounterVec,
    pub client_connections: IntGauge,
    /// `canarygate_fleet_instances`, `canarygate_fleet_flags_in_sync`.
    pub fleet_instances: IntGauge,
    pub fleet_flags_in_sync: IntGauge,
    /// `canarygate_fleet_heartbeat_errors_total`.
    pub fleet_heartbeat_errors: IntCounter,
    pub parked_connections: IntGauge,
    /// Open plain-HTTP client connections per worker thread (`--workers`).
    pub worker_connections: IntGaugeVec,
    /// Client connections a worker handed to a less loaded one.
    pub connections_handed_off: IntCounter,
    /// Access log lines dropped because the writer was 4 MiB behind (or the file unwritable).
    pub log_dropped: IntCounter,
    /// Failed accepts on the proxy listeners, by `kind`.
    pub accept_errors: IntCounterVec,
    /// Alerts by channel and result (sent, failed, dropped, suppressed).
    pub alerts: IntCounterVec,
    /// `canarygate_sms_commands_total{command,result}`.
    pub sms_commands: IntCounterVec,
    /// `canarygate_sms_refusals_withheld_total{what}`: notices and replies not sent
    /// for messages from numbers not allowed (throttled).
    pub sms_refusals_withheld: IntCounterVec,
    /// `canarygate_canary_commands_total{command,source}`: operators' changes to
    /// the rollout over the fleet, as counted in Redis (`ops::control`).
    pub canary_commands: IntCounterVec,
    host_cpu: Gauge,
    host_memory: Gauge,
    host_disk: GaugeVec,
    backend_up: IntGaugeVec,
    pub failover_requests: IntCounter,
    config_reloads: IntCounterVec,
    /// The canary analysis' gauges and counters.
    pub analysis: super::analysis_metrics::AnalysisMetrics,
    /// The shadow stage's counters (`canarygate_shadow_*`).
    pub shadow: super::shadow_metrics::ShadowMetrics,
    /// The backends' connection limits (`canarygate_upstream_pending_rejected_total`..).
    pub conns: crate::observe::conn_metrics::ConnMetrics,
    /// `canarygate_trace_spans_*` (zero while `[tracing]` is off).
    pub trace: crate::observe::trace_export::TraceMetrics,
    /// The canary analysis' request records (per worker, off unless enabled): kept
    /// here so the request path reaches them through the handle it already holds.
    pub recorder: crate::canary::window::Recorder,
    production: PoolMetrics,
    canary: PoolMetrics,
}

/// Handles for one pool, resolved once.
pub struct PoolMetrics {
    pool: &'static str,
    requests: IntCounterVec,
    request_counters: Box<[OnceLock<IntCounter>]>,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    upstream_errors: [IntCounter; 4],
    client_resets: [IntCounter; 2],
    pub ejections: IntCounter,
    pub retries: IntCounter,
    /// Open upgraded tunnels (WebSockets).
    pub upgraded: IntGauge,
    /// 5xx responses, for the status page's error ratio (the exported view is the
    /// `code` label of `canarygate_requests_total`).
    errors_5xx: AtomicU64,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let mut names = Vec::new();
        let mut reg = |c: Box<dyn prometheus::core::Collector>| {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            must(registry.register(c));
        };

        let requests = must(IntCounterVec::new(
            Opts::new(
                "canarygate_requests_total",
                "Requests answered, by pool, method and status code.",
            ),
            &["pool", "method", "code"],
        ));
        let duration = must(HistogramVec::new(
            HistogramOpts::new(
                "canarygate_request_duration_seconds",
                "Time from request received to response headers sent, by pool.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["pool"],
        ));
        let upstream_errors = must(IntCounterVec::new(
            Opts::new(
                "canarygate_upstream_errors_total",
                "Failed exchanges with backends, by pool and kind.",
            ),
            &["pool", "kind"],
        ));
        let client_resets = must(IntCounterVec::new(
            Opts::new(
                "canarygate_client_resets_total",
                "Requests the client reset or abandoned after they were forwarded (HTTP/2 \
                 RST_STREAM, an HTTP/1.1 disconnect), by pool and stage: before_response \
                 or during_response.",
            ),
            &["pool", "stage"],
        ));
        let in_flight = must(IntGaugeVec::new(
            Opts::new(
                "canarygate_in_flight_requests",
                "Requests being proxied now, by pool.",
            ),
            &["pool"],
        ));
        let fleet_instances = must(IntGauge::new(
            "canarygate_fleet_instances",
            "Instances whose heartbeat this one read in the last fleet.seen_ms (itself \
             included; without Redis, 1).",
        ));
        let fleet_heartbeat_errors = must(IntCounter::new(
            "canarygate_fleet_heartbeat_errors_total",
            "Heartbeat rounds that could not reach Redis (the fleet view then shows the \
             last one read).",
        ));
        let fleet_flags_in_sync = must(IntGauge::new(
            "canarygate_fleet_flags_in_sync",
            "1 when every instance seen applies the same flags (same digest), else 0.",
        ));
        let client_connections = must(IntGauge::new(
            "canarygate_client_connections",
            "Open client connections on the proxy listener.",
        ));
        let parked_connections = must(IntGauge::new(
            "canarygate_parked_connections",
            "Idle keep-alive client connections parked (holding no HTTP buffers).",
        ));
        let worker_connections = must(IntGaugeVec::new(
            Opts::new(
                "canarygate_worker_connections",
                "Open client connections (plain and TLS) per worker thread.",
            ),
            &["worker"],
        ));
        let log_dropped = must(IntCounter::new(
            "canarygate_log_dropped_total",
            "Access log lines dropped: the writer was 4 MiB behind, or the file could not be \
             opened or written.",
        ));
        let connections_handed_off = must(IntCounter::new(
            "canarygate_connections_handed_off_total",
            "Client connections accepted by a worker and handed to a less loaded one.",
        ));
        let accept_errors = must(IntCounterVec::new(
            Opts::new(
                "canarygate_accept_errors_total",
                "Failed accepts on the proxy listeners, by kind: emfile (process fd \
                 limit), enfile (system fd limit), nomem, other.",
            ),
            &["kind"],
        ));
        let alerts = must(IntCounterVec::new(
            Opts::new(
                "canarygate_alerts_total",
                "Alerts by channel and result: sent, failed (after retries), dropped (queue \
                 full), suppressed (SMS cap).",
            ),
            &["channel", "result"],
        ));
        let sms_commands = must(IntCounterVec::new(
            Opts::new(
                "canarygate_sms_commands_total",
                "SMS commands (POST /twilio/sms) by command (ack, rollback, canary_percent, \
                 canary_on, canary_off, status, help; none: no command read) and result (ok, \
                 invalid, failed, refused, replayed, bad_signature, malformed).",
            ),
            &["command", "result"],
        ));
        let sms_refusals_withheld = must(IntCounterVec::new(
            Opts::new(
                "canarygate_sms_refusals_withheld_total",
                "Messages from numbers not allowed to command whose notice to the team \
                 (what=notice: one per sender per alerts.repeat_ms) or reply to the sender \
                 (what=reply: that, and at most 10 per hour over all senders) was not sent.",
            ),
            &["what"],
        ));
        let canary_commands = must(IntCounterVec::new(
            Opts::new(
                "canarygate_canary_commands_total",
                "Operators' changes to the rollout over the fleet (the count kept in Redis \
                 next to the analysis record, read on each fleet round): command (set, \
                 switch_on, switch_off, pause, resume, rollback, promote) and source (sms, \
                 cli). Every proxy shows the fleet's figure: take max, not sum.",
            ),
            &["command", "source"],
        ));
        let host_cpu = must(Gauge::new(
            "canarygate_host_cpu_ratio",
            "Host CPU busy, 0..1 over all cores, from the resource watch.",
        ));
        let host_memory = must(Gauge::new(
            "canarygate_host_memory_ratio",
            "Host memory in use (total minus available), 0..1, from the resource watch.",
        ));
        let host_disk = must(GaugeVec::new(
            Opts::new(
                "canarygate_host_disk_used_ratio",
                "Used share of the filesystem holding each configured path, as df counts it \
                 (used / (used + available)), 0..1.",
            ),
            &["path"],
        ));
        let canary_percent = must(IntGauge::new(
            "canarygate_canary_percent",
            "Effective canary share in percent, after flags and the kill switch.",
        ));
        let flags_version = must(IntGauge::new(
            "canarygate_flags_version",
            "Version of the flag snapshot in force.",
        ));
        let flag_store_up = must(IntGauge::new(
            "canarygate_flag_store_up",
            "1 if the flag store (Redis) answered on its last attempt, else 0.",
        ));
        let flag_enabled = must(IntGaugeVec::new(
            Opts::new(
                "canarygate_flag_enabled",
                "1 if a boolean flag is on, 0 if off.",
            ),
            &["flag"],
        ));
        let flag_rejected = must(IntCounterVec::new(
            Opts::new(
                "canarygate_flag_rejected_total",
                "Invalid flag values ignored, by field.",
            ),
            &["field"],
        ));
        let build_info = must(IntGaugeVec::new(
            Opts::new(
                "canarygate_build_info",
                "Always 1; the version label names the build.",
            ),
            &["version"],
        ));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let backend_up = must(IntGaugeVec::new(
            Opts::new(
                "canarygate_backend_up",
                "1 if a backend is usable (active check up and not ejected), else 0.",
            ),
            &["pool", "backend"],
        ));
        let ejections = must(IntCounterVec::new(
            Opts::new(
                "canarygate_backend_ejections_total",
                "Backends ejected by passive outlier detection, by pool.",
            ),
            &["pool"],
        ));
        let retries = must(IntCounterVec::new(
            Opts::new(
                "canarygate_retries_total",
                "Requests retried on another backend of the same pool, by pool.",
            ),
            &["pool"],
        ));
        let upgraded = must(IntGaugeVec::new(
            Opts::new(
                "canarygate_upgraded_connections",
                "Open upgraded tunnels (WebSockets), by pool.",
            ),
            &["pool"],
        ));
        let failover_requests = must(IntCounter::new(
            "canarygate_failover_requests_total",
            "Canary requests served by production because no canary backend was usable.",
        ));
        let config_reloads = must(IntCounterVec::new(
            Opts::new(
                "canarygate_config_reloads_total",
                "Config reloads (SIGHUP), by result: success or failure.",
            ),
            &["result"],
        ));
        let analysis = super::analysis_metrics::AnalysisMetrics::new();
        let shadow = super::shadow_metrics::ShadowMetrics::new();

        let conns = crate::observe::conn_metrics::ConnMetrics::new(&mut reg);
        let trace = crate::observe::trace_export::TraceMetrics::new(&mut reg);
        reg(Box::new(requests.clone()));
        reg(Box::new(duration.clone()));
        reg(Box::new(upstream_errors.clone()));
        reg(Box::new(client_resets.clone()));
        reg(Box::new(in_flight.clone()));
        reg(Box::new(client_connections.clone()));
        reg(Box::new(fleet_instances.clone()));
        reg(Box::new(fleet_flags_in_sync.clone()));
        reg(Box::new(fleet_heartbeat_errors.clone()));
        reg(Box::new(parked_connections.clone()));
        reg(Box::new(worker_connections.clone()));
        reg(Box::new(connections_handed_off.clone()));
        reg(Box::new(log_dropped.clone()));
        reg(Box::new(accept_errors.clone()));
        reg(Box::new(alerts.clone()));
        reg(Box::new(sms_commands.clone()));
        reg(Box::new(sms_refusals_withheld.clone()));
        reg(Box::new(canary_commands.clone()));
        reg(Box::new(host_cpu.clone()));
        reg(Box::new(host_memory.clone()));
        reg(Box::new(host_disk.clone()));
        reg(Box::new(canary_percent.clone()));
        reg(Box::new(flags_version.clone()));
        reg(Box::new(flag_store_up.clone()));
        reg(Box::new(flag_enabled.clone()));
        reg(Box::new(flag_rejected.clone()));
        reg(Box::new(build_info));
        reg(Box::new(backend_up.clone()));
        reg(Box::new(ejections.clone()));
        reg(Box::new(retries.clone()));
        reg(Box::new(upgraded.clone()));
        reg(Box::new(failover_requests.clone()));
        reg(Box::new(config_reloads.clone()));
        for collector in analysis.collectors().into_iter().chain(shadow.collectors()) {
            reg(collector);
        }
        #[cfg(target_os = "linux")]
        reg(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));

        let pool = |kind: PoolKind| {
            let pool = kind.as_str();
            PoolMetrics {
                pool,
                requests: requests.clone(),
                request_counters: (0..(METHOD_LABELS.len() * CODES))
                    .map(|_| OnceLock::new())
                    .collect(),
                duration: duration.with_label_values(&[pool]),
                in_flight: in_flight.with_label_values(&[pool]),
                upstream_errors: UpstreamErrorKind::ALL
                    .map(|k| upstream_errors.with_label_values(&[pool, k.as_str()])),
                client_resets: ResetStage::ALL
                    .map(|s| client_resets.with_label_values(&[pool, s.as_str()])),
                ejections: ejections.with_label_values(&[pool]),
                retries: retries.with_label_values(&[pool]),
                upgraded: upgraded.with_label_values(&[pool]),
                errors_5xx: AtomicU64::new(0),
            }
        };
        for kind in AcceptErrorKind::ALL {
            accept_errors.with_label_values(&[kind.as_str()]);
        }
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        Self {
            production: pool(PoolKind::Production),
            canary: pool(PoolKind::Canary),
            registry,
            names,
            canary_percent,
            flags_version,
            flag_store_up,
            flag_enabled,
            flag_rejected,
            client_connections,
            fleet_instances,
            fleet_flags_in_sync,
            fleet_heartbeat_errors,
            parked_connections,
            worker_connections,
            connections_handed_off,
            log_dropped,
            accept_errors,
            alerts,
            sms_commands,
            sms_refusals_withheld,
            canary_commands,
            host_cpu,
            host_memory,
            host_disk,
            backend_up,
            failover_requests,
            config_reloads,
            analysis,
            shadow,
            conns,
            trace,
            recorder: crate::canary::window::Recorder::new(crate::worker::workers()),
        }
    }

    /// Sets `canarygate_backend_up` for every configured backend (removed backends
    /// leave the scrape).
    pub fn observe_backends<'a>(
        &self,
        backends: impl IntoIterator<Item = (PoolKind, &'a str, bool)>,
    ) {
        self.backend_up.reset();
        for (kind, backend, up) in backends {
            self.backend_up
                .with_label_values(&[kind.as_str(), backend])
                .set(i64::from(up));
        }
    }

    /// Marks one backend down at once (an ejection), before the next health tick.
    pub fn backend_down(&self, kind: PoolKind, backend: &str) {
        self.backend_up
            .with_label_values(&[kind.as_str(), backend])
            .set(0);
    }

    /// Publishes a resource-watch sample; paths no longer sampled leave the scrape.
    pub fn observe_host(
        &self,
        cpu_ratio: f64,
        memory_ratio: f64,
        disks: impl IntoIterator<Item = (String, f64)>,
    ) {
        self.host_cpu.set(cpu_ratio);
        self.host_memory.set(memory_ratio);
        self.host_disk.reset();
        for (path, ratio) in disks {
            self.host_disk
                .with_label_values(&[path.as_str()])
                .set(ratio);
        }
    }

    /// The last host sample: CPU and memory ratios.
    pub fn host(&self) -> (f64, f64) {
        (self.host_cpu.get(), self.host_memory.get())
    }

    /// The last host sample's disks: path and used ratio.
    pub fn host_disks(&self) -> Vec<(String, f64)> {
        self.host_disk
            .collect()
            .iter()
            .flat_map(prometheus::proto::MetricFamily::get_metric)
            .filter_map(|m| {
                let path = m.get_label().iter().find(|l| l.name() == "path")?;
                Some((path.value().to_owned(), m.get_gauge().get_value()))
            })
            .collect()
    }

    pub fn count_reload(&self, success: bool) {
        self.config_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    pub fn pool(&self, kind: PoolKind) -> &PoolMetrics {
        match kind {
            PoolKind::Production => &self.production,
            PoolKind::Canary => &self.canary,
        }
    }

    /// Reflects a newly published snapshot: the effective canary percent, the flags'
    /// version and the boolean flags by name. Plain values, so the metrics know
    /// nothing of the flag model.
    pub fn observe_flags<'a>(
        &self,
        canary_percent: u8,
        version: u64,
        switches: impl IntoIterator<Item = (&'a str, bool)>,
    ) {
        self.canary_percent.set(i64::from(canary_percent));
        self.flags_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        // Flags that were removed must disappear from the scrape, so rebuild the set.
        self.flag_enabled.reset();
        for (name, on) in switches {
            self.flag_enabled
                .with_label_values(&[name])
                .set(i64::from(on));
        }
    }

    pub fn set_flag_store_up(&self, up: bool) {
        self.flag_store_up.set(i64::from(up));
    }

    pub fn count_flag_rejected(&self, field: &str) {
        self.flag_rejected.with_label_values(&[field]).inc();
    }

    /// Ignored invalid flag values so far, by field.
    pub fn flag_rejected_counts(&self) -> Vec<(String, u64)> {
        self.flag_rejected
            .collect()
            .iter()
            .flat_map(prometheus::proto::MetricFamily::get_metric)
            .filter_map(|m| {
                let field = m.get_label().first()?.value().to_owned();
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                Some((field, m.get_counter().get_value() as u64))
            })
            .collect()
    }

    /// Names of every metric family this registry can export.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The text exposition format, for `GET /metrics`.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PoolMetrics {
    /// Records one answered request.
    pub fn record(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        let code = status.as_u16();
        if code >= 500 {
            self.errors_5xx.fetch_add(1, Ordering::Relaxed);
        }
        let m = METHODS
            .iter()
            .position(|known| known == method)
            .unwrap_or(OTHER_METHOD);
        match code.checked_sub(CODE_MIN).map(usize::from) {
            Some(c) if c < CODES => self.request_counters[m * CODES + c]
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[self.pool, METHOD_LABELS[m], status.as_str()])
                })
                .inc(),
            // Codes 600..=999 are legal but rare: the slow path is fine for them.
            _ => self
                .requests
                .with_label_values(&[self.pool, METHOD_LABELS[m], status.as_str()])
                .inc(),
        }
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        let i = UpstreamErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.upstream_errors[i].inc();
    }

    pub fn client_reset(&self, stage: ResetStage) {
        let i = ResetStage::ALL
            .iter()
            .position(|s| *s == stage)
            .unwrap_or(0);
        self.client_resets[i].inc();
    }

    pub fn errors_5xx(&self) -> u64 {
        self.errors_5xx.load(Ordering::Relaxed)
    }

    /// Marks a request in flight until the guard drops (also when the client goes away
    /// and the request future is dropped).
    pub fn in_flight_guard(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }
}

/// Counts one in a gauge while it lives (owned, for spawned tasks).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Decrements the in-flight gauge on drop.
pub struct InFlight<'a>(&'a IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn records_per_pool_method_and_code() {
        let m = Metrics::new();
        let p = m.pool(PoolKind::Canary);
        for _ in 0..3 {
            p.record(&Method::GET, StatusCode::OK, Duration::from_millis(2));
        }
        p.record(
            &Method::from_bytes(b"PURGE").unwrap(),
            StatusCode::BAD_GATEWAY,
            Duration::from_millis(1),
        );
        m.pool(PoolKind::Production).record(
            &Method::POST,
            StatusCode::from_u16(799).unwrap(),
            Duration::ZERO,
        );
        let text = scrape(&m);
        assert!(
            text.contains(r#"canarygate_requests_total{code="200",method="GET",pool="canary"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"canarygate_requests_total{code="502",method="OTHER",pool="canary"} 1"#
            )
        );
        assert!(text.contains(
            r#"canarygate_requests_total{code="799",method="POST",pool="production"} 1"#
        ));
        assert!(text.contains(r#"canarygate_request_duration_seconds_count{pool="canary"} 4"#));
        assert!(text.contains(
            r#"canarygate_request_duration_seconds_bucket{pool="canary",le="0.0025"} 4"#
        ));
        assert!(
            text.contains(
                r#"canarygate_request_duration_seconds_bucket{pool="canary",le="0.001"} 1"#
            )
        );
        assert_eq!(p.errors_5xx(), 1);
        assert!(text.contains(&format!(
            "canarygate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn in_flight_guard_counts_up_and_down() {
        let m = Metrics::new();
        let p = m.pool(PoolKind::Production);
        let a = p.in_flight_guard();
        let b = p.in_flight_guard();
        assert_eq!(p.in_flight.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(p.in_flight.get(), 0);
    }

    #[test]
    fn flag_gauges_follow_the_snapshot() {
        let m = Metrics::new();
        m.observe_flags(0, 7, [("a", true), ("b", false)]);
        let text = scrape(&m);
        assert!(text.contains("canarygate_flag_enabled{flag=\"a\"} 1"));
        assert!(text.contains("canarygate_flag_enabled{flag=\"b\"} 0"));
        assert!(text.contains("canarygate_canary_percent 0"));
        assert!(text.contains("canarygate_flags_version 7"));
        m.observe_flags(33, 8, [("b", true)]);
        let text = scrape(&m);
        assert!(
            !text.contains("flag=\"a\""),
            "removed flags leave the scrape"
        );
        assert!(text.contains("canarygate_canary_percent 33"));
    }
}
