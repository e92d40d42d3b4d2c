//! The admin endpoint over real sockets on 127.0.0.1, port 0: the three
//! pages, the `/status` schema and its live health, error statuses, and the
//! limits against slow or hostile clients (oversized request, slowloris,
//! connection cap, idle keep-alive).
//!
//! `SLUICE_REQUIRE_PROMTOOL=1` turns a missing `promtool` into a failure;
//! without it the promtool test says it was skipped.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_control::admin::{self, AdminHandle, AdminLimits, AdminShared, AdminView};
use sluice_control::registry::Registry;
use sluice_metrics::names;

const CORES: usize = 2;

const CONFIG: &str = r#"
services:
  - name: web
    protocol: tcp
    listen: ["127.0.0.1:18443"]
    balance: least_conn
    max_connections: 500
    backends:
      - address: 127.0.0.1:9001
        weight: 100
      - address: 127.0.0.1:9002
        weight: 50
        max_connections: 10
  - name: dns
    protocol: udp
    listen: ["127.0.0.1:18053"]
    udp: { mode: dns }
    backends:
      - address: "[::1]:53"
"#;

const CONFIG_PATH: &str = "/etc/sluice/test.yaml";

/// A running endpoint over a registry built from [`CONFIG`].
struct Fixture {
    config: sluice_config::Config,
    registry: Registry,
    shared: Arc<AdminShared>,
    handle: AdminHandle,
    loaded_at: SystemTime,
}

impl Fixture {
    fn start() -> Fixture {
        Fixture::start_with(AdminLimits::default())
    }

    fn start_with(limits: AdminLimits) -> Fixture {
        let config = sluice_config::load_str(CONFIG, CONFIG_PATH).expect("test config is valid");
        let mut registry = Registry::new(CORES);
        let loaded_at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let view = AdminView::from_config(
            &config,
            Path::new(CONFIG_PATH),
            loaded_at,
            CORES,
            &mut registry,
        );
        let shared = Arc::new(AdminShared::new(registry.global.clone(), Arc::new(view)));
        let handle = admin::start_with(localhost0(), shared.clone(), limits)
            .expect("admin endpoint starts on 127.0.0.1:0");
        Fixture {
            config,
            registry,
            shared,
            handle,
            loaded_at,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    fn publish(&mut self) {
        let view = AdminView::from_config(
            &self.config,
            Path::new(CONFIG_PATH),
            self.loaded_at,
            CORES,
            &mut self.registry,
        );
        self.shared.publish(Arc::new(view));
    }
}

fn localhost0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

// ---- a tiny HTTP/1.1 client --------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// Reads one response: head, then `Content-Length` bytes of body (none for
/// a `HEAD` request).
fn read_reply(s: &mut TcpStream, head_request: bool) -> std::io::Result<Reply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "EOF before end of head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = if head_request {
        0
    } else {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().expect("numeric content-length"))
            .expect("response has a content-length")
    };
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8(body).expect("utf-8 body"),
    })
}

fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = connect(addr);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_reply(&mut s, method == "HEAD")
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path)
}

fn status_json(addr: SocketAddr) -> serde_json::Value {
    let r = get(addr, "/status");
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}):\n{}", r.body))
}

fn backend<'a>(status: &'a serde_json::Value, service: &str, addr: &str) -> &'a serde_json::Value {
    status["services"]
        .as_array()
        .expect("services array")
        .iter()
        .find(|s| s["name"] == service)
        .and_then(|s| {
            s["backends"]
                .as_array()
                .expect("backends array")
                .iter()
                .find(|b| b["address"] == addr)
        })
        .unwrap_or_else(|| panic!("no backend {service}/{addr} in {status:#}"))
}

/// The value of one sample line (`name{labels} value`).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// Reads until the server closes `s` (EOF or reset). `Ok(when)` on close,
/// `Err` if `deadline` passes first.
fn wait_closed(s: &mut TcpStream, deadline: Instant) -> Result<Instant, String> {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("still open at the deadline".into());
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(Instant::now()),
            Ok(_) => {} // an error response before the close
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err("still open at the deadline".into())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Ok(Instant::now()), // reset
        }
    }
}

/// Polls `cond` until it holds or `within` has passed.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A connection that sent part of a request head and stalls.
fn stalled(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Partial: ")
        .unwrap();
    s
}

// ---- pages -----------------------------------------------------------------

#[test]
fn healthz_answers_ok() {
    let f = Fixture::start();
    let r = get(f.addr(), "/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok", "the body is exactly `ok`");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
}

#[test]
fn metrics_has_every_family_and_the_right_content_type() {
    let f = Fixture::start();
    let r = get(f.addr(), "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some(sluice_metrics::CONTENT_TYPE),
        "{r:?}"
    );
    for name in names::ALL {
        assert!(
            r.body.contains(&format!("# TYPE {name} ")),
            "family {name} missing:\n{}",
            r.body
        );
    }
    // every configured backend and service is there
    for series in [
        r#"sluice_backend_up{service="web",backend="127.0.0.1:9001"}"#,
        r#"sluice_backend_up{service="web",backend="127.0.0.1:9002"}"#,
        r#"sluice_backend_up{service="dns",backend="[::1]:53"}"#,
    ] {
        assert_eq!(sample(&r.body, series), 1.0, "{series}");
    }
    assert_eq!(
        sample(&r.body, r#"sluice_udp_sessions{service="dns"}"#),
        0.0
    );
    assert_eq!(
        sample(&r.body, r#"sluice_config_reloads_total{result="success"}"#),
        0.0
    );
}

#[test]
fn metrics_reflect_counters_changed_between_scrapes() {
    let mut f = Fixture::start();
    let conns = r#"sluice_connections_total{service="web",backend="127.0.0.1:9001"}"#;
    let bytes =
        r#"sluice_bytes_total{service="web",backend="127.0.0.1:9001",direction="to_client"}"#;
    let up = r#"sluice_backend_up{service="web",backend="127.0.0.1:9002"}"#;
    let reloads = r#"sluice_config_reloads_total{result="failure"}"#;
    let dns = r#"sluice_dns_queries_total{service="dns",result="answered"}"#;

    let first = get(f.addr(), "/metrics").body;
    assert_eq!(sample(&first, conns), 0.0);
    assert_eq!(sample(&first, bytes), 0.0);
    assert_eq!(sample(&first, up), 1.0);
    assert_eq!(sample(&first, reloads), 0.0);
    assert_eq!(sample(&first, dns), 0.0);

    // workers 0 and 1 write their slots; the control thread its own cells
    let be = f
        .registry
        .backend_metrics("web", "127.0.0.1:9001".parse().unwrap());
    be.connections.inc(0);
    be.connections.add(1, 4);
    be.bytes_to_client.add(1, 4096);
    f.registry.service_metrics("dns").dns_answered.add(0, 7);
    f.registry.global.record_reload(false);
    f.registry
        .set_up("web", "127.0.0.1:9002".parse().unwrap(), false);

    let second = get(f.addr(), "/metrics").body;
    assert_eq!(sample(&second, conns), 5.0);
    assert_eq!(sample(&second, bytes), 4096.0);
    assert_eq!(sample(&second, up), 0.0);
    assert_eq!(sample(&second, reloads), 1.0);
    assert_eq!(sample(&second, dns), 7.0);

    // a republished view over the same registry keeps the same cells
    f.publish();
    let third = get(f.addr(), "/metrics").body;
    assert_eq!(sample(&third, conns), 5.0);
}

#[test]
fn status_shows_services_backends_and_config() {
    let f = Fixture::start();
    f.registry.global.record_reload(true);
    // cells of another registry are not the view's: they must not show up
    let stranger = Registry::new(1).backend_metrics("web", "127.0.0.1:9001".parse().unwrap());
    stranger.active.add(0, 99);

    let st = status_json(f.addr());
    assert_eq!(st["config"]["path"], CONFIG_PATH);
    assert_eq!(st["config"]["loaded_at"], "2023-11-14T22:13:20Z");
    assert_eq!(st["config"]["loaded_at_unix"], 1_700_000_000u64);
    assert_eq!(st["reloads"]["success"], 1);
    assert_eq!(st["reloads"]["failure"], 0);
    assert_eq!(st["workers"], CORES);

    let services = st["services"].as_array().unwrap();
    let names: Vec<&str> = services
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "dns"]);
    let web = &services[0];
    assert_eq!(web["protocol"], "tcp");
    assert_eq!(web["balance"], "least_conn");
    assert_eq!(web["listen"], serde_json::json!(["127.0.0.1:18443"]));
    assert_eq!(web["max_connections"], 500);
    assert_eq!(web["health_check"], "tcp");
    assert_eq!(web["backends_up"], 2);
    let dns = &services[1];
    assert_eq!(dns["protocol"], "udp");
    assert_eq!(dns["balance"], "maglev");
    assert_eq!(dns["health_check"], "none");

    let b1 = backend(&st, "web", "127.0.0.1:9001");
    assert_eq!(b1["weight"], 100);
    assert_eq!(b1["health"], "up");
    assert_eq!(b1["active_connections"], 0);
    assert_eq!(b1["max_connections"], 0);
    assert_eq!(b1["configured_address"], "127.0.0.1:9001");
    let b2 = backend(&st, "web", "127.0.0.1:9002");
    assert_eq!(b2["weight"], 50);
    assert_eq!(b2["max_connections"], 10);
    assert_eq!(backend(&st, "dns", "[::1]:53")["health"], "up");
}

#[test]
fn status_follows_health_and_active_connections() {
    let mut f = Fixture::start();
    let addr: SocketAddr = "127.0.0.1:9002".parse().unwrap();
    let be = f.registry.backend_metrics("web", addr);
    be.active.add(0, 3);
    be.active.add(1, 1);

    let st = status_json(f.addr());
    assert_eq!(backend(&st, "web", "127.0.0.1:9002")["health"], "up");
    assert_eq!(
        backend(&st, "web", "127.0.0.1:9002")["active_connections"],
        4
    );

    // the health checker marks it down; the control thread republishes
    assert!(f.registry.set_up("web", addr, false));
    assert!(!be.up.load(Ordering::Relaxed));
    f.publish();
    be.active.add(1, -2);

    let st = status_json(f.addr());
    let b2 = backend(&st, "web", "127.0.0.1:9002");
    assert_eq!(b2["health"], "down");
    assert_eq!(b2["active_connections"], 2);
    assert_eq!(st["services"][0]["backends_up"], 1);
    assert_eq!(backend(&st, "web", "127.0.0.1:9001")["health"], "up");

    // and back up
    f.registry.set_up("web", addr, true);
    f.publish();
    let st = status_json(f.addr());
    assert_eq!(backend(&st, "web", "127.0.0.1:9002")["health"], "up");
}

#[test]
fn a_published_view_replaces_the_old_one() {
    let mut f = Fixture::start();
    f.config.services.truncate(1);
    f.config.services[0].backends.truncate(1);
    f.publish();
    let st = status_json(f.addr());
    assert_eq!(st["services"].as_array().unwrap().len(), 1);
    assert_eq!(st["services"][0]["backends"].as_array().unwrap().len(), 1);
    let metrics = get(f.addr(), "/metrics").body;
    assert!(!metrics.contains("127.0.0.1:9002"), "{metrics}");
    assert!(!metrics.contains("service=\"dns\""), "{metrics}");
}

#[test]
fn unknown_paths_404_and_other_methods_405() {
    let f = Fixture::start();
    for path in ["/", "/nope", "/metrics/", "/healthzz", "/status.json"] {
        assert_eq!(get(f.addr(), path).status, 404, "GET {path}");
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for path in ["/metrics", "/status", "/healthz"] {
            let r = request(f.addr(), method, path);
            assert_eq!(r.status, 405, "{method} {path}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {path}");
        }
    }
    // a query string does not change the page
    assert_eq!(get(f.addr(), "/healthz?verbose=1").status, 200);
}

#[test]
fn head_gets_headers_without_a_body() {
    let f = Fixture::start();
    for (path, ty) in [
        ("/healthz", "text/plain; charset=utf-8"),
        ("/status", "application/json"),
        ("/metrics", sluice_metrics::CONTENT_TYPE),
    ] {
        let mut s = connect(f.addr());
        write!(
            s,
            "HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let raw = String::from_utf8(raw).unwrap();
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
        assert!(raw.contains(&format!("content-type: {ty}\r\n")), "{raw}");
        assert!(raw.ends_with("\r\n\r\n"), "HEAD {path} sent a body:\n{raw}");
    }
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let f = Fixture::start();
    let mut s = connect(f.addr());
    for path in ["/healthz", "/status", "/metrics", "/nope", "/healthz"] {
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let r = read_reply(&mut s, false).unwrap();
        assert_eq!(r.status, if path == "/nope" { 404 } else { 200 }, "{path}");
    }
}

// ---- hostile clients ---------------------------------------------------------

#[test]
fn a_one_megabyte_request_line_is_refused_quickly() {
    let f = Fixture::start();
    let mut req = b"GET /".to_vec();
    req.extend(std::iter::repeat_n(b'a', 1 << 20));
    req.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");

    let started = Instant::now();
    let mut s = connect(f.addr());
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // The server stops reading after its 16 KiB buffer: the write may fail
    // (reset) or stall until the timeout; either is fine.
    let _ = s.write_all(&req);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = started + Duration::from_secs(2);
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break "timeout";
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => break "closed",
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break "timeout"
            }
            Err(_) => break "reset",
        }
    };
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert_ne!(
        outcome, "timeout",
        "no answer and no close within 2 s; got {text:?}"
    );
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    if !got.is_empty() {
        assert!(
            text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
            "{text}"
        );
    }
    // the server is fine
    assert_eq!(get(f.addr(), "/healthz").status, 200);
}

#[test]
fn too_many_headers_and_garbage_are_rejected_without_harm() {
    let f = Fixture::start();
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    // (input, whether any answer must be an error status)
    let inputs: Vec<(Vec<u8>, bool)> = vec![
        (b"\x00\xff\xfe garbage\r\n\r\n".to_vec(), true),
        (b"GET /healthz HTTP/9.9\r\n\r\n".to_vec(), true),
        (
            b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
            true,
        ),
        (b"GET\r\n\r\n".to_vec(), true),
        (
            b"GET /healthz HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            true,
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
            true,
        ),
        (vec![b'\n'; 20_000], true),
        // a body that never comes: answered or not, the connection closes
        (
            b"GET /metrics HTTP/1.1\r\nContent-Length: 100000000\r\n\r\nabc".to_vec(),
            false,
        ),
        // a valid head with a broken body: the page needs no body, so it
        // may be answered; the connection must not be reused
        (
            b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            false,
        ),
    ];
    for (input, must_fail) in inputs {
        let mut s = connect(f.addr());
        let _ = s.write_all(&input);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            s.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&raw);
        assert!(
            raw.is_empty()
                || text.starts_with("HTTP/1.1 4")
                || (!must_fail && text.starts_with("HTTP/1.1 ")),
            "input {:?} got {text}",
            String::from_utf8_lossy(&input[..input.len().min(40)])
        );
        assert!(Instant::now() < deadline, "no close for {input:?}");
    }
    assert_eq!(get(f.addr(), "/healthz").status, 200);
}

#[test]
fn slowloris_does_not_starve_healthz_and_is_closed_after_the_header_timeout() {
    let limits = AdminLimits::default();
    let timeout = limits.header_read_timeout;
    let f = Fixture::start();
    let opened = Instant::now();
    let mut slow: Vec<TcpStream> = (0..100).map(|_| stalled(f.addr())).collect();

    // a scraper arriving now is served at once
    let t = Instant::now();
    let r = get(f.addr(), "/healthz");
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "/healthz took {:?} with 100 stalled connections",
        t.elapsed()
    );
    assert!(
        f.handle.open_connections() <= limits.max_connections,
        "{} open",
        f.handle.open_connections()
    );

    // every stalled connection is closed by the server: the oldest ones
    // to make room (cap), the rest by the header timeout
    let deadline = opened + timeout + Duration::from_secs(2);
    let mut last_close = opened;
    for (i, s) in slow.iter_mut().enumerate() {
        match wait_closed(s, deadline) {
            Ok(at) => last_close = last_close.max(at),
            Err(e) => panic!(
                "stalled connection {i}: {e} ({:?} after opening)",
                opened.elapsed()
            ),
        }
    }
    let last = last_close - opened;
    assert!(
        last >= timeout - Duration::from_millis(500),
        "the last stalled connection was closed after {last:?}, before the header timeout {timeout:?}"
    );
    assert!(eventually(Duration::from_secs(1), || f
        .handle
        .open_connections()
        == 0));
}

#[test]
fn the_connection_cap_closes_the_least_recently_active() {
    let limits = AdminLimits {
        max_connections: 8,
        ..AdminLimits::default()
    };
    let f = Fixture::start_with(limits);
    let mut slow: Vec<TcpStream> = Vec::new();
    for _ in 0..20 {
        slow.push(stalled(f.addr()));
        // accept order is connect order; wait for each to be admitted
        let want = slow.len().min(8);
        assert!(eventually(Duration::from_secs(2), || f
            .handle
            .open_connections()
            == want));
    }
    assert_eq!(f.handle.open_connections(), 8);

    // the 12 oldest were closed at once, long before the header timeout
    let deadline = Instant::now() + Duration::from_secs(1);
    for (i, s) in slow.iter_mut().take(12).enumerate() {
        wait_closed(s, deadline).unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    // a new request still gets through (closing one more stalled one)
    assert_eq!(get(f.addr(), "/healthz").status, 200);
    wait_closed(&mut slow[12], Instant::now() + Duration::from_secs(1))
        .expect("the oldest remaining stalled connection made room");
    // the newest are still open (measuring: they must survive 200 ms)
    for s in slow.iter_mut().skip(13) {
        assert!(wait_closed(s, Instant::now() + Duration::from_millis(200)).is_err());
    }
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let timeout = Duration::from_secs(1);
    let f = Fixture::start_with(AdminLimits {
        header_read_timeout: timeout,
        ..AdminLimits::default()
    });
    let mut s = connect(f.addr());
    write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_reply(&mut s, false).unwrap().status, 200);
    let answered = Instant::now();
    let closed = wait_closed(&mut s, answered + timeout + Duration::from_secs(2))
        .expect("idle keep-alive connection closed");
    let idle = closed - answered;
    assert!(
        idle >= timeout - Duration::from_millis(200),
        "closed after {idle:?}, before the idle timeout {timeout:?}"
    );
}

#[test]
fn a_silent_connection_is_closed_after_the_header_timeout() {
    let timeout = Duration::from_secs(1);
    let f = Fixture::start_with(AdminLimits {
        header_read_timeout: timeout,
        ..AdminLimits::default()
    });
    let opened = Instant::now();
    let mut s = connect(f.addr()); // sends nothing at all
    let closed = wait_closed(&mut s, opened + timeout + Duration::from_secs(2))
        .expect("silent connection closed");
    assert!(closed - opened >= timeout - Duration::from_millis(200));
}

#[test]
fn a_connection_is_closed_at_its_maximum_age() {
    let f = Fixture::start_with(AdminLimits {
        max_connection_age: Duration::from_millis(300),
        close_grace: Duration::from_millis(300),
        ..AdminLimits::default()
    });
    // keep it busy with requests, well inside the header timeout
    let mut s = connect(f.addr());
    let started = Instant::now();
    let mut served = 0;
    let closed = loop {
        if write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
            break true;
        }
        match read_reply(&mut s, false) {
            Ok(r) => {
                assert_eq!(r.status, 200);
                served += 1;
            }
            Err(_) => break true,
        }
        if started.elapsed() > Duration::from_secs(3) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(closed, "still open after 3 s, {served} requests served");
    assert!(served >= 2, "{served}");
    let age = started.elapsed();
    assert!(age < Duration::from_secs(2), "closed after {age:?}");
}

// ---- lifecycle ---------------------------------------------------------------

#[test]
fn start_on_an_address_in_use_names_it() {
    let taken = std::net::TcpListener::bind(localhost0()).unwrap();
    let addr = taken.local_addr().unwrap();
    let shared = Fixture::start().shared;
    let err = admin::start(addr, shared.clone()).expect_err("address in use");
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    // and a second admin endpoint on the first one's address
    let first = admin::start(localhost0(), shared.clone()).unwrap();
    let err = admin::start(first.local_addr(), shared).expect_err("address in use");
    assert!(
        err.to_string().contains(&first.local_addr().to_string()),
        "{err}"
    );
}

/// The control thread calls `start` and `stop` from inside its own tokio
/// runtime; neither may panic there (a runtime dropped inside another one
/// would), and a failed start must leave nothing behind.
#[test]
fn start_and_stop_from_inside_a_runtime() {
    let shared = Fixture::start().shared;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let taken = std::net::TcpListener::bind(localhost0()).unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(admin::start(addr, shared.clone()).is_err());
        let handle = admin::start(localhost0(), shared.clone()).unwrap();
        let a = handle.local_addr();
        let r = tokio::task::spawn_blocking(move || get(a, "/healthz"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        handle.stop();
        let dropped = admin::start(localhost0(), shared).unwrap();
        drop(dropped);
    });
}

#[test]
fn stop_closes_the_listener_and_open_connections() {
    let f = Fixture::start();
    let addr = f.addr();
    let mut held = stalled(addr);
    assert_eq!(get(addr, "/healthz").status, 200);
    assert!(eventually(Duration::from_secs(1), || f
        .handle
        .open_connections()
        >= 1));
    f.handle.stop();
    wait_closed(&mut held, Instant::now() + Duration::from_secs(1))
        .expect("held connection closed");
    assert!(
        eventually(Duration::from_secs(1), || TcpStream::connect(addr).is_err()),
        "still accepting after stop"
    );
}

// ---- promtool ------------------------------------------------------------------

#[test]
fn promtool_accepts_the_served_metrics() {
    let mut f = Fixture::start();
    let be = f
        .registry
        .backend_metrics("web", "127.0.0.1:9001".parse().unwrap());
    be.connect_duration.observe_nanos(0, 300_000);
    let body = get(f.addr(), "/metrics").body;

    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if std::env::var("SLUICE_REQUIRE_PROMTOOL").as_deref() == Ok("1") {
                panic!(
                    "SLUICE_REQUIRE_PROMTOOL=1 but `promtool` is not on PATH; \
                     install it (Debian: apt-get install prometheus) or unset the variable"
                );
            }
            println!(
                "SKIPPED promtool check: `promtool` not on PATH \
                 (set SLUICE_REQUIRE_PROMTOOL=1 to make this a failure)"
            );
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics rejected /metrics:\n{report}\n--- body ---\n{body}"
    );
}
