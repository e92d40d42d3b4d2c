//! End-to-end tests of the SIGTERM drain (SPEC.md "Signals"): listeners
//! close at once, transfers in flight finish intact, and `shutdown_timeout`
//! bounds the whole thing. They run the real binary: `cargo build -p
//! sluice` first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_e2e::control_support::{bulk_to_sink, endless_send, refused};
use sluice_e2e::net::free_tcp_addr;
use sluice_e2e::tcp::TcpHashSink;
use sluice_e2e::{eventually, Sluice, DEADLINE};

const TRANSFERS: usize = 50;
const LEN: u64 = 20 << 20;
/// Per transfer, so that each takes about 2.5 s and all are in flight when
/// SIGTERM comes.
const RATE: u64 = 8 << 20;

#[test]
fn sigterm_refuses_new_connects_and_lets_50_transfers_finish() {
    let (sink, _) = TcpHashSink::start();
    let listen = free_tcp_addr();
    let mut lb = Sluice::started(&format!(
        "workers: 2\nshutdown_timeout: 30s\nservices:\n  - name: bulk\n    protocol: tcp\n    listen: [\"{listen}\"]\n    \
         health_check: {{ kind: tcp, interval: 200ms }}\n    backends:\n      - address: \"{}\"\n",
        sink.addr()
    ));
    let progress: Arc<Vec<AtomicU64>> =
        Arc::new((0..TRANSFERS).map(|_| AtomicU64::new(0)).collect());
    let transfers: Vec<_> = (0..TRANSFERS)
        .map(|i| {
            let progress = progress.clone();
            std::thread::spawn(move || {
                bulk_to_sink(
                    listen,
                    i as u64,
                    LEN,
                    RATE,
                    &progress[i],
                    Duration::from_secs(30),
                )
            })
        })
        .collect();
    eventually(DEADLINE, "every transfer to be under way", || {
        progress
            .iter()
            .all(|p| p.load(Ordering::Relaxed) >= 2 << 20)
    });
    let in_flight = progress
        .iter()
        .filter(|p| p.load(Ordering::Relaxed) < LEN)
        .count();
    assert_eq!(in_flight, TRANSFERS, "all transfers in flight at SIGTERM");

    let term = Instant::now();
    lb.terminate();
    eventually(Duration::from_secs(2), "new connects to be refused", || {
        refused(listen)
    });
    let refused_after = term.elapsed();
    let moved_at_refusal: u64 = progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();

    let mut intact = 0;
    for (i, t) in transfers.into_iter().enumerate() {
        match t.join().unwrap() {
            Ok(r) => {
                assert_eq!(r.sent, r.reported, "transfer {i} arrived altered");
                assert_eq!(r.sent.0, LEN);
                intact += 1;
            }
            Err(e) => panic!("transfer {i} failed: {e}\n{}", lb.log()),
        }
    }
    let done_after = term.elapsed();
    let status = lb.wait_exit(DEADLINE);
    let exit_after = term.elapsed();
    assert_eq!(status.code(), Some(0), "{}", lb.log());
    assert!(lb.log().contains("shutdown complete"));
    eprintln!(
        "SIGTERM: refused after {refused_after:?} ({} MiB of {} MiB moved by then); {intact} transfers intact after \
         {done_after:?}; exit 0 after {exit_after:?}",
        moved_at_refusal >> 20,
        (LEN * TRANSFERS as u64) >> 20
    );
    // "At once": the control thread stops the listeners itself; on a 2-core
    // machine saturated by this test, it still has to be scheduled.
    assert!(refused_after < Duration::from_secs(1), "{refused_after:?}");
}

#[test]
fn shutdown_timeout_bounds_the_drain() {
    let (sink, _) = TcpHashSink::start();
    let listen = free_tcp_addr();
    let mut lb = Sluice::started(&format!(
        "shutdown_timeout: 1s\nservices:\n  - name: bulk\n    protocol: tcp\n    listen: [\"{listen}\"]\n    \
         access_log: true\n    backends:\n      - address: \"{}\"\n",
        sink.addr()
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || endless_send(listen, &stop, &sent))
    };
    // Through sluice to the sink (not just in socket buffers, or still in
    // the listen backlog).
    eventually(DEADLINE, "the transfer to be moving", || {
        sink.active() == 1 && sent.load(Ordering::Relaxed) > 16 << 20
    });
    let term = Instant::now();
    lb.terminate();
    let status = lb.wait_exit(Duration::from_secs(5));
    let took = term.elapsed();
    stop.store(true, Ordering::SeqCst);
    let ended = sender.join().unwrap();
    eprintln!("exit {status:?} {took:?} after SIGTERM with a never-ending transfer; the client saw {ended:?}");
    assert_eq!(status.code(), Some(0), "{}", lb.log());
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "the transfer got its shutdown_timeout: {took:?}"
    );
    assert!(ended.is_err(), "the connection was closed at the deadline");
    let log = lb.log();
    assert!(
        log.lines()
            .any(|l| l.contains("access service=bulk") && l.contains("end=shutdown")),
        "the access log says why: {log}"
    );
}
