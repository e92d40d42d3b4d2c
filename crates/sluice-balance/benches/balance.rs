//! Maglev lookup (ns per pick) and table build time for 10/100/1000
//! backends, plus one pick of each other algorithm. Results are recorded in
//! docs/benchmarks.md ("Balancing").
//!
//! cargo bench -p sluice-balance -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use sluice_balance::{
    maglev, Algorithm, BuildOptions, Endpoint, FlowKey, Load, Member, PickCtx, PickState, Snapshot,
};

const SIZES: [usize; 3] = [10, 100, 1000];
const FLOWS: usize = 4096;

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| {
            let addr = format!("10.0.{}.{}:443", i / 250, i % 250 + 1);
            let e = Endpoint::from_address(i as u32, 100, &addr);
            Member::new(e, Arc::new(Load::default()), 0)
        })
        .collect()
}

fn flows() -> Vec<FlowKey> {
    let mut rng = fastrand::Rng::with_seed(1);
    (0..FLOWS)
        .map(|_| {
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(rng.u32(..))), rng.u16(1024..));
            FlowKey::tcp(src, "198.51.100.1:443".parse().unwrap())
        })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let flows = flows();
    let mut g = c.benchmark_group("pick");
    let mut algs = vec![
        (Algorithm::Maglev, SIZES.to_vec()),
        (Algorithm::SourceIp, vec![100]),
    ];
    for alg in [
        Algorithm::RoundRobin,
        Algorithm::LeastConn,
        Algorithm::Random,
        Algorithm::TwoChoices,
        Algorithm::LeastLatency,
    ] {
        algs.push((alg, vec![10, 100]));
    }
    for (alg, sizes) in algs {
        for n in sizes {
            let snap = Snapshot::build(alg, members(n), BuildOptions::default());
            let mut state = PickState::default();
            let mut i = 0usize;
            let mut rand = 0x1234_5678_9ABC_DEF0u64;
            g.bench_function(BenchmarkId::new(format!("{alg:?}"), n), |b| {
                b.iter(|| {
                    i = (i + 1) & (FLOWS - 1);
                    rand = rand.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let ctx = PickCtx {
                        rand,
                        now_nanos: 1_000_000_000,
                    };
                    snap.pick(black_box(&flows[i]), &ctx, &mut state, &[])
                })
            });
        }
    }
    g.finish();
}

fn hashes(c: &mut Criterion) {
    let flows = flows();
    let mut g = c.benchmark_group("hash");
    let mut i = 0usize;
    g.bench_function("flow_hash", |b| {
        b.iter(|| {
            i = (i + 1) & (FLOWS - 1);
            black_box(&flows[i]).flow_hash()
        })
    });
    g.bench_function("src_ip_hash", |b| {
        b.iter(|| {
            i = (i + 1) & (FLOWS - 1);
            black_box(&flows[i]).src_ip_hash()
        })
    });
    g.finish();
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build");
    g.sample_size(20);
    for n in SIZES {
        let m = members(n);
        let size = maglev::table_size(BuildOptions::default().table_size, n);
        g.bench_function(BenchmarkId::new(format!("snapshot_M{size}"), n), |b| {
            b.iter_batched(
                || m.clone(),
                |m| Snapshot::build(Algorithm::Maglev, m, BuildOptions::default()),
                BatchSize::SmallInput,
            )
        });
    }
    // The paper's figure is for M = 65537; populate at exactly that size.
    let eps: Vec<Endpoint> = members(1000).iter().map(|m| m.endpoint).collect();
    g.bench_function(BenchmarkId::new("populate_M65537", 1000), |b| {
        b.iter(|| maglev::populate(black_box(&eps), 65_537))
    });
    g.finish();
}

criterion_group!(benches, hashes, lookup, build);
criterion_main!(benches);
