//! The dispatcher: noise control, then one bounded queue and one task per channel.
//!
//! Noise control, per alert kind (as Alertmanager groups by alertname): the first
//! firing alert of an episode is sent; while it keeps firing, again at most every
//! `repeat_ms`; when it is resolved, one resolved message (only if something was
//! sent for it), with the episode's id. Each channel's queue holds at most
//! [`QUEUE`] alerts, so a dead channel costs memory for 64 alerts and nobody
//! waits. A full queue drops the least severe alert it holds (the oldest of them),
//! or the newcomer when it is less severe than everything queued: a flood of
//! warnings (refused SMS, say) can never push out a critical one, while the
//! queue holds anything less severe (`victim`). A failed send is tried three
//! times with doubling delays, then logged and counted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::alerts::AlertsConfig;
use crate::observe::events::{Events, Level, Source};
use crate::ops::alerts::channels::{Channel, SendError};
use crate::ops::alerts::{Alert, AlertState, Severity};

/// Alerts waiting per channel; past it the least severe is dropped.
pub const QUEUE: usize = 64;
/// Tries per alert and channel.
const TRIES: u32 = 3;
/// The longest wait between two tries.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Sends alerts; cheap to clone (shared).
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    /// `repeat_ms`, which a reload may change.
    repeat_ms: AtomicU64,
    instance: String,
    episodes: Mutex<HashMap<String, Episode>>,
    /// The channels' queues; a reload swaps in a new set at once
    /// ([`Dispatcher::reconfigure`]).
    queues: ArcSwap<Vec<Arc<Queue>>>,
    counter: IntCounterVec,
    events: Arc<Events>,
}

/// A kind that is firing: its alert as last sent, and when.
struct Episode {
    alert: Alert,
    sent_at: Instant,
    /// Someone acknowledged it (`ACK <id>` by SMS): no more repeats this episode.
    acked: bool,
}

struct Queue {
    channel: &'static str,
    min_severity: Severity,
    items: Mutex<VecDeque<Alert>>,
    ready: Notify,
    /// Cancelled when a reload replaces this channel: its task ends.
    retired: CancellationToken,
}

/// A channel's sending loop, to be spawned ([`ChannelTask::run`]).
pub struct ChannelTask {
    channel: Channel,
    queue: Arc<Queue>,
    counter: IntCounterVec,
    retry_base: Duration,
}

impl Dispatcher {
    /// A dispatcher for `config`'s channels, and their tasks. Alerts raised before
    /// the tasks run wait in the queues.
    pub fn new(
        config: &AlertsConfig,
        instance: &str,
        counter: IntCounterVec,
        events: Arc<Events>,
    ) -> Result<(Self, Vec<ChannelTask>), SendError> {
        let (queues, tasks) = channel_tasks(config, &counter)?;
        let inner = Inner {
            repeat_ms: AtomicU64::new(config.repeat_ms),
            instance: instance.to_owned(),
            episodes: Mutex::new(HashMap::new()),
            queues: ArcSwap::from_pointee(queues),
            counter,
            events,
        };
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            tasks,
        ))
    }

    /// A reload's `[alerts]`: the new channels replace the old ones at once (alerts
    /// waiting for a channel of the same name move to its new queue; the old tasks
    /// end), and `repeat_ms` applies to the next repeat. On an error (a channel that
    /// cannot be built) nothing changes. The new channels' tasks, to be spawned, and
    /// their names.
    pub fn reconfigure(&self, config: &AlertsConfig) -> Result<Vec<ChannelTask>, SendError> {
        let inner = &self.inner;
        let (queues, tasks) = channel_tasks(config, &inner.counter)?;
        inner.repeat_ms.store(config.repeat_ms, Ordering::Relaxed);
        let old = inner.queues.swap(Arc::new(queues));
        let new = inner.queues.load();
        for queue in old.iter() {
            queue.retired.cancel();
            let waiting: Vec<Alert> = lock(&queue.items).drain(..).collect();
            if let Some(successor) = new.iter().find(|q| q.channel == queue.channel) {
                let mut items = lock(&successor.items);
                for alert in &waiting {
                    push_bounded(&mut items, alert, QUEUE);
                }
                drop(items);
                successor.ready.notify_one();
            }
        }
        Ok(tasks)
    }

    fn repeat(&self) -> Duration {
        Duration::from_millis(self.inner.repeat_ms.load(Ordering::Relaxed))
    }

    /// `kind` is firing: sent now if it is new or was last sent `repeat_ms` ago.
    pub fn fire(&self, severity: Severity, kind: &str, summary: &str, details: &str) {
        let inner = &self.inner;
        let alert = {
            let mut episodes = lock(&inner.episodes);
            match episodes.get_mut(kind) {
                Some(episode) if episode.acked => {
                    debug!(kind, id = %episode.alert.id, "alert still firing; acknowledged");
                    return;
                }
                Some(episode) if episode.sent_at.elapsed() < self.repeat() => {
                    debug!(kind, "alert still firing; repeat not due");
                    return;
                }
                Some(episode) => {
                    let mut alert =
                        Alert::firing(severity, kind, summary, details, &inner.instance);
                    alert.id.clone_from(&episode.alert.id);
                    episode.alert = alert.clone();
                    episode.sent_at = Instant::now();
                    alert
                }
                None => {
                    let alert = Alert::firing(severity, kind, summary, details, &inner.instance);
                    episodes.insert(
                        kind.to_owned(),
                        Episode {
                            alert: alert.clone(),
                            sent_at: Instant::now(),
                            acked: false,
                        },
                    );
                    alert
                }
            }
        };
        let level = if severity >= Severity::Warning {
            Level::Warn
        } else {
            Level::Info
        };
        let line = format!(
            "{} {} [{}] {} (since {})",
            alert.severity.as_str(),
            alert.kind,
            alert.id,
            alert.summary,
            alert.time
        );
        inner.events.set_firing(kind, Some(line));
        inner.events.report(
            Source::Alerts,
            level,
            "alert firing",
            format_args!("{} [{}] {}", alert.kind, alert.id, alert.summary),
        );
        self.enqueue(&alert);
    }

    /// Silences the repeats of the firing episode whose id is `id` (an operator's
    /// `ACK`); its resolved message still goes out. The episode's kind and summary,
    /// or `None` when no firing alert has that id.
    pub fn ack(&self, id: &str) -> Option<(String, String)> {
        let mut episodes = lock(&self.inner.episodes);
        let (kind, episode) = episodes
            .iter_mut()
            .find(|(_, e)| e.alert.id.eq_ignore_ascii_case(id))?;
        episode.acked = true;
        Some((kind.clone(), episode.alert.summary.clone()))
    }

    /// A one-off event (an action taken, not a condition that lasts): sent every
    /// time, with no repeat suppression and no resolved message to follow.
    pub fn notify(&self, severity: Severity, kind: &str, summary: &str, details: &str) {
        self.notify_except(None, severity, kind, summary, details);
    }

    /// [`Dispatcher::notify`] to every channel but `skip` (an SMS command's audit
    /// goes to the other channels: the sender has the reply).
    pub fn notify_except(
        &self,
        skip: Option<&str>,
        severity: Severity,
        kind: &str,
        summary: &str,
        details: &str,
    ) {
        let inner = &self.inner;
        let alert = Alert::firing(severity, kind, summary, details, &inner.instance);
        inner.events.report(
            Source::Alerts,
            if severity >= Severity::Warning {
                Level::Warn
            } else {
                Level::Info
            },
            "alert sent",
            format_args!("{} [{}] {}", alert.kind, alert.id, alert.summary),
        );
        self.enqueue_except(&alert, skip);
    }

    /// `kind` is no longer firing: one resolved message, if it was firing.
    pub fn resolve(&self, kind: &str, summary: &str) {
        let Some(episode) = lock(&self.inner.episodes).remove(kind) else {
            return;
        };
        let mut alert = episode.alert;
        alert.state = AlertState::Resolved;
        alert.summary = summary.to_owned();
        alert.time = crate::ops::alerts::alert::now_rfc3339();
        self.inner.events.set_firing(kind, None);
        self.inner.events.report(
            Source::Alerts,
            Level::Info,
            "alert resolved",
            format_args!("{} [{}] {}", alert.kind, alert.id, alert.summary),
        );
        self.enqueue(&alert);
    }

    fn enqueue(&self, alert: &Alert) {
        self.enqueue_except(alert, None);
    }

    fn enqueue_except(&self, alert: &Alert, skip: Option<&str>) {
        for queue in self.inner.queues.load().iter() {
            if alert.severity < queue.min_severity || skip == Some(queue.channel) {
                continue;
            }
            let dropped = push_bounded(&mut lock(&queue.items), alert, QUEUE);
            if let Some(dropped) = dropped {
                warn!(channel = queue.channel, id = %dropped.id, kind = %dropped.kind, severity = dropped.severity.as_str(), "alert queue full; least severe dropped");
                self.inner
                    .counter
                    .with_label_values(&[queue.channel, "dropped"])
                    .inc();
            }
            queue.ready.notify_one();
        }
    }
}

/// Which alert a full queue gives up for `incoming`: the index of the oldest of the
/// least severe queued, or `None` for `incoming` itself when it is less severe than
/// everything queued. A tie with the newcomer drops the queued one (older news).
fn victim(items: &VecDeque<Alert>, incoming: Severity) -> Option<usize> {
    let (index, lowest) = items
        .iter()
        .enumerate()
        .min_by_key(|(i, a)| (a.severity, *i))?;
    (lowest.severity <= incoming).then_some(index)
}

/// Queues `alert` in `items` holding at most `max`; what was dropped, if anything.
fn push_bounded(items: &mut VecDeque<Alert>, alert: &Alert, max: usize) -> Option<Alert> {
    if items.len() < max {
        items.push_back(alert.clone());
        return None;
    }
    match victim(items, alert.severity) {
        None => Some(alert.clone()),
        Some(index) => {
            let dropped = items.remove(index);
            items.push_back(alert.clone());
            dropped
        }
    }
}

impl ChannelTask {
    pub fn channel(&self) -> &'static str {
        self.queue.channel
    }

    /// Sends what its queue receives until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let next = lock(&self.queue.items).pop_front();
            let Some(alert) = next else {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = self.queue.retired.cancelled() => return,
                    () = self.queue.ready.notified() => continue,
                }
            };
            // A reload does not cut a delivery under way: the alert it holds is no
            // longer in any queue, so cutting it would lose it.
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.deliver(&alert) => {}
            }
        }
    }

    /// Up to [`TRIES`] sends, with doubling delays; the outcome counted.
    async fn deliver(&mut self, alert: &Alert) {
        let name = self.queue.channel;
        let mut delay = self.retry_base;
        for attempt in 1..=TRIES {
            match self.channel.send(alert).await {
                Ok(()) => return self.count("sent"),
                Err(SendError::Suppressed) => {
                    debug!(channel = name, id = %alert.id, "alert suppressed by the SMS cap");
                    return self.count("suppressed");
                }
                Err(error) if attempt < TRIES => {
                    debug!(channel = name, id = %alert.id, attempt, %error, "alert send failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
                Err(error) => {
                    warn!(channel = name, id = %alert.id, kind = %alert.kind, %error, "alert not sent");
                    return self.count("failed");
                }
            }
        }
    }

    fn count(&self, result: &str) {
        self.counter
            .with_label_values(&[self.queue.channel, result])
            .inc();
    }
}

/// Sends one info alert through every channel of `config`, ignoring min_severity
/// and the SMS cap's history (`canarygate alert-test`): each channel's name and
/// outcome.
pub async fn send_test(
    config: &AlertsConfig,
    instance: &str,
) -> Result<Vec<(&'static str, Result<(), SendError>)>, SendError> {
    let alert = Alert::firing(
        Severity::Info,
        "alert_test",
        "test alert from canarygate alert-test",
        "If you read this, this channel works.",
        instance,
    );
    let mut results = Vec::new();
    for mut channel in Channel::all(config)? {
        let result = channel.send(&alert).await;
        results.push((channel.name(), result));
    }
    Ok(results)
}

/// The queues and tasks of `config`'s channels, their metrics' series created.
fn channel_tasks(
    config: &AlertsConfig,
    counter: &IntCounterVec,
) -> Result<(Vec<Arc<Queue>>, Vec<ChannelTask>), SendError> {
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    for channel in Channel::all(config)? {
        let queue = Arc::new(Queue {
            channel: channel.name(),
            min_severity: channel.min_severity(),
            items: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            retired: CancellationToken::new(),
        });
        for result in ["sent", "failed", "dropped", "suppressed"] {
            counter.with_label_values(&[channel.name(), result]);
        }
        queues.push(Arc::clone(&queue));
        tasks.push(ChannelTask {
            channel,
            queue,
            counter: counter.clone(),
            retry_base: Duration::from_millis(config.retry_base_ms),
        });
    }
    Ok((queues, tasks))
}

/// Follows the `[alerts]` in force ([`crate::state::AppState::alerts_settings`]):
/// each change reconfigures `dispatcher` and spawns the new channels' tasks, until
/// `cancel`. A change that cannot be applied keeps the channels running.
pub async fn follow(
    dispatcher: Dispatcher,
    mut settings: tokio::sync::watch::Receiver<AlertsConfig>,
    cancel: CancellationToken,
) {
    use tracing::Instrument as _;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = settings.changed() => if changed.is_err() { return },
        }
        let config = settings.borrow_and_update().clone();
        match dispatcher.reconfigure(&config) {
            Ok(tasks) => {
                let names: Vec<&str> = tasks.iter().map(ChannelTask::channel).collect();
                tracing::info!(channels = ?names, "alert channels reloaded");
                for task in tasks {
                    let span = tracing::info_span!("alerts", channel = task.channel());
                    tokio::spawn(task.run(cancel.clone()).instrument(span));
                }
            }
            Err(error) => {
                warn!(%error, "[alerts] not applied; the running channels stay");
            }
        }
    }
}

/// Sends `alert` once through every channel of `config` whose `min_severity` it
/// meets, each bounded by [`SEND_NOW_TIMEOUT`], for a process that exits right after
/// (`canarygate canary <change>`): the channels it did not reach, and why.
pub async fn send_now(config: &AlertsConfig, alert: &Alert) -> Vec<(&'static str, String)> {
    let channels = match Channel::all(config) {
        Ok(channels) => channels,
        Err(error) => return vec![("alerts", error.to_string())],
    };
    let mut failures = Vec::new();
    for mut channel in channels {
        if alert.severity < channel.min_severity() {
            continue;
        }
        let name = channel.name();
        match tokio::time::timeout(SEND_NOW_TIMEOUT, channel.send(alert)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failures.push((name, error.to_string())),
            Err(_) => failures.push((name, format!("no answer within {SEND_NOW_TIMEOUT:?}"))),
        }
    }
    failures
}

/// How long [`send_now`] waits for one channel.
pub const SEND_NOW_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(severity: Severity, kind: &str) -> Alert {
        Alert::firing(severity, kind, kind, "", "test")
    }

    fn kinds(items: &VecDeque<Alert>) -> Vec<&str> {
        items.iter().map(|a| a.kind.as_str()).collect()
    }

    /// (queued, incoming, what is dropped, what stays in order).
    type Case<'a> = (
        &'a [(Severity, &'a str)],
        (Severity, &'a str),
        &'a str,
        &'a [&'a str],
    );

    #[test]
    fn a_full_queue_gives_up_the_least_severe_first() {
        use Severity::{Critical, Info, Warning};
        let table: &[Case] = &[
            (
                &[(Critical, "c"), (Warning, "w1"), (Warning, "w2")],
                (Warning, "w3"),
                "w1",
                &["c", "w2", "w3"],
            ),
            (
                &[(Critical, "c"), (Warning, "w"), (Info, "i")],
                (Warning, "w2"),
                "i",
                &["c", "w", "w2"],
            ),
            (
                &[(Critical, "c1"), (Critical, "c2"), (Warning, "w")],
                (Info, "i"),
                "i",
                &["c1", "c2", "w"],
            ),
            (
                &[(Critical, "c1"), (Warning, "w"), (Critical, "c2")],
                (Critical, "c3"),
                "w",
                &["c1", "c2", "c3"],
            ),
            (
                &[(Critical, "c1"), (Critical, "c2"), (Critical, "c3")],
                (Critical, "c4"),
                "c1",
                &["c2", "c3", "c4"],
            ),
        ];
        for (queued, incoming, dropped, kept) in table {
            let mut items: VecDeque<Alert> = queued.iter().map(|(s, k)| alert(*s, k)).collect();
            let gone = push_bounded(&mut items, &alert(incoming.0, incoming.1), 3);
            assert_eq!(
                gone.map(|a| a.kind),
                Some((*dropped).to_owned()),
                "{queued:?} + {incoming:?}"
            );
            assert_eq!(kinds(&items), *kept, "{queued:?} + {incoming:?}");
        }
        let mut items = VecDeque::new();
        assert!(push_bounded(&mut items, &alert(Info, "i"), 3).is_none());
        assert_eq!(kinds(&items), ["i"]);
    }
}
