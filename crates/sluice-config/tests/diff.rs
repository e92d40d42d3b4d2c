//! The reload diff.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_config::*;

const BASE: &str = r#"
workers: auto
admin:
  listen: 127.0.0.1:9100
shutdown_timeout: 30s
services:
  - name: web
    protocol: tcp
    listen: ["127.0.0.1:8080"]
    balance: maglev
    backends:
      - address: 127.0.0.1:9001
        weight: 100
      - address: 127.0.0.1:9002
        weight: 100
  - name: dns
    protocol: udp
    listen: ["127.0.0.1:5353"]
    udp: {mode: dns}
    backends:
      - address: 127.0.0.1:5354
"#;

fn load(text: &str) -> Config {
    load_str(text, "t.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn diff_with(edit: impl Fn(&str) -> String) -> ConfigDiff {
    let old = load(BASE);
    let new_text = edit(BASE);
    assert_ne!(new_text, BASE, "the edit changed nothing");
    diff(&old, &load(&new_text))
}

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn identical_configs_give_an_empty_diff() {
    let d = diff(&load(BASE), &load(BASE));
    assert!(d.is_empty());
    assert_eq!(d, ConfigDiff::default());
    assert_eq!(d.to_string(), "no changes");
    // Formatting differences that do not change the model are no change.
    let reformatted = BASE
        .replace("weight: 100", "weight: 0100")
        .replace("30s", "30000ms");
    assert!(diff(&load(BASE), &load(&reformatted)).is_empty());
}

#[test]
fn service_added_and_removed() {
    let d = diff_with(|t| {
        t.replace("- name: dns", "- name: resolver").to_owned()
            + "  - name: extra\n    protocol: tcp\n    listen: [\"127.0.0.1:8081\"]\n    backends: [{address: \"127.0.0.1:9100\"}]\n"
    });
    assert_eq!(d.services_added, ["resolver", "extra"]);
    assert_eq!(d.services_removed, ["dns"]);
    assert!(d.services_changed.is_empty());
    assert!(d.restart_required.is_empty());
    assert_eq!(
        d.to_string(),
        "service dns: removed\nservice resolver: added\nservice extra: added"
    );
}

#[test]
fn backend_added_removed_and_reweighted() {
    let d = diff_with(|t| {
        t.replace(
            "127.0.0.1:9002\n        weight: 100",
            "127.0.0.1:9003\n        weight: 100",
        )
        .replace(
            "127.0.0.1:9001\n        weight: 100",
            "127.0.0.1:9001\n        weight: 250",
        )
    });
    let s = d.service("web").expect("web changed");
    assert_eq!(s.backends_removed, [a("127.0.0.1:9002")]);
    assert_eq!(s.backends_added.len(), 1);
    assert_eq!(s.backends_added[0].addr, a("127.0.0.1:9003"));
    assert_eq!(
        s.backends_reweighted,
        [WeightChange {
            addr: a("127.0.0.1:9001"),
            old: 100,
            new: 250
        }]
    );
    assert!(s.listeners_added.is_empty() && s.listeners_removed.is_empty());
    assert_eq!(s.balance, None);
    assert_eq!(s.health_check, None);
    assert!(s.settings.is_empty());
    assert_eq!(d.services_changed.len(), 1, "dns did not change");
    assert_eq!(
        d.to_string(),
        "service web: backend removed 127.0.0.1:9002\n\
         service web: backend added 127.0.0.1:9003 weight 100\n\
         service web: backend 127.0.0.1:9001 weight 100 -> 250"
    );
}

#[test]
fn backends_are_matched_by_resolved_address() {
    // Reordering backends is no change.
    let old = load(BASE);
    let swapped = BASE
        .replace("127.0.0.1:9001", "TMP")
        .replace("127.0.0.1:9002", "127.0.0.1:9001")
        .replace("TMP", "127.0.0.1:9002");
    assert!(diff(&old, &load(&swapped)).is_empty());
}

#[test]
fn backend_limit_change() {
    let d = diff_with(|t| {
        t.replace(
            "weight: 100\n  - name: dns",
            "weight: 100\n        max_connections: 5\n  - name: dns",
        )
    });
    let s = d.service("web").unwrap();
    assert_eq!(
        s.backends_limit_changed,
        [LimitChange {
            addr: a("127.0.0.1:9002"),
            old: 0,
            new: 5
        }]
    );
    assert!(s.backends_reweighted.is_empty());
}

#[test]
fn algorithm_change() {
    let d = diff_with(|t| t.replace("balance: maglev", "balance: least_conn"));
    let s = d.service("web").unwrap();
    assert_eq!(s.balance, Some((Balance::Maglev, Balance::LeastConn)));
    assert_eq!(d.to_string(), "service web: balance maglev -> least_conn");
}

#[test]
fn health_check_change() {
    let d = diff_with(|t| {
        t.replace(
            "    balance: maglev\n",
            "    balance: maglev\n    health_check: {kind: tcp, interval: 5s}\n",
        )
    });
    let s = d.service("web").unwrap();
    let (old, new) = s.health_check.clone().unwrap();
    assert_eq!(old.interval, Duration::from_secs(2));
    assert_eq!(new.interval, Duration::from_secs(5));
    assert_eq!(
        d.to_string(),
        "service web: health_check tcp every 2s, timeout 1s, rise 2, fall 3 -> tcp every 5s, timeout 1s, rise 2, fall 3"
    );
}

#[test]
fn listener_change() {
    let d = diff_with(|t| {
        t.replace(
            "[\"127.0.0.1:8080\"]",
            "[\"127.0.0.1:8081\", \"[::1]:8080\"]",
        )
    });
    let s = d.service("web").unwrap();
    assert_eq!(s.listeners_added, [a("127.0.0.1:8081"), a("[::1]:8080")]);
    assert_eq!(s.listeners_removed, [a("127.0.0.1:8080")]);
    assert_eq!(
        d.to_string(),
        "service web: listener removed 127.0.0.1:8080\n\
         service web: listener added 127.0.0.1:8081\n\
         service web: listener added [::1]:8080"
    );
}

#[test]
fn other_settings() {
    let d = diff_with(|t| {
        t.replace(
            "    balance: maglev\n",
            "    balance: maglev\n    connect_timeout: 1s\n    transfer: splice\n    access_log: true\n",
        )
        .replace("udp: {mode: dns}", "udp: {mode: session}")
    });
    let web = d.service("web").unwrap();
    let keys: Vec<_> = web
        .settings
        .iter()
        .map(|s| (s.key, s.old.as_str(), s.new.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("transfer", "auto", "splice"),
            ("connect_timeout", "3s", "1s"),
            ("access_log", "false", "true"),
        ]
    );
    let dns = d.service("dns").unwrap();
    assert_eq!(dns.settings.len(), 1);
    assert_eq!(dns.settings[0].key, "udp");
    assert!(!dns.protocol_changed());
}

#[test]
fn protocol_change() {
    let d = diff_with(|t| {
        t.replace(
            "protocol: udp\n    listen: [\"127.0.0.1:5353\"]\n    udp: {mode: dns}\n",
            "protocol: tcp\n    listen: [\"127.0.0.1:5353\"]\n",
        )
    });
    let dns = d.service("dns").unwrap();
    assert!(dns.protocol_changed());
    assert!(dns
        .settings
        .iter()
        .any(|s| s.key == "udp" && s.new == "none"));
    // kind none (udp default) -> tcp (tcp default)
    assert!(dns.health_check.is_some());
}

#[test]
fn workers_needs_a_restart() {
    let d = diff_with(|t| t.replace("workers: auto", "workers: 4"));
    assert!(!d.is_empty());
    assert_eq!(
        d.restart_required,
        ["workers changed from auto to 4: restart sluice to apply it"]
    );
    assert!(d.services_changed.is_empty());
    assert_eq!(
        d.to_string(),
        "restart required: workers changed from auto to 4: restart sluice to apply it"
    );
}

#[test]
fn admin_and_shutdown_timeout() {
    let d = diff_with(|t| {
        t.replace("127.0.0.1:9100", "127.0.0.1:9200")
            .replace("30s", "5s")
    });
    let (old, new) = d.admin.clone().unwrap();
    assert_eq!(old.unwrap().listen, a("127.0.0.1:9100"));
    assert_eq!(new.unwrap().listen, a("127.0.0.1:9200"));
    assert_eq!(
        d.shutdown_timeout,
        Some((Duration::from_secs(30), Duration::from_secs(5)))
    );
    assert_eq!(
        d.to_string(),
        "admin.listen: 127.0.0.1:9100 -> 127.0.0.1:9200\nshutdown_timeout: 30s -> 5s"
    );
    let d = diff_with(|t| t.replace("admin:\n  listen: 127.0.0.1:9100\n", ""));
    assert_eq!(d.to_string(), "admin.listen: 127.0.0.1:9100 -> none");
}

#[test]
fn summary_lists_services_and_backends() {
    let s = summary(&load(BASE));
    assert_eq!(
        s,
        "workers auto, admin 127.0.0.1:9100, shutdown_timeout 30s, 2 services\n\
         service web: tcp, maglev, listen 127.0.0.1:8080, 2 backends, check tcp every 2s\n\
         \x20 127.0.0.1:9001  weight 100\n\
         \x20 127.0.0.1:9002  weight 100\n\
         service dns: udp, dns mode, maglev, listen 127.0.0.1:5353, 1 backend, no check\n\
         \x20 127.0.0.1:5354  weight 100\n"
    );
}
