//! The service as the co-located processes (doctor, maintenance) see it: the proxy's
//! `/metrics`, scraped every round. Between two scrapes: the production pool's
//! request rate, 5xx ratio and p99 (from the cumulative histogram, as Prometheus'
//! `histogram_quantile` does), the request rate over all pools, and the host CPU and
//! disk ratios of the proxy's resource watch.

use std::fmt;
use std::time::{Duration, Instant};

use crate::observe::metrics::DURATION_BUCKETS;
use crate::observe::stats::{PoolSample, window};

/// One scrape's production counters and host CPU.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub at: Instant,
    pub production: PoolSample,
    /// Requests over every pool (the count of the duration histogram).
    pub all_requests: u64,
    pub host_cpu_ratio: Option<f64>,
    /// `canarygate_host_disk_used_ratio{path}`: each watched path and its ratio.
    pub disks: Vec<(String, f64)>,
}

/// Reads what the doctor needs from a Prometheus text exposition.
pub fn parse(text: &str, at: Instant) -> Scrape {
    let mut production = PoolSample {
        buckets: vec![0; DURATION_BUCKETS.len()],
        ..PoolSample::default()
    };
    let mut host_cpu_ratio = None;
    let mut all_requests = 0;
    let mut disks = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let count = value as u64;
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let label = |key: &str| {
            let needle = format!("{key}=\"");
            let start = labels.find(&needle)? + needle.len();
            labels[start..].split('"').next()
        };
        let production_pool = label("pool") == Some("production");
        match name {
            "canarygate_host_cpu_ratio" => host_cpu_ratio = Some(value),
            "canarygate_host_disk_used_ratio" => {
                if let Some(path) = label("path") {
                    disks.push((path.to_owned(), value));
                }
            }
            "canarygate_request_duration_seconds_count" => {
                all_requests += count;
                if production_pool {
                    production.requests = count;
                }
            }
            "canarygate_request_duration_seconds_bucket" if production_pool => {
                let bound = label("le").and_then(|le| le.parse::<f64>().ok());
                if let Some(i) =
                    bound.and_then(|b| DURATION_BUCKETS.iter().position(|d| (d - b).abs() < 1e-12))
                {
                    production.buckets[i] = count;
                }
            }
            "canarygate_requests_total"
                if production_pool && label("code").is_some_and(|c| c.starts_with('5')) =>
            {
                production.errors_5xx += count;
            }
            _ => {}
        }
    }
    Scrape {
        at,
        production,
        all_requests,
        host_cpu_ratio,
        disks,
    }
}

/// The service between two scrapes (or what is known without them).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figures {
    /// The production pool's.
    pub requests_per_s: f64,
    /// Every pool's.
    pub all_requests_per_s: f64,
    pub error_ratio: f64,
    pub p99_ms: Option<f64>,
    pub host_cpu_ratio: Option<f64>,
    /// Whether the figures came from the proxy (false: its metrics could not be read).
    pub from_proxy: bool,
}

impl Figures {
    pub fn between(older: &Scrape, newer: &Scrape) -> Self {
        let secs = newer.at.duration_since(older.at).as_secs_f64();
        let w = window(&older.production, &newer.production, secs);
        #[allow(clippy::cast_precision_loss)]
        let all = newer.all_requests.saturating_sub(older.all_requests) as f64;
        Self {
            requests_per_s: w.rate_per_s,
            all_requests_per_s: if secs > 0.0 { all / secs } else { 0.0 },
            error_ratio: w.error_ratio,
            p99_ms: w.p99_s.map(|s| s * 1_000.0),
            host_cpu_ratio: newer.host_cpu_ratio,
            from_proxy: true,
        }
    }

    /// Without the proxy's metrics: the doctor's own host CPU sample only.
    pub fn own(host_cpu_ratio: f64) -> Self {
        Self {
            host_cpu_ratio: Some(host_cpu_ratio),
            ..Self::default()
        }
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpu = self
            .host_cpu_ratio
            .map_or_else(|| "?".to_owned(), |c| format!("{:.0}%", c * 100.0));
        if !self.from_proxy {
            return write!(f, "proxy metrics unreadable; host CPU {cpu} (own sample)");
        }
        let p99 = self
            .p99_ms
            .map_or_else(|| "- (no requests)".to_owned(), |p| format!("{p:.1} ms"));
        write!(
            f,
            "production p99 {p99}, {:.1} req/s, {:.2}% 5xx; host CPU {cpu}",
            self.requests_per_s,
            self.error_ratio * 100.0
        )
    }
}

/// Scrapes the proxy's metrics.
pub async fn scrape(client: &reqwest::Client, url: &str) -> Result<Scrape, reqwest::Error> {
    let text = client
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse(&text, Instant::now()))
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn parses_the_proxy_exposition_and_differences_two_scrapes() {
        let start = Instant::now();
        let text = |count: u64, fast: u64, errors: u64, cpu: f64| {
            let mut t = format!(
                "# HELP x\ncanarygate_host_cpu_ratio {cpu}\n\
                 canarygate_request_duration_seconds_count{{pool=\"production\"}} {count}\n\
                 canarygate_request_duration_seconds_count{{pool=\"canary\"}} {}\n\
                 canarygate_host_disk_used_ratio{{path=\"/var/log\"}} 0.5\n\
                 canarygate_requests_total{{code=\"200\",method=\"GET\",pool=\"production\"}} {}\n\
                 canarygate_requests_total{{code=\"503\",method=\"GET\",pool=\"production\"}} {errors}\n\
                 canarygate_requests_total{{code=\"500\",method=\"GET\",pool=\"canary\"}} 777\n",
                count * 2,
                count - errors
            );
            for bound in DURATION_BUCKETS {
                // `fast` requests at or under 5 ms, the rest by 250 ms.
                let n = if bound >= 0.25 {
                    count
                } else if bound >= 0.005 {
                    fast
                } else {
                    0
                };
                let _ = writeln!(
                    t,
                    "canarygate_request_duration_seconds_bucket{{pool=\"production\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                t,
                "canarygate_request_duration_seconds_bucket{{pool=\"production\",le=\"+Inf\"}} {count}"
            );
            t
        };
        let older = parse(&text(1_000, 1_000, 0, 0.2), start);
        assert_eq!(older.production.requests, 1_000);
        assert_eq!(older.host_cpu_ratio, Some(0.2));
        assert_eq!(older.all_requests, 3_000);
        assert_eq!(older.disks, [("/var/log".to_owned(), 0.5)]);
        // 10 s later: 1000 more requests, 100 of them slow, 20 errors.
        let newer = parse(
            &text(2_000, 1_900, 20, 0.95),
            start + Duration::from_secs(10),
        );
        assert_eq!(newer.production.errors_5xx, 20);
        let f = Figures::between(&older, &newer);
        assert!((f.requests_per_s - 100.0).abs() < 1e-9);
        assert!((f.all_requests_per_s - 300.0).abs() < 1e-9);
        assert!((f.error_ratio - 0.02).abs() < 1e-12);
        // Rank 990 of 1000: inside (0.1, 0.25], 90 of its 100: 0.1 + 0.15 * 0.9 = 235 ms.
        assert!((f.p99_ms.unwrap() - 235.0).abs() < 1e-6, "{:?}", f.p99_ms);
        assert_eq!(f.host_cpu_ratio, Some(0.95));
        assert!(
            f.to_string()
                .starts_with("production p99 235.0 ms, 100.0 req/s, 2.00% 5xx; host CPU 95%")
        );
        assert_eq!(
            Figures::own(0.5).to_string(),
            "proxy metrics unreadable; host CPU 50% (own sample)"
        );
    }
}
