//! Public metric types. The implementation may be reorganised but these
//! names and signatures are what the dataplane and control crates use.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A counter with one slot per core; each slot has a single writer.
#[derive(Debug)]
pub struct PerCoreCounter {
    slots: Box<[AtomicU64]>,
}

impl PerCoreCounter {
    pub fn new(cores: usize) -> Self {
        Self { slots: (0..cores.max(1)).map(|_| AtomicU64::new(0)).collect() }
    }
    /// Add `n` to core `core`'s slot. Only worker `core` calls this.
    #[inline]
    pub fn add(&self, core: usize, n: u64) {
        if let Some(s) = self.slots.get(core) {
            s.store(s.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        }
    }
    #[inline]
    pub fn inc(&self, core: usize) {
        self.add(core, 1)
    }
    /// Sum of all slots.
    pub fn get(&self) -> u64 {
        self.slots.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// A gauge with one slot per core (each core adds and subtracts its own).
#[derive(Debug)]
pub struct PerCoreGauge {
    slots: Box<[AtomicU64]>,
}

impl PerCoreGauge {
    pub fn new(cores: usize) -> Self {
        Self { slots: (0..cores.max(1)).map(|_| AtomicU64::new(0)).collect() }
    }
    #[inline]
    pub fn add(&self, core: usize, delta: i64) {
        if let Some(s) = self.slots.get(core) {
            s.store(s.load(Ordering::Relaxed).wrapping_add(delta as u64), Ordering::Relaxed);
        }
    }
    pub fn get(&self) -> i64 {
        self.slots.iter().map(|s| s.load(Ordering::Relaxed) as i64).sum()
    }
}

/// Metrics of one service (labels: `service`).
#[derive(Debug)]
pub struct ServiceMetrics {
    pub service: String,
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
    pub checks_pass: AtomicU64,
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
pub const CONNECT_BUCKETS: [f64; 12] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// A histogram with one set of buckets per core.
#[derive(Debug)]
pub struct PerCoreHistogram {
    /// Per core: one count per bucket plus +Inf.
    buckets: Box<[PerCoreCounter]>,
    sum_nanos: PerCoreCounter,
}

impl PerCoreHistogram {
    pub fn new(cores: usize) -> Self {
        Self {
            buckets: (0..=CONNECT_BUCKETS.len()).map(|_| PerCoreCounter::new(cores)).collect(),
            sum_nanos: PerCoreCounter::new(cores),
        }
    }
    /// Record one observation on core `core`.
    pub fn observe_nanos(&self, core: usize, nanos: u64) {
        let secs = nanos as f64 / 1e9;
        let idx = CONNECT_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(CONNECT_BUCKETS.len());
        self.buckets[idx].inc(core);
        self.sum_nanos.add(core, nanos);
    }
    /// (non-cumulative bucket counts incl. +Inf, sum in seconds).
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        (self.buckets.iter().map(|b| b.get()).collect(), self.sum_nanos.get() as f64 / 1e9)
    }
}

/// Process-wide metrics owned by the control thread.
#[derive(Debug, Default)]
pub struct GlobalMetrics {
    pub reloads_success: AtomicU64,
    pub reloads_failure: AtomicU64,
}
