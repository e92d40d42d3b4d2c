//! End-to-end: limits and resources of the TCP path — service and backend
//! `max_connections`, the real listen backlog, the raised descriptor limit,
//! and splice falling back to copy when the pipe pool runs dry.

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use sluice_e2e::net::{self, free_tcp_addr, read_line_within};
use sluice_e2e::tcp::{TcpServer, TcpTagged};
use sluice_e2e::{PseudoRandom, Sluice};

const T: Duration = Duration::from_secs(10);

fn yaml(
    listen: SocketAddr,
    workers: usize,
    extra: &str,
    backends: &[(SocketAddr, &str)],
) -> String {
    let mut y = format!(
        "workers: {workers}\nservices:\n  - name: web\n    protocol: tcp\n    listen: [\"{listen}\"]\n"
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        y.push_str(&format!("    {}\n", line.trim()));
    }
    y.push_str("    backends:\n");
    for (addr, more) in backends {
        y.push_str(&format!("      - address: \"{addr}\"\n"));
        if !more.is_empty() {
            y.push_str(&format!("        {more}\n"));
        }
    }
    y
}

#[test]
fn service_max_connections_pauses_accept_and_resets_nothing() {
    let backend = TcpTagged::start("b");
    let listen = free_tcp_addr();
    let _lb = Sluice::started(&yaml(
        listen,
        2,
        "max_connections: 3",
        &[(backend.addr(), "")],
    ));
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = net::connect_with_retry(listen, T);
            assert_eq!(read_line_within(&mut c, T).unwrap(), "b");
            c
        })
        .collect();
    // The fourth connection completes in the kernel (backlog) but is not
    // accepted while three are open: no greeting arrives.
    let mut waiting = TcpStream::connect(listen).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    let mut buf = [0u8; 8];
    match waiting.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the 4th connection must wait in the backlog, got {other:?}"),
    }
    // One closes: the waiting connection is served, not reset.
    drop(held.remove(0));
    assert_eq!(read_line_within(&mut waiting, T).unwrap(), "b");
    net::echo_roundtrip(&mut waiting, b"served after the pause", T);
}

#[test]
fn backend_max_connections_is_never_exceeded() {
    let small = TcpTagged::start("small");
    let big = TcpTagged::start("big");
    let listen = free_tcp_addr();
    let _lb = Sluice::started(&yaml(
        listen,
        2,
        "balance: round_robin",
        &[(small.addr(), "max_connections: 2"), (big.addr(), "")],
    ));
    let mut held = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..12 {
        let mut c = net::connect_with_retry(listen, T);
        *counts
            .entry(read_line_within(&mut c, T).unwrap())
            .or_default() += 1;
        held.push(c);
    }
    assert_eq!(counts.get("small").copied().unwrap_or(0), 2, "{counts:?}");
    assert_eq!(counts.get("big").copied().unwrap_or(0), 10, "{counts:?}");
    // Once one of its connections closes, `small` takes new ones again.
    held.clear();
    let mut c = net::connect_with_retry(listen, T);
    assert!(read_line_within(&mut c, T).is_ok());
}

#[test]
fn listeners_have_a_real_backlog_and_the_fd_limit_is_raised() {
    let backend = TcpTagged::start("b");
    let listen = free_tcp_addr();
    let lb = Sluice::started(&yaml(listen, 2, "", &[(backend.addr(), "")]));
    // `ss -ltn`: for a listening socket, Send-Q is the backlog.
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", listen.port())])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let backlogs: Vec<u32> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    assert_eq!(
        backlogs.len(),
        2,
        "one SO_REUSEPORT listener per worker:\n{text}"
    );
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for b in backlogs {
        assert_eq!(
            b,
            4096.min(somaxconn),
            "listen backlog (tokio-uring's bind would give 1024)"
        );
    }
    // RLIMIT_NOFILE: the soft limit is raised to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", lb.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f[3], f[4], "soft == hard: {line}");
}

#[test]
fn splice_falls_back_to_copy_when_the_pipe_pool_is_dry() {
    // A slow sink: each pump keeps its pipe while the sink is not ready, so
    // 100 concurrent transfers on one worker need more than its 64 pipes.
    let slow = TcpServer::start("127.0.0.1:0".parse().unwrap(), |conn| {
        let mut hash = sluice_e2e::bulk::HashCounter::new();
        let mut buf = vec![0; 8 * 1024];
        loop {
            match conn.read(&mut buf)? {
                0 => break,
                n => hash.update(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let (len, hex) = hash.finish();
        conn.write_all(format!("{len} {hex}\n").as_bytes())?;
        conn.shutdown_write()
    });
    let listen = free_tcp_addr();
    let mut lb = Sluice::started(&yaml(listen, 1, "transfer: splice", &[(slow.addr(), "")]));
    const LEN: u64 = 8 << 20;
    let clients: Vec<_> = (0..100u64)
        .map(|seed| {
            std::thread::spawn(move || {
                let got = net::send_bulk_and_hash(listen, seed, LEN, Duration::from_secs(60));
                assert_eq!(
                    got,
                    (LEN, PseudoRandom::expected_sha256_hex(seed, LEN)),
                    "transfer {seed}"
                );
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a transfer failed");
    }
    lb.wait_for_log("splice pipe pool exhausted", T);
}
