//! Socket addresses as written in the file: `IP:port`, `[v6]:port` or
//! `host:port` (resolved with the system resolver, first result).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};

const EXPECTED: &str = "expected IP:port, [v6]:port or host:port";

/// Resolves addresses, remembering host names already looked up during one
/// load so that a name used by many backends is resolved once.
#[derive(Debug, Default)]
pub(crate) struct Resolver {
    cache: HashMap<(String, u16), Result<SocketAddr, String>>,
}

impl Resolver {
    /// Parses and, for a host name, resolves `text`. The error is a message
    /// for the user (without the key path).
    pub(crate) fn parse(&mut self, text: &str) -> Result<SocketAddr, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return check_port(addr.port()).map(|()| addr);
        }
        if text.trim() != text {
            return Err(format!("{EXPECTED}, got {text:?} (remove the spaces)"));
        }
        if let Some(rest) = text.strip_prefix('[') {
            return parse_bracketed(text, rest);
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("{EXPECTED}, got {text:?} (the port is missing)"));
        };
        if host.contains(':') || host.contains(']') {
            return Err(format!(
                "{EXPECTED}, got {text:?}: an IPv6 address must be in brackets, like [::1]:53"
            ));
        }
        let port = parse_port(port, text)?;
        if host.is_empty() {
            return Err(format!("{EXPECTED}, got {text:?} (the host is missing)"));
        }
        if looks_like_ipv4(host) {
            return Err(format!(
                "{EXPECTED}, got {text:?}: {host:?} is not a valid IPv4 address"
            ));
        }
        check_host_name(host, text)?;
        let key = (host.to_ascii_lowercase(), port);
        if let Some(cached) = self.cache.get(&key) {
            return cached.clone();
        }
        let result = resolve(host, port);
        self.cache.insert(key, result.clone());
        result
    }
}

fn parse_bracketed(text: &str, rest: &str) -> Result<SocketAddr, String> {
    let Some((inner, after)) = rest.split_once(']') else {
        return Err(format!(
            "{EXPECTED}, got {text:?}: the IPv6 address has no closing ']' (write [v6]:port, like [::1]:53)"
        ));
    };
    let ip: Ipv6Addr = inner
        .parse()
        .map_err(|_| format!("{EXPECTED}, got {text:?}: {inner:?} is not a valid IPv6 address"))?;
    let Some(port) = after.strip_prefix(':') else {
        return Err(format!(
            "{EXPECTED}, got {text:?}: a ':port' must follow the ']' (like [::1]:53)"
        ));
    };
    let port = parse_port(port, text)?;
    Ok(SocketAddr::new(IpAddr::V6(ip), port))
}

fn parse_port(port: &str, text: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err(format!("{EXPECTED}, got {text:?} (the port is missing)"));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{EXPECTED}, got {text:?}: port {port:?} is not a number"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) => check_port(p).map(|()| p),
        Err(_) => Err(format!("port {port} is out of range (1-65535) in {text:?}")),
    }
}

fn check_port(port: u16) -> Result<(), String> {
    if port == 0 {
        Err("port 0 is not allowed; give a fixed port (1-65535)".to_owned())
    } else {
        Ok(())
    }
}

/// Digits and dots only: meant as an IPv4 address, not a host name.
fn looks_like_ipv4(host: &str) -> bool {
    host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn check_host_name(host: &str, text: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{EXPECTED}, got {text:?}: {host:?} is not a valid host name"
        ))
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    // RFC 6761: names under .invalid never resolve; answer at once instead
    // of asking a resolver that may be slow or absent.
    if lower == "invalid" || lower.ends_with(".invalid") {
        return Err(format!(
            "cannot resolve host {host:?}: names under .invalid never resolve"
        ));
    }
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("cannot resolve host {host:?}: no addresses found")),
        Err(e) => Err(format!("cannot resolve host {host:?}: {e}")),
    }
}

/// Whether two listen addresses of the same protocol cannot both be bound:
/// the same address, or the same port where one side is the wildcard of the
/// same family. `[::]:P` and `0.0.0.0:P` do not conflict: sluice sets
/// IPV6_V6ONLY on IPv6 listeners.
pub(crate) fn listen_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SocketAddr, String> {
        Resolver::default().parse(s)
    }

    #[test]
    fn literal_addresses() {
        assert_eq!(parse("10.0.0.1:443"), Ok("10.0.0.1:443".parse().unwrap()));
        assert_eq!(parse("[::1]:53"), Ok("[::1]:53".parse().unwrap()));
        assert_eq!(parse("[::]:8443"), Ok("[::]:8443".parse().unwrap()));
    }

    #[test]
    fn bad_addresses_say_why() {
        let e = parse("10.0.0.1").unwrap_err();
        assert!(e.contains("port is missing"), "{e}");
        assert!(e.starts_with("expected IP:port, [v6]:port or host:port, got \"10.0.0.1\""));
        assert!(parse("10.0.0.1:70000")
            .unwrap_err()
            .contains("out of range"));
        assert!(parse("10.0.0.1:0").unwrap_err().contains("port 0"));
        assert!(parse("10.0.0.300:80")
            .unwrap_err()
            .contains("not a valid IPv4"));
        assert!(parse("::1:53").unwrap_err().contains("in brackets"));
        assert!(parse("[::1:53").unwrap_err().contains("closing ']'"));
        assert!(parse("[::1]53").unwrap_err().contains("':port'"));
        assert!(parse("[::g]:53").unwrap_err().contains("not a valid IPv6"));
        assert!(parse("a b:80")
            .unwrap_err()
            .contains("not a valid host name"));
        assert!(parse("host:http").unwrap_err().contains("not a number"));
        assert!(parse("nohost.invalid:80")
            .unwrap_err()
            .contains("cannot resolve"));
    }

    #[test]
    fn localhost_resolves() {
        let a = parse("localhost:8080").unwrap();
        assert!(a.ip().is_loopback());
        assert_eq!(a.port(), 8080);
    }

    #[test]
    fn conflicts() {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listen_conflict(p("0.0.0.0:80"), p("127.0.0.1:80")));
        assert!(listen_conflict(p("127.0.0.1:80"), p("127.0.0.1:80")));
        assert!(listen_conflict(p("[::]:80"), p("[::1]:80")));
        assert!(!listen_conflict(p("[::]:80"), p("0.0.0.0:80")));
        assert!(!listen_conflict(p("127.0.0.1:80"), p("127.0.0.2:80")));
        assert!(!listen_conflict(p("0.0.0.0:80"), p("0.0.0.0:81")));
    }
}
