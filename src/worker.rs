//! Which worker thread this is. `run` is thread-per-core: each worker thread serves
//! its own connections, and per-worker state (upstream connection pools, the canary
//! analysis' request windows) is indexed by it, so a request touches only its own
//! thread's copy and no lock is shared by all requests.

use std::cell::Cell;
use std::sync::OnceLock;

static WORKERS: OnceLock<usize> = OnceLock::new();

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Declares how many worker threads serve requests (once, before any state is built).
pub fn set_workers(n: usize) {
    let _ = WORKERS.set(n.max(1));
}

/// The number of worker threads (1 unless [`set_workers`] said otherwise).
pub fn workers() -> usize {
    WORKERS.get().copied().unwrap_or(1)
}

/// Marks the current thread as worker `index` (0-based).
pub fn set_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The calling thread's worker index (0 for threads that are not workers).
pub fn index() -> usize {
    WORKER.with(Cell::get)
}
