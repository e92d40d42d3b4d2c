//! Public types of the balancer. The dataplane and control crates are
//! written against these names and signatures; the algorithms live in
//! [`crate::maglev`], `pick.rs` and `latency.rs`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

use crate::hash::{self, norm, xxh64};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Caller's identifier (the dataplane uses the backend's index in the
    /// service's configured backend list). Returned by [`Snapshot::pick`].
    pub id: u32,
    /// 1..=10000 (a weight of 0 counts as 1).
    pub weight: u32,
    /// Stable hash of the backend's address; Maglev permutations derive from
    /// it, so two processes with the same backends build the same table.
    pub hash: u64,
}

impl Endpoint {
    /// An endpoint whose `hash` is [`stable_hash`] of `address` (the backend
    /// address as `IP:port`).
    pub fn from_address(id: u32, weight: u32, address: &str) -> Self {
        Self {
            id,
            weight,
            hash: stable_hash(address.as_bytes()),
        }
    }
}

/// The fixed, documented hash used for endpoints and flows. Same output in
/// every process, on every run, on every platform.
///
/// It is **XXH64 with seed 0** (xxHash 64-bit, as `xxhsum -H1` prints it),
/// implemented in this crate with the reference constants; for example
/// `stable_hash(b"abc") == 0x44BC_2CF5_AD77_0999`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number (6 for TCP, 17 for UDP), as hashed.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
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
        Self {
            src,
            dst,
            proto: Proto::Tcp,
        }
    }
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            src,
            dst,
            proto: Proto::Udp,
        }
    }
    /// The client IP (what `source_ip` keys on).
    pub fn src_ip(&self) -> IpAddr {
        self.src.ip()
    }

    /// The hash `maglev` looks flows up with: [`stable_hash`] (XXH64, seed
    /// 0) of the raw bytes of the tuple. IPv4-mapped IPv6 addresses
    /// (`::ffff:a.b.c.d`) count as IPv4 first. When both addresses are IPv4
    /// the bytes are the 13 bytes `src ip (4) | src port (2, big-endian) |
    /// dst ip (4) | dst port (2, big-endian) | protocol number (1)`;
    /// otherwise the 37 bytes of the same fields with 16-byte addresses
    /// (an IPv4 one written `::ffff:a.b.c.d`). No allocation: the hash is
    /// computed from the words of the tuple directly (the same value as
    /// hashing those bytes; tested).
    #[inline]
    pub fn flow_hash(&self) -> u64 {
        let proto = self.proto.number();
        hash::flow_hash(
            norm(self.src.ip()),
            self.src.port(),
            norm(self.dst.ip()),
            self.dst.port(),
            proto,
        )
    }

    /// The hash `source_ip` looks flows up with: [`stable_hash`] of the
    /// client address's bytes, 4 for IPv4 (IPv4-mapped IPv6 included), 16
    /// for IPv6.
    #[inline]
    pub fn src_ip_hash(&self) -> u64 {
        hash::ip_hash(norm(self.src.ip()))
    }
}

/// Live load of one backend, shared by every core (the only shared mutable
/// state in this crate). The dataplane increments `active` when it opens a
/// connection or flow to the backend and decrements it when that ends;
/// least_latency feeds [`Load::observe`].
///
/// `ewma_nanos == 0` means "no observation yet" (observations are counted
/// as at least 1 ns); such a backend costs 0, so least_latency tries it.
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
    /// A `decay_nanos` of 0 counts as 1 ns (no memory).
    pub fn observe(&self, latency_nanos: u64, now_nanos: u64, decay_nanos: u64) {
        crate::latency::observe(self, latency_nanos, now_nanos, decay_nanos)
    }

    /// Peak-EWMA cost at `now_nanos` (Finagle / linkerd): the latency
    /// estimate decayed towards 0 by `exp(-(now - last observation) /
    /// decay)`, times `active + 1`. 0 when nothing was observed yet.
    pub fn cost(&self, now_nanos: u64, decay_nanos: u64) -> f64 {
        crate::latency::cost(self, now_nanos, decay_nanos)
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
        Self {
            endpoint,
            load,
            max_connections,
        }
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
        Self {
            table_size: DEFAULT_TABLE_SIZE,
            decay_nanos: 10_000_000_000,
        }
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
    ///
    /// Every build gets a new process-unique id, so a [`PickState`] used
    /// with a rebuilt snapshot starts over.
    pub fn build(algorithm: Algorithm, members: Vec<Member>, opts: BuildOptions) -> Self {
        crate::pick::build(algorithm, members, opts)
    }

    /// The same algorithm and options over a new member set (health
    /// changes: pass the members that are up now).
    pub fn rebuild_with(&self, members: Vec<Member>) -> Snapshot {
        Snapshot::build(self.algorithm, members, self.opts)
    }

    /// Pick a member for `flow`; returns its `endpoint.id`, or `None` when
    /// no member is available. Members whose id is in `exclude` (backends
    /// already tried for this connection) or that are at `max_connections`
    /// are skipped; for maglev/source_ip the next candidate is found by
    /// walking the table forward from the flow's slot, so the fallback is
    /// deterministic too.
    ///
    /// Per algorithm: `Maglev` looks up [`FlowKey::flow_hash`] mod M,
    /// `SourceIp` [`FlowKey::src_ip_hash`] mod M (the walk is bounded to
    /// `8 x members + 16` slots, then the members are scanned from a
    /// position derived from the slot); `RoundRobin` is NGINX's smooth
    /// weighted round robin (state in `state`); `LeastConn` takes the
    /// lowest `active / weight`, ties going to the first in a rotation that
    /// starts at a position drawn from `ctx.rand`; `Random` is weighted by
    /// `ctx.rand`; `TwoChoices` draws two distinct weighted candidates from
    /// `ctx.rand` and keeps the lower `active / weight`; `LeastLatency`
    /// takes the lowest [`Load::cost`] at `ctx.now_nanos` (same
    /// tie rotation). No allocation except the first use of a `PickState`
    /// with a round-robin snapshot.
    #[inline]
    pub fn pick(
        &self,
        flow: &FlowKey,
        ctx: &PickCtx,
        state: &mut PickState,
        exclude: &[u32],
    ) -> Option<u32> {
        self.pick_impl(flow, ctx, state, exclude)
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
        self.table
            .iter()
            .map(|&i| self.members[i as usize].endpoint.id)
            .collect()
    }

    /// The Maglev table size M (0 for other algorithms or no member).
    pub fn table_size(&self) -> usize {
        self.table.len()
    }

    /// The options this snapshot was built with.
    pub fn options(&self) -> BuildOptions {
        self.opts
    }

    /// Process-unique id of this build.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl fmt::Debug for Snapshot {
    // Not derived: the table has tens of thousands of entries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm)
            .field("members", &self.members.len())
            .field("table_size", &self.table.len())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}
