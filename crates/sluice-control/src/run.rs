//! `sluice run`: bind, spawn the workers, then serve signals and worker
//! events until shutdown.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use sluice_config::{CheckKind, Config, Protocol, Service, Workers};
use sluice_dataplane::{
    spawn_worker, ConnectFailure, ServiceRoutes, WorkerConfig, WorkerEvent, WorkerHandle, WorkerMsg,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminHandle, AdminShared, AdminView};
use crate::health::{self, CheckReport, Event, HealthTable, Transition};
use crate::registry::Registry;
use crate::signals::Signals;

/// What `sluice run` was asked to do.
#[derive(Debug)]
pub struct RunOptions {
    pub config_path: PathBuf,
    pub config: Config,
    /// `--workers N` (overrides the file).
    pub workers: Option<usize>,
}

/// A start-up failure (exit code 3). `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({protocol}) for service {service}: {source}")]
    Bind {
        service: String,
        addr: SocketAddr,
        protocol: &'static str,
        source: io::Error,
    },
    /// The admin endpoint could not listen (the message names the address).
    #[error("{0}")]
    Admin(io::Error),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: &'static str,
        source: io::Error,
    },
}

/// The listeners of one (service, address), one socket per worker.
pub(crate) enum Bound {
    Tcp(Vec<std::net::TcpListener>),
    Udp(Vec<std::net::UdpSocket>),
}

const BACKLOG: i32 = 4096;

/// Bind `addr` once per worker (SO_REUSEPORT).
pub(crate) fn bind(
    service: &Service,
    addr: SocketAddr,
    workers: usize,
) -> Result<Bound, StartError> {
    let err = |source, protocol| StartError::Bind {
        service: service.name.clone(),
        addr,
        protocol,
        source,
    };
    match service.protocol {
        Protocol::Tcp => (0..workers)
            .map(|_| sluice_uring::socket::tcp_listener(addr, BACKLOG).map_err(|e| err(e, "tcp")))
            .collect::<Result<Vec<_>, _>>()
            .map(Bound::Tcp),
        Protocol::Udp => (0..workers)
            .map(|_| sluice_uring::socket::udp_socket(addr).map_err(|e| err(e, "udp")))
            .collect::<Result<Vec<_>, _>>()
            .map(Bound::Udp),
    }
}

/// Hand the per-worker sockets of one listener to the workers. Returns a
/// duplicate of each TCP socket, which the control thread keeps so that it
/// can stop the listener itself, at once, however busy the workers are
/// (see [`Control::close_listener`]).
pub(crate) fn hand_over(
    workers: &[WorkerHandle],
    service: &str,
    addr: SocketAddr,
    bound: Bound,
) -> Vec<std::net::TcpListener> {
    let mut dups = Vec::new();
    match bound {
        Bound::Tcp(sockets) => {
            for (w, socket) in workers.iter().zip(sockets) {
                match socket.try_clone() {
                    Ok(dup) => dups.push(dup),
                    Err(e) => log::warn!(
                        "listener {addr} of service {service}: cannot keep a handle: {e}"
                    ),
                }
                w.send(WorkerMsg::AddTcpListener {
                    service: service.to_string(),
                    addr,
                    socket,
                });
            }
        }
        Bound::Udp(sockets) => {
            for (w, socket) in workers.iter().zip(sockets) {
                w.send(WorkerMsg::AddUdpListener {
                    service: service.to_string(),
                    addr,
                    socket,
                });
            }
        }
    }
    dups
}

pub(crate) fn worker_count(config: &Config, cli: Option<usize>) -> usize {
    cli.unwrap_or(match config.workers {
        Workers::Auto => sluice_uring::sys::online_cpus(),
        Workers::Count(n) => n.get(),
    })
}

/// The running checker tasks of one service.
#[derive(Debug)]
pub(crate) struct Checkers {
    generation: u64,
    tasks: Vec<JoinHandle<()>>,
}

/// The running control state.
pub(crate) struct Control {
    pub config_path: PathBuf,
    pub config: Config,
    pub services: Vec<Arc<Service>>,
    pub registry: Registry,
    pub workers: Vec<WorkerHandle>,
    pub worker_count: usize,
    /// Rise/fall state of every backend (the truth about up/down; the
    /// registry and the metrics follow it).
    pub health: HealthTable,
    checkers: HashMap<String, Checkers>,
    next_generation: u64,
    check_tx: UnboundedSender<CheckReport>,
    /// Duplicates of the workers' TCP listening sockets, by (service,
    /// address): the control thread stops a listener itself (`shutdown`),
    /// so new connects are refused the moment it decides, not when a busy
    /// worker gets to its message.
    tcp_listeners: HashMap<(String, SocketAddr), Vec<std::net::TcpListener>>,
    /// What the admin endpoint shows; republished after every reload.
    pub admin_shared: Arc<AdminShared>,
    /// The admin endpoint, when `admin:` is configured.
    pub admin: Option<AdminHandle>,
    /// When the running configuration was loaded.
    pub loaded_at: SystemTime,
}

impl Control {
    /// Publish a fresh admin view of the running configuration, and move
    /// the admin endpoint if `admin.listen` changed (a bind failure keeps
    /// the old endpoint and is logged).
    pub fn publish_admin(&mut self) {
        let view = AdminView::from_config(
            &self.config,
            &self.config_path,
            self.loaded_at,
            self.worker_count,
            &mut self.registry,
        );
        self.admin_shared.publish(Arc::new(view));
        let want = self.config.admin.as_ref().map(|a| a.listen);
        let have = self.admin.as_ref().map(|h| h.local_addr());
        if want == have {
            return;
        }
        match want {
            None => {
                if let Some(old) = self.admin.take() {
                    old.stop();
                    log::info!("admin endpoint closed");
                }
            }
            Some(addr) => {
                // The old endpoint may hold the same port on another address
                // form; stop it first, then bind the new one.
                if let Some(old) = self.admin.take() {
                    old.stop();
                }
                match admin::start(addr, self.admin_shared.clone()) {
                    Ok(h) => {
                        log::info!("admin endpoint listening on {}", h.local_addr());
                        self.admin = Some(h);
                    }
                    Err(e) => log::error!("{e}"),
                }
            }
        }
    }

    /// Hand a bound listener to the workers, keeping handles on it.
    pub fn hand_over(&mut self, service: &str, addr: SocketAddr, bound: Bound) {
        let dups = hand_over(&self.workers, service, addr, bound);
        if !dups.is_empty() {
            self.tcp_listeners.insert((service.to_string(), addr), dups);
        }
    }

    /// Stop a TCP listener now: `shutdown` takes every per-worker socket of
    /// it out of the listening state (new connects are refused; connections
    /// queued on it move to SO_REUSEPORT siblings when tcp_migrate_req is
    /// on) and the handles are dropped. The workers close their own fds
    /// when they get the matching message.
    pub fn close_listener(&mut self, service: &str, addr: SocketAddr) {
        if let Some(dups) = self.tcp_listeners.remove(&(service.to_string(), addr)) {
            for l in dups {
                let _ = socket2::SockRef::from(&l).shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// [`Control::close_listener`] for every listener of `service`.
    pub fn close_service_listeners(&mut self, service: &str) {
        let keys: Vec<_> = self
            .tcp_listeners
            .keys()
            .filter(|(s, _)| s == service)
            .cloned()
            .collect();
        for (s, addr) in keys {
            self.close_listener(&s, addr);
        }
    }

    /// [`Control::close_listener`] for every listener.
    pub fn close_all_listeners(&mut self) {
        let keys: Vec<_> = self.tcp_listeners.keys().cloned().collect();
        for (s, addr) in keys {
            self.close_listener(&s, addr);
        }
    }

    pub fn broadcast(&self, msg: impl Fn() -> WorkerMsg) {
        for w in &self.workers {
            w.send(msg());
        }
    }

    /// Build the routes of `service` from the current health state.
    pub fn routes(&mut self, service: &Arc<Service>) -> Arc<ServiceRoutes> {
        // The health table is the truth; a backend it does not know yet (new
        // in a reload, before its checks start) is up.
        for b in &service.backends {
            let up = self.health.is_up(&service.name, b.addr).unwrap_or(true);
            self.registry.set_up(&service.name, b.addr, up);
        }
        self.registry.routes(service)
    }

    /// Rebuild and publish the routes of one service.
    pub fn publish(&mut self, service: &str) {
        if let Some(svc) = self.services.iter().find(|s| s.name == service).cloned() {
            let routes = self.routes(&svc);
            self.broadcast(|| WorkerMsg::Routes(vec![routes.clone()]));
        }
    }

    /// Wait until every worker has applied every message sent so far (or
    /// `timeout` passes); true when all confirmed.
    pub async fn sync_workers(&self, timeout: Duration) -> bool {
        let mut waits = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if w.send(WorkerMsg::Sync(tx)) {
                waits.push(rx);
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut all = true;
        for rx in waits {
            all &= matches!(tokio::time::timeout_at(deadline, rx).await, Ok(Ok(())));
        }
        all
    }

    /// Set up the health state of `service` from the running configuration
    /// (backends that stay keep their state) and (re)start its checkers.
    pub fn start_checks(&mut self, service: &str) {
        self.stop_checks(service);
        let Some(svc) = self.services.iter().find(|s| s.name == service).cloned() else {
            return;
        };
        let had_checks = self.health.policy(service).is_none_or(|p| p.checks);
        let transitions = self.health.configure(&svc);
        self.apply_transitions(service, transitions);
        if svc.health_check.kind == CheckKind::None {
            if had_checks {
                log::info!(
                    "service {service}: health_check kind none: no active checks, so passive ejection is off too \
                     (nothing could bring an ejected backend back)"
                );
            }
            return;
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        let tasks = health::spawn_checkers(&svc, generation, &self.check_tx);
        self.checkers
            .insert(service.to_string(), Checkers { generation, tasks });
    }

    pub fn stop_checks(&mut self, service: &str) {
        if let Some(c) = self.checkers.remove(service) {
            for t in c.tasks {
                t.abort();
            }
        }
    }

    fn stop_all_checks(&mut self) {
        let names: Vec<String> = self.checkers.keys().cloned().collect();
        for name in names {
            self.stop_checks(&name);
        }
    }

    /// One active check result.
    fn on_check(&mut self, report: CheckReport) {
        let current = self.checkers.get(&report.service).map(|c| c.generation);
        if current != Some(report.generation)
            || self.health.is_up(&report.service, report.backend).is_none()
        {
            return; // from checkers a reload replaced
        }
        let metrics = self
            .registry
            .backend_metrics(&report.service, report.backend);
        let event = match report.outcome {
            Ok(()) => {
                metrics
                    .checks_pass
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Event::Pass
            }
            Err(why) => {
                metrics
                    .checks_fail
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                log::debug!(
                    "health check of {} ({}) failed: {why}",
                    report.backend,
                    report.service
                );
                Event::Fail(why)
            }
        };
        if let Some(t) = self.health.observe(&report.service, report.backend, event) {
            self.apply_transitions(&report.service, vec![(report.backend, t)]);
        }
    }

    /// A report from a worker.
    fn on_worker_event(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::ConnectFailed {
                service,
                backend,
                why,
                ..
            } => {
                log::debug!("{service}: connect to {backend} failed ({why:?})");
                let event = Event::ConnectFailed(failure_text(why).to_string());
                if let Some(t) = self.health.observe(&service, backend, event) {
                    self.apply_transitions(&service, vec![(backend, t)]);
                }
            }
            WorkerEvent::ConnectRecovered {
                service, backend, ..
            } => {
                self.health
                    .observe(&service, backend, Event::ConnectRecovered);
            }
            WorkerEvent::Exited { worker } => log::debug!("worker {worker} exited"),
        }
    }

    /// Log health changes of `service`, publish its new routes once, and
    /// have the workers forget UDP flows on backends that went down.
    fn apply_transitions(&mut self, service: &str, transitions: Vec<(SocketAddr, Transition)>) {
        if transitions.is_empty() {
            return;
        }
        for (addr, t) in &transitions {
            log::info!("backend {addr} of service {service} is {t}");
            self.registry.set_up(service, *addr, t.is_up());
        }
        self.publish(service);
        for (addr, t) in transitions {
            if !t.is_up() {
                self.broadcast(|| WorkerMsg::ForgetBackend {
                    service: service.to_string(),
                    backend: addr,
                });
            }
        }
    }
}

/// The reason of a worker's connect failure, as the health log says it.
fn failure_text(why: ConnectFailure) -> &'static str {
    match why {
        ConnectFailure::Refused => "connection refused",
        ConnectFailure::Timeout => "connect timed out",
        ConnectFailure::Reset => "reset or closed before any byte",
        ConnectFailure::Other => "connect error",
    }
}

/// Run sluice until SIGTERM/SIGINT and the drain that follows. Blocks the
/// calling thread (which becomes the control thread). The caller must have
/// called [`crate::signals::block`] before any thread was spawned.
pub fn run(opts: RunOptions) -> Result<(), StartError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Spawn {
            what: "the control runtime",
            source,
        })?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: RunOptions) -> Result<(), StartError> {
    let RunOptions {
        config_path,
        config,
        workers,
    } = opts;
    let n = worker_count(&config, workers);
    let mut signals = Signals::start().map_err(|source| StartError::Spawn {
        what: "signal handling",
        source,
    })?;

    // Bind everything first: a bind failure must stop start-up before any
    // worker runs.
    let services: Vec<Arc<Service>> = config.services.iter().cloned().map(Arc::new).collect();
    let mut bound = Vec::new();
    for svc in &services {
        for &addr in &svc.listen {
            bound.push((svc.name.clone(), addr, bind(svc, addr, n)?));
        }
    }

    // The admin endpoint is bound before any worker runs, like the
    // service listeners: a failure is a start-up failure (exit 3).
    let mut registry = Registry::new(n);
    let loaded_at = SystemTime::now();
    let view = AdminView::from_config(&config, &config_path, loaded_at, n, &mut registry);
    let admin_shared = Arc::new(AdminShared::new(registry.global.clone(), Arc::new(view)));
    let admin = match &config.admin {
        Some(a) => {
            let handle = admin::start(a.listen, admin_shared.clone()).map_err(StartError::Admin)?;
            log::info!("admin endpoint listening on {}", handle.local_addr());
            Some(handle)
        }
        None => None,
    };

    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let handle =
            spawn_worker(WorkerConfig::new(i, n), events_tx.clone()).map_err(|source| {
                StartError::Spawn {
                    what: "a worker thread",
                    source,
                }
            })?;
        handles.push(handle);
    }
    drop(events_tx);

    let (check_tx, check_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut control = Control {
        config_path,
        config,
        services,
        registry,
        workers: handles,
        worker_count: n,
        health: HealthTable::new(),
        checkers: HashMap::new(),
        next_generation: 0,
        check_tx,
        tcp_listeners: HashMap::new(),
        admin_shared,
        admin,
        loaded_at,
    };
    let all: Vec<_> = control
        .services
        .clone()
        .iter()
        .map(|s| control.registry.routes(s))
        .collect();
    control.broadcast(|| WorkerMsg::Routes(all.clone()));
    for (service, addr, b) in bound {
        control.hand_over(&service, addr, b);
    }
    let listeners: Vec<String> = control
        .services
        .iter()
        .flat_map(|s| s.listen.iter().map(move |a| format!("{}/{a}", s.name)))
        .collect();
    log::info!(
        "sluice started: {} worker(s), {} service(s), listening on {}",
        n,
        control.services.len(),
        listeners.join(", ")
    );

    if sluice_uring::sys::enable_tcp_migrate_req() {
        log::info!("net.ipv4.tcp_migrate_req is on: a listener closed by a reload hands its queued connections to its siblings");
    } else {
        log::info!(
            "net.ipv4.tcp_migrate_req is off and cannot be set: a reload that removes a listener resets the connections queued on it"
        );
    }
    let names: Vec<String> = control.services.iter().map(|s| s.name.clone()).collect();
    for name in &names {
        control.start_checks(name);
    }
    serve(&mut control, &mut signals, events_rx, check_rx).await;
    Ok(())
}

async fn serve(
    control: &mut Control,
    signals: &mut Signals,
    mut events: UnboundedReceiver<WorkerEvent>,
    mut checks: tokio::sync::mpsc::UnboundedReceiver<CheckReport>,
) {
    loop {
        tokio::select! {
            sig = signals.recv() => match sig {
                Some(Signal::SIGHUP) => control.reload().await,
                Some(sig) => {
                    log::info!("{sig} received, shutting down");
                    control.stop_all_checks();
                    drain(control, &mut events).await;
                    return;
                }
                None => {
                    log::error!("signal handling stopped; shutting down");
                    control.stop_all_checks();
                    drain(control, &mut events).await;
                    return;
                }
            },
            ev = events.recv() => match ev {
                Some(ev) => control.on_worker_event(ev),
                None => {
                    log::error!("all workers are gone; shutting down");
                    control.stop_all_checks();
                    return;
                }
            },
            Some(report) = checks.recv() => control.on_check(report),
        }
    }
}

/// Stop accepting everywhere, let connections finish until
/// `shutdown_timeout`, then wait for every worker thread.
async fn drain(control: &mut Control, events: &mut UnboundedReceiver<WorkerEvent>) {
    let timeout = control.config.shutdown_timeout;
    let deadline = Instant::now() + timeout;
    // Refuse new connects now, from here: a worker busy moving bytes may
    // take a while to get to its Shutdown message.
    control.close_all_listeners();
    control.broadcast(|| WorkerMsg::Shutdown { deadline });
    let mut exited: HashMap<usize, bool> = HashMap::new();
    // Workers close what is left at the deadline; give them a moment more.
    let limit = tokio::time::Instant::from_std(deadline + Duration::from_secs(2));
    while exited.len() < control.workers.len() {
        match tokio::time::timeout_at(limit, events.recv()).await {
            Ok(Some(WorkerEvent::Exited { worker })) => {
                exited.insert(worker, true);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for w in std::mem::take(&mut control.workers) {
        // The thread ends right after its Exited event; wait for it, bounded.
        while !w.is_finished() && tokio::time::Instant::now() < limit {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if w.is_finished() {
            w.join();
        } else {
            log::warn!("worker {} did not finish draining in time", w.index());
        }
    }
    log::info!("shutdown complete");
}
