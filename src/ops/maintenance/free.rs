//! Freeing what was archived, and remembering what could not be: a file is
//! deleted only when proven closed at that moment, else its archived prefix is
//! punched out, only where it still holds the archived bytes ([`super::files`]). A
//! file archived but not freed waits until it changes before it is archived again.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use super::archive::Archived;
use super::files::{self, Candidate, FileError};

/// A file's failed attempts: it waits until `until` before the next.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    failures: u32,
    pub until: Instant,
}

impl Backoff {
    /// One more failure: the next try waits `base`, doubling, up to an hour.
    pub fn fail(entry: Option<Self>, base: Duration) -> Self {
        let failures = entry.map_or(0, |b| b.failures) + 1;
        let wait = base
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(Duration::from_secs(3_600).max(base));
        Self {
            failures,
            until: Instant::now() + wait,
        }
    }
}

/// A file archived but not freed (EACCES, EPERM, links, no hole punching): it is
/// not archived again until it changes (size, mtime, links; a new inode is another
/// file), nor before its backoff ends; never again before a restart when its
/// filesystem cannot punch holes.
#[derive(Debug, Clone)]
pub struct Stuck {
    pub size: u64,
    pub modified: SystemTime,
    pub links: u64,
    pub backoff: Backoff,
    pub forever: bool,
    pub why: String,
}

impl Stuck {
    pub fn holds(&self, shape: &files::Shape, now: Instant) -> bool {
        let unchanged =
            shape.size == self.size && shape.modified == self.modified && shape.links == self.links;
        self.forever || unchanged || self.backoff.until > now
    }
}

/// What freeing an archived file did: how, and the bytes freed on disk; or the
/// stage that failed (`punch`, `delete`) and why.
pub type Freed = Result<(String, u64), (&'static str, FileError)>;

/// After a verified archive (on the blocking thread): delete the file when it is
/// proven closed now, else punch out the archived prefix, if the file still holds
/// it there.
pub fn free_file(candidate: &Candidate, live: bool, done: &Archived) -> Freed {
    let block = done.shape.block;
    let punch = |why: &str| {
        candidate
            .punch(
                done.start,
                done.end / block * block,
                done.end,
                &done.fingerprint,
            )
            .map(|n| (format!("{why}: its archived prefix punched out"), n))
            .map_err(|e| ("punch", e))
    };
    if live {
        return punch("live log");
    }
    let wanted = HashSet::from([done.shape.id]);
    match candidate.unlink_if_closed(&done.shape, || files::open_for_writing(&wanted)) {
        Ok(how) => Ok((how.to_owned(), done.shape.allocated)),
        // Written to since it was read, or opened: live after all; free what is
        // archived, in whole blocks.
        Err(FileError::Changed) => punch("written to meanwhile"),
        Err(FileError::Open(why)) => punch(&format!("{why}; kept")),
        Err(e) => Err(("delete", e)),
    }
}
