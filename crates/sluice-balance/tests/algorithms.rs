//! Behaviour of each algorithm in deterministic scenarios: time, randomness
//! and load are set by hand.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use common::*;
use sluice_balance::{
    Algorithm, BuildOptions, Endpoint, FlowKey, Load, Member, PickCtx, PickState, Snapshot,
};

const ALL: [Algorithm; 7] = [
    Algorithm::Maglev,
    Algorithm::SourceIp,
    Algorithm::RoundRobin,
    Algorithm::LeastConn,
    Algorithm::Random,
    Algorithm::TwoChoices,
    Algorithm::LeastLatency,
];

fn snap(alg: Algorithm, members: Vec<Member>) -> Snapshot {
    Snapshot::build(alg, members, BuildOptions::default())
}

fn flow(i: u32) -> FlowKey {
    let src = format!(
        "192.0.{}.{}:{}",
        (i >> 8) & 0xff,
        i & 0xff,
        1024 + (i % 50_000)
    );
    FlowKey::tcp(src.parse().unwrap(), "198.51.100.1:443".parse().unwrap())
}

fn ctx(rand: u64) -> PickCtx {
    PickCtx { rand, now_nanos: 0 }
}

/// Spread test "random" numbers over the whole u64 range.
fn rand_at(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn set_active(s: &Snapshot, active: &[u32]) {
    for (m, &a) in s.members().iter().zip(active) {
        m.load.active.store(a, Relaxed);
    }
}

#[test]
fn snapshot_is_shareable() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Snapshot>();
    send_sync::<Arc<Snapshot>>();
}

#[test]
fn empty_snapshot_picks_none() {
    for alg in ALL {
        let s = snap(alg, Vec::new());
        assert!(s.is_empty());
        assert_eq!(s.table_size(), 0);
        assert_eq!(
            s.pick(&flow(1), &ctx(7), &mut PickState::default(), &[]),
            None,
            "{alg:?}"
        );
    }
}

#[test]
fn everything_excluded_or_full_picks_none() {
    for alg in ALL {
        let s = snap(alg, equal(3));
        let mut st = PickState::default();
        assert_eq!(
            s.pick(&flow(1), &ctx(7), &mut st, &[0, 1, 2]),
            None,
            "{alg:?}"
        );
        let limited: Vec<Member> = equal(3)
            .into_iter()
            .map(|m| {
                m.load.active.store(5, Relaxed);
                Member {
                    max_connections: 5,
                    ..m
                }
            })
            .collect();
        let s = snap(alg, limited);
        assert_eq!(s.pick(&flow(1), &ctx(7), &mut st, &[]), None, "{alg:?}");
    }
}

#[test]
fn exclusions_and_limits_are_honoured_by_every_algorithm() {
    for alg in ALL {
        let s = snap(alg, equal(5));
        let mut st = PickState::default();
        for i in 0..500 {
            let id = s
                .pick(&flow(i), &ctx(rand_at(u64::from(i))), &mut st, &[0, 2])
                .unwrap();
            assert!(id != 0 && id != 2, "{alg:?} picked excluded {id}");
        }
        let limited: Vec<Member> = equal(5)
            .into_iter()
            .map(|m| {
                if m.endpoint.id == 4 {
                    Member {
                        max_connections: 1,
                        ..m
                    }
                } else {
                    m
                }
            })
            .collect();
        limited[4].load.active.store(1, Relaxed);
        let s = snap(alg, limited);
        for i in 0..500 {
            let id = s
                .pick(&flow(i), &ctx(rand_at(u64::from(i))), &mut st, &[1])
                .unwrap();
            assert!(id != 1 && id != 4, "{alg:?} picked {id}");
        }
    }
}

#[test]
fn maglev_pick_is_the_table_entry() {
    let s = maglev(equal(7));
    let t = s.maglev_table();
    for i in 0..2000 {
        let f = flow(i);
        let want = t[(f.flow_hash() % t.len() as u64) as usize];
        assert_eq!(
            s.pick(&f, &ctx(i.into()), &mut PickState::default(), &[]),
            Some(want)
        );
    }
}

#[test]
fn maglev_fallback_walks_the_table_forward() {
    let s = maglev(equal(7));
    let t = s.maglev_table();
    let m = t.len();
    for i in 0..2000 {
        let f = flow(i);
        let slot = (f.flow_hash() % m as u64) as usize;
        let first = t[slot];
        let want = (1..m)
            .map(|k| t[(slot + k) % m])
            .find(|&id| id != first)
            .unwrap();
        let got = s.pick(&f, &ctx(0), &mut PickState::default(), &[first]);
        assert_eq!(got, Some(want));
    }
    // Same for a member at its connection limit.
    let limited: Vec<Member> = equal(7)
        .into_iter()
        .map(|m| Member {
            max_connections: 2,
            ..m
        })
        .collect();
    let s = maglev(limited);
    let f = flow(99);
    let slot = (f.flow_hash() % m as u64) as usize;
    let first = t[slot] as usize;
    s.members()[first].load.active.store(2, Relaxed);
    let want = (1..m)
        .map(|k| t[(slot + k) % m])
        .find(|&id| id as usize != first)
        .unwrap();
    assert_eq!(
        s.pick(&f, &ctx(0), &mut PickState::default(), &[]),
        Some(want)
    );
}

#[test]
fn maglev_finds_a_member_that_owns_no_slot() {
    // 99 backends of weight 10000 and one of weight 1: its share of 65537
    // slots rounds to zero, but it is still picked when it is the only one
    // left.
    let mut w = vec![10_000; 99];
    w.push(1);
    let s = maglev(members(&w));
    assert!(!s.maglev_table().contains(&99));
    let exclude: Vec<u32> = (0..99).collect();
    for i in 0..50 {
        assert_eq!(
            s.pick(&flow(i), &ctx(0), &mut PickState::default(), &exclude),
            Some(99)
        );
    }
}

#[test]
fn source_ip_keys_on_the_client_ip_only() {
    let s = snap(Algorithm::SourceIp, equal(10));
    assert_eq!(s.maglev_table(), maglev(equal(10)).maglev_table());
    let mut st = PickState::default();
    for i in 0..200u32 {
        let ip = format!("203.0.113.{}", i % 256);
        let a = FlowKey::tcp(
            format!("{ip}:1000").parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        );
        let b = FlowKey::udp(
            format!("{ip}:2000").parse().unwrap(),
            "198.51.100.9:53".parse().unwrap(),
        );
        assert_eq!(
            s.pick(&a, &ctx(1), &mut st, &[]),
            s.pick(&b, &ctx(2), &mut st, &[])
        );
    }
}

#[test]
fn round_robin_is_smooth_5_1_1() {
    let s = snap(Algorithm::RoundRobin, members(&[5, 1, 1]));
    let mut st = PickState::default();
    let seq: String = (0..14)
        .map(|i| (b'a' + s.pick(&flow(i), &ctx(u64::from(i)), &mut st, &[]).unwrap() as u8) as char)
        .collect();
    assert_eq!(seq, "aabacaaaabacaa");
}

#[test]
fn round_robin_state_resets_with_a_new_snapshot() {
    let s = snap(Algorithm::RoundRobin, members(&[5, 1, 1]));
    let mut st = PickState::default();
    let first: Vec<_> = (0..3)
        .map(|i| s.pick(&flow(i), &ctx(0), &mut st, &[]).unwrap())
        .collect();
    assert_eq!(first, [0, 0, 1]);
    // A rebuild (health change) starts the sequence over, with new members.
    let s2 = s.rebuild_with(members(&[1, 1]));
    assert_ne!(s2.id(), s.id());
    let seq: Vec<_> = (0..4)
        .map(|i| s2.pick(&flow(i), &ctx(0), &mut st, &[]).unwrap())
        .collect();
    assert_eq!(seq, [0, 1, 0, 1]);
}

#[test]
fn round_robin_skips_excluded_members() {
    let s = snap(Algorithm::RoundRobin, members(&[1, 1, 1]));
    let mut st = PickState::default();
    let seq: Vec<_> = (0..6)
        .map(|i| s.pick(&flow(i), &ctx(0), &mut st, &[1]).unwrap())
        .collect();
    assert_eq!(seq, [0, 2, 0, 2, 0, 2]);
}

#[test]
fn least_conn_prefers_the_idle_backend() {
    let s = snap(Algorithm::LeastConn, equal(3));
    set_active(&s, &[5, 0, 3]);
    for r in 0..1000 {
        assert_eq!(
            s.pick(&flow(0), &ctx(rand_at(r)), &mut PickState::default(), &[]),
            Some(1)
        );
    }
    // active / weight: 2/100 > 3/200.
    let s = snap(Algorithm::LeastConn, members(&[100, 200]));
    set_active(&s, &[2, 3]);
    assert_eq!(
        s.pick(&flow(0), &ctx(0), &mut PickState::default(), &[]),
        Some(1)
    );
}

#[test]
fn least_conn_ties_rotate_with_the_random_number() {
    let s = snap(Algorithm::LeastConn, equal(4));
    let mut seen = [0usize; 4];
    for r in 0..4000 {
        seen[s
            .pick(&flow(0), &ctx(rand_at(r)), &mut PickState::default(), &[])
            .unwrap() as usize] += 1;
    }
    assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    // Deterministic: the same number picks the same backend.
    let again = s.pick(&flow(0), &ctx(rand_at(17)), &mut PickState::default(), &[]);
    assert_eq!(
        again,
        s.pick(&flow(0), &ctx(rand_at(17)), &mut PickState::default(), &[])
    );
}

#[test]
fn random_follows_the_weights() {
    let s = snap(Algorithm::Random, members(&[1, 2, 4]));
    let mut rng = fastrand::Rng::with_seed(11);
    let mut seen = [0usize; 3];
    let n = 700_000;
    for _ in 0..n {
        seen[s
            .pick(&flow(0), &ctx(rng.u64(..)), &mut PickState::default(), &[])
            .unwrap() as usize] += 1;
    }
    for (i, want) in [1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0].into_iter().enumerate() {
        let share = seen[i] as f64 / n as f64;
        assert!((share / want - 1.0).abs() < 0.01, "{i}: {share} vs {want}");
    }
}

#[test]
fn two_choices_prefers_the_idle_backend() {
    // Two backends: the two candidates are distinct, so the idle one always
    // wins.
    let s = snap(Algorithm::TwoChoices, equal(2));
    set_active(&s, &[10, 0]);
    for r in 0..1000 {
        assert_eq!(
            s.pick(&flow(0), &ctx(rand_at(r)), &mut PickState::default(), &[]),
            Some(1)
        );
    }
    set_active(&s, &[0, 10]);
    for r in 0..1000 {
        assert_eq!(
            s.pick(&flow(0), &ctx(rand_at(r)), &mut PickState::default(), &[]),
            Some(0)
        );
    }
    // Three backends, one idle: it wins whenever it is a candidate (2/3).
    let s = snap(Algorithm::TwoChoices, equal(3));
    set_active(&s, &[10, 0, 20]);
    let mut seen = [0usize; 3];
    for r in 0..3000 {
        seen[s
            .pick(&flow(0), &ctx(rand_at(r)), &mut PickState::default(), &[])
            .unwrap() as usize] += 1;
    }
    assert_eq!(seen[2], 0, "the busiest backend can never win: {seen:?}");
    assert!(seen[1] > 1800 && seen[1] < 2200, "{seen:?}");
}

#[test]
fn least_latency_prefers_the_faster_backend_and_switches_when_it_slows() {
    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;
    let decay = 10 * SEC;
    let opts = BuildOptions {
        decay_nanos: decay,
        ..BuildOptions::default()
    };
    let s = Snapshot::build(Algorithm::LeastLatency, equal(2), opts);
    let (a, b) = (&s.members()[0].load, &s.members()[1].load);
    let pick = |now: u64, r: u64| {
        s.pick(
            &flow(0),
            &PickCtx {
                rand: rand_at(r),
                now_nanos: now,
            },
            &mut PickState::default(),
            &[],
        )
    };

    // No observation yet: both cost 0, ties rotate with the random number.
    assert_eq!(pick(0, 0), Some(0));
    assert_eq!(pick(0, 1), Some(1));
    // b observed, a not: a (cost 0) gets tried.
    b.observe(5 * MS, 0, decay);
    assert_eq!(pick(0, 1), Some(0));

    // a fast (1 ms), b slow (10 ms): a.
    a.observe(MS, SEC, decay);
    b.observe(10 * MS, SEC, decay);
    for r in 0..10 {
        assert_eq!(pick(SEC + MS, r), Some(0));
    }
    // Load counts too: a with 20 connections in flight costs 21 ms > 10 ms.
    a.active.store(20, Relaxed);
    assert_eq!(pick(SEC + MS, 0), Some(1));
    a.active.store(0, Relaxed);

    // a slows down to 50 ms: the peak is taken at once, b wins.
    a.observe(50 * MS, 2 * SEC, decay);
    for r in 0..10 {
        assert_eq!(pick(2 * SEC, r), Some(1));
    }

    // a recovers: fast samples every 100 ms while b stays at 10 ms; the
    // estimate decays back and a is preferred again.
    let mut now = 2 * SEC;
    let mut switched_at = None;
    for _ in 0..200 {
        now += 100 * MS;
        a.observe(MS, now, decay);
        b.observe(10 * MS, now, decay);
        if pick(now, 0) == Some(0) {
            switched_at = Some(now);
            break;
        }
    }
    let t = switched_at.expect("a is preferred again after it recovers");
    // From 50 ms towards 1 ms with tau = 10 s, it crosses 10 ms after
    // tau * ln(49 / 9) ~ 17 s.
    let secs = (t - 2 * SEC) as f64 / SEC as f64;
    eprintln!("least_latency: back on the recovered backend after {secs:.1} s");
    assert!((15.0..20.0).contains(&secs), "{secs}");
}

#[test]
fn snapshot_ids_are_unique_and_options_kept() {
    let opts = BuildOptions {
        table_size: 13,
        decay_nanos: 5,
    };
    let a = Snapshot::build(Algorithm::Maglev, equal(2), opts);
    let b = a.rebuild_with(equal(3));
    assert_ne!(a.id(), b.id());
    assert_eq!(b.options(), opts);
    assert_eq!(b.algorithm(), Algorithm::Maglev);
    assert_eq!(b.members().len(), 3);
    // 100 x 3 = 300 is above the requested 13: raised to the next prime.
    assert_eq!(b.table_size(), 307);
    let dbg = format!("{b:?}");
    assert!(dbg.contains("table_size: 307") && dbg.len() < 300, "{dbg}");
}

#[test]
fn endpoint_from_address_uses_stable_hash() {
    let e = Endpoint::from_address(3, 7, "10.0.0.1:443");
    assert_eq!(
        e,
        Endpoint {
            id: 3,
            weight: 7,
            hash: 0x6E6A_9695_A9D5_E393
        }
    );
    let _ = Arc::new(Load::default());
}
