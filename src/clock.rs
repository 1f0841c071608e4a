//! The process's monotonic millisecond clock. Ejection deadlines, pooled connections'
//! ages and retry-budget windows all compare against it, so they share one origin.
//! And two wall clocks: this host's Unix time in ms ([`unix_ms`]), and the fleet's
//! ([`fleet_ms`]): Redis `TIME`, read by every heartbeat and carried forward on the
//! monotonic clock between reads. What one host writes for the others to compare
//! (heartbeats, membership, the analysis' step timing) uses the fleet's, so a host
//! whose clock is off by minutes changes nothing (issue 29).

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

/// TEST ONLY: shifts this process's wall clock ([`unix_ms`]) by this many
/// milliseconds (signed), to play a host whose clock is off without changing the
/// system's (tests/fleet.rs). Never set it in production.
pub const TEST_OFFSET_ENV: &str = "CANARYGATE_TEST_CLOCK_OFFSET_MS";

/// The fleet clock moved by more than this between two reads of Redis `TIME`: a
/// new epoch ([`fleet_epoch`]).
const JUMP_MS: u64 = 1_000;

/// Milliseconds since the first call, on a monotonic clock shared by the process.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] at `instant`, without reading the clock again: the request path reads
/// it once at each end of a request (0 for an instant before the first call).
pub fn ms_at(instant: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| instant);
    u64::try_from(instant.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch on this host's clock (0 if the clock is set
/// before it).
pub fn unix_ms() -> u64 {
    static OFFSET: OnceLock<i64> = OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        std::env::var(TEST_OFFSET_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    });
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    real.saturating_add_signed(offset)
}

/// The last Redis `TIME` read: (its Unix ms, [`now_ms`] when read), and how many
/// times the fleet clock jumped.
#[derive(Debug, Default)]
struct Anchor {
    at: Option<(u64, u64)>,
    epoch: u64,
}

fn anchor() -> &'static Mutex<Anchor> {
    static ANCHOR: OnceLock<Mutex<Anchor>> = OnceLock::new();
    ANCHOR.get_or_init(Mutex::default)
}

/// Records a Redis `TIME` reading (Unix ms), taken just now.
pub fn set_fleet_time(redis_ms: u64) {
    let now = now_ms();
    let mut anchor = anchor().lock().unwrap_or_else(PoisonError::into_inner);
    // The first reading counts as a jump from the host's clock when they differ.
    let before = anchor.at.map_or_else(unix_ms, |(ms, at)| {
        ms.saturating_add(now.saturating_sub(at))
    });
    if before.abs_diff(redis_ms) > JUMP_MS {
        anchor.epoch += 1;
    }
    anchor.at = Some((redis_ms, now));
}

/// The fleet's Unix time in ms: the last Redis `TIME` read, carried forward on the
/// monotonic clock; this host's clock until Redis has been read once (or without
/// Redis, where there is no fleet to agree with).
pub fn fleet_ms() -> u64 {
    let anchor = anchor().lock().unwrap_or_else(PoisonError::into_inner);
    anchor.at.map_or_else(unix_ms, |(ms, at)| {
        ms.saturating_add(now_ms().saturating_sub(at))
    })
}

/// Changes when the fleet clock jumps (the first Redis reading that disagrees with
/// this host's clock, or Redis itself changing time): a span measured across it is
/// void.
pub fn fleet_epoch() -> u64 {
    anchor()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .epoch
}

/// Parses the reply to Redis `TIME` (seconds, microseconds) into Unix ms.
pub fn from_redis_time(seconds: u64, micros: u64) -> u64 {
    seconds.saturating_mul(1_000).saturating_add(micros / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_clock_follows_redis_and_counts_jumps() {
        let epoch = fleet_epoch();
        let redis = unix_ms() + 3_600_000;
        set_fleet_time(redis);
        assert_eq!(fleet_epoch(), epoch + 1, "an hour off is a jump");
        let read = fleet_ms();
        assert!((redis..redis + 1_000).contains(&read), "{read} vs {redis}");
        set_fleet_time(fleet_ms() + 5);
        assert_eq!(fleet_epoch(), epoch + 1, "a few ms of drift is not");
        assert_eq!(from_redis_time(1_700_000_000, 123_456), 1_700_000_000_123);
    }
}
