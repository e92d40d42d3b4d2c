//! The admin HTTP endpoint: `GET /metrics`, `GET /status`, `GET /healthz`.
//!
//! What it owns: one listening socket (bound only where `admin.listen`
//! says), one OS thread named `sluice-admin` with its own current-thread
//! tokio runtime, and the HTTP/1.1 connections on it (hyper 1).
//!
//! The rule: the admin endpoint is a **read-only observer on its own
//! thread** and must never block, slow down or wait for the control thread
//! or a worker. It reads two things, both without waiting for anyone:
//!
//! * an [`AdminView`] that the control thread builds after every change of
//!   configuration and hands over with [`AdminShared::publish`]. The view is
//!   immutable; the lock around it is held only to clone or swap an `Arc`,
//!   never while encoding or writing a response;
//! * the live metric cells (`Arc<ServiceMetrics>`, `Arc<BackendMetrics>`,
//!   `Arc<GlobalMetrics>`) the view holds handles to: atomics, read with
//!   relaxed loads. Health (`BackendMetrics::up`) and active connections are
//!   read live from them, so a health change needs no new view (publishing
//!   one anyway is cheap and harmless).
//!
//! It never writes to anything the control thread or the workers own, and a
//! slow or hostile client can only tie up the admin thread's own resources,
//! which are bounded ([`AdminLimits`]): header read timeout (which is also
//! the keep-alive idle timeout), a small request buffer, a cap on open
//! connections (the least recently active one is closed to admit a new
//! one, so stalled connections cannot lock a scraper out) and a maximum
//! connection age.
//!
//! ```
//! use std::path::Path;
//! use std::sync::Arc;
//! use std::time::SystemTime;
//! use sluice_control::admin::{self, AdminShared, AdminView};
//! use sluice_control::registry::Registry;
//!
//! let config = sluice_config::load_str(
//!     "services:\n  - name: web\n    protocol: tcp\n    listen: [\"127.0.0.1:8080\"]\n    \
//!      backends:\n      - address: 127.0.0.1:9000\n",
//!     "sluice.yaml",
//! )
//! .unwrap();
//! let mut registry = Registry::new(2);
//! let view = AdminView::from_config(&config, Path::new("sluice.yaml"), SystemTime::now(), 2, &mut registry);
//! let shared = Arc::new(AdminShared::new(registry.global.clone(), Arc::new(view)));
//! let handle = admin::start("127.0.0.1:0".parse().unwrap(), shared.clone()).unwrap();
//! assert!(handle.local_addr().port() != 0);
//!
//! // later, after a reload (control thread):
//! let view = AdminView::from_config(&config, Path::new("sluice.yaml"), SystemTime::now(), 2, &mut registry);
//! shared.publish(Arc::new(view));
//!
//! handle.stop();
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use sluice_config::{Balance, Config, Protocol};
use sluice_metrics::{BackendMetrics, GlobalMetrics, ServiceMetrics};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::registry::Registry;

// ---- the view --------------------------------------------------------------

/// What `/status` and `/metrics` show: the running configuration as plain
/// data plus handles to the live metric cells of its services and backends.
///
/// Built by the control thread ([`AdminView::from_config`]) and published
/// with [`AdminShared::publish`]; never mutated after that.
#[derive(Debug, Clone)]
pub struct AdminView {
    /// The configuration file the running configuration came from.
    pub config_path: PathBuf,
    /// When that configuration was loaded (start-up or last good reload).
    pub loaded_at: SystemTime,
    /// Number of io_uring worker loops.
    pub workers: usize,
    /// In configuration order.
    pub services: Vec<ServiceView>,
}

/// One service of an [`AdminView`].
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub name: String,
    pub protocol: Protocol,
    pub listen: Vec<SocketAddr>,
    pub balance: Balance,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// `tcp`, `send_expect`, `dns` or `none`.
    pub health_check: &'static str,
    pub backends: Vec<BackendView>,
    /// Live cells of the service (label `service`).
    pub metrics: Arc<ServiceMetrics>,
}

/// One backend of a [`ServiceView`].
#[derive(Debug, Clone)]
pub struct BackendView {
    /// The resolved address sluice connects to (`IP:port`).
    pub addr: SocketAddr,
    /// The address as written in the file (may be `host:port`).
    pub configured: String,
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// Live cells of the backend: `up` and `active` are read from here.
    pub metrics: Arc<BackendMetrics>,
}

/// Where [`AdminView::from_config`] gets the long-lived metric cells of a
/// service or backend (the same objects the workers write).
///
/// Implemented for [`Registry`], which creates missing entries, exactly as
/// building the routes does.
pub trait MetricsSource {
    fn service_metrics(&mut self, service: &str) -> Arc<ServiceMetrics>;
    fn backend_metrics(&mut self, service: &str, addr: SocketAddr) -> Arc<BackendMetrics>;
}

impl MetricsSource for Registry {
    fn service_metrics(&mut self, service: &str) -> Arc<ServiceMetrics> {
        Registry::service_metrics(self, service)
    }
    fn backend_metrics(&mut self, service: &str, addr: SocketAddr) -> Arc<BackendMetrics> {
        Registry::backend_metrics(self, service, addr)
    }
}

impl AdminView {
    /// The view of `config`, loaded from `path` at `loaded_at`, running on
    /// `workers` loops, with metric cells taken from `metrics`.
    pub fn from_config(
        config: &Config,
        path: &Path,
        loaded_at: SystemTime,
        workers: usize,
        metrics: &mut impl MetricsSource,
    ) -> AdminView {
        let services = config
            .services
            .iter()
            .map(|s| ServiceView {
                name: s.name.clone(),
                protocol: s.protocol,
                listen: s.listen.clone(),
                balance: s.balance,
                max_connections: s.max_connections,
                health_check: s.health_check.kind.name(),
                metrics: metrics.service_metrics(&s.name),
                backends: s
                    .backends
                    .iter()
                    .map(|b| BackendView {
                        addr: b.addr,
                        configured: b.address.clone(),
                        weight: b.weight,
                        max_connections: b.max_connections,
                        metrics: metrics.backend_metrics(&s.name, b.addr),
                    })
                    .collect(),
            })
            .collect();
        AdminView {
            config_path: path.to_path_buf(),
            loaded_at,
            workers,
            services,
        }
    }

    /// The metric cells of every service and backend of this view.
    pub fn metric_sets(&self) -> (Vec<Arc<ServiceMetrics>>, Vec<Arc<BackendMetrics>>) {
        let services = self.services.iter().map(|s| s.metrics.clone()).collect();
        let backends = self
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.metrics.clone()))
            .collect();
        (services, backends)
    }

    /// The `/metrics` body (Prometheus text, [`sluice_metrics::CONTENT_TYPE`]).
    pub fn metrics_text(&self, global: &GlobalMetrics) -> String {
        let (services, backends) = self.metric_sets();
        sluice_metrics::encode(global, &services, &backends)
    }

    /// The `/status` document (schema in `docs/operations.md`).
    pub fn status_json(&self, global: &GlobalMetrics) -> Value {
        let loaded_unix = self
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let services: Vec<Value> = self
            .services
            .iter()
            .map(|s| {
                let backends: Vec<Value> = s
                    .backends
                    .iter()
                    .map(|b| {
                        let up = b.metrics.up.load(Ordering::Relaxed);
                        json!({
                            "address": b.addr.to_string(),
                            "configured_address": b.configured,
                            "weight": b.weight,
                            "health": if up { "up" } else { "down" },
                            "active_connections": b.metrics.active.get_clamped(),
                            "max_connections": b.max_connections,
                        })
                    })
                    .collect();
                let up = backends.iter().filter(|b| b["health"] == "up").count();
                json!({
                    "name": s.name,
                    "protocol": s.protocol.as_str(),
                    "listen": s.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "balance": s.balance.as_str(),
                    "max_connections": s.max_connections,
                    "health_check": s.health_check,
                    "backends_up": up,
                    "backends": backends,
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config": {
                "path": self.config_path.display().to_string(),
                "loaded_at": humantime::format_rfc3339_seconds(self.loaded_at).to_string(),
                "loaded_at_unix": loaded_unix,
            },
            "reloads": {
                "success": global.reloads_success.load(Ordering::Relaxed),
                "failure": global.reloads_failure.load(Ordering::Relaxed),
            },
            "workers": self.workers,
            "services": services,
        })
    }
}

/// What the control thread shares with the admin thread: the current
/// [`AdminView`] and the process-wide metrics.
#[derive(Debug)]
pub struct AdminShared {
    view: RwLock<Arc<AdminView>>,
    global: Arc<GlobalMetrics>,
}

impl AdminShared {
    pub fn new(global: Arc<GlobalMetrics>, view: Arc<AdminView>) -> Self {
        AdminShared {
            view: RwLock::new(view),
            global,
        }
    }

    /// Replace the view (control thread). Holds the lock only for the swap;
    /// requests in flight finish with the view they started with.
    pub fn publish(&self, view: Arc<AdminView>) {
        let old = {
            let mut slot = self.view.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *slot, view)
        };
        // The previous view (maybe the last handle to removed backends'
        // cells) is dropped outside the lock.
        drop(old);
    }

    /// The current view (the lock is released before this returns).
    pub fn view(&self) -> Arc<AdminView> {
        let slot = self.view.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(&slot)
    }

    pub fn global(&self) -> &Arc<GlobalMetrics> {
        &self.global
    }
}

// ---- limits ----------------------------------------------------------------

/// Bounds on what clients can make the admin thread hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// A request head (request line and headers) must arrive in full within
    /// this time of the server starting to wait for it, or the connection
    /// is closed. It also closes idle keep-alive connections: the wait for
    /// the next request starts when the previous response is done.
    pub header_read_timeout: Duration,
    /// Read buffer per connection; a request head larger than this gets
    /// `431` and the connection is closed. At least 8 KiB (hyper's minimum;
    /// smaller values are raised to it).
    pub max_buf_size: usize,
    /// Open connections at most. A connection beyond it is still accepted
    /// (so the backlog never fills) and the least recently active open
    /// connection is closed to make room. At least 1.
    pub max_connections: usize,
    /// A connection older than this is asked to close after its current
    /// response; if it has not within [`close_grace`](Self::close_grace),
    /// it is closed anyway (bounds clients that never read).
    pub max_connection_age: Duration,
    pub close_grace: Duration,
}

/// hyper's smallest allowed `max_buf_size`.
const MIN_BUF_SIZE: usize = 8192;
/// Headers per request at most.
const MAX_HEADERS: usize = 64;
/// `accept` failed (out of descriptors, ...): wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const LISTEN_BACKLOG: i32 = 1024;

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            header_read_timeout: Duration::from_secs(5),
            max_buf_size: 16 * 1024,
            max_connections: 64,
            max_connection_age: Duration::from_secs(60),
            close_grace: Duration::from_secs(5),
        }
    }
}

// ---- the server ------------------------------------------------------------

/// The running admin endpoint. Dropping it stops it, like [`stop`](Self::stop).
#[derive(Debug)]
pub struct AdminHandle {
    local_addr: SocketAddr,
    conns: Arc<Mutex<Conns>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AdminHandle {
    /// The address actually bound (the port, when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        lock(&self.conns).open.len()
    }

    /// Close the listener and every connection, and wait for the admin
    /// thread to end (it does not wait for any client).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("admin endpoint thread panicked");
            }
        }
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Bind `listen` and serve the admin endpoint on its own thread with
/// [`AdminLimits::default`]. A bind failure is returned (its message names
/// the address); nothing is left running then.
pub fn start(listen: SocketAddr, shared: Arc<AdminShared>) -> Result<AdminHandle, io::Error> {
    start_with(listen, shared, AdminLimits::default())
}

/// [`start`] with explicit limits.
pub fn start_with(
    listen: SocketAddr,
    shared: Arc<AdminShared>,
    limits: AdminLimits,
) -> Result<AdminHandle, io::Error> {
    let named = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("admin endpoint: cannot listen on {listen}: {e}"),
        )
    };
    let std_listener = bind(listen).map_err(named)?;
    let local_addr = std_listener.local_addr().map_err(named)?;

    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buf_size.max(MIN_BUF_SIZE))
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        .half_close(false);

    let conns = Arc::new(Mutex::new(Conns::default()));
    let server = Arc::new(Server {
        shared,
        builder,
        limits,
        conns: conns.clone(),
    });
    let (stop_tx, stop_rx) = oneshot::channel();
    // The runtime is built, run and dropped on the admin thread only: the
    // caller may itself be inside a runtime (the control thread), where
    // dropping another one would panic.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
    let thread = std::thread::Builder::new()
        .name("sluice-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let listener = {
                let _ctx = rt.enter();
                TcpListener::from_std(std_listener)
            };
            match listener {
                Ok(listener) => {
                    let _ = ready_tx.send(Ok(()));
                    rt.block_on(accept_loop(listener, server, stop_rx));
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
            // Dropping the runtime drops every connection task: all admin
            // sockets close here.
        })
        .map_err(|e| io::Error::new(e.kind(), format!("admin endpoint: thread: {e}")))?;
    let started = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the thread ended during start-up")));
    if let Err(e) = started {
        let _ = thread.join();
        return Err(io::Error::new(
            e.kind(),
            format!("admin endpoint on {listen}: {e}"),
        ));
    }

    log::info!("admin endpoint listening on http://{local_addr}");
    Ok(AdminHandle {
        local_addr,
        conns,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

fn bind(listen: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// State of the admin thread shared by its tasks.
struct Server {
    shared: Arc<AdminShared>,
    builder: http1::Builder,
    limits: AdminLimits,
    conns: Arc<Mutex<Conns>>,
}

/// The open connections. Only the admin thread touches it (the handle
/// counts it), so the mutex is never contended for long.
#[derive(Debug, Default)]
struct Conns {
    next_id: u64,
    open: HashMap<u64, ConnEntry>,
}

#[derive(Debug)]
struct ConnEntry {
    /// Accepted, or the last request head received.
    last_active: Instant,
    /// Dropping it closes the connection.
    _kill: oneshot::Sender<()>,
}

fn lock(conns: &Mutex<Conns>) -> MutexGuard<'_, Conns> {
    conns.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server {
    /// Register a new connection, closing the least recently active one if
    /// the cap is reached.
    fn admit(&self) -> (u64, oneshot::Receiver<()>) {
        let mut conns = lock(&self.conns);
        while conns.open.len() >= self.limits.max_connections.max(1) {
            let victim = conns
                .open
                .iter()
                .min_by_key(|(id, e)| (e.last_active, **id))
                .map(|(id, _)| *id);
            match victim {
                Some(id) => {
                    log::debug!(
                        "admin: {} connections open, closing the least recently active",
                        conns.open.len()
                    );
                    conns.open.remove(&id);
                }
                None => break,
            }
        }
        let id = conns.next_id;
        conns.next_id += 1;
        let (kill, killed) = oneshot::channel();
        conns.open.insert(
            id,
            ConnEntry {
                last_active: Instant::now(),
                _kill: kill,
            },
        );
        (id, killed)
    }

    fn touch(&self, id: u64) {
        if let Some(e) = lock(&self.conns).open.get_mut(&id) {
            e.last_active = Instant::now();
        }
    }
}

/// Removes a connection from [`Conns`] when its task ends, however it ends.
struct ConnGuard {
    conns: Arc<Mutex<Conns>>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.conns).open.remove(&self.id);
    }
}

async fn accept_loop(listener: TcpListener, server: Arc<Server>, mut stop: oneshot::Receiver<()>) {
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let (id, killed) = server.admit();
                tokio::spawn(serve_connection(stream, id, killed, server.clone()));
            }
            Err(e) if is_transient_accept_error(&e) => {}
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    log::warn!("admin endpoint: accept failed: {e}");
                    last_warning = Some(Instant::now());
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn serve_connection(
    stream: TcpStream,
    id: u64,
    mut killed: oneshot::Receiver<()>,
    server: Arc<Server>,
) {
    let _guard = ConnGuard {
        conns: server.conns.clone(),
        id,
    };
    let svc = {
        let server = server.clone();
        service_fn(move |req: Request<Incoming>| {
            server.touch(id);
            std::future::ready(Ok::<_, Infallible>(respond(&server.shared, &req)))
        })
    };
    let mut conn = pin!(server.builder.serve_connection(TokioIo::new(stream), svc));
    let result = tokio::select! {
        biased;
        _ = &mut killed => return,
        r = conn.as_mut() => r,
        _ = tokio::time::sleep(server.limits.max_connection_age) => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                biased;
                _ = &mut killed => return,
                r = conn.as_mut() => r,
                _ = tokio::time::sleep(server.limits.close_grace) => return,
            }
        }
    };
    if let Err(e) = result {
        log::debug!("admin connection closed: {e}");
    }
}

// ---- routing ---------------------------------------------------------------

type Body = Full<Bytes>;

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const APPLICATION_JSON: &str = "application/json";

#[derive(Clone, Copy)]
enum Page {
    Metrics,
    Status,
    Healthz,
}

/// The answer to one request. Never fails and never panics: every input
/// maps to a response.
fn respond(shared: &AdminShared, req: &Request<Incoming>) -> Response<Body> {
    let page = match req.uri().path() {
        "/metrics" => Page::Metrics,
        "/status" => Page::Status,
        "/healthz" => Page::Healthz,
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match page {
        Page::Healthz => text(StatusCode::OK, "ok"),
        Page::Metrics => {
            let view = shared.view();
            let body = view.metrics_text(shared.global());
            response(
                StatusCode::OK,
                sluice_metrics::CONTENT_TYPE,
                Bytes::from(body),
            )
        }
        Page::Status => {
            let view = shared.view();
            let mut body = format!("{:#}", view.status_json(shared.global()));
            body.push('\n');
            response(StatusCode::OK, APPLICATION_JSON, Bytes::from(body))
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    response(status, TEXT_PLAIN, Bytes::from_static(body.as_bytes()))
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
