//! Loopback networking for tests: free ports, connecting with retries, and
//! small clients (tagged TCP, echo, bulk, UDP, HTTP) with deadlines on every
//! read and write.

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket,
};
use std::time::{Duration, Instant};

use crate::bulk::{HashCounter, PseudoRandom};
use crate::{poll_until, POLL_SLICE};

/// `127.0.0.1`, where every test listens and connects unless it needs more.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A TCP port on `ip` that is free right now.
///
/// It binds port 0, reads the port the kernel chose and closes the socket, so
/// there is a tiny race: another process (or another test running in
/// parallel) may take the port before sluice binds it. The kernel hands out
/// ephemeral ports in a rotating fashion, which makes that rare; a test that
/// cannot tolerate it should bind the socket itself. Panics if `ip` is not a
/// loopback address.
pub fn free_tcp_port(ip: IpAddr) -> u16 {
    assert!(
        ip.is_loopback(),
        "tests use loopback addresses only, not {ip}"
    );
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("cannot bind a TCP port on {ip}: {e}"))
        .port()
}

/// A UDP port on `ip` that is free right now (same race as [`free_tcp_port`]).
pub fn free_udp_port(ip: IpAddr) -> u16 {
    assert!(
        ip.is_loopback(),
        "tests use loopback addresses only, not {ip}"
    );
    UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .unwrap_or_else(|e| panic!("cannot bind a UDP port on {ip}: {e}"))
        .port()
}

/// `127.0.0.1:<free TCP port>`.
pub fn free_tcp_addr() -> SocketAddr {
    SocketAddr::new(LOCALHOST, free_tcp_port(LOCALHOST))
}

/// `127.0.0.1:<free UDP port>`.
pub fn free_udp_addr() -> SocketAddr {
    SocketAddr::new(LOCALHOST, free_udp_port(LOCALHOST))
}

/// A random address in 127.0.0.0/8 other than 127.0.0.1 (Linux routes the
/// whole /8 to loopback), for a test that wants an address no other test
/// uses, for example to assert which local address a reply came from.
pub fn random_loopback_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        fastrand::u8(1..=254),
        fastrand::u8(1..=254),
        fastrand::u8(2..=254),
    ))
}

/// Connects to `addr`, retrying (refused, reset, timed out…) with a short
/// backoff until `deadline` passes; panics with the last error then. Reads
/// and writes on the returned stream time out after [`IO_TIMEOUT`] so a test
/// that waits for bytes that never come fails instead of hanging.
#[track_caller]
pub fn connect_with_retry(addr: SocketAddr, deadline: Duration) -> TcpStream {
    let mut last_error = None;
    let stream = poll_until(deadline, || {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(stream) => Some(stream),
            Err(e) => {
                last_error = Some(e);
                None
            }
        }
    });
    match stream {
        Some(stream) => {
            set_io_timeouts(&stream, IO_TIMEOUT);
            stream
        }
        None => panic!(
            "could not connect to {addr} within {deadline:?}: {}",
            last_error.map_or_else(|| "no attempt".to_string(), |e| e.to_string())
        ),
    }
}

/// The read/write timeout set on client streams by the helpers here.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets both read and write timeouts on `stream`.
pub fn set_io_timeouts(stream: &TcpStream, timeout: Duration) {
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .expect("setting socket timeouts");
}

fn remaining(start: Instant, deadline: Duration) -> io::Result<Duration> {
    deadline
        .checked_sub(start.elapsed())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
}

/// Reads one `\n`-terminated line (without the `\n`) within `deadline`.
/// Reads byte by byte so nothing after the line is consumed. Errors on EOF
/// before the newline, on timeout, or on a line longer than 64 KiB.
pub fn read_line_within(stream: &mut TcpStream, deadline: Duration) -> io::Result<String> {
    let start = Instant::now();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream.set_read_timeout(Some(remaining(start, deadline)?))?;
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {:?}", String::from_utf8_lossy(&line)),
                ))
            }
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) if line.len() >= 64 * 1024 => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads exactly `n` bytes within `deadline`.
pub fn read_exact_within(
    stream: &mut TcpStream,
    n: usize,
    deadline: Duration,
) -> io::Result<Vec<u8>> {
    let start = Instant::now();
    let mut buf = vec![0; n];
    let mut filled = 0;
    while filled < n {
        stream.set_read_timeout(Some(remaining(start, deadline)?))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {filled} of {n} bytes"),
                ))
            }
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Reads until EOF within `deadline`; errors if more than `limit` bytes come.
pub fn read_to_end_within(
    stream: &mut TcpStream,
    limit: usize,
    deadline: Duration,
) -> io::Result<Vec<u8>> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        stream.set_read_timeout(Some(remaining(start, deadline)?))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(k) if out.len() + k > limit => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("more than {limit} bytes before EOF"),
                ))
            }
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// True if the peer closed `stream` (EOF or reset) within `deadline`; any
/// bytes read meanwhile are discarded.
pub fn closed_within(stream: &mut TcpStream, deadline: Duration) -> bool {
    match read_to_end_within(stream, usize::MAX, deadline) {
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ),
    }
}

/// Connects to `addr` (retrying until `deadline`) and returns the tag line a
/// [`crate::tcp::TcpTagged`] backend sends first: which backend was reached.
#[track_caller]
pub fn tcp_tag(addr: SocketAddr, deadline: Duration) -> String {
    let mut stream = connect_with_retry(addr, deadline);
    read_line_within(&mut stream, deadline)
        .unwrap_or_else(|e| panic!("reading the backend tag through {addr}: {e}"))
}

/// Writes `payload` to `stream` and reads the same number of bytes back,
/// asserting they are equal (an echo round trip), within `deadline`.
#[track_caller]
pub fn echo_roundtrip(stream: &mut TcpStream, payload: &[u8], deadline: Duration) {
    stream
        .set_write_timeout(Some(deadline))
        .and_then(|()| stream.write_all(payload))
        .unwrap_or_else(|e| panic!("writing {} bytes: {e}", payload.len()));
    let got = read_exact_within(stream, payload.len(), deadline)
        .unwrap_or_else(|e| panic!("reading the echo of {} bytes: {e}", payload.len()));
    assert!(got == payload, "echo differs from what was sent");
}

/// Sends `len` pseudo-random bytes from `seed` to `addr` (a
/// [`crate::tcp::TcpHashSink`], directly or through sluice), half-closes, and
/// returns the sink's report `(length, sha256 hex)`. Compare it with
/// `(len, PseudoRandom::expected_sha256_hex(seed, len))`.
#[track_caller]
pub fn send_bulk_and_hash(
    addr: SocketAddr,
    seed: u64,
    len: u64,
    deadline: Duration,
) -> (u64, String) {
    let start = Instant::now();
    let mut stream = connect_with_retry(addr, deadline);
    stream
        .set_write_timeout(Some(deadline))
        .expect("set timeout");
    let mut source = PseudoRandom::new(seed, len);
    let mut buf = vec![0; 256 * 1024];
    loop {
        assert!(
            start.elapsed() < deadline,
            "sending {len} bytes took over {deadline:?}"
        );
        let n = source.read(&mut buf).expect("PseudoRandom");
        if n == 0 {
            break;
        }
        stream
            .write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("sending bulk data to {addr}: {e}"));
    }
    stream.shutdown(Shutdown::Write).expect("half-close");
    let left = deadline.saturating_sub(start.elapsed());
    let line = read_line_within(&mut stream, left)
        .unwrap_or_else(|e| panic!("reading the sink's report from {addr}: {e}"));
    parse_hash_report(&line).unwrap_or_else(|| panic!("bad sink report {line:?}"))
}

/// Parses a `"<len> <hex>"` report line from [`crate::tcp::TcpHashSink`].
pub fn parse_hash_report(line: &str) -> Option<(u64, String)> {
    let (len, hex) = line.trim().split_once(' ')?;
    Some((len.parse().ok()?, hex.to_string()))
}

/// Connects to `addr` (a [`crate::tcp::TcpSource`], directly or through
/// sluice), reads until EOF within `deadline`, and returns `(length, sha256
/// hex)` of what arrived, without holding it in memory.
#[track_caller]
pub fn receive_bulk_and_hash(addr: SocketAddr, deadline: Duration) -> (u64, String) {
    let start = Instant::now();
    let mut stream = connect_with_retry(addr, deadline);
    let mut hash = HashCounter::new();
    let mut buf = vec![0; 256 * 1024];
    loop {
        let left = remaining(start, deadline)
            .unwrap_or_else(|_| panic!("receiving from {addr} took over {deadline:?}"));
        stream.set_read_timeout(Some(left)).expect("set timeout");
        match stream.read(&mut buf) {
            Ok(0) => return hash.finish(),
            Ok(n) => hash.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "receiving bulk data from {addr} after {} bytes: {e}",
                hash.len()
            ),
        }
    }
}

/// A UDP socket on `127.0.0.1:<ephemeral>`, with a short read timeout
/// ([`POLL_SLICE`]); use [`udp_request`] / [`udp_recv_from`] to wait longer.
pub fn udp_client() -> UdpSocket {
    udp_client_on(LOCALHOST)
}

/// A UDP socket on `ip:<ephemeral>` (a loopback address).
pub fn udp_client_on(ip: IpAddr) -> UdpSocket {
    assert!(
        ip.is_loopback(),
        "tests use loopback addresses only, not {ip}"
    );
    let socket = UdpSocket::bind((ip, 0)).expect("bind a UDP client socket");
    socket
        .set_read_timeout(Some(POLL_SLICE))
        .expect("set timeout");
    socket
}

/// Sends `payload` from `socket` to `to` and waits up to `timeout` for one
/// datagram back from `to`; `None` on timeout. Datagrams from other sources
/// are ignored (and dropped).
pub fn udp_request(
    socket: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    socket.send_to(payload, to).expect("udp send");
    udp_recv_from(socket, to, timeout)
}

/// Waits up to `timeout` for one datagram from `from` on `socket`.
pub fn udp_recv_from(socket: &UdpSocket, from: SocketAddr, timeout: Duration) -> Option<Vec<u8>> {
    let start = Instant::now();
    let mut buf = vec![0; 65536];
    while start.elapsed() < timeout {
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        socket
            .set_read_timeout(Some(left.min(POLL_SLICE)))
            .expect("set timeout");
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) if peer == from => return Some(buf[..n].to_vec()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                        // ICMP port unreachable from an earlier send:
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => panic!("udp recv: {e}"),
        }
    }
    None
}

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code, e.g. 200.
    pub status: u16,
    /// Header `(name, value)` pairs, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (lossily decoded as UTF-8).
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close` (for the admin
/// endpoint), within `deadline`; reads until the server closes or
/// `Content-Length` bytes arrived. Errors are returned, not panicked, so a
/// test can poll with [`crate::eventually_some`].
pub fn http_get(addr: SocketAddr, path: &str, deadline: Duration) -> io::Result<HttpResponse> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, deadline)?;
    stream.set_write_timeout(Some(remaining(start, deadline)?))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(response) = parse_http(&raw, false) {
            return Ok(response);
        }
        stream.set_read_timeout(Some(remaining(start, deadline)?))?;
        match stream.read(&mut buf) {
            Ok(0) => {
                return parse_http(&raw, true).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad HTTP response {:?}", String::from_utf8_lossy(&raw)),
                    )
                })
            }
            Ok(n) if raw.len() + n > 64 << 20 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response over 64 MiB",
                ))
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Parses a response once it is complete: with `eof`, the body runs to the
/// end; without, only when `Content-Length` says it is all there.
fn parse_http(raw: &[u8], eof: bool) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let body = match length {
        Some(len) if body.len() >= len => &body[..len],
        _ if eof => body,
        _ => return None,
    };
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// Resolves `host:port` text to its first address (for tests that take
/// addresses from logs or JSON).
pub fn parse_addr(text: &str) -> SocketAddr {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("not an address: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::TcpServer;
    use crate::DEADLINE;

    #[test]
    fn http_get_reads_status_headers_and_body() {
        let server = TcpServer::start(SocketAddr::new(LOCALHOST, 0), |conn| {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf)? {
                    0 => return Ok(()),
                    n => request.extend_from_slice(&buf[..n]),
                }
            }
            let path = String::from_utf8_lossy(&request)
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            let body = format!("you asked for {path}");
            conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )?;
            conn.drain().map(drop)
        });
        let response = http_get(server.addr(), "/healthz", DEADLINE).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("text/plain"));
        assert_eq!(response.body, "you asked for /healthz");
    }

    #[test]
    fn free_ports_are_bindable() {
        let port = free_tcp_port(LOCALHOST);
        drop(TcpListener::bind((LOCALHOST, port)).unwrap());
        let port = free_udp_port(LOCALHOST);
        drop(UdpSocket::bind((LOCALHOST, port)).unwrap());
        assert!(random_loopback_ip().is_loopback());
        let ip = random_loopback_ip();
        drop(TcpListener::bind((ip, free_tcp_port(ip))).unwrap());
    }

    #[test]
    fn connect_with_retry_gives_up_naming_the_address() {
        let addr = SocketAddr::new(LOCALHOST, free_tcp_port(LOCALHOST));
        let result =
            std::panic::catch_unwind(|| connect_with_retry(addr, Duration::from_millis(100)));
        let message = *result.unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains(&addr.to_string()), "{message}");
    }
}
