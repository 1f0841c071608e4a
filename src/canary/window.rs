//! The request records the canary judge reads: per pool, over a sliding window, the
//! request count, the error count and an HDR latency histogram.
//!
//! The request path writes into the shard of its own worker thread (one uncontended
//! mutex each: the judge takes it once per check), never into state shared by all
//! requests. Each shard is a ring of [`SLOTS`] time slots of `window_ms / SLOTS`;
//! a slot is cleared when time comes back round to it, so eviction costs nothing per
//! request, and the window is the current slot plus the 23 before it (between
//! `window_ms - slot` and `window_ms` of history).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::clients::{ClientHasher, ClientKeys, ClientLimit, Tally};
use crate::routing::PoolKind;

/// Slots per window: eviction happens in steps of `window_ms / SLOTS`.
pub const SLOTS: u64 = 24;
/// Latencies are recorded in microseconds up to a minute (longer ones count as a
/// minute), to 2 significant digits: 1% resolution, 10 KiB per histogram.
pub const MAX_LATENCY_US: u64 = 60_000_000;
const SIGNIFICANT_DIGITS: u8 = 2;

fn new_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
        .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

/// One pool's records over a window, as the judge reads them.
#[derive(Debug, Clone)]
pub struct PoolWindow {
    /// Requests judged: placed by the bucket, within their client's cap. The
    /// counts, errors and latencies below are of these alone.
    pub requests: u64,
    /// Requests that failed: 5xx from the backend, or an upstream error.
    pub errors: u64,
    /// Latency to the response head, in microseconds.
    pub latency: Histogram<u32>,
    /// Placed by the bucket but past their client's cap ([`super::clients`]).
    pub capped: u64,
    /// Placed by anything but the bucket (the override header, failover, the kill
    /// switch): answered, never judged.
    pub apart: u64,
    /// The per-slot client cap in force over the window ([`Recorder::window`] sets it).
    pub client_cap: u64,
}

impl Default for PoolWindow {
    fn default() -> Self {
        Self {
            requests: 0,
            errors: 0,
            latency: new_histogram(),
            capped: 0,
            apart: 0,
            client_cap: 1,
        }
    }
}

impl PoolWindow {
    /// The error ratio; 0 without requests. Never above 1 (a body that failed after
    /// its request's slot left the window adds an error without its request).
    pub fn error_ratio(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        (super::stats::to_f64(self.errors) / super::stats::to_f64(self.requests)).min(1.0)
    }

    /// The `q` latency quantile in microseconds (the highest value equivalent to the
    /// recorded one, at the histogram's 1% resolution); `None` without requests.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        (!self.latency.is_empty()).then(|| self.latency.value_at_quantile(q))
    }

    /// How many recorded latencies are above `us` (at the histogram's resolution).
    pub fn count_above(&self, us: u64) -> u64 {
        let len = self.latency.len();
        if self.latency.is_empty() || us >= self.latency.max() {
            return 0;
        }
        len - self.latency.count_between(0, us)
    }

    /// Adds a single request.
    pub fn record(&mut self, latency_us: u64, error: bool) {
        self.requests += 1;
        self.errors += u64::from(error);
        self.latency
            .saturating_record(latency_us.clamp(1, MAX_LATENCY_US));
    }

    /// Adds `other`'s records (same histogram bounds: adding cannot fail).
    pub fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.errors += other.errors;
        let _ = self.latency.add(&other.latency);
        self.capped += other.capped;
        self.apart += other.apart;
    }

    fn clear(&mut self) {
        self.requests = 0;
        self.errors = 0;
        self.latency.reset();
        self.capped = 0;
        self.apart = 0;
    }
}

/// The window as the judge reads it: each slot's records of both pools, oldest
/// first (`None`: the pool had no request in that slot), and their sums.
#[derive(Debug, Clone)]
pub struct Window {
    /// `[production, canary]` per slot.
    pub slots: Vec<[Option<PoolWindow>; 2]>,
    pub production: PoolWindow,
    pub canary: PoolWindow,
    /// The epoch of the last slot (`now_ms / slot_ms + 1` of its time; the slot
    /// before it is one less): what lets the error detector fold each slot in once.
    pub epoch: u64,
    /// The last slot is the current one, still filling: the detector leaves it
    /// for a later check.
    pub filling: bool,
}

impl Window {
    /// The window of these slots (oldest first), with their sums: all complete,
    /// with epochs `1..=len`.
    pub fn from_slots(slots: Vec<[Option<PoolWindow>; 2]>) -> Self {
        let (mut production, mut canary) = (PoolWindow::default(), PoolWindow::default());
        for [p, c] in &slots {
            if let Some(p) = p {
                production.add(p);
            }
            if let Some(c) = c {
                canary.add(c);
            }
        }
        Self {
            epoch: u64::try_from(slots.len()).unwrap_or(u64::MAX),
            filling: false,
            slots,
            production,
            canary,
        }
    }

    /// The slots time has moved past (all but a filling last one), with their
    /// epochs, oldest first (slots before epoch 1, the clock's start, left out).
    pub fn complete(&self) -> impl Iterator<Item = (u64, &[Option<PoolWindow>; 2])> {
        let len = self.slots.len();
        let complete = len - usize::from(self.filling && len > 0);
        // Slot `i` is `len - 1 - i` slots before the last.
        let before_last = move |i: usize| u64::try_from(len - 1 - i).unwrap_or(u64::MAX);
        self.slots[..complete]
            .iter()
            .enumerate()
            .filter_map(move |(i, slot)| {
                let epoch = self.epoch.checked_sub(before_last(i))?;
                (epoch > 0).then_some((epoch, slot))
            })
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// `now_ms / slot_ms + 1` of the time it holds; 0: never used.
    epoch: u64,
    /// Made at the slot's first request of a pool, then reused round after round.
    pools: [Option<PoolWindow>; 2],
}

#[derive(Debug)]
struct Shard {
    slot_ms: u64,
    slots: Vec<Slot>,
}

impl Shard {
    fn new(slot_ms: u64) -> Self {
        Self {
            slot_ms,
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    fn epoch(&self, now_ms: u64) -> u64 {
        now_ms / self.slot_ms + 1
    }

    /// The slot for `now_ms`, cleared first if it still holds an older time.
    fn slot(&mut self, now_ms: u64) -> &mut Slot {
        let epoch = self.epoch(now_ms);
        let slot = &mut self.slots[usize::try_from(epoch % SLOTS).unwrap_or(0)];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            for pool in slot.pools.iter_mut().flatten() {
                pool.clear();
            }
        }
        slot
    }
}

const fn pool_index(pool: PoolKind) -> usize {
    match pool {
        PoolKind::Production => 0,
        PoolKind::Canary => 1,
    }
}

/// How the routing placed a request, as the analysis sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// By the sticky bucket: judged, within its client's cap.
    Bucket(ClientKeys),
    /// By anything else (override, failover, kill switch): counted apart.
    Apart,
    /// Refused by the proxy before any backend (a bad request, a full queue): says
    /// nothing of either version, counted apart.
    Refused,
}

/// What became of a request in the analysis: the `counted` label of
/// `canarygate_analysis_requests_total` (with the routing reason for `Apart`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// The analysis is off: nothing recorded.
    Off,
    Judged,
    Capped,
    Apart,
    Refused,
}

/// Per-worker request windows of both pools. Records nothing until enabled.
#[derive(Debug)]
pub struct Recorder {
    enabled: AtomicBool,
    /// The [`ClientLimit`], packed so the request path reads it without a lock:
    /// the share in millionths, then a bit each for the sticky key and the address.
    limit: AtomicU64,
    /// How much each client counted in the current slot (both pools).
    tally: Tally,
    hasher: ClientHasher,
    shards: Box<[Mutex<Shard>]>,
}

const STICKY_BIT: u64 = 1 << 32;
const ADDRESS_BIT: u64 = 1 << 33;

fn pack(limit: &ClientLimit) -> u64 {
    // The share is validated to (0, 1]: its millionths fit 32 bits.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let ppm = (limit.share.clamp(0.0, 1.0) * 1e6).round() as u64;
    ppm | if limit.sticky { STICKY_BIT } else { 0 } | if limit.address { ADDRESS_BIT } else { 0 }
}

fn unpack(packed: u64) -> ClientLimit {
    ClientLimit {
        share: super::stats::to_f64(packed & 0xffff_ffff) / 1e6,
        sticky: packed & STICKY_BIT != 0,
        address: packed & ADDRESS_BIT != 0,
    }
}

impl Recorder {
    /// A disabled recorder with `shards` shards (one per worker thread); see
    /// [`Recorder::configure`].
    pub fn new(shards: usize) -> Self {
        let slot_ms = slot_ms(0);
        Self {
            enabled: AtomicBool::new(false),
            limit: AtomicU64::new(pack(&ClientLimit::default())),
            tally: Tally::default(),
            hasher: ClientHasher::default(),
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Shard::new(slot_ms)))
                .collect(),
        }
    }

    /// Turns recording on or off, for windows of `window_ms` (a new window length
    /// starts from empty), with each client capped by `limit`.
    pub fn configure(&self, enabled: bool, window_ms: u64, limit: &ClientLimit) {
        self.limit.store(pack(limit), Ordering::Relaxed);
        let slot_ms = slot_ms(window_ms);
        for shard in &self.shards {
            let mut shard = lock(shard);
            if shard.slot_ms != slot_ms {
                *shard = Shard::new(slot_ms);
            }
        }
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Forgets every record (and the client cap they set).
    pub fn clear(&self) {
        let limit = unpack(self.limit.load(Ordering::Relaxed));
        self.tally.set_cap(&limit, 0, SLOTS);
        for shard in &self.shards {
            let mut shard = lock(shard);
            let slot_ms = shard.slot_ms;
            *shard = Shard::new(slot_ms);
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Records one answered request of `pool` in the calling worker's shard: judged
    /// when the bucket placed it and its client is within the cap, else counted
    /// apart.
    pub fn record(
        &self,
        pool: PoolKind,
        now_ms: u64,
        latency: Duration,
        error: bool,
        placed: Placed,
    ) -> Counted {
        if !self.is_enabled() {
            return Counted::Off;
        }
        let mut shard = self.local();
        let epoch = shard.epoch(now_ms);
        let counted = match placed {
            Placed::Apart => Counted::Apart,
            Placed::Refused => Counted::Refused,
            Placed::Bucket(keys) => {
                let limit = unpack(self.limit.load(Ordering::Relaxed));
                if self.tally.admit(&limit, keys, epoch) {
                    Counted::Judged
                } else {
                    Counted::Capped
                }
            }
        };
        let window =
            shard.slot(now_ms).pools[pool_index(pool)].get_or_insert_with(PoolWindow::default);
        match counted {
            Counted::Judged => {
                let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                window.record(latency_us, error);
            }
            Counted::Capped => window.capped += 1,
            Counted::Apart | Counted::Refused | Counted::Off => window.apart += 1,
        }
        counted
    }

    /// Who a client is for the per-client cap: its sticky key, if the bucket came
    /// from one, and its address.
    pub fn client_keys(&self, sticky: Option<&[u8]>, address: std::net::IpAddr) -> ClientKeys {
        self.hasher.keys(sticky, address)
    }

    /// The per-slot cap of one client's judged requests (both pools), as of the
    /// last [`Recorder::window`].
    pub fn client_cap(&self) -> u64 {
        self.tally.cap()
    }

    /// Records an error of a request already judged (its response body failed).
    ///
    /// The error goes to the slot the request was recorded in (`recorded_ms`), and
    /// only while that slot still holds it: errors cut long after cannot pile up in
    /// one later window.
    pub fn record_late_error(&self, pool: PoolKind, recorded_ms: u64) {
        if !self.is_enabled() {
            return;
        }
        let mut shard = self.local();
        let epoch = shard.epoch(recorded_ms);
        let slot = &mut shard.slots[usize::try_from(epoch % SLOTS).unwrap_or(0)];
        if slot.epoch == epoch
            && let Some(window) = &mut slot.pools[pool_index(pool)]
        {
            window.errors += 1;
        }
    }

    /// Both pools' records of the window ending at `now_ms`, merged over the shards:
    /// `[production, canary]`. Also sets each pool's client cap from it.
    pub fn window(&self, now_ms: u64) -> [PoolWindow; 2] {
        let Window {
            production, canary, ..
        } = self.judged(now_ms);
        [production, canary]
    }

    /// The window ending at `now_ms` as the judge reads it: slot by slot and in
    /// total, merged over the shards. Also sets the client cap from it (the judge
    /// reads the window once per check). Off the request path: it takes each
    /// shard's lock once.
    pub fn judged(&self, now_ms: u64) -> Window {
        let current = self.shards.first().map_or(1, |s| lock(s).epoch(now_ms));
        // Oldest first: index 0 is the slot SLOTS - 1 before the current one.
        let mut slots: Vec<[Option<PoolWindow>; 2]> = (0..SLOTS).map(|_| [None, None]).collect();
        for shard in &self.shards {
            let shard = lock(shard);
            for slot in &shard.slots {
                // In the window: the current slot and the SLOTS - 1 before it.
                if slot.epoch == 0 || slot.epoch > current || slot.epoch + SLOTS <= current {
                    continue;
                }
                let at = usize::try_from(slot.epoch + SLOTS - 1 - current).unwrap_or(0);
                for (into, from) in slots[at].iter_mut().zip(&slot.pools) {
                    if let Some(from) = from {
                        into.get_or_insert_with(PoolWindow::default).add(from);
                    }
                }
            }
        }
        let mut window = Window::from_slots(slots);
        window.epoch = current;
        window.filling = true;
        let limit = unpack(self.limit.load(Ordering::Relaxed));
        let in_force = self.tally.cap();
        window.production.client_cap = in_force;
        window.canary.client_cap = in_force;
        let judged = window.production.requests + window.canary.requests;
        self.tally.set_cap(&limit, judged, SLOTS);
        window
    }

    fn local(&self) -> MutexGuard<'_, Shard> {
        lock(&self.shards[crate::worker::index() % self.shards.len()])
    }
}

/// The slot length for a window: `window_ms / SLOTS`, rounded up, at least 1 ms.
pub fn slot_ms(window_ms: u64) -> u64 {
    window_ms.div_ceil(SLOTS).max(1)
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    /// No client cap: these tests are about slots and shards.
    const UNCAPPED: ClientLimit = ClientLimit {
        share: 1.0,
        sticky: false,
        address: false,
    };

    fn bucket() -> Placed {
        Placed::Bucket(
            super::super::clients::ClientHasher::default()
                .keys(None, std::net::IpAddr::from([192, 0, 2, 1])),
        )
    }

    #[test]
    fn a_window_holds_the_current_slot_and_the_23_before_it() {
        // Window 24 s: slots of 1 s.
        let recorder = Recorder::new(1);
        recorder.configure(true, 24_000, &UNCAPPED);
        assert_eq!(slot_ms(24_000), 1_000);
        // One canary request per second from t = 0 to t = 29 s; every fifth an error.
        for s in 0..30u64 {
            recorder.record(
                PoolKind::Canary,
                s * 1_000 + 500,
                Duration::from_millis(s + 1),
                s % 5 == 0,
                bucket(),
            );
        }
        recorder.record(PoolKind::Production, 29_900, MS * 7, false, bucket());
        // At t = 29.9 s the window is slots 6..=29 (epochs 7..=30): 24 requests,
        // errors at 10, 15, 20, 25; latencies 7..=30 ms.
        let [production, canary] = recorder.window(29_900);
        assert_eq!((canary.requests, canary.errors), (24, 4));
        assert_eq!((production.requests, production.errors), (1, 0));
        assert!(canary.latency.equivalent(canary.latency.min(), 7_000));
        assert!(canary.latency.equivalent(canary.latency.max(), 30_000));
        // One slot later, slot 6 has left the window and nothing new came.
        let [_, canary] = recorder.window(30_000);
        assert_eq!((canary.requests, canary.errors), (23, 4));
        // Far later, all of it has left.
        let [production, canary] = recorder.window(60_000);
        assert_eq!((canary.requests, production.requests), (0, 0));
        assert!(canary.latency.is_empty());
    }

    #[test]
    fn the_complete_slots_carry_their_epochs() {
        // Window 24 s: slots of 1 s; requests at 0.5 s and 2.5 s, the check at 2.7 s.
        let recorder = Recorder::new(1);
        recorder.configure(true, 24_000, &UNCAPPED);
        recorder.record(PoolKind::Canary, 500, MS, true, bucket());
        recorder.record(PoolKind::Canary, 2_500, MS, false, bucket());
        let window = recorder.judged(2_700);
        // The current slot (epoch 3, 2..3 s) is still filling and left out; the
        // slots before epoch 1 (the clock's start) are too.
        assert_eq!((window.epoch, window.filling), (3, true));
        let complete: Vec<(u64, u64)> = window
            .complete()
            .map(|(epoch, [_, canary])| (epoch, canary.as_ref().map_or(0, |c| c.requests)))
            .collect();
        assert_eq!(complete, [(1, 1), (2, 0)]);
        // Built from slots, all are complete, epochs 1..=len.
        let built = Window::from_slots(vec![[None, None], [None, None]]);
        assert_eq!(built.complete().map(|(e, _)| e).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_slot_reused_a_round_later_starts_empty() {
        let recorder = Recorder::new(1);
        recorder.configure(true, 24_000, &UNCAPPED);
        recorder.record(PoolKind::Canary, 1_500, MS * 900, true, bucket());
        // 24 s later the same ring position holds epoch 26: the old request is gone.
        recorder.record(PoolKind::Canary, 25_500, MS * 3, false, bucket());
        let [_, canary] = recorder.window(25_600);
        assert_eq!((canary.requests, canary.errors), (1, 0));
        assert!(canary.latency.equivalent(canary.latency.max(), 3_000));
    }

    #[test]
    fn shards_are_merged_and_disabled_records_nothing() {
        let recorder = Recorder::new(3);
        recorder.record(PoolKind::Canary, 10, MS, true, bucket());
        assert_eq!(recorder.window(10)[1].requests, 0, "disabled");
        recorder.configure(true, 120_000, &UNCAPPED);
        for worker in 0..3 {
            std::thread::scope(|s| {
                s.spawn(|| {
                    crate::worker::set_index(worker);
                    recorder.record(PoolKind::Canary, 10, MS * 2, worker == 1, bucket());
                    recorder.record(PoolKind::Production, 10, MS, false, bucket());
                    recorder.record_late_error(PoolKind::Production, 10);
                });
            });
        }
        let [production, canary] = recorder.window(10);
        assert_eq!((canary.requests, canary.errors), (3, 1));
        assert_eq!((production.requests, production.errors), (3, 3));
        // A late error whose request's slot has left the window is dropped.
        recorder.record_late_error(PoolKind::Production, 10 + 120_000);
        assert_eq!(recorder.window(10)[0].errors, 3);
        // A new window length starts from empty; so does a clear.
        recorder.configure(true, 60_000, &UNCAPPED);
        assert_eq!(recorder.window(10)[1].requests, 0);
        recorder.record(PoolKind::Canary, 10, MS, true, bucket());
        assert_eq!(recorder.window(10)[1].requests, 1);
        recorder.clear();
        assert_eq!(recorder.window(10)[1].requests, 0);
    }

    #[test]
    fn only_bucket_placed_requests_within_the_cap_are_judged() {
        let recorder = Recorder::new(1);
        let limit = ClientLimit {
            share: 0.05,
            ..ClientLimit::default()
        };
        recorder.configure(true, 24_000, &limit);
        let heavy = Placed::Bucket(recorder.client_keys(Some(b"heavy"), [192, 0, 2, 9].into()));
        // Before any window was read the cap is one request per client per slot.
        for _ in 0..10 {
            recorder.record(PoolKind::Canary, 500, MS, true, heavy);
        }
        recorder.record(PoolKind::Canary, 500, MS, true, Placed::Apart);
        let [_, canary] = recorder.window(600);
        assert_eq!(
            (canary.requests, canary.errors, canary.capped, canary.apart),
            (1, 1, 9, 1)
        );
        // Many ordinary clients raise the cap; the heavy one counts up to it.
        for i in 0..1_000u32 {
            let keys = recorder.client_keys(
                None,
                std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes()),
            );
            recorder.record(PoolKind::Canary, 1_500, MS, false, Placed::Bucket(keys));
        }
        let [_, canary] = recorder.window(1_600);
        // At a cap of one, a thousand clients in 2,048 counters: a few collide and are
        // capped (the sketch only ever overcounts).
        assert!(canary.requests > 900, "{}", canary.requests);
        // 5% of the judged requests per slot (24 slots).
        let cap = super::super::clients::cap(0.05, canary.requests, SLOTS);
        assert!(cap >= 2);
        assert_eq!(recorder.client_cap(), cap);
        let cap = usize::try_from(cap).unwrap();
        let counted: Vec<_> = (0..8)
            .map(|_| recorder.record(PoolKind::Canary, 2_500, MS, true, heavy))
            .collect();
        assert_eq!(counted[cap - 1], Counted::Judged);
        assert_eq!(counted[cap], Counted::Capped);
    }

    #[test]
    fn one_clients_judged_requests_follow_its_placement_across_the_pools() {
        // At the floor (one judged request per slot), a client the bucket spreads
        // 10/90 is judged 10/90: the cap is over both pools together.
        let recorder = Recorder::new(1);
        recorder.configure(true, 24_000, &ClientLimit::default());
        let client = Placed::Bucket(recorder.client_keys(None, [192, 0, 2, 9].into()));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut judged = [0u32; 2];
        for slot in 0..2_000u64 {
            for _ in 0..20 {
                let pool = if rng.u8(..100) < 10 {
                    PoolKind::Canary
                } else {
                    PoolKind::Production
                };
                if recorder.record(pool, slot * 1_000 + 1, MS, true, client) == Counted::Judged {
                    judged[pool_index(pool)] += 1;
                }
            }
        }
        assert_eq!(judged[0] + judged[1], 2_000, "one per slot");
        assert!(
            (150..=250).contains(&judged[1]),
            "canary judged {}",
            judged[1]
        );
    }

    #[test]
    fn quantiles_and_counts_above() {
        let mut window = PoolWindow::default();
        for ms in 1..=100u64 {
            window.record(ms * 1_000, ms > 95);
        }
        assert_eq!(window.requests, 100);
        assert!((window.error_ratio() - 0.05).abs() < 1e-12);
        // Rank 50 of 1..=100 ms is 50 ms, rank 99 is 99 ms (to 1%).
        let p50 = window.quantile_us(0.5).unwrap();
        let p99 = window.quantile_us(0.99).unwrap();
        assert!(window.latency.equivalent(p50, 50_000), "{p50}");
        assert!(window.latency.equivalent(p99, 99_000), "{p99}");
        assert_eq!(window.count_above(90_000), 10);
        assert_eq!(window.count_above(100_000), 0);
        assert_eq!(PoolWindow::default().quantile_us(0.99), None);
    }
}
