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

impl AppBackend {
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
                            || (!health && !cheap && error_every > 0 && n % error_every == 0);
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

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
