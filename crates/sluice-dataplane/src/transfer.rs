//! Moving bytes between a client and a backend, both ways at once.
//!
//! Readiness model: try the non-blocking syscall; on `WouldBlock` wait with
//! an io_uring poll, then try again. A direction that reads end-of-stream
//! shuts down the write side of the other socket (half-close) while the
//! other direction keeps flowing.
//!
//! - `copy`: read into a pooled buffer, write it all out; the buffer goes
//!   back to the pool between chunks, so idle connections hold none.
//! - `splice`: socket -> pooled pipe -> socket with inline `splice(2)`; the
//!   pipe is held only while it has bytes in it. When the pool is empty the
//!   chunk is copied instead.
//! - `auto`: copy until a single read fills a large part of the buffer
//!   (bulk), then splice for the rest of that direction.
//!
//! Keep-alive conversations (copy and auto): after a few waits in a row
//! that each followed a small exchange, a direction arms one multishot
//! receive into the worker's provided-buffer ring (`converse`): the kernel
//! receives each message as it arrives and the worker only writes it on,
//! with no poll completion and no `recv` call per message. It goes back to
//! reading by itself when a message fills a whole buffer (maybe bulk), when
//! the destination is full (so the ring never holds more than what was in
//! flight), or when the ring runs dry; every byte received is written
//! first. Without a ring (older kernels) the direction waits with one
//! multishot poll instead.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;

use sluice_uring::bufring::{BufRing, Recv, RecvStream};
use sluice_uring::{op, socket};

use crate::conns::TcpConns;
use crate::routes::BackendRoute;
use crate::worker::Worker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Splice,
    Copy,
    Auto,
}

/// A read this large in `auto` mode switches the direction to splice.
const AUTO_SPLICE_THRESHOLD: usize = 64 * 1024;
/// A read shorter than this is taken to have drained the socket.
const SMALL_READ: usize = 16 * 1024;
/// Bytes a direction moves before it yields to other tasks.
const YIELD_EVERY: u64 = 4 << 20;
/// Unsent bytes a splicing direction lets queue in its destination socket
/// (`TCP_NOTSENT_LOWAT`). Without a limit the socket takes up to its whole
/// send buffer (4 MiB here), and then its segments go out when ACKs
/// arrive, inside the kernel's processing of each ACK on the receiver's
/// CPU, together with the loopback delivery that follows. With a shorter
/// queue more of it is sent by the worker's own `splice`, on the worker's
/// CPU. tcp_bulk 1 stream (docs/benchmarks.md): no limit 28.5 Gbit/s at
/// 0.061 s of worker CPU per GB, 1 MiB about 31 at 0.078, 256 KiB 41.2 at
/// 0.105. 1 MiB keeps the CPU per GB under HAProxy's.
const SPLICE_NOTSENT_LOWAT: u32 = 1 << 20;
/// What a direction waits for on its source: data, or the peer's FIN
/// (`POLLRDHUP` is asked for so that the mask tells them apart).
pub(crate) const WAIT_READ: u32 = op::READABLE | op::READ_HUP;

/// Whether a poll mask says the peer has sent its FIN (or the socket is
/// shut down both ways).
fn saw_fin(mask: u32) -> bool {
    mask & (op::READ_HUP | op::HANG_UP) != 0
}

/// After this many waits in a row that each followed a small exchange
/// (under `SMALL_READ` moved since the previous wait), a direction is a
/// keep-alive conversation: it receives with one multishot receive
/// (`converse`), or without a buffer ring waits with one multishot poll,
/// instead of a poll per wait. A short connection (connect, request,
/// response, close) waits less often than this, so it never needs a cancel
/// at close. A bulk flow does not use them: they report every segment that
/// arrives, also while the flow is busy moving the previous ones, where a
/// one-shot poll costs nothing until the flow waits.
const MULTISHOT_AFTER_SMALL_WAITS: u32 = 3;

/// An io_uring poll already in flight on a socket, handed from the set-up of
/// a connection to the direction that reads that socket, so that it is
/// awaited rather than left behind (an operation left behind would have to
/// be cancelled in the kernel before the socket could be closed).
pub(crate) type InFlightPoll = Pin<Box<dyn Future<Output = io::Result<u32>>>>;

/// How one direction starts.
pub(crate) enum First {
    /// Read at once: the source may have data.
    Read,
    /// Wait for the source to be readable first: a read could only say
    /// `EAGAIN`.
    Wait,
    /// Await this poll, already in flight on the source, first.
    InFlight(InFlightPoll),
}

/// How a proxied connection ended. (When the worker ended it, for idleness
/// or at the shutdown deadline, by shutting its sockets down, the table in
/// `conns` says so.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Both directions finished; the client sent its FIN first.
    ClientClosed,
    /// Both directions finished; the backend sent its FIN first.
    BackendClosed,
    ClientError,
    BackendError,
}

impl End {
    /// Both directions finished by themselves: no operation is in flight
    /// on either socket, so they can be closed without a kernel cancel.
    pub(crate) fn is_clean(self) -> bool {
        matches!(self, End::ClientClosed | End::BackendClosed)
    }
}

#[derive(Debug)]
pub(crate) struct Stats {
    pub end: End,
    pub to_backend: u64,
    pub to_client: u64,
    /// A multishot poll or receive was armed on the client (backend)
    /// socket: it may still be in the kernel and must be cancelled before
    /// the close.
    pub client_armed: bool,
    pub backend_armed: bool,
}

enum PumpError {
    /// Reading the source failed.
    Read(io::Error),
    /// Writing the destination failed.
    Write(io::Error),
}

impl std::fmt::Debug for PumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PumpError::Read(e) => write!(f, "read: {e}"),
            PumpError::Write(e) => write!(f, "write: {e}"),
        }
    }
}

/// Write all of `data` to a non-blocking socket. (Not an `async fn` of its
/// own: a wrapping future would add its state to every connection's task.)
pub(crate) fn write_all<'a>(
    dst: &'a TcpStream,
    data: &'a [u8],
) -> impl std::future::Future<Output = io::Result<()>> + 'a {
    write_all_or_wait(dst, data, false, || {})
}

/// Write all of `data` to a non-blocking socket; `before_wait` runs each
/// time the socket has no room, before waiting for it. With `fin_next` the
/// caller shuts the socket's write side (or closes it) right after, so the
/// bytes go with `MSG_MORE`: the FIN then rides on their last segment
/// instead of a segment of its own.
async fn write_all_or_wait(
    dst: &TcpStream,
    mut data: &[u8],
    fin_next: bool,
    mut before_wait: impl FnMut(),
) -> io::Result<()> {
    while !data.is_empty() {
        let sent = if fin_next {
            socket::send_more(dst.as_raw_fd(), data)
        } else {
            socket::send(dst.as_raw_fd(), data)
        };
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                before_wait();
                op::poll(dst.as_raw_fd(), op::WRITABLE).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Proxy both directions until both are done or one fails. `first` says
/// how each direction (client to backend, backend to client) starts. The
/// bytes moved are counted on the connection `key` of the worker's table,
/// which ends the connection (shuts its sockets down) when it is idle too
/// long or at the shutdown deadline: both directions then see their end.
pub(crate) async fn proxy(
    worker: &Worker,
    client: &TcpStream,
    backend_stream: &TcpStream,
    mode: Mode,
    key: usize,
    backend: &BackendRoute,
    first: (First, First),
) -> Stats {
    let core = worker.cfg.index;
    let activity = Activity {
        table: &worker.tcp,
        key,
    };
    let up = Cell::new(0u64);
    let down = Cell::new(0u64);
    let (c2b_eof, b2c_eof) = (Cell::new(false), Cell::new(false));
    let (client_armed, backend_armed) = (Cell::new(false), Cell::new(false));
    let (c2b_first, b2c_first) = first;
    let c2b = pump(
        worker,
        Dir {
            src: client,
            dst: backend_stream,
            first: c2b_first,
            eof: &c2b_eof,
            other_eof: &b2c_eof,
            armed: &client_armed,
            from_backend: false,
        },
        mode,
        activity,
        &up,
        |n| backend.metrics.bytes_to_backend.add(core, n),
    );
    let b2c = pump(
        worker,
        Dir {
            src: backend_stream,
            dst: client,
            first: b2c_first,
            eof: &b2c_eof,
            other_eof: &c2b_eof,
            armed: &backend_armed,
            from_backend: true,
        },
        mode,
        activity,
        &down,
        |n| backend.metrics.bytes_to_client.add(core, n),
    );
    tokio::pin!(c2b, b2c);
    // A direction's `eof` is set exactly when its pump finishes cleanly.
    let mut first_fin: Option<End> = None;
    let end = loop {
        tokio::select! {
            r = &mut c2b, if !c2b_eof.get() => match r {
                Ok(()) => {
                    first_fin.get_or_insert(End::ClientClosed);
                }
                Err(e) => {
                    log::debug!("client -> backend {}: {e:?}", backend.addr);
                    break if matches!(e, PumpError::Read(_)) { End::ClientError } else { End::BackendError };
                }
            },
            r = &mut b2c, if !b2c_eof.get() => match r {
                Ok(()) => {
                    first_fin.get_or_insert(End::BackendClosed);
                }
                Err(e) => {
                    log::debug!("backend {} -> client: {e:?}", backend.addr);
                    break if matches!(e, PumpError::Read(_)) { End::BackendError } else { End::ClientError };
                }
            },
        }
        if c2b_eof.get() && b2c_eof.get() {
            break first_fin.unwrap_or(End::ClientClosed);
        }
    };
    Stats {
        end,
        to_backend: up.get(),
        to_client: down.get(),
        client_armed: client_armed.get(),
        backend_armed: backend_armed.get(),
    }
}

/// Where a connection counts the bytes it moves (its idle clock).
#[derive(Clone, Copy)]
struct Activity<'a> {
    table: &'a TcpConns,
    key: usize,
}

impl Activity<'_> {
    fn moved(&self, n: u64) {
        self.table.moved(self.key, n);
    }
}

enum Round {
    /// The source is drained: a read said `EAGAIN`, or took less than it
    /// could have (a read takes all the socket has, up to its size). With
    /// the bytes moved in the round.
    Again(u64),
    /// The source is most likely drained (a short splice: it can also stop
    /// early when the pipe runs out of slots).
    Short,
    /// The source reached end-of-stream.
    Eof,
    /// `auto` saw a bulk read: switch to splice.
    Bulk,
    /// Moved a lot without blocking: yield to other tasks.
    Busy,
}

/// One direction of a proxied connection.
struct Dir<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    /// How to start.
    first: First,
    /// Set when this direction has read end-of-stream.
    eof: &'a Cell<bool>,
    /// The other direction's `eof`.
    other_eof: &'a Cell<bool>,
    /// Set when a multishot poll or receive is armed on `src`.
    armed: &'a Cell<bool>,
    /// `src` is the backend (see `copy_round`).
    from_backend: bool,
}

/// One direction: `src` -> `dst` until end-of-stream (then half-close
/// `dst`) or an error.
async fn pump(
    worker: &Worker,
    dir: Dir<'_>,
    mode: Mode,
    activity: Activity<'_>,
    count: &Cell<u64>,
    on_bytes: impl Fn(u64),
) -> Result<(), PumpError> {
    let Dir {
        src,
        dst,
        first,
        eof,
        other_eof,
        armed,
        from_backend,
    } = dir;
    // Waits in a row after small exchanges, and the multishot poll armed
    // after enough of them.
    let mut small_waits = 0u32;
    let mut polls: Option<op::PollStream> = None;
    let mut splicing = mode == Mode::Splice;
    let auto = mode == Mode::Auto;
    // Whether the last wait saw the source's FIN (see `copy_round`).
    let mut fin_seen = match first {
        First::Read => false,
        First::Wait => saw_fin(
            op::poll(src.as_raw_fd(), WAIT_READ)
                .await
                .map_err(PumpError::Read)?,
        ),
        First::InFlight(poll) => saw_fin(poll.await.map_err(PumpError::Read)?),
    };
    if splicing {
        cap_unsent(dst);
    }
    loop {
        let pipe = if splicing { worker.take_pipe() } else { None };
        let round = match pipe {
            Some(mut pipe) => {
                let r = splice_round(&mut pipe, src, dst, activity, count, &on_bytes).await;
                worker.pipes.borrow_mut().put(pipe);
                r?
            }
            None => {
                let mut buf = worker.take_buf();
                let r = copy_round(
                    &mut buf,
                    Ends {
                        src,
                        dst,
                        // Not once the direction is a conversation: only
                        // a short connection's reply ends with its FIN.
                        look_for_end: fin_seen
                            || (from_backend && small_waits < MULTISHOT_AFTER_SMALL_WAITS),
                    },
                    auto && !splicing,
                    activity,
                    count,
                    &on_bytes,
                )
                .await;
                worker.put_buf(buf);
                r?
            }
        };
        fin_seen = false;
        match round {
            // The source is drained (a read said EAGAIN or came back
            // short): wait for its next event.
            Round::Again(moved) => {
                if moved < SMALL_READ as u64 && !splicing {
                    small_waits += 1;
                } else {
                    small_waits = 0;
                    if let Some(stream) = polls.take() {
                        // Turned into a bulk flow.
                        stream.cancel();
                    }
                }
                if polls.is_none() && small_waits >= MULTISHOT_AFTER_SMALL_WAITS {
                    if let Some(ring) = worker.recv_ring() {
                        // A conversation: the kernel receives each message
                        // as it comes (no poll and recv per message) until
                        // the direction turns bulk, its destination fills
                        // up, the ring runs dry or the source ends.
                        armed.set(true);
                        // Boxed: its state would otherwise make every
                        // connection's task larger, conversing or not (an
                        // idle connection cost 0.13 KB more in idle_mem).
                        let conversed = Box::pin(converse(
                            worker, &ring, src, dst, activity, count, &on_bytes,
                        ))
                        .await?;
                        match conversed {
                            Conversed::Eof => return end_of_stream(dst, eof, other_eof),
                            Conversed::Stopped => {
                                // Read on: the socket may hold bytes.
                                small_waits = 0;
                                continue;
                            }
                        }
                    }
                    polls = Some(op::PollStream::new(src.as_raw_fd(), WAIT_READ));
                    armed.set(true);
                }
                match polls.as_mut() {
                    Some(stream) => {
                        fin_seen = saw_fin(stream.next().await.map_err(PumpError::Read)?);
                        if stream.is_done() {
                            // The kernel ended it: arm a new one next time.
                            polls = None;
                        }
                    }
                    None => {
                        fin_seen = saw_fin(
                            op::poll(src.as_raw_fd(), WAIT_READ)
                                .await
                                .map_err(PumpError::Read)?,
                        );
                    }
                }
            }
            // Maybe not drained: a one-shot poll, which completes at once
            // if the source is still readable. For `Busy` this is a yield:
            // a poll rather than yield_now, because tokio-uring submits
            // queued SQEs only when no task is ready, so a flow that
            // always stays ready would delay every other connection's
            // polls.
            Round::Short | Round::Busy => {
                fin_seen = saw_fin(
                    op::poll(src.as_raw_fd(), WAIT_READ)
                        .await
                        .map_err(PumpError::Read)?,
                );
            }
            Round::Eof => return end_of_stream(dst, eof, other_eof),
            Round::Bulk => {
                splicing = true;
                cap_unsent(dst);
                small_waits = 0;
                if let Some(stream) = polls.take() {
                    stream.cancel();
                }
            }
        }
    }
}

/// A direction starts splicing into `dst`: cap the bytes it may hold unsent
/// (`SPLICE_NOTSENT_LOWAT`). Best effort: without the cap the bytes still
/// flow, only later.
fn cap_unsent(dst: &TcpStream) {
    let _ = socket::set_notsent_lowat(dst, SPLICE_NOTSENT_LOWAT);
}

/// The source of a direction reached end-of-stream: pass the FIN on.
fn end_of_stream(
    dst: &TcpStream,
    eof: &Cell<bool>,
    other_eof: &Cell<bool>,
) -> Result<(), PumpError> {
    eof.set(true);
    if other_eof.get() {
        // Both directions are done: the connection closes both sockets
        // next, and `close` sends this FIN.
        return Ok(());
    }
    match dst.shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(PumpError::Write(e)),
    }
}

/// How a conversation (multishot receive) ended.
enum Conversed {
    /// The source reached end-of-stream.
    Eof,
    /// The receive stopped (bulk, a full destination, no free buffer, the
    /// kernel's choice): the direction reads by itself again.
    Stopped,
}

/// Move `src` -> `dst` with one multishot receive into the worker's buffer
/// ring, until it stops. Every byte received is written before this
/// returns: when the receive is cancelled, the completions still on their
/// way are written out too.
async fn converse(
    worker: &Worker,
    ring: &Rc<BufRing>,
    src: &TcpStream,
    dst: &TcpStream,
    activity: Activity<'_>,
    count: &Cell<u64>,
    on_bytes: &impl Fn(u64),
) -> Result<Conversed, PumpError> {
    let mut stream = RecvStream::new(src.as_raw_fd(), ring);
    loop {
        match stream.next().await {
            Recv::Data(buf, more) => {
                let n = buf.len();
                // Usually all of it goes at once, without a future to poll.
                let sent = match socket::send(dst.as_raw_fd(), &buf) {
                    Ok(k) => k,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        0
                    }
                    Err(e) => return Err(PumpError::Write(e)),
                };
                if sent < n {
                    // The destination is full: stop receiving before
                    // waiting, so that no more than what is on its way
                    // piles up in the ring.
                    write_all_or_wait(dst, &buf[sent..], false, || stream.request_cancel())
                        .await
                        .map_err(PumpError::Write)?;
                }
                drop(buf);
                count.set(count.get() + n as u64);
                on_bytes(n as u64);
                activity.moved(n as u64);
                if n >= ring.buf_size() {
                    // A full buffer: more than a conversation's message,
                    // maybe a bulk flow. Reading (and splicing) is cheaper.
                    stream.request_cancel();
                }
                if !more {
                    return Ok(Conversed::Stopped);
                }
            }
            Recv::Eof => return Ok(Conversed::Eof),
            Recv::Stopped(e) => match e.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::ECANCELED) => return Ok(Conversed::Stopped),
                Some(libc::EINVAL) => {
                    worker.recv_ring_unsupported();
                    return Ok(Conversed::Stopped);
                }
                _ => return Err(PumpError::Read(e)),
            },
        }
    }
}

/// The sockets of a direction's round, and whether its first short read is
/// likely to be followed by the source's end.
struct Ends<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    look_for_end: bool,
}

/// Read `src` and write it all to `dst` until `src` is drained, ends, turns
/// bulk or has moved `YIELD_EVERY`.
///
/// With `look_for_end`, a short first read is followed by one more read
/// before the write: if it says end-of-stream, the bytes go out with
/// `MSG_MORE` and the FIN the caller sends next rides on their last segment
/// (a connection-per-request reply and its FIN: one segment instead of two
/// for the LB to send and the client to take), and the round ends without
/// a poll round trip just to read the end. Bytes that came meanwhile are
/// simply written too; `EAGAIN` costs that one read. The caller asks for it
/// when the wait before saw the source's FIN (`POLLRDHUP`: the read then
/// took everything before it), and on the backend's side of a direction
/// that is not (yet) a conversation: backends that end their side right
/// after a reply (HTTP `Connection: close`, HTTP/1.0, many RPC protocols)
/// have usually sent the FIN by the time the reply is read (tcp_conn: still
/// 4 reads per connection, 1.3 fewer ring submissions).
async fn copy_round(
    buf: &mut [u8],
    ends: Ends<'_>,
    watch_bulk: bool,
    activity: Activity<'_>,
    count: &Cell<u64>,
    on_bytes: &impl Fn(u64),
) -> Result<Round, PumpError> {
    let Ends {
        src,
        dst,
        look_for_end,
    } = ends;
    let mut moved = 0u64;
    loop {
        match socket::recv(src.as_raw_fd(), buf) {
            Ok(0) => return Ok(Round::Eof),
            Ok(mut n) => {
                let mut ended = false;
                if look_for_end && moved == 0 && n < SMALL_READ && n < buf.len() {
                    match socket::recv(src.as_raw_fd(), &mut buf[n..]) {
                        Ok(0) => ended = true,
                        Ok(more) => n += more,
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => {
                            // Pass on what came before the error, then fail.
                            write_all(dst, &buf[..n]).await.map_err(PumpError::Write)?;
                            return Err(PumpError::Read(e));
                        }
                    }
                }
                write_all_or_wait(dst, &buf[..n], ended, || {})
                    .await
                    .map_err(PumpError::Write)?;
                count.set(count.get() + n as u64);
                on_bytes(n as u64);
                activity.moved(n as u64);
                moved += n as u64;
                if ended {
                    return Ok(Round::Eof);
                }
                if watch_bulk && n >= AUTO_SPLICE_THRESHOLD {
                    return Ok(Round::Bulk);
                }
                if moved >= YIELD_EVERY {
                    return Ok(Round::Busy);
                }
                if n < SMALL_READ && n < buf.len() {
                    // A small read (request/response traffic): the socket
                    // is almost surely drained. Wait for more instead of
                    // paying a read that would only say EAGAIN; the poll
                    // completes at once if more has arrived meanwhile. Bulk
                    // flows keep reading: for them another read is cheaper
                    // than a poll round trip.
                    return Ok(Round::Again(moved));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Round::Again(moved)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PumpError::Read(e)),
        }
    }
}

async fn splice_round(
    pipe: &mut sluice_uring::pipe::Pipe,
    src: &TcpStream,
    dst: &TcpStream,
    activity: Activity<'_>,
    count: &Cell<u64>,
    on_bytes: &impl Fn(u64),
) -> Result<Round, PumpError> {
    let mut moved = 0u64;
    loop {
        let room = pipe.room();
        match pipe.fill_from(src) {
            Ok(0) => return Ok(Round::Eof),
            Ok(filled) => {
                while pipe.pending() > 0 {
                    match pipe.drain_to(dst) {
                        Ok(n) => {
                            count.set(count.get() + n as u64);
                            on_bytes(n as u64);
                            moved += n as u64;
                            activity.moved(n as u64);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            op::poll(dst.as_raw_fd(), op::WRITABLE)
                                .await
                                .map_err(PumpError::Write)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(PumpError::Write(e)),
                    }
                }
                if moved >= YIELD_EVERY {
                    return Ok(Round::Busy);
                }
                if filled < SMALL_READ.min(room) {
                    // Small: the socket is likely drained (see copy_round).
                    return Ok(Round::Short);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Round::Again(moved)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PumpError::Read(e)),
        }
    }
}
