//! The short text `sluice check` prints for a valid configuration.

use std::fmt::Write as _;

use humantime::format_duration;

use crate::model::*;

/// One header line, then one line per service (name, protocol, balance,
/// listeners, backend count) followed by its backends, indented.
///
/// ```text
/// workers auto, admin 127.0.0.1:9100, shutdown_timeout 30s, 2 services
/// service web: tcp, maglev, listen 0.0.0.0:8443 [::]:8443, 2 backends, check tcp every 2s
///   10.0.0.1:443  weight 100
///   app2.internal:443 = 10.0.0.2:443  weight 100  max_connections 500
/// ```
pub fn summary(cfg: &Config) -> String {
    let mut out = String::new();
    let admin = cfg
        .admin
        .as_ref()
        .map_or("none".to_owned(), |a| a.listen.to_string());
    let _ = writeln!(
        out,
        "workers {}, admin {admin}, shutdown_timeout {}, {} service{}",
        cfg.workers,
        format_duration(cfg.shutdown_timeout),
        cfg.services.len(),
        plural(cfg.services.len())
    );
    for s in &cfg.services {
        let listen: Vec<String> = s.listen.iter().map(|a| a.to_string()).collect();
        let check = match s.health_check.kind {
            CheckKind::None => "no check".to_owned(),
            _ => format!(
                "check {} every {}",
                s.health_check.kind.name(),
                format_duration(s.health_check.interval)
            ),
        };
        let mode = s
            .udp
            .map(|u| format!(", {} mode", u.mode))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "service {}: {}{mode}, {}, listen {}, {} backend{}, {check}",
            s.name,
            s.protocol,
            s.balance,
            listen.join(" "),
            s.backends.len(),
            plural(s.backends.len())
        );
        for b in &s.backends {
            let resolved = b.addr.to_string();
            let shown = if b.address == resolved {
                resolved
            } else {
                format!("{} = {resolved}", b.address)
            };
            let limit = if b.max_connections > 0 {
                format!("  max_connections {}", b.max_connections)
            } else {
                String::new()
            };
            let _ = writeln!(out, "  {shown}  weight {}{limit}", b.weight);
        }
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
