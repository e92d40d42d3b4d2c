//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use sluice_balance::{stable_hash, Algorithm, BuildOptions, Endpoint, Load, Member, Snapshot};

/// `10.0.<i / 250>.<i % 250 + 1>:443`: the address of test backend `i`.
pub fn addr(i: usize) -> String {
    format!("10.0.{}.{}:443", i / 250, i % 250 + 1)
}

/// Members with ids `0..weights.len()`, addresses [`addr`], fresh loads.
pub fn members(weights: &[u32]) -> Vec<Member> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            Member::new(
                Endpoint::from_address(i as u32, w, &addr(i)),
                Arc::new(Load::default()),
                0,
            )
        })
        .collect()
}

/// `n` members of weight 100.
pub fn equal(n: usize) -> Vec<Member> {
    members(&vec![100; n])
}

pub fn maglev(members: Vec<Member>) -> Snapshot {
    Snapshot::build(Algorithm::Maglev, members, BuildOptions::default())
}

/// Checksum of a table: `stable_hash` of its entries as little-endian u32.
pub fn checksum(table: &[u32]) -> u64 {
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
    stable_hash(&bytes)
}

/// Entries owned by each id in `0..n`.
pub fn counts(table: &[u32], n: usize) -> Vec<usize> {
    let mut c = vec![0; n];
    for &e in table {
        c[e as usize] += 1;
    }
    c
}
