//! End-to-end tests of the UDP `session` mode (SPEC.md "UDP"): a client
//! flow keeps its backend for its life, flows spread per the algorithm,
//! idle flows expire after `session_timeout`, `max_sessions` holds, replies
//! leave from the address the client sent to, and a reload that removes a
//! backend moves its flows. They run the real binary: `cargo build -p
//! sluice` first.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use sluice_e2e::dns_support::scrape_metric;
use sluice_e2e::net::{free_udp_port, udp_client, udp_client_on, udp_request, LOCALHOST};
use sluice_e2e::udp::{split_tag, UdpTagged};
use sluice_e2e::{assert_no_panic_or_debug_dump, eventually, Sluice, DEADLINE};

/// A session-mode service `s` on `listen` over `backends`; `extra` is
/// added to the service (indented by 4) and `udp` is its `udp:` mapping.
fn session_service(
    listen: SocketAddr,
    balance: &str,
    udp: &str,
    extra: &str,
    backends: &[SocketAddr],
) -> String {
    let mut yaml = format!(
        "workers: 2\nservices:\n  - name: s\n    protocol: udp\n    listen: [\"{listen}\"]\n    \
         balance: {balance}\n    udp: {udp}\n{extra}    backends:\n"
    );
    for b in backends {
        yaml.push_str(&format!("      - address: \"{b}\"\n"));
    }
    yaml
}

/// Sends `payload` from `client` through `to` and returns the name of the
/// backend that echoed it (checking the echo), retrying a few times while
/// sluice starts.
#[track_caller]
fn tag_of(client: &UdpSocket, to: SocketAddr, payload: &[u8]) -> String {
    for _ in 0..20 {
        if let Some(reply) = udp_request(client, to, payload, Duration::from_millis(500)) {
            let (tag, echo) = split_tag(&reply).expect("a tagged reply");
            assert_eq!(echo, payload, "the backend's echo, unchanged");
            return tag;
        }
    }
    panic!("no reply through {to}");
}

fn listen_addr() -> SocketAddr {
    SocketAddr::new(LOCALHOST, free_udp_port(LOCALHOST))
}

/// Flows of `n` fresh client sockets (one datagram each): backend name ->
/// flows. The sockets stay open until all are done, so each has its own
/// port (a closed one's port could be reused: the same flow again).
fn spread(listen: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let client = udp_client();
        let tag = tag_of(&client, listen, format!("flow {i}").as_bytes());
        *by.entry(tag).or_insert(0) += 1;
        clients.push(client);
    }
    by
}

#[test]
fn a_flow_keeps_its_backend_and_flows_spread_round_robin() {
    let backends: Vec<UdpTagged> = ["a", "b", "c"]
        .iter()
        .map(|n| UdpTagged::start(n))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let listen = listen_addr();
    let mut lb = Sluice::started(&session_service(
        listen,
        "round_robin",
        "{ mode: session }",
        "",
        &addrs,
    ));

    // One flow, many datagrams: always the same backend, one upstream socket.
    let client = udp_client();
    let first = tag_of(&client, listen, b"hello");
    for i in 0..50 {
        assert_eq!(
            tag_of(&client, listen, format!("datagram {i}").as_bytes()),
            first,
            "a flow keeps its backend"
        );
    }
    let owner = &backends[["a", "b", "c"].iter().position(|n| *n == first).unwrap()];
    assert_eq!(owner.peers().len(), 1, "one upstream socket per flow");
    assert_eq!(owner.received(), 51);

    // 1,000 flows over 3 backends: each worker runs its own round robin, so
    // each backend gets a third, give or take a flow per worker.
    let by = spread(listen, 1000);
    eprintln!("round_robin spread of 1000 flows (+1 earlier): {by:?}");
    for name in ["a", "b", "c"] {
        let share = by.get(name).copied().unwrap_or(0) as f64 / 1000.0;
        assert!(
            (0.30..=0.37).contains(&share),
            "{name} got {share:.3} of the flows: {by:?}"
        );
    }
    let peers: usize = backends.iter().map(|b| b.peers().len()).sum();
    assert_eq!(peers, 1001, "every flow has its own upstream socket");
    lb.stop();
    assert_no_panic_or_debug_dump(&lb.log(), "sluice log");
}

#[test]
fn maglev_spreads_flows_evenly() {
    let backends: Vec<UdpTagged> = ["a", "b", "c"]
        .iter()
        .map(|n| UdpTagged::start(n))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let listen = listen_addr();
    let mut lb = Sluice::started(&session_service(
        listen,
        "maglev",
        "{ mode: session }",
        "",
        &addrs,
    ));
    let by = spread(listen, 1000);
    eprintln!("maglev spread of 1000 flows: {by:?}");
    for name in ["a", "b", "c"] {
        let share = by.get(name).copied().unwrap_or(0) as f64 / 1000.0;
        // Random source ports: the binomial spread is about 1.5 % (1 sd).
        assert!(
            (share - 1.0 / 3.0).abs() < 0.07,
            "{name} got {share:.3} of the flows: {by:?}"
        );
    }
    lb.stop();
}

/// The access-log line of the flow of `client` that ended with `end`.
fn flow_end_line(lb: &Sluice, client: SocketAddr, end: &str) -> Option<String> {
    let needle = format!("client={client} ");
    lb.log()
        .lines()
        .find(|l| {
            l.contains("access service=s")
                && l.contains(&needle)
                && l.contains(&format!("end={end}"))
        })
        .map(str::to_string)
}

#[test]
fn idle_flows_expire_after_session_timeout_and_come_back_as_new_flows() {
    let backend = UdpTagged::start("a");
    let listen = listen_addr();
    let udp = "{ mode: session, session_timeout: 1s }";
    let admin = sluice_e2e::net::free_tcp_addr();
    let service = session_service(
        listen,
        "round_robin",
        udp,
        "    access_log: true\n",
        &[backend.addr()],
    );
    let mut lb = Sluice::started(&format!("admin:\n  listen: \"{admin}\"\n{service}"));
    let sessions = || scrape_metric(admin, "sluice_udp_sessions", &[("service", "s")]);
    let idle = udp_client();
    let busy = udp_client();
    let idle_addr = idle.local_addr().unwrap();
    let busy_addr = busy.local_addr().unwrap();
    // Let the workers settle (their sockets exist) before the fd baseline.
    tag_of(&busy, listen, b"busy");
    let fds_before = lb.fd_count();

    tag_of(&idle, listen, b"once");
    let last = Instant::now();
    assert_eq!(sessions(), Some(2.0), "two flows open");
    // `busy` keeps talking every 200 ms; `idle` says nothing.
    let line = loop {
        assert!(
            last.elapsed() < Duration::from_secs(5),
            "the idle flow never expired:\n{}",
            lb.log()
        );
        tag_of(&busy, listen, b"busy");
        if let Some(line) = flow_end_line(&lb, idle_addr, "idle_timeout") {
            break line;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let expired_after = last.elapsed();
    eprintln!("idle flow expired after {expired_after:?}: {line}");
    assert!(
        expired_after >= Duration::from_secs(1),
        "expired early: {expired_after:?}"
    );
    assert!(
        expired_after < Duration::from_millis(2500),
        "expired late: {expired_after:?}"
    );
    assert!(
        line.contains("bytes_to_backend=4 bytes_to_client=6"),
        "{line}"
    );
    assert!(
        line.contains(&format!("backend={}", backend.addr())),
        "{line}"
    );
    assert!(
        flow_end_line(&lb, busy_addr, "idle_timeout").is_none(),
        "the busy flow expired"
    );

    // Re-sending after expiry creates a new flow (a new upstream socket).
    let peers = backend.peers().len();
    tag_of(&idle, listen, b"again");
    assert_eq!(backend.peers().len(), peers + 1, "a new flow after expiry");

    // Everything idles out; every upstream socket is closed again.
    eventually(Duration::from_secs(5), "both flows to expire", || {
        flow_end_line(&lb, busy_addr, "idle_timeout").is_some()
            && lb.log_count(&format!("client={idle_addr} ")) >= 2
    });
    eventually(DEADLINE, "the fd count back to its baseline", || {
        lb.fd_count() <= fds_before
    });
    assert_eq!(sessions(), Some(0.0), "no flow open");
    lb.stop();
    assert_no_panic_or_debug_dump(&lb.log(), "sluice log");
}

#[test]
fn wildcard_listener_replies_from_the_address_the_client_sent_to() {
    let backend = UdpTagged::start("a");
    let port = free_udp_port(LOCALHOST);
    let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    let mut lb = Sluice::started(&session_service(
        listen,
        "maglev",
        "{ mode: session }",
        "",
        &[backend.addr()],
    ));
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.77"] {
        let to: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        // udp_request only accepts a reply whose source is `to`.
        let client = udp_client_on(LOCALHOST);
        assert_eq!(
            tag_of(&client, to, b"where from?"),
            "a",
            "no reply from {to}"
        );
        for _ in 0..3 {
            assert_eq!(tag_of(&client, to, b"again"), "a");
        }
    }
    lb.stop();
}

#[test]
fn max_sessions_drops_new_flows_and_keeps_existing_ones() {
    let backend = UdpTagged::start("a");
    let listen = listen_addr();
    let udp = "{ mode: session, session_timeout: 1s, max_sessions: 3 }";
    let mut lb = Sluice::started(&session_service(
        listen,
        "round_robin",
        udp,
        "",
        &[backend.addr()],
    ));
    let clients: Vec<UdpSocket> = (0..3).map(|_| udp_client()).collect();
    for c in &clients {
        tag_of(c, listen, b"in");
    }
    let extra = udp_client();
    assert!(
        udp_request(&extra, listen, b"over", Duration::from_millis(300)).is_none(),
        "a 4th flow was admitted"
    );
    for c in &clients {
        assert_eq!(
            tag_of(c, listen, b"still"),
            "a",
            "existing flows keep working"
        );
    }
    // Once they idle out, there is room again.
    let start = Instant::now();
    let admitted = loop {
        if udp_request(&extra, listen, b"later", Duration::from_millis(200)).is_some() {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the 4th flow was never admitted"
        );
    };
    assert!(
        admitted >= Duration::from_millis(700),
        "admitted after {admitted:?}, before the others expired"
    );
    lb.stop();
}

#[test]
fn reload_removing_a_backend_moves_its_flows_and_keeps_the_others() {
    let a = UdpTagged::start("a");
    let b = UdpTagged::start("b");
    let listen = listen_addr();
    let udp = "{ mode: session, session_timeout: 1m }";
    let log = "    access_log: true\n";
    let mut lb = Sluice::started(&session_service(
        listen,
        "round_robin",
        udp,
        log,
        &[a.addr(), b.addr()],
    ));
    let clients: Vec<UdpSocket> = (0..20).map(|_| udp_client()).collect();
    let tags: Vec<String> = clients
        .iter()
        .map(|c| tag_of(c, listen, b"first"))
        .collect();
    let on_b = tags.iter().filter(|t| *t == "b").count();
    assert!(on_b > 0 && on_b < 20, "round robin used both: {tags:?}");
    let a_peers = a.peers().len();

    lb.rewrite_config(&session_service(
        listen,
        "round_robin",
        udp,
        log,
        &[a.addr()],
    ));
    lb.reload();
    lb.wait_for_log("configuration reloaded", DEADLINE);
    for (c, tag) in clients.iter().zip(&tags) {
        assert_eq!(
            tag_of(c, listen, b"after"),
            "a",
            "every flow now on a (was on {tag})"
        );
    }
    // Flows on a kept their upstream socket; those from b got a new one.
    assert_eq!(a.peers().len(), a_peers + on_b);
    for (c, tag) in clients.iter().zip(&tags) {
        let ended = flow_end_line(&lb, c.local_addr().unwrap(), "backend_removed");
        assert_eq!(
            ended.is_some(),
            tag == "b",
            "flow of {} (on {tag})",
            c.local_addr().unwrap()
        );
    }
    lb.stop();
    assert_no_panic_or_debug_dump(&lb.log(), "sluice log");
}

#[test]
fn a_flow_whose_backend_goes_down_is_balanced_again_at_once() {
    use sluice_e2e::dns::{dns_query, dns_tag};
    use sluice_e2e::dns_support::{dns_tools, Knot};
    let Some((knotd, _, _)) = dns_tools() else {
        return;
    };
    let mut knots: Vec<Knot> = ["k1", "k2", "k3"]
        .iter()
        .map(|n| Knot::start(&knotd, n))
        .collect();
    let addrs: Vec<SocketAddr> = knots.iter().map(Knot::addr).collect();
    let listen = listen_addr();
    let extra = "    access_log: true\n    health_check: { kind: dns, query: \"www.test. A\", interval: 200ms, timeout: 100ms, fall: 2, rise: 2 }\n";
    let mut lb = Sluice::started(&session_service(
        listen,
        "maglev",
        "{ mode: session, session_timeout: 1m }",
        extra,
        &addrs,
    ));
    // One client flow: every query of it reaches the same knotd.
    let client = udp_client();
    let ask = |timeout| {
        dns_query(
            &client,
            listen,
            "who.test.",
            hickory_proto::rr::RecordType::TXT,
            timeout,
        )
        .and_then(|r| dns_tag(&r))
    };
    let first = eventually_some_answer(|| ask(Duration::from_millis(500)));
    for _ in 0..20 {
        assert_eq!(
            ask(DEADLINE).as_deref(),
            Some(first.as_str()),
            "a flow keeps its backend"
        );
    }
    let idx = ["k1", "k2", "k3"].iter().position(|n| *n == first).unwrap();
    knots[idx].kill();
    lb.wait_for_log(
        &format!("backend {} of service s is DOWN", addrs[idx]),
        DEADLINE,
    );
    // The flow is forgotten at once (control logs DOWN just before it
    // publishes the new routes, so wait for the flow's end line rather
    // than race it), long before session_timeout...
    let client_addr = client.local_addr().unwrap();
    eventually(DEADLINE, "the flow to end", || {
        flow_end_line(&lb, client_addr, "backend_down").is_some()
            || flow_end_line(&lb, client_addr, "backend_refused").is_some()
    });
    // ... and its very next query is answered by another backend.
    let next = ask(Duration::from_secs(2)).expect("the next query of the flow is answered");
    assert_ne!(next, first);
    for _ in 0..10 {
        assert_eq!(
            ask(DEADLINE).as_deref(),
            Some(next.as_str()),
            "the new flow keeps its new backend"
        );
    }
    lb.stop();
    assert_no_panic_or_debug_dump(&lb.log(), "sluice log");
}

/// Calls `f` until it returns an answer (sluice may still be starting).
fn eventually_some_answer(f: impl FnMut() -> Option<String>) -> String {
    sluice_e2e::eventually_some(DEADLINE, "a first answer", f)
}
