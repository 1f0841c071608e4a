//! The status page's shadow section, drawn from the same JSON as `GET /shadow`,
//! so the page and the endpoint cannot disagree.

use std::fmt::Write as _;

use serde_json::Value;

use crate::observe::html::escape_html;

/// Routes shown on the page (all of them are in `/shadow`).
const ROUTES_SHOWN: usize = 10;

/// The section, from [`crate::shadow::Shadow::json`].
pub fn section(shadow: &Value) -> String {
    let mut html = String::from("<section id=\"shadow\"><h2>Shadow</h2>");
    if shadow["enabled"] != true {
        html.push_str(
            "<p class=\"muted\">off: set <code>[shadow] enabled = true</code></p></section>",
        );
        return html;
    }
    let totals = &shadow["totals"];
    let ratio = totals["diff_ratio"].as_f64().unwrap_or(0.0);
    let class = if ratio > shadow["max_diff_ratio"].as_f64().unwrap_or(1.0) {
        "bad"
    } else {
        "ok"
    };
    let _ = write!(
        html,
        "<p>{} compared &middot; differing <span class=\"{class}\" id=\"shadow-ratio\">{:.2}%</span> \
         &middot; {} match, {} noise, {} diff, {} canary errors, {} production errors \
         &middot; {} in flight{}</p>",
        totals["samples"],
        ratio * 100.0,
        totals["matches"],
        totals["noise"],
        totals["diffs"],
        totals["candidate_errors"],
        totals["secondary_errors"],
        shadow["in_flight"],
        if shadow["gate"] == true {
            format!(
                " &middot; gate: {} samples at most {:.2}% differing{}",
                shadow["min_samples"],
                shadow["max_diff_ratio"].as_f64().unwrap_or(0.0) * 100.0,
                if shadow["holding_users"] == true {
                    ", <span class=\"warn\">canary users held</span>"
                } else {
                    ""
                }
            )
        } else {
            String::new()
        },
    );
    html.push_str(
        "<table><tr><th>route</th><th>samples</th><th>differing</th><th>fields</th><th>noise</th></tr>",
    );
    let empty = Vec::new();
    let routes = shadow["routes"].as_array().unwrap_or(&empty);
    for route in routes.iter().take(ROUTES_SHOWN) {
        let names = |v: &Value| -> String {
            let list: Vec<String> = match v {
                Value::Object(map) => map.keys().cloned().collect(),
                Value::Array(items) => items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            };
            escape_html(&list.join(", "))
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{:.2}%</td><td>{}</td><td class=\"muted\">{}</td></tr>",
            escape_html(route["route"].as_str().unwrap_or("")),
            route["samples"],
            route["diff_ratio"].as_f64().unwrap_or(0.0) * 100.0,
            names(&route["differing_fields"]),
            names(&route["noise_fields"]),
        );
    }
    html.push_str("</table>");
    if routes.len() > ROUTES_SHOWN {
        let _ = write!(
            html,
            "<p class=\"muted\">{} more routes in <a href=\"/shadow\">/shadow</a></p>",
            routes.len() - ROUTES_SHOWN
        );
    }
    html.push_str("</section>");
    html
}
