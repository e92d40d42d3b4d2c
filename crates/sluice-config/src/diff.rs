//! The reload diff: what changed between the running [`Config`] and a new
//! one, as a list of changes the control thread can apply live, plus what
//! needs a restart.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use humantime::format_duration;

use crate::model::*;

/// Everything that differs between two configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Names of services only in the new config, in its order.
    pub services_added: Vec<String>,
    /// Names of services only in the old config, in its order.
    pub services_removed: Vec<String>,
    /// Services in both whose settings differ, in the new config's order.
    pub services_changed: Vec<ServiceDiff>,
    /// `Some((old, new))` when the admin endpoint changed (added, removed or
    /// moved).
    pub admin: Option<(Option<Admin>, Option<Admin>)>,
    /// `Some((old, new))` when `shutdown_timeout` changed.
    pub shutdown_timeout: Option<(Duration, Duration)>,
    /// Human sentences for changes that only take effect after a restart
    /// (`workers`). The rest of the diff can still be applied.
    pub restart_required: Vec<String>,
}

/// How one service (same name in both configs) changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceDiff {
    pub name: String,
    pub listeners_added: Vec<SocketAddr>,
    pub listeners_removed: Vec<SocketAddr>,
    /// New backends (by resolved address), as in the new config.
    pub backends_added: Vec<Backend>,
    /// Resolved addresses of backends that are gone.
    pub backends_removed: Vec<SocketAddr>,
    /// Backends in both whose weight changed.
    pub backends_reweighted: Vec<WeightChange>,
    /// Backends in both whose `max_connections` changed.
    pub backends_limit_changed: Vec<LimitChange>,
    /// `Some((old, new))` when `balance` changed.
    pub balance: Option<(Balance, Balance)>,
    /// `Some((old, new))` when the health check changed in any way.
    pub health_check: Option<(HealthCheck, HealthCheck)>,
    /// Other settings: protocol, transfer, proxy_protocol, max_connections,
    /// connect_timeout, connect_retries, idle_timeout, access_log, udp.
    pub settings: Vec<SettingChange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightChange {
    pub addr: SocketAddr,
    pub old: u32,
    pub new: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitChange {
    pub addr: SocketAddr,
    pub old: u32,
    pub new: u32,
}

/// One changed setting, with both values as written in YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingChange {
    /// The key, like `connect_timeout` or `udp.session_timeout`.
    pub key: &'static str,
    pub old: String,
    pub new: String,
}

impl ConfigDiff {
    /// No change at all.
    pub fn is_empty(&self) -> bool {
        self.services_added.is_empty()
            && self.services_removed.is_empty()
            && self.services_changed.is_empty()
            && self.admin.is_none()
            && self.shutdown_timeout.is_none()
            && self.restart_required.is_empty()
    }

    /// The change of service `name`, if it changed.
    pub fn service(&self, name: &str) -> Option<&ServiceDiff> {
        self.services_changed.iter().find(|s| s.name == name)
    }
}

impl ServiceDiff {
    pub fn is_empty(&self) -> bool {
        self.listeners_added.is_empty()
            && self.listeners_removed.is_empty()
            && self.backends_added.is_empty()
            && self.backends_removed.is_empty()
            && self.backends_reweighted.is_empty()
            && self.backends_limit_changed.is_empty()
            && self.balance.is_none()
            && self.health_check.is_none()
            && self.settings.is_empty()
    }

    /// Whether `protocol` changed (the service's listeners all change then).
    pub fn protocol_changed(&self) -> bool {
        self.settings.iter().any(|s| s.key == "protocol")
    }
}

/// Compares two configurations. Services are matched by name, backends by
/// resolved address.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut d = ConfigDiff::default();
    if old.workers != new.workers {
        d.restart_required.push(format!(
            "workers changed from {} to {}: restart sluice to apply it",
            old.workers, new.workers
        ));
    }
    if old.admin != new.admin {
        d.admin = Some((old.admin.clone(), new.admin.clone()));
    }
    if old.shutdown_timeout != new.shutdown_timeout {
        d.shutdown_timeout = Some((old.shutdown_timeout, new.shutdown_timeout));
    }
    for s in &old.services {
        if new.service(&s.name).is_none() {
            d.services_removed.push(s.name.clone());
        }
    }
    for s in &new.services {
        match old.service(&s.name) {
            None => d.services_added.push(s.name.clone()),
            Some(o) => {
                let sd = diff_service(o, s);
                if !sd.is_empty() {
                    d.services_changed.push(sd);
                }
            }
        }
    }
    d
}

fn diff_service(old: &Service, new: &Service) -> ServiceDiff {
    let mut d = ServiceDiff {
        name: new.name.clone(),
        ..ServiceDiff::default()
    };
    d.listeners_added = new
        .listen
        .iter()
        .filter(|a| !old.listen.contains(a))
        .copied()
        .collect();
    d.listeners_removed = old
        .listen
        .iter()
        .filter(|a| !new.listen.contains(a))
        .copied()
        .collect();
    for b in &old.backends {
        if new.backend(b.addr).is_none() {
            d.backends_removed.push(b.addr);
        }
    }
    for b in &new.backends {
        match old.backend(b.addr) {
            None => d.backends_added.push(b.clone()),
            Some(o) => {
                if o.weight != b.weight {
                    d.backends_reweighted.push(WeightChange {
                        addr: b.addr,
                        old: o.weight,
                        new: b.weight,
                    });
                }
                if o.max_connections != b.max_connections {
                    d.backends_limit_changed.push(LimitChange {
                        addr: b.addr,
                        old: o.max_connections,
                        new: b.max_connections,
                    });
                }
            }
        }
    }
    if old.balance != new.balance {
        d.balance = Some((old.balance, new.balance));
    }
    if old.health_check != new.health_check {
        d.health_check = Some((old.health_check.clone(), new.health_check.clone()));
    }
    let mut set = |key: &'static str, o: String, n: String| {
        if o != n {
            d.settings.push(SettingChange {
                key,
                old: o,
                new: n,
            });
        }
    };
    let dur = |x: Duration| format_duration(x).to_string();
    set(
        "protocol",
        old.protocol.to_string(),
        new.protocol.to_string(),
    );
    set(
        "transfer",
        old.transfer.to_string(),
        new.transfer.to_string(),
    );
    set(
        "proxy_protocol",
        old.proxy_protocol.to_string(),
        new.proxy_protocol.to_string(),
    );
    set(
        "max_connections",
        old.max_connections.to_string(),
        new.max_connections.to_string(),
    );
    set(
        "connect_timeout",
        dur(old.connect_timeout),
        dur(new.connect_timeout),
    );
    set(
        "connect_retries",
        old.connect_retries.to_string(),
        new.connect_retries.to_string(),
    );
    set("idle_timeout", dur(old.idle_timeout), dur(new.idle_timeout));
    set(
        "access_log",
        old.access_log.to_string(),
        new.access_log.to_string(),
    );
    let udp = |u: &Option<UdpSettings>| match u {
        None => "none".to_owned(),
        Some(u) => format!(
            "mode {}, session_timeout {}, query_timeout {}, max_sessions {}",
            u.mode,
            dur(u.session_timeout),
            dur(u.query_timeout),
            u.max_sessions
        ),
    };
    set("udp", udp(&old.udp), udp(&new.udp));
    d
}

impl fmt::Display for ConfigDiff {
    /// One line per change, no trailing newline; `no changes` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines: Vec<String> = Vec::new();
        for r in &self.restart_required {
            lines.push(format!("restart required: {r}"));
        }
        if let Some((o, n)) = &self.admin {
            let show = |a: &Option<Admin>| {
                a.as_ref()
                    .map_or("none".to_owned(), |a| a.listen.to_string())
            };
            lines.push(format!("admin.listen: {} -> {}", show(o), show(n)));
        }
        if let Some((o, n)) = self.shutdown_timeout {
            lines.push(format!(
                "shutdown_timeout: {} -> {}",
                format_duration(o),
                format_duration(n)
            ));
        }
        for s in &self.services_removed {
            lines.push(format!("service {s}: removed"));
        }
        for s in &self.services_added {
            lines.push(format!("service {s}: added"));
        }
        for s in &self.services_changed {
            s.lines(&mut lines);
        }
        if lines.is_empty() {
            return f.write_str("no changes");
        }
        f.write_str(&lines.join("\n"))
    }
}

impl ServiceDiff {
    fn lines(&self, out: &mut Vec<String>) {
        let n = &self.name;
        for s in &self.settings {
            out.push(format!("service {n}: {} {} -> {}", s.key, s.old, s.new));
        }
        for a in &self.listeners_removed {
            out.push(format!("service {n}: listener removed {a}"));
        }
        for a in &self.listeners_added {
            out.push(format!("service {n}: listener added {a}"));
        }
        if let Some((o, new)) = self.balance {
            out.push(format!("service {n}: balance {o} -> {new}"));
        }
        if let Some((o, new)) = &self.health_check {
            out.push(format!("service {n}: health_check {o} -> {new}"));
        }
        for a in &self.backends_removed {
            out.push(format!("service {n}: backend removed {a}"));
        }
        for b in &self.backends_added {
            let named = if b.address == b.addr.to_string() {
                String::new()
            } else {
                format!(" ({})", b.address)
            };
            out.push(format!(
                "service {n}: backend added {}{named} weight {}",
                b.addr, b.weight
            ));
        }
        for w in &self.backends_reweighted {
            out.push(format!(
                "service {n}: backend {} weight {} -> {}",
                w.addr, w.old, w.new
            ));
        }
        for l in &self.backends_limit_changed {
            out.push(format!(
                "service {n}: backend {} max_connections {} -> {}",
                l.addr, l.old, l.new
            ));
        }
    }
}

impl fmt::Display for ServiceDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = Vec::new();
        self.lines(&mut lines);
        f.write_str(&lines.join("\n"))
    }
}
