//! SIGHUP reload: plan the change as a list of actions from the running
//! configuration and the new one ([`plan`], pure and tested without
//! sockets), then carry it out ([`Control::reload`]).
//!
//! The rules (SPEC.md "Signals"):
//!
//! - An invalid file changes nothing: the errors are logged, the failure is
//!   counted, the running configuration stays.
//! - New listeners are bound first, all of them; if one bind fails the
//!   reload fails as a whole and nothing changes (what was bound is closed).
//! - A listener whose address stays keeps its socket: no action touches it.
//! - Services, listeners, backends, weights, algorithms and health checks
//!   change live. Health state and counters of backends that stay are kept
//!   (they are keyed by service name and backend address).
//! - Established connections keep the routes they started with (a worker
//!   holds the routes `Arc` for the life of a connection), so a removed
//!   backend takes no new connection while its open ones finish.
//! - `workers` cannot change without a restart; the log says so and the
//!   running count stays.
//!
//! The order of the actions matters because each worker applies its
//! messages in order: services go before their listeners are handed over,
//! new routes before `ForgetBackend` (so a forgotten UDP flow is balanced
//! on the new routes).
//!
//! ```
//! use sluice_control::reload::{plan, Action};
//! let old = sluice_config::load_str(
//!     "services:\n  - name: web\n    protocol: tcp\n    listen: [\"127.0.0.1:8080\"]\n    \
//!      backends:\n      - address: 127.0.0.1:9000\n",
//!     "old.yaml",
//! )
//! .unwrap();
//! let new = sluice_config::load_str(
//!     "services:\n  - name: web\n    protocol: tcp\n    listen: [\"127.0.0.1:8080\"]\n    \
//!      backends:\n      - address: 127.0.0.1:9000\n      - address: 127.0.0.1:9001\n",
//!     "new.yaml",
//! )
//! .unwrap();
//! let p = plan(&old, &new);
//! assert!(p.bind.is_empty(), "the listener stays");
//! assert_eq!(p.actions, vec![Action::Publish(vec!["web".into()]), Action::StartChecks("web".into())]);
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_config::{diff, Config, ConfigDiff, Service};
use sluice_dataplane::WorkerMsg;

use crate::run::{bind, Bound, Control};

/// A listener to bind: `addr` of service `service` (its protocol is the
/// service's in the new configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewListener {
    pub service: String,
    pub addr: SocketAddr,
}

/// One step of a reload, after the new listeners were bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forget a service everywhere: its listeners close, its open
    /// connections finish on the routes they have, its health checks stop.
    RemoveService(String),
    /// Close one listener of a service that stays.
    RemoveListener { service: String, addr: SocketAddr },
    /// Build the routes of these services from the new configuration and
    /// send them to every worker (one message).
    Publish(Vec<String>),
    /// Forget the UDP flows on a backend that is no longer configured.
    ForgetBackend {
        service: String,
        backend: SocketAddr,
    },
    /// Hand a listener bound before the actions to the workers.
    HandOver(NewListener),
    /// Set up the health state of a service from the new configuration
    /// (backends that stay keep their up/down) and (re)start its checkers.
    StartChecks(String),
}

/// What a reload does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Everything that differs (logged line by line).
    pub diff: ConfigDiff,
    /// Listeners to bind before anything else happens.
    pub bind: Vec<NewListener>,
    /// The steps, in order.
    pub actions: Vec<Action>,
    /// Changes that are not applied until a restart (`workers`).
    pub restart_required: Vec<String>,
}

/// Plan the reload from `old` (running) to `new`.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let d = diff(old, new);
    let mut bind = Vec::new();
    let mut actions = Vec::new();
    let mut publish = Vec::new();
    let mut forget = Vec::new();
    let mut checks = Vec::new();
    let mut restart_required = Vec::new();
    if old.workers != new.workers {
        restart_required.push(format!(
            "changing workers needs a restart (workers: {} -> {})",
            old.workers, new.workers
        ));
    }

    // A service whose protocol changed is replaced: every listener is a
    // new socket of the other protocol.
    let replaced: Vec<&str> = d
        .services_changed
        .iter()
        .filter(|s| s.protocol_changed())
        .map(|s| s.name.as_str())
        .collect();

    for name in d
        .services_removed
        .iter()
        .map(String::as_str)
        .chain(replaced.iter().copied())
    {
        actions.push(Action::RemoveService(name.to_string()));
    }
    for sd in d.services_changed.iter().filter(|s| !s.protocol_changed()) {
        for &addr in &sd.listeners_removed {
            actions.push(Action::RemoveListener {
                service: sd.name.clone(),
                addr,
            });
        }
    }
    // Services and listeners in the new file's order.
    for svc in &new.services {
        let name = &svc.name;
        let fresh = d.services_added.contains(name) || replaced.contains(&name.as_str());
        if fresh {
            publish.push(name.clone());
            bind.extend(svc.listen.iter().map(|&addr| NewListener {
                service: name.clone(),
                addr,
            }));
            checks.push(name.clone());
        } else if let Some(sd) = d.service(name) {
            publish.push(name.clone());
            bind.extend(sd.listeners_added.iter().map(|&addr| NewListener {
                service: name.clone(),
                addr,
            }));
            forget.extend(
                sd.backends_removed
                    .iter()
                    .map(|&backend| Action::ForgetBackend {
                        service: name.clone(),
                        backend,
                    }),
            );
            if sd.health_check.is_some()
                || !sd.backends_added.is_empty()
                || !sd.backends_removed.is_empty()
            {
                checks.push(name.clone());
            }
        }
    }
    if !publish.is_empty() {
        actions.push(Action::Publish(publish));
    }
    actions.extend(forget);
    actions.extend(bind.iter().cloned().map(Action::HandOver));
    actions.extend(checks.into_iter().map(Action::StartChecks));
    Plan {
        diff: d,
        bind,
        actions,
        restart_required,
    }
}

/// How long a reload waits for every worker to confirm it applied the
/// change before it logs `configuration reloaded` anyway.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

impl Control {
    /// Re-read the configuration file and apply it (SIGHUP).
    pub(crate) async fn reload(&mut self) {
        let path = self.config_path.display().to_string();
        log::info!("SIGHUP received: reloading {path}");
        let new = match sluice_config::load_file(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                for d in e.diagnostics() {
                    log::error!("reload failed: {d}");
                }
                self.registry.global.record_reload(false);
                log::error!("reload failed: the running configuration is unchanged");
                return;
            }
        };
        let plan = plan(&self.config, &new);
        if plan.diff.is_empty() {
            self.config = new;
            self.loaded_at = std::time::SystemTime::now();
            self.publish_admin();
            self.registry.global.record_reload(true);
            log::info!("configuration reloaded: no changes");
            return;
        }
        for line in plan.diff.to_string().lines() {
            log::info!("reload: {line}");
        }
        for r in &plan.restart_required {
            log::warn!("{r}; keeping {} worker(s)", self.worker_count);
        }

        // Bind every new listener first: a failure leaves everything as it
        // was (dropping what was bound closes it).
        let services: Vec<Arc<Service>> = new.services.iter().cloned().map(Arc::new).collect();
        let mut bound: Vec<(NewListener, Bound)> = Vec::with_capacity(plan.bind.len());
        for l in &plan.bind {
            let Some(svc) = services.iter().find(|s| s.name == l.service) else {
                continue;
            };
            match bind(svc, l.addr, self.worker_count) {
                Ok(b) => bound.push((l.clone(), b)),
                Err(e) => {
                    drop(bound);
                    self.registry.global.record_reload(false);
                    log::error!("reload failed: {e}");
                    log::error!("reload failed: the running configuration is unchanged");
                    return;
                }
            }
        }

        self.config = new;
        self.services = services;
        for action in plan.actions {
            self.apply(action, &mut bound);
        }
        self.registry.retain(&self.services);
        let confirmed = self.sync_workers(SYNC_TIMEOUT).await;
        if !confirmed {
            log::warn!("reload: not every worker confirmed the change within {SYNC_TIMEOUT:?}");
        }
        self.loaded_at = std::time::SystemTime::now();
        self.publish_admin();
        self.registry.global.record_reload(true);
        log::info!("configuration reloaded");
    }

    fn apply(&mut self, action: Action, bound: &mut Vec<(NewListener, Bound)>) {
        match action {
            Action::RemoveService(name) => {
                self.stop_checks(&name);
                self.health.remove(&name);
                self.close_service_listeners(&name);
                self.broadcast(|| WorkerMsg::RemoveService(name.clone()));
            }
            Action::RemoveListener { service, addr } => {
                self.close_listener(&service, addr);
                self.broadcast(|| WorkerMsg::RemoveListener {
                    service: service.clone(),
                    addr,
                });
            }
            Action::Publish(names) => {
                let services: Vec<Arc<Service>> = names
                    .iter()
                    .filter_map(|n| self.services.iter().find(|s| s.name == *n).cloned())
                    .collect();
                let routes: Vec<_> = services.iter().map(|s| self.routes(s)).collect();
                self.broadcast(|| WorkerMsg::Routes(routes.clone()));
            }
            Action::ForgetBackend { service, backend } => {
                self.broadcast(|| WorkerMsg::ForgetBackend {
                    service: service.clone(),
                    backend,
                });
            }
            Action::HandOver(l) => {
                if let Some(i) = bound.iter().position(|(b, _)| *b == l) {
                    let (_, sockets) = bound.swap_remove(i);
                    self.hand_over(&l.service, l.addr, sockets);
                }
            }
            Action::StartChecks(name) => self.start_checks(&name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        sluice_config::load_str(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str = "\
workers: 2
services:
  - name: web
    protocol: tcp
    listen: [\"127.0.0.1:8080\", \"127.0.0.1:8081\"]
    balance: maglev
    backends:
      - address: 127.0.0.1:9001
      - address: 127.0.0.1:9002
  - name: api
    protocol: tcp
    listen: [\"127.0.0.1:8090\"]
    backends:
      - address: 127.0.0.1:9101
";

    fn l(service: &str, addr: &str) -> NewListener {
        NewListener {
            service: service.into(),
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn no_change_no_action() {
        let p = plan(&cfg(BASE), &cfg(BASE));
        assert!(p.diff.is_empty());
        assert!(p.bind.is_empty());
        assert!(p.actions.is_empty());
        assert!(p.restart_required.is_empty());
    }

    #[test]
    fn backend_set_and_algorithm_change_republish_and_restart_checks() {
        let new = BASE
            .replace("balance: maglev", "balance: round_robin")
            .replace(
                "      - address: 127.0.0.1:9002\n",
                "      - address: 127.0.0.1:9003\n",
            );
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(p.bind.is_empty(), "listeners stay: nothing to bind");
        assert_eq!(
            p.actions,
            vec![
                Action::Publish(vec!["web".into()]),
                Action::ForgetBackend {
                    service: "web".into(),
                    backend: "127.0.0.1:9002".parse().unwrap()
                },
                Action::StartChecks("web".into()),
            ]
        );
    }

    #[test]
    fn a_weight_change_republishes_without_restarting_checks() {
        let new = BASE.replace(
            "      - address: 127.0.0.1:9002\n",
            "      - address: 127.0.0.1:9002\n        weight: 7\n",
        );
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.actions, vec![Action::Publish(vec!["web".into()])]);
    }

    #[test]
    fn health_check_change_restarts_checks() {
        let new = BASE.replace(
            "    balance: maglev\n",
            "    balance: maglev\n    health_check: { kind: tcp, interval: 200ms, timeout: 100ms }\n",
        );
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(
            p.actions,
            vec![
                Action::Publish(vec!["web".into()]),
                Action::StartChecks("web".into())
            ]
        );
    }

    #[test]
    fn listeners_added_are_bound_first_and_removed_ones_closed() {
        let new = BASE.replace(
            "[\"127.0.0.1:8080\", \"127.0.0.1:8081\"]",
            "[\"127.0.0.1:8080\", \"127.0.0.1:8082\"]",
        );
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.bind, vec![l("web", "127.0.0.1:8082")]);
        assert_eq!(
            p.actions,
            vec![
                Action::RemoveListener {
                    service: "web".into(),
                    addr: "127.0.0.1:8081".parse().unwrap()
                },
                Action::Publish(vec!["web".into()]),
                Action::HandOver(l("web", "127.0.0.1:8082")),
            ]
        );
    }

    #[test]
    fn services_added_and_removed() {
        let new = BASE
            .replace("name: api", "name: api2")
            .replace("8090", "8091");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.bind, vec![l("api2", "127.0.0.1:8091")]);
        assert_eq!(
            p.actions,
            vec![
                Action::RemoveService("api".into()),
                Action::Publish(vec!["api2".into()]),
                Action::HandOver(l("api2", "127.0.0.1:8091")),
                Action::StartChecks("api2".into()),
            ]
        );
        // The untouched service gets no action at all.
        assert!(!format!("{:?}", p.actions).contains("\"web\""));
    }

    #[test]
    fn a_listener_moving_to_another_service_is_bound_anew() {
        // api is renamed: its address now belongs to a new service. The
        // new socket is bound (SO_REUSEPORT) before the old one closes.
        let new = BASE.replace("name: api", "name: api2");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.bind, vec![l("api2", "127.0.0.1:8090")]);
        assert_eq!(p.actions[0], Action::RemoveService("api".into()));
    }

    #[test]
    fn a_protocol_change_replaces_the_service() {
        let new = BASE.replace(
            "  - name: api\n    protocol: tcp\n",
            "  - name: api\n    protocol: udp\n",
        );
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.bind, vec![l("api", "127.0.0.1:8090")]);
        assert_eq!(
            p.actions,
            vec![
                Action::RemoveService("api".into()),
                Action::Publish(vec!["api".into()]),
                Action::HandOver(l("api", "127.0.0.1:8090")),
                Action::StartChecks("api".into()),
            ]
        );
    }

    #[test]
    fn workers_change_needs_a_restart_and_the_rest_still_applies() {
        let new = BASE
            .replace("workers: 2", "workers: 4")
            .replace("balance: maglev", "balance: random");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(
            p.restart_required,
            vec!["changing workers needs a restart (workers: 2 -> 4)".to_string()]
        );
        assert_eq!(p.actions, vec![Action::Publish(vec!["web".into()])]);
    }

    #[test]
    fn shutdown_timeout_and_admin_changes_need_no_worker_action() {
        let new = format!("shutdown_timeout: 5s\nadmin:\n  listen: 127.0.0.1:9100\n{BASE}");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(!p.diff.is_empty());
        assert!(p.bind.is_empty());
        assert!(p.actions.is_empty());
    }

    #[test]
    fn every_bound_listener_is_handed_over_after_the_routes() {
        let new = format!(
            "{BASE}  - name: extra\n    protocol: tcp\n    listen: [\"127.0.0.1:8100\", \"127.0.0.1:8101\"]\n    backends:\n      - address: 127.0.0.1:9201\n"
        );
        let p = plan(&cfg(BASE), &cfg(&new));
        let publish = p
            .actions
            .iter()
            .position(|a| matches!(a, Action::Publish(_)))
            .unwrap();
        for b in &p.bind {
            let at = p
                .actions
                .iter()
                .position(|a| *a == Action::HandOver(b.clone()))
                .unwrap();
            assert!(at > publish);
        }
        assert_eq!(p.bind.len(), 2);
    }
}
