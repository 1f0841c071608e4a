//! Maintenance: a process of its own beside the proxy (`canarygate maintenance`)
//! that keeps the disk from filling. When a watched filesystem passes
//! `disk_percent`, it archives log files (an allow-list of names in configured
//! dirs, oldest first) to secondary storage until the filesystem is under
//! `target_percent`; a file holding more than `max_file_bytes` goes whatever the
//! disk. Never a byte lost: each file is streamed through zstd to the store, read
//! back and checked (SHA-256 and length), and only then freed: deleted when no one
//! writes it, or, for a live log, its archived prefix punched out in place (the
//! writer goes on at its offset; logrotate's copytruncate loses the lines written
//! between its copy and its truncate, this does not). "No one writes it" is
//! proven, not guessed, and proven again at the unlink ([`files`]: a write lease,
//! or a `/proc` that shows every process); a punch checks first that the range
//! still holds what was archived. A file that cannot be freed is not archived
//! again until it changes.
//!
//! It is separate from the proxy on purpose: it needs write access to the log
//! dirs, and the internet-facing proxy must not have it. It reads the proxy's
//! `/metrics` each round to defer heavy work while the proxy is busy
//! (`defer_above_rps`, `defer_above_p99_ms`), unless a disk is past
//! `critical_percent`; `statvfs` decides, re-read before each file.
//!
//! - [`files`]: scanning and touching files without following symlinks.
//! - [`plan`]: which files, and why (pure).
//! - [`archive`]: the store, the archive, the read-back.

pub mod archive;
pub mod files;
mod free;
#[allow(unsafe_code)]
pub mod lease;
pub mod plan;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::alerts::Severity;
use crate::config::maintenance::{MaintenanceConfig, MaintenanceFile};
use crate::ops::alerts::Dispatcher;
use crate::ops::service::{self, Figures, Scrape};
use crate::ops::sidecar::{self, SidecarError, SidecarMetrics};
use archive::{ArchiveError, Archived, Target, TargetError};
use files::{Candidate, FileError, FileId, Usage};
use free::{Backoff, Freed, Stuck, free_file};
use plan::{Item, Limits, Why};

/// Why maintenance could not start.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(transparent)]
    Start(#[from] SidecarError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// Without a SIGIO handler a lease broken by an `open` elsewhere would end the
    /// process (SIGIO's default action).
    #[error("cannot handle SIGIO (needed for write leases): {0}")]
    Signal(std::io::Error),
}

/// `canarygate_maintenance_*`, in the process's own registry.
struct MaintenanceMetrics {
    own: Arc<SidecarMetrics>,
    archived_files: IntCounter,
    archived_bytes: IntCounter,
    stored_bytes: IntCounter,
    freed_bytes: IntCounter,
    failures: IntCounterVec,
    deferred: IntCounter,
    disk_used: GaugeVec,
    proxy_up: IntGauge,
    last_round: IntGauge,
    rounds: IntCounter,
}

impl MaintenanceMetrics {
    fn new() -> Self {
        let own = Arc::new(SidecarMetrics::default());
        let metrics = Self {
            archived_files: own.total(
                "canarygate_maintenance_archived_files_total",
                "Files (or live logs' prefixes) archived and verified.",
            ),
            archived_bytes: own.total(
                "canarygate_maintenance_archived_bytes_total",
                "Bytes of files archived (before compression).",
            ),
            stored_bytes: own.total(
                "canarygate_maintenance_stored_bytes_total",
                "Bytes written to secondary storage (compressed).",
            ),
            freed_bytes: own.total(
                "canarygate_maintenance_freed_bytes_total",
                "Bytes freed on disk: files deleted (proven closed) and ranges punched out \
                 (verified to hold what was archived). A file that could not be freed, or \
                 has more than one name, adds nothing.",
            ),
            failures: own.counter(
                "canarygate_maintenance_failures_total",
                "Failures by stage: scan, statvfs, read, upload, verify, delete, punch.",
                &["stage"],
            ),
            deferred: own.total(
                "canarygate_maintenance_deferred_total",
                "Rounds whose archiving waited because the proxy was busy.",
            ),
            disk_used: own.gauge_vec(
                "canarygate_maintenance_disk_used_ratio",
                "Used share of the filesystem holding each maintenance.dirs entry (statvfs), \
                 0..1.",
                &["dir"],
            ),
            proxy_up: own.gauge(
                "canarygate_maintenance_proxy_metrics_up",
                "1 if the proxy's /metrics answered at the last round, else 0.",
            ),
            rounds: own.total(
                "canarygate_maintenance_rounds_total",
                "Rounds done (dry runs aside).",
            ),
            last_round: own.gauge(
                "canarygate_maintenance_last_round_timestamp_seconds",
                "When the last round ended (Unix seconds).",
            ),
            own,
        };
        for stage in [
            "scan", "statvfs", "read", "upload", "verify", "delete", "punch",
        ] {
            metrics.failures.with_label_values(&[stage]);
        }
        metrics
    }

    fn fail(&self, stage: &str) {
        self.failures.with_label_values(&[stage]).inc();
    }
}

/// The shortest span the proxy's rates are measured over.
const MIN_SPAN: Duration = Duration::from_millis(250);

/// How often the proxy's metrics are read between rounds (at most).
const PROXY_WATCH: Duration = Duration::from_secs(5);

/// Whether the proxy's `canarygate_host_disk_used_ratio{path}` shows, for a path that
/// is one of `dirs` or holds one, a filesystem at or past `disk_percent`.
fn proxy_sees_full(disks: &[(String, f64)], dirs: &[PathBuf], disk_percent: f64) -> bool {
    disks.iter().any(|(path, ratio)| {
        ratio * 100.0 >= disk_percent && dirs.iter().any(|d| d.starts_with(path))
    })
}

/// What one round saw and did, for `--once` and the logs.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub archived: usize,
    pub failed: usize,
    /// Bytes freed on disk.
    pub freed: u64,
}

impl Report {
    fn line(&mut self, line: String) {
        self.lines.push(line);
    }
}

/// Everything maintenance keeps between rounds.
struct Maintenance {
    config: MaintenanceConfig,
    host: String,
    url: String,
    target: Target,
    http: reqwest::Client,
    metrics: Arc<MaintenanceMetrics>,
    alerts: Dispatcher,
    backoff: HashMap<FileId, Backoff>,
    /// Files archived but not freed: archiving them again would only copy the same
    /// bytes again.
    cannot_free: HashMap<FileId, Stuck>,
    /// Keeps SIGIO (a lease being broken) from ending the process.
    _sigio: tokio::signal::unix::Signal,
    last_scrape: Option<Scrape>,
    figures: Option<Figures>,
    /// Whether the proxy's disk gauge showed a dir's filesystem past `disk_percent`.
    proxy_full: bool,
    critical_alerted: bool,
    failure_alerted: bool,
}

/// Each configured dir and its filesystem's usage.
type PerDir = Vec<(PathBuf, Result<Usage, FileError>)>;

/// A candidate with what the round knows of it.
struct Seen {
    candidate: Candidate,
    /// `Err(why)` when it is live: not proven closed, or written within settle_ms.
    closed: Result<&'static str, String>,
}

impl Seen {
    fn live(&self) -> bool {
        self.closed.is_err()
    }
}

impl Maintenance {
    fn new(
        file: &MaintenanceFile,
        alerts: Dispatcher,
        metrics: Arc<MaintenanceMetrics>,
    ) -> Result<Self, MaintenanceError> {
        let config = file.maintenance.clone();
        Ok(Self {
            host: config
                .host
                .clone()
                .unwrap_or_else(crate::ops::alerts::alert::hostname),
            url: file.proxy_metrics_url(),
            target: Target::new(&config)?,
            http: reqwest::Client::builder().build()?,
            config,
            metrics,
            alerts,
            backoff: HashMap::new(),
            cannot_free: HashMap::new(),
            _sigio: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::io())
                .map_err(MaintenanceError::Signal)?,
            last_scrape: None,
            figures: None,
            proxy_full: false,
            critical_alerted: false,
            failure_alerted: false,
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            disk_percent: self.config.disk_percent,
            target_percent: self.config.target_percent,
            max_file_bytes: self.config.max_file_bytes,
        }
    }

    /// Reads the proxy's metrics: its figures since the last scrape (none when they
    /// cannot be read, or at the first scrape). True when the proxy's disk gauge for
    /// a path holding one of the dirs has just crossed `disk_percent`: the early
    /// signal to start a round now.
    async fn read_proxy(&mut self, report: &mut Report) -> bool {
        match service::scrape(&self.http, &self.url).await {
            Ok(scrape) => {
                self.metrics.proxy_up.set(1);
                let full =
                    proxy_sees_full(&scrape.disks, &self.config.dirs, self.config.disk_percent);
                let crossed = full && !self.proxy_full;
                self.proxy_full = full;
                let disks: Vec<String> = scrape
                    .disks
                    .iter()
                    .map(|(path, ratio)| format!("{path} {:.1}%", ratio * 100.0))
                    .collect();
                if !disks.is_empty() {
                    report.line(format!("proxy sees disks: {}", disks.join(", ")));
                }
                // Rates need a span: two scrapes milliseconds apart (a round right
                // after the watch's) would say 0 req/s. The older one stays the
                // baseline until MIN_SPAN has passed.
                match &self.last_scrape {
                    Some(older) if scrape.at.duration_since(older.at) < MIN_SPAN => {}
                    older => {
                        self.figures = older.as_ref().map(|o| Figures::between(o, &scrape));
                        self.last_scrape = Some(scrape);
                    }
                }
                crossed
            }
            Err(error) => {
                if self.metrics.proxy_up.get() != 0 {
                    warn!(url = %self.url, %error, "proxy metrics unreadable; not deferring");
                }
                report.line(format!(
                    "proxy metrics unreadable ({error}): never deferring"
                ));
                self.last_scrape = None;
                self.figures = None;
                self.proxy_full = false;
                self.metrics.proxy_up.set(0);
                false
            }
        }
    }

    /// Why heavy work should wait now, if it should.
    fn busy(&self) -> Option<String> {
        let f = self.figures?;
        if let Some(limit) = self.config.defer_above_rps
            && f.all_requests_per_s > limit
        {
            return Some(format!(
                "the proxy serves {:.1} req/s (defer_above_rps {limit})",
                f.all_requests_per_s
            ));
        }
        if let Some(limit) = self.config.defer_above_p99_ms
            && let Some(p99) = f.p99_ms
            && p99 > crate::canary::stats::to_f64(limit)
        {
            return Some(format!(
                "the proxy's production p99 is {p99:.1} ms (defer_above_p99_ms {limit})"
            ));
        }
        None
    }

    /// The dirs' filesystems now, by device; and each dir's (for the gauges).
    fn usage(&self) -> (HashMap<u64, Usage>, PerDir) {
        let per_dir: Vec<_> = self
            .config
            .dirs
            .iter()
            .map(|d| (d.clone(), files::usage(d)))
            .collect();
        let by_dev = per_dir
            .iter()
            .filter_map(|(_, u)| u.as_ref().ok().map(|u| (u.dev, *u)))
            .collect();
        (by_dev, per_dir)
    }

    /// One round. `dry_run`: say what would be done, touch nothing.
    async fn round(&mut self, dry_run: bool, cancel: &CancellationToken) -> Report {
        let mut report = Report::default();
        self.read_proxy(&mut report).await;
        let config = self.config.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            let scan = files::scan(&config.dirs, &config.patterns, &config.exclude);
            let wanted: HashSet<FileId> = scan.candidates.iter().map(|c| c.shape.id).collect();
            let writers = files::open_for_writing(&wanted);
            let closed: Vec<_> = scan.candidates.iter().map(|c| c.closed(&writers)).collect();
            (scan, writers.unreadable, closed)
        })
        .await;
        let Ok((scan, unreadable, closed)) = scanned else {
            self.metrics.fail("scan");
            report.line("scanning failed (the task panicked)".to_owned());
            return report;
        };
        for problem in &scan.problems {
            self.metrics.fail("scan");
            warn!(%problem, "maintenance scan");
            report.line(format!("scan: {problem}"));
        }
        if unreadable > 0 {
            report.line(format!(
                "{unreadable} processes' open files unreadable (other users'): a file is deleted \
                 only under a write lease (its owner, or CAP_LEASE), else treated as live"
            ));
        }
        for (root, path, links) in &scan.linked {
            report.line(format!(
                "{}: {links} names (hard links): never archived, punched or deleted",
                self.config.dirs[*root].join(path).display()
            ));
        }
        let (usage, per_dir) = self.usage();
        for (dir, u) in &per_dir {
            match u {
                Ok(u) => {
                    self.metrics
                        .disk_used
                        .with_label_values(&[&dir.display().to_string()])
                        .set(u.ratio());
                    report.line(format!("{}: {:.1}% used", dir.display(), u.percent()));
                }
                Err(e) => {
                    self.metrics.fail("statvfs");
                    report.line(format!("{}: statvfs failed: {e}", dir.display()));
                }
            }
        }
        let now_system = SystemTime::now();
        let settle = Duration::from_millis(self.config.settle_ms);
        let now = Instant::now();
        let mut seen: Vec<Seen> = Vec::new();
        for (candidate, closed) in scan.candidates.into_iter().zip(closed) {
            if let Some(stuck) = self.cannot_free.get(&candidate.shape.id) {
                if stuck.holds(&candidate.shape, now) {
                    report.line(format!(
                        "{}: archived before but not freed ({}): not archived again until it \
                         changes",
                        candidate.display_path(&self.config.dirs).display(),
                        stuck.why
                    ));
                    continue;
                }
                self.cannot_free.remove(&candidate.shape.id);
            }
            let recent = now_system
                .duration_since(candidate.shape.modified)
                .map_or(true, |age| age < settle);
            let closed = match closed {
                Ok(_) if recent => Err("written to within settle_ms".to_owned()),
                other => other,
            };
            seen.push(Seen { candidate, closed });
        }
        let items: Vec<Item> = seen
            .iter()
            .map(|s| Item {
                dev: s.candidate.shape.id.dev,
                allocated: s.candidate.shape.allocated,
                modified: s.candidate.shape.modified,
                waiting: self
                    .backoff
                    .get(&s.candidate.shape.id)
                    .is_some_and(|b| b.until > now),
            })
            .collect();
        let picks = plan::plan(&items, &usage, self.limits());
        let critical = usage
            .values()
            .any(|u| u.percent() >= self.config.critical_percent);
        if picks.is_empty() {
            report.line(format!("nothing to archive ({} candidates)", seen.len()));
        } else if let Some(why) = self.busy().filter(|_| !critical) {
            self.metrics.deferred.inc();
            info!(files = picks.len(), %why, "maintenance deferred");
            report.line(format!(
                "deferred {} files: {why}; no disk is past critical_percent {}",
                picks.len(),
                self.config.critical_percent
            ));
        } else if dry_run {
            for (i, why) in &picks {
                let s = &seen[*i];
                report.line(format!(
                    "would archive {} ({} bytes, {} on disk, {}): {why}",
                    s.candidate.display_path(&self.config.dirs).display(),
                    s.candidate.shape.size,
                    s.candidate.shape.allocated,
                    match &s.closed {
                        Err(why) =>
                            format!("live ({why}): its archived prefix would be punched out"),
                        Ok(how) => format!("closed ({how}): it would be deleted"),
                    }
                ));
            }
        } else {
            self.execute(&seen, &picks, &mut report, cancel).await;
        }
        if !dry_run {
            self.after_round(&report);
        }
        report
    }

    /// Archives and frees the picks in order, re-reading the filesystem before each
    /// file picked for the disk (it stops once under target).
    async fn execute(
        &mut self,
        seen: &[Seen],
        picks: &[(usize, Why)],
        report: &mut Report,
        cancel: &CancellationToken,
    ) {
        for (i, why) in picks {
            if cancel.is_cancelled() {
                break;
            }
            let s = &seen[*i];
            let path = s.candidate.display_path(&self.config.dirs);
            if let Why::Disk { .. } = why {
                let dir = &self.config.dirs[s.candidate.root];
                match files::usage(dir) {
                    Ok(u) if u.percent() < self.config.target_percent => {
                        report.line(format!(
                            "{}: {:.1}% used, under target_percent: skipped {}",
                            dir.display(),
                            u.percent(),
                            path.display()
                        ));
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.metrics.fail("statvfs");
                        report.line(format!("{}: statvfs failed: {e}", dir.display()));
                        continue;
                    }
                }
            }
            let object = archive::object_name(&self.host, &s.candidate.inside, SystemTime::now());
            let job = (
                self.target.clone(),
                s.candidate.clone(),
                s.live(),
                object,
                self.config.compression_level,
            );
            let handle = tokio::runtime::Handle::current();
            let outcome = tokio::task::spawn_blocking(move || {
                let (target, candidate, live, object, level) = job;
                let archived = archive::archive(&handle, &target, &candidate, live, &object, level);
                let freed = match &archived {
                    Ok(Some(done)) => Some(free_file(&candidate, live, done)),
                    _ => None,
                };
                (candidate, archived, freed)
            })
            .await;
            let (candidate, archived, freed) = match outcome {
                Ok(done) => done,
                Err(e) => {
                    self.metrics.fail("read");
                    report.line(format!("{}: the archive task failed: {e}", path.display()));
                    report.failed += 1;
                    continue;
                }
            };
            match archived {
                Ok(None) => report.line(format!("{}: nothing new to archive", path.display())),
                Ok(Some(done)) => {
                    let freed = freed.unwrap_or(Err(("delete", FileError::Changed)));
                    self.freed(freed, &done, &path, why, report);
                }
                Err(e) => self.failed(&candidate, &path, &e, report),
            }
        }
    }

    /// Accounts for a verified archive and what freeing it did.
    fn freed(
        &mut self,
        freed: Freed,
        done: &Archived,
        path: &std::path::Path,
        why: &Why,
        report: &mut Report,
    ) {
        let bytes = done.end - done.start;
        self.backoff.remove(&done.shape.id);
        self.metrics.archived_files.inc();
        self.metrics.archived_bytes.inc_by(bytes);
        self.metrics.stored_bytes.inc_by(done.stored_bytes);
        report.archived += 1;
        let (stage, e) = match freed {
            Ok((how, freed)) => {
                self.metrics.freed_bytes.inc_by(freed);
                report.freed += freed;
                info!(
                    path = %path.display(),
                    object = %done.object,
                    bytes,
                    stored = done.stored_bytes,
                    freed,
                    sha256 = %done.sha256,
                    why = %why,
                    how,
                    "archived"
                );
                report.line(format!(
                    "archived {} bytes {}..{} to {} ({} stored, verified): {how}; {why}",
                    path.display(),
                    done.start,
                    done.end,
                    done.object,
                    done.stored_bytes
                ));
                return;
            }
            Err(failed) => failed,
        };
        // The file changed under the archive (truncated, rewritten, replaced): the
        // archive holds what was there; what is there now is the next round's.
        if matches!(
            e,
            FileError::Truncated { .. } | FileError::Rewritten | FileError::Replaced
        ) {
            warn!(path = %path.display(), object = %done.object, error = %e, "archived, not freed");
            report.line(format!(
                "archived {} to {} (verified), not freed: {e}",
                path.display(),
                done.object
            ));
            return;
        }
        self.metrics.fail(stage);
        report.failed += 1;
        let base = Duration::from_millis(self.config.retry_backoff_ms);
        let previous = self.cannot_free.get(&done.shape.id).map(|s| s.backoff);
        self.cannot_free.insert(
            done.shape.id,
            Stuck {
                size: done.shape.size,
                modified: done.shape.modified,
                links: done.shape.links,
                backoff: Backoff::fail(previous, base),
                forever: matches!(e, FileError::NoPunch),
                why: e.to_string(),
            },
        );
        warn!(path = %path.display(), object = %done.object, error = %e, "archived, not freed");
        report.line(format!(
            "archived {} to {} (verified) but could not free it: {e}; not archived again until \
             it changes",
            path.display(),
            done.object
        ));
        self.alerts.notify(
            Severity::Warning,
            "maintenance_cannot_free",
            &format!(
                "maintenance archived {} but could not free it: {e}",
                path.display()
            ),
            &format!(
                "archive: {} (verified, bytes {}..{})\nthe file is left as it is",
                done.object, done.start, done.end
            ),
        );
    }

    /// A failed archive: the file is untouched; it waits, doubling, before the next
    /// try.
    fn failed(
        &mut self,
        candidate: &Candidate,
        path: &std::path::Path,
        e: &ArchiveError,
        report: &mut Report,
    ) {
        self.metrics.fail(e.stage());
        report.failed += 1;
        let base = Duration::from_millis(self.config.retry_backoff_ms);
        let entry = Backoff::fail(self.backoff.get(&candidate.shape.id).copied(), base);
        self.backoff.insert(candidate.shape.id, entry);
        let wait = entry.until.saturating_duration_since(Instant::now());
        warn!(path = %path.display(), stage = e.stage(), error = %e, retry_s = wait.as_secs(), "archive failed; file untouched");
        report.line(format!(
            "{}: {e}; the file is untouched; next try in {} s",
            path.display(),
            wait.as_secs()
        ));
    }

    /// Alerts at the end of a round: failures (warning), a disk still past critical
    /// (critical); resolved when they end.
    fn after_round(&mut self, report: &Report) {
        if report.failed > 0 {
            self.failure_alerted = true;
            let details: Vec<&str> = report.lines.iter().map(String::as_str).collect();
            self.alerts.fire(
                Severity::Warning,
                "maintenance_archive_failed",
                &format!(
                    "maintenance: {} files could not be archived or freed (left untouched, retried \
                     with backoff)",
                    report.failed
                ),
                &details.join("\n"),
            );
        } else if self.failure_alerted {
            self.failure_alerted = false;
            self.alerts.resolve(
                "maintenance_archive_failed",
                "maintenance archives again without failures",
            );
        }
        let (_, per_dir) = self.usage();
        let critical: Vec<String> = per_dir
            .iter()
            .filter_map(|(dir, u)| {
                u.as_ref()
                    .ok()
                    .filter(|u| u.percent() >= self.config.critical_percent)
                    .map(|u| format!("{} {:.1}%", dir.display(), u.percent()))
            })
            .collect();
        if critical.is_empty() {
            if self.critical_alerted {
                self.critical_alerted = false;
                self.alerts.resolve(
                    "maintenance_disk_critical",
                    "the disk is under critical_percent again",
                );
            }
        } else {
            self.critical_alerted = true;
            self.alerts.fire(
                Severity::Critical,
                "maintenance_disk_critical",
                &format!(
                    "disk past {}% after archiving: {}",
                    self.config.critical_percent,
                    critical.join(", ")
                ),
                &report.lines.join("\n"),
            );
        }
        self.metrics.rounds.inc();
        self.metrics
            .last_round
            .set(i64::try_from(crate::clock::unix_ms() / 1_000).unwrap_or(i64::MAX));
    }
}

/// Runs maintenance until `shutdown`: its admin listener, its alert channels, a
/// round every `interval_ms`. A file being archived at shutdown is finished.
pub async fn run(
    file: MaintenanceFile,
    shutdown: CancellationToken,
) -> Result<(), MaintenanceError> {
    let metrics = Arc::new(MaintenanceMetrics::new());
    let tasks = tokio_util::task::TaskTracker::new();
    let stop = CancellationToken::new();
    let addr = file.maintenance.admin_listen;
    let alerts = sidecar::start(
        "maintenance",
        addr,
        &metrics.own,
        &file.alerts,
        &tasks,
        &stop,
    )
    .await?;
    let mut maintenance = Maintenance::new(&file, alerts, metrics)?;
    info!(
        admin = %addr,
        target = %maintenance.target.url,
        dirs = ?file.maintenance.dirs,
        proxy_metrics = %maintenance.url,
        "maintenance running"
    );
    // A first scrape now, so the first round knows the proxy's rate (two scrapes).
    // A disk already past the line at start is acted on at the next scrape.
    let mut full_at_start = maintenance.read_proxy(&mut Report::default()).await;
    let interval = Duration::from_millis(file.maintenance.interval_ms);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Between rounds the proxy's metrics are read more often: its disk gauge crossing
    // disk_percent starts a round at once, and the rate deferral judges is recent.
    let every = interval.min(PROXY_WATCH);
    let mut watch = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let early = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => false,
            _ = watch.tick() => {
                let crossed = maintenance.read_proxy(&mut Report::default()).await;
                let still_full = std::mem::take(&mut full_at_start) && maintenance.proxy_full;
                if !(crossed || still_full) {
                    continue;
                }
                info!("the proxy's disk gauge crossed disk_percent: a round now");
                tick.reset();
                true
            }
        };
        let report = maintenance.round(false, &shutdown).await;
        if early || report.archived > 0 || report.failed > 0 {
            info!(
                archived = report.archived,
                failed = report.failed,
                early,
                "maintenance round"
            );
        }
    }
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    info!("maintenance stopped");
    Ok(())
}

/// `canarygate maintenance --once [--dry-run]`: one round (with `dry_run`, what it
/// would archive and why, touching nothing); the report's text. No alert is sent.
pub async fn once(file: &MaintenanceFile, dry_run: bool) -> Result<String, MaintenanceError> {
    let metrics = Arc::new(MaintenanceMetrics::new());
    let alerts = sidecar::silent(&metrics.own);
    let mut maintenance = Maintenance::new(file, alerts, metrics)?;
    let report = maintenance.round(dry_run, &CancellationToken::new()).await;
    let mut out = format!(
        "maintenance --once{}: target {}\n",
        if dry_run {
            " --dry-run (nothing touched)"
        } else {
            ""
        },
        maintenance.target.url
    );
    for line in &report.lines {
        let _ = writeln!(out, "{line}");
    }
    if !dry_run {
        let _ = writeln!(
            out,
            "archived {}, failed {}, freed {} bytes",
            report.archived, report.failed, report.freed
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxys_disk_gauge_signals_only_for_the_dirs_filesystems() {
        let dirs = [PathBuf::from("/var/log/app")];
        let disk = |path: &str, ratio: f64| vec![(path.to_owned(), ratio)];
        assert!(proxy_sees_full(&disk("/var/log", 0.9), &dirs, 85.0));
        assert!(proxy_sees_full(&disk("/", 0.85), &dirs, 85.0));
        assert!(proxy_sees_full(&disk("/var/log/app", 0.99), &dirs, 85.0));
        assert!(!proxy_sees_full(&disk("/var/log", 0.8), &dirs, 85.0));
        // Another filesystem's path, or a sibling with a common prefix: no signal.
        assert!(!proxy_sees_full(&disk("/data", 0.99), &dirs, 85.0));
        assert!(!proxy_sees_full(&disk("/var/lo", 0.99), &dirs, 85.0));
        assert!(!proxy_sees_full(&[], &dirs, 85.0));
    }
}
