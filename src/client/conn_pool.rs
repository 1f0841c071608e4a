//! Keep-alive connections to one backend, reused across requests.
//!
//! hyper-util's general-purpose client showed in profiles (a mutex shared by all
//! threads and a hash lookup per checkout, boxed connect futures per request), so the
//! proxy keeps its own small pool per backend and worker thread: a stack of idle
//! HTTP/1.1 connections ([`BackendConn`]) behind a lock only that worker takes
//! (uncontended). A connection goes back when its response ended cleanly (see
//! [`crate::client::body::PooledBody`]); a body dropped early takes its connection with it,
//! since its state is unknown. A connection the backend closed while it was idle is
//! seen at checkout (the socket turned readable) and dropped.
//!
//! Last in, first out: the connections in use stay warm at the top, and the ones a
//! burst left behind sink to the bottom, where [`ConnPool::purge`] closes them (as
//! HAProxy's pool-purge-delay does): after a 512-connection load the pools held
//! hundreds of sockets. Connections older than `idle_ms` are also closed when met.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::client::conn::BackendConn;
use crate::clock::now_ms;

/// Idle connections kept per backend and worker thread; more are closed when returned.
pub const MAX_IDLE: usize = 256;

/// Idle connections unused for this long are purged, half of them per purge.
pub const PURGE_AFTER_MS: u64 = 5_000;

/// The connection pools of one backend, one per worker thread.
#[derive(Debug)]
pub struct ConnPools(Box<[Arc<ConnPool>]>);

impl Default for ConnPools {
    fn default() -> Self {
        Self(
            (0..crate::worker::workers())
                .map(|_| Arc::default())
                .collect(),
        )
    }
}

impl ConnPools {
    /// The pool of the calling worker thread.
    pub fn local(&self) -> &Arc<ConnPool> {
        let index = crate::worker::index();
        &self.0[index % self.0.len()]
    }

    pub fn idle_count(&self) -> usize {
        self.0.iter().map(|p| p.idle_count()).sum()
    }

    /// Purges every worker's pool (see [`ConnPool::purge`]); returns how many closed.
    pub fn purge(&self, now_ms: u64) -> usize {
        self.0.iter().map(|p| p.purge(now_ms)).sum()
    }
}

struct Idle {
    conn: BackendConn,
    since_ms: u64,
}

/// The idle connections of one backend on one worker: a stack, oldest at the bottom
/// (so `since_ms` never decreases from bottom to top).
#[derive(Default)]
pub struct ConnPool {
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl ConnPool {
    pub fn idle_count(&self) -> usize {
        self.stack().len()
    }

    fn stack(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes half (rounded up) of the idle connections unused for
    /// [`PURGE_AFTER_MS`]: called every second, a burst's leftovers are gone within
    /// seconds while connections in steady use are never touched. Returns how many
    /// it closed.
    pub fn purge(&self, now_ms: u64) -> usize {
        let closed: Vec<Idle> = {
            let mut stack = self.stack();
            let n = purge_count(stack.iter().map(|c| c.since_ms), now_ms);
            stack.drain(..n).collect()
        };
        closed.len() // dropped outside the lock
    }

    /// An idle connection ready for a request, dropping closed and expired ones.
    pub fn checkout(&self, idle_ms: u64) -> Option<BackendConn> {
        let now = now_ms();
        loop {
            let Idle { conn, since_ms } = self.stack().pop()?;
            if conn.still_idle() && now.saturating_sub(since_ms) <= idle_ms {
                return Some(conn);
            }
        }
    }

    pub(crate) fn put_back(&self, mut conn: BackendConn) {
        conn.shed_buffer();
        let mut stack = self.stack();
        if stack.len() < MAX_IDLE {
            stack.push(Idle {
                conn,
                since_ms: now_ms(),
            });
        } else {
            drop(stack);
            drop(conn); // a full pool closes the connection (outside the lock)
        }
    }
}

/// How many connections from the bottom of a stack idle since `since_ms` (oldest
/// first) a purge at `now_ms` closes: half of the stale ones, rounded up.
fn purge_count(since_ms: impl Iterator<Item = u64>, now_ms: u64) -> usize {
    since_ms
        .take_while(|&since| now_ms.saturating_sub(since) >= PURGE_AFTER_MS)
        .count()
        .div_ceil(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_closes_half_of_the_stale_bottom_rounded_up() {
        let now = 100_000;
        let stale = now - PURGE_AFTER_MS;
        // Oldest first; the fresh ones on top are never touched.
        assert_eq!(
            purge_count([stale - 9, stale, now - 1, now].into_iter(), now),
            1
        );
        assert_eq!(purge_count([stale; 7].into_iter(), now), 4);
        assert_eq!(purge_count([stale + 1; 7].into_iter(), now), 0);
        assert_eq!(purge_count(std::iter::empty(), now), 0);
        // Repeated purges of 10 stale connections: 10 -> 5 -> 2 -> 1 -> 0.
        let mut left = 10usize;
        let mut seen = Vec::new();
        while left > 0 {
            left -= purge_count(std::iter::repeat_n(stale, left), now);
            seen.push(left);
        }
        assert_eq!(seen, [5, 2, 1, 0]);
    }
}
