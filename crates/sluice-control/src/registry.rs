//! Long-lived per-service and per-backend state (load counters, metrics,
//! health), and building the routes the workers get from it.
//!
//! Objects are keyed by service name and backend address, so they survive
//! reloads: a backend that stays keeps its counters and its active count.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use sluice_balance::{Algorithm, BuildOptions, Endpoint, Load, Member, Snapshot};
use sluice_config::{Balance, Service};
use sluice_dataplane::{BackendRoute, ServiceLimit, ServiceRoutes};
use sluice_metrics::{BackendMetrics, GlobalMetrics, ServiceMetrics};

pub fn algorithm(b: Balance) -> Algorithm {
    match b {
        Balance::Maglev => Algorithm::Maglev,
        Balance::SourceIp => Algorithm::SourceIp,
        Balance::RoundRobin => Algorithm::RoundRobin,
        Balance::LeastConn => Algorithm::LeastConn,
        Balance::Random => Algorithm::Random,
        Balance::TwoChoices => Algorithm::TwoChoices,
        Balance::LeastLatency => Algorithm::LeastLatency,
    }
}

type BackendKey = (String, SocketAddr);

/// State kept across reloads.
#[derive(Debug)]
pub struct Registry {
    cores: usize,
    pub global: Arc<GlobalMetrics>,
    loads: HashMap<BackendKey, Arc<Load>>,
    backend_metrics: HashMap<BackendKey, Arc<BackendMetrics>>,
    service_metrics: HashMap<String, Arc<ServiceMetrics>>,
    limits: HashMap<String, Arc<ServiceLimit>>,
    /// Health of each backend: `true` = up.
    up: HashMap<BackendKey, bool>,
}

impl Registry {
    pub fn new(cores: usize) -> Self {
        Self {
            cores,
            global: Arc::new(GlobalMetrics::default()),
            loads: HashMap::new(),
            backend_metrics: HashMap::new(),
            service_metrics: HashMap::new(),
            limits: HashMap::new(),
            up: HashMap::new(),
        }
    }

    pub fn is_up(&self, service: &str, addr: SocketAddr) -> bool {
        self.up
            .get(&(service.to_string(), addr))
            .copied()
            .unwrap_or(true)
    }

    /// Set a backend's health; returns true when it changed.
    pub fn set_up(&mut self, service: &str, addr: SocketAddr, up: bool) -> bool {
        let key = (service.to_string(), addr);
        if let Some(m) = self.backend_metrics.get(&key) {
            m.up.store(up, std::sync::atomic::Ordering::Relaxed);
        }
        self.up.insert(key, up) != Some(up)
    }

    pub fn backend_metrics(&mut self, service: &str, addr: SocketAddr) -> Arc<BackendMetrics> {
        let cores = self.cores;
        self.backend_metrics
            .entry((service.to_string(), addr))
            .or_insert_with(|| Arc::new(BackendMetrics::new(service, &addr.to_string(), cores)))
            .clone()
    }

    pub fn service_metrics(&mut self, service: &str) -> Arc<ServiceMetrics> {
        let cores = self.cores;
        self.service_metrics
            .entry(service.to_string())
            .or_insert_with(|| Arc::new(ServiceMetrics::new(service, cores)))
            .clone()
    }

    /// Every metric object, for the scrape (backends and services of the
    /// running configuration, in a stable order).
    pub fn metrics_of(
        &self,
        services: &[Arc<Service>],
    ) -> (Vec<Arc<ServiceMetrics>>, Vec<Arc<BackendMetrics>>) {
        let mut svcs = Vec::new();
        let mut backends = Vec::new();
        for s in services {
            if let Some(m) = self.service_metrics.get(&s.name) {
                svcs.push(m.clone());
            }
            for b in &s.backends {
                if let Some(m) = self.backend_metrics.get(&(s.name.clone(), b.addr)) {
                    backends.push(m.clone());
                }
            }
        }
        (svcs, backends)
    }

    /// Build the routes of `service` from the current health state.
    pub fn routes(&mut self, service: &Arc<Service>) -> Arc<ServiceRoutes> {
        let name = service.name.clone();
        let mut backends = Vec::with_capacity(service.backends.len());
        let mut members = Vec::new();
        for (i, b) in service.backends.iter().enumerate() {
            let key = (name.clone(), b.addr);
            let load = self.loads.entry(key.clone()).or_default().clone();
            let metrics = self.backend_metrics(&name, b.addr);
            let up = *self.up.entry(key).or_insert(true);
            metrics.up.store(up, std::sync::atomic::Ordering::Relaxed);
            if up {
                let endpoint = Endpoint::from_address(i as u32, b.weight, &b.addr.to_string());
                members.push(Member::new(endpoint, load.clone(), b.max_connections));
            }
            backends.push(BackendRoute {
                addr: b.addr,
                load,
                metrics,
                max_connections: b.max_connections,
            });
        }
        let snapshot =
            Snapshot::build(algorithm(service.balance), members, BuildOptions::default());
        let limit = self.limits.entry(name.clone()).or_default().clone();
        Arc::new(ServiceRoutes {
            service: service.clone(),
            snapshot,
            backends,
            metrics: self.service_metrics(&name),
            limit,
        })
    }

    /// Drop state of backends and services that are no longer configured.
    pub fn retain(&mut self, services: &[Arc<Service>]) {
        let keep: std::collections::HashSet<BackendKey> = services
            .iter()
            .flat_map(|s| s.backends.iter().map(move |b| (s.name.clone(), b.addr)))
            .collect();
        let names: std::collections::HashSet<&str> =
            services.iter().map(|s| s.name.as_str()).collect();
        self.loads.retain(|k, _| keep.contains(k));
        self.up.retain(|k, _| keep.contains(k));
        self.backend_metrics.retain(|k, _| keep.contains(k));
        self.service_metrics
            .retain(|k, _| names.contains(k.as_str()));
        self.limits.retain(|k, _| names.contains(k.as_str()));
    }
}
