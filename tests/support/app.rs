//! An application backend for the canary analysis' tests, and ordinary users' traffic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use canarygate::server::{self, ServeOptions};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{LOCALHOST, client_from, try_get};

/// A backend that answers 500 to every `error_every`-th request (0: never) and
/// waits `delay_ms` before each answer; `/health` always answers 200 at once, and
/// `/broken` always 500 (a request that fails on every version), `/cheap` always 200
/// at once.
pub struct AppBackend {
    pub addr: SocketAddr,
    /// Settable while it runs: 0 stops the errors.
    pub error_every: Arc<AtomicU64>,
    shutdown: CancellationToken,
}

/// Fails requests at random, each with probability `ppm` in a million (independent,
/// as real errors are: a test of the statistics on evenly spaced errors would be a
/// test on unnaturally quiet data).
const RANDOM: u64 = 1 << 63;

impl AppBackend {
    /// A backend failing each request with probability `ratio`, independently.
    pub async fn failing_at_random(ratio: f64) -> Self {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ppm = (ratio * 1e6).round() as u64;
        Self::start(RANDOM | ppm, 0).await
    }

    pub async fn start(error_every: u64, delay_ms: u64) -> Self {
        let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0)))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let served = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(error_every));
        let error_setting = Arc::clone(&errors);
        let options = ServeOptions::basic(
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_millis(100),
        );
        tokio::spawn(server::serve(
            "app",
            listener,
            options,
            shutdown.clone(),
            move |_, _| {
                let (served, errors) = (Arc::clone(&served), Arc::clone(&errors));
                service_fn(move |req| {
                    let health = req.uri().path() == "/health";
                    // The same answer on every version: a malformed input, say.
                    let broken = req.uri().path() == "/broken";
                    // A cheap success, outside the error count.
                    let cheap = req.uri().path() == "/cheap";
                    let error_every = errors.load(Ordering::Relaxed);
                    let n = if health || cheap {
                        1
                    } else {
                        served.fetch_add(1, Ordering::Relaxed) + 1
                    };
                    async move {
                        if !health && !cheap && delay_ms > 0 {
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        }
                        let fail = broken
                            || (!health
                                && !cheap
                                && if error_every & RANDOM == 0 {
                                    error_every > 0 && n % error_every == 0
                                } else {
                                    fastrand::u64(..1_000_000) < error_every & !RANDOM
                                });
                        let mut response = Response::new(Full::new(Bytes::from_static(b"app\n")));
                        if fail {
                            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, Infallible>(response)
                    }
                })
            },
        ));
        Self {
            addr,
            error_every: error_setting,
            shutdown,
        }
    }
}

impl Drop for AppBackend {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Ordinary users: `concurrency` tasks, each speaking for [`USERS_PER_TASK`] users
/// in turn, every user from a loopback address of its own (127.1.t.u), sending GETs
/// without a cookie (each split anew) to the proxies in turn until dropped.
pub struct Traffic(CancellationToken);

/// Users per traffic task: enough that no one user is a large share of a window,
/// as on a real site (the analysis caps what one client counts for).
pub const USERS_PER_TASK: u8 = 16;

impl Traffic {
    pub fn start(urls: &[String], concurrency: usize) -> Self {
        let stop = CancellationToken::new();
        for i in 0..concurrency {
            let url = urls[i % urls.len()].clone();
            let stop = stop.clone();
            let task = u8::try_from(i).unwrap();
            tokio::spawn(async move {
                let users: Vec<_> = (1..=USERS_PER_TASK)
                    .map(|u| client_from([127, 1, task, u].into()))
                    .collect();
                for user in users.iter().cycle() {
                    if stop.is_cancelled() {
                        break;
                    }
                    let _ = try_get(user, &url).await;
                }
            });
        }
        Self(stop)
    }
}

/// Ordinary users sending a steady `rate_per_s` to each of `urls`: 20 tasks of [`USERS_PER_TASK`] users, each task sending on a clock, so
/// the rate does not depend on how fast the proxy answers (a slow round is caught
/// up, not lost). Until dropped.
pub struct PacedTraffic(CancellationToken);

impl PacedTraffic {
    pub const TASKS: u8 = 20;

    pub fn start(urls: &[String], rate_per_s: u32) -> Self {
        let stop = CancellationToken::new();
        let period = Duration::from_secs(1) * u32::from(Self::TASKS) / rate_per_s.max(1);
        for task in 0..Self::TASKS {
            let (stop, urls) = (stop.clone(), urls.to_vec());
            tokio::spawn(async move {
                let users: Vec<_> = (1..=USERS_PER_TASK)
                    .map(|u| client_from([127, 2, task, u].into()))
                    .collect();
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                // The tasks start spread over one period, not all at once.
                tokio::time::sleep(period * u32::from(task) / u32::from(Self::TASKS)).await;
                let mut turn = 0usize;
                while !stop.is_cancelled() {
                    tick.tick().await;
                    // One user per tick, to every URL: each proxy sees all the users
                    // (every one well within the analysis' per-client cap).
                    let user = &users[turn % users.len()];
                    turn += 1;
                    for url in &urls {
                        let (user, url) = (user.clone(), url.clone());
                        // Each request on its own, so one slow answer does not hold
                        // the clock back.
                        tokio::spawn(async move {
                            let _ = try_get(&user, &url).await;
                        });
                    }
                }
            });
        }
        Self(stop)
    }
}

impl Drop for PacedTraffic {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
