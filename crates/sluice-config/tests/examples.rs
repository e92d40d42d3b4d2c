//! Every example configuration in `configs/` loads, and uses only loopback
//! addresses. New files there are covered automatically.

use std::path::PathBuf;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .canonicalize()
        .expect("configs dir")
}

#[test]
fn every_example_config_loads() {
    let mut seen = 0;
    let mut entries: Vec<_> = std::fs::read_dir(configs_dir())
        .expect("configs/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    entries.sort();
    for path in entries {
        let cfg = match sluice_config::load_file(&path) {
            Ok(cfg) => cfg,
            Err(e) => panic!("{} does not load:\n{e}", path.display()),
        };
        assert!(!cfg.services.is_empty(), "{}", path.display());
        for s in &cfg.services {
            for a in &s.listen {
                assert!(
                    a.ip().is_loopback(),
                    "{}: {} listens on {a}",
                    path.display(),
                    s.name
                );
            }
            for b in &s.backends {
                assert!(
                    b.addr.ip().is_loopback(),
                    "{}: backend {}",
                    path.display(),
                    b.address
                );
            }
        }
        if let Some(admin) = &cfg.admin {
            assert!(admin.listen.ip().is_loopback());
        }
        // The summary names every service and every backend.
        let summary = sluice_config::summary(&cfg);
        for s in &cfg.services {
            assert!(
                summary.contains(&format!("service {}:", s.name)),
                "{summary}"
            );
            for b in &s.backends {
                assert!(summary.contains(&b.address), "{summary}");
            }
        }
        // A config diffed against itself is empty.
        assert!(sluice_config::diff(&cfg, &cfg).is_empty());
        seen += 1;
    }
    for required in [
        "minimal.yaml",
        "full.yaml",
        "tcp-maglev.yaml",
        "dns-fanout.yaml",
    ] {
        assert!(
            configs_dir().join(required).is_file(),
            "configs/{required} is missing"
        );
    }
    assert!(seen >= 4, "only {seen} example configs");
}

/// `full.yaml` is documented as writing every key: make sure it really sets
/// each one somewhere (so a key added to the raw structs without an example
/// fails this test).
#[test]
fn full_yaml_writes_every_key() {
    let text = std::fs::read_to_string(configs_dir().join("full.yaml")).expect("full.yaml");
    let keys = [
        "workers:",
        "admin:",
        "listen:",
        "shutdown_timeout:",
        "defaults:",
        "services:",
        "name:",
        "protocol:",
        "balance:",
        "transfer:",
        "proxy_protocol:",
        "max_connections:",
        "connect_timeout:",
        "connect_retries:",
        "idle_timeout:",
        "access_log:",
        "health_check:",
        "kind:",
        "interval:",
        "timeout:",
        "rise:",
        "fall:",
        "send:",
        "expect:",
        "query:",
        "udp:",
        "mode:",
        "session_timeout:",
        "query_timeout:",
        "max_sessions:",
        "backends:",
        "address:",
        "weight:",
    ];
    for key in keys {
        let used = text
            .lines()
            .map(|l| l.trim_start().trim_start_matches("- "))
            .any(|l| l.starts_with(key));
        assert!(used, "full.yaml does not set `{key}`");
    }
}
