//! The process's monotonic millisecond clock. Ejection deadlines, pooled connections'
//! ages and retry-budget windows all compare against it, so they share one origin.
//! And Unix time in ms, for what a fleet shares (the canary analysis' record).

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since the first call, on a monotonic clock shared by the process.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch (0 if the clock is set before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
