//! The host resource watch, in the proxy process: host CPU, memory and the disk
//! usage of configured paths, sampled every `interval_ms` off the request path
//! (`spawn_blocking`), exported as gauges, and a warning alert when one stays above
//! its threshold for `sustain_ms` (Monit's "for N cycles"), with the top processes
//! by CPU and by memory; a resolved alert when it ends.
//!
//! The gauges are a contract: the co-located doctor and maintenance read them from
//! this proxy's `/metrics` (`canarygate_host_cpu_ratio`,
//! `canarygate_host_memory_ratio`, `canarygate_host_disk_used_ratio{path}`). The
//! disk figure is `df`'s, the one [`disk`] defines for maintenance too, so
//! `disk_percent` means the same in both processes.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind, Users};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::ops::alerts::{Dispatcher, Severity};
use crate::ops::disk;
use crate::state::AppState;

/// One sample of the host.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub cpu_ratio: f64,
    pub memory_ratio: f64,
    /// Each configured path and its filesystem's used ratio, `df`'s
    /// ([`disk::Usage::ratio`]; absent when the path cannot be read).
    pub disks: Vec<(PathBuf, Option<f64>)>,
}

/// The sampler's state between rounds (CPU usage is measured between two reads).
struct Sampler {
    system: System,
}

impl Sampler {
    fn new() -> Option<Self> {
        System::new().ok().map(|system| Self { system })
    }

    fn sample(&mut self, paths: &[PathBuf]) -> Sample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let total = self.system.total_memory();
        let used = total.saturating_sub(self.system.available_memory());
        Sample {
            cpu_ratio: f64::from(self.system.global_cpu_usage()) / 100.0,
            memory_ratio: ratio(used, total),
            disks: paths
                .iter()
                .map(|p| (p.clone(), disk::Usage::read(p).ok().map(|u| u.ratio())))
                .collect(),
        }
    }

    /// Reads every process's counters: a process's CPU share is measured between
    /// two reads, so this runs each round while a resource is above its threshold
    /// (not always: on a busy host it is the costly part of a sample).
    fn refresh_processes(&mut self) {
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing()
                .with_cpu()
                .with_memory()
                .with_cmd(UpdateKind::OnlyIfNotSet)
                .with_user(UpdateKind::OnlyIfNotSet),
        );
    }

    /// The top five processes by CPU and by memory: pid, user, CPU %, RSS, command
    /// ([`crate::ops::cmdline::sanitize`]d).
    /// CPU shares are measured over a fresh window of `sysinfo`'s minimum interval
    /// (two reads): a process started since the last round has no earlier read and
    /// would show 0% however hard it spins, hiding the very hog that fired the alert.
    fn top_processes(&mut self) -> String {
        self.refresh_processes();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        self.refresh_processes();
        let users = Users::new_with_refreshed_list().ok();
        let mut processes: Vec<_> = self.system.processes().values().collect();
        let mut out = String::new();
        for (title, by_cpu) in [("top by CPU", true), ("top by memory", false)] {
            if by_cpu {
                processes.sort_by(|a, b| b.cpu_usage().total_cmp(&a.cpu_usage()));
            } else {
                processes.sort_by_key(|p| std::cmp::Reverse(p.memory()));
            }
            let _ = writeln!(out, "{title}: pid user cpu% rss command");
            for p in processes.iter().take(5) {
                let user = p
                    .user_id()
                    .and_then(|uid| {
                        users
                            .as_ref()?
                            .get_user_by_id(uid)
                            .map(|u| u.name().to_owned())
                    })
                    .or_else(|| p.user_id().map(|uid| uid.to_string()))
                    .unwrap_or_else(|| "?".to_owned());
                // Other users' argv leaves the host in this alert: cut, secrets
                // redacted, control characters escaped.
                let cmd: Vec<String> = p
                    .cmd()
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect();
                let cmd = if cmd.is_empty() {
                    crate::ops::cmdline::escape(&p.name().to_string_lossy())
                } else {
                    crate::ops::cmdline::sanitize(&cmd)
                };
                let _ = writeln!(
                    out,
                    "  {} {user} {:.0}% {} MiB {}",
                    p.pid(),
                    p.cpu_usage(),
                    p.memory() >> 20,
                    cmd
                );
            }
        }
        out
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    // Byte counts below 2^53 (8 PiB) convert exactly.
    #[allow(clippy::cast_precision_loss)]
    let r = part as f64 / whole as f64;
    r.clamp(0.0, 1.0)
}

/// One watched resource: when it went above its threshold, and whether its alert
/// is firing.
#[derive(Debug, Default)]
struct Spike {
    above_since: Option<Instant>,
    firing: bool,
}

/// What to do about one resource after a sample.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Nothing,
    Fire,
    Resolve,
}

impl Spike {
    fn judge(&mut self, above: bool, now: Instant, sustain: Duration) -> Verdict {
        if !above {
            self.above_since = None;
            return if std::mem::take(&mut self.firing) {
                Verdict::Resolve
            } else {
                Verdict::Nothing
            };
        }
        let since = *self.above_since.get_or_insert(now);
        if self.firing {
            // Still firing: the dispatcher sends it again at most every repeat_ms
            // (until someone acknowledges it).
            return Verdict::Fire;
        }
        if now.duration_since(since) >= sustain {
            self.firing = true;
            return Verdict::Fire;
        }
        Verdict::Nothing
    }
}

/// Runs `work` on the sampler on a blocking thread (it reads /proc), and gives the
/// sampler back; `None` (logged) if the thread panicked.
async fn blocking<T: Send + 'static>(
    mut sampler: Sampler,
    work: impl FnOnce(&mut Sampler) -> T + Send + 'static,
) -> Option<(Sampler, T)> {
    match tokio::task::spawn_blocking(move || {
        let out = work(&mut sampler);
        (sampler, out)
    })
    .await
    {
        Ok(done) => Some(done),
        Err(error) => {
            warn!(%error, "resource sample failed");
            None
        }
    }
}

/// Samples every `interval_ms` (read from the config in force each round) until
/// `cancel`; a failed round logs and goes on.
pub async fn run(state: AppState, alerts: Dispatcher, cancel: CancellationToken) {
    let Some(mut sampler) = Sampler::new() else {
        warn!("resource watch unavailable: cannot read this host's statistics");
        return;
    };
    let mut spikes: [Spike; 3] = Default::default();
    loop {
        let config = state.snapshot().config.resources.clone();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(config.interval_ms)) => {}
        }
        let paths = config.disk_paths.clone();
        let watching = spikes.iter().any(|s| s.above_since.is_some());
        let Some((back, sample)) = blocking(sampler, move |s| {
            if watching {
                s.refresh_processes();
            }
            s.sample(&paths)
        })
        .await
        else {
            // A failed round loses its sampler: start a new one next round.
            match Sampler::new() {
                Some(fresh) => sampler = fresh,
                None => return,
            }
            continue;
        };
        sampler = back;
        state.metrics.observe_host(
            sample.cpu_ratio,
            sample.memory_ratio,
            sample
                .disks
                .iter()
                .filter_map(|(p, r)| Some((p.display().to_string(), (*r)?))),
        );
        let now = Instant::now();
        let sustain = Duration::from_millis(config.sustain_ms);
        let worst_disk = sample
            .disks
            .iter()
            .filter_map(|(p, r)| Some((p, (*r)?)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let judged = [
            (
                "cpu_spike",
                sample.cpu_ratio,
                config.cpu_percent,
                format!("host CPU {:.0}%", sample.cpu_ratio * 100.0),
            ),
            (
                "memory_spike",
                sample.memory_ratio,
                config.memory_percent,
                format!("host memory {:.0}%", sample.memory_ratio * 100.0),
            ),
            (
                "disk_full",
                worst_disk.map_or(0.0, |d| d.1),
                config.disk_percent,
                worst_disk.map_or_else(String::new, |(p, r)| {
                    format!("disk of {} {:.0}% used", p.display(), r * 100.0)
                }),
            ),
        ];
        let mut fire = Vec::new();
        for (spike, (kind, value, percent, what)) in spikes.iter_mut().zip(judged) {
            let above = value * 100.0 > f64::from(percent);
            match spike.judge(above, now, sustain) {
                Verdict::Nothing => {}
                Verdict::Fire => fire.push((
                    kind,
                    format!("{what}, above {percent}% for {} s", sustain.as_secs()),
                )),
                Verdict::Resolve => {
                    alerts.resolve(kind, &format!("{what}, back under {percent}%"));
                }
            }
        }
        if fire.is_empty() {
            continue;
        }
        // Who is using the host (read every round while above a threshold).
        let (back, top) = match blocking(sampler, Sampler::top_processes).await {
            Some(done) => done,
            None => match Sampler::new() {
                Some(fresh) => (fresh, "(process list unavailable)".to_owned()),
                None => return,
            },
        };
        sampler = back;
        for (kind, summary) in fire {
            debug!(kind, "resource spike");
            alerts.fire(Severity::Warning, kind, &summary, &top);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spike_fires_after_sustain_while_it_lasts_and_resolves_once() {
        let sustain = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut spike = Spike::default();
        assert_eq!(spike.judge(true, at(0), sustain), Verdict::Nothing);
        assert_eq!(spike.judge(true, at(29), sustain), Verdict::Nothing);
        // A dip restarts the clock.
        assert_eq!(spike.judge(false, at(30), sustain), Verdict::Nothing);
        assert_eq!(spike.judge(true, at(31), sustain), Verdict::Nothing);
        assert_eq!(spike.judge(true, at(61), sustain), Verdict::Fire);
        assert_eq!(spike.judge(true, at(90), sustain), Verdict::Fire);
        assert_eq!(spike.judge(false, at(95), sustain), Verdict::Resolve);
        assert_eq!(spike.judge(false, at(100), sustain), Verdict::Nothing);
    }

    #[test]
    fn a_sample_reads_this_host() {
        let mut sampler = Sampler::new().unwrap();
        let sample = sampler.sample(&[PathBuf::from("/"), PathBuf::from("/no/such/mount/x")]);
        assert!((0.0..=1.0).contains(&sample.cpu_ratio));
        assert!(sample.memory_ratio > 0.0 && sample.memory_ratio <= 1.0);
        assert!(
            sample.disks[0].1.is_some_and(|r| r > 0.0 && r <= 1.0),
            "{sample:?}"
        );
        assert!(sampler.top_processes().contains("top by CPU"));
    }
}
