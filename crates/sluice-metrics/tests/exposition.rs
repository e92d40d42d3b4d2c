//! The encoded exposition against SPEC.md's metric table: names, types,
//! labels and exact values for a hand-built scenario, and `promtool check
//! metrics` on the real output.
//!
//! `SLUICE_REQUIRE_PROMTOOL=1` turns a missing `promtool` into a failure
//! (CI); without it the promtool test says it was skipped.
//!
//! Not built with the `counters-off` feature (a benchmarking switch that
//! keeps every per-core counter at 0).
#![cfg(not(feature = "counters-off"))]

use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sluice_metrics::names;
use sluice_metrics::{encode, BackendMetrics, GlobalMetrics, ServiceMetrics};

const CORES: usize = 3;

struct Scenario {
    global: GlobalMetrics,
    services: Vec<Arc<ServiceMetrics>>,
    backends: Vec<Arc<BackendMetrics>>,
}

impl Scenario {
    fn text(&self) -> String {
        encode(&self.global, &self.services, &self.backends)
    }
}

/// Two services (`web` over TCP, `dns` over UDP), three backends, known
/// counts spread over the cores.
fn scenario() -> Scenario {
    let global = GlobalMetrics::default();
    global.record_reload(true);
    global.record_reload(true);
    global.record_reload(false);

    let web = Arc::new(ServiceMetrics::new("web", CORES));
    web.no_backend.inc(1);
    web.no_backend.add(2, 2);

    let dns = Arc::new(ServiceMetrics::new("dns", CORES));
    dns.no_backend.add(0, 2);
    dns.udp_to_backend.add(0, 60);
    dns.udp_to_backend.add(2, 40);
    dns.udp_to_client.add(1, 98);
    dns.udp_dropped.add(2, 2);
    dns.udp_sessions.add(0, 5);
    dns.udp_sessions.add(1, -1);
    dns.dns_answered.add(0, 97);
    dns.dns_timeout.add(1, 2);
    dns.dns_orphan_reply.inc(2);

    let w1 = Arc::new(BackendMetrics::new("web", "10.0.0.1:443", CORES));
    for _ in 0..3 {
        w1.connections.inc(0);
    }
    w1.connections.add(2, 4);
    w1.active.add(0, 2);
    w1.active.add(2, -1);
    w1.bytes_to_backend.add(1, 1000);
    w1.bytes_to_backend.add(2, 24);
    w1.bytes_to_client.add(0, 4096);
    w1.connect_errors.inc(1);
    w1.connect_duration.observe_nanos(0, 50_000); // 50 µs
    w1.connect_duration.observe_nanos(1, 300_000); // 300 µs
    w1.connect_duration.observe_nanos(2, 2_000_000); // 2 ms
    w1.connect_duration.observe_nanos(0, 2_000_000_000); // 2 s, only +Inf
    w1.checks_pass.store(10, Ordering::Relaxed);

    let w2 = Arc::new(BackendMetrics::new("web", "10.0.0.2:443", CORES));
    w2.up.store(false, Ordering::Relaxed);
    w2.checks_pass.store(3, Ordering::Relaxed);
    w2.checks_fail.store(5, Ordering::Relaxed);
    w2.connect_errors.add(0, 2);

    let d1 = Arc::new(BackendMetrics::new("dns", "[2001:db8::1]:53", CORES));
    d1.checks_pass.store(1, Ordering::Relaxed);

    Scenario {
        global,
        services: vec![web, dns],
        backends: vec![w1, w2, d1],
    }
}

fn metric_type(name: &str) -> &'static str {
    match name {
        names::ACTIVE_CONNECTIONS | names::BACKEND_UP | names::UDP_SESSIONS => "gauge",
        names::CONNECT_DURATION_SECONDS => "histogram",
        _ => "counter",
    }
}

#[test]
fn every_spec_family_has_help_and_type_once() {
    for text in [
        scenario().text(),
        encode(&GlobalMetrics::default(), &[], &[]),
    ] {
        for name in names::ALL {
            let help = format!("# HELP {name} ");
            let ty = format!("# TYPE {name} {}\n", metric_type(name));
            assert_eq!(text.matches(&help).count(), 1, "HELP for {name}:\n{text}");
            assert_eq!(text.matches(&ty).count(), 1, "TYPE for {name}:\n{text}");
        }
        assert_eq!(text.matches("# TYPE ").count(), names::ALL.len(), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
    }
}

#[test]
fn counter_names_end_in_total_and_others_do_not() {
    for name in names::ALL {
        assert_eq!(
            name.ends_with("_total"),
            metric_type(name) == "counter",
            "{name}"
        );
        assert!(name.starts_with("sluice_"), "{name}");
    }
}

#[test]
fn empty_exposition_has_only_reload_samples() {
    let text = encode(&GlobalMetrics::default(), &[], &[]);
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        samples,
        [
            "sluice_config_reloads_total{result=\"success\"} 0",
            "sluice_config_reloads_total{result=\"failure\"} 0",
        ],
        "{text}"
    );
}

#[test]
fn scenario_values_are_exact() {
    let text = scenario().text();
    let expected = [
        // per backend
        r#"sluice_connections_total{service="web",backend="10.0.0.1:443"} 7"#,
        r#"sluice_connections_total{service="web",backend="10.0.0.2:443"} 0"#,
        r#"sluice_connections_total{service="dns",backend="[2001:db8::1]:53"} 0"#,
        r#"sluice_active_connections{service="web",backend="10.0.0.1:443"} 1"#,
        r#"sluice_active_connections{service="web",backend="10.0.0.2:443"} 0"#,
        r#"sluice_bytes_total{service="web",backend="10.0.0.1:443",direction="to_backend"} 1024"#,
        r#"sluice_bytes_total{service="web",backend="10.0.0.1:443",direction="to_client"} 4096"#,
        r#"sluice_bytes_total{service="web",backend="10.0.0.2:443",direction="to_client"} 0"#,
        r#"sluice_connect_errors_total{service="web",backend="10.0.0.1:443"} 1"#,
        r#"sluice_connect_errors_total{service="web",backend="10.0.0.2:443"} 2"#,
        r#"sluice_backend_up{service="web",backend="10.0.0.1:443"} 1"#,
        r#"sluice_backend_up{service="web",backend="10.0.0.2:443"} 0"#,
        r#"sluice_backend_up{service="dns",backend="[2001:db8::1]:53"} 1"#,
        r#"sluice_health_checks_total{service="web",backend="10.0.0.1:443",result="pass"} 10"#,
        r#"sluice_health_checks_total{service="web",backend="10.0.0.1:443",result="fail"} 0"#,
        r#"sluice_health_checks_total{service="web",backend="10.0.0.2:443",result="pass"} 3"#,
        r#"sluice_health_checks_total{service="web",backend="10.0.0.2:443",result="fail"} 5"#,
        r#"sluice_health_checks_total{service="dns",backend="[2001:db8::1]:53",result="pass"} 1"#,
        // histogram: cumulative buckets, _count = observations, _sum in seconds
        r#"sluice_connect_duration_seconds_sum{service="web",backend="10.0.0.1:443"} 2.00235"#,
        r#"sluice_connect_duration_seconds_count{service="web",backend="10.0.0.1:443"} 4"#,
        r#"sluice_connect_duration_seconds_bucket{le="0.0001",service="web",backend="10.0.0.1:443"} 1"#,
        r#"sluice_connect_duration_seconds_bucket{le="0.00025",service="web",backend="10.0.0.1:443"} 1"#,
        r#"sluice_connect_duration_seconds_bucket{le="0.0005",service="web",backend="10.0.0.1:443"} 2"#,
        r#"sluice_connect_duration_seconds_bucket{le="0.001",service="web",backend="10.0.0.1:443"} 2"#,
        r#"sluice_connect_duration_seconds_bucket{le="0.0025",service="web",backend="10.0.0.1:443"} 3"#,
        r#"sluice_connect_duration_seconds_bucket{le="1.0",service="web",backend="10.0.0.1:443"} 3"#,
        r#"sluice_connect_duration_seconds_bucket{le="+Inf",service="web",backend="10.0.0.1:443"} 4"#,
        r#"sluice_connect_duration_seconds_sum{service="web",backend="10.0.0.2:443"} 0.0"#,
        r#"sluice_connect_duration_seconds_count{service="web",backend="10.0.0.2:443"} 0"#,
        r#"sluice_connect_duration_seconds_bucket{le="+Inf",service="web",backend="10.0.0.2:443"} 0"#,
        // per service
        r#"sluice_no_backend_total{service="web"} 3"#,
        r#"sluice_no_backend_total{service="dns"} 2"#,
        r#"sluice_udp_datagrams_total{service="dns",direction="to_backend"} 100"#,
        r#"sluice_udp_datagrams_total{service="dns",direction="to_client"} 98"#,
        r#"sluice_udp_datagrams_total{service="dns",direction="dropped"} 2"#,
        r#"sluice_udp_datagrams_total{service="web",direction="to_backend"} 0"#,
        r#"sluice_udp_sessions{service="dns"} 4"#,
        r#"sluice_udp_sessions{service="web"} 0"#,
        r#"sluice_dns_queries_total{service="dns",result="answered"} 97"#,
        r#"sluice_dns_queries_total{service="dns",result="timeout"} 2"#,
        r#"sluice_dns_queries_total{service="dns",result="orphan_reply"} 1"#,
        // process
        r#"sluice_config_reloads_total{result="success"} 2"#,
        r#"sluice_config_reloads_total{result="failure"} 1"#,
    ];
    let lines: Vec<&str> = text.lines().collect();
    for want in expected {
        assert!(lines.contains(&want), "missing line\n  {want}\nin\n{text}");
    }
    // 3 backends x (1+1+2+1+1+2) scalar samples, 3 x (2 + 13) histogram
    // lines, 2 services x (1+3+1+3) samples, 2 reload samples.
    let samples = lines.iter().filter(|l| !l.starts_with('#')).count();
    assert_eq!(samples, 3 * 8 + 3 * 15 + 2 * 8 + 2, "{text}");
}

#[test]
fn histogram_buckets_are_cumulative_and_end_with_count() {
    let text = scenario().text();
    let prefix = "sluice_connect_duration_seconds_bucket{";
    let series = r#"service="web",backend="10.0.0.1:443"}"#;
    let values: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(series))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(values.len(), sluice_metrics::CONNECT_BUCKETS.len() + 1);
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    assert_eq!(values.last(), Some(&4));
}

#[test]
fn each_family_is_contiguous() {
    // The text format requires a family's samples to follow its TYPE line
    // without interleaving.
    let text = scenario().text();
    let mut seen: Vec<&str> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = names::ALL
            .iter()
            .find(|f| {
                name == **f
                    || (**f == names::CONNECT_DURATION_SECONDS
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|sfx| name.strip_suffix(sfx) == Some(f)))
            })
            .unwrap_or_else(|| panic!("sample {line} belongs to no SPEC family"));
        if seen.last() != Some(family) {
            assert!(!seen.contains(family), "{family} split:\n{text}");
            seen.push(family);
        }
    }
    assert_eq!(seen, names::ALL);
}

// ---- promtool --------------------------------------------------------------

fn temp_file(tag: &str, text: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("sluice-metrics-{}-{tag}.prom", std::process::id()));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// `promtool check metrics < file`; `None` when promtool is not installed.
fn promtool_check(tag: &str, text: &str) -> Option<(bool, String)> {
    let path = temp_file(tag, text);
    let stdin = std::fs::File::open(&path).unwrap();
    let run = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::from(stdin))
        .output();
    let _ = std::fs::remove_file(&path);
    match run {
        Ok(out) => {
            let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
            report.push_str(&String::from_utf8_lossy(&out.stderr));
            Some((out.status.success(), report))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("running promtool: {e}"),
    }
}

/// Runs `promtool check metrics` on `text`. `None` means promtool is
/// missing and the caller should skip (printing why); with
/// `SLUICE_REQUIRE_PROMTOOL=1` a missing promtool panics instead.
fn promtool_or_skip(tag: &str, text: &str) -> Option<(bool, String)> {
    let result = promtool_check(tag, text);
    if result.is_none() {
        if std::env::var("SLUICE_REQUIRE_PROMTOOL").as_deref() == Ok("1") {
            panic!(
                "SLUICE_REQUIRE_PROMTOOL=1 but `promtool` is not on PATH; \
                 install it (Debian: apt-get install prometheus) or unset the variable"
            );
        }
        println!(
            "SKIPPED promtool check ({tag}): `promtool` not on PATH \
             (set SLUICE_REQUIRE_PROMTOOL=1 to make this a failure)"
        );
    }
    result
}

#[test]
fn promtool_accepts_the_exposition_lint_clean() {
    let cases = [
        ("empty", encode(&GlobalMetrics::default(), &[], &[])),
        ("scenario", scenario().text()),
    ];
    for (tag, text) in cases {
        let Some((ok, report)) = promtool_or_skip(tag, &text) else {
            return;
        };
        assert!(
            ok && report.trim().is_empty(),
            "promtool check metrics rejected the {tag} exposition:\n{report}\n--- text ---\n{text}"
        );
    }
}

/// Guards the test above against passing vacuously: the OpenMetrics shape
/// prometheus-client's own counter encoder produces (family `x`, sample
/// `x_total`) is what promtool's linter rejects, and the check must see it.
#[test]
fn promtool_check_detects_openmetrics_style_counters() {
    let text = "# HELP sluice_connections Connections.\n\
                # TYPE sluice_connections counter\n\
                sluice_connections_total{service=\"web\"} 1\n";
    let Some((ok, report)) = promtool_or_skip("negative", text) else {
        return;
    };
    assert!(
        !ok && !report.trim().is_empty(),
        "promtool accepted:\n{text}\nreport: {report}"
    );
}
