//! UDP services: `session` and `dns` modes.
//!
//! The logic is in two pure state machines tested on a virtual clock:
//! [`flows::FlowTable`] (session mode: one flow per client address, idle
//! expiry) and [`dns::QueryTable`] (dns mode: rewritten query IDs, query
//! timeouts, orphan replies). The private `session` and `dnsmode` modules
//! are their I/O shells, and this module holds what both share: the
//! per-worker state, the listeners and the expiry tick.
//!
//! The readiness model, as for TCP: a task per socket waits with an
//! io_uring poll, then drains the socket with `recvmmsg` into one reused
//! per-worker [`RecvBatch`] and handles each datagram synchronously
//! (forwarding is a non-blocking `send`/`sendmsg`; a datagram that cannot
//! be sent at once is dropped and counted, as the network would). Nothing
//! on the per-datagram path allocates or logs. Replies leave from the
//! address the client sent to (IP_PKTINFO), also on a wildcard listener.
//!
//! Rules: a socket with a poll in flight is only closed after the poll is
//! cancelled in the kernel (`op::close` / `op::cancel_fd`); every task that
//! owns a socket counts as a connection of the worker, so a shutdown waits
//! until they have all closed; per-datagram failures are counters, never
//! log lines.

pub mod dns;
mod dnsmode;
pub mod flows;
mod session;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use slab::Slab;
use sluice_config::{UdpMode, UdpSettings};
use sluice_uring::op;
use sluice_uring::udp::{self as uudp, PktInfo, RecvBatch, SendSlot};
use tokio::sync::{watch, Notify};

use crate::routes::ServiceRoutes;
use crate::worker::{now_nanos, ServiceSlot, Worker};
use crate::ConnectFailure;

/// Datagrams taken per `recvmmsg` call.
const BATCH: usize = 32;
/// `recvmmsg` calls per readiness wake-up; then the task polls again, so
/// the runtime gets to submit other tasks' operations (tokio-uring submits
/// queued SQEs only when no task is ready).
const ROUNDS_PER_WAKE: usize = 8;
/// Bounds of the expiry tick.
const TICK_MIN: Duration = Duration::from_millis(10);
const TICK_MAX: Duration = Duration::from_secs(1);
/// At most one refused-port report per backend per worker this often.
const REFUSED_REPORT_EVERY: u64 = 500_000_000;
/// At most one warning of each kind per worker this often.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// The UDP state of one worker.
pub(crate) struct UdpWorker {
    services: RefCell<HashMap<String, Rc<UdpService>>>,
    /// The receive buffers every UDP task of the worker reads into (one
    /// task runs at a time; the batch is never held across an await).
    batch: RefCell<RecvBatch>,
    /// The datagrams of one `sendmmsg` from `batch` (reused likewise).
    slots: RefCell<Vec<SendSlot>>,
    next_uid: Cell<u32>,
    last_warn: Cell<Option<Instant>>,
}

impl fmt::Debug for UdpWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpWorker")
            .field(
                "services",
                &self.services.borrow().keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Default for UdpWorker {
    fn default() -> Self {
        Self::new()
    }
}

impl UdpWorker {
    pub fn new() -> Self {
        UdpWorker {
            services: RefCell::new(HashMap::new()),
            batch: RefCell::new(RecvBatch::new(BATCH, uudp::MAX_DATAGRAM)),
            slots: RefCell::new(Vec::with_capacity(BATCH)),
            next_uid: Cell::new(1),
            last_warn: Cell::new(None),
        }
    }

    fn uid(&self) -> u32 {
        let id = self.next_uid.get();
        self.next_uid.set(id.wrapping_add(1).max(1));
        id
    }

    /// True at most once per [`WARN_EVERY`]: callers log only then.
    fn may_warn(&self) -> bool {
        let now = Instant::now();
        if self
            .last_warn
            .get()
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            return false;
        }
        self.last_warn.set(Some(now));
        true
    }

    /// Open UDP services (tests, status).
    #[allow(dead_code)]
    pub fn service_names(&self) -> Vec<String> {
        self.services.borrow().keys().cloned().collect()
    }
}

/// One UDP listening socket of this worker.
pub(crate) struct Listener {
    pub addr: SocketAddr,
    /// Bound to a wildcard address: replies set their source (PKTINFO).
    pub wildcard: bool,
    key: usize,
    uid: u32,
    socket: RefCell<Option<UdpSocket>>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .field("uid", &self.uid)
            .finish()
    }
}

impl Listener {
    /// Send datagrams of `batch` to clients with as few `sendmmsg` calls as
    /// the socket allows; `done(k, sent)` learns the fate of `out[k]` (see
    /// [`send_slots`]). The source address (`src`) is kept only on a
    /// wildcard listener.
    pub fn send_slots(
        &self,
        batch: &mut RecvBatch,
        out: &mut [SendSlot],
        mut done: impl FnMut(usize, Option<usize>),
    ) {
        let socket = self.socket.borrow();
        let Some(fd) = socket.as_ref().map(|s| s.as_raw_fd()) else {
            (0..out.len()).for_each(|k| done(k, None));
            return;
        };
        if !self.wildcard {
            out.iter_mut().for_each(|o| o.src = None);
        }
        send_slots(fd, batch, out, done);
    }

    /// The local address a datagram with PKTINFO `dst` was sent to.
    #[inline]
    pub fn local_addr(&self, dst: Option<PktInfo>) -> SocketAddr {
        match dst {
            Some(info) if self.wildcard => SocketAddr::new(info.addr, self.addr.port()),
            _ => self.addr,
        }
    }
}

/// Why a session flow ended (access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    IdleTimeout,
    /// Its backend was marked down (or left the healthy set).
    BackendDown,
    /// Its backend left the configuration.
    BackendRemoved,
    /// The backend answered with ICMP port unreachable.
    BackendRefused,
    ListenerClosed,
    Shutdown,
    Error,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::BackendDown => "backend_down",
            EndReason::BackendRemoved => "backend_removed",
            EndReason::BackendRefused => "backend_refused",
            EndReason::ListenerClosed => "listener_closed",
            EndReason::Shutdown => "shutdown",
            EndReason::Error => "error",
        }
    }
}

/// One UDP service as one worker runs it: its listeners, its session
/// flows and its dns-mode state (both may exist for a while after a reload
/// changed the mode).
pub(crate) struct UdpService {
    pub name: String,
    slot: RefCell<Rc<ServiceSlot>>,
    listeners: RefCell<Slab<Rc<Listener>>>,
    /// Snapshot id of the routes last reconciled with the flows.
    seen_snapshot: Cell<u64>,
    session: RefCell<session::Sessions>,
    dns: RefCell<Option<dnsmode::DnsState>>,
    closed: Cell<bool>,
    ticker_wake: Notify,
    /// Backends that refused (ICMP) recently, with when it was reported.
    refused: RefCell<HashMap<SocketAddr, u64>>,
}

impl fmt::Debug for UdpService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpService")
            .field("name", &self.name)
            .field("listeners", &self.listeners.borrow().len())
            .field("sessions", &self.session.borrow().len())
            .finish_non_exhaustive()
    }
}

impl UdpService {
    fn new(name: String, slot: Rc<ServiceSlot>) -> Self {
        let max = udp_settings(&slot.routes.borrow()).max_sessions as usize;
        UdpService {
            name,
            slot: RefCell::new(slot),
            listeners: RefCell::new(Slab::new()),
            seen_snapshot: Cell::new(u64::MAX),
            session: RefCell::new(flows::FlowTable::new(max)),
            dns: RefCell::new(None),
            closed: Cell::new(false),
            ticker_wake: Notify::new(),
            refused: RefCell::new(HashMap::new()),
        }
    }

    /// The service's routes slot (replaced when a service is re-created).
    pub fn slot(&self) -> Rc<ServiceSlot> {
        self.slot.borrow().clone()
    }

    /// The listener `key` if it is still the one with `uid`.
    pub fn listener(&self, key: u32, uid: u32) -> Option<Rc<Listener>> {
        self.listeners
            .borrow()
            .get(key as usize)
            .filter(|l| l.uid == uid)
            .cloned()
    }

    /// Run `f` with the listener `key`/`uid` without cloning its `Rc`.
    #[inline]
    pub fn with_listener<R>(
        &self,
        key: u32,
        uid: u32,
        f: impl FnOnce(&Listener) -> R,
    ) -> Option<R> {
        let listeners = self.listeners.borrow();
        listeners
            .get(key as usize)
            .filter(|l| l.uid == uid)
            .map(|l| f(l))
    }

    /// Bring the flows in line with new routes: flows (and dns queries) on
    /// a backend that is no longer healthy or no longer configured are
    /// forgotten, so their next datagram is balanced again.
    fn sync_routes(&self, worker: &Worker, routes: &ServiceRoutes) {
        let id = routes.snapshot.id();
        if self.seen_snapshot.get() == id {
            return;
        }
        self.seen_snapshot.set(id);
        let settings = udp_settings(routes);
        self.session
            .borrow_mut()
            .set_max(settings.max_sessions as usize);
        if let Some(dns) = self.dns.borrow_mut().as_mut() {
            dns.set_max(dnsmode::per_worker_max(
                settings.max_sessions,
                worker.cfg.workers,
            ));
        }
        // Cheap when nothing changed: the sets are small.
        let healthy: Vec<SocketAddr> = routes
            .snapshot
            .members()
            .iter()
            .filter_map(|m| routes.backends.get(m.endpoint.id as usize))
            .map(|b| b.addr)
            .collect();
        let gone = |addr: SocketAddr| -> Option<EndReason> {
            if healthy.contains(&addr) {
                None
            } else if routes.backends.iter().any(|b| b.addr == addr) {
                Some(EndReason::BackendDown)
            } else {
                Some(EndReason::BackendRemoved)
            }
        };
        session::forget_where(worker, self, routes, gone);
        dnsmode::forget_where(worker, self, |addr| gone(addr).is_some());
        // New routes may change the timeouts: re-arm the tick.
        self.ticker_wake.notify_one();
    }

    /// Forget flows and queries on `backend` at once (it went down or was
    /// removed).
    fn forget_backend(&self, worker: &Worker, backend: SocketAddr) {
        let slot = self.slot();
        let routes = slot.routes.borrow();
        let reason = if routes.backends.iter().any(|b| b.addr == backend) {
            EndReason::BackendDown
        } else {
            EndReason::BackendRemoved
        };
        session::forget_where(worker, self, &routes, |addr| {
            (addr == backend).then_some(reason)
        });
        dnsmode::forget_where(worker, self, |addr| addr == backend);
    }

    /// One expiry pass at `now`.
    fn tick(&self, worker: &Worker, now: u64) {
        let slot = self.slot();
        let routes = slot.routes.borrow();
        self.sync_routes(worker, &routes);
        let settings = udp_settings(&routes);
        session::expire(worker, self, &routes, now, settings.session_timeout);
        dnsmode::expire(worker, self, &routes, now, settings.query_timeout);
    }

    fn tick_period(&self) -> Duration {
        let slot = self.slot();
        let routes = slot.routes.borrow();
        let s = udp_settings(&routes);
        (s.session_timeout.min(s.query_timeout) / 4).clamp(TICK_MIN, TICK_MAX)
    }

    /// Receive and handle one batch from `listener`. True if the batch was
    /// full (more may be queued).
    fn read_listener(
        &self,
        worker: &Rc<Worker>,
        svc: &Rc<UdpService>,
        listener: &Listener,
        fd: RawFd,
    ) -> bool {
        let mut batch = worker.udp.batch.borrow_mut();
        let n = match batch.recv(fd) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                if worker.udp.may_warn() {
                    log::warn!("{}: receiving on {} failed: {e}", self.name, listener.addr);
                }
                return false;
            }
        };
        let slot = self.slot();
        let routes = slot.routes.borrow();
        self.sync_routes(worker, &routes);
        let now = now_nanos();
        match udp_settings(&routes).mode {
            UdpMode::Session => {
                session::from_clients(worker, svc, &slot, &routes, listener, &mut batch, n, now)
            }
            UdpMode::Dns => {
                dnsmode::from_clients(worker, svc, &slot, &routes, listener, &mut batch, n, now)
            }
        }
        n == batch.capacity()
    }

    /// A backend refused a datagram (ICMP port unreachable): tell the
    /// control thread (passive health), at most every 500 ms per backend.
    fn backend_refused(&self, worker: &Worker, backend: SocketAddr, now: u64) {
        let mut refused = self.refused.borrow_mut();
        let due = refused
            .get(&backend)
            .is_none_or(|&at| now.saturating_sub(at) >= REFUSED_REPORT_EVERY);
        if due {
            refused.insert(backend, now);
            drop(refused);
            worker.report_connect(&self.name, backend, Some(ConnectFailure::Refused));
        }
    }

    /// A backend answered: if it had refused before, report the recovery.
    #[inline]
    fn backend_answered(&self, worker: &Worker, backend: SocketAddr) {
        if self.refused.borrow().is_empty() {
            return;
        }
        if self.refused.borrow_mut().remove(&backend).is_some() {
            worker.report_connect(&self.name, backend, None);
        }
    }

    /// The last listener closed (or the worker stops): end every flow and
    /// close every upstream socket.
    fn shut_down(&self, worker: &Worker) {
        if self.closed.replace(true) {
            return;
        }
        let slot = self.slot();
        let routes = slot.routes.borrow();
        session::forget_where(worker, self, &routes, |_| Some(EndReason::Shutdown));
        dnsmode::shut_down(worker, self, &routes);
        self.ticker_wake.notify_one();
    }
}

/// The `udp:` settings of a service (defaults if it has none, which only
/// happens if a tcp service were handed a UDP socket).
pub(crate) fn udp_settings(routes: &ServiceRoutes) -> UdpSettings {
    routes.service.udp.unwrap_or_default()
}

/// Start serving a UDP listener of `service` (the AddUdpListener message).
pub(crate) fn add_listener(
    worker: &Rc<Worker>,
    slot: Rc<ServiceSlot>,
    service: String,
    addr: SocketAddr,
    socket: UdpSocket,
    stop: watch::Receiver<bool>,
) {
    if let Err(e) = socket.set_nonblocking(true) {
        log::error!("{service}: UDP listener {addr} cannot be made non-blocking: {e}");
        return;
    }
    let svc = {
        let mut services = worker.udp.services.borrow_mut();
        let existing = services.get(&service).filter(|s| !s.closed.get()).cloned();
        match existing {
            Some(svc) => {
                if !Rc::ptr_eq(&svc.slot.borrow(), &slot) {
                    *svc.slot.borrow_mut() = slot;
                }
                svc
            }
            None => {
                let svc = Rc::new(UdpService::new(service.clone(), slot));
                services.insert(service.clone(), svc.clone());
                tokio_uring::spawn(ticker(worker.clone(), svc.clone()));
                svc
            }
        }
    };
    let listener = {
        let mut listeners = svc.listeners.borrow_mut();
        let entry = listeners.vacant_entry();
        let listener = Rc::new(Listener {
            addr,
            wildcard: addr.ip().is_unspecified(),
            key: entry.key(),
            uid: worker.udp.uid(),
            socket: RefCell::new(Some(socket)),
        });
        entry.insert(listener.clone());
        listener
    };
    worker.conn_opened();
    tokio_uring::spawn(listener_task(worker.clone(), svc, listener, stop));
}

/// Forget flows of `service` on `backend` (the ForgetBackend message).
pub(crate) fn forget_backend(worker: &Worker, service: &str, backend: SocketAddr) {
    let svc = worker.udp.services.borrow().get(service).cloned();
    if let Some(svc) = svc {
        svc.forget_backend(worker, backend);
    }
}

async fn listener_task(
    worker: Rc<Worker>,
    svc: Rc<UdpService>,
    listener: Rc<Listener>,
    mut stop: watch::Receiver<bool>,
) {
    let fd = match listener.socket.borrow().as_ref() {
        Some(s) => s.as_raw_fd(),
        None => return,
    };
    log::debug!(
        "worker {}: serving UDP {} for {}",
        worker.cfg.index,
        listener.addr,
        svc.name
    );
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = op::poll(fd, op::READABLE) => {
                if let Err(e) = r {
                    if worker.udp.may_warn() {
                        log::warn!("{}: poll on UDP listener {} failed: {e}", svc.name, listener.addr);
                    }
                    tokio::time::sleep(TICK_MIN).await;
                    continue;
                }
            }
        }
        for _ in 0..ROUNDS_PER_WAKE {
            if !svc.read_listener(&worker, &svc, &listener, fd) {
                break;
            }
        }
    }
    // Stop: cancel the poll in the kernel, close the socket, and forget
    // what depended on it.
    svc.listeners.borrow_mut().try_remove(listener.key);
    let socket = listener.socket.borrow_mut().take();
    if let Some(socket) = socket {
        op::close(socket).await;
    }
    {
        let slot = svc.slot();
        let routes = slot.routes.borrow();
        let reason = if worker.draining.get() {
            EndReason::Shutdown
        } else {
            EndReason::ListenerClosed
        };
        session::listener_closed(&worker, &svc, &routes, &listener, reason);
    }
    if svc.listeners.borrow().is_empty() {
        svc.shut_down(&worker);
        let mut services = worker.udp.services.borrow_mut();
        if services.get(&svc.name).is_some_and(|s| Rc::ptr_eq(s, &svc)) {
            services.remove(&svc.name);
        }
    }
    log::debug!(
        "worker {}: UDP listener {} of {} closed",
        worker.cfg.index,
        listener.addr,
        svc.name
    );
    worker.conn_closed();
}

/// The expiry tick of one service: every `min(timeouts) / 4` (10 ms to
/// 1 s), expire idle flows and unanswered queries.
async fn ticker(worker: Rc<Worker>, svc: Rc<UdpService>) {
    while !svc.closed.get() {
        let period = svc.tick_period();
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = svc.ticker_wake.notified() => {}
        }
        if svc.closed.get() {
            break;
        }
        svc.tick(&worker, now_nanos());
    }
}

/// Send on a connected upstream socket; a pending error from an earlier
/// ICMP (refused) is cleared by the failed send, so try once more.
#[inline]
pub(crate) fn send_upstream(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    match uudp::send(fd, data) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => uudp::send(fd, data),
        r => r,
    }
}

/// Send `out` (datagrams of `batch`) on `fd` in order, with one
/// `sendmmsg` for all of them unless one fails; `done(k, sent)` learns the
/// fate of `out[k]`, in order: its length when it was sent, `None` when it
/// was not. A refused port is tried once more (the error
/// was an earlier datagram's ICMP, cleared by reporting it, as in
/// [`send_upstream`]); a full send buffer fails the rest; any other error
/// fails only the datagram it names.
pub(crate) fn send_slots(
    fd: RawFd,
    batch: &mut RecvBatch,
    out: &[SendSlot],
    mut done: impl FnMut(usize, Option<usize>),
) {
    let mut at = 0;
    let mut retried = false;
    while at < out.len() {
        match batch.send_slots(fd, &out[at..]) {
            Ok(n) if n > 0 => {
                (at..at + n).for_each(|k| done(k, Some(batch.data(out[k].slot).len())));
                at += n;
                retried = false;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && !retried => retried = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                (at..out.len()).for_each(|k| done(k, None));
                return;
            }
            _ => {
                done(at, None);
                at += 1;
                retried = false;
            }
        }
    }
}

/// Wait until the upstream socket `fd` is readable (true), or until its
/// flow or pool is closed: `stop` notified or `closed` set (false). The
/// caller then cancels the poll left in the kernel (`op::cancel_fd`)
/// before the socket is dropped.
pub(crate) async fn wait_readable(fd: RawFd, stop: &Notify, closed: &Cell<bool>) -> bool {
    if closed.get() {
        return false;
    }
    let ok = tokio::select! {
        biased;
        _ = stop.notified() => false,
        r = op::poll(fd, op::READABLE) => r.is_ok(),
    };
    ok && !closed.get()
}
