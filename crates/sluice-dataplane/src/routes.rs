//! What the control thread gives a worker about a service: its settings,
//! its routing snapshot (healthy backends) and its live counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use sluice_balance::{Load, Snapshot};
use sluice_config::Service;
use sluice_metrics::{BackendMetrics, ServiceMetrics};

/// One backend as a worker needs it. `Load` and the metrics live as long as
/// the backend stays in the configuration (they survive reloads), so a
/// connection that outlives its backend's removal still updates them.
#[derive(Debug, Clone)]
pub struct BackendRoute {
    pub addr: SocketAddr,
    pub load: Arc<Load>,
    pub metrics: Arc<BackendMetrics>,
    pub max_connections: u32,
}

/// Connections of one service across all workers (for the service-level
/// `max_connections`). Survives reloads of the same service.
#[derive(Debug, Default)]
pub struct ServiceLimit {
    pub active: AtomicU32,
    /// Woken when a connection of the service closes, so paused accept
    /// loops resume.
    pub released: tokio::sync::Notify,
}

impl ServiceLimit {
    /// Take a slot if `max` (0 = unlimited) allows.
    pub fn try_acquire(&self, max: u32) -> bool {
        if max == 0 {
            self.active.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Give a slot back.
    pub fn release(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// Give a TCP connection's slot back and wake accept loops paused at
    /// the limit. Only a limited service (`max` != 0) can have paused
    /// loops, so an unlimited one skips the wake-up (it takes a lock shared
    /// by every core). A limit raised by a reload during a pause is caught
    /// by the paused loop's own short re-check.
    pub fn release_and_wake(&self, max: u32) {
        self.release();
        if max != 0 {
            self.released.notify_waiters();
        }
    }

    pub fn is_full(&self, max: u32) -> bool {
        max != 0 && self.active.load(Ordering::Acquire) >= max
    }
}

/// Everything a worker needs to serve one service. Immutable; a new one is
/// sent on every health change or reload.
#[derive(Debug)]
pub struct ServiceRoutes {
    pub service: Arc<Service>,
    /// Healthy backends only; `pick` returns indices into `backends`.
    pub snapshot: Snapshot,
    /// All configured backends, indexed by `Endpoint::id`.
    pub backends: Vec<BackendRoute>,
    pub metrics: Arc<ServiceMetrics>,
    pub limit: Arc<ServiceLimit>,
}

impl ServiceRoutes {
    pub fn name(&self) -> &str {
        &self.service.name
    }
}
