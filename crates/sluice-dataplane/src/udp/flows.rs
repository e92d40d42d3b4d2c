//! The session-mode flow table: a pure state machine, no sockets, no clock.
//!
//! Flows live in a slab and are found by key (client address and the local
//! address it sent to) through a `HashMap`. They are also threaded on an
//! intrusive list in order of last activity (least recently seen first), so
//! idle expiry only looks at the head of the list: a tick costs time in
//! proportion to what expires, not to the table size. Time comes in as
//! nanoseconds on any monotonic clock (`now`), so tests drive it by hand.
//!
//! The I/O shell (`session.rs`) keeps its sockets in the flow's `data`.
//!
//! ```
//! use sluice_dataplane::udp::flows::FlowTable;
//! let mut table: FlowTable<u32, &str> = FlowTable::new(2);
//! let a = table.insert(1, "a", 0).unwrap();
//! table.insert(2, "b", 0).unwrap();
//! assert!(table.insert(3, "c", 0).is_err()); // max_sessions reached
//! table.record_in(a, 100, 5_000); // flow 1 active at t = 5 us
//! let mut expired = Vec::new();
//! table.expire(10_000, 6_000, |f| expired.push(f.key)); // idle >= 6 us
//! assert_eq!(expired, vec![2]);
//! assert_eq!(table.len(), 1);
//! ```

use std::collections::HashMap;
use std::hash::Hash;

use slab::Slab;

const NIL: usize = usize::MAX;

/// A handle on a flow: its slab slot plus a unique id, so a handle kept by
/// a task after the flow ended never reaches the flow that reused the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowRef {
    slot: usize,
    id: u64,
}

impl FlowRef {
    /// The flow's unique id (never reused within one table).
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// One flow.
#[derive(Debug)]
pub struct Flow<K, T> {
    pub key: K,
    pub id: u64,
    /// When it was created and last saw a datagram either way (nanos).
    pub created: u64,
    pub last_seen: u64,
    /// Payload bytes client -> backend and back, and datagram counts.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub data: T,
}

impl<K, T> Flow<K, T> {
    /// How long it lived, at `now` (nanos).
    pub fn age(&self, now: u64) -> u64 {
        now.saturating_sub(self.created)
    }
}

#[derive(Debug)]
struct Node<K, T> {
    flow: Flow<K, T>,
    prev: usize,
    next: usize,
}

/// The table is full (`max` flows): the new flow was not admitted. Gives
/// the payload back.
#[derive(Debug, PartialEq, Eq)]
pub struct Full<T>(pub T);

/// Flows by key, with idle expiry in order of last activity.
#[derive(Debug)]
pub struct FlowTable<K, T> {
    nodes: Slab<Node<K, T>>,
    index: HashMap<K, FlowRef>,
    /// Least recently seen.
    head: usize,
    /// Most recently seen.
    tail: usize,
    max: usize,
    next_id: u64,
}

impl<K: Hash + Eq + Copy, T> FlowTable<K, T> {
    /// An empty table admitting at most `max` flows.
    pub fn new(max: usize) -> Self {
        FlowTable {
            nodes: Slab::new(),
            index: HashMap::new(),
            head: NIL,
            tail: NIL,
            max,
            next_id: 1,
        }
    }

    /// Change the admission limit (a reload); flows above it stay.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The flow of `key`, if any.
    #[inline]
    pub fn lookup(&self, key: &K) -> Option<FlowRef> {
        self.index.get(key).copied()
    }

    pub fn get(&self, r: FlowRef) -> Option<&Flow<K, T>> {
        self.nodes
            .get(r.slot)
            .filter(|n| n.flow.id == r.id)
            .map(|n| &n.flow)
    }

    pub fn get_mut(&mut self, r: FlowRef) -> Option<&mut Flow<K, T>> {
        self.nodes
            .get_mut(r.slot)
            .filter(|n| n.flow.id == r.id)
            .map(|n| &mut n.flow)
    }

    /// Add a flow for `key` (which must not have one) seen at `now`.
    /// `Err(Full)` when `max` flows exist.
    pub fn insert(&mut self, key: K, data: T, now: u64) -> Result<FlowRef, Full<T>> {
        if self.nodes.len() >= self.max {
            return Err(Full(data));
        }
        debug_assert!(!self.index.contains_key(&key), "flow inserted twice");
        let id = self.next_id;
        self.next_id += 1;
        let flow = Flow {
            key,
            id,
            created: now,
            last_seen: now,
            bytes_in: 0,
            bytes_out: 0,
            datagrams_in: 0,
            datagrams_out: 0,
            data,
        };
        let slot = self.nodes.insert(Node {
            flow,
            prev: NIL,
            next: NIL,
        });
        self.push_tail(slot);
        let r = FlowRef { slot, id };
        if let Some(old) = self.index.insert(key, r) {
            // Never happens when callers look up first; keep the table
            // consistent anyway by dropping the older flow's index entry.
            debug_assert_ne!(old, r);
        }
        Ok(r)
    }

    /// A datagram of `bytes` from the client at `now`. False if the flow
    /// is gone.
    #[inline]
    pub fn record_in(&mut self, r: FlowRef, bytes: usize, now: u64) -> bool {
        self.record(r, now, |f| {
            f.bytes_in += bytes as u64;
            f.datagrams_in += 1;
        })
    }

    /// A datagram of `bytes` from the backend at `now`. False if the flow
    /// is gone.
    #[inline]
    pub fn record_out(&mut self, r: FlowRef, bytes: usize, now: u64) -> bool {
        self.record(r, now, |f| {
            f.bytes_out += bytes as u64;
            f.datagrams_out += 1;
        })
    }

    fn record(&mut self, r: FlowRef, now: u64, f: impl FnOnce(&mut Flow<K, T>)) -> bool {
        let Some(node) = self.nodes.get_mut(r.slot).filter(|n| n.flow.id == r.id) else {
            return false;
        };
        f(&mut node.flow);
        // A clock that steps back never makes a flow look older.
        if now > node.flow.last_seen {
            node.flow.last_seen = now;
        }
        if self.tail != r.slot {
            self.unlink(r.slot);
            self.push_tail(r.slot);
        }
        true
    }

    /// Remove one flow.
    pub fn remove(&mut self, r: FlowRef) -> Option<Flow<K, T>> {
        self.nodes.get(r.slot).filter(|n| n.flow.id == r.id)?;
        Some(self.take(r.slot))
    }

    /// Remove every flow idle for at least `timeout` at `now` (last seen at
    /// or before `now - timeout`), least recently seen first, handing each
    /// to `out`. Returns how many expired.
    pub fn expire(&mut self, now: u64, timeout: u64, mut out: impl FnMut(Flow<K, T>)) -> usize {
        let mut n = 0;
        while self.head != NIL {
            let last = self.nodes[self.head].flow.last_seen;
            if last.saturating_add(timeout) > now {
                break;
            }
            let flow = self.take(self.head);
            out(flow);
            n += 1;
        }
        n
    }

    /// Remove every flow for which `forget` is true, handing each to `out`.
    /// A full scan: for rare events (a backend went down, a listener closed).
    pub fn forget(
        &mut self,
        mut forget: impl FnMut(&Flow<K, T>) -> bool,
        mut out: impl FnMut(Flow<K, T>),
    ) -> usize {
        let slots: Vec<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| forget(&n.flow))
            .map(|(s, _)| s)
            .collect();
        for &slot in &slots {
            out(self.take(slot));
        }
        slots.len()
    }

    /// Remove every flow.
    pub fn drain(&mut self, out: impl FnMut(Flow<K, T>)) -> usize {
        self.forget(|_| true, out)
    }

    /// When the least recently seen flow expires (nanos), if any.
    pub fn next_expiry(&self, timeout: u64) -> Option<u64> {
        (self.head != NIL).then(|| self.nodes[self.head].flow.last_seen.saturating_add(timeout))
    }

    /// Iterate over the flows (any order).
    pub fn iter(&self) -> impl Iterator<Item = &Flow<K, T>> {
        self.nodes.iter().map(|(_, n)| &n.flow)
    }

    fn take(&mut self, slot: usize) -> Flow<K, T> {
        self.unlink(slot);
        let node = self.nodes.remove(slot);
        if self
            .index
            .get(&node.flow.key)
            .is_some_and(|r| r.slot == slot)
        {
            self.index.remove(&node.flow.key);
        }
        node.flow
    }

    fn unlink(&mut self, slot: usize) {
        let (prev, next) = {
            let n = &self.nodes[slot];
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
        let n = &mut self.nodes[slot];
        n.prev = NIL;
        n.next = NIL;
    }

    fn push_tail(&mut self, slot: usize) {
        let old = self.tail;
        {
            let n = &mut self.nodes[slot];
            n.prev = old;
            n.next = NIL;
        }
        if old == NIL {
            self.head = slot;
        } else {
            self.nodes[old].next = slot;
        }
        self.tail = slot;
    }

    /// Check the list and index invariants (tests).
    #[cfg(test)]
    fn check(&self) {
        let mut seen = 0;
        let mut cur = self.head;
        let mut prev = NIL;
        let mut last_seen = 0;
        while cur != NIL {
            let n = &self.nodes[cur];
            assert_eq!(n.prev, prev);
            assert!(
                n.flow.last_seen >= last_seen,
                "list not ordered by last activity"
            );
            last_seen = n.flow.last_seen;
            assert_eq!(
                self.index.get(&n.flow.key),
                Some(&FlowRef {
                    slot: cur,
                    id: n.flow.id
                })
            );
            prev = cur;
            cur = n.next;
            seen += 1;
        }
        assert_eq!(self.tail, prev);
        assert_eq!(seen, self.nodes.len());
        assert_eq!(self.index.len(), self.nodes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// A virtual clock in nanoseconds.
    struct Clock(u64);
    impl Clock {
        fn advance(&mut self, d: u64) -> u64 {
            self.0 += d;
            self.0
        }
    }

    #[test]
    fn idle_flows_expire_after_timeout_and_active_ones_stay() {
        let mut clock = Clock(0);
        let mut t: FlowTable<u16, ()> = FlowTable::new(100);
        let a = t.insert(1, (), clock.0).unwrap();
        let b = t.insert(2, (), clock.0).unwrap();
        let timeout = 30 * S;
        for _ in 0..10 {
            let now = clock.advance(5 * S);
            assert!(t.record_in(a, 10, now)); // a is active every 5 s
        }
        // 50 s passed: b (idle since 0) expired at 30 s, a is fresh.
        let mut out = Vec::new();
        assert_eq!(t.expire(clock.0, timeout, |f| out.push(f.key)), 1);
        assert_eq!(out, vec![2]);
        assert!(t.get(b).is_none());
        assert_eq!(t.get(a).unwrap().bytes_in, 100);
        t.check();
        // Exactly at the boundary: idle for `timeout` expires.
        let last = t.get(a).unwrap().last_seen;
        assert_eq!(t.expire(last + timeout - 1, timeout, |_| {}), 0);
        assert_eq!(t.expire(last + timeout, timeout, |_| {}), 1);
        assert!(t.is_empty());
        t.check();
    }

    #[test]
    fn replies_keep_a_flow_alive_too() {
        let mut t: FlowTable<u8, ()> = FlowTable::new(10);
        let a = t.insert(1, (), 0).unwrap();
        t.record_out(a, 7, 20 * S);
        assert_eq!(t.expire(40 * S, 30 * S, |_| {}), 0);
        assert_eq!(t.expire(50 * S, 30 * S, |_| {}), 1);
    }

    #[test]
    fn expiry_is_in_order_of_last_activity() {
        let mut t: FlowTable<u32, ()> = FlowTable::new(1000);
        let refs: Vec<_> = (0..100).map(|k| t.insert(k, (), 0).unwrap()).collect();
        // Touch in reverse order: flow 99 at t=1, 98 at t=2, ... 0 at t=100.
        for (i, r) in refs.iter().rev().enumerate() {
            t.record_in(*r, 1, (i as u64 + 1) * S);
        }
        t.check();
        let mut out = Vec::new();
        // timeout 10 s, now 60 s: flows last seen at <= 50 s expire.
        t.expire(60 * S, 10 * S, |f| out.push(f.key));
        assert_eq!(out, (50..100).rev().collect::<Vec<_>>());
        assert_eq!(t.next_expiry(10 * S), Some(61 * S));
        t.check();
    }

    #[test]
    fn max_sessions_refuses_new_flows_but_existing_ones_keep_working() {
        let mut t: FlowTable<u32, &'static str> = FlowTable::new(2);
        let a = t.insert(1, "a", 0).unwrap();
        t.insert(2, "b", 0).unwrap();
        assert_eq!(t.insert(3, "c", 0), Err(Full("c")));
        assert!(t.record_in(a, 5, S));
        assert_eq!(t.lookup(&1), Some(a));
        // One expires: room for a new one.
        // At 30.5 s only flow 2 (idle since 0) is due; flow 1 was seen at 1 s.
        assert_eq!(t.expire(30 * S + S / 2, 30 * S, |_| {}), 1);
        assert!(t.insert(3, "c", 31 * S).is_ok());
        // Lowering the limit keeps what exists.
        t.set_max(1);
        assert_eq!(t.len(), 2);
        assert!(t.insert(4, "d", 31 * S).is_err());
        t.check();
    }

    #[test]
    fn stale_handles_never_reach_a_new_flow_in_the_same_slot() {
        let mut t: FlowTable<u32, ()> = FlowTable::new(10);
        let old = t.insert(1, (), 0).unwrap();
        assert!(t.remove(old).is_some());
        let new = t.insert(2, (), 0).unwrap();
        assert_ne!(old, new);
        assert!(
            !t.record_in(old, 1, S),
            "stale handle must not touch the new flow"
        );
        assert!(t.get(old).is_none());
        assert!(t.remove(old).is_none());
        assert_eq!(t.get(new).unwrap().datagrams_in, 0);
        t.check();
    }

    #[test]
    fn forget_removes_matching_flows_only() {
        let mut t: FlowTable<u32, u8> = FlowTable::new(100);
        for k in 0..30 {
            t.insert(k, (k % 3) as u8, 0).unwrap();
        }
        let mut out = 0;
        assert_eq!(t.forget(|f| f.data == 1, |_| out += 1), 10);
        assert_eq!(out, 10);
        assert_eq!(t.len(), 20);
        assert!(t.iter().all(|f| f.data != 1));
        t.check();
        assert_eq!(t.drain(|_| {}), 20);
        assert!(t.is_empty());
        t.check();
    }

    #[test]
    fn a_clock_stepping_back_does_not_reorder() {
        let mut t: FlowTable<u32, ()> = FlowTable::new(10);
        let a = t.insert(1, (), 10 * S).unwrap();
        t.insert(2, (), 10 * S).unwrap();
        t.record_in(a, 1, 5 * S);
        assert_eq!(t.get(a).unwrap().last_seen, 10 * S);
        t.check();
    }

    /// A random workout against a simple model.
    #[test]
    fn random_operations_match_a_model() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut t: FlowTable<u32, ()> = FlowTable::new(50);
        let mut model: HashMap<u32, (FlowRef, u64)> = HashMap::new();
        let mut now = 0u64;
        let timeout = 100;
        for _ in 0..20_000 {
            now += rng.u64(0..5);
            let key = rng.u32(0..80);
            match rng.u8(0..10) {
                0..=5 => match t.lookup(&key) {
                    Some(r) => {
                        assert!(t.record_in(r, 1, now));
                        model.get_mut(&key).unwrap().1 = now;
                    }
                    None => {
                        assert!(!model.contains_key(&key));
                        match t.insert(key, (), now) {
                            Ok(r) => {
                                model.insert(key, (r, now));
                            }
                            Err(_) => assert_eq!(model.len(), 50),
                        }
                    }
                },
                6 => {
                    if let Some((r, _)) = model.remove(&key) {
                        assert!(t.remove(r).is_some());
                    }
                }
                _ => {
                    let mut gone = Vec::new();
                    t.expire(now, timeout, |f| gone.push(f.key));
                    let mut want: Vec<u32> = model
                        .iter()
                        .filter(|(_, (_, seen))| seen + timeout <= now)
                        .map(|(k, _)| *k)
                        .collect();
                    gone.sort_unstable();
                    want.sort_unstable();
                    assert_eq!(gone, want);
                    for k in want {
                        model.remove(&k);
                    }
                }
            }
            assert_eq!(t.len(), model.len());
        }
        t.check();
    }
}
