//! End-to-end tests of the admin endpoint's metrics and status (SPEC.md
//! "Admin endpoint", docs/operations.md): exact counter values for known
//! traffic, `promtool check metrics` on scrapes taken under load, and a
//! slowloris admin client that must not delay a reload or a health
//! transition. They run the real binary: `cargo build -p sluice` first.
//!
//! `SLUICE_REQUIRE_PROMTOOL=1` makes a missing `promtool` (Debian package
//! `prometheus`) a failure instead of a skip.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use serde_json::Value;
use sluice_e2e::dns::{dns_query, DnsBackend, DnsMode};
use sluice_e2e::net::{
    free_tcp_addr, free_udp_addr, http_get, read_exact_within, set_io_timeouts, udp_client,
    LOCALHOST,
};
use sluice_e2e::tcp::{TcpEcho, TcpEchoMany, TcpTagged};
use sluice_e2e::{eventually, eventually_some, promtool_check_metrics, Sluice, DEADLINE};

const RELOADED: &str = "configuration reloaded";
const RELOAD_FAILED: &str = "reload failed: the running configuration is unchanged";

// ------------------------------------------------------------------ helpers

/// One `/metrics` scrape: the text and its samples by series (the sample
/// line up to the value, e.g. `sluice_connections_total{service="web",...}`).
#[derive(Debug, Clone)]
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The value of `series`; panics with the scrape if it is missing.
    #[track_caller]
    fn get(&self, series: &str) -> f64 {
        match self.samples.get(series) {
            Some(v) => *v,
            None => panic!("no series {series} in the scrape:\n{}", self.text),
        }
    }
}

/// Scrapes `/metrics` once, checking the status and content type.
#[track_caller]
fn scrape(admin: SocketAddr) -> Scrape {
    let r = http_get(admin, "/metrics", DEADLINE)
        .unwrap_or_else(|e| panic!("GET http://{admin}/metrics: {e}"));
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let samples = r
        .body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in sample line {l:?}")),
            };
            (series.to_string(), value)
        })
        .collect();
    Scrape {
        text: r.body,
        samples,
    }
}

/// `GET /status` as JSON.
#[track_caller]
fn status(admin: SocketAddr) -> Value {
    let r = http_get(admin, "/status", DEADLINE)
        .unwrap_or_else(|e| panic!("GET http://{admin}/status: {e}"));
    assert_eq!(r.status, 200, "GET /status: {}", r.body);
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", r.body))
}

/// The `/status` entry of one backend.
#[track_caller]
fn status_backend<'a>(status: &'a Value, service: &str, backend: SocketAddr) -> &'a Value {
    status_service(status, service)["backends"]
        .as_array()
        .and_then(|bs| {
            bs.iter()
                .find(|b| b["address"] == Value::String(backend.to_string()))
        })
        .unwrap_or_else(|| panic!("no backend {backend} of {service} in /status: {status:#}"))
}

/// The `/status` entry of one service.
#[track_caller]
fn status_service<'a>(status: &'a Value, service: &str) -> &'a Value {
    status["services"]
        .as_array()
        .and_then(|ss| ss.iter().find(|s| s["name"] == service))
        .unwrap_or_else(|| panic!("no service {service} in /status: {status:#}"))
}

/// A per-backend series: `name{service="s",backend="b"[,key="value"]}`.
fn be(name: &str, service: &str, backend: SocketAddr, extra: Option<(&str, &str)>) -> String {
    let mut s = format!("{name}{{service=\"{service}\",backend=\"{backend}\"");
    if let Some((k, v)) = extra {
        let _ = write!(s, ",{k}=\"{v}\"");
    }
    s.push('}');
    s
}

/// A per-service series: `name{service="s"[,key="value"]}`.
fn svc(name: &str, service: &str, extra: Option<(&str, &str)>) -> String {
    let mut s = format!("{name}{{service=\"{service}\"");
    if let Some((k, v)) = extra {
        let _ = write!(s, ",{k}=\"{v}\"");
    }
    s.push('}');
    s
}

/// Compares every `(series, expected)` with the scrape and panics listing
/// all mismatches at once, with the scrape.
#[track_caller]
fn assert_exact(scrape: &Scrape, expected: &[(String, f64)]) {
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(series, want)| match scrape.samples.get(series) {
            Some(got) if got == want => None,
            Some(got) => Some(format!("{series}: expected {want}, got {got}")),
            None => Some(format!("{series}: expected {want}, missing")),
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} series differ:\n  {}\n--- scrape ---\n{}",
        wrong.len(),
        wrong.join("\n  "),
        scrape.text
    );
}

/// A TCP port that refuses connections and that no one else can take
/// while this lives: a socket bound to it that never listens.
struct RefusedPort {
    _socket: socket2::Socket,
    addr: SocketAddr,
}

impl RefusedPort {
    fn new() -> RefusedPort {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket
            .bind(&SocketAddr::new(LOCALHOST, 0).into())
            .expect("bind");
        let addr = socket
            .local_addr()
            .expect("local_addr")
            .as_socket()
            .expect("an inet address");
        RefusedPort {
            _socket: socket,
            addr,
        }
    }
}

/// Connects to `listen` and echoes `payload` through it (an echo backend
/// behind sluice); returns the open connection.
#[track_caller]
fn echo_open(listen: SocketAddr, payload: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&listen, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {listen}: {e}"));
    set_io_timeouts(&s, Duration::from_secs(10));
    s.write_all(payload).expect("write the payload");
    let back =
        read_exact_within(&mut s, payload.len(), Duration::from_secs(10)).expect("read the echo");
    assert!(back == payload, "the echo differs from what was sent");
    s
}

/// Half-closes `s` and waits for the end of the stream (the backend's FIN
/// relayed by sluice), so the proxied connection is over on both sides.
#[track_caller]
fn echo_close(mut s: TcpStream) {
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read to the end");
    assert!(
        rest.is_empty(),
        "{} unexpected bytes before EOF",
        rest.len()
    );
}

/// `len` bytes that differ per `seed`.
fn payload(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + seed * 7) as u8).collect()
}

// ------------------------------------------- 1. exact values for known traffic

/// Bytes each client connection sends (and gets echoed back).
const B: usize = 3000;
/// Concurrent connections of the second traffic phase.
const N: usize = 20;
/// Connections to the service whose only backend is down.
const NO_BACKEND: usize = 3;
/// DNS queries through the dns-mode service; the last one times out.
const K: usize = 10;

/// One process, one worker (so round robin is one sequence and the counts
/// per backend are exact), three services:
///
/// - `web`: round robin over two echo backends `e1`, `e2` and a port that
///   refuses (`r`). Its active checks run every 3 s (first checks of the
///   three backends at +0 s, +1 s, +2 s), so `r` cannot be taken down by
///   active checks (fall 2: not before +5 s) while the test drives its
///   first connections: it is taken down by passive ejection after exactly
///   `fall` = 2 refused connects, each retried on an echo backend.
/// - `dead`: one refusing backend with fast checks, down within ~200 ms.
/// - `dns`: dns mode over one [`DnsBackend`], `query_timeout` 500 ms.
fn exact_config(
    admin: SocketAddr,
    shutdown_timeout: &str,
    web: (SocketAddr, [SocketAddr; 3]),
    dead: (SocketAddr, SocketAddr),
    dns: (SocketAddr, SocketAddr),
) -> String {
    let (web_listen, [e1, e2, r]) = web;
    let (dead_listen, d) = dead;
    let (dns_listen, q) = dns;
    format!(
        r#"workers: 1
shutdown_timeout: {shutdown_timeout}
admin: {{ listen: "{admin}" }}
services:
  - name: web
    protocol: tcp
    listen: ["{web_listen}"]
    balance: round_robin
    connect_timeout: 1s
    connect_retries: 2
    health_check: {{ kind: tcp, interval: 3s, timeout: 1s, rise: 2, fall: 2 }}
    backends:
      - address: "{e1}"
      - address: "{e2}"
      - address: "{r}"
  - name: dead
    protocol: tcp
    listen: ["{dead_listen}"]
    health_check: {{ kind: tcp, interval: 200ms, timeout: 100ms, rise: 2, fall: 2 }}
    backends:
      - address: "{d}"
  - name: dns
    protocol: udp
    listen: ["{dns_listen}"]
    balance: round_robin
    udp: {{ mode: dns, query_timeout: 500ms }}
    backends:
      - address: "{q}"
"#
    )
}

#[test]
fn known_traffic_gives_exact_counters_and_status() {
    let e1 = TcpEcho::start();
    let e2 = TcpEcho::start();
    let refusing_r = RefusedPort::new();
    let refusing_d = RefusedPort::new();
    let q = DnsBackend::start("q");
    let (e1a, e2a, q_addr) = (e1.addr(), e2.addr(), q.addr());
    let (r, d_addr) = (refusing_r.addr, refusing_d.addr);
    let admin = free_tcp_addr();
    let web_listen = free_tcp_addr();
    let dead_listen = free_tcp_addr();
    let dns_listen = free_udp_addr();
    let config = |shutdown_timeout: &str| {
        exact_config(
            admin,
            shutdown_timeout,
            (web_listen, [e1a, e2a, r]),
            (dead_listen, d_addr),
            (dns_listen, q_addr),
        )
    };
    let mut lb = Sluice::started(&config("5s"));

    // Every family of SPEC.md is there from the first scrape, with its
    // type, and promtool likes it.
    let first = scrape(admin);
    promtool_check_metrics(&first.text);
    for (family, kind) in [
        ("sluice_connections_total", "counter"),
        ("sluice_active_connections", "gauge"),
        ("sluice_bytes_total", "counter"),
        ("sluice_connect_errors_total", "counter"),
        ("sluice_no_backend_total", "counter"),
        ("sluice_backend_up", "gauge"),
        ("sluice_health_checks_total", "counter"),
        ("sluice_connect_duration_seconds", "histogram"),
        ("sluice_udp_datagrams_total", "counter"),
        ("sluice_udp_sessions", "gauge"),
        ("sluice_dns_queries_total", "counter"),
        ("sluice_config_reloads_total", "counter"),
    ] {
        let line = format!("# TYPE {family} {kind}\n");
        assert!(
            first.text.contains(&line),
            "no {line:?} in:\n{}",
            first.text
        );
    }
    assert_eq!(
        first.get(&be("sluice_backend_up", "web", r, None)),
        1.0,
        "backends start up"
    );

    // ---- no healthy backend: `dead` closes its connections at once.
    eventually(DEADLINE, "the only backend of dead to be down", || {
        scrape(admin).get(&be("sluice_backend_up", "dead", d_addr, None)) == 0.0
    });
    for _ in 0..NO_BACKEND {
        let mut s = TcpStream::connect_timeout(&dead_listen, Duration::from_secs(5))
            .expect("connect to dead");
        set_io_timeouts(&s, Duration::from_secs(10));
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("dead should close the connection at once, got {other:?}"),
        }
    }
    eventually(DEADLINE, "no_backend_total of dead to count", || {
        scrape(admin).get(&svc("sluice_no_backend_total", "dead", None)) == NO_BACKEND as f64
    });

    // ---- phase 1, one connection at a time until `r` is ejected.
    // Smooth weighted round robin over [e1, e2, r] (equal weights, ties to
    // the first): 1 -> e1, 2 -> e2, 3 -> r (refused, retried: e1),
    // 4 -> e2, 5 -> r (refused, retried: e1). The second refusal is `fall`:
    // r goes down, the new snapshot restarts the rotation over [e1, e2].
    let mut phase1 = 0;
    while phase1 < 10 {
        phase1 += 1;
        echo_close(echo_open(web_listen, &payload(phase1, B)));
        if scrape(admin).get(&be("sluice_connect_errors_total", "web", r, None)) >= 2.0 {
            break;
        }
    }
    assert_eq!(
        phase1, 5,
        "the second refused connect should be the fifth connection"
    );
    // Wait for the ejection to reach the routes before sending more.
    eventually(DEADLINE, "r to be marked down", || {
        scrape(admin).get(&be("sluice_backend_up", "web", r, None)) == 0.0
    });
    lb.wait_for_log(
        &format!(
            "backend {r} of service web is DOWN (2 consecutive connect failures in traffic: connection refused)"
        ),
        DEADLINE,
    );

    // Phase 1's connections are all closed (the gauge drops just after
    // the client sees the end of the stream).
    eventually(DEADLINE, "phase 1's connections to be uncounted", || {
        let s = scrape(admin);
        [e1a, e2a, r]
            .iter()
            .all(|&b| s.get(&be("sluice_active_connections", "web", b, None)) == 0.0)
    });

    // ---- phase 2: N connections open at once; the rotation alternates.
    // Each client reports once its echo is back, then waits to be released
    // (a dropped sender releases it too, so a failing test never hangs).
    let (opened_tx, opened_rx) = mpsc::channel::<()>();
    let mut release = Vec::new();
    let clients: Vec<JoinHandle<()>> = (0..N)
        .map(|i| {
            let opened = opened_tx.clone();
            let (go, wait) = mpsc::channel::<()>();
            release.push(go);
            std::thread::spawn(move || {
                let s = echo_open(web_listen, &payload(100 + i, B));
                let _ = opened.send(());
                let _ = wait.recv_timeout(DEADLINE);
                echo_close(s);
            })
        })
        .collect();
    for k in 0..N {
        opened_rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("only {k} of {N} connections got their echo"));
    }
    let held = scrape(admin);
    let held_status = status(admin);
    drop(release);
    for c in clients {
        c.join().expect("client thread");
    }
    let half = (N / 2) as f64;
    assert_exact(
        &held,
        &[
            (be("sluice_active_connections", "web", e1a, None), half),
            (be("sluice_active_connections", "web", e2a, None), half),
            (be("sluice_active_connections", "web", r, None), 0.0),
        ],
    );
    for (addr, want) in [(e1a, N / 2), (e2a, N / 2), (r, 0)] {
        assert_eq!(
            status_backend(&held_status, "web", addr)["active_connections"],
            want,
            "/status active_connections of {addr} with {N} connections open"
        );
    }

    // ---- DNS: K queries, K - 1 answered, the last one unanswered.
    let client = udp_client();
    for i in 0..K - 1 {
        let reply = dns_query(
            &client,
            dns_listen,
            "example.com.",
            RecordType::A,
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("DNS query {i} through sluice got no answer"));
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    }
    q.set_mode(DnsMode::Silent);
    let lost = dns_query(
        &client,
        dns_listen,
        "example.com.",
        RecordType::A,
        Duration::from_millis(300),
    );
    assert!(lost.is_none(), "a silent backend answered");
    eventually(DEADLINE, "the backend to have received every query", || {
        q.received() == K
    });
    q.set_mode(DnsMode::Answer);
    eventually(DEADLINE, "the unanswered query to time out", || {
        scrape(admin).get(&svc(
            "sluice_dns_queries_total",
            "dns",
            Some(("result", "timeout")),
        )) >= 1.0
    });

    // ---- one good reload (a changed file), one bad one (not YAML).
    lb.rewrite_config(&config("6s"));
    lb.reload();
    lb.wait_for_log_count(RELOADED, 1, DEADLINE);
    lb.rewrite_config("services: [\n");
    lb.reload();
    lb.wait_for_log_count(RELOAD_FAILED, 1, DEADLINE);
    lb.rewrite_config(&config("6s"));

    // ---- health: the healthy backends passed checks, the dead ones failed.
    let checks = |addr, result| {
        be(
            "sluice_health_checks_total",
            "web",
            addr,
            Some(("result", result)),
        )
    };
    eventually(
        Duration::from_secs(15),
        "every web backend to be checked",
        || {
            let s = scrape(admin);
            s.get(&checks(e1a, "pass")) > 0.0
                && s.get(&checks(e2a, "pass")) > 0.0
                && s.get(&checks(r, "fail")) > 0.0
        },
    );
    // Settled: every connection closed (the last decrement follows the
    // close by a moment).
    let fin = eventually_some(DEADLINE, "every connection to be closed", || {
        let s = scrape(admin);
        let open: f64 = [e1a, e2a, r]
            .iter()
            .map(|&b| s.get(&be("sluice_active_connections", "web", b, None)))
            .sum();
        (open == 0.0).then_some(s)
    });
    promtool_check_metrics(&fin.text);

    // e1 got phase-1 connections 1, 3 and 5 and half of phase 2; e2 got 2
    // and 4 and the other half. Every connection moved B bytes each way.
    let c1 = (3 + N / 2) as f64;
    let c2 = (2 + N / 2) as f64;
    let b = B as f64;
    let bytes = |addr, dir| be("sluice_bytes_total", "web", addr, Some(("direction", dir)));
    let count = |service, addr| be("sluice_connect_duration_seconds_count", service, addr, None);
    // (prometheus-client writes the `le` label first)
    let inf = |addr: SocketAddr| {
        format!("sluice_connect_duration_seconds_bucket{{le=\"+Inf\",service=\"web\",backend=\"{addr}\"}}")
    };
    let dns_q = |result| svc("sluice_dns_queries_total", "dns", Some(("result", result)));
    let dgrams = |dir| {
        svc(
            "sluice_udp_datagrams_total",
            "dns",
            Some(("direction", dir)),
        )
    };
    let expected: Vec<(String, f64)> = vec![
        // web: per backend
        (be("sluice_connections_total", "web", e1a, None), c1),
        (be("sluice_connections_total", "web", e2a, None), c2),
        (be("sluice_connections_total", "web", r, None), 0.0),
        (bytes(e1a, "to_backend"), c1 * b),
        (bytes(e1a, "to_client"), c1 * b),
        (bytes(e2a, "to_backend"), c2 * b),
        (bytes(e2a, "to_client"), c2 * b),
        (bytes(r, "to_backend"), 0.0),
        (bytes(r, "to_client"), 0.0),
        (be("sluice_connect_errors_total", "web", e1a, None), 0.0),
        (be("sluice_connect_errors_total", "web", e2a, None), 0.0),
        (be("sluice_connect_errors_total", "web", r, None), 2.0),
        (be("sluice_active_connections", "web", e1a, None), 0.0),
        (be("sluice_active_connections", "web", e2a, None), 0.0),
        (be("sluice_active_connections", "web", r, None), 0.0),
        (be("sluice_backend_up", "web", e1a, None), 1.0),
        (be("sluice_backend_up", "web", e2a, None), 1.0),
        (be("sluice_backend_up", "web", r, None), 0.0),
        (checks(e1a, "fail"), 0.0),
        (checks(e2a, "fail"), 0.0),
        (checks(r, "pass"), 0.0),
        (count("web", e1a), c1),
        (count("web", e2a), c2),
        (count("web", r), 0.0),
        (inf(e1a), c1),
        (inf(e2a), c2),
        (svc("sluice_no_backend_total", "web", None), 0.0),
        // dead: every connection closed for want of a backend
        (
            svc("sluice_no_backend_total", "dead", None),
            NO_BACKEND as f64,
        ),
        (be("sluice_connections_total", "dead", d_addr, None), 0.0),
        (be("sluice_connect_errors_total", "dead", d_addr, None), 0.0),
        (be("sluice_backend_up", "dead", d_addr, None), 0.0),
        (
            be(
                "sluice_health_checks_total",
                "dead",
                d_addr,
                Some(("result", "pass")),
            ),
            0.0,
        ),
        (count("dead", d_addr), 0.0),
        // dns: K queries forwarded, K - 1 answered, one timed out
        (dns_q("answered"), (K - 1) as f64),
        (dns_q("timeout"), 1.0),
        (dns_q("orphan_reply"), 0.0),
        (dgrams("to_backend"), K as f64),
        (dgrams("to_client"), (K - 1) as f64),
        (dgrams("dropped"), 0.0),
        (svc("sluice_no_backend_total", "dns", None), 0.0),
        (svc("sluice_udp_sessions", "dns", None), 0.0),
        (be("sluice_backend_up", "dns", q_addr, None), 1.0),
        // reloads
        (
            "sluice_config_reloads_total{result=\"success\"}".to_string(),
            1.0,
        ),
        (
            "sluice_config_reloads_total{result=\"failure\"}".to_string(),
            1.0,
        ),
    ];
    assert_exact(&fin, &expected);
    assert!(fin.get(&be("sluice_connect_duration_seconds_sum", "web", e1a, None)) > 0.0);
    assert!(
        fin.get(&be(
            "sluice_health_checks_total",
            "dead",
            d_addr,
            Some(("result", "fail"))
        )) >= 2.0
    );
    // The TCP-only series of a UDP service and the UDP-only ones of a TCP
    // service stay at 0.
    assert_eq!(
        fin.get(&svc(
            "sluice_udp_datagrams_total",
            "web",
            Some(("direction", "to_backend"))
        )),
        0.0
    );
    assert_eq!(
        fin.get(&be("sluice_connections_total", "dns", q_addr, None)),
        K as f64
    );

    // /status agrees.
    let st = status(admin);
    assert_eq!(st["reloads"]["success"], 1, "{st:#}");
    assert_eq!(st["reloads"]["failure"], 1, "{st:#}");
    assert_eq!(st["workers"], 1);
    assert_eq!(status_service(&st, "web")["backends_up"], 2, "{st:#}");
    assert_eq!(status_service(&st, "dead")["backends_up"], 0, "{st:#}");
    assert_eq!(status_service(&st, "dns")["backends_up"], 1, "{st:#}");
    for (service, addr, health) in [
        ("web", e1a, "up"),
        ("web", e2a, "up"),
        ("web", r, "down"),
        ("dead", d_addr, "down"),
        ("dns", q_addr, "up"),
    ] {
        let b = status_backend(&st, service, addr);
        assert_eq!(b["health"], health, "{service} {addr}: {st:#}");
        assert_eq!(b["active_connections"], 0, "{service} {addr}: {st:#}");
    }
    lb.stop();
}

// ------------------------------------------------ 2. promtool under load

/// Client threads doing request/response on their connections until told
/// to stop; they count what they did, so the totals can be checked
/// against the counters.
struct Load {
    stop: Arc<AtomicBool>,
    exchanges: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<(), String>>>,
}

impl Load {
    /// `clients` threads; each opens a connection, does 20 exchanges of
    /// 64 to 576 bytes, closes it cleanly and starts over.
    fn start(listen: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let exchanges = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|i| {
                let (stop, exchanges, connections, bytes) = (
                    stop.clone(),
                    exchanges.clone(),
                    connections.clone(),
                    bytes.clone(),
                );
                std::thread::spawn(move || -> Result<(), String> {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let mut s = TcpStream::connect_timeout(&listen, Duration::from_secs(5))
                            .map_err(|e| format!("client {i}: connect: {e}"))?;
                        set_io_timeouts(&s, Duration::from_secs(10));
                        connections.fetch_add(1, Ordering::Relaxed);
                        for _ in 0..20 {
                            let p = payload(i * 1000 + n, 64 + (n * 37) % 513);
                            n += 1;
                            s.write_all(&p)
                                .map_err(|e| format!("client {i}: write: {e}"))?;
                            let back = read_exact_within(&mut s, p.len(), Duration::from_secs(10))
                                .map_err(|e| format!("client {i}: read: {e}"))?;
                            if back != p {
                                return Err(format!("client {i}: wrong echo"));
                            }
                            bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                            exchanges.fetch_add(1, Ordering::Relaxed);
                        }
                        s.shutdown(Shutdown::Write)
                            .map_err(|e| format!("client {i}: shutdown: {e}"))?;
                        let mut rest = Vec::new();
                        s.read_to_end(&mut rest)
                            .map_err(|e| format!("client {i}: read to end: {e}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        Load {
            stop,
            exchanges,
            connections,
            bytes,
            threads,
        }
    }

    fn exchanges(&self) -> u64 {
        self.exchanges.load(Ordering::Relaxed)
    }

    /// Stops and joins the clients; panics with their errors.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let errors: Vec<String> = self
            .threads
            .drain(..)
            .filter_map(|t| t.join().expect("client thread").err())
            .collect();
        assert!(errors.is_empty(), "client errors: {errors:?}");
        (
            self.connections.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Names of the samples that must never go down between scrapes
/// (counters, histogram buckets, sums and counts).
fn monotonic(series: &str) -> bool {
    let name = series.split('{').next().unwrap_or(series);
    name.ends_with("_total")
        || name.ends_with("_bucket")
        || name.ends_with("_count")
        || name.ends_with("_sum")
}

#[test]
fn promtool_accepts_scrapes_taken_under_load() {
    const CLIENTS: usize = 50;
    const SCRAPES: usize = 5;
    let b1 = TcpEchoMany::start();
    let b2 = TcpEchoMany::start();
    let admin = free_tcp_addr();
    let listen = free_tcp_addr();
    let yaml = format!(
        "workers: 2\nadmin: {{ listen: \"{admin}\" }}\nservices:\n  - name: echo\n    protocol: tcp\n    \
         listen: [\"{listen}\"]\n    balance: round_robin\n    \
         health_check: {{ kind: tcp, interval: 200ms, timeout: 100ms }}\n    backends:\n      \
         - address: \"{}\"\n      - address: \"{}\"\n",
        b1.addr(),
        b2.addr()
    );
    let mut lb = Sluice::started(&yaml);
    let load = Load::start(listen, CLIENTS);
    eventually(DEADLINE, "traffic to flow", || load.exchanges() > 2000);

    let mut previous: Option<Scrape> = None;
    for k in 0..SCRAPES {
        let before = load.exchanges();
        eventually(DEADLINE, "more traffic between scrapes", || {
            load.exchanges() >= before + 500
        });
        let s = scrape(admin);
        if !promtool_check_metrics(&s.text) && k == 0 {
            eprintln!("promtool is missing: only the scrapes' own consistency is checked");
        }
        let active: f64 = [b1.addr(), b2.addr()]
            .iter()
            .map(|&b| s.get(&be("sluice_active_connections", "echo", b, None)))
            .sum();
        // A client that just finished a connection (it saw the relayed FIN)
        // may open its next one before sluice has closed and uncounted the
        // old one: a few more than CLIENTS is fine, twice as many is not.
        assert!(
            active > 0.0 && active < 2.0 * CLIENTS as f64,
            "{active} active connections with {CLIENTS} clients:\n{}",
            s.text
        );
        if let Some(p) = &previous {
            for (series, &was) in &p.samples {
                if monotonic(series) {
                    let now = s.get(series);
                    assert!(now >= was, "{series} went down from {was} to {now}");
                }
            }
            let progress = |sc: &Scrape| {
                sc.get(&be(
                    "sluice_bytes_total",
                    "echo",
                    b1.addr(),
                    Some(("direction", "to_backend")),
                )) + sc.get(&be(
                    "sluice_bytes_total",
                    "echo",
                    b2.addr(),
                    Some(("direction", "to_backend")),
                ))
            };
            assert!(
                progress(&s) > progress(p),
                "no bytes counted between scrapes"
            );
        }
        previous = Some(s);
    }

    // After the load: the counters add up to what the clients did.
    let (connections, bytes) = load.finish();
    let fin = eventually_some(DEADLINE, "the counters to settle", || {
        let s = scrape(admin);
        let sum = |f: &dyn Fn(SocketAddr) -> String| -> f64 {
            [b1.addr(), b2.addr()].iter().map(|&b| s.get(&f(b))).sum()
        };
        let conns = sum(&|b| be("sluice_connections_total", "echo", b, None));
        let active = sum(&|b| be("sluice_active_connections", "echo", b, None));
        let to_client = sum(&|b| {
            be(
                "sluice_bytes_total",
                "echo",
                b,
                Some(("direction", "to_client")),
            )
        });
        (conns == connections as f64 && active == 0.0 && to_client == bytes as f64).then_some(s)
    });
    promtool_check_metrics(&fin.text);
    for b in [b1.addr(), b2.addr()] {
        let c = fin.get(&be("sluice_connections_total", "echo", b, None));
        assert!(c > 0.0, "round robin sent nothing to {b}");
        assert_eq!(
            fin.get(&be(
                "sluice_bytes_total",
                "echo",
                b,
                Some(("direction", "to_backend"))
            )),
            fin.get(&be(
                "sluice_bytes_total",
                "echo",
                b,
                Some(("direction", "to_client"))
            )),
            "an echo backend returns what it gets"
        );
        assert_eq!(
            fin.get(&be(
                "sluice_connect_duration_seconds_count",
                "echo",
                b,
                None
            )),
            c
        );
        assert_eq!(
            fin.get(&be("sluice_connect_errors_total", "echo", b, None)),
            0.0
        );
        assert_eq!(fin.get(&be("sluice_backend_up", "echo", b, None)), 1.0);
    }
    eprintln!(
        "{connections} connections, {bytes} bytes each way, {SCRAPES} scrapes under load from {CLIENTS} clients"
    );
    lb.stop();
}

// ------------------------------------ 3. slowloris on the admin endpoint

/// A slowloris: keeps `count` connections to the admin endpoint, each with
/// a partial request line, trickling one more byte of it now and then and
/// reopening at once any connection the server closes (the admin endpoint
/// keeps at most 64 open, closing the least recently active one to admit a
/// new one, and closes a head unfinished after 5 s: so this client churns
/// through connections as fast as the server sheds them, a harsher load
/// than 100 quiet ones).
struct Slowloris {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    closed_by_server: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Slowloris {
    fn start(admin: SocketAddr, count: usize) -> Slowloris {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let closed_by_server = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, opened, closed) = (stop.clone(), opened.clone(), closed_by_server.clone());
            std::thread::spawn(move || {
                let open = || -> Option<TcpStream> {
                    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
                    s.write_all(b"GET /metrics?slow=").ok()?;
                    s.set_nonblocking(true).ok()?;
                    Some(s)
                };
                let mut conns: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
                let mut last_trickle = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let trickle = last_trickle.elapsed() >= Duration::from_millis(500);
                    if trickle {
                        last_trickle = Instant::now();
                    }
                    for slot in conns.iter_mut() {
                        if let Some(s) = slot {
                            let mut buf = [0u8; 512];
                            let gone = match s.read(&mut buf) {
                                // EOF, or an error response: the server is done with it.
                                Ok(_) => true,
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                    trickle && s.write_all(b"a").is_err()
                                }
                                Err(_) => true,
                            };
                            if gone {
                                closed.fetch_add(1, Ordering::Relaxed);
                                *slot = None;
                            }
                        }
                        if slot.is_none() {
                            *slot = open();
                            if slot.is_some() {
                                opened.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Slowloris {
            stop,
            opened,
            closed_by_server,
            thread: Some(thread),
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    fn closed_by_server(&self) -> usize {
        self.closed_by_server.load(Ordering::Relaxed)
    }

    #[track_caller]
    fn assert_running(&self) {
        assert!(
            self.thread.as_ref().is_some_and(|t| !t.is_finished()),
            "the slowloris thread ended"
        );
    }
}

impl Drop for Slowloris {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_slowloris_admin_client_delays_neither_reload_nor_health() {
    const HELD: usize = 100;
    let a = TcpTagged::start("a");
    let b = TcpTagged::start("b");
    let b_addr = b.addr();
    let admin = free_tcp_addr();
    let listen = free_tcp_addr();
    // Health: a dead backend fails its next check at most `interval` after
    // it dies and is DOWN at the `fall`-th: within fall x interval + timeout
    // = 2 x 200 ms + 100 ms = 500 ms.
    let config = |balance: &str| {
        format!(
            "workers: 2\nadmin: {{ listen: \"{admin}\" }}\nservices:\n  - name: web\n    protocol: tcp\n    \
             listen: [\"{listen}\"]\n    balance: {balance}\n    \
             health_check: {{ kind: tcp, interval: 200ms, timeout: 100ms, rise: 2, fall: 2 }}\n    \
             backends:\n      - address: \"{}\"\n      - address: \"{b_addr}\"\n",
            a.addr()
        )
    };
    let health_bound = Duration::from_millis(500);
    let margin = Duration::from_millis(500);
    let mut lb = Sluice::started(&config("round_robin"));
    eventually(DEADLINE, "the admin endpoint to answer", || {
        http_get(admin, "/healthz", Duration::from_secs(1)).is_ok_and(|r| r.status == 200)
    });

    let slow = Slowloris::start(admin, HELD);
    eventually(DEADLINE, "100 stalled admin connections", || {
        slow.opened() >= HELD
    });
    // Let it churn for a while: the server evicts the oldest beyond its
    // cap, the slowloris reopens them.
    std::thread::sleep(Duration::from_millis(500));
    slow.assert_running();

    // (a) SIGHUP with a changed file.
    lb.rewrite_config(&config("random"));
    let sent = Instant::now();
    lb.reload();
    lb.wait_for_log(RELOADED, DEADLINE);
    let took = sent.elapsed();
    slow.assert_running();
    eprintln!(
        "reload logged {took:?} after SIGHUP ({} admin connections opened, {} closed by the server so far)",
        slow.opened(),
        slow.closed_by_server()
    );
    assert!(
        took < Duration::from_secs(1),
        "the reload took {took:?} with a slowloris on the admin port"
    );
    assert!(lb.log().contains("reload: "), "the reload changed nothing");

    // (b) a backend dies.
    let killed = Instant::now();
    b.stop();
    lb.wait_for_log(
        &format!("backend {b_addr} of service web is DOWN"),
        DEADLINE,
    );
    let detect = killed.elapsed();
    slow.assert_running();
    eprintln!(
        "backend marked down {detect:?} after it died ({} admin connections opened, {} closed by the server so far)",
        slow.opened(),
        slow.closed_by_server()
    );
    assert!(
        detect < health_bound + margin,
        "DOWN only {detect:?} after the backend died (bound {health_bound:?} + {margin:?})"
    );

    // Scrapes still get through while the slowloris holds on.
    let s = scrape(admin);
    assert_eq!(s.get(&be("sluice_backend_up", "web", b_addr, None)), 0.0);
    assert_eq!(
        s.get("sluice_config_reloads_total{result=\"success\"}"),
        1.0
    );
    promtool_check_metrics(&s.text);
    slow.assert_running();
    drop(slow);
    lb.stop();
}
