//! End-to-end tests of the UDP `dns` mode (SPEC.md "UDP") with real DNS
//! software from Debian packages: knotd backends, kdig and dnsperf
//! clients. They run the real binary: `cargo build -p sluice` first. A test
//! skips (with a message) when the tools are missing, unless
//! `SLUICE_REQUIRE_TOOLS=1` (scripts/test.sh installs them).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_e2e::dns_support::{
    dns_tools, dnsperf, free_dns_port, kdig, scrape_metric, write_queries, DnsProbe, Knot,
    ProbeQuery, WWW_ANSWER,
};
use sluice_e2e::net::{free_tcp_addr, LOCALHOST};

/// `admin:` on `admin`, then `yaml`.
fn with_admin(admin: SocketAddr, yaml: &str) -> String {
    format!("admin:\n  listen: \"{admin}\"\n{yaml}")
}
use sluice_e2e::{assert_no_panic_or_debug_dump, eventually, Sluice, DEADLINE};

/// A dns-mode service `dns` on `listen` over `backends`; `extra` is added
/// to the service (indented by 4).
fn dns_service(listen: SocketAddr, backends: &[SocketAddr], extra: &str) -> String {
    let mut yaml = format!(
        "workers: 2\nservices:\n  - name: dns\n    protocol: udp\n    listen: [\"{listen}\"]\n    \
         balance: round_robin\n    udp: {{ mode: dns, query_timeout: 1s }}\n{extra}    backends:\n"
    );
    for b in backends {
        yaml.push_str(&format!("      - address: \"{b}\"\n"));
    }
    yaml
}

/// The `who.test. TXT` answer of one kdig run, without quotes.
fn who(kdig_bin: &Path, server: SocketAddr) -> Option<String> {
    let a = kdig(kdig_bin, server, "who.test", "TXT", 2);
    a.ok.then(|| a.answers[0].trim_matches('"').to_string())
}

/// How many probe queries each backend answered, and how many were lost.
fn tally(queries: &[ProbeQuery]) -> (BTreeMap<String, usize>, usize) {
    let mut by = BTreeMap::new();
    let mut lost = 0;
    for q in queries {
        match &q.answer {
            Some(name) => *by.entry(name.clone()).or_insert(0) += 1,
            None => lost += 1,
        }
    }
    (by, lost)
}

fn start_knots(knotd: &Path, names: &[&str]) -> Vec<Knot> {
    names.iter().map(|n| Knot::start(knotd, n)).collect()
}

#[test]
fn kdig_reaches_every_backend_and_dnsperf_loses_nothing() {
    let Some((knotd, kdig_bin, dnsperf_bin)) = dns_tools() else {
        return;
    };
    let knots = start_knots(&knotd, &["k1", "k2", "k3"]);
    let addrs: Vec<SocketAddr> = knots.iter().map(Knot::addr).collect();
    let listen = SocketAddr::new(LOCALHOST, free_dns_port(LOCALHOST));
    let admin = free_tcp_addr();
    let mut lb = Sluice::started(&with_admin(admin, &dns_service(listen, &addrs, "")));

    // Each backend's own answer comes back through sluice.
    let mut seen = BTreeMap::new();
    eventually(DEADLINE, "kdig answers from k1, k2 and k3", || {
        if let Some(name) = who(&kdig_bin, listen) {
            assert!(
                ["k1", "k2", "k3"].contains(&name.as_str()),
                "unexpected answer {name:?}"
            );
            *seen.entry(name).or_insert(0) += 1;
        }
        seen.len() == 3
    });
    let www = kdig(&kdig_bin, listen, "www.test", "A", 2);
    assert!(www.ok, "kdig www.test A failed:\n{}", www.output);
    assert_eq!(www.answers, vec![WWW_ANSWER.to_string()]);

    // 10,000 queries at a moderate rate: every one answered, no mismatch.
    let file = lb.dir().join("queries.txt");
    write_queries(&file, 10_000);
    let report = dnsperf(
        &dnsperf_bin,
        listen,
        &file,
        &["-Q", "2000", "-t", "2"],
        Duration::from_secs(60),
    );
    eprintln!(
        "dnsperf -Q 2000 through sluice: sent {} completed {} lost {} qps {:.0} latency avg {:.3} ms min {:.3} max {:.3} sd {:.3}",
        report.sent,
        report.completed,
        report.lost,
        report.qps,
        report.avg_latency_ms,
        report.min_latency_ms,
        report.max_latency_ms,
        report.stddev_latency_ms
    );
    assert_eq!(report.sent, 10_000, "{}", report.output);
    assert_eq!(report.completed, 10_000, "{}", report.output);
    assert_eq!(report.lost, 0, "{}", report.output);
    assert_eq!(report.noerror, 10_000, "{}", report.output);
    assert_eq!(
        report.mismatches, 0,
        "dnsperf saw unexpected IDs:\n{}",
        report.output
    );
    let dns = |result| {
        scrape_metric(
            admin,
            "sluice_dns_queries_total",
            &[("service", "dns"), ("result", result)],
        )
    };
    let answered = dns("answered").expect("sluice_dns_queries_total{result=answered}");
    assert!(answered >= 10_000.0, "answered {answered}");
    assert_eq!(dns("timeout"), Some(0.0));
    assert_eq!(dns("orphan_reply"), Some(0.0));

    // The same, unthrottled with 4 clients (figures only: a debug build on
    // a shared machine says little about speed, but nothing may be wrong).
    let report = dnsperf(
        &dnsperf_bin,
        listen,
        &file,
        &["-c", "4", "-q", "64", "-t", "2"],
        Duration::from_secs(60),
    );
    eprintln!(
        "dnsperf unthrottled through sluice: sent {} completed {} lost {} qps {:.0} latency avg {:.3} ms",
        report.sent, report.completed, report.lost, report.qps, report.avg_latency_ms
    );
    assert_eq!(report.sent, report.completed + report.lost);
    assert_eq!(
        report.mismatches, 0,
        "dnsperf saw unexpected IDs:\n{}",
        report.output
    );
    lb.stop();
    assert_no_panic_or_debug_dump(&lb.log(), "sluice log");
}

#[test]
fn wildcard_listener_answers_from_the_address_queried() {
    let Some((knotd, kdig_bin, _)) = dns_tools() else {
        return;
    };
    let knot = Knot::start(&knotd, "k1");
    // Free on loopback, where the clients below look.
    let port = free_dns_port(LOCALHOST);
    let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    let mut lb = Sluice::started(&dns_service(listen, &[knot.addr()], ""));
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.53"] {
        let server: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        // kdig drops a reply from any other source address than it asked.
        let mut last = None;
        eventually(DEADLINE, &format!("kdig @{server}"), || {
            let a = kdig(&kdig_bin, server, "who.test", "TXT", 1);
            let ok = a.ok;
            last = Some(a);
            ok
        });
        assert_eq!(last.unwrap().answers, vec!["\"k1\"".to_string()]);
        // And the source address checked directly.
        let client = UdpSocket::bind((LOCALHOST, 0)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let q = sluice_e2e::dns::query_bytes(0x5151, "www.test.", hickory_proto::rr::RecordType::A);
        client.send_to(&q, server).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = client.recv_from(&mut buf).expect("an answer");
        assert_eq!(
            from, server,
            "the answer must come from the address queried"
        );
        assert_eq!(&buf[..2], &[0x51, 0x51]);
        assert!(n > 12);
    }
    lb.stop();
}

#[test]
fn garbage_datagrams_leave_it_running_and_answering() {
    let Some((knotd, kdig_bin, _)) = dns_tools() else {
        return;
    };
    let knots = start_knots(&knotd, &["k1", "k2"]);
    let addrs: Vec<SocketAddr> = knots.iter().map(Knot::addr).collect();
    let listen = SocketAddr::new(LOCALHOST, free_dns_port(LOCALHOST));
    let admin = free_tcp_addr();
    let mut lb = Sluice::started(&with_admin(admin, &dns_service(listen, &addrs, "")));
    eventually(DEADLINE, "a first answer", || {
        who(&kdig_bin, listen).is_some()
    });

    let seed = fastrand::u64(..);
    eprintln!("garbage seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let senders: Vec<UdpSocket> = (0..8)
        .map(|_| UdpSocket::bind((LOCALHOST, 0)).unwrap())
        .collect();
    let mut buf = vec![0u8; 65507];
    let mut sent = 0usize;
    let mut bytes = 0usize;
    let t0 = Instant::now();
    for i in 0..10_000 {
        // Sizes from 0 to the largest UDP payload, biased to small ones
        // (DNS-sized garbage is what reaches the query path).
        let len = match i % 4 {
            0 => rng.usize(0..=65507),
            1 => rng.usize(0..=12),
            _ => rng.usize(0..=600),
        };
        rng.fill(&mut buf[..len]);
        if i % 3 == 0 && len > 2 {
            buf[2] &= 0x7f; // looks like a query: it is forwarded to knotd
        }
        if senders[i % senders.len()]
            .send_to(&buf[..len], listen)
            .is_ok()
        {
            sent += 1;
            bytes += len;
        }
        if i % 500 == 0 {
            // Let the kernel drain a little, as a real flood is spread out.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    eprintln!(
        "sent {sent} garbage datagrams ({bytes} bytes) in {:?}",
        t0.elapsed()
    );
    assert_eq!(sent, 10_000);
    assert!(lb.try_exit().is_none(), "sluice exited:\n{}", lb.log());

    // Still answering real queries, from both backends.
    let mut seen = BTreeMap::new();
    eventually(DEADLINE, "answers from k1 and k2 after the flood", || {
        if let Some(name) = who(&kdig_bin, listen) {
            *seen.entry(name).or_insert(0) += 1;
        }
        seen.len() == 2
    });
    let www = kdig(&kdig_bin, listen, "www.test", "A", 2);
    assert!(www.ok, "{}", www.output);
    assert_eq!(www.answers, vec![WWW_ANSWER.to_string()]);
    // What was not DNS was dropped and counted (runts, responses; what did
    // not fit the kernel's receive buffer never arrived).
    let labels = [("service", "dns"), ("direction", "dropped")];
    let dropped = scrape_metric(admin, "sluice_udp_datagrams_total", &labels);
    eprintln!("dropped and counted: {dropped:?}");
    assert!(dropped.is_some_and(|d| d >= 100.0), "dropped {dropped:?}");
    lb.stop();
    assert_no_panic_or_debug_dump(&lb.log(), "sluice log");
}

#[test]
fn a_backend_going_down_moves_its_share_and_loses_nothing_after() {
    let Some((knotd, _, _)) = dns_tools() else {
        return;
    };
    let mut knots = start_knots(&knotd, &["k1", "k2", "k3"]);
    let addrs: Vec<SocketAddr> = knots.iter().map(Knot::addr).collect();
    let listen = SocketAddr::new(LOCALHOST, free_dns_port(LOCALHOST));
    let check = "    health_check: { kind: dns, query: \"www.test. A\", interval: 200ms, timeout: 100ms, fall: 2, rise: 2 }\n";
    let mut lb = Sluice::started(&dns_service(listen, &addrs, check));
    let start = Instant::now();
    let probe = DnsProbe::start(listen, Duration::from_millis(500), Duration::from_millis(2));
    eventually(DEADLINE, "answers from all three backends", || {
        let (by, _) = tally(&probe.queries());
        by.len() == 3
    });
    let n = probe.count();
    eventually(DEADLINE, "a steady state before the kill", || {
        probe.count() >= n + 50
    });

    let killed = Instant::now();
    knots[1].kill();
    lb.wait_for_log(
        &format!("backend {} of service dns is DOWN", addrs[1]),
        DEADLINE,
    );
    let down = Instant::now();
    // Keep querying for a while after it is down.
    eventually(
        Duration::from_secs(5),
        "1.5 s of queries after DOWN",
        || down.elapsed() >= Duration::from_millis(1500),
    );
    let queries = probe.finish();

    // A query sent just before the kill may be in flight to k2 when it
    // dies: "before" stops 50 ms short of the kill.
    let before: Vec<&ProbeQuery> = queries
        .iter()
        .filter(|q| q.sent + Duration::from_millis(50) < killed)
        .collect();
    let between: Vec<&ProbeQuery> = queries
        .iter()
        .filter(|q| q.sent >= killed && q.sent < down)
        .collect();
    let after: Vec<&ProbeQuery> = queries.iter().filter(|q| q.sent >= down).collect();
    let (by_after, lost_after) = tally(&after.iter().map(|q| (*q).clone()).collect::<Vec<_>>());
    let lost_between = between.iter().filter(|q| q.answer.is_none()).count();
    eprintln!(
        "startup {:?}; {} queries before the kill (all answered: {}), {} while k2 was dead but up ({} lost), \
         DOWN {:?} after the kill, {} after DOWN: {:?}, {} lost",
        killed - start,
        before.len(),
        before.iter().all(|q| q.answer.is_some()),
        between.len(),
        lost_between,
        down - killed,
        after.len(),
        by_after,
        lost_after
    );
    assert!(
        before.iter().all(|q| q.answer.is_some()),
        "a query was lost before any backend died"
    );
    assert_eq!(
        lost_after, 0,
        "queries sent after {} went DOWN were lost",
        addrs[1]
    );
    assert!(
        !by_after.contains_key("k2"),
        "k2 answered after it was down: {by_after:?}"
    );
    assert!(
        by_after.get("k1").is_some_and(|&n| n > 10) && by_after.get("k3").is_some_and(|&n| n > 10)
    );
    // The share moved within 1 s of DOWN: shown above for every query
    // sent after DOWN (none lost, none to k2).
    assert!(
        down - killed < Duration::from_secs(3),
        "detection took {:?}",
        down - killed
    );
    lb.stop();
    assert_no_panic_or_debug_dump(&lb.log(), "sluice log");
}

#[test]
fn reload_adds_and_removes_backends_without_losing_answers() {
    let Some((knotd, _, dnsperf_bin)) = dns_tools() else {
        return;
    };
    let knots = start_knots(&knotd, &["k1", "k2", "k3", "k4"]);
    let addrs: Vec<SocketAddr> = knots.iter().map(Knot::addr).collect();
    let listen = SocketAddr::new(LOCALHOST, free_dns_port(LOCALHOST));
    let mut lb = Sluice::started(&dns_service(listen, &addrs[..3], ""));
    let probe = DnsProbe::start(listen, Duration::from_secs(1), Duration::from_millis(2));
    eventually(DEADLINE, "answers from k1, k2 and k3", || {
        tally(&probe.queries()).0.len() == 3
    });

    // A steady dnsperf load across both reloads.
    let file = lb.dir().join("queries.txt");
    write_queries(&file, 6_000);
    let load = {
        let (bin, file) = (dnsperf_bin.clone(), file.clone());
        std::thread::spawn(move || {
            dnsperf(
                &bin,
                listen,
                &file,
                &["-Q", "1000", "-t", "2"],
                Duration::from_secs(60),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // Add k4.
    lb.rewrite_config(&dns_service(listen, &addrs, ""));
    lb.reload();
    lb.wait_for_log_count("configuration reloaded", 1, DEADLINE);
    let added = Instant::now();
    eventually(DEADLINE, "k4 to answer", || {
        probe
            .queries()
            .iter()
            .any(|q| q.sent >= added && q.answer.as_deref() == Some("k4"))
    });

    // Remove k1.
    let fds = lb.fd_count();
    lb.rewrite_config(&dns_service(listen, &addrs[1..], ""));
    lb.reload();
    lb.wait_for_log_count("configuration reloaded", 2, DEADLINE);
    let removed = Instant::now();
    // Its upstream sockets (4 per worker that used it) close once their
    // queries in flight are done.
    eventually(DEADLINE, "k1's upstream sockets to close", || {
        lb.fd_count() + 4 <= fds
    });
    eventually(
        Duration::from_secs(5),
        "1 s of queries after the removal",
        || removed.elapsed() >= Duration::from_secs(1),
    );
    let queries = probe.finish();
    let report = load.join().expect("dnsperf thread");

    let (all, lost) = tally(&queries);
    let after_add: Vec<ProbeQuery> = queries
        .iter()
        .filter(|q| q.sent >= added && q.sent < removed)
        .cloned()
        .collect();
    let after_remove: Vec<ProbeQuery> = queries
        .iter()
        .filter(|q| q.sent >= removed)
        .cloned()
        .collect();
    let (by_add, _) = tally(&after_add);
    let (by_remove, _) = tally(&after_remove);
    eprintln!(
        "probe: {} queries {all:?}, {lost} lost; between reloads {by_add:?}; after removing k1 {by_remove:?}; \
         dnsperf: sent {} completed {} lost {}",
        queries.len(),
        report.sent,
        report.completed,
        report.lost
    );
    assert_eq!(lost, 0, "a probe query was lost across the reloads");
    assert!(
        by_add.get("k4").is_some_and(|&n| n > 0),
        "k4 took no query after it was added"
    );
    assert!(
        !by_remove.contains_key("k1"),
        "k1 answered after it was removed: {by_remove:?}"
    );
    assert_eq!(
        by_remove.len(),
        3,
        "k2, k3 and k4 share the load: {by_remove:?}"
    );
    assert_eq!(
        report.lost, 0,
        "dnsperf lost queries across the reloads:\n{}",
        report.output
    );
    assert_eq!(report.completed, 6_000, "{}", report.output);
    assert_eq!(report.mismatches, 0, "{}", report.output);
    lb.stop();
    assert_no_panic_or_debug_dump(&lb.log(), "sluice log");
}
