//! The admin listener: operational endpoints, on their own address so they are never
//! exposed on the public port (`[server] admin_listen`, loopback by default).
//!
//! `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators, `/flags`,
//! `/events` and `/shadow` as JSON for scripts, and `/`: a status page a person reads at a glance.
//! The page is rendered on the server and refreshes itself with a meta tag: no
//! JavaScript, CSS or fonts from anywhere else, so it works on an isolated host.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::observe::analysis_page::{self, unix};
use crate::observe::html::escape_html;
use crate::observe::stats::{self, PoolWindow, Sample};
use crate::routing::PoolKind;
use crate::state::AppState;

/// Events shown on the status page and returned by `/events`.
const RECENT_EVENTS: usize = 50;
/// The status page reloads itself this often.
const REFRESH_S: u32 = 5;

/// Answers one admin request.
pub fn respond<B>(state: &AppState, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(
        path,
        "/" | "/metrics"
            | "/healthz"
            | "/readyz"
            | "/flags"
            | "/events"
            | "/analysis"
            | "/fleet"
            | "/shadow"
            | "/favicon.ico"
    );
    if !known {
        return text(StatusCode::NOT_FOUND, "404 not found\n");
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n");
    }
    match path {
        "/metrics" => {
            state
                .metrics
                .conns
                .observe(state.snapshot().pools.conn_states());
            respond_with(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(state.metrics.render()),
            )
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match readiness(state) {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
        "/flags" => json_response(&flags_json(state)),
        "/events" => json_response(&json!({ "events": state.events.recent(RECENT_EVENTS) })),
        "/analysis" => {
            let mut analysis = analysis_page::json(&state.analysis.view());
            analysis["instance"] = json!(state.instance());
            json_response(&analysis)
        }
        "/fleet" => json_response(&fleet_json(state)),
        "/shadow" => json_response(&state.shadow.json(&state.snapshot().config)),
        "/favicon.ico" => respond_with(StatusCode::NO_CONTENT, "image/x-icon", Bytes::new()),
        _ => respond_with(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from(status_page(state)),
        ),
    }
}

/// Ready while not draining and at least one production backend is usable.
fn readiness(state: &AppState) -> Result<(), &'static str> {
    if state.is_draining() {
        return Err("draining\n");
    }
    if !state
        .snapshot()
        .pools
        .production
        .has_usable(crate::clock::now_ms())
    {
        return Err("no usable production backend\n");
    }
    Ok(())
}

/// The flag snapshot as operators and scripts read it.
pub fn flags_json(state: &AppState) -> serde_json::Value {
    let snapshot = state.snapshot();
    let flags = &snapshot.flags;
    let values: serde_json::Map<String, serde_json::Value> = flags
        .set
        .values
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.as_str())))
        .collect();
    let rejected: serde_json::Map<String, serde_json::Value> = state
        .metrics
        .flag_rejected_counts()
        .into_iter()
        .map(|(field, n)| (field, json!(n)))
        .collect();
    json!({
        "instance": state.instance(),
        "version": flags.version,
        "digest": flags.digest(),
        "source": flags.source.as_str(),
        "updated_at": humantime::format_rfc3339_millis(flags.updated_at).to_string(),
        "store_connected": state.flag_store_up(),
        "flags": values,
        "reserved": {
            "canary_percent": flags.set.canary_percent,
            "canary": if flags.set.canary_enabled { "on" } else { "off" },
            "canary_auto": if flags.set.canary_auto { "on" } else { "off" },
        },
        "effective_canary_percent": flags.effective_percent(snapshot.config.routing.canary_percent),
        "header": flags.header_value.to_str().unwrap_or(""),
        "rejected_total": rejected,
    })
}

/// Both pools (production, canary) over the last minute or what there is of it:
/// the sample now, the window's length in seconds, and the windows.
pub fn last_minute(state: &AppState) -> (Sample, f64, [PoolWindow; 2]) {
    let now = Sample::read(&state.metrics);
    let minute_ago = state.stats.at_least(Duration::from_secs(60), now.at);
    let window_secs = minute_ago
        .as_ref()
        .map_or(0.0, |s| now.at.duration_since(s.at).as_secs_f64());
    let windows = [PoolKind::Production, PoolKind::Canary].map(|kind| {
        let older = minute_ago
            .as_ref()
            .map(|s| s.pool(kind).clone())
            .unwrap_or_default();
        stats::window(&older, now.pool(kind), window_secs)
    });
    (now, window_secs, windows)
}

/// The fleet as this instance last read it.
pub fn fleet_json(state: &AppState) -> serde_json::Value {
    let view = state.fleet.view();
    let seen_ms = state.snapshot().config.fleet.seen_ms;
    // Heartbeats carry the fleet's time (Redis TIME), not this host's.
    let now = crate::clock::fleet_ms();
    let instances: Vec<serde_json::Value> = view
        .members
        .iter()
        .map(|m| {
            let mut member = serde_json::to_value(m).unwrap_or_default();
            member["age_ms"] = json!(now.saturating_sub(m.at_ms));
            member["this"] = json!(m.id == view.instance);
            member
        })
        .collect();
    json!({
        "instance": view.instance,
        "shared": view.shared,
        "store_connected": view.connected,
        "as_of": humantime::format_rfc3339_millis(unix(view.read_at_ms)).to_string(),
        "seen_ms": seen_ms,
        "count": view.members.len(),
        "flags_in_sync": view.in_sync(),
        "instances": instances,
    })
}

#[allow(clippy::cast_precision_loss)]
fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn fleet_section(state: &AppState) -> String {
    let view = state.fleet.view();
    let now = crate::clock::fleet_ms();
    let mut html = String::new();
    let _ = write!(
        html,
        "<section><h2>Fleet</h2><p class=\"muted\">{} instance{} &middot; flags {} &middot; {}</p>\
         <table><tr><th>instance</th><th>version</th><th>flags</th><th>canary</th><th>analysis</th><th>heartbeat</th></tr>",
        view.members.len(),
        if view.members.len() == 1 { "" } else { "s" },
        if view.in_sync() {
            "in sync"
        } else {
            "<span class=\"bad\">NOT in sync</span>"
        },
        match (view.shared, view.connected) {
            (false, _) => "no Redis: this instance alone".to_owned(),
            (true, true) => "from Redis".to_owned(),
            (true, false) => format!(
                "<span class=\"bad\">Redis unreachable: as of {} s ago</span>",
                now.saturating_sub(view.read_at_ms) / 1000
            ),
        },
    );
    for m in &view.members {
        let _ = write!(
            html,
            "<tr><td>{}{}</td><td>{}</td><td>v{} {}</td><td>{}%</td><td>{}</td><td>{:.1} s ago</td></tr>",
            escape_html(&m.id),
            if m.id == view.instance { " (this)" } else { "" },
            escape_html(&m.version),
            m.flags_version,
            escape_html(&m.flags_digest),
            m.effective_canary_percent,
            escape_html(&m.analysis_state),
            seconds(now.saturating_sub(m.at_ms)),
        );
    }
    html.push_str("</table></section>");
    html
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond_with(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn json_response(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    respond_with(StatusCode::OK, "application/json", Bytes::from(body))
}

/// A response with `Cache-Control: no-store` (the admin listener's, and the SMS
/// webhook's).
pub fn respond_with(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

// ---------------------------------------------------------------------------------
// The status page

const POOL_COLORS: [(PoolKind, &str); 2] = [
    (PoolKind::Production, "#2563eb"),
    (PoolKind::Canary, "#d97706"),
];

fn status_page(state: &AppState) -> String {
    let snapshot = state.snapshot();
    let config = &snapshot.config;
    let flags = &snapshot.flags;
    let (now, window_secs, windows) = last_minute(state);
    let total: u64 = windows.iter().map(|w| w.requests).sum();
    #[allow(clippy::cast_precision_loss)]
    let observed = if total > 0 {
        format!("{:.1}%", windows[1].requests as f64 * 100.0 / total as f64)
    } else {
        "no traffic yet".to_owned()
    };

    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\"><title>canarygate status</title><style>{CSS}</style></head><body>\
         <header><h1>canarygate</h1><span class=\"{ready_class}\">{ready}</span>\
         <span class=\"muted\">v{version} &middot; refreshes every {REFRESH_S}s</span></header>",
        ready_class = if readiness(state).is_ok() {
            "ok"
        } else {
            "bad"
        },
        ready = match readiness(state) {
            Ok(()) => "ready",
            Err(reason) => reason.trim_end(),
        },
        version = env!("CARGO_PKG_VERSION"),
    );

    let _ = write!(
        html,
        "<section class=\"cards\">\
         <div class=\"card\"><div class=\"label\">configured canary</div><div class=\"big\">{}%</div></div>\
         <div class=\"card\"><div class=\"label\">effective canary (flags)</div><div class=\"big\">{}%</div>{}</div>\
         <div class=\"card\"><div class=\"label\">observed canary share, last {:.0}s</div><div class=\"big\" id=\"observed\">{}</div></div>\
         <div class=\"card\"><div class=\"label\">client connections</div><div class=\"big\">{}</div></div>\
         </section>",
        config.routing.canary_percent,
        flags.effective_percent(config.routing.canary_percent),
        if flags.set.canary_enabled {
            ""
        } else {
            "<div class=\"bad\">kill switch: canary off</div>"
        },
        window_secs,
        observed,
        state.metrics.client_connections.get(),
    );

    html.push_str("<section><h2>Pools, last minute</h2><table><tr><th>pool</th><th>backends</th><th>req/s</th><th>5xx</th><th>p50</th><th>p99</th><th>in flight</th></tr>");
    for ((kind, color), w) in POOL_COLORS.iter().zip(&windows) {
        let backends: Vec<&str> = snapshot
            .pools
            .get(*kind)
            .backends()
            .iter()
            .map(|b| b.authority.as_str())
            .collect();
        let _ = write!(
            html,
            "<tr><td><span class=\"dot\" style=\"background:{color}\"></span>{}</td><td>{}</td>\
             <td>{:.1}</td><td>{:.2}%</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            kind.as_str(),
            if backends.is_empty() {
                "(none)".to_owned()
            } else {
                escape_html(&backends.join(", "))
            },
            w.rate_per_s,
            w.error_ratio * 100.0,
            ms(w.p50_s),
            ms(w.p99_s),
            state.metrics.pool(*kind).in_flight.get(),
        );
    }
    html.push_str("</table>");
    let mut history = state.stats.all();
    let now_at = now.at;
    history.push(now);
    html.push_str(&rate_chart(&history, now_at));
    html.push_str("<p class=\"muted\"><span class=\"dot\" style=\"background:#2563eb\"></span>production <span class=\"dot\" style=\"background:#d97706\"></span>canary &middot; requests per second, sampled every 5 s</p>");
    html.push_str("</section>");
    html.push_str(&analysis_page::section(
        &state.analysis.view(),
        crate::clock::unix_ms(),
    ));
    html.push_str(&crate::observe::shadow_page::section(
        &state.shadow.json(&state.snapshot().config),
    ));
    html.push_str(&fleet_section(state));
    let _ = write!(
        html,
        "<section><h2>Flags</h2><p class=\"muted\">version {} from {} &middot; store {} &middot; updated {}</p><table><tr><th>flag</th><th>value</th></tr>",
        flags.version,
        flags.source.as_str(),
        if state.flag_store_up() {
            "connected"
        } else {
            "not connected"
        },
        humantime::format_rfc3339_seconds(flags.updated_at),
    );
    for (name, value) in &flags.set.values {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape_html(name),
            escape_html(value.as_str())
        );
    }
    if flags.set.values.is_empty() {
        html.push_str("<tr><td colspan=\"2\" class=\"muted\">(no flags)</td></tr>");
    }
    let (cpu, memory) = state.metrics.host();
    let _ = write!(
        html,
        "</table></section><section><h2>Host</h2><p>CPU {:.0}% &middot; memory {:.0}%",
        cpu * 100.0,
        memory * 100.0
    );
    for (path, ratio) in state.metrics.host_disks() {
        let _ = write!(
            html,
            " &middot; disk {} {:.0}%",
            escape_html(&path),
            ratio * 100.0
        );
    }
    html.push_str("</p><h3>Alerts firing</h3><ul>");
    let firing = state.events.firing();
    for line in &firing {
        let _ = write!(html, "<li class=\"warn\">{}</li>", escape_html(line));
    }
    if firing.is_empty() {
        html.push_str("<li class=\"muted\">(none)</li>");
    }
    html.push_str("</ul></section><section><h2>Recent events</h2><table><tr><th>time</th><th>source</th><th>event</th></tr>");
    let events = state.events.recent(RECENT_EVENTS);
    for e in &events {
        let _ = write!(
            html,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.level.as_str(),
            humantime::format_rfc3339_seconds(e.at),
            e.source.as_str(),
            escape_html(&e.message)
        );
    }
    if events.is_empty() {
        html.push_str("<tr><td colspan=\"3\" class=\"muted\">(none yet)</td></tr>");
    }
    html.push_str("</table></section><footer class=\"muted\">JSON: <a href=\"/flags\">/flags</a> <a href=\"/events\">/events</a> <a href=\"/analysis\">/analysis</a> &middot; Prometheus: <a href=\"/metrics\">/metrics</a></footer></body></html>\n");
    html
}

fn ms(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "&ndash;".to_owned(), |s| format!("{:.1} ms", s * 1000.0))
}

/// Requests per second per pool over the sample history, as an inline SVG.
fn rate_chart(samples: &[Sample], now: Instant) -> String {
    const W: f64 = 720.0;
    const H: f64 = 160.0;
    let span = stats::HISTORY.as_secs_f64();
    let series: Vec<Vec<(f64, f64)>> = POOL_COLORS
        .iter()
        .map(|(kind, _)| {
            samples
                .windows(2)
                .map(|pair| {
                    let secs = pair[1].at.duration_since(pair[0].at).as_secs_f64();
                    let w: PoolWindow =
                        stats::window(pair[0].pool(*kind), pair[1].pool(*kind), secs);
                    (now.duration_since(pair[1].at).as_secs_f64(), w.rate_per_s)
                })
                .collect()
        })
        .collect();
    let peak = series
        .iter()
        .flatten()
        .map(|(_, r)| *r)
        .fold(1.0_f64, f64::max);
    let mut svg = format!(
        "<svg id=\"chart\" viewBox=\"0 0 {W} {H}\" style=\"width:100%;height:auto\" role=\"img\" aria-label=\"requests per second per pool, last 15 minutes\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#f8fafc\"/>\
         <text x=\"6\" y=\"14\" class=\"axis\">{peak:.0} req/s</text><text x=\"6\" y=\"{}\" class=\"axis\">-15 min</text>\
         <text x=\"{}\" y=\"{}\" class=\"axis\">now</text>",
        H - 6.0,
        W - 30.0,
        H - 6.0
    );
    for ((_, color), points) in POOL_COLORS.iter().zip(&series) {
        if points.is_empty() {
            continue;
        }
        let coords: Vec<String> = points
            .iter()
            .map(|(ago, rate)| {
                let x = W * (1.0 - (ago / span).min(1.0));
                let y = H - 20.0 - (H - 40.0) * (rate / peak);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            coords.join(" ")
        );
        // The latest point, visible even before there is a line.
        if let Some((x, y)) = coords.last().and_then(|c| c.split_once(',')) {
            let _ = write!(
                svg,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"4\" fill=\"{color}\"/>"
            );
        }
    }
    if samples.len() < 2 {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" class=\"axis\">collecting samples&hellip;</text>",
            W / 2.0 - 60.0,
            H / 2.0
        );
    }
    svg.push_str("</svg>");
    svg
}

const CSS: &str = "body{font-family:system-ui,-apple-system,sans-serif;margin:1.5rem auto;max-width:980px;color:#0f172a;padding:0 1rem}\
header{display:flex;gap:1rem;align-items:baseline}h1{margin:0}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}\
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}.muted{color:#64748b;font-size:.9rem}\
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:.75rem;margin-top:1rem}\
.card{border:1px solid #e2e8f0;border-radius:.5rem;padding:.75rem}.label{color:#64748b;font-size:.85rem}.big{font-size:1.8rem;font-weight:600}\
table{border-collapse:collapse;width:100%;font-size:.92rem}th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e2e8f0}\
tr.warn td{color:#b45309}.dot{display:inline-block;width:.7rem;height:.7rem;border-radius:50%;margin-right:.4rem}\
.axis{font-size:11px;fill:#64748b}footer{margin-top:2rem}span.warn{color:#b45309;font-weight:600}";
