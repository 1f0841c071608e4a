//! The process's monotonic millisecond clock. Ejection deadlines, pooled connections'
//! ages and retry-budget windows all compare against it, so they share one origin.

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since the first call, on a monotonic clock shared by the process.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}
