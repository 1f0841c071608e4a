//! The canary analysis as the admin listener shows it: `/analysis` (JSON) and the
//! status page's section, whose chart puts both pools' error ratio and p99 over the
//! last 15 minutes beside every check (pass, fail, hold) and the rollback moment, so
//! a person sees at a glance why the canary was pulled.

use std::fmt::Write as _;

use serde_json::json;

use crate::canary::board::{Entry, HISTORY_MS, View};
use crate::canary::judge::{Figures, Outcome};
use crate::canary::verdict::State;
use crate::observe::html::escape_html;

/// The last checks returned by `/analysis` (all of the last 15 minutes are charted).
pub const JSON_CHECKS: usize = 30;

const PRODUCTION: &str = "#2563eb";
const CANARY: &str = "#d97706";

/// `/analysis`: state, the shared record and the last checks, newest first.
pub fn json(view: &View) -> serde_json::Value {
    let record = &view.record;
    let checks: Vec<serde_json::Value> = view
        .checks
        .iter()
        .rev()
        .take(JSON_CHECKS)
        .map(|e| {
            json!({
                "at": humantime::format_rfc3339_millis(unix(e.at_ms)).to_string(),
                "result": e.check.outcome,
                "decisive": e.check.decisive,
                "reason": e.check.reason,
                "production": e.check.production,
                "canary": e.check.canary,
                "error_z": e.check.error_z,
                "latency_z": e.check.latency_z,
                "z_critical": e.check.z_critical,
                "error_evidence": e.check.error_evidence,
                "error_factor": e.check.error_factor,
                "latency_evidence": e.check.latency_evidence,
                "latency_line_ms": e.check.latency_line_ms,
                "latency_factor": e.check.latency_factor,
                "slow": e.check.slow.map(|(canary, production)| json!({
                    "canary": canary,
                    "production": production,
                })),
                "evidence_threshold": e.check.evidence_threshold,
            })
        })
        .collect();
    json!({
        "enabled": view.enabled,
        "state": view.state.unwrap_or(State::Idle),
        "reason": record.reason,
        "record": {
            "state": record.state,
            "reason": record.reason,
            "at": record.at,
            "instance": record.instance,
            "percent": record.percent,
            "step": record.step,
        },
        "rolled_back_at": view.rolled_back_at_ms
            .map(|ms| humantime::format_rfc3339_millis(unix(ms)).to_string()),
        "checks": checks,
    })
}

/// Unix milliseconds as a time to format.
pub fn unix(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// The status page's section.
pub fn section(view: &View, now_ms: u64) -> String {
    let state = view.state.unwrap_or(State::Idle);
    let class = match state {
        State::RolledBack | State::ShadowFailed => "bad",
        State::Manual | State::Holding | State::Shadowing => "warn",
        State::Idle | State::Progressing | State::Healthy => "ok",
    };
    let mut html = format!(
        "<section id=\"analysis\"><h2>Canary analysis</h2><p>state <span class=\"{class}\" id=\"analysis-state\">{}</span>",
        state.as_str()
    );
    if !view.enabled {
        html.push_str(
            " <span class=\"muted\">(off: set <code>[analysis] enabled = true</code>)</span></p></section>",
        );
        return html;
    }
    if !view.record.reason.is_empty() {
        let _ = write!(html, " &middot; {}", escape_html(&view.record.reason));
    }
    if !view.record.instance.is_empty() {
        let _ = write!(
            html,
            " <span class=\"muted\">({} at {})</span>",
            escape_html(&view.record.instance),
            escape_html(&view.record.at)
        );
    }
    html.push_str("</p>");
    if let Some(last) = view.checks.last() {
        let check = &last.check;
        let _ = write!(
            html,
            "<p>last check: <strong class=\"{}\">{}</strong> &middot; {}</p>\
             <table><tr><th>pool</th><th>judged</th><th>errors</th><th>error ratio</th><th>p50</th><th>p99</th>\
             <th title=\"placed by the bucket past their client's cap\">capped</th>\
             <th title=\"placed by the override, failover or the kill switch\">not judged</th>\
             <th title=\"the most one client counts for in a slot\">client cap</th></tr>",
            outcome_class(check.outcome),
            check.outcome.as_str(),
            escape_html(&check.reason)
        );
        for (name, color, f) in [
            ("canary", CANARY, &check.canary),
            ("production", PRODUCTION, &check.production),
        ] {
            let _ = write!(
                html,
                "<tr><td><span class=\"dot\" style=\"background:{color}\"></span>{name}</td>\
                 <td>{}</td><td>{}</td><td>{:.2}%</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td></tr>",
                f.requests,
                f.errors,
                f.error_ratio * 100.0,
                ms(f.p50_ms),
                ms(f.p99_ms),
                f.capped,
                f.apart,
                f.client_cap
            );
        }
        html.push_str("</table>");
    }
    html.push_str(&chart(view, now_ms));
    html.push_str(
        "<p class=\"muted\"><span class=\"dot\" style=\"background:#2563eb\"></span>production \
         <span class=\"dot\" style=\"background:#d97706\"></span>canary &middot; error ratio (top) \
         and p99 (bottom) at each check; marks: <span class=\"ok\">pass</span> \
         <span class=\"bad\">fail</span> <span class=\"muted\">hold</span>; red line: rollback</p></section>",
    );
    html
}

fn outcome_class(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Pass => "ok",
        Outcome::Fail => "bad",
        Outcome::Hold => "muted",
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "&ndash;".to_owned(), |v| format!("{v:.1} ms"))
}

/// Two panels over the last 15 minutes: error ratio and p99 per pool, the checks
/// as marks, the rollback as a vertical line.
fn chart(view: &View, now_ms: u64) -> String {
    const W: f64 = 720.0;
    const PANEL: f64 = 110.0;
    const TOP: f64 = 18.0;
    // The span of the checks kept (at least a minute, at most 15): a young
    // analysis fills the chart rather than its last pixels.
    let oldest = view.checks.first().map_or(now_ms, |e| e.at_ms);
    let span_ms = now_ms.saturating_sub(oldest).clamp(60_000, HISTORY_MS);
    let span = crate::canary::stats::to_f64(span_ms);
    let x_of = |at_ms: u64| {
        W * (1.0 - (crate::canary::stats::to_f64(now_ms.saturating_sub(at_ms)) / span).min(1.0))
    };
    let height = TOP + 2.0 * PANEL + 24.0;
    let mut svg = format!(
        "<svg id=\"analysis-chart\" viewBox=\"0 0 {W} {height}\" style=\"width:100%;height:auto\" role=\"img\" \
         aria-label=\"canary and production error ratio and p99 at each check, last 15 minutes\">\
         <rect width=\"{W}\" height=\"{height}\" fill=\"#f8fafc\"/>"
    );
    let checks: Vec<&Entry> = view.checks.iter().collect();
    type Value = fn(&Figures) -> Option<f64>;
    let panels: [(&str, Value, f64); 2] = [
        ("error ratio", |f| Some(f.error_ratio * 100.0), TOP),
        ("p99 ms", |f| f.p99_ms, TOP + PANEL + 6.0),
    ];
    for (label, value, top) in panels {
        let peak = checks
            .iter()
            .flat_map(|e| [value(&e.check.production), value(&e.check.canary)])
            .flatten()
            .fold(0.0_f64, f64::max);
        let peak = if peak > 0.0 { peak * 1.1 } else { 1.0 };
        let unit = if label == "error ratio" { "%" } else { " ms" };
        let _ = write!(
            svg,
            "<line x1=\"0\" x2=\"{W}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"#e2e8f0\"/>\
             <text x=\"6\" y=\"{}\" class=\"axis\">{label} (max {peak:.1}{unit})</text>",
            top + 12.0,
            bottom = top + PANEL,
        );
        for (color, pick) in [
            (
                PRODUCTION,
                (|e: &Entry| e.check.production) as fn(&Entry) -> Figures,
            ),
            (CANARY, |e: &Entry| e.check.canary),
        ] {
            let points: Vec<String> = checks
                .iter()
                // A hold's figures come from too few requests to mean anything.
                .filter(|e| e.check.outcome != Outcome::Hold)
                .filter_map(|e| {
                    value(&pick(e)).map(|v| {
                        let y = top + PANEL - (PANEL - 16.0) * (v / peak);
                        format!("{:.1},{y:.1}", x_of(e.at_ms))
                    })
                })
                .collect();
            if !points.is_empty() {
                let _ = write!(
                    svg,
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                    points.join(" ")
                );
            }
        }
    }
    // One mark per check along the top edge.
    for e in &checks {
        let color = match e.check.outcome {
            Outcome::Pass => "#15803d",
            Outcome::Fail => "#b91c1c",
            Outcome::Hold => "#94a3b8",
        };
        let _ = write!(
            svg,
            "<circle class=\"check {}\" cx=\"{:.1}\" cy=\"8\" r=\"3.5\" fill=\"{color}\"><title>{}</title></circle>",
            e.check.outcome.as_str(),
            x_of(e.at_ms),
            escape_html(&e.check.reason)
        );
    }
    if let Some(at) = view
        .rolled_back_at_ms
        .filter(|at| now_ms.saturating_sub(*at) <= span_ms)
    {
        let x = x_of(at);
        let _ = write!(
            svg,
            "<line id=\"rollback\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"0\" y2=\"{}\" stroke=\"#b91c1c\" stroke-width=\"2\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{:.1}\" y=\"{}\" class=\"axis\" style=\"fill:#b91c1c\">rollback</text>",
            height - 20.0,
            (x - 50.0).max(0.0),
            TOP + PANEL - 4.0
        );
    }
    let _ = write!(
        svg,
        "<text x=\"6\" y=\"{y}\" class=\"axis\">-{}</text><text x=\"{}\" y=\"{y}\" class=\"axis\">now</text></svg>",
        humantime::format_duration(std::time::Duration::from_secs(span_ms / 1_000)),
        W - 30.0,
        y = height - 8.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::judge::Check;
    use crate::canary::verdict::Record;

    fn entry(at_ms: u64, outcome: Outcome, canary_ratio: f64) -> Entry {
        let figures = |ratio| Figures {
            requests: 500,
            errors: 0,
            error_ratio: ratio,
            p50_ms: Some(2.0),
            p99_ms: Some(9.0),
            capped: 0,
            apart: 0,
            client_cap: 1,
        };
        Entry {
            at_ms,
            check: Check {
                reason: format!("canary <{outcome:?}>"),
                production: figures(0.005),
                canary: figures(canary_ratio),
                z_critical: 3.1,
                ..Check::sample(outcome, false)
            },
        }
    }

    #[test]
    fn the_section_shows_every_check_and_the_rollback() {
        let now = 10_000_000;
        let view = View {
            enabled: true,
            state: Some(State::RolledBack),
            record: Record {
                reason: "canary error ratio 20% <b>".to_owned(),
                ..Record::default()
            },
            rolled_back_at_ms: Some(now - 5_000),
            checks: vec![
                entry(now - 30_000, Outcome::Hold, 0.0),
                entry(now - 20_000, Outcome::Pass, 0.005),
                entry(now - 10_000, Outcome::Fail, 0.2),
                entry(now - 5_000, Outcome::Fail, 0.2),
            ],
        };
        let html = section(&view, now);
        assert!(html.contains(">rolled_back<"), "{html}");
        assert!(html.contains("20% &lt;b&gt;"), "escaped: {html}");
        assert_eq!(html.matches("class=\"check fail\"").count(), 2);
        assert_eq!(html.matches("class=\"check pass\"").count(), 1);
        assert_eq!(html.matches("class=\"check hold\"").count(), 1);
        assert!(html.contains("id=\"rollback\""));
        // The last check's figures, side by side.
        assert!(html.contains("<td>20.00%</td>"), "{html}");
        let json = json(&view);
        assert_eq!(json["state"], "rolled_back");
        assert_eq!(json["checks"][0]["result"], "fail");
        assert_eq!(json["checks"].as_array().unwrap().len(), 4);
        // Off: says how to turn it on.
        assert!(section(&View::default(), now).contains("enabled = true"));
    }
}
