//! What the fleet looks like from this instance: the heartbeats every instance
//! writes to Redis (`ops::fleet` writes ours and reads everyone's), kept here for
//! `/fleet`, the status page and the metrics. Pure: no I/O.

use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// One instance's heartbeat, as stored (JSON) under `<fleet.key>:<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// canarygate's version.
    pub version: String,
    /// Its flag snapshot's version (counts its own changes) and digest (equal on
    /// two instances exactly when they apply the same flags).
    pub flags_version: u64,
    pub flags_digest: String,
    pub effective_canary_percent: u8,
    pub analysis_state: String,
    /// When it wrote this (Unix ms, its clock).
    pub at_ms: u64,
}

/// The fleet as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// This instance's id.
    pub instance: String,
    /// Seen in the last `seen_ms`, sorted by id (this one included).
    pub members: Vec<Member>,
    /// Whether the last read reached Redis; when not, `members` is what was last
    /// seen, as of `read_at_ms`.
    pub connected: bool,
    pub read_at_ms: u64,
    /// Whether a Redis is configured at all (without one the fleet is this instance).
    pub shared: bool,
}

impl View {
    /// Whether every member applies the same flags.
    pub fn in_sync(&self) -> bool {
        self.members
            .windows(2)
            .all(|w| w[0].flags_digest == w[1].flags_digest)
    }
}

#[derive(Debug, Default)]
pub struct Board {
    view: Mutex<View>,
}

impl Board {
    pub fn set(&self, view: View) {
        *self.view.lock().unwrap_or_else(PoisonError::into_inner) = view;
    }

    pub fn view(&self) -> View {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, digest: &str) -> Member {
        Member {
            id: id.to_owned(),
            version: "0.1.0".to_owned(),
            flags_version: 3,
            flags_digest: digest.to_owned(),
            effective_canary_percent: 33,
            analysis_state: "idle".to_owned(),
            at_ms: 0,
        }
    }

    #[test]
    fn in_sync_means_one_digest() {
        let mut view = View::default();
        assert!(view.in_sync(), "an empty fleet disagrees with nobody");
        view.members = vec![member("a", "x"), member("b", "x"), member("c", "x")];
        assert!(view.in_sync());
        view.members[2].flags_version = 9; // versions count local changes: not compared
        assert!(view.in_sync());
        view.members[1].flags_digest = "y".to_owned();
        assert!(!view.in_sync());
    }
}
