//! Heavy end-to-end TCP tests: gigabyte integrity in every transfer mode,
//! thousands of concurrent connections, and io-wq thread counts. They run
//! one at a time (a lock) so they do not compete for the two CPUs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_e2e::bulk::HashCounter;
use sluice_e2e::net::{free_tcp_addr, read_exact_within};
use sluice_e2e::tcp::{TcpEcho, TcpEchoMany};
use sluice_e2e::tools::raise_nofile_limit;
use sluice_e2e::{eventually, PseudoRandom, Sluice};

static HEAVY: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// No health checks: their short-lived sockets would make the fd counts
/// below race with them.
fn config(listen: SocketAddr, transfer: &str, backend: SocketAddr) -> String {
    format!(
        "workers: 2\nservices:\n  - name: bulk\n    protocol: tcp\n    listen: [\"{listen}\"]\n    \
         transfer: {transfer}\n    health_check: {{ kind: none }}\n    backends:\n      - address: \"{backend}\"\n"
    )
}

const GIB: u64 = 1 << 30;

/// Send `len` pseudo-random bytes through sluice to an echo backend while
/// reading the echo at the same time (both directions carry `len` bytes at
/// once); return what came back as (length, sha256).
fn echo_bulk(listen: SocketAddr, seed: u64, len: u64) -> (u64, String) {
    let mut stream = TcpStream::connect(listen).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut source = PseudoRandom::new(seed, len);
        let mut buf = vec![0; 256 * 1024];
        loop {
            let n = source.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n]).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut hash = HashCounter::new();
    let mut buf = vec![0; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hash.update(&buf[..n]),
            Err(e) => panic!("reading the echo after {} bytes: {e}", hash.len()),
        }
    }
    sender.join().unwrap();
    hash.finish()
}

#[test]
fn one_gib_each_way_in_every_transfer_mode() {
    let _heavy = one_at_a_time();
    let echo = TcpEcho::start();
    let seed = 42;
    let expected = (GIB, PseudoRandom::expected_sha256_hex(seed, GIB));
    for mode in ["splice", "copy", "auto"] {
        let listen = free_tcp_addr();
        let mut lb = Sluice::started(&config(listen, mode, echo.addr()));
        let start = Instant::now();
        let got = echo_bulk(listen, seed, GIB);
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{mode}: 1 GiB each way in {secs:.2}s ({:.2} Gbit/s per direction, debug build)",
            8.0 * GIB as f64 / secs / 1e9
        );
        assert_eq!(
            got, expected,
            "{mode}: what came back differs from what was sent"
        );
        lb.terminate();
        assert!(lb.wait_exit(Duration::from_secs(10)).success());
    }
}

#[test]
fn five_thousand_concurrent_connections_and_fds_return_to_baseline() {
    let _heavy = one_at_a_time();
    const N: usize = 5000;
    // The test holds N client sockets and the backend N more.
    raise_nofile_limit(20_000);
    let echo = TcpEchoMany::start();
    let listen = free_tcp_addr();
    let lb = Sluice::started(&config(listen, "auto", echo.addr()));
    let baseline = lb.fd_count();
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        clients.push(TcpStream::connect(listen).unwrap());
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(format!("message {i:05}\n").as_bytes()).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let got = read_exact_within(c, 14, Duration::from_secs(30)).unwrap();
        assert_eq!(
            got,
            format!("message {i:05}\n").as_bytes(),
            "connection {i}"
        );
    }
    assert!(echo.accepted() >= N, "every connection reached the backend");
    let busy = lb.fd_count();
    eprintln!("sluice fds: {baseline} idle, {busy} with {N} connections");
    assert!(
        busy >= baseline + 2 * N,
        "each proxied connection holds two fds"
    );
    drop(clients);
    eventually(
        Duration::from_secs(20),
        "sluice's fd count back to its idle baseline",
        || lb.fd_count() <= baseline,
    );
}

#[test]
fn idle_splice_connections_do_not_park_kernel_threads() {
    let _heavy = one_at_a_time();
    const N: usize = 1000;
    raise_nofile_limit(20_000);
    let echo = TcpEchoMany::start();
    let listen = free_tcp_addr();
    let lb = Sluice::started(&config(listen, "splice", echo.addr()));
    let mut clients: Vec<TcpStream> = (0..N)
        .map(|_| TcpStream::connect(listen).unwrap())
        .collect();
    // Move bytes through every connection (so each has used splice), then
    // leave them all idle.
    for c in &mut clients {
        c.write_all(b"ping").unwrap();
    }
    for c in &mut clients {
        assert_eq!(
            read_exact_within(c, 4, Duration::from_secs(30)).unwrap(),
            b"ping"
        );
    }
    let count_iou = || {
        lb.threads()
            .iter()
            .filter(|t| t.starts_with("iou-wrk"))
            .count()
    };
    let mut max_seen = 0;
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        max_seen = max_seen.max(count_iou());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{N} idle splice connections: at most {max_seen} iou-wrk threads");
    assert!(
        max_seen < 16,
        "{max_seen} io-wq threads for {N} idle connections"
    );
    drop(clients);
}
