//! Per-core metric cells and the metric sets of services, backends and the
//! process. The dataplane and control crates use these names and
//! signatures.
//!
//! Rule: every per-core cell has one slot per worker, each slot on its own
//! cache line(s), and slot `k` has exactly one writer, worker `k`, which
//! updates it with a relaxed load + store (no read-modify-write, no lock
//! prefix). Readers (the scrape) sum the slots with relaxed loads and may see
//! a total that is a few increments old; they never see a torn value. A core
//! index outside `0..cores` is ignored rather than panicking on the hot path.
//!
//! ```
//! use sluice_metrics::{PerCoreCounter, PerCoreGauge};
//!
//! let opened = PerCoreCounter::new(2);
//! opened.inc(0); // worker 0
//! opened.add(1, 2); // worker 1
//! assert_eq!(opened.get(), 3);
//!
//! let active = PerCoreGauge::new(2);
//! active.add(0, 1); // accepted on worker 0
//! active.add(1, -1); // the count moved: closed on worker 1
//! assert_eq!(active.get(), 0);
//! ```

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Aligns (and so pads) `T` to the unit of false sharing: 128 bytes where
/// the CPU prefetches cache lines in pairs (x86_64, aarch64, powerpc64), 64
/// bytes elsewhere. Safe-Rust equivalent of `crossbeam_utils::CachePadded`.
#[derive(Debug, Default)]
#[cfg_attr(
    any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "powerpc64"
    ),
    repr(align(128))
)]
#[cfg_attr(
    not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "powerpc64"
    )),
    repr(align(64))
)]
pub(crate) struct CachePadded<T>(T);

impl<T> Deref for CachePadded<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Single-writer increment: a relaxed load and a relaxed store.
#[inline]
#[cfg_attr(feature = "counters-off", allow(dead_code))]
fn bump(cell: &AtomicU64, n: u64) {
    cell.store(
        cell.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// A counter with one slot per core; each slot has a single writer.
#[derive(Debug)]
pub struct PerCoreCounter {
    slots: Box<[CachePadded<AtomicU64>]>,
}

impl PerCoreCounter {
    /// A counter for `cores` workers (at least one slot).
    pub fn new(cores: usize) -> Self {
        Self {
            slots: (0..cores.max(1)).map(|_| CachePadded::default()).collect(),
        }
    }
    /// Add `n` to core `core`'s slot. Only worker `core` calls this.
    #[inline]
    pub fn add(&self, core: usize, n: u64) {
        #[cfg(not(feature = "counters-off"))]
        if let Some(s) = self.slots.get(core) {
            bump(s, n);
        }
        #[cfg(feature = "counters-off")]
        let _ = (core, n);
    }
    /// Add 1 to core `core`'s slot. Only worker `core` calls this.
    #[inline]
    pub fn inc(&self, core: usize) {
        self.add(core, 1)
    }
    /// Sum of all slots.
    pub fn get(&self) -> u64 {
        self.slots
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.load(Ordering::Relaxed)))
    }
    /// Number of slots.
    pub fn cores(&self) -> usize {
        self.slots.len()
    }
}

/// A gauge with one slot per core (each core adds and subtracts its own).
///
/// A single slot may go negative (a count opened on one core and closed on
/// another); only the sum is meaningful.
#[derive(Debug)]
pub struct PerCoreGauge {
    slots: Box<[CachePadded<AtomicI64>]>,
}

impl PerCoreGauge {
    /// A gauge for `cores` workers (at least one slot).
    pub fn new(cores: usize) -> Self {
        Self {
            slots: (0..cores.max(1)).map(|_| CachePadded::default()).collect(),
        }
    }
    /// Add `delta` (may be negative) to core `core`'s slot. Only worker
    /// `core` calls this.
    #[inline]
    pub fn add(&self, core: usize, delta: i64) {
        #[cfg(not(feature = "counters-off"))]
        if let Some(s) = self.slots.get(core) {
            s.store(
                s.load(Ordering::Relaxed).wrapping_add(delta),
                Ordering::Relaxed,
            );
        }
        #[cfg(feature = "counters-off")]
        let _ = (core, delta);
    }
    /// `add(core, 1)`.
    #[inline]
    pub fn inc(&self, core: usize) {
        self.add(core, 1)
    }
    /// `add(core, -1)`.
    #[inline]
    pub fn dec(&self, core: usize) {
        self.add(core, -1)
    }
    /// Sum of all slots. Can be transiently negative while a scrape races a
    /// worker that moved the count between slots.
    pub fn get(&self) -> i64 {
        self.slots
            .iter()
            .fold(0i64, |acc, s| acc.wrapping_add(s.load(Ordering::Relaxed)))
    }
    /// [`get`](Self::get) clamped at 0: what the exposition shows.
    pub fn get_clamped(&self) -> u64 {
        u64::try_from(self.get()).unwrap_or(0)
    }
    /// Number of slots.
    pub fn cores(&self) -> usize {
        self.slots.len()
    }
}

/// Metrics of one service (labels: `service`).
#[derive(Debug)]
pub struct ServiceMetrics {
    pub service: String,
    /// TCP connections closed and UDP datagrams dropped because no backend
    /// was healthy.
    pub no_backend: PerCoreCounter,
    pub udp_to_backend: PerCoreCounter,
    pub udp_to_client: PerCoreCounter,
    /// Datagrams dropped (malformed, over max_sessions, no backend).
    pub udp_dropped: PerCoreCounter,
    pub udp_sessions: PerCoreGauge,
    pub dns_answered: PerCoreCounter,
    pub dns_timeout: PerCoreCounter,
    pub dns_orphan_reply: PerCoreCounter,
}

impl ServiceMetrics {
    pub fn new(service: &str, cores: usize) -> Self {
        Self {
            service: service.to_string(),
            no_backend: PerCoreCounter::new(cores),
            udp_to_backend: PerCoreCounter::new(cores),
            udp_to_client: PerCoreCounter::new(cores),
            udp_dropped: PerCoreCounter::new(cores),
            udp_sessions: PerCoreGauge::new(cores),
            dns_answered: PerCoreCounter::new(cores),
            dns_timeout: PerCoreCounter::new(cores),
            dns_orphan_reply: PerCoreCounter::new(cores),
        }
    }
}

/// Metrics of one backend of one service (labels: `service`, `backend`).
#[derive(Debug)]
pub struct BackendMetrics {
    pub service: String,
    /// `IP:port`.
    pub backend: String,
    pub connections: PerCoreCounter,
    pub active: PerCoreGauge,
    pub bytes_to_backend: PerCoreCounter,
    pub bytes_to_client: PerCoreCounter,
    pub connect_errors: PerCoreCounter,
    pub connect_duration: PerCoreHistogram,
    /// Written by the control thread only.
    pub up: AtomicBool,
    /// Written by the control thread only.
    pub checks_pass: AtomicU64,
    /// Written by the control thread only.
    pub checks_fail: AtomicU64,
}

impl BackendMetrics {
    pub fn new(service: &str, backend: &str, cores: usize) -> Self {
        Self {
            service: service.to_string(),
            backend: backend.to_string(),
            connections: PerCoreCounter::new(cores),
            active: PerCoreGauge::new(cores),
            bytes_to_backend: PerCoreCounter::new(cores),
            bytes_to_client: PerCoreCounter::new(cores),
            connect_errors: PerCoreCounter::new(cores),
            connect_duration: PerCoreHistogram::new(cores),
            up: AtomicBool::new(true),
            checks_pass: AtomicU64::new(0),
            checks_fail: AtomicU64::new(0),
        }
    }
}

/// Upper bounds (seconds) of the connect-duration histogram buckets.
pub const CONNECT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// [`CONNECT_BUCKETS`] in nanoseconds, so the hot path compares integers.
pub const CONNECT_BUCKETS_NANOS: [u64; 12] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// Buckets per core: one per bound plus `+Inf`.
const NBUCKETS: usize = CONNECT_BUCKETS.len() + 1;

/// One core's share of a histogram: 13 bucket counts and the sum, 112 bytes,
/// kept together on one padded block (one core touches one block).
#[derive(Debug, Default)]
struct HistogramSlot {
    /// Non-cumulative: `buckets[i]` counts observations in
    /// `(bound[i-1], bound[i]]`; the last one is `+Inf`.
    buckets: [AtomicU64; NBUCKETS],
    sum_nanos: AtomicU64,
}

/// A histogram with one set of buckets per core (buckets
/// [`CONNECT_BUCKETS`], upper bounds inclusive).
#[derive(Debug)]
pub struct PerCoreHistogram {
    slots: Box<[CachePadded<HistogramSlot>]>,
}

impl PerCoreHistogram {
    /// A histogram for `cores` workers (at least one slot).
    pub fn new(cores: usize) -> Self {
        Self {
            slots: (0..cores.max(1)).map(|_| CachePadded::default()).collect(),
        }
    }
    /// Record one observation on core `core`. Only worker `core` calls this.
    #[inline]
    pub fn observe_nanos(&self, core: usize, nanos: u64) {
        #[cfg(feature = "counters-off")]
        let _ = (core, nanos);
        #[cfg(not(feature = "counters-off"))]
        {
            let Some(slot) = self.slots.get(core) else {
                return;
            };
            let idx = CONNECT_BUCKETS_NANOS
                .iter()
                .position(|&b| nanos <= b)
                .unwrap_or(NBUCKETS - 1);
            bump(&slot.buckets[idx], 1);
            bump(&slot.sum_nanos, nanos);
        }
    }
    /// [`observe_nanos`](Self::observe_nanos) with a `Duration` (saturating
    /// at `u64::MAX` nanoseconds).
    #[inline]
    pub fn observe(&self, core: usize, elapsed: Duration) {
        self.observe_nanos(core, u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }
    /// (non-cumulative bucket counts incl. +Inf, sum in seconds).
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut buckets = vec![0u64; NBUCKETS];
        let mut sum_nanos = 0u64;
        for slot in self.slots.iter() {
            for (total, cell) in buckets.iter_mut().zip(slot.buckets.iter()) {
                *total = total.wrapping_add(cell.load(Ordering::Relaxed));
            }
            sum_nanos = sum_nanos.wrapping_add(slot.sum_nanos.load(Ordering::Relaxed));
        }
        (buckets, sum_nanos as f64 / 1e9)
    }
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.buckets.iter())
            .fold(0u64, |acc, c| acc.wrapping_add(c.load(Ordering::Relaxed)))
    }
    /// Number of slots.
    pub fn cores(&self) -> usize {
        self.slots.len()
    }
}

/// Process-wide metrics owned by the control thread.
#[derive(Debug, Default)]
pub struct GlobalMetrics {
    pub reloads_success: AtomicU64,
    pub reloads_failure: AtomicU64,
}

impl GlobalMetrics {
    /// Count one reload attempt (control thread).
    pub fn record_reload(&self, ok: bool) {
        let cell = if ok {
            &self.reloads_success
        } else {
            &self.reloads_failure
        };
        cell.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, size_of};

    #[cfg(not(feature = "counters-off"))] // the values stay 0 then
    #[test]
    fn counter_sums_across_cores() {
        let c = PerCoreCounter::new(4);
        c.inc(0);
        c.add(1, 10);
        c.add(2, 100);
        c.inc(3);
        c.inc(3);
        assert_eq!(c.get(), 113);
        assert_eq!(c.cores(), 4);
    }

    #[cfg(not(feature = "counters-off"))] // the values stay 0 then
    #[test]
    fn counter_ignores_out_of_range_core_and_has_one_slot_minimum() {
        let c = PerCoreCounter::new(0);
        assert_eq!(c.cores(), 1);
        c.inc(0);
        c.add(7, 5);
        assert_eq!(c.get(), 1);
    }

    #[cfg(not(feature = "counters-off"))] // the values stay 0 then
    #[test]
    fn counter_is_summed_from_real_threads() {
        let c = std::sync::Arc::new(PerCoreCounter::new(4));
        let workers: Vec<_> = (0..4)
            .map(|core| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.inc(core);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(c.get(), 40_000);
    }

    #[cfg(not(feature = "counters-off"))] // the values stay 0 then
    #[test]
    fn gauge_up_on_one_core_down_on_another_sums_to_zero() {
        let g = PerCoreGauge::new(2);
        g.add(0, 1);
        g.add(1, -1);
        assert_eq!(g.get(), 0);
        g.inc(0);
        g.inc(0);
        g.dec(1);
        assert_eq!(g.get(), 1);
        assert_eq!(g.get_clamped(), 1);
    }

    #[cfg(not(feature = "counters-off"))] // the values stay 0 then
    #[test]
    fn gauge_clamps_at_zero() {
        let g = PerCoreGauge::new(2);
        g.dec(1);
        assert_eq!(g.get(), -1);
        assert_eq!(g.get_clamped(), 0);
    }

    #[test]
    fn slots_do_not_share_cache_lines() {
        assert!(align_of::<CachePadded<AtomicU64>>() >= 64);
        assert!(size_of::<CachePadded<AtomicU64>>() >= 64);
        // 13 buckets + sum = 112 bytes: one padded block per core.
        assert_eq!(size_of::<CachePadded<HistogramSlot>>(), 128);
        let c = PerCoreCounter::new(2);
        let a = &*c.slots[0] as *const AtomicU64 as usize;
        let b = &*c.slots[1] as *const AtomicU64 as usize;
        assert!(
            b - a >= 64,
            "slots {a:#x} and {b:#x} are within one cache line"
        );
    }

    #[test]
    fn bucket_bounds_agree() {
        for (secs, nanos) in CONNECT_BUCKETS.iter().zip(CONNECT_BUCKETS_NANOS) {
            assert_eq!((secs * 1e9).round() as u64, nanos);
        }
        assert!(CONNECT_BUCKETS_NANOS.windows(2).all(|w| w[0] < w[1]));
    }

    #[cfg(not(feature = "counters-off"))] // the values stay 0 then
    #[test]
    fn histogram_buckets_bounds_inclusive_and_count_matches() {
        let h = PerCoreHistogram::new(3);
        h.observe_nanos(0, 50_000); // <= 0.0001
        h.observe_nanos(1, 100_000); // == 0.0001, inclusive
        h.observe_nanos(2, 100_001); // <= 0.00025
        h.observe_nanos(0, 30_000_000); // <= 0.05
        h.observe(1, Duration::from_secs(2)); // +Inf
        let (buckets, sum) = h.snapshot();
        assert_eq!(buckets.len(), CONNECT_BUCKETS.len() + 1);
        assert_eq!(buckets[0], 2);
        assert_eq!(buckets[1], 1);
        assert_eq!(buckets[8], 1);
        assert_eq!(buckets[12], 1);
        assert_eq!(buckets.iter().sum::<u64>(), 5);
        assert_eq!(h.count(), 5);
        let expect = (50_000 + 100_000 + 100_001 + 30_000_000 + 2_000_000_000) as f64 / 1e9;
        assert!((sum - expect).abs() < 1e-12, "{sum} != {expect}");
    }

    #[test]
    fn reloads_are_counted_by_result() {
        let g = GlobalMetrics::default();
        g.record_reload(true);
        g.record_reload(false);
        g.record_reload(false);
        assert_eq!(g.reloads_success.load(Ordering::Relaxed), 1);
        assert_eq!(g.reloads_failure.load(Ordering::Relaxed), 2);
    }
}
