//! Maglev table population (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4), with weights.
//!
//! * **Permutations.** Each endpoint's preference list over the `M` slots is
//!   `permutation[j] = (offset + j * skip) mod M` with
//!   `offset = xxh64(h, OFFSET_SEED) mod M` and
//!   `skip = xxh64(h, SKIP_SEED) mod (M - 1) + 1`, where `h` is the
//!   little-endian bytes of [`Endpoint::hash`] (itself
//!   [`crate::stable_hash`] of the address). `M` is prime, so every `skip`
//!   is coprime with it and each list visits every slot once.
//! * **Population.** Endpoints take turns; at its turn an endpoint claims the
//!   next slot of its preference list that is still empty, until the table
//!   is full (the paper's Algorithm 1). Turn order is independent of the
//!   order the caller lists the endpoints in: endpoints are sorted by
//!   `(hash, weight, id)` first.
//! * **Weights.** The population runs in rounds. Each endpoint starts with
//!   a credit of `w_max / 2` (integer division; `w_max` is the largest
//!   weight); in every round it adds its weight and, when the credit
//!   reaches `w_max`, spends `w_max` for one turn. So endpoint `i` takes its
//!   `t`-th turn in round `ceil((t * w_max - w_max / 2) / w_i)` (ties in
//!   endpoint order), and after `R` rounds it has had `round(R * w_i /
//!   w_max)` turns (the half credit rounds instead of truncating, as in
//!   Webster's apportionment): it owns `M * w_i / sum(w)` slots, give or
//!   take one. With equal weights every endpoint takes one turn per round:
//!   plain Maglev, where entry counts differ by at most one.
//! * **Size.** [`table_size`]: the smallest prime `>= max(requested, 100 x
//!   endpoints)`, so each endpoint owns about 100 entries or more.
//!
//! When the weights are very uneven (few turns per round), the same turn
//! sequence is produced with a binary heap keyed by `(round, order)` instead
//! of scanning every endpoint each round; both paths give identical tables
//! (tested).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::hash::xxh64;
use crate::Endpoint;

/// Seed of the hash that gives an endpoint's `offset` ("MAGLEVOF").
pub const OFFSET_SEED: u64 = 0x4D41_474C_4556_4F46;
/// Seed of the hash that gives an endpoint's `skip` ("MAGLEVSK").
pub const SKIP_SEED: u64 = 0x4D41_474C_4556_534B;
/// The table has at least this many slots per endpoint.
pub const MIN_SLOTS_PER_ENDPOINT: usize = 100;
/// Largest table size accepted (slot arithmetic is done in `u32`).
pub const MAX_TABLE_SIZE: usize = 1 << 30;

/// Marker of a slot not yet claimed during population.
const EMPTY: u32 = u32::MAX;

/// True when `n` is prime (trial division; `n` is at most a few million).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The smallest prime `>= n`.
pub fn next_prime(n: usize) -> usize {
    let mut c = n.max(2);
    while !is_prime(c) {
        c += 1;
    }
    c
}

/// Largest table size honoured from a request (2^26 slots, 256 MiB of
/// `u32`); larger requests are cut to it.
pub const MAX_REQUESTED_SIZE: usize = 1 << 26;

/// The Maglev table size for `endpoints` endpoints when `requested` slots
/// are asked for: the smallest prime `>= max(requested, 100 x endpoints)`
/// (and at least 2), with `requested` cut to [`MAX_REQUESTED_SIZE`].
pub fn table_size(requested: usize, endpoints: usize) -> usize {
    let wanted = requested.min(MAX_REQUESTED_SIZE);
    next_prime(wanted.max(endpoints.saturating_mul(MIN_SLOTS_PER_ENDPOINT)))
}

/// `(offset, skip)` of the preference list of an endpoint with hash `hash`
/// in a table of prime size `m`: `offset` in `0..m`, `skip` in `1..m`.
pub fn permutation(hash: u64, m: usize) -> (usize, usize) {
    assert!(m >= 2, "maglev table size must be at least 2");
    let bytes = hash.to_le_bytes();
    let m64 = m as u64;
    let offset = xxh64(&bytes, OFFSET_SEED) % m64;
    let skip = xxh64(&bytes, SKIP_SEED) % (m64 - 1) + 1;
    (offset as usize, skip as usize)
}

/// The weight an endpoint counts with (a weight of 0 counts as 1).
#[inline]
pub(crate) fn weight_of(e: &Endpoint) -> u64 {
    u64::from(e.weight.max(1))
}

/// How the turn sequence is generated (same sequence either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Schedule {
    /// Scan all endpoints every round (cheap when weights are similar).
    Rounds,
    /// Binary heap of next turns (cheap when few endpoints act per round).
    Heap,
}

/// Populate a Maglev table of prime size `m` for `endpoints`. Entry `s` is
/// the index in `endpoints` of the endpoint owning slot `s`. Empty input
/// gives an empty table.
///
/// # Panics
/// If `m` is not a prime below [`MAX_TABLE_SIZE`] (a non-prime size would
/// give preference lists that do not cover the table).
pub fn populate(endpoints: &[Endpoint], m: usize) -> Vec<u32> {
    let n = endpoints.len() as u64;
    let total: u64 = endpoints.iter().map(weight_of).sum();
    let max = endpoints.iter().map(weight_of).max().unwrap_or(1);
    // Rounds costs n * rounds steps for m turns, i.e. n * max / total steps
    // per turn; switch to the heap when that exceeds 4.
    let schedule = if n * max <= 4 * total {
        Schedule::Rounds
    } else {
        Schedule::Heap
    };
    populate_with(endpoints, m, schedule)
}

pub(crate) fn populate_with(endpoints: &[Endpoint], m: usize, schedule: Schedule) -> Vec<u32> {
    assert!(
        is_prime(m) && m < MAX_TABLE_SIZE,
        "maglev table size {m} must be a prime below {MAX_TABLE_SIZE}"
    );
    if endpoints.is_empty() {
        return Vec::new();
    }
    assert!(endpoints.len() < EMPTY as usize, "too many endpoints");

    // Population order: independent of the caller's order.
    let mut order: Vec<u32> = (0..endpoints.len() as u32).collect();
    order.sort_unstable_by_key(|&i| {
        let e = &endpoints[i as usize];
        (e.hash, e.weight, e.id, i)
    });
    let n = order.len();
    let mut next = Vec::with_capacity(n);
    let mut skip = Vec::with_capacity(n);
    let mut weight = Vec::with_capacity(n);
    for &i in &order {
        let e = &endpoints[i as usize];
        let (o, s) = permutation(e.hash, m);
        next.push(o as u32);
        skip.push(s as u32);
        weight.push(weight_of(e));
    }
    let w_max = weight.iter().copied().max().unwrap_or(1);
    let start_credit = w_max / 2;
    let mut fill = Fill::new(m);
    let mut filled = 0usize;

    match schedule {
        Schedule::Rounds => {
            let mut credit = vec![start_credit; n];
            'fill: loop {
                for k in 0..n {
                    credit[k] += weight[k];
                    if credit[k] >= w_max {
                        credit[k] -= w_max;
                        fill.claim(&mut next[k], skip[k], order[k]);
                        filled += 1;
                        if filled == m {
                            break 'fill;
                        }
                    }
                }
            }
        }
        Schedule::Heap => {
            // Endpoint k's t-th turn (t >= 1) is in the first round r with
            // start_credit + r * w_k >= t * w_max.
            let round_of = |t: u64, w: u64| (t * w_max - start_credit).div_ceil(w);
            let mut turns = vec![0u64; n];
            let mut heap: BinaryHeap<Reverse<(u64, u32)>> = (0..n)
                .map(|k| Reverse((round_of(1, weight[k]), k as u32)))
                .collect();
            while filled < m {
                let Some(Reverse((_, k))) = heap.pop() else {
                    break;
                };
                let k = k as usize;
                fill.claim(&mut next[k], skip[k], order[k]);
                filled += 1;
                turns[k] += 1;
                heap.push(Reverse((round_of(turns[k] + 1, weight[k]), k as u32)));
            }
        }
    }
    fill.table
}

/// The table being filled, with an occupancy bitmap next to it: probes read
/// the bitmap (8 KiB for M = 65537, stays in L1) rather than the table.
struct Fill {
    table: Vec<u32>,
    used: Vec<u64>,
    m: u32,
}

impl Fill {
    fn new(m: usize) -> Self {
        Fill {
            table: vec![EMPTY; m],
            used: vec![0; m.div_ceil(64)],
            m: m as u32,
        }
    }

    /// One turn: claim the next empty slot of the preference list that
    /// starts at `*pos` and steps by `skip`, then advance `*pos` past it.
    #[inline(always)]
    fn claim(&mut self, pos: &mut u32, skip: u32, value: u32) {
        let m = self.m;
        let mut c = *pos;
        while self.used[(c >> 6) as usize] & (1 << (c & 63)) != 0 {
            c += skip;
            if c >= m {
                c -= m;
            }
        }
        self.used[(c >> 6) as usize] |= 1 << (c & 63);
        self.table[c as usize] = value;
        c += skip;
        if c >= m {
            c -= m;
        }
        *pos = c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's Algorithm 1, literally (full permutation lists), with the
    /// weighted turn order written as explicit rounds.
    fn reference(endpoints: &[Endpoint], m: usize) -> Vec<u32> {
        let mut order: Vec<usize> = (0..endpoints.len()).collect();
        order.sort_by_key(|&i| (endpoints[i].hash, endpoints[i].weight, endpoints[i].id, i));
        let perms: Vec<Vec<usize>> = order
            .iter()
            .map(|&i| {
                let (o, s) = permutation(endpoints[i].hash, m);
                (0..m).map(|j| (o + j * s) % m).collect()
            })
            .collect();
        let w: Vec<u64> = order.iter().map(|&i| weight_of(&endpoints[i])).collect();
        let w_max = *w.iter().max().unwrap();
        let c0 = w_max / 2;
        let mut next = vec![0usize; order.len()];
        let mut entry = vec![None::<u32>; m];
        let mut n = 0;
        let mut round = 0u64;
        loop {
            round += 1;
            for k in 0..order.len() {
                // Turns due by this round minus turns already taken.
                if (c0 + round * w[k]) / w_max == (c0 + (round - 1) * w[k]) / w_max {
                    continue;
                }
                let mut c = perms[k][next[k]];
                while entry[c].is_some() {
                    next[k] += 1;
                    c = perms[k][next[k]];
                }
                entry[c] = Some(order[k] as u32);
                next[k] += 1;
                n += 1;
                if n == m {
                    return entry.into_iter().map(Option::unwrap).collect();
                }
            }
        }
    }

    fn endpoints(rng: &mut fastrand::Rng, n: usize, max_weight: u32) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                id: i as u32,
                weight: rng.u32(1..=max_weight),
                hash: rng.u64(..),
            })
            .collect()
    }

    #[test]
    fn primes() {
        assert_eq!(next_prime(0), 2);
        assert_eq!(next_prime(13), 13);
        assert_eq!(next_prime(14), 17);
        assert_eq!(next_prime(65_536), 65_537);
        assert_eq!(next_prime(100_000), 100_003);
        assert_eq!(table_size(65_537, 3), 65_537);
        assert_eq!(table_size(65_537, 1000), 100_003);
        assert_eq!(table_size(13, 3), 307);
        assert_eq!(table_size(65_536, 0), 65_537);
        assert_eq!(table_size(usize::MAX, 1), next_prime(MAX_REQUESTED_SIZE));
    }

    #[test]
    fn matches_reference_algorithm() {
        let mut rng = fastrand::Rng::with_seed(7);
        for &(n, max_w, m) in &[
            (1, 1, 13),
            (3, 1, 13),
            (5, 1, 13),
            (3, 4, 101),
            (7, 10, 1009),
            (20, 100, 2003),
        ] {
            for _ in 0..5 {
                let eps = endpoints(&mut rng, n, max_w);
                let want = reference(&eps, m);
                assert_eq!(
                    populate_with(&eps, m, Schedule::Rounds),
                    want,
                    "rounds {n} {m}"
                );
                assert_eq!(populate_with(&eps, m, Schedule::Heap), want, "heap {n} {m}");
                assert_eq!(populate(&eps, m), want);
            }
        }
    }

    #[test]
    fn heap_and_rounds_agree_on_skewed_weights() {
        let mut rng = fastrand::Rng::with_seed(8);
        let mut eps = endpoints(&mut rng, 50, 3);
        eps[17].weight = 10_000;
        let a = populate_with(&eps, 65_537, Schedule::Rounds);
        let b = populate_with(&eps, 65_537, Schedule::Heap);
        assert_eq!(a, b);
    }

    #[test]
    fn caller_order_does_not_matter() {
        let mut rng = fastrand::Rng::with_seed(9);
        let eps = endpoints(&mut rng, 30, 5);
        let mut rev = eps.clone();
        rev.reverse();
        let a = populate(&eps, 4001);
        let b = populate(&rev, 4001);
        let ids =
            |t: &[u32], e: &[Endpoint]| t.iter().map(|&i| e[i as usize].id).collect::<Vec<_>>();
        assert_eq!(ids(&a, &eps), ids(&b, &rev));
    }

    #[test]
    #[should_panic(expected = "must be a prime")]
    fn rejects_non_prime_size() {
        let eps = [Endpoint {
            id: 0,
            weight: 1,
            hash: 1,
        }];
        let _ = populate(&eps, 12);
    }
}
