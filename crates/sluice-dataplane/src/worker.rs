//! The worker thread: one tokio-uring runtime, its listeners, its
//! connections, and the message loop that applies control updates.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use sluice_balance::PickState;
use sluice_uring::bufring::BufRing;
use sluice_uring::pipe::PipePool;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{watch, Notify};

use crate::conns::TcpConns;
use crate::routes::ServiceRoutes;
use crate::{tcp, WorkerEvent, WorkerMsg};

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// 0-based; also the per-core slot in the metrics.
    pub index: usize,
    /// Total number of workers.
    pub workers: usize,
    /// Pin the thread to CPU `index` (wrapping over the allowed CPUs).
    pub pin: bool,
    /// io_uring submission queue entries.
    pub ring_entries: u32,
    /// Pipes this worker may hold at once for splice.
    pub max_pipes: usize,
    /// Capacity asked for each pipe.
    pub pipe_size: usize,
    /// Size of each copy buffer.
    pub buf_size: usize,
    /// Listen backlog for TCP listeners the worker creates (control binds
    /// them; kept here for completeness of the worker's settings).
    pub backlog: i32,
}

impl WorkerConfig {
    pub fn new(index: usize, workers: usize) -> Self {
        Self {
            index,
            workers,
            pin: true,
            ring_entries: 1024,
            max_pipes: 64,
            pipe_size: 1 << 20,
            buf_size: 256 * 1024,
            backlog: 4096,
        }
    }
}

/// The control thread's handle on a worker.
#[derive(Debug)]
pub struct WorkerHandle {
    index: usize,
    tx: Sender<WorkerMsg>,
    notify: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Send a message and wake the worker. False when the worker is gone.
    pub fn send(&self, msg: WorkerMsg) -> bool {
        let ok = self.tx.send(msg).is_ok();
        self.notify.notify_one();
        ok
    }

    /// Wait for the worker thread to end.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("worker {} panicked", self.index);
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

/// Start a worker thread named `sluice-w<index>`.
pub fn spawn_worker(
    cfg: WorkerConfig,
    events: UnboundedSender<WorkerEvent>,
) -> io::Result<WorkerHandle> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let notify = Arc::new(Notify::new());
    let index = cfg.index;
    let wake = notify.clone();
    let thread = std::thread::Builder::new()
        .name(format!("sluice-w{index}"))
        .spawn(move || run(cfg, rx, wake, events))?;
    Ok(WorkerHandle {
        index,
        tx,
        notify,
        thread: Some(thread),
    })
}

/// Process-wide monotonic epoch for `PickCtx::now_nanos` (shared by all
/// workers so latency EWMA stamps compare across cores).
pub(crate) fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A service as one worker sees it.
#[derive(Debug)]
pub(crate) struct ServiceSlot {
    pub routes: RefCell<Arc<ServiceRoutes>>,
    pub pick: RefCell<PickState>,
}

impl ServiceSlot {
    pub fn routes(&self) -> Arc<ServiceRoutes> {
        self.routes.borrow().clone()
    }
}

/// State shared by the tasks of one worker (single thread: `Rc`, `Cell`).
#[derive(Debug)]
pub(crate) struct Worker {
    pub cfg: WorkerConfig,
    pub events: UnboundedSender<WorkerEvent>,
    services: RefCell<HashMap<String, Rc<ServiceSlot>>>,
    /// Stop switches of the listener tasks, by (service, address).
    listeners: RefCell<HashMap<(String, SocketAddr), watch::Sender<bool>>>,
    pub pipes: RefCell<PipePool>,
    bufs: RefCell<Vec<Vec<u8>>>,
    /// Open connections (TCP) on this worker.
    conns: Cell<usize>,
    conns_changed: Notify,
    /// Open TCP connections: idle timeouts and the shutdown deadline.
    pub tcp: TcpConns,
    pub draining: Cell<bool>,
    rng: RefCell<fastrand::Rng>,
    /// When the "pipe pool exhausted" note was last logged.
    pipe_note: Cell<Option<Instant>>,
    /// Consecutive connect failures per backend seen by this worker.
    fail_streak: RefCell<HashMap<(String, SocketAddr), u32>>,
    /// UDP services (session and dns modes) of this worker.
    pub(crate) udp: crate::udp::UdpWorker,
    /// The provided-buffer ring of keep-alive conversations, made on first
    /// use (see `recv_ring`).
    recv_ring: RefCell<RecvRing>,
}

/// The state of a worker's provided-buffer ring.
#[derive(Debug)]
enum RecvRing {
    Untried,
    Ready(Rc<BufRing>),
    /// The kernel has no provided-buffer rings or multishot receives:
    /// conversations wait with polls instead.
    Unavailable,
}

const MAX_IDLE_BUFS: usize = 64;
/// Buffers in a worker's receive ring, and their size: a conversation's
/// message fits one buffer (a direction that fills one goes back to
/// reading, and maybe splicing, by itself). 256 x 16 KiB is 4 MiB of
/// address space per worker, committed as buffers get used.
const RECV_RING_ENTRIES: u16 = 256;
const RECV_RING_BUF: usize = 16 * 1024;
/// The buffer group id of the receive ring (the only group of the ring).
const RECV_RING_GROUP: u16 = 0;

impl Worker {
    pub fn rand(&self) -> u64 {
        self.rng.borrow_mut().u64(..)
    }

    /// A pipe for splice, or `None` (the caller copies instead). When the
    /// pool runs dry, say so once a minute: operators may want more pipe
    /// memory (`fs.pipe-user-pages-soft`) for this worker count.
    pub fn take_pipe(&self) -> Option<sluice_uring::pipe::Pipe> {
        let mut pool = self.pipes.borrow_mut();
        let pipe = pool.get();
        if pipe.is_none()
            && self
                .pipe_note
                .get()
                .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            self.pipe_note.set(Some(Instant::now()));
            log::info!(
                "worker {}: splice pipe pool exhausted ({} pipes in use); copying through buffers until pipes free up",
                self.cfg.index,
                pool.in_use()
            );
        }
        pipe
    }

    /// The worker's ring of receive buffers for multishot receives, made
    /// the first time a conversation asks; `None` when the kernel cannot
    /// (then conversations wait with polls).
    pub fn recv_ring(&self) -> Option<Rc<BufRing>> {
        let mut state = self.recv_ring.borrow_mut();
        if let RecvRing::Untried = *state {
            *state = match BufRing::new(RECV_RING_GROUP, RECV_RING_ENTRIES, RECV_RING_BUF) {
                Ok(ring) => RecvRing::Ready(ring),
                Err(e) => {
                    log::info!(
                        "worker {}: no provided-buffer ring ({e}); keep-alive connections wait with polls",
                        self.cfg.index
                    );
                    RecvRing::Unavailable
                }
            };
        }
        match &*state {
            RecvRing::Ready(ring) => Some(ring.clone()),
            _ => None,
        }
    }

    /// The kernel refused a multishot receive (`EINVAL`): stop using them.
    pub fn recv_ring_unsupported(&self) {
        let mut state = self.recv_ring.borrow_mut();
        if !matches!(*state, RecvRing::Unavailable) {
            log::info!(
                "worker {}: multishot receives are not supported; keep-alive connections wait with polls",
                self.cfg.index
            );
            *state = RecvRing::Unavailable;
        }
    }

    pub fn take_buf(&self) -> Vec<u8> {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.cfg.buf_size])
    }

    pub fn put_buf(&self, buf: Vec<u8>) {
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < MAX_IDLE_BUFS {
            bufs.push(buf);
        }
    }

    pub fn conn_opened(&self) {
        self.conns.set(self.conns.get() + 1);
    }

    pub fn conn_closed(&self) {
        self.conns.set(self.conns.get().saturating_sub(1));
        if self.conns.get() == 0 {
            self.conns_changed.notify_waiters();
        }
    }

    /// Record a connect result for passive health: every failure is
    /// reported; a success is reported only when it ends a failure streak.
    pub fn report_connect(
        &self,
        service: &str,
        backend: SocketAddr,
        failure: Option<crate::ConnectFailure>,
    ) {
        let mut streaks = self.fail_streak.borrow_mut();
        match failure {
            Some(why) => {
                *streaks.entry((service.to_string(), backend)).or_insert(0) += 1;
                let _ = self.events.send(WorkerEvent::ConnectFailed {
                    worker: self.cfg.index,
                    service: service.to_string(),
                    backend,
                    why,
                });
            }
            None => {
                // The common case, checked before building any key: no
                // backend has failed on this worker.
                if streaks.is_empty() {
                    return;
                }
                if streaks.remove(&(service.to_string(), backend)).is_some() {
                    let _ = self.events.send(WorkerEvent::ConnectRecovered {
                        worker: self.cfg.index,
                        service: service.to_string(),
                        backend,
                    });
                }
            }
        }
    }

    /// Register a new listener of `service` on `addr`: its stop switch (a
    /// listener already there is stopped) and the service's slot; `None`
    /// (logged) when the service is unknown. RemoveListener, RemoveService
    /// and Shutdown stop it by flipping the switch.
    fn register_listener(
        &self,
        service: &str,
        addr: SocketAddr,
    ) -> Option<(Rc<ServiceSlot>, watch::Receiver<bool>)> {
        let Some(slot) = self.services.borrow().get(service).cloned() else {
            log::error!(
                "worker {}: listener {addr} for unknown service {service}",
                self.cfg.index
            );
            return None;
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        if let Some(old) = self
            .listeners
            .borrow_mut()
            .insert((service.to_string(), addr), stop_tx)
        {
            let _ = old.send(true);
        }
        Some((slot, stop_rx))
    }

    fn apply(self: &Rc<Self>, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Routes(list) => {
                let mut services = self.services.borrow_mut();
                for routes in list {
                    match services.get(routes.name()) {
                        Some(slot) => *slot.routes.borrow_mut() = routes,
                        None => {
                            let name = routes.name().to_string();
                            let slot = ServiceSlot {
                                routes: RefCell::new(routes),
                                pick: RefCell::new(PickState::default()),
                            };
                            services.insert(name, Rc::new(slot));
                        }
                    }
                }
            }
            WorkerMsg::RemoveService(name) => {
                self.services.borrow_mut().remove(&name);
                let mut listeners = self.listeners.borrow_mut();
                listeners.retain(|(svc, _), stop| {
                    let keep = *svc != name;
                    if !keep {
                        let _ = stop.send(true);
                    }
                    keep
                });
            }
            WorkerMsg::AddTcpListener {
                service,
                addr,
                socket,
            } => {
                if let Some((slot, stop)) = self.register_listener(&service, addr) {
                    tokio_uring::spawn(tcp::accept_loop(self.clone(), slot, socket, addr, stop));
                }
            }
            WorkerMsg::AddUdpListener {
                service,
                addr,
                socket,
            } => {
                if let Some((slot, stop)) = self.register_listener(&service, addr) {
                    crate::udp::add_listener(self, slot, service, addr, socket, stop);
                }
            }
            WorkerMsg::RemoveListener { service, addr } => {
                if let Some(stop) = self.listeners.borrow_mut().remove(&(service, addr)) {
                    let _ = stop.send(true);
                }
            }
            WorkerMsg::ForgetBackend { service, backend } => {
                crate::udp::forget_backend(self, &service, backend);
            }
            WorkerMsg::Sync(done) => {
                let _ = done.send(());
            }
            WorkerMsg::Shutdown { deadline } => {
                if self.draining.replace(true) {
                    return;
                }
                for (_, stop) in self.listeners.borrow_mut().drain() {
                    let _ = stop.send(true);
                }
                let me = self.clone();
                tokio_uring::spawn(async move {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    loop {
                        let changed = me.conns_changed.notified();
                        if me.conns.get() == 0 {
                            break;
                        }
                        if tokio::time::timeout_at(deadline, changed).await.is_err() {
                            log::info!(
                                "worker {}: shutdown timeout, closing {} connection(s)",
                                me.cfg.index,
                                me.conns.get()
                            );
                            me.tcp.stop_all();
                            break;
                        }
                    }
                });
            }
        }
    }
}

fn run(
    cfg: WorkerConfig,
    rx: Receiver<WorkerMsg>,
    wake: Arc<Notify>,
    events: UnboundedSender<WorkerEvent>,
) {
    if cfg.pin {
        if let Err(e) = sluice_uring::sys::pin_current_thread(cfg.index) {
            log::warn!("worker {}: cannot pin to a CPU: {e}", cfg.index);
        }
    }
    let index = cfg.index;
    let entries = cfg.ring_entries;
    let pipes = PipePool::new(cfg.max_pipes, cfg.max_pipes / 2, cfg.pipe_size);
    let seed =
        0x9e37_79b9_7f4a_7c15 ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ now_nanos();
    let worker = Rc::new(Worker {
        cfg,
        events: events.clone(),
        services: RefCell::new(HashMap::new()),
        listeners: RefCell::new(HashMap::new()),
        pipes: RefCell::new(pipes),
        bufs: RefCell::new(Vec::new()),
        conns: Cell::new(0),
        conns_changed: Notify::new(),
        tcp: TcpConns::new(),
        draining: Cell::new(false),
        rng: RefCell::new(fastrand::Rng::with_seed(seed)),
        pipe_note: Cell::new(None),
        fail_streak: RefCell::new(HashMap::new()),
        udp: crate::udp::UdpWorker::new(),
        recv_ring: RefCell::new(RecvRing::Untried),
    });
    sluice_uring::runtime::start(entries, async {
        let sweeper = worker.clone();
        tokio_uring::spawn(async move { sweeper.tcp.sweep_loop().await });
        loop {
            // Apply every queued message, then wait for the next wake-up
            // (no polling: the control thread notifies after each send).
            let woken = wake.notified();
            while let Ok(msg) = rx.try_recv() {
                worker.apply(msg);
            }
            if worker.draining.get() && worker.conns.get() == 0 {
                break;
            }
            if worker.draining.get() {
                let closed = worker.conns_changed.notified();
                tokio::select! {
                    _ = woken => {}
                    _ = closed => {}
                }
            } else {
                woken.await;
            }
        }
        // Unregister the receive ring while the runtime still runs (a ring
        // still referenced by a connection is left mapped at exit).
        *worker.recv_ring.borrow_mut() = RecvRing::Unavailable;
    });
    let _ = events.send(WorkerEvent::Exited { worker: index });
}
