//! Public types of the balancer. The helper implementing the algorithms may
//! move code into modules (maglev.rs, wrr.rs, ...) but keeps these names and
//! signatures: the dataplane and control crates are written against them.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

/// Default Maglev table size (prime).
pub const DEFAULT_TABLE_SIZE: usize = 65537;

/// Which algorithm a snapshot uses (mirrors the config's `balance:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Maglev,
    SourceIp,
    RoundRobin,
    LeastConn,
    Random,
    TwoChoices,
    LeastLatency,
}

/// A backend as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Caller's identifier (the dataplane uses the backend's index in the
    /// service's configured backend list). Returned by [`Snapshot::pick`].
    pub id: u32,
    /// 1..=10000.
    pub weight: u32,
    /// Stable hash of the backend's address; Maglev permutations derive from
    /// it, so two processes with the same backends build the same table.
    pub hash: u64,
}

impl Endpoint {
    /// An endpoint whose `hash` is [`stable_hash`] of `address` (the backend
    /// address as `IP:port`).
    pub fn from_address(id: u32, weight: u32, address: &str) -> Self {
        Self { id, weight, hash: stable_hash(address.as_bytes()) }
    }
}

/// The fixed, documented hash used for endpoints and flows. Same output in
/// every process, on every run, on every platform.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    crate::api::impl_stable_hash(bytes)
}

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// The 5-tuple of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: Proto,
}

impl FlowKey {
    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self { src, dst, proto: Proto::Tcp }
    }
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self { src, dst, proto: Proto::Udp }
    }
    /// The client IP (what `source_ip` keys on).
    pub fn src_ip(&self) -> IpAddr {
        self.src.ip()
    }
}

/// Live load of one backend, shared by every core (the only shared mutable
/// state in this crate). The dataplane increments `active` when it opens a
/// connection or flow to the backend and decrements it when that ends;
/// least_latency feeds [`Load::observe`].
#[derive(Debug, Default)]
pub struct Load {
    pub active: AtomicU32,
    /// Peak-EWMA state, see `observe` / `cost`.
    pub ewma_nanos: AtomicU64,
    pub ewma_stamp_nanos: AtomicU64,
}

impl Load {
    /// Record one observed latency (connect time for tcp, response time for
    /// dns) at time `now_nanos`, with decay time constant `decay_nanos`.
    /// Peak-EWMA: a sample above the current value replaces it at once; a
    /// lower one is blended in with weight `1 - exp(-elapsed / decay)`.
    pub fn observe(&self, latency_nanos: u64, now_nanos: u64, decay_nanos: u64) {
        crate::api::impl_observe(self, latency_nanos, now_nanos, decay_nanos)
    }
}

/// One healthy backend in a snapshot.
#[derive(Debug, Clone)]
pub struct Member {
    pub endpoint: Endpoint,
    pub load: Arc<Load>,
    /// 0 = unlimited; a member whose `load.active` has reached it is skipped.
    pub max_connections: u32,
}

impl Member {
    pub fn new(endpoint: Endpoint, load: Arc<Load>, max_connections: u32) -> Self {
        Self { endpoint, load, max_connections }
    }
}

/// Parameters of a snapshot build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOptions {
    /// Requested Maglev table size; raised to the smallest prime >= max(this,
    /// 100 x members). Default [`DEFAULT_TABLE_SIZE`].
    pub table_size: usize,
    /// least_latency decay time constant, nanoseconds. Default 10 s.
    pub decay_nanos: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self { table_size: DEFAULT_TABLE_SIZE, decay_nanos: 10_000_000_000 }
    }
}

/// Randomness and time for one pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PickCtx {
    /// A fresh random number from the caller's per-core RNG.
    pub rand: u64,
    /// Monotonic time in nanoseconds (least_latency decay).
    pub now_nanos: u64,
}

/// Per-core mutable state of the stateful algorithms (smooth WRR current
/// weights). One per worker per service; it resets itself when used with a
/// different snapshot than last time.
#[derive(Debug, Default, Clone)]
pub struct PickState {
    pub(crate) snapshot_id: u64,
    pub(crate) current: Vec<i64>,
}

/// An immutable routing snapshot of one service: the healthy members and
/// the tables built from them. Built on the control thread, shared with the
/// workers through `Arc`, queried without locks.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) id: u64,
    pub(crate) algorithm: Algorithm,
    pub(crate) members: Vec<Member>,
    pub(crate) opts: BuildOptions,
    /// Maglev lookup table: entry -> index into `members`.
    pub(crate) table: Vec<u32>,
    /// Cumulative weights for weighted random.
    pub(crate) cumulative: Vec<u64>,
}

impl Snapshot {
    /// Build a snapshot from the healthy members (the caller filters by
    /// health). Maglev tables are built here for `Maglev` and `SourceIp`.
    pub fn build(algorithm: Algorithm, members: Vec<Member>, opts: BuildOptions) -> Self {
        crate::api::impl_build(algorithm, members, opts)
    }

    /// Pick a member for `flow`; returns its `endpoint.id`, or `None` when
    /// no member is available. Members whose id is in `exclude` (backends
    /// already tried for this connection) or that are at `max_connections`
    /// are skipped; for maglev/source_ip the next candidate is found by
    /// walking the table forward from the flow's slot, so the fallback is
    /// deterministic too.
    pub fn pick(
        &self,
        flow: &FlowKey,
        ctx: &PickCtx,
        state: &mut PickState,
        exclude: &[u32],
    ) -> Option<u32> {
        crate::api::impl_pick(self, flow, ctx, state, exclude)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The healthy members this snapshot was built from.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// True when no member is healthy: every pick returns `None`.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The Maglev table (entry -> member id), empty for other algorithms.
    pub fn maglev_table(&self) -> Vec<u32> {
        self.table.iter().map(|&i| self.members[i as usize].endpoint.id).collect()
    }
}

// ---- placeholder bodies, replaced by the real implementation ----

fn impl_stable_hash(bytes: &[u8]) -> u64 {
    // FNV-1a placeholder.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn impl_observe(_load: &Load, _latency: u64, _now: u64, _decay: u64) {}

fn impl_build(algorithm: Algorithm, members: Vec<Member>, opts: BuildOptions) -> Snapshot {
    Snapshot { id: 0, algorithm, members, opts, table: Vec::new(), cumulative: Vec::new() }
}

fn impl_pick(
    snap: &Snapshot,
    _flow: &FlowKey,
    _ctx: &PickCtx,
    _state: &mut PickState,
    exclude: &[u32],
) -> Option<u32> {
    snap.members.iter().map(|m| m.endpoint.id).find(|id| !exclude.contains(id))
}
