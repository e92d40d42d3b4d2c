//! End-to-end tests of SIGHUP reloads (SPEC.md "Signals"): under load with
//! no client noticing, adding and removing services without touching the
//! others, invalid files and failed binds changing nothing, and every
//! worker getting the update. They run the real binary: `cargo build -p
//! sluice` first.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_e2e::control_support::{access_lines, refused};
use sluice_e2e::net::{
    connect_with_retry, echo_roundtrip, free_tcp_addr, read_exact_within, read_line_within,
    set_io_timeouts, tcp_tag,
};
use sluice_e2e::tcp::{TcpEchoMany, TcpTagged};
use sluice_e2e::{eventually, Sluice, DEADLINE};

const RELOADED: &str = "configuration reloaded";
const FAILED: &str = "reload failed: the running configuration is unchanged";

fn service(name: &str, listen: SocketAddr, extra: &str, backends: &[SocketAddr]) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    protocol: tcp\n    listen: [\"{listen}\"]\n{extra}    backends:\n"
    );
    for b in backends {
        yaml.push_str(&format!("      - address: \"{b}\"\n"));
    }
    yaml
}

/// One request/response on `s`: a unique line, echoed back, compared.
fn exchange(s: &mut TcpStream, payload: &[u8]) -> Result<(), String> {
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    let got = read_exact_within(s, payload.len(), Duration::from_secs(10))
        .map_err(|e| format!("read: {e}"))?;
    if got != payload {
        return Err(format!(
            "wrong reply: {:?} for {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(payload)
        ));
    }
    Ok(())
}

#[test]
fn twenty_reloads_under_load_cut_nothing() {
    let e1 = TcpEchoMany::start();
    let e2 = TcpEchoMany::start();
    let e3 = TcpEchoMany::start();
    let listen = free_tcp_addr();
    let config = |with_e3: bool| {
        let (extra, backends): (&str, Vec<SocketAddr>) = if with_e3 {
            (
                "    balance: round_robin\n    health_check: { kind: tcp, interval: 1s }\n",
                vec![e1.addr(), e2.addr(), e3.addr()],
            )
        } else {
            (
                "    balance: maglev\n    health_check: { kind: tcp, interval: 2s }\n",
                vec![e1.addr(), e2.addr()],
            )
        };
        format!(
            "workers: 2\nservices:\n{}",
            service("echo", listen, extra, &backends)
        )
    };
    let mut lb = Sluice::started(&config(true));

    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    // 200 concurrent clients: 20 keep one connection for the whole test,
    // 180 open a connection, do 5 exchanges and close, again and again.
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let (stop, exchanges, connections, errors) = (
                stop.clone(),
                exchanges.clone(),
                connections.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                let long_lived = i < 20;
                let mut n = 0u64;
                'conn: while !stop.load(Ordering::SeqCst) {
                    let mut s = match TcpStream::connect_timeout(&listen, Duration::from_secs(5)) {
                        Ok(s) => s,
                        Err(e) => {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("client {i}: connect: {e}"));
                            return;
                        }
                    };
                    set_io_timeouts(&s, Duration::from_secs(10));
                    connections.fetch_add(1, Ordering::Relaxed);
                    let mut k = 0;
                    while long_lived || k < 5 {
                        if stop.load(Ordering::SeqCst) {
                            break 'conn;
                        }
                        let payload =
                            format!("client {i} request {n} {}\n", "x".repeat((n % 64) as usize));
                        if let Err(e) = exchange(&mut s, payload.as_bytes()) {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("client {i} request {n}: {e}"));
                            return;
                        }
                        exchanges.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                        k += 1;
                        std::thread::sleep(Duration::from_millis(if long_lived { 20 } else { 5 }));
                    }
                }
            })
        })
        .collect();
    eventually(DEADLINE, "traffic to flow", || {
        exchanges.load(Ordering::Relaxed) > 1000
    });

    let started = Instant::now();
    for k in 1..=20 {
        lb.rewrite_config(&config(k % 2 == 0));
        lb.reload();
        lb.wait_for_log_count(RELOADED, k, DEADLINE);
        let before = exchanges.load(Ordering::Relaxed);
        eventually(DEADLINE, "traffic between reloads", || {
            exchanges.load(Ordering::Relaxed) >= before + 300
        });
        assert!(
            errors.lock().unwrap().is_empty(),
            "after reload {k}: {:?}",
            errors.lock().unwrap()
        );
    }
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} client errors: {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(10)],
        lb.log()
    );
    eprintln!(
        "20 reloads in {took:?}: {} connections, {} exchanges, 0 errors; backends accepted {} / {} / {}",
        connections.load(Ordering::Relaxed),
        exchanges.load(Ordering::Relaxed),
        e1.accepted(),
        e2.accepted(),
        e3.accepted()
    );
    assert!(
        e3.accepted() > 0,
        "the backend that comes and goes got traffic"
    );
    assert!(lb
        .log()
        .contains("reload: service echo: balance maglev -> round_robin"));
    assert!(lb.log().contains(&format!(
        "reload: service echo: backend removed {}",
        e3.addr()
    )));
    lb.stop();
}

/// A connection through sluice to a tagged backend: the tag and the stream.
fn open_tagged(addr: SocketAddr) -> (String, TcpStream) {
    let mut s = connect_with_retry(addr, DEADLINE);
    let tag = read_line_within(&mut s, DEADLINE).expect("tag");
    (tag, s)
}

#[test]
fn a_reload_adds_and_removes_services_without_touching_the_others() {
    let w = TcpTagged::start("w");
    let o = TcpTagged::start("o");
    let f = TcpTagged::start("f");
    let (web, old, fresh) = (free_tcp_addr(), free_tcp_addr(), free_tcp_addr());
    let before = format!(
        "services:\n{}{}",
        service("web", web, "", &[w.addr()]),
        service("old", old, "", &[o.addr()])
    );
    let after = format!(
        "services:\n{}{}",
        service("web", web, "", &[w.addr()]),
        service("fresh", fresh, "", &[f.addr()])
    );
    let mut lb = Sluice::started(&before);
    assert!(refused(fresh));
    let (tag, mut on_web) = open_tagged(web);
    assert_eq!(tag, "w");
    echo_roundtrip(&mut on_web, b"before", DEADLINE);
    let (tag, mut on_old) = open_tagged(old);
    assert_eq!(tag, "o");
    echo_roundtrip(&mut on_old, b"before", DEADLINE);

    lb.rewrite_config(&after);
    lb.reload();
    lb.wait_for_log(RELOADED, DEADLINE);
    assert!(lb.log().contains("reload: service old: removed"));
    assert!(lb.log().contains("reload: service fresh: added"));
    // The new port answers at once (the workers confirmed the change).
    assert_eq!(tcp_tag(fresh, Duration::from_secs(1)), "f");
    // The removed one stops accepting.
    eventually(DEADLINE, "the removed service's port to refuse", || {
        refused(old)
    });
    // The other service's connection was not touched, and the removed
    // service's open connection finishes normally.
    echo_roundtrip(&mut on_web, b"after the reload", DEADLINE);
    echo_roundtrip(&mut on_old, b"after its service was removed", DEADLINE);
    assert_eq!(tcp_tag(web, DEADLINE), "w");
    drop(on_old);
    drop(on_web);
    lb.stop();
}

#[test]
fn an_invalid_file_or_a_failed_bind_changes_nothing() {
    let a = TcpTagged::start("a");
    let b = TcpTagged::start("b");
    let listen = free_tcp_addr();
    let good = format!("services:\n{}", service("web", listen, "", &[a.addr()]));
    let mut lb = Sluice::started(&good);
    let path = lb.config_path().display().to_string();
    let (_, mut held) = open_tagged(listen);

    // A value error: the log names the file, line, column and key.
    lb.rewrite_config(&good.replace(
        &format!("      - address: \"{}\"\n", a.addr()),
        &format!("      - address: \"{}\"\n        weight: 0\n", a.addr()),
    ));
    lb.reload();
    lb.wait_for_log_count(FAILED, 1, DEADLINE);
    let line = lb.wait_for_log("reload failed: ", DEADLINE);
    assert!(
        line.contains(&format!("reload failed: {path}:7:17: services[0].backends[0].weight: must be between 1 and 10000, got 0")),
        "{line}"
    );
    assert_eq!(tcp_tag(listen, DEADLINE), "a");

    // Not YAML at all.
    lb.rewrite_config("services: [\n");
    lb.reload();
    lb.wait_for_log_count(FAILED, 2, DEADLINE);
    assert_eq!(tcp_tag(listen, DEADLINE), "a");

    // Valid, but one of two new listeners cannot be bound: nothing changes,
    // and the one that could be bound is closed again.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let (busy, free) = (taken.local_addr().unwrap(), free_tcp_addr());
    let with_new = format!(
        "{good}{}{}",
        service("extra", free, "", &[b.addr()]),
        service("clash", busy, "", &[b.addr()])
    )
    .replace(
        &format!("address: \"{}\"", a.addr()),
        &format!("address: \"{}\"", b.addr()),
    );
    lb.rewrite_config(&with_new);
    lb.reload();
    lb.wait_for_log_count(FAILED, 3, DEADLINE);
    assert!(
        lb.log().contains(&format!(
            "reload failed: cannot listen on {busy} (tcp) for service clash"
        )),
        "{}",
        lb.log()
    );
    assert!(
        refused(free),
        "the listener bound during the failed reload was closed"
    );
    assert_eq!(tcp_tag(listen, DEADLINE), "a", "backends unchanged too");
    assert_eq!(lb.log_count(RELOADED), 0);
    echo_roundtrip(&mut held, b"still here", DEADLINE);

    // And a good file applies.
    drop(taken);
    lb.rewrite_config(&good.replace(&a.addr().to_string(), &b.addr().to_string()));
    lb.reload();
    lb.wait_for_log(RELOADED, DEADLINE);
    assert_eq!(tcp_tag(listen, DEADLINE), "b");
    echo_roundtrip(&mut held, b"kept its backend", DEADLINE);
    drop(held); // else the drain waits for it (shutdown_timeout 30s)
    lb.stop();
}

#[test]
fn a_reload_reaches_every_worker() {
    let backends: Vec<TcpTagged> = ["a", "b", "c", "d"]
        .into_iter()
        .map(TcpTagged::start)
        .collect();
    let addr = |i: usize| backends[i].addr();
    let listen = free_tcp_addr();
    let extra = "    balance: round_robin\n    access_log: true\n";
    let before = format!(
        "workers: 2\nservices:\n{}",
        service("web", listen, extra, &[addr(0), addr(1)])
    );
    let after = format!(
        "workers: 3\nservices:\n{}",
        service("web", listen, extra, &[addr(2), addr(3)])
    );
    let mut lb = Sluice::started(&before);
    const N: usize = 40;
    let tags =
        |n: usize| -> BTreeSet<String> { (0..n).map(|_| tcp_tag(listen, DEADLINE)).collect() };
    let access = |lb: &Sluice| access_lines(&lb.log());

    assert_eq!(tags(N), BTreeSet::from(["a".to_string(), "b".to_string()]));
    eventually(DEADLINE, "access lines of the first connections", || {
        access(&lb).len() == N
    });
    let workers: BTreeSet<usize> = access(&lb).iter().map(|l| l.worker).collect();
    assert_eq!(
        workers,
        BTreeSet::from([0, 1]),
        "connections spread over both workers"
    );

    lb.rewrite_config(&after);
    lb.reload();
    lb.wait_for_log(RELOADED, DEADLINE);
    assert!(
        lb.log()
            .contains("changing workers needs a restart (workers: 2 -> 3); keeping 2 worker(s)"),
        "{}",
        lb.log()
    );
    // Right after the reload is logged, every worker uses the new backends.
    assert_eq!(tags(N), BTreeSet::from(["c".to_string(), "d".to_string()]));
    eventually(DEADLINE, "access lines of the later connections", || {
        access(&lb).len() == 2 * N
    });
    let later = &access(&lb)[N..];
    let workers: BTreeSet<usize> = later.iter().map(|l| l.worker).collect();
    assert_eq!(
        workers,
        BTreeSet::from([0, 1]),
        "both workers served after the reload"
    );
    let used: BTreeSet<String> = later.iter().map(|l| l.backend.clone()).collect();
    assert_eq!(
        used,
        BTreeSet::from([addr(2).to_string(), addr(3).to_string()])
    );
    for w in 0..2 {
        let per_worker: BTreeSet<&str> = later
            .iter()
            .filter(|l| l.worker == w)
            .map(|l| l.backend.as_str())
            .collect();
        assert!(
            per_worker
                .iter()
                .all(|b| *b == addr(2).to_string() || *b == addr(3).to_string()),
            "worker {w}: {per_worker:?}"
        );
    }
    lb.stop();
}
