//! Loading: defaults, `defaults:` inheritance, address forms, error
//! format, and the pathological inputs (empty, binary, huge, alias bombs,
//! missing files, directories).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use sluice_config::*;

fn load(text: &str) -> Config {
    match load_str(text, "test.yaml") {
        Ok(c) => c,
        Err(e) => panic!("config should load:\n{e}"),
    }
}

fn load_err(text: &str) -> LoadError {
    match load_str(text, "test.yaml") {
        Ok(c) => panic!("config should fail, loaded {c:?}"),
        Err(e) => e,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

const MINIMAL: &str = "
services:
  - name: web
    protocol: tcp
    listen: [\"127.0.0.1:8080\"]
    backends:
      - address: 127.0.0.1:9000
";

#[test]
fn built_in_defaults() {
    let cfg = load(MINIMAL);
    assert_eq!(cfg.workers, Workers::Auto);
    assert_eq!(cfg.admin, None);
    assert_eq!(cfg.shutdown_timeout, Duration::from_secs(30));
    let s = &cfg.services[0];
    assert_eq!(s.name, "web");
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(s.listen, vec![addr("127.0.0.1:8080")]);
    assert_eq!(s.balance, Balance::Maglev);
    assert_eq!(s.transfer, Transfer::Auto);
    assert_eq!(s.proxy_protocol, ProxyProtocol::None);
    assert_eq!(s.max_connections, 0);
    assert_eq!(s.connect_timeout, Duration::from_secs(3));
    assert_eq!(s.connect_retries, 2);
    assert_eq!(s.idle_timeout, Duration::from_secs(300));
    assert!(!s.access_log);
    assert_eq!(
        s.health_check,
        HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: nz(2),
            fall: nz(3),
        }
    );
    assert_eq!(s.udp, None);
    assert_eq!(
        s.backends,
        vec![Backend {
            address: "127.0.0.1:9000".into(),
            addr: addr("127.0.0.1:9000"),
            weight: 100,
            max_connections: 0,
        }]
    );
}

#[test]
fn udp_defaults() {
    let cfg = load(
        "
services:
  - name: dns
    protocol: udp
    listen: [\"127.0.0.1:5353\"]
    backends:
      - address: 127.0.0.1:5354
",
    );
    let s = &cfg.services[0];
    assert_eq!(s.health_check.kind, CheckKind::None);
    assert_eq!(
        s.udp,
        Some(UdpSettings {
            mode: UdpMode::Session,
            session_timeout: Duration::from_secs(30),
            query_timeout: Duration::from_secs(2),
            max_sessions: 100_000,
        })
    );
}

#[test]
fn defaults_are_inherited_and_overridden() {
    let cfg = load(
        r#"
workers: 4
shutdown_timeout: 250ms
defaults:
  protocol: tcp
  balance: round_robin
  transfer: copy
  proxy_protocol: v1
  max_connections: 10
  connect_timeout: 1s
  connect_retries: 5
  idle_timeout: 1m
  access_log: true
  health_check: {kind: send_expect, send: "PING\r\n", expect: "+PONG", interval: 5s}
  udp: {mode: dns, query_timeout: 1500ms}
services:
  - name: inherits
    listen: ["127.0.0.1:8080"]
    backends: [{address: "127.0.0.1:9000"}]
  - name: overrides
    listen: ["127.0.0.1:8081"]
    balance: least_conn
    transfer: splice
    connect_timeout: 250ms
    access_log: false
    health_check: {interval: 3s}
    backends: [{address: "127.0.0.1:9001", weight: 7, max_connections: 3}]
  - name: udp-one
    protocol: udp
    listen: ["127.0.0.1:8080"]
    backends: [{address: "127.0.0.1:9002"}]
  - name: udp-own
    protocol: udp
    listen: ["127.0.0.1:8082"]
    udp: {max_sessions: 10}
    health_check: {kind: dns, query: "example.com a"}
    backends: [{address: "127.0.0.1:9003"}]
"#,
    );
    assert_eq!(
        cfg.workers,
        Workers::Count(std::num::NonZeroUsize::new(4).unwrap())
    );
    assert_eq!(cfg.shutdown_timeout, Duration::from_millis(250));

    let a = cfg.service("inherits").unwrap();
    assert_eq!(a.protocol, Protocol::Tcp);
    assert_eq!(a.balance, Balance::RoundRobin);
    assert_eq!(a.transfer, Transfer::Copy);
    assert_eq!(a.proxy_protocol, ProxyProtocol::V1);
    assert_eq!(a.max_connections, 10);
    assert_eq!(a.connect_timeout, Duration::from_secs(1));
    assert_eq!(a.connect_retries, 5);
    assert_eq!(a.idle_timeout, Duration::from_secs(60));
    assert!(a.access_log);
    assert_eq!(
        a.health_check.kind,
        CheckKind::SendExpect {
            send: b"PING\r\n".to_vec(),
            expect: b"+PONG".to_vec()
        }
    );
    assert_eq!(a.health_check.interval, Duration::from_secs(5));
    assert_eq!(a.health_check.timeout, Duration::from_secs(1));
    assert_eq!(a.udp, None, "udp: from defaults is for udp services only");

    let b = cfg.service("overrides").unwrap();
    assert_eq!(b.balance, Balance::LeastConn);
    assert_eq!(b.transfer, Transfer::Splice);
    assert_eq!(b.proxy_protocol, ProxyProtocol::V1);
    assert_eq!(b.connect_timeout, Duration::from_millis(250));
    assert!(!b.access_log);
    // Its own health_check block replaces the defaults' block whole: no
    // kind given, so the tcp default kind, with its own interval.
    assert_eq!(b.health_check.kind, CheckKind::Tcp);
    assert_eq!(b.health_check.interval, Duration::from_secs(3));
    assert_eq!(b.backends[0].weight, 7);
    assert_eq!(b.backends[0].max_connections, 3);

    // A udp service on the same port as a tcp one: no conflict. The tcp-only
    // defaults do not apply, the send_expect check does not fit a udp
    // service, the udp block does.
    let u = cfg.service("udp-one").unwrap();
    assert_eq!(u.protocol, Protocol::Udp);
    assert_eq!(u.transfer, Transfer::Auto);
    assert_eq!(u.proxy_protocol, ProxyProtocol::None);
    assert_eq!(u.health_check, HealthCheck::default_for(Protocol::Udp));
    let udp = u.udp.unwrap();
    assert_eq!(udp.mode, UdpMode::Dns);
    assert_eq!(udp.query_timeout, Duration::from_millis(1500));
    assert_eq!(udp.session_timeout, Duration::from_secs(30));

    let v = cfg.service("udp-own").unwrap();
    assert_eq!(v.udp.unwrap().max_sessions, 10);
    assert_eq!(
        v.udp.unwrap().mode,
        UdpMode::Session,
        "own udp block replaces the defaults' whole"
    );
    assert_eq!(
        v.health_check.kind,
        CheckKind::Dns(DnsQuery {
            name: "example.com.".into(),
            qtype: "A".into()
        })
    );
}

#[test]
fn default_timeout_follows_a_short_interval() {
    let cfg = load(&MINIMAL.replace(
        "    backends:",
        "    health_check: {interval: 500ms}\n    backends:",
    ));
    let hc = &cfg.services[0].health_check;
    assert_eq!(hc.interval, Duration::from_millis(500));
    assert_eq!(hc.timeout, Duration::from_millis(500));
}

#[test]
fn ipv6_and_host_names() {
    let cfg = load(
        r#"
admin:
  listen: "[::1]:9100"
services:
  - name: v6
    protocol: tcp
    listen: ["[::1]:8080", "[::]:8443", "0.0.0.0:8443", "localhost:8081"]
    backends:
      - address: "[::1]:9000"
      - address: localhost:9001
      - address: "[2001:db8::1]:443"
"#,
    );
    assert_eq!(cfg.admin.unwrap().listen, addr("[::1]:9100"));
    let s = &cfg.services[0];
    assert_eq!(s.listen[0], addr("[::1]:8080"));
    assert_eq!(s.listen[1], addr("[::]:8443"));
    assert_eq!(s.listen[2], addr("0.0.0.0:8443"));
    assert!(s.listen[3].ip().is_loopback());
    assert_eq!(s.listen[3].port(), 8081);
    assert_eq!(s.backends[0].addr, addr("[::1]:9000"));
    assert_eq!(s.backends[1].address, "localhost:9001");
    assert!(s.backends[1].addr.ip().is_loopback());
    assert_eq!(s.backends[1].addr.port(), 9001);
    assert_eq!(s.backends[2].addr, addr("[2001:db8::1]:443"));
}

#[test]
fn backends_are_unique_by_resolved_address() {
    let err = load_err(
        r#"
services:
  - name: web
    protocol: tcp
    listen: ["127.0.0.1:8080"]
    backends:
      - address: 127.0.0.1:9000
      - address: localhost:9000
"#,
    );
    // localhost may resolve to ::1 first; then it is not a duplicate.
    let cfg = load_str(&MINIMAL.replace("127.0.0.1:9000", "localhost:9000"), "x").unwrap();
    if cfg.services[0].backends[0].addr == addr("127.0.0.1:9000") {
        assert!(
            err.to_string().contains("duplicate backend 127.0.0.1:9000"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("(\"127.0.0.1:9000\" and \"localhost:9000\" are the same address)"),
            "{err}"
        );
    }
}

#[test]
fn error_line_format() {
    let text = "services:\n  - name: web\n    protocol: tcp\n    listen: [\"127.0.0.1:8080\"]\n    backends:\n      - address: 10.0.0.1\n";
    let err = load_str(text, "bad.yaml").unwrap_err();
    assert_eq!(err.kind(), LoadErrorKind::Invalid);
    assert_eq!(
        err.to_string(),
        "bad.yaml:6:18: services[0].backends[0].address: expected IP:port, [v6]:port or host:port, got \"10.0.0.1\" (the port is missing)"
    );
    let d = &err.diagnostics()[0];
    assert_eq!(d.file, "bad.yaml");
    assert_eq!((d.line, d.column), (Some(6), Some(18)));
    assert_eq!(d.path, "services[0].backends[0].address");

    fn is_error<E: std::error::Error + Send + Sync + 'static>(_: &E) {}
    is_error(&err);
}

#[test]
fn all_value_errors_of_a_file_are_reported() {
    let err = load_err(
        r#"
workers: 0
shutdown_timeout: 30
services:
  - name: Web
    protocol: tcp
    listen: ["127.0.0.1"]
    balance: fastest
    health_check: {interval: 0s, rise: 0}
    backends:
      - address: 127.0.0.1:9000
        weight: 0
      - address: 127.0.0.1:9000
  - name: dns
    protocol: udp
    listen: ["127.0.0.1:53"]
    transfer: splice
    backends: []
"#,
    );
    assert_eq!(err.kind(), LoadErrorKind::Invalid);
    let paths: Vec<&str> = err.diagnostics().iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "workers",
            "shutdown_timeout",
            "services[0].name",
            "services[0].listen[0]",
            "services[0].balance",
            "services[0].health_check.interval",
            "services[0].health_check.rise",
            "services[0].backends[0].weight",
            "services[0].backends[1].address",
            "services[1].transfer",
            "services[1].backends",
        ],
        "{err}"
    );
    // One line per diagnostic, in file order.
    assert_eq!(err.to_string().lines().count(), paths.len());
    let lines: Vec<usize> = err.diagnostics().iter().filter_map(|d| d.line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn type_errors_name_the_path() {
    let err =
        load_err("services:\n  - name: web\n    protocol: tcp\n    listen: \"127.0.0.1:80\"\n");
    assert_eq!(err.kind(), LoadErrorKind::Syntax);
    assert_eq!(
        err.to_string(),
        "test.yaml:4:13: services[0].listen: expected a list (`- item` lines or [a, b]), got a single value"
    );
    let err = load_err("services:\n  - name: {a: 1}\n");
    assert_eq!(
        err.to_string(),
        "test.yaml:2:11: services[0].name: expected a single value (text, a number, or true/false), got a mapping"
    );
    let err = load_err("- web\n");
    assert!(
        err.to_string()
            .starts_with("test.yaml:1:1: expected a mapping of top-level keys"),
        "{err}"
    );
}

#[test]
fn quoted_strings_keep_their_escapes() {
    let cfg = load(
        r#"
services:
  - name: redis
    protocol: tcp
    listen: ["127.0.0.1:6379"]
    health_check: {kind: send_expect, send: "PING\r\n", expect: '+PONG'}
    backends: [{address: "127.0.0.1:6380"}]
"#,
    );
    assert_eq!(
        cfg.services[0].health_check.kind,
        CheckKind::SendExpect {
            send: b"PING\r\n".to_vec(),
            expect: b"+PONG".to_vec()
        }
    );
}

// ---- pathological inputs ------------------------------------------------

fn only_line(err: &LoadError) -> String {
    assert_eq!(err.diagnostics().len(), 1, "{err}");
    let s = err.to_string();
    assert!(!s.contains('\n'));
    s
}

#[test]
fn empty_and_comment_only_files() {
    for text in [
        "",
        "\n\n",
        "   \t\n  \n",
        "# nothing here\n\n  # still nothing\n",
        "\u{feff}",
    ] {
        let err = load_err(text);
        assert_eq!(err.kind(), LoadErrorKind::Empty);
        let line = only_line(&err);
        assert!(line.starts_with("test.yaml: empty configuration"), "{line}");
    }
}

#[test]
fn binary_and_non_utf8_files() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin.yaml");
    std::fs::write(&bin, b"services:\n\x00\x01\x02\xff\xfe").unwrap();
    let err = load_file(&bin).unwrap_err();
    assert_eq!(err.kind(), LoadErrorKind::NotText);
    assert_eq!(
        only_line(&err),
        format!(
            "{}: not a text file: it contains NUL bytes (binary data), expected YAML",
            bin.display()
        )
    );

    let latin1 = dir.path().join("latin1.yaml");
    std::fs::write(&latin1, b"services:\n  - name: caf\xe9\n").unwrap();
    let err = load_file(&latin1).unwrap_err();
    assert_eq!(err.kind(), LoadErrorKind::NotText);
    assert_eq!(
        only_line(&err),
        format!(
            "{}:2:14: not UTF-8 text: invalid byte 0xe9; save the file as UTF-8",
            latin1.display()
        )
    );

    let err = load_err("services:\0\n");
    assert_eq!(err.kind(), LoadErrorKind::NotText);
}

/// A deterministic pseudo-random byte stream (no RNG dependency needed).
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn ten_megabytes_of_garbage_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.yaml");
    std::fs::write(&path, garbage(10 * 1024 * 1024, 0x9e37_79b9_7f4a_7c15)).unwrap();
    let start = Instant::now();
    let err = load_file(&path).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(err.kind(), LoadErrorKind::TooLarge);
    assert_eq!(
        only_line(&err),
        format!(
            "{}: file too large: 10485760 bytes, a configuration may be at most 1048576 bytes (1 MiB)",
            path.display()
        )
    );
    // The same text handed over in memory is refused as well.
    let text = String::from_utf8_lossy(&garbage(2 * 1024 * 1024, 7)).into_owned();
    assert_eq!(
        load_str(&text, "x").unwrap_err().kind(),
        LoadErrorKind::TooLarge
    );
}

#[test]
fn a_megabyte_of_text_garbage_fails_fast() {
    // Printable garbage just under the size limit reaches the parser.
    let chars = b"ab: -[]{}#'\"\n\t&*!|>%@`,?";
    let text: String = garbage(1024 * 1024 - 1, 42)
        .into_iter()
        .map(|b| chars[usize::from(b) % chars.len()] as char)
        .collect();
    let start = Instant::now();
    let err = load_str(&text, "g.yaml").unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    let line = only_line(&err);
    assert!(line.starts_with("g.yaml:"), "{line}");
}

#[test]
fn a_megabyte_of_tiny_nodes_fails_fast() {
    // Valid YAML, just below 1 MiB, with ~250k nodes: over the node limit.
    let mut text = String::from("defaults:\n  backends: [");
    while text.len() < 1024 * 1024 - 16 {
        text.push_str("1,");
    }
    text.push_str("1]\n");
    let start = Instant::now();
    let err = load_str(&text, "n.yaml").unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(only_line(&err).contains("too many YAML nodes"), "{err}");
}

#[test]
fn alias_bomb_fails_fast() {
    // "Billion laughs": each level repeats the previous one nine times.
    let mut text =
        String::from("defaults:\n  backends:\n    a0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(",");
        text.push_str(&format!("    a{i}: &a{i} [{refs}]\n"));
    }
    text.push_str("services: [{name: x, protocol: tcp, listen: [\"127.0.0.1:1\"], backends: [{address: \"127.0.0.1:2\"}]}]\n");
    let start = Instant::now();
    let err = load_err(&text);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(err.kind(), LoadErrorKind::Syntax);
    let line = only_line(&err);
    assert!(line.contains("alias bomb"), "{line}");
    assert!(line.starts_with("test.yaml:"), "{line}");

    // Aliases in a place where they are legitimately used still work.
    let cfg = load(
        "
defaults:
  health_check: &hc {kind: tcp, interval: 1s}
services:
  - name: a
    protocol: tcp
    listen: [\"127.0.0.1:8080\"]
    health_check: *hc
    backends: [{address: \"127.0.0.1:9000\"}]
",
    );
    assert_eq!(
        cfg.services[0].health_check.interval,
        Duration::from_secs(1)
    );

    // Merge keys copy a whole service.
    let cfg = load(
        "
services:
  - &web
    name: web
    protocol: tcp
    listen: [\"127.0.0.1:8080\"]
    connect_timeout: 1h30m
    backends: [{address: \"127.0.0.1:9000\", weight: 0x64}]
  - <<: *web
    name: web2
    listen: [\"127.0.0.1:8081\"]
",
    );
    assert_eq!(cfg.services[1].name, "web2");
    assert_eq!(cfg.services[1].connect_timeout, Duration::from_secs(5400));
    assert_eq!(cfg.services[1].backends, cfg.services[0].backends);
    assert_eq!(cfg.services[1].backends[0].weight, 100);
}

#[test]
fn deep_nesting_fails() {
    let text = format!(
        "defaults:\n  backends: {}{}\n",
        "[".repeat(100),
        "]".repeat(100)
    );
    let err = load_err(&text);
    let line = only_line(&err);
    assert!(line.starts_with("test.yaml:2:"), "{line}");
}

#[test]
fn missing_file() {
    let err = load_file(std::path::Path::new("/x/y.yaml")).unwrap_err();
    assert_eq!(err.kind(), LoadErrorKind::Read);
    assert_eq!(
        only_line(&err),
        "/x/y.yaml: cannot read: No such file or directory (os error 2)"
    );
}

#[test]
fn directory_and_devices() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_file(dir.path()).unwrap_err();
    assert_eq!(err.kind(), LoadErrorKind::Read);
    assert_eq!(
        only_line(&err),
        format!(
            "{}: cannot read: is a directory, not a configuration file",
            dir.path().display()
        )
    );
    // An endless device is refused before it is opened, so nothing hangs.
    let start = Instant::now();
    let err = load_file(std::path::Path::new("/dev/zero")).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(
        only_line(&err),
        "/dev/zero: cannot read: not a regular file (a device, FIFO or socket)"
    );
}

#[test]
fn a_file_on_disk_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.yaml");
    std::fs::write(&path, MINIMAL).unwrap();
    let cfg = load_file(&path).unwrap();
    assert_eq!(cfg, load(MINIMAL));
}
