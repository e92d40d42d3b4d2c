//! Golden vectors: the hash and the Maglev tables are part of the wire
//! behaviour (two processes, or two versions, must agree on them), so any
//! change to the hashing or the population breaks these tests.

mod common;

use common::*;
use sluice_balance::{maglev, stable_hash, Endpoint, FlowKey};

#[test]
fn stable_hash_is_xxh64_seed_0() {
    // Published XXH64 values (seed 0).
    assert_eq!(stable_hash(b""), 0xEF46_DB37_51D8_E999);
    assert_eq!(stable_hash(b"a"), 0xD24E_C4F1_A98C_6E5B);
    assert_eq!(stable_hash(b"abc"), 0x44BC_2CF5_AD77_0999);
    // Backend addresses as the dataplane hashes them.
    assert_eq!(stable_hash(b"10.0.0.1:443"), 0x6E6A_9695_A9D5_E393);
    assert_eq!(stable_hash(b"10.0.0.2:443"), 0x2380_5BFE_F344_86B1);
    assert_eq!(stable_hash(b"[2001:db8::1]:443"), 0xF75F_72BB_0BE4_EE5E);
    assert_eq!(stable_hash(b"app2.internal:443"), 0x7FB3_C421_D968_BED5);
}

#[test]
fn flow_hashes_are_pinned() {
    let f = FlowKey::tcp(
        "192.0.2.7:5555".parse().unwrap(),
        "198.51.100.1:443".parse().unwrap(),
    );
    // The documented byte layout for IPv4, hashed by hand.
    let mut b = vec![192, 0, 2, 7];
    b.extend_from_slice(&5555u16.to_be_bytes());
    b.extend_from_slice(&[198, 51, 100, 1]);
    b.extend_from_slice(&443u16.to_be_bytes());
    b.push(6);
    assert_eq!(f.flow_hash(), stable_hash(&b));
    assert_eq!(f.src_ip_hash(), stable_hash(&b[..4]));
    assert_eq!(f.flow_hash(), 0xEEA0_8A10_816B_4C9B);
    let u = FlowKey::udp(f.src, f.dst);
    assert_ne!(u.flow_hash(), f.flow_hash());
    assert_eq!(u.src_ip_hash(), f.src_ip_hash());
    // IPv4 and its IPv4-mapped IPv6 form are the same client.
    let mapped = FlowKey::tcp(
        "[::ffff:192.0.2.7]:5555".parse().unwrap(),
        "[::ffff:198.51.100.1]:443".parse().unwrap(),
    );
    assert_eq!(mapped.flow_hash(), f.flow_hash());
    assert_eq!(mapped.src_ip_hash(), f.src_ip_hash());
    // IPv6: 37 bytes.
    let v6 = FlowKey::udp(
        "[2001:db8::7]:5555".parse().unwrap(),
        "[2001:db8::1]:53".parse().unwrap(),
    );
    let ip = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let mut b = ip("2001:db8::7").to_vec();
    b.extend_from_slice(&5555u16.to_be_bytes());
    b.extend_from_slice(&ip("2001:db8::1"));
    b.extend_from_slice(&53u16.to_be_bytes());
    b.push(17);
    assert_eq!(v6.flow_hash(), stable_hash(&b));
    assert_eq!(v6.src_ip_hash(), stable_hash(&b[..16]));
    assert_eq!(v6.flow_hash(), 0x5AF7_CA23_852C_4AC1);
}

fn endpoints(n: usize) -> Vec<Endpoint> {
    equal(n).iter().map(|m| m.endpoint).collect()
}

/// M = 13, three backends, checked by hand with the paper's procedure
/// (Eisenbud et al. 2016, section 3.4, Algorithm 1):
///
/// Turn order is by endpoint hash: b1 (0x2380..), b0 (0x6E6A..), b2 (0xE6FC..).
/// (offset, skip) and preference lists `(offset + j*skip) mod 13`:
///   b1 (9, 12): 9 8 7 6 5 4 3 2 1 0 12 11 10
///   b0 (8, 2):  8 10 12 1 3 5 7 9 11 0 2 4 6
///   b2 (12, 9): 12 8 4 0 9 5 1 10 6 2 11 7 3
/// round 1: b1->9  b0->8  b2->12
/// round 2: b1->7 (8 taken)  b0->10  b2->4 (8 taken)
/// round 3: b1->6  b0->1 (12 taken)  b2->0
/// round 4: b1->5  b0->3  b2->2 (9 5 1 10 6 taken)
/// round 5: b1->11 (4 3 2 1 0 12 taken); table full.
#[test]
fn maglev_m13_three_backends_by_hand() {
    let eps = endpoints(3);
    assert_eq!(maglev::permutation(eps[0].hash, 13), (8, 2));
    assert_eq!(maglev::permutation(eps[1].hash, 13), (9, 12));
    assert_eq!(maglev::permutation(eps[2].hash, 13), (12, 9));
    assert_eq!(
        maglev::populate(&eps, 13),
        vec![2, 0, 2, 0, 2, 1, 1, 1, 0, 1, 0, 1, 2]
    );
}

#[test]
fn maglev_m13_five_backends() {
    let eps = endpoints(5);
    assert_eq!(maglev::permutation(eps[3].hash, 13), (9, 6));
    assert_eq!(maglev::permutation(eps[4].hash, 13), (0, 2));
    assert_eq!(
        maglev::populate(&eps, 13),
        vec![4, 3, 3, 4, 4, 2, 1, 1, 0, 1, 0, 0, 2]
    );
}

#[test]
fn maglev_65537_three_backends() {
    let t = maglev(equal(3)).maglev_table();
    assert_eq!(t.len(), 65_537);
    assert_eq!(
        t[..32],
        [
            0, 0, 2, 0, 2, 1, 1, 0, 0, 1, 1, 2, 0, 2, 1, 2, 0, 1, 0, 0, 2, 1, 2, 1, 0, 1, 2, 0, 1,
            2, 0, 2
        ]
    );
    assert_eq!(checksum(&t), 0x2B0C_29E9_8160_EA08);
}

#[test]
fn maglev_65537_five_backends() {
    let t = maglev(equal(5)).maglev_table();
    assert_eq!(
        t[..32],
        [
            0, 0, 2, 0, 2, 1, 1, 0, 0, 3, 1, 2, 0, 2, 3, 3, 0, 1, 4, 0, 2, 3, 4, 3, 0, 1, 4, 3, 3,
            2, 4, 2
        ]
    );
    assert_eq!(checksum(&t), 0x5ED0_8B55_66AB_C971);
}

#[test]
fn maglev_65537_weighted_1_2_4() {
    let t = maglev(members(&[100, 200, 400])).maglev_table();
    assert_eq!(
        t[..32],
        [
            0, 2, 2, 0, 2, 1, 1, 2, 0, 1, 1, 2, 2, 2, 1, 2, 0, 2, 2, 2, 2, 1, 2, 2, 2, 1, 2, 0, 2,
            2, 2, 2
        ]
    );
    assert_eq!(checksum(&t), 0x4F33_16AF_EDBF_D1AB);
    assert_eq!(counts(&t, 3), [9363, 18725, 37449]);
}

#[test]
fn member_order_does_not_change_the_table() {
    let mut m = equal(5);
    m.reverse();
    assert_eq!(checksum(&maglev(m).maglev_table()), 0x5ED0_8B55_66AB_C971);
}
