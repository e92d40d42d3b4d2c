//! End-to-end TCP proxy behaviour (issue "TCP data path"): half-close,
//! balancing, failures, timeouts, PROXY protocol, IPv6, EMFILE recovery.
//! Every test runs the real `sluice` binary on loopback.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sluice_e2e::net::{self, closed_within, free_tcp_addr, read_line_within, tcp_tag};
use sluice_e2e::tcp::{Conn, TcpEcho, TcpHashSink, TcpServer, TcpTagged};
use sluice_e2e::{eventually, PseudoRandom, Sluice};
use socket2::{Domain, Socket, Type};

const T: Duration = Duration::from_secs(10);

/// One TCP service with `extra` YAML lines (indented 4 spaces) and backends.
fn service(listen: SocketAddr, extra: &str, backends: &[SocketAddr]) -> String {
    let mut y = format!(
        "workers: 2\nshutdown_timeout: 2s\nservices:\n  - name: web\n    protocol: tcp\n    listen: [\"{listen}\"]\n"
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        y.push_str("    ");
        y.push_str(line.trim_start());
        y.push('\n');
    }
    y.push_str("    backends:\n");
    for b in backends {
        y.push_str(&format!("      - address: \"{b}\"\n"));
    }
    y
}

/// sluice with one TCP service in transfer `mode`, no health checks, in
/// front of `backend`; and the address it listens on.
fn in_mode(mode: &str, backend: SocketAddr) -> (SocketAddr, Sluice) {
    let listen = free_tcp_addr();
    let lb = Sluice::started(&service(
        listen,
        &format!("transfer: {mode}\nhealth_check: {{ kind: none }}"),
        &[backend],
    ));
    (listen, lb)
}

/// An address nobody listens on (connects are refused).
fn refused_addr() -> SocketAddr {
    free_tcp_addr()
}

#[test]
fn half_close_request_then_full_reply() {
    let (sink, reports) = TcpHashSink::start();
    let listen = free_tcp_addr();
    let _lb = Sluice::started(&service(listen, "transfer: copy", &[sink.addr()]));
    for (seed, len) in [(1u64, 10u64), (2, 3 << 20)] {
        let got = net::send_bulk_and_hash(listen, seed, len, T);
        assert_eq!(got, (len, PseudoRandom::expected_sha256_hex(seed, len)));
    }
    assert_eq!(reports.get().len(), 2);
}

#[test]
fn half_close_in_splice_mode() {
    let (sink, _) = TcpHashSink::start();
    let listen = free_tcp_addr();
    let _lb = Sluice::started(&service(listen, "transfer: splice", &[sink.addr()]));
    let got = net::send_bulk_and_hash(listen, 7, 5 << 20, T);
    assert_eq!(
        got,
        (5 << 20, PseudoRandom::expected_sha256_hex(7, 5 << 20))
    );
}

#[test]
fn round_robin_lands_evenly() {
    let backends: Vec<TcpTagged> = ["a", "b", "c"]
        .iter()
        .map(|n| TcpTagged::start(n))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let listen = free_tcp_addr();
    let _lb = Sluice::started(&service(listen, "balance: round_robin", &addrs));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..1000 {
        *counts.entry(tcp_tag(listen, T)).or_default() += 1;
    }
    eprintln!("round_robin over 1000 connections, 2 workers: {counts:?}");
    // Each worker keeps its own smooth-WRR state; with two workers each
    // backend gets 1000/3 +- 4/3 in total.
    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!(
            (332..=334).contains(&n),
            "backend {name} got {n}: {counts:?}"
        );
    }
}

/// Connect from a fixed source address (so the 5-tuple is the same across
/// runs) and return the backend tag. Closes with RST (linger 0) so the
/// 4-tuple is not left in TIME_WAIT for the next run.
fn tag_from(src: SocketAddr, listen: SocketAddr) -> String {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&src.into()).unwrap();
    socket.connect_timeout(&listen.into(), T).unwrap();
    let mut stream: TcpStream = socket.into();
    let tag = read_line_within(&mut stream, T).unwrap();
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    tag
}

#[test]
fn maglev_same_tuples_same_backends_across_runs() {
    let backends: Vec<TcpTagged> = ["m1", "m2", "m3", "m4"]
        .iter()
        .map(|n| TcpTagged::start(n))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let listen = free_tcp_addr();
    let sources: Vec<SocketAddr> = (0..120u16)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 3, (i % 200 + 1) as u8));
            SocketAddr::new(ip, net::free_tcp_port(ip))
        })
        .collect();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut lb = Sluice::started(&service(listen, "balance: maglev", &addrs));
        let tags: Vec<String> = sources.iter().map(|&s| tag_from(s, listen)).collect();
        lb.terminate();
        assert!(lb.wait_exit(T).success());
        runs.push(tags);
    }
    assert_eq!(
        runs[0], runs[1],
        "maglev must map the same 5-tuples to the same backends"
    );
    let distinct: std::collections::HashSet<&String> = runs[0].iter().collect();
    assert!(
        distinct.len() >= 3,
        "120 flows should spread over the backends: {distinct:?}"
    );
}

#[test]
fn source_ip_sticks_per_client_ip() {
    let backends: Vec<TcpTagged> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| TcpTagged::start(n))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let listen = free_tcp_addr();
    let _lb = Sluice::started(&service(listen, "balance: source_ip", &addrs));
    let mut seen = std::collections::HashSet::new();
    for x in 1..=12u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 4, x));
        let tags: std::collections::HashSet<String> = (0..15)
            .map(|_| tag_from(SocketAddr::new(ip, 0), listen))
            .collect();
        assert_eq!(
            tags.len(),
            1,
            "client {ip} reached several backends: {tags:?}"
        );
        seen.extend(tags);
    }
    assert!(
        seen.len() >= 2,
        "12 client IPs should use more than one backend"
    );
}

#[test]
fn refused_backend_is_skipped_by_retry() {
    let good = TcpTagged::start("good");
    let dead = refused_addr();
    let listen = free_tcp_addr();
    let _lb = Sluice::started(&service(
        listen,
        "balance: round_robin\nconnect_retries: 2",
        &[dead, good.addr()],
    ));
    for _ in 0..40 {
        assert_eq!(tcp_tag(listen, T), "good");
    }
}

#[test]
fn all_backends_down_closes_client_at_once() {
    let listen = free_tcp_addr();
    let lb = Sluice::started(&service(listen, "", &[refused_addr(), refused_addr()]));
    let mut client = TcpStream::connect(listen).unwrap();
    let start = Instant::now();
    assert!(
        closed_within(&mut client, Duration::from_secs(2)),
        "client must be closed"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        start.elapsed()
    );
    drop(lb);
}

#[test]
fn silent_backend_triggers_idle_timeout() {
    // Accepts, reads, never answers.
    let silent = TcpServer::start("127.0.0.1:0".parse().unwrap(), |conn| {
        conn.drain().map(drop)
    });
    let listen = free_tcp_addr();
    let mut lb = Sluice::started(&service(
        listen,
        "idle_timeout: 600ms\naccess_log: true",
        &[silent.addr()],
    ));
    let mut client = TcpStream::connect(listen).unwrap();
    client.write_all(b"hello?").unwrap();
    let start = Instant::now();
    assert!(
        closed_within(&mut client, Duration::from_secs(5)),
        "idle connection must close"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "closed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "closed too late: {took:?}");
    let line = lb.wait_for_log("access service=web", Duration::from_secs(5));
    assert!(
        line.contains("end=idle_timeout") && line.contains("bytes_to_backend=6"),
        "{line}"
    );
}

#[test]
fn backend_killed_mid_transfer_closes_client() {
    // A backend that streams forever until stopped.
    let endless = TcpServer::start("127.0.0.1:0".parse().unwrap(), |conn| {
        let chunk = vec![0x5a; 64 * 1024];
        loop {
            conn.write_all(&chunk)?;
        }
    });
    let listen = free_tcp_addr();
    let _lb = Sluice::started(&service(listen, "", &[endless.addr()]));
    let mut client = TcpStream::connect(listen).unwrap();
    let mut buf = vec![0; 1 << 20];
    let mut got = 0;
    while got < 8 << 20 {
        got += client.read(&mut buf).unwrap();
    }
    endless.stop();
    let start = Instant::now();
    assert!(
        closed_within(&mut client, Duration::from_secs(3)),
        "client must be closed"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        start.elapsed()
    );
}

/// Socket inodes held open by process `pid`.
fn socket_inodes(pid: u32) -> std::collections::HashSet<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect()
}

/// Sockets of process `pid` in SYN_SENT towards `port` (/proc/net/tcp,
/// matched by inode).
fn syn_sent_to(pid: u32, port: u16) -> usize {
    let inodes = socket_inodes(pid);
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9
                && f[3] == "02"
                && f[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
                && inodes.contains(f[9])
        })
        .count()
}

#[test]
fn connect_timeout_closes_the_socket() {
    // A listener with a full backlog that never accepts: SYNs are dropped,
    // so connects to it hang (a blackhole). connect_timeout is 2 s so the
    // test can see the attempt in SYN_SENT even on a busy machine.
    let hole = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    hole.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    hole.listen(0).unwrap();
    let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&hole_addr.into());
        fillers.push(s);
    }
    // Wait until a probe connect hangs in SYN_SENT: the backlog is full.
    eventually(T, "the blackhole backlog to fill", || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.connect_timeout(&hole_addr.into(), Duration::from_millis(200))
            .is_err()
    });
    let listen = free_tcp_addr();
    let lb = Sluice::started(&service(
        listen,
        "connect_timeout: 2s\nconnect_retries: 0\nhealth_check: { kind: none }",
        &[hole_addr],
    ));
    let baseline = lb.fd_count();
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(TcpStream::connect(listen).unwrap());
    }
    let pid = lb.pid();
    eventually(T, "sluice to try the blackhole", || {
        syn_sent_to(pid, hole_addr.port()) >= 1
    });
    for c in &mut clients {
        assert!(
            closed_within(c, Duration::from_secs(6)),
            "client must be closed after connect_timeout"
        );
    }
    drop(clients);
    // No connect attempt is left behind in the kernel, and no descriptor.
    eventually(T, "no SYN_SENT socket towards the blackhole", || {
        syn_sent_to(pid, hole_addr.port()) == 0
    });
    eventually(T, "fd count back to baseline", || lb.fd_count() <= baseline);
    drop(fillers);
}

/// Parse a PROXY v1 or v2 header from the start of a connection and return
/// the source address it carries.
fn read_proxy_header(conn: &mut sluice_e2e::tcp::Conn) -> std::io::Result<SocketAddr> {
    let mut first = [0u8; 12];
    read_exact(conn, &mut first)?;
    if &first == b"\r\n\r\n\0\r\nQUIT\n" {
        let mut rest = [0u8; 4];
        read_exact(conn, &mut rest)?;
        assert_eq!(rest[0], 0x21, "v2, PROXY command");
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let mut body = vec![0u8; len];
        read_exact(conn, &mut body)?;
        return Ok(match rest[1] {
            0x11 => SocketAddr::new(
                IpAddr::from([body[0], body[1], body[2], body[3]]),
                u16::from_be_bytes([body[8], body[9]]),
            ),
            0x21 => {
                let ip: [u8; 16] = body[..16].try_into().unwrap();
                SocketAddr::new(IpAddr::from(ip), u16::from_be_bytes([body[32], body[33]]))
            }
            f => panic!("unexpected family byte {f:#x}"),
        });
    }
    // v1: text line.
    let mut line = first.to_vec();
    while !line.ends_with(b"\r\n") {
        let mut b = [0u8; 1];
        read_exact(conn, &mut b)?;
        line.push(b[0]);
        assert!(line.len() <= 107, "v1 header too long");
    }
    let text = String::from_utf8(line).unwrap();
    let parts: Vec<&str> = text.trim_end().split(' ').collect();
    assert_eq!(parts[0], "PROXY");
    assert!(parts[1] == "TCP4" || parts[1] == "TCP6", "{text}");
    Ok(SocketAddr::new(
        parts[2].parse().unwrap(),
        parts[4].parse().unwrap(),
    ))
}

fn read_exact(conn: &mut sluice_e2e::tcp::Conn, buf: &mut [u8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let n = conn.read(&mut buf[got..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(())
}

fn proxy_protocol_case(version: &str, listen_ip: &str, backend_ip: &str) {
    let backend_ip: IpAddr = backend_ip.parse().unwrap();
    let backend = TcpServer::start(SocketAddr::new(backend_ip, 0), |conn| {
        let src = read_proxy_header(conn)?;
        conn.write_all(format!("{src}\n").as_bytes())?;
        conn.echo()
    });
    let ip: IpAddr = listen_ip.parse().unwrap();
    let listen = SocketAddr::new(ip, net::free_tcp_port(ip));
    let _lb = Sluice::started(&service(
        listen,
        &format!("proxy_protocol: {version}"),
        &[backend.addr()],
    ));
    let mut client = net::connect_with_retry(listen, T);
    let seen = read_line_within(&mut client, T).unwrap();
    assert_eq!(
        seen.parse::<SocketAddr>().unwrap(),
        client.local_addr().unwrap(),
        "{version}"
    );
    net::echo_roundtrip(&mut client, b"after the header", T);
}

#[test]
fn proxy_protocol_v1_carries_client_address() {
    proxy_protocol_case("v1", "127.0.0.1", "127.0.0.1");
}

#[test]
fn proxy_protocol_v2_carries_client_address() {
    proxy_protocol_case("v2", "127.0.0.1", "127.0.0.1");
}

#[test]
fn proxy_protocol_over_ipv6() {
    proxy_protocol_case("v1", "::1", "::1");
    proxy_protocol_case("v2", "::1", "::1");
}

#[test]
fn ipv6_listener_and_backend() {
    let backend = TcpTagged::start_on("six", "[::1]:0".parse().unwrap());
    let listen: SocketAddr = format!("[::1]:{}", net::free_tcp_port("::1".parse().unwrap()))
        .parse()
        .unwrap();
    let _lb = Sluice::started(&service(listen, "", &[backend.addr()]));
    let mut client = net::connect_with_retry(listen, T);
    assert_eq!(read_line_within(&mut client, T).unwrap(), "six");
    net::echo_roundtrip(&mut client, &vec![7u8; 300_000], T);
    client.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut client, T));
}

#[test]
fn emfile_in_accept_backs_off_and_recovers() {
    let echo = TcpEcho::start();
    let listen = free_tcp_addr();
    let mut lb =
        Sluice::started(&service(listen, "", &[echo.addr()]).replace("workers: 2", "workers: 1"));
    // Squeeze sluice's (soft) descriptor limit just above what it uses now.
    let limit = lb.fd_count() + 6;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", lb.pid()))
        .arg(format!("--nofile={limit}:20000"))
        .status()
        .expect("prlimit (util-linux) must be installed");
    assert!(status.success());
    // Open more connections than it can take: the excess waits in the
    // backlog while accept fails with EMFILE.
    let mut clients: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(listen).unwrap())
        .collect();
    lb.wait_for_log("accept failed", T);
    // Free descriptors: close the first clients (sluice closes their pairs).
    let rest = clients.split_off(2);
    drop(clients);
    drop(rest);
    // Give sluice its descriptors back; new connections must be served.
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", lb.pid()))
        .arg("--nofile=20000:20000")
        .status()
        .unwrap();
    assert!(status.success());
    let mut c = net::connect_with_retry(listen, T);
    net::echo_roundtrip(&mut c, b"recovered", T);
    assert!(lb.try_exit().is_none(), "sluice must keep running");
}

/// A long conversation (many request/response rounds on one connection,
/// which sluice waits on with a multishot poll after the first few), then a
/// bulk transfer on the same connections, in each transfer mode: every byte
/// comes back in order, both closes reach the other side, and no socket is
/// left once the connections are gone (the multishot polls are cancelled,
/// or the sockets would stay open).
#[test]
fn keep_alive_conversation_in_every_mode_closes_cleanly() {
    let echo = TcpEcho::start();
    for mode in ["copy", "splice", "auto"] {
        let (listen, lb) = in_mode(mode, echo.addr());
        let baseline = lb.socket_count();
        let mut clients: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(listen).unwrap())
            .collect();
        for c in &clients {
            c.set_read_timeout(Some(T)).unwrap();
        }
        for round in 0..200usize {
            for (i, c) in clients.iter_mut().enumerate() {
                // From a byte to a few segments.
                let len = 1 + (round * 7919 + i * 104_729) % 6000;
                let msg: Vec<u8> = (0..len).map(|k| (round + i + k) as u8).collect();
                c.write_all(&msg).unwrap();
                let mut back = vec![0; len];
                c.read_exact(&mut back)
                    .unwrap_or_else(|e| panic!("{mode}: round {round} client {i}: {e}"));
                assert_eq!(back, msg, "{mode}: round {round} client {i}");
            }
        }
        // Then the conversation turns into a bulk transfer both ways (auto
        // switches to splice, and the multishot polls give way).
        let bulk = sluice_e2e::pseudo_random_bytes(11, 3 << 20);
        for c in &mut clients {
            let mut writer = c.try_clone().unwrap();
            std::thread::scope(|s| {
                s.spawn(|| writer.write_all(&bulk).unwrap());
                let mut back = vec![0; bulk.len()];
                c.read_exact(&mut back)
                    .unwrap_or_else(|e| panic!("{mode}: bulk: {e}"));
                assert!(back == bulk, "{mode}: bulk echo differs");
            });
        }
        // The client half-closes; the echo answers with its own FIN.
        for c in &clients {
            c.shutdown(Shutdown::Write).unwrap();
        }
        for c in &mut clients {
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{mode}: nothing after the last answer");
        }
        drop(clients);
        eventually(T, &format!("{mode}: sockets back to {baseline}"), || {
            lb.socket_count() <= baseline
        });
    }
}

/// A conversation whose client stops reading: sluice's writes to it come
/// up short while the backend keeps sending small messages, so the
/// multishot receive on the backend is cancelled with replies on their way.
/// Every byte still arrives, in order, once the client reads again (a tiny
/// receive buffer makes the client's side fill up fast).
#[test]
fn a_conversation_with_a_slow_reader_loses_no_byte() {
    const PUSH: usize = 1200 * 4000;
    let pushed = sluice_e2e::pseudo_random_bytes(7, PUSH);
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<()>(4);
    let backend = {
        let pushed = pushed.clone();
        TcpServer::start("127.0.0.1:0".parse().unwrap(), move |conn| {
            // 100-byte messages are echoed; one starting with 0xff asks for
            // PUSH bytes in 4000-byte messages, 200 us apart.
            let mut msg = [0u8; 100];
            loop {
                let mut got = 0;
                while got < msg.len() {
                    let n = conn.read(&mut msg[got..])?;
                    if n == 0 {
                        return Ok(());
                    }
                    got += n;
                }
                if msg[0] != 0xff {
                    conn.write_all(&msg)?;
                    continue;
                }
                for chunk in pushed.chunks(4000) {
                    conn.write_all(chunk)?;
                    std::thread::sleep(Duration::from_micros(200));
                }
                let _ = done_tx.try_send(());
            }
        })
    };
    for mode in ["copy", "auto"] {
        let (listen, lb) = in_mode(mode, backend.addr());
        let baseline = lb.socket_count();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&listen.into()).unwrap();
        let mut client: TcpStream = socket.into();
        client.set_read_timeout(Some(T)).unwrap();
        // Small exchanges first: both directions turn into a conversation.
        for round in 0..20u8 {
            let msg = [round; 100];
            client.write_all(&msg).unwrap();
            let mut back = [0u8; 100];
            client.read_exact(&mut back).unwrap();
            assert_eq!(back, msg, "{mode}: round {round}");
        }
        // Then the backend pushes while the client does not read, until the
        // backend is done (or blocked for a while: every buffer is full).
        client.write_all(&[0xff; 100]).unwrap();
        let _ = done_rx.recv_timeout(Duration::from_secs(2));
        let mut back = vec![0u8; PUSH];
        client
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(back == pushed, "{mode}: the pushed stream differs");
        // And the conversation goes on.
        client.write_all(&[1; 100]).unwrap();
        let mut last = [0u8; 100];
        client.read_exact(&mut last).unwrap();
        assert_eq!(last, [1; 100], "{mode}: after the push");
        drop(client);
        eventually(T, &format!("{mode}: sockets back to {baseline}"), || {
            lb.socket_count() <= baseline
        });
    }
}

/// A backend that answers one request line per connection: the line is a
/// decimal size; the reply is that many pseudo-random bytes (seeded by the
/// size), then `finish` ends the connection.
fn one_reply_backend(finish: fn(&Conn) -> std::io::Result<()>) -> TcpServer {
    TcpServer::start("127.0.0.1:0".parse().unwrap(), move |conn| {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") {
            if conn.read(&mut byte)? == 0 {
                return Ok(());
            }
            line.push(byte[0]);
        }
        let len: usize = std::str::from_utf8(&line).unwrap().trim().parse().unwrap();
        conn.write_all(&sluice_e2e::pseudo_random_bytes(len as u64, len))?;
        finish(conn)
    })
}

/// Asks for `len` bytes over a new connection and reads to the end.
fn fetch(listen: SocketAddr, len: usize) -> (Vec<u8>, std::io::Result<()>) {
    let mut client = TcpStream::connect(listen).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    client.write_all(format!("{len}\n").as_bytes()).unwrap();
    let mut got = Vec::new();
    let end = client.read_to_end(&mut got).map(|_| ());
    (got, end)
}

const REPLY_SIZES: [usize; 9] = [1, 100, 4095, 16383, 16384, 16385, 65535, 70000, 300_000];

/// Connection per request, the backend closing right after its reply (as
/// `Connection: close` HTTP servers do): sluice reads the backend's end
/// together with the reply and sends the reply with the FIN on its last
/// segment. Every byte arrives, then end-of-stream, whatever the reply's
/// size relative to the read buffers, in every mode.
#[test]
fn reply_then_close_arrives_whole_in_every_mode() {
    let backend = one_reply_backend(|_| Ok(()));
    for mode in ["copy", "splice", "auto"] {
        let (listen, _lb) = in_mode(mode, backend.addr());
        for round in 0..3 {
            for len in REPLY_SIZES {
                let (got, end) = fetch(listen, len);
                end.unwrap_or_else(|e| panic!("{mode}: {len} bytes, round {round}: {e}"));
                assert!(
                    got == sluice_e2e::pseudo_random_bytes(len as u64, len),
                    "{mode}: {len} bytes, round {round}: got {} bytes, or other ones",
                    got.len()
                );
            }
        }
    }
}

/// The backend-to-client direction looks for the backend's end right after
/// a short reply; when the end is not there, the reply must go out at once,
/// not be held back for a FIN that is not coming: the backend sends its
/// second part only after the client has seen the first. Bytes sent with
/// `MSG_MORE` and nothing after them wait in the kernel (about 400 ms here)
/// before they go anyway, so a hold shows as the median wait for the first part
/// (a loopback round trip otherwise, well under a millisecond; the bound
/// leaves room for a loaded machine).
#[test]
fn a_reply_without_its_end_is_not_held_back() {
    let backend = TcpServer::start("127.0.0.1:0".parse().unwrap(), |conn| {
        let mut buf = [0u8; 64];
        for part in [&b"first part\n"[..], b"second part\n"] {
            // A line from the client, then the next part of the reply.
            let mut line = Vec::new();
            while !line.ends_with(b"\n") {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                line.extend_from_slice(&buf[..n]);
            }
            conn.write_all(part)?;
        }
        Ok(())
    });
    for mode in ["copy", "splice", "auto"] {
        let (listen, _lb) = in_mode(mode, backend.addr());
        let mut waits = Vec::new();
        for round in 0..21 {
            let mut client = TcpStream::connect(listen).unwrap();
            let asked = Instant::now();
            client.write_all(b"go\n").unwrap();
            let first = read_line_within(&mut client, T)
                .unwrap_or_else(|e| panic!("{mode}, round {round}: {e}"));
            waits.push(asked.elapsed());
            assert_eq!(first, "first part", "{mode}");
            client.write_all(b"got it\n").unwrap();
            let mut rest = Vec::new();
            client.set_read_timeout(Some(T)).unwrap();
            client.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, b"second part\n", "{mode}, round {round}");
        }
        waits.sort();
        assert!(
            waits[waits.len() / 2] < Duration::from_millis(100),
            "{mode}: the first part was held back: waits {waits:?}"
        );
    }
}

/// A backend that resets the connection right after its reply: the reply
/// still reaches the client whole before the connection ends (the reset
/// may be what the read after the reply finds).
#[test]
fn reply_then_reset_still_delivers_the_reply() {
    let backend = one_reply_backend(|conn| {
        socket2::SockRef::from(conn.stream()).set_linger(Some(Duration::ZERO))
    });
    for mode in ["copy", "auto"] {
        let (listen, _lb) = in_mode(mode, backend.addr());
        for len in [10usize, 5000] {
            for round in 0..5 {
                let (got, _) = fetch(listen, len);
                assert!(
                    got == sluice_e2e::pseudo_random_bytes(len as u64, len),
                    "{mode}: {len} bytes, round {round}: got {} bytes, or other ones",
                    got.len()
                );
            }
        }
    }
}
