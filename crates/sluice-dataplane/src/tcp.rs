//! TCP: the accept loop of one listener and the life of one connection.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_balance::{FlowKey, PickCtx};
use sluice_config::{ProxyProtocol, Transfer};
use sluice_uring::{op, socket};
use tokio::sync::watch;

use crate::conns::Ended;
use crate::routes::ServiceRoutes;
use crate::transfer::{self, End, First, InFlightPoll};
use crate::worker::{now_nanos, ServiceSlot, Worker};
use crate::{proxy_proto, ConnectFailure};

/// Accepts taken in one go before yielding to other tasks.
const ACCEPT_BATCH: usize = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM | libc::ENETDOWN)
    )
}

/// Accept connections on `listener` until `stop` flips, then cancel the
/// pending poll in the kernel and close the listener.
pub(crate) async fn accept_loop(
    worker: Rc<Worker>,
    slot: Rc<ServiceSlot>,
    listener: TcpListener,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let fd = listener.as_raw_fd();
    let wildcard = addr.ip().is_unspecified();
    let mut backoff = BACKOFF_MIN;
    let mut last_warn: Option<Instant> = None;
    'outer: loop {
        if *stop.borrow() {
            break;
        }
        // Service-level max_connections: stop accepting (the kernel keeps
        // new connections in the backlog) until a connection closes.
        let routes = slot.routes();
        let max = routes.service.max_connections;
        if routes.limit.is_full(max) {
            let released = routes.limit.released.notified();
            tokio::select! {
                _ = released => {}
                // Another worker's close may race the check above.
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.changed() => break,
            }
            continue;
        }
        for _ in 0..ACCEPT_BATCH {
            if !routes.limit.try_acquire(max) {
                continue 'outer;
            }
            match socket::accept(&listener) {
                Ok((stream, peer)) => {
                    backoff = BACKOFF_MIN;
                    let local = if wildcard {
                        stream.local_addr().unwrap_or(addr)
                    } else {
                        addr
                    };
                    worker.conn_opened();
                    let key = worker.tcp.insert(stream.as_raw_fd());
                    tokio_uring::spawn(connection(
                        worker.clone(),
                        slot.clone(),
                        stream,
                        key,
                        peer,
                        local,
                    ));
                }
                Err(e) => {
                    // The slot this loop just took: nobody waits for it.
                    routes.limit.release();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        tokio::select! {
                            r = op::poll(fd, op::READABLE) => {
                                if let Err(e) = r {
                                    log::warn!("listener {addr}: poll failed: {e}");
                                    tokio::time::sleep(backoff).await;
                                }
                            }
                            _ = stop.changed() => break 'outer,
                        }
                    } else if is_transient_accept_error(&e) {
                        continue;
                    } else if e.raw_os_error() == Some(libc::EINVAL) {
                        // No longer listening: the control thread shut the
                        // listener down (reload, SIGTERM); the message that
                        // stops this loop follows.
                        tokio::select! {
                            _ = tokio::time::sleep(BACKOFF_MAX) => {}
                            _ = stop.changed() => break 'outer,
                        }
                    } else {
                        // EMFILE/ENFILE and friends: back off instead of
                        // spinning; connections wait in the backlog.
                        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                            let hint = if is_resource_error(&e) {
                                " (out of file descriptors or memory)"
                            } else {
                                ""
                            };
                            log::warn!("listener {addr}: accept failed{hint}: {e}; retrying in {backoff:?}");
                            last_warn = Some(Instant::now());
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.changed() => break 'outer,
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    continue 'outer;
                }
            }
        }
        // A full batch: let the new connections run before accepting more.
        // Wait on a poll rather than yield_now, so the runtime parks and
        // submits the new connections' operations (see transfer.rs).
        tokio::select! {
            _ = op::poll(fd, op::READABLE) => {}
            _ = stop.changed() => break,
        }
    }
    // Stop listening right now: new connects are refused at once (and the
    // ones queued on this socket move to its SO_REUSEPORT siblings when
    // net.ipv4.tcp_migrate_req is on), without waiting for the io_uring
    // cancel in `op::close`, whose submission can lag under load.
    let _ = socket2::SockRef::from(&listener).shutdown(Shutdown::Both);
    op::close(listener).await;
    log::debug!("worker {}: listener {addr} closed", worker.cfg.index);
}

/// Why a proxied connection ended (access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    ClientClose,
    BackendClose,
    IdleTimeout,
    ConnectFailure,
    NoBackend,
    Shutdown,
    Error,
}

impl EndReason {
    fn as_str(self) -> &'static str {
        match self {
            EndReason::ClientClose => "client_close",
            EndReason::BackendClose => "backend_close",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::ConnectFailure => "connect_failure",
            EndReason::NoBackend => "no_backend",
            EndReason::Shutdown => "shutdown",
            EndReason::Error => "error",
        }
    }
}

/// One client connection, from accept to close; `key` is its place in the
/// worker's table of connections.
async fn connection(
    worker: Rc<Worker>,
    slot: Rc<ServiceSlot>,
    client: TcpStream,
    key: usize,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let routes = slot.routes();
    let started = Instant::now();
    let outcome = serve(&worker, &slot, &routes, &client, key, peer, local).await;
    let ended = worker.tcp.remove(key);
    let (reason, backend, up, down, polled) = match &outcome {
        Served::Proxied {
            backend,
            reason,
            to_backend,
            to_client,
            client_polled,
        } => (
            *reason,
            Some(*backend),
            *to_backend,
            *to_client,
            *client_polled,
        ),
        Served::NotProxied(reason, polled) => (*reason, None, 0, 0, *polled),
    };
    let reason = match ended {
        Some(Ended::Idle) => EndReason::IdleTimeout,
        Some(Ended::Shutdown) => EndReason::Shutdown,
        None => reason,
    };
    if polled {
        op::close(client).await;
    } else {
        socket::close(client);
    }
    if routes.service.access_log {
        let backend = backend.map_or_else(|| "-".to_string(), |b| b.to_string());
        log::info!(
            "access service={} worker={} client={peer} listener={local} backend={backend} bytes_to_backend={up} bytes_to_client={down} duration_ms={} end={}",
            routes.name(),
            worker.cfg.index,
            started.elapsed().as_millis(),
            reason.as_str()
        );
    }
    routes
        .limit
        .release_and_wake(routes.service.max_connections);
    worker.conn_closed();
}

/// How a connection was served, and whether an io_uring operation may still
/// be in flight on the client socket.
enum Served {
    Proxied {
        backend: SocketAddr,
        reason: EndReason,
        to_backend: u64,
        to_client: u64,
        client_polled: bool,
    },
    NotProxied(EndReason, bool),
}

async fn serve(
    worker: &Rc<Worker>,
    slot: &ServiceSlot,
    routes: &Arc<ServiceRoutes>,
    client: &TcpStream,
    key: usize,
    peer: SocketAddr,
    local: SocketAddr,
) -> Served {
    let core = worker.cfg.index;
    let svc = &routes.service;
    let flow = FlowKey::tcp(peer, local);
    let mut tried: Vec<u32> = Vec::new();
    // Whether an io_uring poll may still be in flight on the client socket
    // (then it is closed with a kernel cancel first).
    let mut client_polled = false;
    let (id, stream, ready) = loop {
        let ctx = PickCtx {
            rand: worker.rand(),
            now_nanos: now_nanos(),
        };
        let pick = routes
            .snapshot
            .pick(&flow, &ctx, &mut slot.pick.borrow_mut(), &tried);
        let Some(id) = pick else {
            if tried.is_empty() {
                routes.metrics.no_backend.inc(core);
                return Served::NotProxied(EndReason::NoBackend, client_polled);
            }
            return Served::NotProxied(EndReason::ConnectFailure, client_polled);
        };
        let Some(backend) = routes.backends.get(id as usize) else {
            return Served::NotProxied(EndReason::Error, client_polled);
        };
        backend.load.active.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let attempt = match connect(backend.addr, svc.connect_timeout, client).await {
            Ok((stream, masks)) => {
                let took = t0.elapsed().as_nanos() as u64;
                match established(worker, routes, client, &stream, masks, peer, local).await {
                    Ok(ready) => Ok((stream, took, ready)),
                    Err(why) => {
                        // The race may have left a poll on the client too.
                        client_polled = true;
                        op::close(stream).await;
                        Err(Failed::Backend(why))
                    }
                }
            }
            Err(failed) => Err(failed),
        };
        match attempt {
            Ok((stream, took, ready)) => {
                backend.metrics.connect_duration.observe_nanos(core, took);
                backend.load.observe(took, now_nanos(), 10_000_000_000);
                worker.report_connect(&svc.name, backend.addr, None);
                worker
                    .tcp
                    .proxying(key, stream.as_raw_fd(), svc.idle_timeout);
                break (id, stream, ready);
            }
            Err(failed) => {
                backend.load.active.fetch_sub(1, Ordering::Relaxed);
                match failed {
                    Failed::Backend(why) => {
                        backend.metrics.connect_errors.inc(core);
                        worker.report_connect(&svc.name, backend.addr, Some(why));
                        log::debug!("{}: connect to {} failed: {why:?}", svc.name, backend.addr);
                    }
                    Failed::Local(e) => {
                        log::debug!("{}: cannot connect to {}: {e}", svc.name, backend.addr);
                    }
                }
                tried.push(id);
                if tried.len() > svc.connect_retries as usize {
                    return Served::NotProxied(EndReason::ConnectFailure, client_polled);
                }
            }
        }
    };
    let backend = &routes.backends[id as usize];
    backend.metrics.connections.inc(core);
    backend.metrics.active.add(core, 1);

    let mode = match svc.transfer {
        Transfer::Splice => transfer::Mode::Splice,
        Transfer::Copy => transfer::Mode::Copy,
        Transfer::Auto => transfer::Mode::Auto,
    };
    let stats = transfer::proxy(worker, client, &stream, mode, key, backend, ready).await;
    worker.tcp.unproxy(key);
    let reason = match stats.end {
        End::ClientClosed | End::ClientError => EndReason::ClientClose,
        End::BackendClosed | End::BackendError => EndReason::BackendClose,
    };
    // When both directions ended by themselves nothing is in flight, and a
    // plain close is enough; otherwise cancel in the kernel first.
    let unclean = !stats.end.is_clean();
    let served = Served::Proxied {
        backend: backend.addr,
        reason,
        to_backend: stats.to_backend,
        to_client: stats.to_client,
        client_polled: client_polled || unclean || stats.client_armed,
    };
    if unclean || stats.backend_armed {
        op::close(stream).await;
    } else {
        socket::close(stream);
    }
    backend.metrics.active.add(core, -1);
    backend.load.active.fetch_sub(1, Ordering::Relaxed);
    served
}

fn classify(e: &io::Error) -> ConnectFailure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
        io::ErrorKind::TimedOut => ConnectFailure::Timeout,
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ConnectFailure::Reset,
        _ => ConnectFailure::Other,
    }
}

/// How the two directions of a new connection start (client to backend,
/// backend to client): what [`established`] learnt, including the polls it
/// leaves in flight for them to await.
type Ready = (First, First);

/// After the handshake with the backend: write the PROXY header if the
/// service sends one, then wait for the first sign of life from either
/// side. A backend that resets or closes the connection before any byte
/// came from it or went to it from the client (its listener accepts and
/// drops connections: overloaded, shutting down, broken) counts as a failed
/// connect (`Reset`), so the client is retried on another backend; nothing
/// was read from the client yet, so nothing is lost or sent twice. The
/// connection counts as established as soon as the client sends (or
/// closes), the backend sends its first byte, or `connect_timeout` passes
/// with both quiet. No latency is added: the first event decides.
///
/// In the common case the client's first bytes are already there: one
/// `poll(2)` with a zero timeout on both sockets decides (`masks`, when
/// [`connect`] already made it), no io_uring poll is needed, and the backend
/// is only read when it has something. Otherwise it waits with an io_uring
/// poll on each socket; the one that has not fired yet is handed to the
/// direction that reads that socket, so that no operation is left in
/// flight. On an error, a poll may still be in flight on the client.
async fn established(
    worker: &Worker,
    routes: &ServiceRoutes,
    client: &TcpStream,
    backend: &TcpStream,
    masks: Option<(u32, u32)>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Ready, ConnectFailure> {
    let svc = &routes.service;
    if worker.tcp.stopping() {
        // Past the shutdown deadline: the proxy sees both ends at once.
        return Ok((First::Read, First::Read));
    }
    let header = match svc.proxy_protocol {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(proxy_proto::v1(peer, local)),
        ProxyProtocol::V2 => Some(proxy_proto::v2(peer, local)),
    };
    if let Some(h) = header {
        transfer::write_all(backend, &h)
            .await
            .map_err(|e| classify(&e))?;
    }
    // Fast path, no waiting: the backend already reset, or already spoke,
    // or the client already sent (or closed).
    let (b_mask, c_mask) = match masks {
        Some(m) => m,
        None => socket::ready_now(backend, BACKEND_EVENTS, client, op::READABLE)
            .map_err(|e| classify(&e))?,
    };
    if b_mask & !op::WRITABLE != 0 {
        // Data, end-of-stream or an error from the backend: which one?
        if let Some(Err(e)) = backend_state(backend) {
            return Err(e);
        }
        let c2b = if c_mask != 0 {
            First::Read
        } else {
            First::Wait
        };
        return Ok((c2b, First::Read));
    }
    if c_mask != 0 {
        return Ok((First::Read, First::Wait));
    }
    // Waiting for either side, up to `connect_timeout`. At the shutdown
    // deadline the worker shuts the client socket down: its poll fires.
    let deadline = tokio::time::Instant::now() + svc.connect_timeout;
    let backend_poll =
        || -> InFlightPoll { Box::pin(op::poll(backend.as_raw_fd(), op::READABLE | op::READ_HUP)) };
    let mut b_poll = backend_poll();
    let mut c_poll: InFlightPoll = Box::pin(op::poll(client.as_raw_fd(), transfer::WAIT_READ));
    loop {
        tokio::select! {
            biased;
            r = &mut b_poll => {
                if let Err(e) = r {
                    return Err(classify(&e));
                }
                match backend_state(backend) {
                    Some(Ok(())) => return Ok((First::InFlight(c_poll), First::Read)),
                    Some(Err(e)) => return Err(e),
                    // Woken with nothing to read: wait again.
                    None => b_poll = backend_poll(),
                }
            }
            _ = &mut c_poll => return Ok((First::Read, First::InFlight(b_poll))),
            _ = tokio::time::sleep_until(deadline) => {
                return Ok((First::InFlight(c_poll), First::InFlight(b_poll)));
            }
        }
    }
}

/// Peek one byte of the backend: `Some(Ok)` if it sent data, `Some(Err)`
/// if it closed or failed before sending any, `None` if nothing is there.
fn backend_state(backend: &TcpStream) -> Option<Result<(), ConnectFailure>> {
    let mut byte = [0u8; 1];
    loop {
        return match backend.peek(&mut byte) {
            Ok(0) => Some(Err(ConnectFailure::Reset)),
            Ok(_) => Some(Ok(())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Some(Err(classify(&e))),
        };
    }
}

/// What `poll` reports on a backend that spoke, closed or failed.
const BACKEND_EVENTS: u32 = op::READABLE | op::READ_HUP;

/// Connect to `addr` within `timeout`. On timeout the pending poll is
/// cancelled in the kernel and the socket closed before returning.
///
/// On loopback (and any backend close enough) the handshake is done by the
/// time `connect(2)` returns: one `poll(2)` with a zero timeout on the
/// backend and the `client` then confirms it, with no io_uring poll and no
/// timer, and its masks (backend, client) are returned for [`established`].
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    client: &TcpStream,
) -> Result<(TcpStream, Option<(u32, u32)>), Failed> {
    let (stream, done) = socket::connect_start(addr).map_err(|e| {
        if is_resource_error(&e) || e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            Failed::Local(e)
        } else {
            Failed::Backend(classify(&e))
        }
    })?;
    if !done {
        let now = socket::ready_now(&stream, op::WRITABLE | BACKEND_EVENTS, client, op::READABLE);
        match now {
            Ok((b, c)) if b & op::WRITABLE != 0 && b & (op::ERROR | op::HANG_UP) == 0 => {
                return Ok((stream, Some((b, c))));
            }
            Ok((b, _)) if b & (op::ERROR | op::HANG_UP) != 0 => {}
            _ => {
                let fd = stream.as_raw_fd();
                match tokio::time::timeout(timeout, op::poll(fd, op::WRITABLE)).await {
                    // Writable with no error or hang-up: connected, no need
                    // to read SO_ERROR.
                    Ok(Ok(mask)) if mask & (op::ERROR | op::HANG_UP) == 0 => {
                        return Ok((stream, None))
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        op::close(stream).await;
                        return Err(Failed::Backend(classify(&e)));
                    }
                    Err(_) => {
                        op::close(stream).await;
                        return Err(Failed::Backend(ConnectFailure::Timeout));
                    }
                }
            }
        }
    }
    match socket::finish_connect(&stream) {
        Ok(()) => Ok((stream, None)),
        Err(e) => {
            let why = classify(&e);
            op::close(stream).await;
            Err(Failed::Backend(why))
        }
    }
}

/// Why a connect attempt gave no usable connection.
#[derive(Debug)]
enum Failed {
    /// The backend refused, timed out, or reset/closed before any byte:
    /// reported to the control thread (passive health).
    Backend(ConnectFailure),
    /// This process ran short creating the socket (EMFILE, ENFILE, ENOBUFS,
    /// ENOMEM, no free local port): not the backend's fault, so not
    /// reported: it must not eject a healthy backend.
    Local(io::Error),
}
