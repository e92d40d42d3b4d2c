//! DNS mode, the I/O shell of [`super::dns::QueryTable`]: every query is
//! balanced on its own and forwarded over a small pool of connected
//! upstream sockets per backend (round robin over the pool), with its ID
//! rewritten to one unique among this worker's outstanding queries of the
//! service. A reply is matched by ID and by the socket it came back on
//! (so it really is from the backend the query went to); its original ID
//! is restored and it is sent to the client from the address the client
//! sent to. Everything else that comes back is an orphan, counted and
//! dropped. Truncated (TC) replies pass through like any other.
//!
//! A backend that goes down or is removed takes no new query at once (the
//! routes no longer have it); its pool is *drained*: queries already in
//! flight still get their answer if it comes within `query_timeout`, then
//! its sockets close. So a reload that removes a live backend loses no
//! answer.

use std::cell::Cell;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use slab::Slab;
use sluice_balance::{Algorithm, FlowKey, PickCtx};
use sluice_uring::op;
use sluice_uring::udp::{PktInfo, RecvBatch, SendSlot};
use tokio::sync::Notify;

use super::dns::{is_response, set_message_id, QueryTable, Reply, HEADER_LEN, ID_SPACE};
use super::{send_slots, udp_settings, wait_readable, Listener, UdpService, ROUNDS_PER_WAKE};
use crate::routes::{BackendRoute, ServiceRoutes};
use crate::worker::{now_nanos, ServiceSlot, Worker};

/// Upstream sockets per backend per worker.
pub(crate) const POOL_SIZE: usize = 4;

const NO_POOL: u32 = u32::MAX;

/// Where the reply to one outstanding query goes, and what it left on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryRef {
    client: SocketAddr,
    local: Option<PktInfo>,
    listener: u32,
    listener_uid: u32,
    pool: u32,
    pool_uid: u32,
    sock: u8,
    /// Counted in the backend's `Load::active` (least_conn, two_choices,
    /// backend max_connections).
    active: bool,
}

/// One upstream socket and the stop switch of its reader task.
pub(crate) struct Upstream {
    socket: UdpSocket,
    closed: Cell<bool>,
    stop: Notify,
}

impl Upstream {
    fn close(&self) {
        self.closed.set(true);
        self.stop.notify_one();
    }
}

struct Pool {
    addr: SocketAddr,
    route: BackendRoute,
    sockets: Vec<Rc<Upstream>>,
    next: usize,
    uid: u32,
    /// Queries in flight on this pool.
    outstanding: u32,
    /// Forgotten: takes no new query, closes when `outstanding` is 0.
    draining: bool,
}

/// The dns-mode state of one service on one worker.
pub(crate) struct DnsState {
    table: QueryTable<QueryRef>,
    pools: Slab<Pool>,
    /// Pool of each backend index of the routes with snapshot `by_id_of`.
    by_id: Vec<u32>,
    by_id_of: u64,
    /// Queries of the batch being handled, to send once it is read (reused).
    forwards: Vec<Forward>,
    /// Replies of the batch being handled, to send once it is read (reused).
    replies: Vec<ToClient>,
}

/// A query of the current batch, accepted and waiting to be sent.
#[derive(Debug, Clone, Copy)]
struct Forward {
    fd: RawFd,
    slot: usize,
    id: u16,
    pool: usize,
    backend: usize,
    active: bool,
}

/// A reply of the current batch, waiting to be sent to its client.
#[derive(Debug, Clone, Copy)]
struct ToClient {
    listener: u32,
    listener_uid: u32,
    out: SendSlot,
}

impl std::fmt::Debug for DnsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsState")
            .field("outstanding", &self.table.len())
            .field("pools", &self.pools.len())
            .finish_non_exhaustive()
    }
}

/// `max_sessions` caps the queries in flight of the service; each worker
/// takes an even share (at most 65,536, the ID space).
pub(crate) fn per_worker_max(max_sessions: u32, workers: usize) -> usize {
    (max_sessions as usize)
        .div_ceil(workers.max(1))
        .min(ID_SPACE)
}

impl DnsState {
    fn new(max: usize, seed: u64) -> Self {
        DnsState {
            table: QueryTable::new(max, seed),
            pools: Slab::new(),
            by_id: Vec::new(),
            by_id_of: u64::MAX,
            forwards: Vec::new(),
            replies: Vec::new(),
        }
    }

    pub(crate) fn set_max(&mut self, max: usize) {
        self.table.set_max(max);
    }

    /// The pool of backend `id` of `routes`, opened on first use.
    fn pool_for(
        &mut self,
        worker: &Rc<Worker>,
        svc: &Rc<UdpService>,
        routes: &ServiceRoutes,
        id: usize,
    ) -> Option<usize> {
        let snapshot = routes.snapshot.id();
        if self.by_id_of != snapshot || self.by_id.len() != routes.backends.len() {
            self.by_id_of = snapshot;
            self.by_id.clear();
            self.by_id.resize(routes.backends.len(), NO_POOL);
        }
        let route = routes.backends.get(id)?;
        let cached = self.by_id[id];
        if cached != NO_POOL
            && self
                .pools
                .get(cached as usize)
                .is_some_and(|p| p.addr == route.addr && !p.draining)
        {
            return Some(cached as usize);
        }
        let key = match self
            .pools
            .iter()
            .find(|(_, p)| p.addr == route.addr && !p.draining)
        {
            Some((key, _)) => key,
            None => self.open_pool(worker, svc, route)?,
        };
        self.by_id[id] = key as u32;
        Some(key)
    }

    fn open_pool(
        &mut self,
        worker: &Rc<Worker>,
        svc: &Rc<UdpService>,
        route: &BackendRoute,
    ) -> Option<usize> {
        let mut sockets = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            match sluice_uring::socket::udp_connected(route.addr) {
                Ok(socket) => sockets.push(Rc::new(Upstream {
                    socket,
                    closed: Cell::new(false),
                    stop: Notify::new(),
                })),
                Err(e) => {
                    if worker.udp.may_warn() {
                        log::warn!(
                            "{}: cannot open a UDP socket to {}: {e}",
                            svc.name,
                            route.addr
                        );
                    }
                    break;
                }
            }
        }
        if sockets.is_empty() {
            return None;
        }
        let uid = worker.udp.uid();
        let key = self.pools.insert(Pool {
            addr: route.addr,
            route: route.clone(),
            sockets: sockets.clone(),
            next: 0,
            uid,
            outstanding: 0,
            draining: false,
        });
        for (i, up) in sockets.into_iter().enumerate() {
            worker.conn_opened();
            tokio_uring::spawn(reader(
                worker.clone(),
                svc.clone(),
                route.addr,
                key as u32,
                uid,
                i as u8,
                up,
            ));
        }
        log::debug!(
            "worker {}: {}: opened {} upstream sockets to {}",
            worker.cfg.index,
            svc.name,
            POOL_SIZE,
            route.addr
        );
        Some(key)
    }

    /// Forget pool `key`: it takes no new query; it closes now if nothing
    /// is in flight on it, else when the last query is answered or expires.
    fn drain_pool(&mut self, key: usize) {
        self.by_id
            .iter_mut()
            .filter(|k| **k == key as u32)
            .for_each(|k| *k = NO_POOL);
        let Some(pool) = self.pools.get_mut(key) else {
            return;
        };
        pool.draining = true;
        if pool.outstanding == 0 {
            self.close_pool(key);
        }
    }

    /// Close pool `key` and drop the queries still in flight on it;
    /// returns how many were dropped.
    fn close_pool(&mut self, key: usize) -> usize {
        let Some(pool) = self.pools.try_remove(key) else {
            return 0;
        };
        for up in &pool.sockets {
            up.close();
        }
        self.by_id
            .iter_mut()
            .filter(|k| **k == key as u32)
            .for_each(|k| *k = NO_POOL);
        let load = &pool.route.load;
        self.table.forget(
            |q| q.pool == key as u32 && q.pool_uid == pool.uid,
            |_, q| {
                if q.data.active {
                    load.active.fetch_sub(1, Ordering::Relaxed);
                }
            },
        )
    }
}

/// One query of pool `p` ended (answered or expired); a draining pool
/// whose last query ended is closed by the caller (true).
#[inline]
fn query_done(p: &mut Pool) -> bool {
    p.outstanding = p.outstanding.saturating_sub(1);
    p.draining && p.outstanding == 0
}

/// Handle a batch of queries received on `listener`.
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
    let mut state = svc.dns.borrow_mut();
    let dns = state.get_or_insert_with(|| {
        let max = per_worker_max(udp_settings(routes).max_sessions, worker.cfg.workers);
        DnsState::new(max, worker.rand())
    });
    let count_active = matches!(
        routes.snapshot.algorithm(),
        Algorithm::LeastConn | Algorithm::TwoChoices
    );
    let mut pick_state = slot.pick.borrow_mut();
    for i in 0..n {
        let meta = batch.meta(i);
        let client = match meta.src {
            Some(c) if !meta.truncated && meta.len >= HEADER_LEN => c,
            _ => {
                metrics.udp_dropped.inc(core);
                continue;
            }
        };
        let data = batch.data_mut(i);
        if is_response(data) {
            // Not a query (a reflected or stray response): never forward.
            metrics.udp_dropped.inc(core);
            continue;
        }
        let orig_id = u16::from_be_bytes([data[0], data[1]]);
        let local = listener.local_addr(meta.dst);
        let ctx = PickCtx {
            rand: worker.rand(),
            now_nanos: now,
        };
        let Some(id) =
            routes
                .snapshot
                .pick(&FlowKey::udp(client, local), &ctx, &mut pick_state, &[])
        else {
            metrics.no_backend.inc(core);
            metrics.udp_dropped.inc(core);
            continue;
        };
        let Some(route) = routes.backends.get(id as usize) else {
            metrics.udp_dropped.inc(core);
            continue;
        };
        let Some(pool_key) = dns.pool_for(worker, svc, routes, id as usize) else {
            metrics.udp_dropped.inc(core);
            continue;
        };
        let DnsState {
            table,
            pools,
            forwards,
            ..
        } = &mut *dns;
        let pool = &mut pools[pool_key];
        let sock = pool.next;
        pool.next = (sock + 1) % pool.sockets.len();
        let active = count_active || route.max_connections > 0;
        let q = QueryRef {
            client,
            local: meta.dst,
            listener: listener.key as u32,
            listener_uid: listener.uid,
            pool: pool_key as u32,
            pool_uid: pool.uid,
            sock: sock as u8,
            active,
        };
        let Some(new_id) = table.insert(orig_id, now, q) else {
            // Too many queries in flight (max_sessions).
            metrics.udp_dropped.inc(core);
            continue;
        };
        set_message_id(data, new_id);
        forwards.push(Forward {
            fd: pool.sockets[sock].socket.as_raw_fd(),
            slot: i,
            id: new_id,
            pool: pool_key,
            backend: id as usize,
            active,
        });
    }
    forward(dns, &mut worker.udp.slots.borrow_mut(), routes, batch, core);
}

/// Send the queries of the batch, one `sendmmsg` per upstream socket; a
/// query that cannot be sent gives its ID back.
fn forward(
    dns: &mut DnsState,
    slots: &mut Vec<SendSlot>,
    routes: &ServiceRoutes,
    batch: &mut RecvBatch,
    core: usize,
) {
    let metrics = &routes.metrics;
    let DnsState {
        table,
        pools,
        forwards,
        ..
    } = dns;
    // Stable within a socket: sorted by slot, which is arrival order.
    forwards.sort_unstable_by_key(|f| (f.fd, f.slot));
    for run in forwards.chunk_by(|a, b| a.fd == b.fd) {
        slots.clear();
        slots.extend(run.iter().map(|f| SendSlot {
            slot: f.slot,
            dst: None,
            src: None,
        }));
        send_slots(run[0].fd, batch, slots, |k, sent| {
            let f = &run[k];
            let Some(len) = sent else {
                let _ = table.answer(f.id, |_| true);
                metrics.udp_dropped.inc(core);
                return;
            };
            pools[f.pool].outstanding += 1;
            metrics.udp_to_backend.inc(core);
            if let Some(route) = routes.backends.get(f.backend) {
                if f.active {
                    route.load.active.fetch_add(1, Ordering::Relaxed);
                }
                route.metrics.connections.inc(core);
                route.metrics.bytes_to_backend.add(core, len as u64);
            }
        });
    }
    forwards.clear();
}

/// Relay the replies arriving on one upstream socket until it is closed;
/// then cancel the poll and let the socket close.
async fn reader(
    worker: Rc<Worker>,
    svc: Rc<UdpService>,
    backend: SocketAddr,
    pool: u32,
    uid: u32,
    sock: u8,
    up: Rc<Upstream>,
) {
    let fd = up.socket.as_raw_fd();
    let core = worker.cfg.index;
    'outer: while wait_readable(fd, &up.stop, &up.closed).await {
        for _ in 0..ROUNDS_PER_WAKE {
            let mut batch = worker.udp.batch.borrow_mut();
            let n = match batch.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // ICMP port unreachable for an earlier query: the
                    // error is cleared; report it (passive health).
                    drop(batch);
                    svc.backend_refused(&worker, backend, now_nanos());
                    continue;
                }
                Err(e) => {
                    log::debug!("{}: receiving from {backend} failed: {e}", svc.name);
                    break;
                }
            };
            let now = now_nanos();
            let slot = svc.slot();
            let routes = slot.routes.borrow();
            let metrics = &routes.metrics;
            let latency = routes.snapshot.algorithm() == Algorithm::LeastLatency;
            let decay = routes.snapshot.options().decay_nanos;
            let mut state = svc.dns.borrow_mut();
            let Some(dns) = state.as_mut() else {
                break 'outer;
            };
            let DnsState {
                table,
                pools,
                replies,
                ..
            } = &mut *dns;
            let Some(p) = pools.get_mut(pool as usize).filter(|p| p.uid == uid) else {
                break 'outer;
            };
            let mut drained = false;
            for i in 0..n {
                let meta = batch.meta(i);
                if meta.truncated || meta.len < HEADER_LEN {
                    metrics.udp_dropped.inc(core);
                    continue;
                }
                let data = batch.data_mut(i);
                let id = u16::from_be_bytes([data[0], data[1]]);
                let q = match table.answer(id, |q| {
                    q.pool == pool && q.pool_uid == uid && q.sock == sock
                }) {
                    Reply::Answer(q) => q,
                    Reply::Orphan => {
                        metrics.dns_orphan_reply.inc(core);
                        continue;
                    }
                };
                metrics.dns_answered.inc(core);
                drained |= query_done(p);
                if q.data.active {
                    p.route.load.active.fetch_sub(1, Ordering::Relaxed);
                }
                if latency {
                    p.route
                        .load
                        .observe(now.saturating_sub(q.sent_at).max(1), now, decay);
                }
                set_message_id(data, q.orig_id);
                let r = q.data;
                replies.push(ToClient {
                    listener: r.listener,
                    listener_uid: r.listener_uid,
                    out: SendSlot {
                        slot: i,
                        dst: Some(r.client),
                        src: r.local,
                    },
                });
            }
            // One `sendmmsg` per listener (in arrival order within it).
            replies.sort_unstable_by_key(|r| (r.listener, r.listener_uid, r.out.slot));
            for run in replies
                .chunk_by(|a, b| (a.listener, a.listener_uid) == (b.listener, b.listener_uid))
            {
                let mut slots = worker.udp.slots.borrow_mut();
                slots.clear();
                slots.extend(run.iter().map(|r| r.out));
                let done = |_, sent: Option<usize>| match sent {
                    Some(len) => {
                        metrics.udp_to_client.inc(core);
                        p.route.metrics.bytes_to_client.add(core, len as u64);
                    }
                    None => metrics.udp_dropped.inc(core),
                };
                if svc
                    .with_listener(run[0].listener, run[0].listener_uid, |l| {
                        l.send_slots(&mut batch, &mut slots, done)
                    })
                    .is_none()
                {
                    // The listener closed while the queries were out.
                    metrics.udp_dropped.add(core, run.len() as u64);
                }
            }
            replies.clear();
            if drained {
                // The last answer of a forgotten backend: close its pool
                // (this task sees `closed` and ends).
                dns.close_pool(pool as usize);
                break 'outer;
            }
            if n < batch.capacity() {
                break;
            }
        }
        svc.backend_answered(&worker, backend);
    }
    if let Err(e) = op::cancel_fd(fd).await {
        log::debug!("cancel on a DNS upstream socket failed: {e}");
    }
    drop(up);
    worker.conn_closed();
}

/// Expire queries unanswered for `timeout` at `now`.
pub(super) fn expire(
    worker: &Worker,
    svc: &UdpService,
    routes: &ServiceRoutes,
    now: u64,
    timeout: Duration,
) {
    let mut state = svc.dns.borrow_mut();
    let Some(dns) = state.as_mut() else { return };
    let core = worker.cfg.index;
    let timeout = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
    let latency = routes.snapshot.algorithm() == Algorithm::LeastLatency;
    let decay = routes.snapshot.options().decay_nanos;
    let DnsState { table, pools, .. } = &mut *dns;
    let mut drained = Vec::new();
    table.expire(now, timeout, |_, q| {
        routes.metrics.dns_timeout.inc(core);
        if let Some(p) = pools
            .get_mut(q.data.pool as usize)
            .filter(|p| p.uid == q.data.pool_uid)
        {
            if query_done(p) {
                drained.push(q.data.pool as usize);
            }
            if q.data.active {
                p.route.load.active.fetch_sub(1, Ordering::Relaxed);
            }
            if latency {
                // A lost query costs like the longest wait.
                p.route.load.observe(timeout.max(1), now, decay);
            }
        }
    });
    for key in drained {
        dns.close_pool(key);
    }
}

/// Forget the backends for which `gone` is true: their pools take no new
/// query and close once their queries in flight are answered or expired.
pub(super) fn forget_where(worker: &Worker, svc: &UdpService, gone: impl Fn(SocketAddr) -> bool) {
    let mut state = svc.dns.borrow_mut();
    let Some(dns) = state.as_mut() else { return };
    let keys: Vec<usize> = dns
        .pools
        .iter()
        .filter(|(_, p)| !p.draining && gone(p.addr))
        .map(|(k, _)| k)
        .collect();
    for key in keys {
        let (addr, outstanding) = (dns.pools[key].addr, dns.pools[key].outstanding);
        dns.drain_pool(key);
        log::debug!(
            "worker {}: {}: forgot backend {addr} ({outstanding} queries in flight may still be answered)",
            worker.cfg.index,
            svc.name
        );
    }
}

/// The service stops on this worker: close every pool (queries in flight
/// are dropped and counted), free the table.
pub(super) fn shut_down(worker: &Worker, svc: &UdpService, routes: &ServiceRoutes) {
    let mut state = svc.dns.borrow_mut();
    if let Some(dns) = state.as_mut() {
        let keys: Vec<usize> = dns.pools.iter().map(|(k, _)| k).collect();
        let dropped: usize = keys.into_iter().map(|k| dns.close_pool(k)).sum();
        routes
            .metrics
            .udp_dropped
            .add(worker.cfg.index, dropped as u64);
    }
    state.take();
}
