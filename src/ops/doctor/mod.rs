//! The doctor: a process of its own beside the proxy (`canarygate doctor`) that stops
//! a runaway CPU hog, never a root or protected process, and tells the humans.
//!
//! It is separate on purpose: stopping another user's process needs CAP_KILL, and the
//! internet-facing proxy must never hold it (`canarygate run` signals nothing). It
//! reads the proxy's `/metrics` every round, so every alert carries the service
//! before and after the action, and `only_when_impacting` can wait for the service to
//! suffer before it kills.
//!
//! - [`procs`]: sampling, identities, and the rules that put processes out of reach.
//! - [`signal`]: pidfd signalling: the process judged, as judged, or nobody.
//! - [`breaker`]: at most `max_kills` decided within `window_ms`.
//!
//! A round samples, then decides hog by hog: each hog's identity is read again from
//! `/proc` as it is decided, and each `Kill` takes its place in the breaker at once,
//! so the next hog of the same round meets a breaker that already counts it.

pub mod breaker;
pub mod procs;
pub mod signal;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGauge};
use rustix::process::Signal;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::config::alerts::Severity;
use crate::config::doctor::{DoctorConfig, DoctorFile, Mode};
use crate::ops::alerts::Dispatcher;
use crate::ops::service::{self, Figures, Scrape};
use crate::ops::sidecar::{self, SidecarError, SidecarMetrics};
use breaker::Breaker;
use procs::{Identity, Live, Proc, Reach, Sampler};
use signal::{Sent, hold};

/// Why the doctor could not start.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error(transparent)]
    Start(#[from] SidecarError),
    #[error("cannot read processes (sysinfo unsupported here)")]
    NoSampler,
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// `canarygate_doctor_*`, in the doctor's own registry.
pub struct DoctorMetrics {
    own: Arc<SidecarMetrics>,
    actions: IntCounterVec,
    hogs: IntGauge,
    proxy_up: IntGauge,
}

impl DoctorMetrics {
    fn new() -> Self {
        let own = Arc::new(SidecarMetrics::default());
        Self {
            actions: own.counter(
                "canarygate_doctor_actions_total",
                "Doctor actions: action sigterm, sigkill or report; result ok, gone, denied, \
                 changed, error (signals) or protected, dry_run, not_impacting, breaker_open \
                 (reports).",
                &["action", "result"],
            ),
            hogs: own.gauge(
                "canarygate_doctor_hogs",
                "Processes above doctor.cpu_percent for doctor.sustain_ms now.",
            ),
            proxy_up: own.gauge(
                "canarygate_doctor_proxy_metrics_up",
                "1 if the proxy's /metrics answered at the last round, else 0.",
            ),
            own,
        }
    }

    fn count(&self, action: &str, result: &str) {
        self.actions.with_label_values(&[action, result]).inc();
    }
}

/// What the doctor does about one hog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Kill,
    /// Reported, not signalled: why (the `result` label of the report).
    Report(&'static str, String),
}

/// A process above `cpu_percent`, and since when.
#[derive(Debug, Clone)]
struct Above {
    since: Instant,
    proc: Proc,
}

/// Everything one doctor keeps between rounds.
struct Doctor {
    config: DoctorConfig,
    url: String,
    reach: Reach,
    sampler: Option<Sampler>,
    http: reqwest::Client,
    metrics: Arc<DoctorMetrics>,
    alerts: Dispatcher,
    above: HashMap<Identity, Above>,
    /// Hogs already signalled, and reports already made (what it was, result): a
    /// process that exec'd or changed uid since is judged again.
    acted: HashSet<Live>,
    reported: HashSet<(Live, &'static str)>,
    breaker: Breaker,
    breaker_alerted: bool,
    last_scrape: Option<Scrape>,
    figures: Figures,
}

impl Doctor {
    fn new(
        file: &DoctorFile,
        alerts: Dispatcher,
        metrics: Arc<DoctorMetrics>,
        kills: breaker::KillLog,
    ) -> Result<Self, DoctorError> {
        let config = file.doctor.clone();
        Ok(Self {
            reach: Reach::new(&config),
            breaker: Breaker::sharing(
                config.max_kills,
                Duration::from_millis(config.window_ms),
                kills,
            ),
            url: file.proxy_metrics_url(),
            sampler: Some(Sampler::new().ok_or(DoctorError::NoSampler)?),
            http: reqwest::Client::builder().build()?,
            config,
            metrics,
            alerts,
            above: HashMap::new(),
            acted: HashSet::new(),
            reported: HashSet::new(),
            breaker_alerted: false,
            last_scrape: None,
            figures: Figures::default(),
        })
    }

    /// One round: the service, the processes; returns the hogs (above the line for
    /// `sustain_ms`) and for how long.
    async fn observe(&mut self) -> Vec<(Proc, Duration)> {
        let Some(mut sampler) = self.sampler.take() else {
            return Vec::new();
        };
        let threshold = self.config.cpu_percent;
        let (sampler, (procs, host_cpu)) = match tokio::task::spawn_blocking(move || {
            let sample = sampler.sample(threshold);
            (sampler, sample)
        })
        .await
        {
            Ok(done) => done,
            Err(error) => {
                // The sampler went down with the failed task: a new one next round.
                warn!(%error, "process sampling failed");
                self.sampler = Sampler::new();
                return Vec::new();
            }
        };
        self.sampler = Some(sampler);
        match service::scrape(&self.http, &self.url).await {
            Ok(scrape) => {
                if let Some(older) = &self.last_scrape {
                    self.figures = Figures::between(older, &scrape);
                } else {
                    self.figures = Figures {
                        host_cpu_ratio: scrape.host_cpu_ratio,
                        from_proxy: true,
                        ..Figures::default()
                    };
                }
                self.last_scrape = Some(scrape);
                self.metrics.proxy_up.set(1);
            }
            Err(error) => {
                if self.metrics.proxy_up.get() != 0 || self.last_scrape.is_some() {
                    warn!(url = %self.url, %error, "proxy metrics unreadable; using own samples");
                }
                self.last_scrape = None;
                self.figures = Figures::own(host_cpu);
                self.metrics.proxy_up.set(0);
            }
        }
        let now = Instant::now();
        let mut seen = HashSet::new();
        for p in procs {
            if p.cpu_percent < threshold || !self.reach.watches(&p.live) {
                continue;
            }
            seen.insert(p.live.identity);
            self.above
                .entry(p.live.identity)
                .and_modify(|a| a.proc = p.clone())
                .or_insert(Above {
                    since: now,
                    proc: p,
                });
        }
        // Above the line in every sample, or not a hog.
        self.above.retain(|identity, _| seen.contains(identity));
        self.acted.retain(|live| seen.contains(&live.identity));
        self.reported
            .retain(|(live, _)| seen.contains(&live.identity));
        let sustain = Duration::from_millis(self.config.sustain_ms);
        let mut hogs: Vec<(Proc, Duration)> = self
            .above
            .values()
            .map(|a| (a.proc.clone(), now.duration_since(a.since)))
            .filter(|(_, held)| *held >= sustain)
            .collect();
        self.metrics
            .hogs
            .set(i64::try_from(hogs.len()).unwrap_or(i64::MAX));
        // The greediest first: when the breaker leaves room for fewer than all, it
        // goes to the one that costs the host most (then the oldest, for a stable
        // order).
        hogs.sort_by(|(a, a_held), (b, b_held)| {
            b.cpu_percent
                .total_cmp(&a.cpu_percent)
                .then(b_held.cmp(a_held))
                .then(a.live.identity.pid.cmp(&b.live.identity.pid))
        });
        hogs
    }

    /// Decides this round's hogs one at a time, each on a fresh read of `/proc`, the
    /// breaker counting each `Kill` as it is decided. Hogs gone since the sample,
    /// and hogs already acted on as what they are now, are left out.
    fn decide_all(&mut self, hogs: Vec<(Proc, Duration)>) -> Vec<(Proc, Duration, Decision)> {
        let mut decided = Vec::with_capacity(hogs.len());
        for (mut p, held) in hogs {
            match procs::current(p.live.identity.pid) {
                Some(now) if now.identity == p.live.identity => p.live = now,
                _ => continue,
            }
            if self.acted.contains(&p.live) {
                continue;
            }
            let decision = self.decide(&p.live);
            decided.push((p, held, decision));
        }
        if self.breaker_alerted && !self.breaker.is_open(Instant::now()) {
            self.breaker_alerted = false;
            self.alerts.resolve(
                "doctor_breaker",
                "doctor kills again: the breaker's window has passed",
            );
        }
        decided
    }

    /// What to do about `p` as it is now; a `Kill` is counted in the breaker here.
    fn decide(&mut self, p: &Live) -> Decision {
        if let Some(why) = self.reach.protection(p) {
            return Decision::Report("protected", format!("not signalled: it {why}"));
        }
        if self.config.mode == Mode::Report {
            return Decision::Report("dry_run", "not signalled: mode = \"report\"".to_owned());
        }
        if self.config.only_when_impacting && !self.impacting() {
            return Decision::Report(
                "not_impacting",
                format!(
                    "not signalled yet: the service is not impacted (p99 under {} ms and host \
                     CPU under {:.0}%): {}",
                    self.config.impact_p99_ms,
                    self.config.impact_cpu_ratio * 100.0,
                    self.figures
                ),
            );
        }
        match self.breaker.admit(Instant::now()) {
            Ok(()) => Decision::Kill,
            Err(kills) => Decision::Report(
                "breaker_open",
                format!(
                    "not signalled (spared): {kills} kills decided within {} s already \
                     (max_kills {}); something keeps restarting a hog, or many crossed at once",
                    self.config.window_ms / 1_000,
                    self.config.max_kills
                ),
            ),
        }
    }

    /// Whether the service suffers: production p99 or host CPU above the lines (on
    /// the doctor's own CPU sample when the proxy cannot be read).
    fn impacting(&self) -> bool {
        let f = &self.figures;
        let p99 = f
            .p99_ms
            .is_some_and(|p| p > crate::canary::stats::to_f64(self.config.impact_p99_ms));
        let cpu = f
            .host_cpu_ratio
            .is_some_and(|c| c > self.config.impact_cpu_ratio);
        p99 || cpu
    }

    /// Acts on this round's hogs: reports once per hog and reason, kills in a task
    /// of its own (the rounds go on meanwhile).
    fn act(
        &mut self,
        hogs: Vec<(Proc, Duration, Decision)>,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        // The hogs the breaker spared this round, named together in its alert.
        let spared: Vec<String> = hogs
            .iter()
            .filter(|(_, _, d)| matches!(d, Decision::Report("breaker_open", _)))
            .map(|(p, held, _)| p.summary(*held))
            .collect();
        for (p, held, decision) in hogs {
            match decision {
                Decision::Report(result, why) => {
                    if result == "breaker_open" && !self.breaker_alerted {
                        self.breaker_alerted = true;
                        self.alerts.fire(
                            Severity::Critical,
                            "doctor_breaker",
                            &format!(
                                "doctor stopped killing: {} kills decided within {} s \
                                     (max_kills); {} hog(s) spared",
                                self.config.max_kills,
                                self.config.window_ms / 1_000,
                                spared.len()
                            ),
                            &format!(
                                "spared:\n{}\nservice: {}\n{why}",
                                spared.join("\n"),
                                self.figures
                            ),
                        );
                    }
                    if !self.reported.insert((p.live.clone(), result)) {
                        continue;
                    }
                    self.metrics.count("report", result);
                    if result == "breaker_open" {
                        warn!(
                            pid = p.live.identity.pid,
                            comm = %p.name(),
                            user = %p.user,
                            cpu = p.cpu_percent,
                            "doctor spared a hog: the breaker is open"
                        );
                    } else {
                        info!(pid = p.live.identity.pid, comm = %p.name(), user = %p.user, cpu = p.cpu_percent, result, "doctor report");
                    }
                    self.alerts.notify(
                        Severity::Warning,
                        "doctor_report",
                        &format!(
                            "CPU hog pid {} ({}, user {}) at {:.0}% for {} s: {why}",
                            p.live.identity.pid,
                            p.name(),
                            p.user,
                            p.cpu_percent,
                            held.as_secs()
                        ),
                        &describe(&p, held, &self.figures, &why),
                    );
                }
                Decision::Kill => {
                    self.acted.insert(p.live.clone());
                    let job = Kill {
                        proc: p,
                        held,
                        before: self.figures,
                        grace: Duration::from_millis(self.config.grace_ms),
                        after: Duration::from_millis(self.config.after_ms),
                        url: self.url.clone(),
                        http: self.http.clone(),
                        metrics: Arc::clone(&self.metrics),
                        alerts: self.alerts.clone(),
                        own_cpu: self.figures.host_cpu_ratio,
                    };
                    tasks.spawn(job.run().instrument(info_span!("kill")));
                }
            }
        }
    }
}

/// What became of a process judged `then`, now `now`: for the alert and the log.
fn changed(then: &Live, now: &Live) -> String {
    let exe = |l: &Live| {
        l.exe.as_ref().map_or_else(
            || "unreadable".to_owned(),
            |e| crate::ops::cmdline::escape(&e.to_string_lossy()),
        )
    };
    format!(
        "it is no longer what was judged (it exec'd, changed uid or moved cgroup): was comm \
         {} exe {} uid {}/{}, now comm {} exe {} uid {}/{}; it is judged again as what it is \
         now",
        crate::ops::cmdline::escape(&then.comm),
        exe(then),
        then.uid,
        then.euid,
        crate::ops::cmdline::escape(&now.comm),
        exe(now),
        now.uid,
        now.euid
    )
}

/// The alert's details: the process, the service, the decision.
fn describe(p: &Proc, held: Duration, service: &Figures, what: &str) -> String {
    format!("{}\nservice: {service}\n{what}", p.summary(held))
}

/// One kill: SIGTERM, SIGKILL after the grace if needed, then the service measured
/// again, then one critical alert with all of it.
struct Kill {
    proc: Proc,
    held: Duration,
    before: Figures,
    grace: Duration,
    after: Duration,
    url: String,
    http: reqwest::Client,
    metrics: Arc<DoctorMetrics>,
    alerts: Dispatcher,
    own_cpu: Option<f64>,
}

impl Kill {
    async fn run(self) {
        let p = &self.proc;
        let mut log = String::new();
        let outcome = match hold(&p.live) {
            Ok(Err(Sent::Changed(now))) => {
                self.metrics.count("sigterm", "changed");
                format!("SIGTERM not sent: {}", changed(&p.live, &now))
            }
            Ok(Err(_)) => {
                self.metrics.count("sigterm", "gone");
                "the process was gone before any signal (exited, or its PID now belongs to another)"
                    .to_owned()
            }
            Err(error) => {
                self.metrics.count("sigterm", "error");
                format!("could not take hold of it: {error}")
            }
            Ok(Ok(handle)) => {
                let started = Instant::now();
                match handle.send(Signal::TERM) {
                    Ok(Sent::Delivered) => {
                        self.metrics.count("sigterm", Sent::Delivered.as_str());
                        if handle.exited_within(self.grace).await {
                            format!(
                                "SIGTERM: exited after {:.1} s",
                                started.elapsed().as_secs_f64()
                            )
                        } else {
                            let _ = write!(
                                log,
                                "SIGTERM: still running after {} s; ",
                                self.grace.as_secs_f64()
                            );
                            // `send` reads the process again: one that exec'd a
                            // protected name during the grace is not killed.
                            match handle.send(Signal::KILL) {
                                Ok(sent) => {
                                    self.metrics.count("sigkill", sent.as_str());
                                    let exited = sent == Sent::Delivered
                                        && handle.exited_within(Duration::from_secs(5)).await;
                                    format!(
                                        "{log}SIGKILL: {}",
                                        match (sent, exited) {
                                            (Sent::Delivered, true) => "killed".to_owned(),
                                            (Sent::Delivered, false) =>
                                                "sent, still not gone after 5 s".to_owned(),
                                            (Sent::Changed(now), _) =>
                                                format!("not sent: {}", changed(&p.live, &now)),
                                            (other, _) => other.as_str().to_owned(),
                                        }
                                    )
                                }
                                Err(error) => {
                                    self.metrics.count("sigkill", "error");
                                    format!("{log}SIGKILL failed: {error}")
                                }
                            }
                        }
                    }
                    Ok(Sent::Denied) => {
                        self.metrics.count("sigterm", "denied");
                        "SIGTERM not allowed (EPERM): the doctor lacks CAP_KILL for this user's \
                         processes; nothing was done"
                            .to_owned()
                    }
                    Ok(Sent::Gone) => {
                        self.metrics.count("sigterm", "gone");
                        "the process exited before SIGTERM".to_owned()
                    }
                    Ok(Sent::Changed(now)) => {
                        self.metrics.count("sigterm", "changed");
                        format!("SIGTERM not sent: {}", changed(&p.live, &now))
                    }
                    Err(error) => {
                        self.metrics.count("sigterm", "error");
                        format!("SIGTERM failed: {error}")
                    }
                }
            }
        };
        // The service again, `after` later: two scrapes around the settled period.
        let first = service::scrape(&self.http, &self.url).await.ok();
        tokio::time::sleep(self.after).await;
        let second = service::scrape(&self.http, &self.url).await.ok();
        let after = match (&first, &second) {
            (Some(a), Some(b)) => Figures::between(a, b),
            _ => Figures::own(self.own_cpu.unwrap_or(0.0)),
        };
        warn!(
            pid = p.live.identity.pid,
            comm = %p.name(),
            user = %p.user,
            command = %p.cmdline,
            cpu = p.cpu_percent,
            held_s = self.held.as_secs(),
            outcome = %outcome,
            before = %self.before,
            after = %after,
            "doctor acted"
        );
        let details = format!(
            "{}\nbefore: {}\nafter ({} s later): {after}\naction: {outcome}",
            p.summary(self.held),
            self.before,
            self.after.as_secs()
        );
        self.alerts.notify(
            Severity::Critical,
            "doctor_kill",
            &format!(
                "doctor stopped pid {} ({}, user {}) at {:.0}% CPU for {} s: {outcome}",
                p.live.identity.pid,
                p.name(),
                p.user,
                p.cpu_percent,
                self.held.as_secs()
            ),
            &details,
        );
    }
}

/// Runs the doctor until `shutdown`: its admin listener, its alert channels, a round
/// every `interval_ms`. `kills` is the process's kill log: the breaker's window
/// spans config reloads (each reload runs this again with the same log).
pub async fn run(
    file: DoctorFile,
    shutdown: CancellationToken,
    kills: breaker::KillLog,
) -> Result<(), DoctorError> {
    let metrics = Arc::new(DoctorMetrics::new());
    let tasks = tokio_util::task::TaskTracker::new();
    let stop = CancellationToken::new();
    let addr = file.doctor.admin_listen;
    let alerts = sidecar::start("doctor", addr, &metrics.own, &file.alerts, &tasks, &stop).await?;
    info!(admin = %addr, proxy_metrics = %file.proxy_metrics_url(), mode = ?file.doctor.mode, "doctor running");
    let mut doctor = Doctor::new(&file, alerts, metrics, kills)?;
    let kills = tokio_util::task::TaskTracker::new();
    let mut tick = tokio::time::interval(Duration::from_millis(file.doctor.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let hogs = doctor.observe().await;
                let decided = doctor.decide_all(hogs);
                doctor.act(decided, &kills);
            }
        }
    }
    // A kill under way finishes (its alert is the record of it), within its grace.
    kills.close();
    let _ = tokio::time::timeout(
        Duration::from_millis(file.doctor.grace_ms + 6_000),
        kills.wait(),
    )
    .await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    info!("doctor stopped");
    Ok(())
}

/// `canarygate doctor --once`: samples for `sustain_ms` (a round every
/// `interval_ms`), then says what it sees and what it would do. Signals nothing.
pub async fn once(file: &DoctorFile) -> Result<String, DoctorError> {
    let metrics = Arc::new(DoctorMetrics::new());
    let alerts = sidecar::silent(&metrics.own);
    let mut doctor = Doctor::new(file, alerts, metrics, breaker::KillLog::default())?;
    let interval = Duration::from_millis(file.doctor.interval_ms);
    let rounds = file.doctor.sustain_ms.div_ceil(file.doctor.interval_ms) + 1;
    let mut hogs = Vec::new();
    for round in 0..=rounds {
        if round > 0 {
            tokio::time::sleep(interval).await;
        }
        hogs = doctor.observe().await;
    }
    // Decided once, on the last round: as a running doctor would, breaker included.
    let hogs = doctor.decide_all(hogs);
    let mut out = format!(
        "doctor --once: sampled {} s; service: {}\n",
        (interval * u32::try_from(rounds).unwrap_or(u32::MAX)).as_secs(),
        doctor.figures
    );
    if hogs.is_empty() {
        let _ = writeln!(
            out,
            "no process above {}% of one core for {} s{}",
            file.doctor.cpu_percent,
            file.doctor.sustain_ms / 1_000,
            if file.doctor.watch_users.is_empty() {
                String::new()
            } else {
                format!(" among users {}", file.doctor.watch_users.join(", "))
            }
        );
    }
    for (p, held, decision) in hogs {
        let verdict = match decision {
            Decision::Kill => format!(
                "would send SIGTERM, then SIGKILL after {} s if it still runs",
                file.doctor.grace_ms / 1_000
            ),
            Decision::Report(_, why) => format!("would report it, {why}"),
        };
        let _ = writeln!(out, "{}\n  {verdict}", p.summary(held));
    }
    Ok(out)
}
