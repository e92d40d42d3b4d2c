//! The dns-mode query table: a pure state machine, no sockets, no clock.
//!
//! Each query forwarded upstream gets a new 16-bit ID that is unique among
//! this table's outstanding queries; the table remembers, under that ID,
//! the original ID and whatever the I/O shell needs to route the reply
//! (`data`: client address, listener, upstream socket, ...).
//!
//! - IDs come from a free queue that starts in a random order (a seed comes
//!   in; no global RNG) and hands back released IDs last, so an ID is
//!   reused as late as possible: a late reply to an expired query is very
//!   unlikely to meet a new query with the same ID. With all 65,536 IDs (or
//!   `max`) in use, new queries are refused.
//! - Outstanding queries are threaded on an intrusive list in the order they
//!   were sent; with one timeout per table, expiry pops from the head.
//! - A reply is matched by ID *and* by a check on the entry (the shell
//!   checks that it came back on the upstream socket the query left on);
//!   anything else is an orphan.
//!
//! ```
//! use sluice_dataplane::udp::dns::{QueryTable, Reply};
//! let mut t: QueryTable<&str> = QueryTable::new(1000, 42);
//! let id = t.insert(0x1234, 0, "backend-a").unwrap();
//! assert_eq!(t.len(), 1);
//! // a reply with that ID from another backend is an orphan
//! assert!(matches!(t.answer(id, |b| *b == "backend-b"), Reply::Orphan));
//! match t.answer(id, |b| *b == "backend-a") {
//!     Reply::Answer(q) => assert_eq!(q.orig_id, 0x1234),
//!     Reply::Orphan => unreachable!(),
//! }
//! assert!(t.is_empty());
//! ```

use std::collections::VecDeque;

/// Number of distinct DNS IDs.
pub const ID_SPACE: usize = 1 << 16;

const NIL: u32 = u32::MAX;

/// One outstanding query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending<E> {
    /// The ID the client used (restored in the reply).
    pub orig_id: u16,
    /// When it was sent upstream (nanos).
    pub sent_at: u64,
    pub data: E,
}

#[derive(Debug)]
struct Slot<E> {
    query: Option<Pending<E>>,
    prev: u32,
    next: u32,
}

/// What a reply's ID maps to.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<E> {
    /// The query it answers, now removed from the table.
    Answer(Pending<E>),
    /// No outstanding query has this ID (or the entry's check failed).
    Orphan,
}

/// Outstanding queries by rewritten ID.
#[derive(Debug)]
pub struct QueryTable<E> {
    slots: Vec<Slot<E>>,
    free: VecDeque<u16>,
    /// Oldest query.
    head: u32,
    /// Newest query.
    tail: u32,
    len: usize,
    max: usize,
}

impl<E> QueryTable<E> {
    /// A table for at most `max` (capped at 65,536) outstanding queries;
    /// `seed` shuffles the initial ID order.
    pub fn new(max: usize, seed: u64) -> Self {
        let mut ids: Vec<u16> = (0..=u16::MAX).collect();
        // Fisher-Yates with a seeded generator: IDs are not guessable from
        // the outside, and tests are reproducible.
        let mut rng = fastrand::Rng::with_seed(seed);
        for i in (1..ids.len()).rev() {
            let j = rng.usize(..=i);
            ids.swap(i, j);
        }
        let mut slots = Vec::with_capacity(ID_SPACE);
        slots.resize_with(ID_SPACE, || Slot {
            query: None,
            prev: NIL,
            next: NIL,
        });
        QueryTable {
            slots,
            free: ids.into(),
            head: NIL,
            tail: NIL,
            len: 0,
            max: max.min(ID_SPACE),
        }
    }

    /// Change the limit (a reload); queries above it stay until answered.
    pub fn set_max(&mut self, max: usize) {
        self.max = max.min(ID_SPACE);
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Record a query with client ID `orig_id` sent at `now`; returns the
    /// ID to put in the forwarded query, or `None` when `max` queries are
    /// outstanding.
    pub fn insert(&mut self, orig_id: u16, now: u64, data: E) -> Option<u16> {
        if self.len >= self.max {
            return None;
        }
        let id = self.free.pop_front()?;
        let slot = id as u32;
        self.slots[id as usize].query = Some(Pending {
            orig_id,
            sent_at: now,
            data,
        });
        self.push_tail(slot);
        self.len += 1;
        Some(id)
    }

    /// The outstanding query with ID `id`, if any.
    pub fn get(&self, id: u16) -> Option<&Pending<E>> {
        self.slots[id as usize].query.as_ref()
    }

    /// A reply with ID `id` arrived: if a query with that ID is outstanding
    /// and `matches` its data, remove and return it; else it is an orphan
    /// (and the table is unchanged).
    pub fn answer(&mut self, id: u16, matches: impl FnOnce(&E) -> bool) -> Reply<E> {
        match &self.slots[id as usize].query {
            Some(q) if matches(&q.data) => Reply::Answer(self.take(id)),
            _ => Reply::Orphan,
        }
    }

    /// Remove every query sent at or before `now - timeout`, oldest first,
    /// handing each (with its rewritten ID) to `out`. Returns how many.
    pub fn expire(
        &mut self,
        now: u64,
        timeout: u64,
        mut out: impl FnMut(u16, Pending<E>),
    ) -> usize {
        let mut n = 0;
        while self.head != NIL {
            let id = self.head as u16;
            let sent = self.slots[id as usize]
                .query
                .as_ref()
                .map_or(0, |q| q.sent_at);
            if sent.saturating_add(timeout) > now {
                break;
            }
            let q = self.take(id);
            out(id, q);
            n += 1;
        }
        n
    }

    /// Remove every query for which `forget` is true (a backend went down,
    /// a listener closed), handing each to `out`. A walk over the
    /// outstanding queries.
    pub fn forget(
        &mut self,
        mut forget: impl FnMut(&E) -> bool,
        mut out: impl FnMut(u16, Pending<E>),
    ) -> usize {
        let mut n = 0;
        let mut cur = self.head;
        while cur != NIL {
            let next = self.slots[cur as usize].next;
            let hit = self.slots[cur as usize]
                .query
                .as_ref()
                .is_some_and(|q| forget(&q.data));
            if hit {
                let id = cur as u16;
                let q = self.take(id);
                out(id, q);
                n += 1;
            }
            cur = next;
        }
        n
    }

    /// When the oldest query times out (nanos), if any.
    pub fn next_expiry(&self, timeout: u64) -> Option<u64> {
        if self.head == NIL {
            return None;
        }
        self.slots[self.head as usize]
            .query
            .as_ref()
            .map(|q| q.sent_at.saturating_add(timeout))
    }

    fn take(&mut self, id: u16) -> Pending<E> {
        let slot = id as u32;
        self.unlink(slot);
        let q = self.slots[id as usize]
            .query
            .take()
            .expect("taking an outstanding query");
        self.free.push_back(id);
        self.len -= 1;
        q
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let s = &self.slots[slot as usize];
            (s.prev, s.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        let s = &mut self.slots[slot as usize];
        s.prev = NIL;
        s.next = NIL;
    }

    fn push_tail(&mut self, slot: u32) {
        let old = self.tail;
        {
            let s = &mut self.slots[slot as usize];
            s.prev = old;
            s.next = NIL;
        }
        if old == NIL {
            self.head = slot;
        } else {
            self.slots[old as usize].next = slot;
        }
        self.tail = slot;
    }
}

/// The DNS header is 12 bytes: a datagram shorter than that is not DNS.
pub const HEADER_LEN: usize = 12;

/// The message ID (first two bytes, big-endian) of a DNS message of at
/// least [`HEADER_LEN`] bytes.
#[inline]
pub fn message_id(msg: &[u8]) -> Option<u16> {
    (msg.len() >= HEADER_LEN).then(|| u16::from_be_bytes([msg[0], msg[1]]))
}

/// Overwrite the message ID of `msg` (at least 2 bytes).
#[inline]
pub fn set_message_id(msg: &mut [u8], id: u16) {
    msg[..2].copy_from_slice(&id.to_be_bytes());
}

/// True if the QR bit says the message is a response.
#[inline]
pub fn is_response(msg: &[u8]) -> bool {
    msg.len() > 2 && msg[2] & 0x80 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const MS: u64 = 1_000_000;

    #[test]
    fn ids_are_unique_among_outstanding_queries_and_restored() {
        let mut t: QueryTable<u32> = QueryTable::new(ID_SPACE, 1);
        let mut seen = HashSet::new();
        for n in 0..1000u32 {
            // Every client uses ID 7: the rewritten IDs still differ.
            let id = t.insert(7, 0, n).unwrap();
            assert!(seen.insert(id), "ID {id} handed out twice");
        }
        for id in seen {
            match t.answer(id, |_| true) {
                Reply::Answer(q) => assert_eq!(q.orig_id, 7),
                Reply::Orphan => panic!("ID {id} lost"),
            }
        }
        assert!(t.is_empty());
    }

    #[test]
    fn ids_are_shuffled_by_the_seed() {
        let mut a: QueryTable<()> = QueryTable::new(10, 1);
        let mut b: QueryTable<()> = QueryTable::new(10, 2);
        let ia: Vec<u16> = (0..8).map(|_| a.insert(0, 0, ()).unwrap()).collect();
        let ib: Vec<u16> = (0..8).map(|_| b.insert(0, 0, ()).unwrap()).collect();
        assert_ne!(ia, ib);
        assert_ne!(ia, (0..8).collect::<Vec<u16>>());
    }

    #[test]
    fn replies_that_match_nothing_are_orphans() {
        let mut t: QueryTable<&str> = QueryTable::new(100, 3);
        let id = t.insert(1, 0, "a").unwrap();
        // wrong ID
        assert_eq!(t.answer(id.wrapping_add(1), |_| true), Reply::Orphan);
        // right ID, wrong upstream
        assert_eq!(t.answer(id, |d| *d == "b"), Reply::Orphan);
        assert_eq!(t.len(), 1);
        // the real answer
        assert!(matches!(t.answer(id, |d| *d == "a"), Reply::Answer(_)));
        // a duplicate of the answer is an orphan
        assert_eq!(t.answer(id, |_| true), Reply::Orphan);
        assert!(t.is_empty());
    }

    #[test]
    fn unanswered_queries_expire_after_the_timeout_oldest_first() {
        let mut t: QueryTable<u32> = QueryTable::new(100, 4);
        let timeout = 2000 * MS;
        let mut ids = Vec::new();
        for n in 0..10u32 {
            ids.push(t.insert(n as u16, n as u64 * 100 * MS, n).unwrap());
        }
        // answer query 3 before anything expires
        assert!(matches!(t.answer(ids[3], |_| true), Reply::Answer(_)));
        let mut out = Vec::new();
        assert_eq!(t.expire(2000 * MS - 1, timeout, |_, q| out.push(q.data)), 0);
        // at 2.45 s: queries sent at <= 0.45 s expire: 0, 1, 2, 4
        assert_eq!(t.expire(2450 * MS, timeout, |_, q| out.push(q.data)), 4);
        assert_eq!(out, vec![0, 1, 2, 4]);
        assert_eq!(t.next_expiry(timeout), Some(2500 * MS));
        // a late reply to an expired query is an orphan
        assert_eq!(t.answer(ids[0], |_| true), Reply::Orphan);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn full_table_refuses_then_reuses_released_ids_last() {
        let mut t: QueryTable<()> = QueryTable::new(ID_SPACE, 5);
        let mut ids = Vec::with_capacity(ID_SPACE);
        for _ in 0..ID_SPACE {
            ids.push(t.insert(0, 0, ()).unwrap());
        }
        // All 65,536 IDs in use: wraparound is impossible, the 65,537th is refused.
        assert_eq!(t.insert(0, 0, ()), None);
        let distinct: HashSet<u16> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ID_SPACE);
        // Release two; they come back in release order.
        let (x, y) = (ids[100], ids[5]);
        assert!(matches!(t.answer(x, |_| true), Reply::Answer(_)));
        assert!(matches!(t.answer(y, |_| true), Reply::Answer(_)));
        assert_eq!(t.insert(0, 1, ()), Some(x));
        assert_eq!(t.insert(0, 1, ()), Some(y));
        assert_eq!(t.insert(0, 1, ()), None);
    }

    #[test]
    fn released_ids_are_reused_as_late_as_possible() {
        let mut t: QueryTable<()> = QueryTable::new(ID_SPACE, 6);
        let first = t.insert(0, 0, ()).unwrap();
        assert!(matches!(t.answer(first, |_| true), Reply::Answer(_)));
        // The released ID only comes back after every other ID was used once.
        let mut n = 0;
        loop {
            let id = t.insert(0, 0, ()).unwrap();
            n += 1;
            assert!(matches!(t.answer(id, |_| true), Reply::Answer(_)));
            if id == first {
                break;
            }
        }
        assert_eq!(n, ID_SPACE);
    }

    #[test]
    fn max_limits_outstanding_queries() {
        let mut t: QueryTable<()> = QueryTable::new(3, 7);
        let a = t.insert(0, 0, ()).unwrap();
        t.insert(0, 0, ()).unwrap();
        t.insert(0, 0, ()).unwrap();
        assert_eq!(t.insert(0, 0, ()), None);
        t.answer(a, |_| true);
        assert!(t.insert(0, 0, ()).is_some());
        t.set_max(1);
        assert_eq!(t.len(), 3);
        assert_eq!(t.insert(0, 0, ()), None);
    }

    #[test]
    fn forget_drops_queries_to_one_backend() {
        let mut t: QueryTable<u8> = QueryTable::new(100, 8);
        let ids: Vec<u16> = (0..9)
            .map(|n| t.insert(0, n, (n % 3) as u8).unwrap())
            .collect();
        let mut gone = Vec::new();
        assert_eq!(t.forget(|b| *b == 1, |id, _| gone.push(id)), 3);
        assert_eq!(gone, vec![ids[1], ids[4], ids[7]]);
        assert_eq!(t.len(), 6);
        let mut left = Vec::new();
        t.expire(u64::MAX, 0, |_, q| left.push(q.data));
        assert_eq!(left, vec![0, 2, 0, 2, 0, 2]);
    }

    #[test]
    fn header_helpers() {
        let mut msg = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(message_id(&msg), Some(0x1234));
        assert!(!is_response(&msg));
        set_message_id(&mut msg, 0xbeef);
        assert_eq!(message_id(&msg), Some(0xbeef));
        msg[2] |= 0x80;
        assert!(is_response(&msg));
        assert_eq!(message_id(&msg[..11]), None);
    }

    /// A random workout against a model, on a virtual clock.
    #[test]
    fn random_operations_match_a_model() {
        let mut rng = fastrand::Rng::with_seed(9);
        let mut t: QueryTable<u32> = QueryTable::new(500, 10);
        let mut model: std::collections::HashMap<u16, (u16, u64)> = Default::default();
        let mut now = 0;
        let timeout = 1000;
        for n in 0..50_000u32 {
            now += rng.u64(0..3);
            match rng.u8(0..10) {
                0..=4 => {
                    let orig = rng.u16(..);
                    match t.insert(orig, now, n) {
                        Some(id) => assert!(model.insert(id, (orig, now)).is_none()),
                        None => assert_eq!(model.len(), 500),
                    }
                }
                5..=7 => {
                    let id = rng.u16(..);
                    let id = if rng.bool() {
                        model.keys().next().copied().unwrap_or(id)
                    } else {
                        id
                    };
                    match t.answer(id, |_| true) {
                        Reply::Answer(q) => {
                            assert_eq!(model.remove(&id).map(|m| m.0), Some(q.orig_id))
                        }
                        Reply::Orphan => assert!(!model.contains_key(&id)),
                    }
                }
                _ => {
                    let mut gone = Vec::new();
                    t.expire(now, timeout, |id, _| gone.push(id));
                    let mut want: Vec<u16> = model
                        .iter()
                        .filter(|(_, (_, at))| at + timeout <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    gone.sort_unstable();
                    want.sort_unstable();
                    assert_eq!(gone, want);
                    for id in want {
                        model.remove(&id);
                    }
                }
            }
            assert_eq!(t.len(), model.len());
        }
    }
}
