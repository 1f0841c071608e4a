//! How much one client may weigh in the canary analysis.
//!
//! The verdict rolls the canary back (or promotes it) for the whole fleet, so no
//! single client may decide it: one client hammering a request that fails on both
//! versions only on the canary, or flooding the canary with cheap successes to dilute
//! a real failure, must not move it. Placement already guards most of it (only
//! requests placed by the bucket are judged, the cookie is signed, the override is
//! honoured only from trusted networks), and this is the last guard: within each
//! time slot of the window, a client (its sticky key, and separately its address)
//! counts for at most
//!
//! `cap = max(1, ceil(max_client_share × judged requests of the pool per slot))`,
//!
//! the per-slot figure being the pool's judged requests over the last window divided
//! by its slots, as of the last check. Requests past the cap are answered as usual
//! and counted as `capped`, never judged. The cap comes from the requests that were
//! judged, so a flood cannot raise it for itself.
//!
//! Counting is a count-min sketch per key kind (two rows of [`WIDTH`] counters,
//! each tagged with the slot it counts), shared by all workers with atomics: no lock
//! on the request path, 64 KiB in all. Keys are hashed with a
//! per-process random key, so nobody can aim collisions at another client; a
//! collision can only make a client look heavier than it is, and at the widths here
//! that stays far below any cap worth having (a count-min error of at most
//! `clients in the slot / WIDTH`).

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters per sketch row.
pub const WIDTH: usize = 2048;
const ROWS: usize = 2;
/// The key kinds: the sticky key and the client address.
const KINDS: usize = 2;

/// Which identities are capped, and to what share (`[analysis] max_client_share`,
/// `client_keys`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientLimit {
    pub share: f64,
    pub sticky: bool,
    pub address: bool,
}

impl ClientLimit {
    /// No cap at all (a share of 1, or no key kind chosen).
    pub fn is_off(&self) -> bool {
        self.share >= 1.0 || !(self.sticky || self.address)
    }
}

impl Default for ClientLimit {
    fn default() -> Self {
        Self {
            share: 0.01,
            sticky: true,
            address: true,
        }
    }
}

/// A client's identities, hashed: what a request is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientKeys {
    sticky: Option<u64>,
    address: u64,
}

/// The per-process hash of client identities.
#[derive(Debug, Default)]
pub struct ClientHasher(RandomState);

impl ClientHasher {
    /// `sticky`: the sticky key the bucket came from (cookie id or header value),
    /// if any. The address counts by host for IPv4 and by /64 for IPv6 (one
    /// subscriber's prefix: a client holding a /64 has 2^64 addresses).
    pub fn keys(&self, sticky: Option<&[u8]>, address: IpAddr) -> ClientKeys {
        let address = match address.to_canonical() {
            IpAddr::V4(v4) => self.0.hash_one(v4.octets()),
            IpAddr::V6(v6) => self.0.hash_one(&v6.octets()[..8]),
        };
        ClientKeys {
            sticky: sticky.map(|key| self.0.hash_one(key)),
            address,
        }
    }
}

/// The sketch and the cap (both pools).
#[derive(Debug)]
pub struct Tally {
    /// `[kind][row][WIDTH]`; each counter holds `slot epoch << 32 | count`.
    counters: Box<[AtomicU64]>,
    cap: AtomicU64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            counters: (0..KINDS * ROWS * WIDTH)
                .map(|_| AtomicU64::new(0))
                .collect(),
            cap: AtomicU64::new(1),
        }
    }
}

impl Tally {
    /// Counts one request of `keys` in the slot `epoch`; true when every chosen
    /// identity is still within the cap (the request is judged).
    ///
    /// The address is counted first, and the sticky key only while the address is
    /// within its cap: one address flooding with ever new keys fills no counters
    /// but its own, so it cannot push other clients over the cap by collisions.
    pub fn admit(&self, limit: &ClientLimit, keys: ClientKeys, epoch: u64) -> bool {
        if limit.is_off() {
            return true;
        }
        let cap = self.cap.load(Ordering::Relaxed);
        if limit.address && self.count(1, keys.address, epoch) > cap {
            return false;
        }
        match keys.sticky {
            Some(sticky) if limit.sticky => self.count(0, sticky, epoch) <= cap,
            _ => true,
        }
    }

    /// Sets the cap from the judged requests of the last window of `slots` slots.
    pub fn set_cap(&self, limit: &ClientLimit, judged_in_window: u64, slots: u64) {
        self.cap
            .store(cap(limit.share, judged_in_window, slots), Ordering::Relaxed);
    }

    pub fn cap(&self) -> u64 {
        self.cap.load(Ordering::Relaxed)
    }

    /// Adds one to `hash`'s counters of `kind` and returns its estimate (the
    /// smallest of its rows).
    fn count(&self, kind: usize, hash: u64, epoch: u64) -> u64 {
        // Only the low 32 bits of the epoch tag a counter: a counter left untouched
        // for exactly 2^32 slots would be read as current, which no window lives to see.
        let tag = (epoch & 0xffff_ffff) << 32;
        let (h1, h2) = (hash & 0xffff_ffff, hash >> 32 | 1);
        let width = u64::try_from(WIDTH).unwrap_or(u64::MAX);
        let mut estimate = u64::MAX;
        for (row, step) in [0u64, 1].into_iter().enumerate() {
            let column =
                usize::try_from(h1.wrapping_add(h2.wrapping_mul(step)) % width).unwrap_or(0);
            let counter = &self.counters[(kind * ROWS + row) * WIDTH + column];
            let mut seen = counter.load(Ordering::Relaxed);
            let now = loop {
                let next = match (seen & !0xffff_ffff).cmp(&tag) {
                    std::cmp::Ordering::Equal => {
                        seen.saturating_add(u64::from(seen & 0xffff_ffff < 0xffff_ffff))
                    }
                    // An older slot's count: this slot starts from one.
                    std::cmp::Ordering::Less => tag | 1,
                    // A newer slot's (another worker crossed the boundary first):
                    // never moved back; this late request is not judged.
                    std::cmp::Ordering::Greater => return u64::MAX,
                };
                match counter.compare_exchange_weak(
                    seen,
                    next,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break next,
                    Err(actual) => seen = actual,
                }
            };
            estimate = estimate.min(now & 0xffff_ffff);
        }
        estimate
    }
}

/// The per-slot cap of one client: `max(1, ceil(share × judged / slots))`.
pub fn cap(share: f64, judged_in_window: u64, slots: u64) -> u64 {
    let per_slot = super::stats::to_f64(judged_in_window) / super::stats::to_f64(slots.max(1));
    let cap = (share * per_slot).ceil();
    // In range: a share below 1 of a u64 count, and at least 1.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let cap = cap.clamp(1.0, 1e18) as u64;
    cap
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn the_cap_is_a_share_of_a_slot_and_at_least_one() {
        assert_eq!(cap(0.05, 0, 24), 1);
        assert_eq!(cap(0.05, 24 * 100, 24), 5);
        assert_eq!(cap(0.05, 24 * 101, 24), 6);
        assert_eq!(cap(0.05, 10, 24), 1);
    }

    #[test]
    fn one_client_counts_up_to_the_cap_per_slot_then_is_capped() {
        let tally = Tally::default();
        let limit = ClientLimit {
            share: 0.05,
            ..ClientLimit::default()
        };
        tally.set_cap(&limit, 24 * 100, 24);
        let hasher = ClientHasher::default();
        let heavy = hasher.keys(Some(b"heavy"), V4);
        let admitted = (0..50).filter(|_| tally.admit(&limit, heavy, 7)).count();
        assert_eq!(admitted, 5);
        // Other clients are not held back by the heavy one.
        for i in 0..200u32 {
            let other = hasher.keys(
                Some(format!("user-{i}").as_bytes()),
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            );
            assert!(tally.admit(&limit, other, 7), "client {i}");
        }
        // The next slot starts from zero; a request counted late, in a slot older
        // than its counters', is not judged (a tag never moves back).
        assert!(tally.admit(&limit, heavy, 8));
        assert!(!tally.admit(&limit, heavy, 7));
    }

    #[test]
    fn fresh_sticky_keys_from_one_address_are_capped_by_the_address() {
        let tally = Tally::default();
        let limit = ClientLimit::default();
        let hasher = ClientHasher::default();
        let admitted = (0..20)
            .filter(|i| tally.admit(&limit, hasher.keys(Some(&[*i]), V4), 1))
            .count();
        assert_eq!(admitted, 1);
        // With the address not chosen, each new key is a new client.
        let sticky_only = ClientLimit {
            address: false,
            ..limit
        };
        let tally = Tally::default();
        let admitted = (0..20)
            .filter(|i| tally.admit(&sticky_only, hasher.keys(Some(&[*i]), V4), 1))
            .count();
        assert_eq!(admitted, 20);
    }

    #[test]
    fn an_ipv6_client_is_one_client_across_its_64() {
        let hasher = ClientHasher::default();
        let a = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 1);
        let b = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0xffff, 9, 9, 9);
        let c = Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1);
        let keys = |ip: Ipv6Addr| hasher.keys(None, IpAddr::V6(ip));
        assert_eq!(keys(a), keys(b));
        assert_ne!(keys(a), keys(c));
        // An IPv4 client seen through a dual-stack socket is the IPv4 client.
        assert_eq!(
            hasher.keys(
                None,
                IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped())
            ),
            hasher.keys(None, V4)
        );
    }

    #[test]
    fn off_admits_everything() {
        let tally = Tally::default();
        let hasher = ClientHasher::default();
        let off = ClientLimit {
            share: 1.0,
            ..ClientLimit::default()
        };
        assert!((0..100).all(|_| tally.admit(&off, hasher.keys(None, V4), 1)));
    }
}
