//! Snapshot construction and the per-algorithm pick functions. Everything
//! here reads the immutable snapshot, the caller's [`PickCtx`] and
//! [`PickState`], and the members' [`Load`](crate::Load) atomics; nothing
//! allocates except the first round-robin pick with a new `PickState`.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use crate::maglev::{self, weight_of};
use crate::{Algorithm, BuildOptions, FlowKey, Member, PickCtx, PickState, Snapshot};

/// Source of snapshot ids; starts at 1 so a fresh `PickState` (id 0) never
/// matches a snapshot.
static NEXT_SNAPSHOT_ID: AtomicU64 = AtomicU64::new(1);

/// The table walk of maglev/source_ip visits at most this many slots per
/// member (plus [`WALK_EXTRA`]) before scanning the members instead.
const WALK_PER_MEMBER: usize = 8;
const WALK_EXTRA: usize = 16;

pub(crate) fn build(algorithm: Algorithm, members: Vec<Member>, opts: BuildOptions) -> Snapshot {
    let id = NEXT_SNAPSHOT_ID.fetch_add(1, Relaxed);
    let mut table = Vec::new();
    let mut cumulative = Vec::new();
    match algorithm {
        Algorithm::Maglev | Algorithm::SourceIp if !members.is_empty() => {
            let m = maglev::table_size(opts.table_size, members.len());
            let endpoints: Vec<_> = members.iter().map(|m| m.endpoint).collect();
            table = maglev::populate(&endpoints, m);
        }
        Algorithm::Random | Algorithm::TwoChoices => {
            let mut sum = 0u64;
            cumulative = members
                .iter()
                .map(|m| {
                    sum += weight_of(&m.endpoint);
                    sum
                })
                .collect();
        }
        _ => {}
    }
    Snapshot {
        id,
        algorithm,
        members,
        opts,
        table,
        cumulative,
    }
}

/// A uniform index in `0..n` from a 64-bit random number (multiply-shift,
/// uses the high bits, no division).
#[inline(always)]
fn fastrange(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

/// SplitMix64's finaliser: a second random number from the first.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Not excluded and below its connection limit.
#[inline(always)]
fn eligible(m: &Member, exclude: &[u32]) -> bool {
    (m.max_connections == 0 || m.load.active.load(Relaxed) < m.max_connections)
        && !exclude.contains(&m.endpoint.id)
}

/// `start, start + 1, ..., n - 1, 0, ..., start - 1` (cheaper than a
/// chained range in a hot loop).
#[inline(always)]
fn rotation(start: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |j| {
        let i = start + j;
        if i >= n {
            i - n
        } else {
            i
        }
    })
}

/// `a` is strictly less loaded than `b` (`active / weight`, cross-multiplied).
#[inline]
fn less_loaded(a: &Member, b: &Member) -> bool {
    let (aa, ab) = (
        u64::from(a.load.active.load(Relaxed)),
        u64::from(b.load.active.load(Relaxed)),
    );
    aa * weight_of(&b.endpoint) < ab * weight_of(&a.endpoint)
}

impl Snapshot {
    #[inline]
    pub(crate) fn pick_impl(
        &self,
        flow: &FlowKey,
        ctx: &PickCtx,
        state: &mut PickState,
        exclude: &[u32],
    ) -> Option<u32> {
        match self.algorithm {
            Algorithm::Maglev => self.pick_table(flow.flow_hash(), exclude),
            Algorithm::SourceIp => self.pick_table(flow.src_ip_hash(), exclude),
            _ => self.pick_other(ctx, state, exclude),
        }
    }

    /// The algorithms that do not look at the flow.
    #[inline(never)]
    fn pick_other(&self, ctx: &PickCtx, state: &mut PickState, exclude: &[u32]) -> Option<u32> {
        let i = match self.algorithm {
            Algorithm::Maglev | Algorithm::SourceIp => None,
            Algorithm::RoundRobin => self.pick_round_robin(state, exclude),
            Algorithm::LeastConn => self.pick_least_conn(ctx, exclude),
            Algorithm::Random => self.pick_random(ctx, exclude),
            Algorithm::TwoChoices => self.pick_two_choices(ctx, exclude),
            Algorithm::LeastLatency => self.pick_least_latency(ctx, exclude),
        }?;
        Some(self.members[i].endpoint.id)
    }

    /// Maglev / source_ip: the slot's member, else the next eligible one
    /// walking forward.
    #[inline]
    fn pick_table(&self, hash: u64, exclude: &[u32]) -> Option<u32> {
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        let slot = (hash % m as u64) as usize;
        let member = &self.members[self.table[slot] as usize];
        if eligible(member, exclude) {
            return Some(member.endpoint.id);
        }
        self.walk_table(slot, exclude)
            .map(|i| self.members[i].endpoint.id)
    }

    #[cold]
    fn walk_table(&self, slot: usize, exclude: &[u32]) -> Option<usize> {
        let m = self.table.len();
        let n = self.members.len();
        let limit = m.min(WALK_PER_MEMBER * n + WALK_EXTRA);
        let after = self.table[slot + 1..].iter().chain(&self.table[..slot]);
        if let Some(&i) = after
            .take(limit - 1)
            .find(|&&i| eligible(&self.members[i as usize], exclude))
        {
            return Some(i as usize);
        }
        // Few eligible members, or only ones whose weight share rounds to
        // no slot: scan the members, from a place the slot decides.
        let start = slot % n;
        (start..n)
            .chain(0..start)
            .find(|&i| eligible(&self.members[i], exclude))
    }

    /// Smooth weighted round robin (NGINX): every eligible member adds its
    /// weight to its current value; the largest (first on ties) wins and
    /// loses the total.
    fn pick_round_robin(&self, state: &mut PickState, exclude: &[u32]) -> Option<usize> {
        let n = self.members.len();
        if state.snapshot_id != self.id || state.current.len() != n {
            state.snapshot_id = self.id;
            state.current.clear();
            state.current.resize(n, 0);
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, m) in self.members.iter().enumerate() {
            if !eligible(m, exclude) {
                continue;
            }
            let w = weight_of(&m.endpoint) as i64;
            state.current[i] += w;
            total += w;
            if best.is_none_or(|b| state.current[i] > state.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        state.current[b] -= total;
        Some(b)
    }

    /// Lowest `active / weight`; scanning starts at a random member so ties
    /// spread.
    fn pick_least_conn(&self, ctx: &PickCtx, exclude: &[u32]) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = fastrange(ctx.rand, n as u64) as usize;
        let mut best: Option<(usize, u64, u64)> = None;
        for i in rotation(start, n) {
            let m = &self.members[i];
            let active = m.load.active.load(Relaxed);
            if (m.max_connections != 0 && active >= m.max_connections)
                || exclude.contains(&m.endpoint.id)
            {
                continue;
            }
            let (a, w) = (u64::from(active), weight_of(&m.endpoint));
            if best.is_none_or(|(_, ba, bw)| a * bw < ba * w) {
                best = Some((i, a, w));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// Index of the member owning position `x` of the cumulative weights.
    #[inline]
    fn at_weight(&self, x: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= x)
    }

    fn pick_random(&self, ctx: &PickCtx, exclude: &[u32]) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let i = self.at_weight(fastrange(ctx.rand, total));
        if eligible(&self.members[i], exclude) {
            return Some(i);
        }
        self.weighted_eligible(ctx.rand, None, exclude)
    }

    /// Weighted random among the eligible members other than `skip`, by two
    /// scans (no allocation). Used when the cheap draw hit an ineligible one.
    #[cold]
    fn weighted_eligible(&self, r: u64, skip: Option<usize>, exclude: &[u32]) -> Option<usize> {
        let candidates = || {
            self.members
                .iter()
                .enumerate()
                .filter(move |&(i, m)| Some(i) != skip && eligible(m, exclude))
        };
        let total: u64 = candidates().map(|(_, m)| weight_of(&m.endpoint)).sum();
        if total == 0 {
            return None;
        }
        let mut x = fastrange(r, total);
        let mut last = None;
        for (i, m) in candidates() {
            let w = weight_of(&m.endpoint);
            if x < w {
                return Some(i);
            }
            x -= w;
            last = Some(i);
        }
        // Loads moved between the two scans.
        last
    }

    /// Power of two choices: two distinct weighted-random candidates (from
    /// `ctx.rand` and a mix of it); the one with lower `active / weight`
    /// wins, the first on a tie.
    fn pick_two_choices(&self, ctx: &PickCtx, exclude: &[u32]) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let (r1, r2) = (ctx.rand, mix64(ctx.rand));
        let a = self.at_weight(fastrange(r1, total));
        let b = if self.members.len() == 1 {
            a
        } else {
            // Draw over the other members' weights, skipping a's range.
            let wa = weight_of(&self.members[a].endpoint);
            let start_a = self.cumulative[a] - wa;
            let mut x = fastrange(r2, total - wa);
            if x >= start_a {
                x += wa;
            }
            self.at_weight(x)
        };
        let a = if eligible(&self.members[a], exclude) {
            a
        } else {
            self.weighted_eligible(r1, None, exclude)?
        };
        let b = if b != a && eligible(&self.members[b], exclude) {
            Some(b)
        } else {
            self.weighted_eligible(r2, Some(a), exclude)
        };
        match b {
            Some(b) if less_loaded(&self.members[b], &self.members[a]) => Some(b),
            _ => Some(a),
        }
    }

    /// Lowest peak-EWMA cost at `ctx.now_nanos`; ties rotate like least_conn.
    fn pick_least_latency(&self, ctx: &PickCtx, exclude: &[u32]) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = fastrange(ctx.rand, n as u64) as usize;
        let decay = self.opts.decay_nanos;
        let mut best: Option<(usize, f64)> = None;
        for i in rotation(start, n) {
            let m = &self.members[i];
            if !eligible(m, exclude) {
                continue;
            }
            let c = m.load.cost(ctx.now_nanos, decay);
            if best.is_none_or(|(_, bc)| c < bc) {
                best = Some((i, c));
            }
        }
        best.map(|(i, _)| i)
    }
}
