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
//! - [`signal`]: pidfd signalling: the process sampled, or nobody.

pub mod procs;
pub mod signal;

use std::collections::{HashMap, HashSet, VecDeque};
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
use procs::{Identity, Proc, Reach, Sampler};
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
                 error (signals) or protected, dry_run, not_impacting, breaker_open (reports).",
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
    /// Hogs already signalled, and reports already made (identity, result).
    acted: HashSet<Identity>,
    reported: HashSet<(Identity, &'static str)>,
    kills: VecDeque<Instant>,
    breaker_alerted: bool,
    last_scrape: Option<Scrape>,
    figures: Figures,
}

impl Doctor {
    fn new(
        file: &DoctorFile,
        alerts: Dispatcher,
        metrics: Arc<DoctorMetrics>,
    ) -> Result<Self, DoctorError> {
        let config = file.doctor.clone();
        Ok(Self {
            reach: Reach::new(
                &config.watch_users,
                &config.protected_users,
                &config.protected_names,
                &config.protected_pids,
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
            kills: VecDeque::new(),
            breaker_alerted: false,
            last_scrape: None,
            figures: Figures::default(),
        })
    }

    /// One round: the service, the processes, the hogs; returns the hogs with what
    /// would be done about each.
    async fn observe(&mut self) -> Vec<(Proc, Duration, Decision)> {
        let Some(mut sampler) = self.sampler.take() else {
            return Vec::new();
        };
        let (sampler, (procs, host_cpu)) = match tokio::task::spawn_blocking(move || {
            let sample = sampler.sample();
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
        let threshold = self.config.cpu_percent;
        let mut seen = HashSet::new();
        for p in procs {
            if p.cpu_percent < threshold || !self.reach.watches(&p) {
                continue;
            }
            seen.insert(p.identity);
            self.above
                .entry(p.identity)
                .and_modify(|a| a.proc = p.clone())
                .or_insert(Above {
                    since: now,
                    proc: p,
                });
        }
        // Above the line in every sample, or not a hog.
        self.above.retain(|identity, _| seen.contains(identity));
        self.acted.retain(|identity| seen.contains(identity));
        self.reported
            .retain(|(identity, _)| seen.contains(identity));
        let sustain = Duration::from_millis(self.config.sustain_ms);
        let hogs: Vec<(Proc, Duration)> = self
            .above
            .values()
            .map(|a| (a.proc.clone(), now.duration_since(a.since)))
            .filter(|(_, held)| *held >= sustain)
            .collect();
        self.metrics
            .hogs
            .set(i64::try_from(hogs.len()).unwrap_or(i64::MAX));
        hogs.into_iter()
            .map(|(p, held)| {
                let decision = self.decide(&p);
                (p, held, decision)
            })
            .collect()
    }

    fn breaker_open(&mut self) -> bool {
        let window = Duration::from_millis(self.config.window_ms);
        while self.kills.front().is_some_and(|t| t.elapsed() > window) {
            self.kills.pop_front();
        }
        let open = self.kills.len() >= usize::try_from(self.config.max_kills).unwrap_or(usize::MAX);
        if !open && self.breaker_alerted {
            self.breaker_alerted = false;
            self.alerts.resolve(
                "doctor_breaker",
                "doctor kills again: the breaker's window has passed",
            );
        }
        open
    }

    fn decide(&mut self, p: &Proc) -> Decision {
        if let Some(why) = self.reach.protection(p) {
            return Decision::Report("protected", format!("not signalled: it {why}"));
        }
        if self.config.mode == Mode::Report {
            return Decision::Report("dry_run", "not signalled: mode = \"report\"".to_owned());
        }
        if self.breaker_open() {
            return Decision::Report(
                "breaker_open",
                format!(
                    "not signalled: {} kills within {} s already (max_kills); something keeps \
                     restarting a hog",
                    self.kills.len(),
                    self.config.window_ms / 1_000
                ),
            );
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
        Decision::Kill
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
        for (p, held, decision) in hogs {
            if self.acted.contains(&p.identity) {
                continue;
            }
            match decision {
                Decision::Report(result, why) => {
                    if !self.reported.insert((p.identity, result)) {
                        continue;
                    }
                    self.metrics.count("report", result);
                    info!(pid = p.identity.pid, user = %p.user, cpu = p.cpu_percent, result, "doctor report");
                    if result == "breaker_open" && !self.breaker_alerted {
                        self.breaker_alerted = true;
                        self.alerts.fire(
                            Severity::Critical,
                            "doctor_breaker",
                            "doctor stopped killing: something keeps restarting a hog",
                            &describe(&p, held, &self.figures, &why),
                        );
                    }
                    self.alerts.notify(
                        Severity::Warning,
                        "doctor_report",
                        &format!(
                            "CPU hog pid {} ({}, user {}) at {:.0}% for {} s: {why}",
                            p.identity.pid,
                            p.name,
                            p.user,
                            p.cpu_percent,
                            held.as_secs()
                        ),
                        &describe(&p, held, &self.figures, &why),
                    );
                }
                Decision::Kill => {
                    self.acted.insert(p.identity);
                    self.kills.push_back(Instant::now());
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
        let outcome = match hold(p.identity, p.uid) {
            Ok(None) => {
                self.metrics.count("sigterm", "gone");
                "the process was gone before any signal (exited, or its PID now belongs to another)"
                    .to_owned()
            }
            Err(error) => {
                self.metrics.count("sigterm", "error");
                format!("could not take hold of it: {error}")
            }
            Ok(Some(handle)) => {
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
                            match handle.send(Signal::KILL) {
                                Ok(sent) => {
                                    self.metrics.count("sigkill", sent.as_str());
                                    let exited = handle.exited_within(Duration::from_secs(5)).await;
                                    format!(
                                        "{log}SIGKILL: {}",
                                        match (sent, exited) {
                                            (Sent::Delivered, true) => "killed".to_owned(),
                                            (Sent::Delivered, false) =>
                                                "sent, still not gone after 5 s".to_owned(),
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
            pid = p.identity.pid,
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
                p.identity.pid,
                p.name,
                p.user,
                p.cpu_percent,
                self.held.as_secs()
            ),
            &details,
        );
    }
}

/// Runs the doctor until `shutdown`: its admin listener, its alert channels, a round
/// every `interval_ms`.
pub async fn run(file: DoctorFile, shutdown: CancellationToken) -> Result<(), DoctorError> {
    let metrics = Arc::new(DoctorMetrics::new());
    let tasks = tokio_util::task::TaskTracker::new();
    let stop = CancellationToken::new();
    let addr = file.doctor.admin_listen;
    let alerts = sidecar::start("doctor", addr, &metrics.own, &file.alerts, &tasks, &stop).await?;
    info!(admin = %addr, proxy_metrics = %file.proxy_metrics_url(), mode = ?file.doctor.mode, "doctor running");
    let mut doctor = Doctor::new(&file, alerts, metrics)?;
    let kills = tokio_util::task::TaskTracker::new();
    let mut tick = tokio::time::interval(Duration::from_millis(file.doctor.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let hogs = doctor.observe().await;
                doctor.act(hogs, &kills);
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
    let mut doctor = Doctor::new(file, alerts, metrics)?;
    let interval = Duration::from_millis(file.doctor.interval_ms);
    let rounds = file.doctor.sustain_ms.div_ceil(file.doctor.interval_ms) + 1;
    let mut hogs = Vec::new();
    for round in 0..=rounds {
        if round > 0 {
            tokio::time::sleep(interval).await;
        }
        hogs = doctor.observe().await;
    }
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
