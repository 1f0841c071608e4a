//! Operational events (flag changes, flag store up/down, backend health, failover,
//! reloads, drains; later the doctor, maintenance, analysis and alerts) and the one
//! funnel they go through: [`Events::report`] writes the log line and keeps the event
//! in a small ring for the status page and `GET /events` (and, with the alerts, is
//! where one will be raised). Cold path only: a mutex is fine here.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// Which part of canarygate reported an event (`source` in logs and `/events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Proxy,
    Flags,
    Health,
    Config,
    Alerts,
    Analysis,
    Sms,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Flags => "flags",
            Self::Health => "health",
            Self::Config => "config",
            Self::Alerts => "alerts",
            Self::Analysis => "analysis",
            Self::Sms => "sms",
        }
    }
}

/// How much an event matters (`level` in `/events`; the log line's level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
}

impl Level {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warn => "warn",
        }
    }
}

/// How many events are kept.
pub const CAPACITY: usize = 200;

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub source: Source,
    pub level: Level,
    pub message: String,
}

fn rfc3339<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*at))
}

#[derive(Debug, Default)]
pub struct Events {
    ring: Mutex<VecDeque<Event>>,
    /// The alerts firing now, by kind: one line each, for the status page.
    firing: Mutex<std::collections::BTreeMap<String, String>>,
}

impl Events {
    /// Marks alert `kind` as firing with a line to show, or (`None`) as resolved.
    pub fn set_firing(&self, kind: &str, line: Option<String>) {
        let mut firing = self
            .firing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match line {
            Some(line) => firing.insert(kind.to_owned(), line),
            None => firing.remove(kind),
        };
    }

    /// The alerts firing now, one line each, by kind.
    pub fn firing(&self) -> Vec<String> {
        self.firing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Reports an event: one log line at `level` whose message is the fixed `what`,
    /// with `source` and `detail` as fields, and one entry in the ring
    /// (`what: detail`, or `what` alone when `detail` is empty).
    pub fn report(
        &self,
        source: Source,
        level: Level,
        what: &'static str,
        detail: impl fmt::Display,
    ) {
        let detail = detail.to_string();
        let source_name = source.as_str();
        match level {
            Level::Info => tracing::info!(source = source_name, %detail, "{what}"),
            Level::Warn => tracing::warn!(source = source_name, %detail, "{what}"),
        }
        let message = if detail.is_empty() {
            what.to_owned()
        } else {
            format!("{what}: {detail}")
        };
        self.push(source, level, message);
    }

    fn push(&self, source: Source, level: Level, message: String) {
        let mut ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(Event {
            at: SystemTime::now(),
            source,
            level,
            message,
        });
    }

    /// The most recent events, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Event> {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.iter().rev().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_up_to_capacity() {
        let events = Events::default();
        for i in 0..CAPACITY + 5 {
            events.report(Source::Proxy, Level::Info, "e", i);
        }
        let recent = events.recent(usize::MAX);
        assert_eq!(recent.len(), CAPACITY);
        assert_eq!(recent[0].message, format!("e: {}", CAPACITY + 4));
        assert_eq!(recent.last().unwrap().message, "e: 5");
        assert_eq!(recent[0].source, Source::Proxy);
        assert_eq!(recent[0].level, Level::Info);
    }
}
