//! Pure routing decisions: which bucket a user is in, which pool serves a request
//! and why ([`decide`]: override, bucket, kill switch, failover), which backend
//! inside the pool. No I/O and no clocks, so every rule here has an
//! exact unit test.
//!
//! The split is by pool first, then by backend. A user's bucket (0..=99) comes from a
//! stable key hashed with a fixed function ([`bucket`]), and `bucket < canary_percent`
//! means canary. That gives three properties operators rely on:
//! - a user stays on one *version* (not one server) across requests;
//! - raising the percent only moves users from production to canary, never back;
//! - two proxies with the same config agree on every user with no shared state.

/// The two pools. The names are the values of the `x-canarygate-pool` header and of
/// metric labels, so they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Production,
    Canary,
}

impl PoolKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Production => "production",
            Self::Canary => "canary",
        }
    }
}

/// A pool forced by the override header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    /// `always`: send to canary.
    Always,
    /// `never`: send to production.
    Never,
}

/// Parses an override header value: `always` or `never`, any case. Anything else is
/// no override, so a typo falls back to normal routing rather than failing the request.
pub fn parse_override(value: &[u8]) -> Option<Override> {
    if value.eq_ignore_ascii_case(b"always") {
        Some(Override::Always)
    } else if value.eq_ignore_ascii_case(b"never") {
        Some(Override::Never)
    } else {
        None
    }
}

/// FNV-1a, 64-bit: offset basis and prime from the FNV specification.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The bucket (0..=99) of a sticky key.
///
/// The hash is fixed and documented so any other tool can compute the same bucket:
/// FNV-1a 64 over the key's bytes, then the MurmurHash3 `fmix64` finalizer (so that
/// keys differing only in their last byte still spread evenly), then `% 100`.
pub fn bucket(key: &[u8]) -> u8 {
    let mut h = FNV_OFFSET;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    // The remainder is below 100, so the cast cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    let b = (h % 100) as u8;
    b
}

/// Why a request went to the pool it went to: the `reason` of the request log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The override header asked for this pool.
    Override,
    /// The sticky bucket and the canary percent chose it.
    Bucket,
    /// Canary was wanted, but the kill switch (`canary off`) is on.
    KillSwitch,
    /// Canary was wanted, but the canary pool has no backends configured.
    NoCanaryBackends,
    /// Canary was wanted, but no canary backend is usable (all down or ejected).
    Failover,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Override => "override",
            Self::Bucket => "bucket",
            Self::KillSwitch => "kill_switch",
            Self::NoCanaryBackends => "no_canary_backends",
            Self::Failover => "failover",
        }
    }
}

/// What the canary pool can take right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canary {
    /// The kill switch is off (`canary` is not `off` in the flags).
    pub enabled: bool,
    /// The pool has backends configured.
    pub configured: bool,
    /// At least one of them is usable (up and not ejected).
    pub usable: bool,
}

/// The pool for a request, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub pool: PoolKind,
    pub reason: Reason,
}

/// The canary decision. Precedence: the override header, then the bucket against
/// `canary_percent`; a request that wants canary still goes to production when the
/// kill switch is on (it wins over the override too), when the canary pool is empty,
/// or when none of its backends is usable (failover).
pub fn decide(
    forced: Option<Override>,
    bucket: u8,
    canary_percent: u8,
    canary: Canary,
) -> Decision {
    let (wants_canary, reason) = match forced {
        Some(Override::Always) => (true, Reason::Override),
        Some(Override::Never) => (false, Reason::Override),
        None => (bucket < canary_percent, Reason::Bucket),
    };
    let production = |reason| Decision {
        pool: PoolKind::Production,
        reason,
    };
    if !wants_canary {
        production(reason)
    } else if !canary.enabled {
        production(Reason::KillSwitch)
    } else if !canary.configured {
        production(Reason::NoCanaryBackends)
    } else if !canary.usable {
        production(Reason::Failover)
    } else {
        Decision {
            pool: PoolKind::Canary,
            reason,
        }
    }
}

/// Round robin: the index of the backend for the `n`th request of a pool of `len`.
pub fn round_robin(n: usize, len: usize) -> usize {
    debug_assert!(len > 0);
    n % len
}

/// The name of the sticky cookie the proxy sets and reads.
pub const STICKY_COOKIE: &str = "canarygate_id";

/// Finds a cookie's value in a `Cookie` header value (`a=1; b=2`, RFC 6265 5.4).
pub fn find_cookie<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
    })
}

/// Whether a sticky id from a client is one the proxy accepts as a key: 1 to 64
/// characters of `[A-Za-z0-9_-]`. Anything else is replaced by a fresh id, so a
/// client cannot stuff arbitrary bytes into the hash or the logs.
pub fn valid_sticky_id(id: &[u8]) -> bool {
    (1..=64).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_is_the_documented_hash() {
        // Exact vectors, computed by an independent Python implementation of the
        // documented hash: changing it would move users between versions.
        assert_eq!(bucket(b""), 42);
        assert_eq!(bucket(b"user-1"), 77);
        assert_eq!(bucket(b"user-2"), 35);
        assert_eq!(bucket(b"alice"), 36);
        assert_eq!(bucket(b"127.0.0.1"), 54);
    }

    #[test]
    fn buckets_spread_evenly() {
        let mut counts = [0u32; 100];
        for i in 0..100_000 {
            counts[usize::from(bucket(format!("id-{i}").as_bytes()))] += 1;
        }
        // 1000 expected per bucket; a good hash stays well within +/-20%.
        for (b, &c) in counts.iter().enumerate() {
            assert!((800..=1200).contains(&c), "bucket {b} got {c}");
        }
    }

    const READY: Canary = Canary {
        enabled: true,
        configured: true,
        usable: true,
    };

    fn pool(forced: Option<Override>, bucket: u8, percent: u8, canary: Canary) -> PoolKind {
        decide(forced, bucket, percent, canary).pool
    }

    #[test]
    fn pool_choice_follows_bucket_and_percent() {
        assert_eq!(pool(None, 32, 33, READY), PoolKind::Canary);
        assert_eq!(pool(None, 33, 33, READY), PoolKind::Production);
        assert_eq!(pool(None, 0, 0, READY), PoolKind::Production);
        assert_eq!(pool(None, 99, 100, READY), PoolKind::Canary);
        // Raising the percent only ever moves buckets production -> canary.
        for b in 0..100 {
            for p in 0..100 {
                if pool(None, b, p, READY) == PoolKind::Canary {
                    assert_eq!(pool(None, b, p + 1, READY), PoolKind::Canary);
                }
            }
        }
    }

    #[test]
    fn override_wins_over_bucket() {
        assert_eq!(
            decide(Some(Override::Always), 99, 0, READY),
            Decision {
                pool: PoolKind::Canary,
                reason: Reason::Override
            }
        );
        assert_eq!(
            decide(Some(Override::Never), 0, 100, READY),
            Decision {
                pool: PoolKind::Production,
                reason: Reason::Override
            }
        );
    }

    #[test]
    fn every_reason_in_its_order() {
        let (p, c) = (PoolKind::Production, PoolKind::Canary);
        let canary = |enabled, configured, usable| Canary {
            enabled,
            configured,
            usable,
        };
        // (forced, bucket, percent, canary state) -> (pool, reason)
        let table = [
            (None, 10, 33, READY, c, Reason::Bucket),
            (None, 50, 33, READY, p, Reason::Bucket),
            (None, 50, 33, canary(false, false, false), p, Reason::Bucket),
            (
                None,
                10,
                33,
                canary(false, true, true),
                p,
                Reason::KillSwitch,
            ),
            (
                None,
                10,
                33,
                canary(true, false, false),
                p,
                Reason::NoCanaryBackends,
            ),
            (None, 10, 33, canary(true, true, false), p, Reason::Failover),
            (
                Some(Override::Always),
                99,
                0,
                canary(false, true, true),
                p,
                Reason::KillSwitch,
            ),
            (
                Some(Override::Always),
                99,
                0,
                canary(true, false, false),
                p,
                Reason::NoCanaryBackends,
            ),
            (
                Some(Override::Always),
                99,
                0,
                canary(true, true, false),
                p,
                Reason::Failover,
            ),
            (
                Some(Override::Never),
                0,
                100,
                canary(true, true, false),
                p,
                Reason::Override,
            ),
            // The kill switch is checked before the pool: an empty pool with the
            // switch off says kill switch.
            (
                None,
                10,
                33,
                canary(false, false, false),
                p,
                Reason::KillSwitch,
            ),
        ];
        for (forced, bucket, percent, state, pool, reason) in table {
            assert_eq!(
                decide(forced, bucket, percent, state),
                Decision { pool, reason },
                "{forced:?} bucket {bucket} percent {percent} {state:?}"
            );
        }
        assert_eq!(Reason::NoCanaryBackends.as_str(), "no_canary_backends");
    }

    #[test]
    fn override_values() {
        assert_eq!(parse_override(b"always"), Some(Override::Always));
        assert_eq!(parse_override(b"ALWAYS"), Some(Override::Always));
        assert_eq!(parse_override(b"Never"), Some(Override::Never));
        assert_eq!(parse_override(b"yes"), None);
        assert_eq!(parse_override(b""), None);
    }

    #[test]
    fn round_robin_sequence() {
        let seq: Vec<usize> = (0..7).map(|n| round_robin(n, 3)).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn cookie_lookup() {
        let h = b"a=1; canarygate_id=abc ;theme=dark";
        assert_eq!(find_cookie(h, "canarygate_id"), Some(&b"abc"[..]));
        assert_eq!(find_cookie(h, "theme"), Some(&b"dark"[..]));
        assert_eq!(find_cookie(h, "missing"), None);
        assert_eq!(find_cookie(b"xcanarygate_id=1", "canarygate_id"), None);
        assert_eq!(find_cookie(b"novalue", "novalue"), None);
    }

    #[test]
    fn sticky_id_validation() {
        assert!(valid_sticky_id(b"0123abcdef_-XYZ"));
        assert!(!valid_sticky_id(b""));
        assert!(!valid_sticky_id(&[b'a'; 65]));
        assert!(!valid_sticky_id(b"a b"));
        assert!(!valid_sticky_id(b"a\"b"));
    }
}
