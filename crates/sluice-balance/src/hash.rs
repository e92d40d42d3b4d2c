//! The one fixed hash of the crate: XXH64 (xxHash, 64-bit variant, Yann
//! Collet), implemented here with its published constants so that the output
//! never depends on the process, the platform, the Rust version or a random
//! key. [`crate::stable_hash`] is `xxh64(bytes, 0)`; Maglev permutations and
//! flow lookups are built from it (see [`crate::maglev`] and
//! [`crate::FlowKey::flow_hash`]).
//!
//! Checked against the reference vectors of `xxhsum`'s sanity check (see
//! the tests below), so any other XXH64 implementation gives the same values.

use std::net::IpAddr;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline(always)]
fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline(always)]
fn merge_round(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline(always)]
fn read_u64(chunk: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*chunk)
}

/// Lane `i` (0..4) of a 32-byte stripe.
#[inline(always)]
fn lane(stripe: &[u8; 32], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&stripe[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

/// XXH64 of `input` with `seed` (little-endian reads, as the reference).
#[inline]
pub fn xxh64(input: &[u8], seed: u64) -> u64 {
    let mut rest = input;
    let mut h = if input.len() >= 32 {
        let mut v1 = seed.wrapping_add(P1).wrapping_add(P2);
        let mut v2 = seed.wrapping_add(P2);
        let mut v3 = seed;
        let mut v4 = seed.wrapping_sub(P1);
        while let Some((stripe, tail)) = rest.split_first_chunk::<32>() {
            v1 = round(v1, lane(stripe, 0));
            v2 = round(v2, lane(stripe, 1));
            v3 = round(v3, lane(stripe, 2));
            v4 = round(v4, lane(stripe, 3));
            rest = tail;
        }
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        h = merge_round(h, v1);
        h = merge_round(h, v2);
        h = merge_round(h, v3);
        merge_round(h, v4)
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(input.len() as u64);
    while let Some((chunk, tail)) = rest.split_first_chunk::<8>() {
        h ^= round(0, read_u64(chunk));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = tail;
    }
    if let Some((chunk, tail)) = rest.split_first_chunk::<4>() {
        h ^= u64::from(u32::from_le_bytes(*chunk)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = tail;
    }
    for &byte in rest {
        h ^= u64::from(byte).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    avalanche(h)
}

#[inline(always)]
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// An address normalised for hashing: IPv4-mapped IPv6 (`::ffff:a.b.c.d`,
/// what a dual-stack socket reports for an IPv4 peer) becomes IPv4, so a
/// client hashes the same whichever way it was accepted.
#[derive(Clone, Copy)]
pub(crate) enum Ip {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[inline(always)]
pub(crate) fn norm(ip: IpAddr) -> Ip {
    match ip {
        IpAddr::V4(v4) => Ip::V4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Ip::V4(v4.octets()),
            None => Ip::V6(v6.octets()),
        },
    }
}

impl Ip {
    /// The 16-byte (IPv4-mapped IPv6) form, used when the families differ.
    #[inline(always)]
    fn v6(self) -> [u8; 16] {
        match self {
            Ip::V4(v4) => std::net::Ipv4Addr::from(v4).to_ipv6_mapped().octets(),
            Ip::V6(v6) => v6,
        }
    }
}

/// XXH64 (seed 0) of a flow's bytes. Both ends IPv4 (after [`norm`]): the
/// 13 bytes `src ip (4) | src port (2, BE) | dst ip (4) | dst port (2, BE)
/// | proto (1)`; otherwise the 37 bytes of the same fields with 16-byte
/// addresses (IPv4 as `::ffff:a.b.c.d`). Computed from registers, without
/// storing the bytes (the same value as [`xxh64`] over them; tested).
#[inline(always)]
pub(crate) fn flow_hash(src: Ip, src_port: u16, dst: Ip, dst_port: u16, proto: u8) -> u64 {
    match (src, dst) {
        (Ip::V4(s), Ip::V4(d)) => flow4(s, src_port, d, dst_port, proto),
        _ => flow6(src.v6(), src_port, dst.v6(), dst_port, proto),
    }
}

/// XXH64 (seed 0) of a client address: its 4 bytes for IPv4 (after
/// [`norm`]), its 16 bytes for IPv6.
#[inline(always)]
pub(crate) fn ip_hash(ip: Ip) -> u64 {
    match ip {
        Ip::V4(v4) => {
            let mut h = P5.wrapping_add(4);
            h = tail4(h, u32::from_le_bytes(v4));
            avalanche(h)
        }
        Ip::V6(v6) => {
            let x = u128::from_le_bytes(v6);
            let mut h = P5.wrapping_add(16);
            h = tail8(h, x as u64);
            h = tail8(h, (x >> 64) as u64);
            avalanche(h)
        }
    }
}

/// A port as the little-endian reading of its big-endian bytes.
#[inline(always)]
fn port_le(port: u16) -> u16 {
    u16::from_le_bytes(port.to_be_bytes())
}

#[inline(always)]
fn tail8(h: u64, lane: u64) -> u64 {
    (h ^ round(0, lane))
        .rotate_left(27)
        .wrapping_mul(P1)
        .wrapping_add(P4)
}

#[inline(always)]
fn tail4(h: u64, word: u32) -> u64 {
    (h ^ u64::from(word).wrapping_mul(P1))
        .rotate_left(23)
        .wrapping_mul(P2)
        .wrapping_add(P3)
}

#[inline(always)]
fn tail1(h: u64, byte: u8) -> u64 {
    (h ^ u64::from(byte).wrapping_mul(P5))
        .rotate_left(11)
        .wrapping_mul(P1)
}

/// The 13-byte IPv4 flow.
#[inline(always)]
fn flow4(src: [u8; 4], src_port: u16, dst: [u8; 4], dst_port: u16, proto: u8) -> u64 {
    let s = u64::from(u32::from_le_bytes(src));
    let d = u32::from_le_bytes(dst);
    // bytes 0..8: src ip, src port, dst ip 0..2; bytes 8..12: dst ip 2..4,
    // dst port; byte 12: proto.
    let lane = s | (u64::from(port_le(src_port)) << 32) | (u64::from(d & 0xFFFF) << 48);
    let word = (d >> 16) | (u32::from(port_le(dst_port)) << 16);
    let mut h = P5.wrapping_add(13);
    h = tail8(h, lane);
    h = tail4(h, word);
    avalanche(tail1(h, proto))
}

/// The 37-byte IPv6 flow.
#[inline(always)]
fn flow6(src: [u8; 16], src_port: u16, dst: [u8; 16], dst_port: u16, proto: u8) -> u64 {
    let s = u128::from_le_bytes(src);
    let d = u128::from_le_bytes(dst);
    let sp = u64::from(port_le(src_port));
    let dp = u32::from(port_le(dst_port));
    // bytes 0..16: src ip; 16..24: src port, dst ip 0..6; 24..32: dst ip
    // 6..14; 32..36: dst ip 14..16, dst port; 36: proto.
    let v1 = round(P1.wrapping_add(P2), s as u64);
    let v2 = round(P2, (s >> 64) as u64);
    let v3 = round(0, sp | ((d as u64) << 16));
    let v4 = round(0u64.wrapping_sub(P1), (d >> 48) as u64);
    let mut h = v1
        .rotate_left(1)
        .wrapping_add(v2.rotate_left(7))
        .wrapping_add(v3.rotate_left(12))
        .wrapping_add(v4.rotate_left(18));
    h = merge_round(h, v1);
    h = merge_round(h, v2);
    h = merge_round(h, v3);
    h = merge_round(h, v4);
    h = h.wrapping_add(37);
    h = tail4(h, ((d >> 112) as u32) | (dp << 16));
    avalanche(tail1(h, proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented byte layouts, built the slow way.
    fn flow_bytes(src: &[u8], sp: u16, dst: &[u8], dp: u16, proto: u8) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(src);
        b.extend_from_slice(&sp.to_be_bytes());
        b.extend_from_slice(dst);
        b.extend_from_slice(&dp.to_be_bytes());
        b.push(proto);
        b
    }

    #[test]
    fn register_variants_match_the_byte_hash() {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..10_000 {
            let mut s6 = [0u8; 16];
            let mut d6 = [0u8; 16];
            rng.fill(&mut s6);
            rng.fill(&mut d6);
            let s4: [u8; 4] = rng.u32(..).to_le_bytes();
            let d4: [u8; 4] = rng.u32(..).to_le_bytes();
            let (sp, dp, proto) = (rng.u16(..), rng.u16(..), rng.u8(..));
            let got = flow_hash(Ip::V6(s6), sp, Ip::V6(d6), dp, proto);
            assert_eq!(got, xxh64(&flow_bytes(&s6, sp, &d6, dp, proto), 0));
            let got = flow_hash(Ip::V4(s4), sp, Ip::V4(d4), dp, proto);
            assert_eq!(got, xxh64(&flow_bytes(&s4, sp, &d4, dp, proto), 0));
            // Mixed families: both as 16 bytes.
            let m4 = Ip::V4(s4).v6();
            let got = flow_hash(Ip::V4(s4), sp, Ip::V6(d6), dp, proto);
            assert_eq!(got, xxh64(&flow_bytes(&m4, sp, &d6, dp, proto), 0));
            assert_eq!(ip_hash(Ip::V6(s6)), xxh64(&s6, 0));
            assert_eq!(ip_hash(Ip::V4(s4)), xxh64(&s4, 0));
        }
    }

    /// The sanity buffer of the reference `xxhsum` (bench.c / xxhsum.c r39):
    /// `byteGen = 2654435761; buf[i] = byteGen >> 24; byteGen *= byteGen`
    /// in 32-bit arithmetic.
    fn sanity_buffer() -> Vec<u8> {
        let mut gen: u32 = 2_654_435_761;
        (0..101)
            .map(|_| {
                let b = (gen >> 24) as u8;
                gen = gen.wrapping_mul(gen);
                b
            })
            .collect()
    }

    #[test]
    fn xxh64_reference_vectors() {
        let prime = 2_654_435_761_u64;
        let buf = sanity_buffer();
        assert_eq!(xxh64(&[], 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(&[], prime), 0xAC75_FDA2_929B_17EF);
        assert_eq!(xxh64(&buf[..1], 0), 0x4FCE_394C_C889_52D8);
        assert_eq!(xxh64(&buf[..1], prime), 0x7398_40CB_819F_A723);
        assert_eq!(xxh64(&buf[..14], 0), 0xCFFA_8DB8_81BC_3A3D);
        assert_eq!(xxh64(&buf[..14], prime), 0x5B96_1158_5EFC_C9CB);
        assert_eq!(xxh64(&buf, 0), 0x0EAB_5433_84F8_78AD);
        assert_eq!(xxh64(&buf, prime), 0xCAA6_5939_306F_1E21);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition", 0),
            0xFBCE_A83C_8A37_8BF1
        );
    }
}
