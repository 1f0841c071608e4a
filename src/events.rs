//! Recent operational events (flag changes, flag store up/down, drains; later the
//! doctor, maintenance, analysis and alerts), kept in a small ring for the status page
//! and `GET /events`. Cold path only: a mutex is fine here.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// How many events are kept.
pub const CAPACITY: usize = 200;

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// Which part of canarygate reported it: `flags`, `proxy`, ...
    pub source: &'static str,
    /// `info` or `warn`.
    pub level: &'static str,
    pub message: String,
}

fn rfc3339<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*at))
}

#[derive(Debug, Default)]
pub struct Events {
    ring: Mutex<VecDeque<Event>>,
}

impl Events {
    pub fn push(&self, source: &'static str, level: &'static str, message: impl Into<String>) {
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
            message: message.into(),
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
            events.push("test", "info", format!("e{i}"));
        }
        let recent = events.recent(usize::MAX);
        assert_eq!(recent.len(), CAPACITY);
        assert_eq!(recent[0].message, format!("e{}", CAPACITY + 4));
        assert_eq!(recent.last().unwrap().message, "e5");
    }
}
