//! PROXY protocol headers (HAProxy's spec, versions 1 and 2), sent to the
//! backend before any client byte so it learns the real client address.

use std::net::{IpAddr, SocketAddr};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 1 (text): `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`. When the
/// two addresses are of different families (an IPv4 client on a dual-stack
/// listener is not possible here since `[::]` is v6-only, but be safe) the
/// v4 one is written as v4-mapped v6.
pub fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src_ip, dst_ip, family) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d), "TCP4"),
        (s, d) => (IpAddr::V6(to_v6(s)), IpAddr::V6(to_v6(d)), "TCP6"),
    };
    format!(
        "PROXY {family} {src_ip} {dst_ip} {} {}\r\n",
        src.port(),
        dst.port()
    )
    .into_bytes()
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Version 2 (binary), command PROXY over TCP (`\x21`), family INET
/// (`\x11`) or INET6 (`\x21`).
pub fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&to_v6(s).octets());
            out.extend_from_slice(&to_v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_ipv4_and_ipv6() {
        let h = v1(
            "192.0.2.1:5555".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 443\r\n");
        let h = v1(
            "[2001:db8::1]:5555".parse().unwrap(),
            "[::1]:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 5555 443\r\n");
        assert!(h.len() <= 107, "v1 headers are at most 107 bytes");
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = v2(
            "192.0.2.1:5555".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[198, 51, 100, 2]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 5555);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 443);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn v2_ipv6_layout() {
        let h = v2(
            "[2001:db8::1]:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
        );
        assert_eq!(h[13], 0x21);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[48..52], &[0, 1, 0, 2]);
    }
}
