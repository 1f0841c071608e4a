//! Criterion benchmarks of the pieces every request runs through.
//!
//! `cargo bench --bench hot_paths`. Each piece should cost well under a microsecond:
//! the proxy's budget per request on 2 cores is a few microseconds in all.

use std::hint::black_box;
use std::time::Duration;

use canarygate::config;
use canarygate::http1::strip_hop_by_hop;
use canarygate::observe::metrics::Metrics;
use canarygate::routing::{self, PoolKind};
use canarygate::state::AppState;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

fn routing_decision(c: &mut Criterion) {
    c.bench_function("bucket + pool choice (32-byte cookie id)", |b| {
        let id = b"0f1e2d3c4b5a69788796a5b4c3d2e1f0";
        b.iter(|| {
            let bucket = routing::bucket(black_box(id));
            let canary = routing::Canary {
                enabled: true,
                configured: true,
                usable: true,
            };
            routing::decide(None, bucket, black_box(33), canary)
        });
    });
    c.bench_function("cookie lookup in a 4-cookie header", |b| {
        let h = b"_ga=GA1.2.3; theme=dark; canarygate_id=0f1e2d3c4b5a69788796a5b4c3d2e1f0; lang=en";
        b.iter(|| routing::find_cookie(black_box(h), routing::STICKY_COOKIE));
    });
}

fn snapshot_and_flags(c: &mut Criterion) {
    let toml = "[pools.production]\nbackends = [\"127.0.0.1:3001\"]\n[flags.static]\na = \"on\"\nb = \"off\"\ntheme = \"blue\"\n";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let state =
        runtime.block_on(async { AppState::new(config::from_toml(toml, "bench").unwrap()) });
    c.bench_function("snapshot load + flags header clone", |b| {
        b.iter(|| {
            let snapshot = state.snapshot();
            let value = snapshot.flags.header_value.clone();
            (snapshot.flags.effective_percent(33), value)
        });
    });
}

fn metrics_record(c: &mut Criterion) {
    let metrics = Metrics::new();
    c.bench_function("metrics record (counter + histogram + in-flight)", |b| {
        let pool = metrics.pool(PoolKind::Canary);
        b.iter(|| {
            let _guard = pool.in_flight_guard();
            pool.record(
                black_box(&Method::GET),
                black_box(StatusCode::OK),
                Duration::from_micros(420),
            );
        });
    });
}

fn analysis_record(c: &mut Criterion) {
    let recorder = canarygate::canary::window::Recorder::new(1);
    recorder.configure(
        true,
        120_000,
        &canarygate::canary::clients::ClientLimit::default(),
    );
    // 1,000 clients in turn, each counted against the per-client cap.
    let clients: Vec<_> = (0..1_000u32)
        .map(|i| {
            recorder.client_keys(
                None,
                std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes()),
            )
        })
        .collect();
    let mut now = 0u64;
    c.bench_function(
        "canary analysis record (client cap + worker shard + HDR histogram)",
        |b| {
            b.iter(|| {
                now += 1;
                let client = clients[usize::try_from(now % 1_000).unwrap_or(0)];
                recorder.record(
                    PoolKind::Canary,
                    black_box(now / 64),
                    Duration::from_micros(420),
                    false,
                    canarygate::canary::window::Placed::Bucket(client),
                );
            });
        },
    );
    c.bench_function("canary analysis window merge (24 slots, both pools)", |b| {
        b.iter(|| recorder.window(black_box(now / 64)));
    });
}

fn hop_by_hop(c: &mut Criterion) {
    let mut base = HeaderMap::new();
    base.insert(header::HOST, HeaderValue::from_static("app.example"));
    base.insert(header::USER_AGENT, HeaderValue::from_static("wrk"));
    base.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    base.insert(
        header::COOKIE,
        HeaderValue::from_static("canarygate_id=abc"),
    );
    c.bench_function("hop-by-hop strip, no Connection header", |b| {
        b.iter_batched_ref(
            || base.clone(),
            strip_hop_by_hop,
            criterion::BatchSize::SmallInput,
        );
    });
    let mut with_connection = base.clone();
    with_connection.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, x-secret"),
    );
    with_connection.insert("x-secret", HeaderValue::from_static("1"));
    c.bench_function("hop-by-hop strip, Connection naming a header", |b| {
        b.iter_batched_ref(
            || with_connection.clone(),
            strip_hop_by_hop,
            criterion::BatchSize::SmallInput,
        );
    });
}

/// One access log line formatted into the worker's buffer, per format (the writer is
/// not running: full buffers are dropped and counted, which is part of what is timed
/// here, once per some 400 lines, as the hand-over is in the proxy).
fn access_log_line(c: &mut Criterion) {
    use canarygate::config::{AccessLogFormat, AccessLogTarget};
    use canarygate::observe::access_log::{AccessLog, Entry};
    for (name, format) in [
        ("canarygate", AccessLogFormat::Canarygate),
        ("combined", AccessLogFormat::Combined),
        ("json", AccessLogFormat::Json),
    ] {
        let log = AccessLog::new(
            &AccessLogTarget::File("/nonexistent/bench.log".into()),
            format,
            prometheus::IntCounter::new("dropped", "dropped").unwrap(),
        )
        .unwrap();
        let method = Method::GET;
        c.bench_function(&format!("access log line ({name})"), |b| {
            b.iter(|| {
                log.record(black_box(&Entry {
                    peer: std::net::IpAddr::from([203, 0, 113, 9]),
                    method: &method,
                    target: "/cart/checkout?id=7",
                    version: http::Version::HTTP_11,
                    status: 200,
                    bytes: Some(100),
                    pool: "canary",
                    reason: "bucket",
                    backend: "10.0.0.12:8080",
                    duration_us: 1840,
                    request_id: "4c7f0e2a9b1d3e55",
                    referer: Some(b"https://shop.example/"),
                    user_agent: Some(b"Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"),
                }));
            });
        });
    }
}

criterion_group!(
    benches,
    access_log_line,
    routing_decision,
    snapshot_and_flags,
    metrics_record,
    analysis_record,
    hop_by_hop
);
criterion_main!(benches);
