//! Session mode, the I/O shell of [`super::flows::FlowTable`]: each client
//! flow (client address, local address it sent to) gets its own connected
//! upstream socket to the backend picked for it, and a task that relays the
//! backend's datagrams back to the client from the address it sent to.

use std::cell::Cell;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_balance::{FlowKey, PickCtx};
use sluice_uring::op;
use sluice_uring::udp::{PktInfo, RecvBatch, SendSlot};
use tokio::sync::Notify;

use super::flows::{Flow, FlowRef, FlowTable, Full};
use super::{
    send_upstream, udp_settings, wait_readable, EndReason, Listener, UdpService, ROUNDS_PER_WAKE,
};
use crate::routes::{BackendRoute, ServiceRoutes};
use crate::worker::{now_nanos, ServiceSlot, Worker};

/// (client address, local address the client sent to).
pub(crate) type SessionKey = (SocketAddr, SocketAddr);
pub(crate) type Sessions = FlowTable<SessionKey, Rc<FlowIo>>;

/// The sockets and routing of one flow.
pub(crate) struct FlowIo {
    socket: UdpSocket,
    listener: Rc<Listener>,
    /// Where replies leave from (the client's destination address).
    local: Option<PktInfo>,
    route: BackendRoute,
    closed: Cell<bool>,
    stop: Notify,
}

impl std::fmt::Debug for FlowIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowIo")
            .field("backend", &self.route.addr)
            .finish_non_exhaustive()
    }
}

/// Handle a batch of client datagrams received on `listener`.
#[allow(clippy::too_many_arguments)]
pub(super) fn from_clients(
    worker: &Rc<Worker>,
    svc: &Rc<UdpService>,
    slot: &ServiceSlot,
    routes: &ServiceRoutes,
    listener: &Listener,
    batch: &mut RecvBatch,
    n: usize,
    now: u64,
) {
    let core = worker.cfg.index;
    let metrics = &routes.metrics;
    let mut table = svc.session.borrow_mut();
    for i in 0..n {
        let meta = batch.meta(i);
        let (Some(client), false) = (meta.src, meta.truncated) else {
            metrics.udp_dropped.inc(core);
            continue;
        };
        let local = listener.local_addr(meta.dst);
        let key = (client, local);
        let data = batch.data(i);
        let r = match table.lookup(&key) {
            Some(r) => r,
            None => match open_flow(
                worker, svc, slot, routes, listener, &mut table, key, meta.dst, now,
            ) {
                Some(r) => r,
                None => {
                    metrics.udp_dropped.inc(core);
                    continue;
                }
            },
        };
        let Some(flow) = table.get(r) else { continue };
        let io = &flow.data;
        match send_upstream(io.socket.as_raw_fd(), data) {
            Ok(_) => {
                metrics.udp_to_backend.inc(core);
                io.route
                    .metrics
                    .bytes_to_backend
                    .add(core, data.len() as u64);
                table.record_in(r, data.len(), now);
            }
            Err(_) => metrics.udp_dropped.inc(core),
        }
    }
}

/// A new flow for `key`: admit (max_sessions), pick a backend, open the
/// upstream socket, start its reader. `None` if the datagram is dropped
/// (counted by the caller; no_backend is counted here).
#[allow(clippy::too_many_arguments)]
fn open_flow(
    worker: &Rc<Worker>,
    svc: &Rc<UdpService>,
    slot: &ServiceSlot,
    routes: &ServiceRoutes,
    listener: &Listener,
    table: &mut Sessions,
    key: SessionKey,
    dst: Option<PktInfo>,
    now: u64,
) -> Option<FlowRef> {
    let core = worker.cfg.index;
    let listener = svc.listener(listener.key as u32, listener.uid)?;
    let max = udp_settings(routes).max_sessions;
    // max_sessions counts the flows of the service on every worker.
    if max == 0 || !routes.limit.try_acquire(max) {
        return None;
    }
    let flow = FlowKey::udp(key.0, key.1);
    let ctx = PickCtx {
        rand: worker.rand(),
        now_nanos: now,
    };
    let picked = routes
        .snapshot
        .pick(&flow, &ctx, &mut slot.pick.borrow_mut(), &[]);
    let Some(route) = picked.and_then(|id| routes.backends.get(id as usize)) else {
        routes.limit.release();
        routes.metrics.no_backend.inc(core);
        return None;
    };
    let socket = match sluice_uring::socket::udp_connected(route.addr) {
        Ok(s) => s,
        Err(e) => {
            routes.limit.release();
            if worker.udp.may_warn() {
                log::warn!(
                    "{}: cannot open a UDP socket to {}: {e}",
                    svc.name,
                    route.addr
                );
            }
            return None;
        }
    };
    let io = Rc::new(FlowIo {
        socket,
        listener,
        local: dst,
        route: route.clone(),
        closed: Cell::new(false),
        stop: Notify::new(),
    });
    let r = match table.insert(key, io.clone(), now) {
        Ok(r) => r,
        Err(Full(_)) => {
            routes.limit.release();
            return None;
        }
    };
    route.load.active.fetch_add(1, Ordering::Relaxed);
    route.metrics.connections.inc(core);
    route.metrics.active.add(core, 1);
    routes.metrics.udp_sessions.inc(core);
    worker.conn_opened();
    tokio_uring::spawn(reader(worker.clone(), svc.clone(), r, io));
    Some(r)
}

/// Relay the backend's datagrams of one flow to its client until the flow
/// ends; then cancel the poll and let the socket close.
async fn reader(worker: Rc<Worker>, svc: Rc<UdpService>, r: FlowRef, io: Rc<FlowIo>) {
    let fd = io.socket.as_raw_fd();
    let core = worker.cfg.index;
    'outer: while wait_readable(fd, &io.stop, &io.closed).await {
        for _ in 0..ROUNDS_PER_WAKE {
            let mut batch = worker.udp.batch.borrow_mut();
            let n = match batch.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    drop(batch);
                    // ICMP port unreachable (or another hard error): the
                    // backend is not there; end the flow so the client's
                    // next datagram is balanced again.
                    let refused = e.kind() == io::ErrorKind::ConnectionRefused;
                    let now = now_nanos();
                    if refused {
                        svc.backend_refused(&worker, io.route.addr, now);
                    }
                    let flow = svc.session.borrow_mut().remove(r);
                    if let Some(flow) = flow {
                        let slot = svc.slot();
                        let routes = slot.routes.borrow();
                        let reason = if refused {
                            EndReason::BackendRefused
                        } else {
                            EndReason::Error
                        };
                        end_flow(&worker, &routes, flow, reason, now);
                    }
                    break 'outer;
                }
            };
            let now = now_nanos();
            let slot = svc.slot();
            let routes = slot.routes.borrow();
            let metrics = &routes.metrics;
            let mut table = svc.session.borrow_mut();
            let Some(client) = table.get(r).map(|f| f.key.0) else {
                // The flow ended while its datagrams were queued.
                break 'outer;
            };
            // All of them to the client, with one `sendmmsg`.
            let mut slots = worker.udp.slots.borrow_mut();
            slots.clear();
            for i in 0..n {
                if batch.meta(i).truncated {
                    metrics.udp_dropped.inc(core);
                    continue;
                }
                slots.push(SendSlot {
                    slot: i,
                    dst: Some(client),
                    src: io.local,
                });
            }
            io.listener
                .send_slots(&mut batch, &mut slots, |_, sent| match sent {
                    Some(len) => {
                        metrics.udp_to_client.inc(core);
                        io.route.metrics.bytes_to_client.add(core, len as u64);
                        table.record_out(r, len, now);
                    }
                    None => metrics.udp_dropped.inc(core),
                });
            if n < batch.capacity() {
                break;
            }
        }
        svc.backend_answered(&worker, io.route.addr);
    }
    if let Err(e) = op::cancel_fd(fd).await {
        log::debug!("cancel on a UDP flow socket failed: {e}");
    }
    drop(io);
    worker.conn_closed();
}

/// End a flow taken out of the table: stop its reader, update the gauges
/// and counters, write the access log line.
fn end_flow(
    worker: &Worker,
    routes: &ServiceRoutes,
    flow: Flow<SessionKey, Rc<FlowIo>>,
    reason: EndReason,
    now: u64,
) {
    let core = worker.cfg.index;
    let io = &flow.data;
    io.closed.set(true);
    io.stop.notify_one();
    io.route.load.active.fetch_sub(1, Ordering::Relaxed);
    io.route.metrics.active.add(core, -1);
    routes.metrics.udp_sessions.dec(core);
    routes.limit.release();
    if routes.service.access_log {
        log::info!(
            "access service={} protocol=udp client={} listener={} backend={} bytes_to_backend={} bytes_to_client={} datagrams_to_backend={} datagrams_to_client={} duration_ms={} end={}",
            routes.name(),
            flow.key.0,
            flow.key.1,
            io.route.addr,
            flow.bytes_in,
            flow.bytes_out,
            flow.datagrams_in,
            flow.datagrams_out,
            Duration::from_nanos(flow.age(now)).as_millis(),
            reason.as_str()
        );
    }
}

/// Expire flows idle for `timeout` at `now`.
pub(super) fn expire(
    worker: &Worker,
    svc: &UdpService,
    routes: &ServiceRoutes,
    now: u64,
    timeout: Duration,
) {
    let timeout = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
    let mut ended = Vec::new();
    svc.session
        .borrow_mut()
        .expire(now, timeout, |f| ended.push(f));
    for flow in ended {
        end_flow(worker, routes, flow, EndReason::IdleTimeout, now);
    }
}

/// End every flow whose backend `reason_for` gives a reason for.
pub(super) fn forget_where(
    worker: &Worker,
    svc: &UdpService,
    routes: &ServiceRoutes,
    reason_for: impl Fn(SocketAddr) -> Option<EndReason>,
) {
    if svc.session.borrow().is_empty() {
        return;
    }
    let now = now_nanos();
    let mut ended = Vec::new();
    svc.session.borrow_mut().forget(
        |f| reason_for(f.data.route.addr).is_some(),
        |f| ended.push(f),
    );
    for flow in ended {
        let reason = reason_for(flow.data.route.addr).unwrap_or(EndReason::Error);
        end_flow(worker, routes, flow, reason, now);
    }
}

/// End the flows of a listener that closed (their replies have no way out).
pub(super) fn listener_closed(
    worker: &Worker,
    svc: &UdpService,
    routes: &ServiceRoutes,
    listener: &Rc<Listener>,
    reason: EndReason,
) {
    if svc.session.borrow().is_empty() {
        return;
    }
    let now = now_nanos();
    let mut ended = Vec::new();
    svc.session.borrow_mut().forget(
        |f| Rc::ptr_eq(&f.data.listener, listener),
        |f| ended.push(f),
    );
    for flow in ended {
        end_flow(worker, routes, flow, reason, now);
    }
}
