//! End-to-end tests of health checking (SPEC.md "health_check"): active
//! checks take a dead backend out and bring it back, passive ejection takes
//! out a backend that fails real connections, and clients never notice
//! (connect retries). They run the real binary: `cargo build -p sluice`
//! first.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_e2e::control_support::{Attempt, ResettingBackend, Traffic};
use sluice_e2e::dns::{DnsBackend, DnsMode};
use sluice_e2e::net::free_tcp_addr;
use sluice_e2e::tcp::TcpTagged;
use sluice_e2e::{eventually, Sluice, DEADLINE};

fn tagged_service(listen: SocketAddr, check: &str, backends: &[SocketAddr]) -> String {
    let mut yaml = format!(
        "workers: 2\nservices:\n  - name: web\n    protocol: tcp\n    listen: [\"{listen}\"]\n    \
         balance: round_robin\n    connect_timeout: 1s\n    health_check: {check}\n    backends:\n"
    );
    for b in backends {
        yaml.push_str(&format!("      - address: \"{b}\"\n"));
    }
    yaml
}

/// Waits for a log line containing `needle` and returns how long it took
/// from `since`.
#[track_caller]
fn time_to_log(lb: &mut Sluice, needle: &str, since: Instant, deadline: Duration) -> Duration {
    lb.wait_for_log(needle, deadline);
    since.elapsed()
}

/// Every failed attempt, as text, for assertion messages.
fn failures(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .filter_map(|a| a.result.as_ref().err())
        .map(|e| format!("{e:?}"))
        .collect()
}

#[test]
fn failover_and_recovery_with_tcp_checks() {
    let a = TcpTagged::start("a");
    let b = TcpTagged::start("b");
    let c = TcpTagged::start("c");
    let b_addr = b.addr();
    let listen = free_tcp_addr();
    let check = "{ kind: tcp, interval: 200ms, timeout: 100ms, rise: 2, fall: 2 }";
    let mut lb = Sluice::started(&tagged_service(
        listen,
        check,
        &[a.addr(), b_addr, c.addr()],
    ));
    let start = Instant::now();
    let traffic = Traffic::start(listen, 4, Duration::from_millis(2));
    for tag in ["a", "b", "c"] {
        eventually(DEADLINE, &format!("traffic to reach {tag}"), || {
            traffic.reached_since(tag, start)
        });
    }

    // Kill b: it must be out of the rotation within 1 s.
    let killed = Instant::now();
    b.stop();
    let down = format!("backend {b_addr} of service web is DOWN");
    let detect = time_to_log(&mut lb, &down, killed, Duration::from_secs(5));
    eprintln!("b marked down {detect:?} after it was killed");
    assert!(
        detect < Duration::from_secs(1),
        "b marked down only after {detect:?}"
    );
    eventually(DEADLINE, "traffic to go on after the failover", || {
        traffic
            .attempts()
            .iter()
            .filter(|a| a.started > killed + detect && a.result.is_ok())
            .count()
            > 20
    });

    // Bring b back on the same port: up after `rise` passing checks, then
    // it gets new connections again.
    let restarted = Instant::now();
    let b2 = TcpTagged::start_on("b", b_addr);
    let up = format!("backend {b_addr} of service web is UP (2 consecutive passes)");
    let rise = time_to_log(&mut lb, &up, restarted, Duration::from_secs(5));
    let up_at = Instant::now();
    eprintln!("b marked up {rise:?} after it came back");
    assert!(
        rise < Duration::from_secs(1),
        "b marked up only after {rise:?}"
    );
    eventually(
        Duration::from_secs(1),
        "new connections to reach b again within 1 s of UP",
        || traffic.reached_since("b", up_at),
    );
    let back = restarted.elapsed();
    eprintln!("traffic reached b again {back:?} after it came back");

    let attempts = traffic.stop();
    // Only connections that were already on b when it died may fail.
    let bad: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| match &a.result {
            Ok(_) => false,
            Err(e) => !(e.tag.as_deref() == Some("b") && a.started < killed),
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} client attempts failed: {:?}\n{}",
        bad.len(),
        attempts.len(),
        failures(&attempts),
        lb.log()
    );
    eprintln!(
        "{} client attempts, {} cut on the killed backend",
        attempts.len(),
        attempts.iter().filter(|a| a.result.is_err()).count()
    );
    drop(b2);
    lb.stop();
}

#[test]
fn active_checks_alone_detect_a_dead_backend_and_its_return() {
    let a = TcpTagged::start("a");
    let b = TcpTagged::start("b");
    let b_addr = b.addr();
    let listen = free_tcp_addr();
    let check = "{ kind: tcp, interval: 200ms, timeout: 100ms, rise: 2, fall: 2 }";
    let mut lb = Sluice::started(&tagged_service(listen, check, &[a.addr(), b_addr]));
    // No traffic: only the active checks can see it.
    let killed = Instant::now();
    b.stop();
    let down = format!(
        "backend {b_addr} of service web is DOWN (2 consecutive failures: connection refused)"
    );
    let detect = time_to_log(&mut lb, &down, killed, Duration::from_secs(5));
    eprintln!("active checks marked b down {detect:?} after it was killed");
    assert!(detect < Duration::from_secs(1), "{detect:?}");
    for _ in 0..6 {
        assert_eq!(sluice_e2e::net::tcp_tag(listen, DEADLINE), "a");
    }
    let restarted = Instant::now();
    let _b2 = TcpTagged::start_on("b", b_addr);
    let up = format!("backend {b_addr} of service web is UP (2 consecutive passes)");
    let rise = time_to_log(&mut lb, &up, restarted, Duration::from_secs(5));
    eprintln!("active checks marked b up {rise:?} after it came back");
    assert!(rise < Duration::from_secs(1), "{rise:?}");
    eventually(DEADLINE, "round robin to reach b again", || {
        sluice_e2e::net::tcp_tag(listen, DEADLINE) == "b"
    });
    lb.stop();
}

#[test]
fn passive_ejection_of_a_backend_that_resets_connections() {
    let a = TcpTagged::start("a");
    let b = TcpTagged::start("b");
    let bad = ResettingBackend::start();
    let listen = free_tcp_addr();
    // Slow active checks (which pass: the bad backend accepts) so that only
    // passive ejection can take it out, and a long rise to watch it stay out.
    let check = "{ kind: tcp, interval: 1s, timeout: 500ms, rise: 4, fall: 3 }";
    let mut lb = Sluice::started(&tagged_service(
        listen,
        check,
        &[a.addr(), bad.addr(), b.addr()],
    ));
    let traffic = Traffic::start(listen, 3, Duration::from_millis(5));

    let down = format!(
        "backend {} of service web is DOWN (3 consecutive connect failures in traffic: reset or closed before any byte)",
        bad.addr()
    );
    let up = format!(
        "backend {} of service web is UP (4 consecutive passes)",
        bad.addr()
    );
    lb.wait_for_log(&down, Duration::from_secs(10));
    // Watch a window while it is surely out: from a moment after the
    // ejection (connects routed just before it, and the backend's accept
    // thread catching up with its backlog, are not what this looks at)
    // until well before the 4 passes that need at least 3 s.
    std::thread::sleep(Duration::from_millis(300));
    let accepted_before = bad.accepted();
    let served_before = traffic.attempts().len();
    std::thread::sleep(Duration::from_millis(1700));
    let accepted_while_down = bad.accepted() - accepted_before;
    let served_while_down = traffic.attempts().len() - served_before;
    assert_eq!(
        lb.log_count(&up),
        0,
        "came back before the end of the window"
    );
    eprintln!(
        "while ejected: {served_while_down} client exchanges, {accepted_while_down} connections reached the bad backend"
    );
    // While out, only the health checks (one a second) reach it; without
    // the ejection a third of the traffic would have.
    assert!(
        served_while_down > 30,
        "too little traffic to tell: {served_while_down}"
    );
    assert!(
        accepted_while_down <= 2,
        "{accepted_while_down} connections reached an ejected backend"
    );
    // Active checks (which pass) bring it back after 4 passes.
    lb.wait_for_log(&up, Duration::from_secs(10));
    // Back in, it fails traffic again and is ejected again.
    lb.wait_for_log_count(&down, 2, Duration::from_secs(10));

    let attempts = traffic.stop();
    assert!(
        attempts.iter().all(|a| a.result.is_ok()),
        "client attempts failed: {:?}\n{}",
        failures(&attempts),
        lb.log()
    );
    assert!(attempts.iter().all(|a| a.result.as_deref() != Ok("bad")));
    eprintln!("{} client attempts, all answered", attempts.len());
    lb.stop();
}

#[test]
fn dns_checks_follow_the_backend_rcode() {
    let r1 = DnsBackend::start("r1");
    let r2 = DnsBackend::start("r2");
    let listen = sluice_e2e::net::free_udp_addr();
    let yaml = format!(
        "services:\n  - name: dns\n    protocol: udp\n    listen: [\"{listen}\"]\n    udp: {{ mode: dns }}\n    \
         health_check: {{ kind: dns, query: \"health.example. A\", interval: 100ms, timeout: 100ms, rise: 2, fall: 2 }}\n    \
         backends:\n      - address: \"{}\"\n      - address: \"{}\"\n",
        r1.addr(),
        r2.addr()
    );
    let mut lb = Sluice::started(&yaml);
    r1.set_mode(DnsMode::ServFail);
    lb.wait_for_log(
        &format!(
            "backend {} of service dns is DOWN (2 consecutive failures: answered SERVFAIL)",
            r1.addr()
        ),
        DEADLINE,
    );
    r1.set_mode(DnsMode::Answer);
    lb.wait_for_log(
        &format!(
            "backend {} of service dns is UP (2 consecutive passes)",
            r1.addr()
        ),
        DEADLINE,
    );
    r2.set_mode(DnsMode::Silent);
    lb.wait_for_log(
        &format!(
            "backend {} of service dns is DOWN (2 consecutive failures: no answer within 100ms)",
            r2.addr()
        ),
        DEADLINE,
    );
    assert!(!lb.log().contains(
        &format!("backend {} of service dns is DOWN", r1.addr()).replace("DOWN", "DOWN (1")
    ));
    assert!(r1.received() >= 4, "real queries reached r1");
    lb.stop();
}

#[test]
fn kind_none_says_passive_ejection_is_off() {
    let a = TcpTagged::start("a");
    let dead = free_tcp_addr();
    let listen = free_tcp_addr();
    let mut lb = Sluice::started(&tagged_service(
        listen,
        "{ kind: none, fall: 1 }",
        &[a.addr(), dead],
    ));
    lb.wait_for_log(
        "service web: health_check kind none: no active checks, so passive ejection is off",
        DEADLINE,
    );
    // Connects to the dead backend fail and are retried; it is never ejected.
    for _ in 0..20 {
        assert_eq!(
            sluice_e2e::control_support::tagged_exchange(listen, b"x", Duration::from_secs(5))
                .as_deref(),
            Ok("a")
        );
    }
    assert!(!lb.log().contains("is DOWN"), "{}", lb.log());
    lb.stop();
}
