//! TCP backends for end-to-end tests, all on loopback.
//!
//! [`TcpServer`] is the engine: a listener thread plus one thread per
//! connection running a handler. The ready-made backends wrap it (and
//! dereference to it for [`TcpServer::addr`], [`TcpServer::accepted`],
//! [`TcpServer::stop`], …):
//!
//! | backend | on each connection |
//! | --- | --- |
//! | [`TcpEcho`] | echoes bytes; answers the client's FIN with its own |
//! | [`TcpTagged`] | writes its name and `\n`, then echoes |
//! | [`TcpHashSink`] | reads to EOF, then writes `"<len> <sha256 hex>\n"` |
//! | [`TcpSource`] | writes N pseudo-random bytes from a seed, then FIN |
//! | [`TcpEchoMany`] | echoes, on one thread with `poll(2)`: for thousands of connections |
//!
//! Limits: a [`TcpServer`] runs at most [`MAX_CONNECTION_THREADS`] handler
//! threads; beyond that it stops accepting (new connections wait in the
//! listen backlog) until one finishes. Use [`TcpEchoMany`] when a test needs
//! more connections than that open at once (raise the fd limit first with
//! [`crate::tools::raise_nofile_limit`]).
//!
//! Every thread checks the stop flag at least every [`POLL_SLICE`];
//! [`TcpServer::stop`] (or dropping the backend) closes the listener first,
//! so new connects are refused, then closes every connection and joins every
//! thread.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::bulk::{HashCounter, PseudoRandom};
use crate::net::LOCALHOST;
use crate::POLL_SLICE;

/// The most connection threads one [`TcpServer`] runs at once.
pub const MAX_CONNECTION_THREADS: usize = 512;

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    active: AtomicUsize,
}

/// One accepted connection, as a handler sees it. Reads and writes wait for
/// the peer as long as needed but give up with [`io::ErrorKind::Interrupted`]
/// once the server is stopping, so a handler written with them always ends.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
}

impl Conn {
    /// The client's address (for a proxied connection: sluice's side).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The underlying stream (it has a short read/write timeout set; prefer
    /// [`Conn::read`] and [`Conn::write_all`]).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// True once the server is stopping.
    pub fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    fn stopped_error() -> io::Error {
        io::Error::new(io::ErrorKind::Interrupted, "backend stopped")
    }

    /// Reads some bytes; `Ok(0)` on EOF.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.stopping() {
                return Err(Self::stopped_error());
            }
            match self.stream.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes all of `buf`.
    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.stopping() {
                return Err(Self::stopped_error());
            }
            match self.stream.write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends FIN (half-close): the client sees EOF, and can still send.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    /// Echoes everything until EOF, then half-closes.
    pub fn echo(&mut self) -> io::Result<()> {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = self.read(&mut buf)?;
            if n == 0 {
                return self.shutdown_write();
            }
            self.write_all(&buf[..n])?;
        }
    }

    /// Reads and discards everything until EOF; returns the byte count.
    pub fn drain(&mut self) -> io::Result<u64> {
        let mut buf = vec![0; 64 * 1024];
        let mut total = 0;
        loop {
            match self.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// What a [`TcpServer`] runs for each connection. Errors end the connection
/// and are otherwise ignored (clients resetting is normal in tests).
pub type Handler = Arc<dyn Fn(&mut Conn) -> io::Result<()> + Send + Sync>;

/// A thread-per-connection TCP server on loopback running a [`Handler`].
pub struct TcpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpServer")
            .field("addr", &self.addr)
            .field("accepted", &self.accepted())
            .field("active", &self.active())
            .finish()
    }
}

impl TcpServer {
    /// Binds `addr` (port 0 for any free port; loopback only) and serves
    /// each connection with `handler` on its own thread.
    pub fn start(
        addr: SocketAddr,
        handler: impl Fn(&mut Conn) -> io::Result<()> + Send + Sync + 'static,
    ) -> TcpServer {
        assert!(
            addr.ip().is_loopback(),
            "tests listen on loopback only, not {addr}"
        );
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("backend cannot bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let shared = Arc::new(Shared::default());
        let handler: Handler = Arc::new(handler);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("tcp-backend-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared, handler))
                .expect("spawn backend thread")
        };
        TcpServer {
            addr,
            shared,
            accept_thread: Mutex::new(Some(thread)),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Closes the listener (new connects are refused), closes every
    /// connection and joins every thread. Idempotent; also done on drop.
    /// Afterwards the same address can be bound again (for a backend that
    /// "comes back").
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let thread = self
            .accept_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                eprintln!("[backend {}] accept thread panicked", self.addr);
            }
        }
    }

    /// True once [`TcpServer::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `fd` is readable or `POLL_SLICE` passes.
fn wait_readable(fd: &impl AsFd) {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let _ = poll(
        &mut fds,
        PollTimeout::try_from(POLL_SLICE).unwrap_or(PollTimeout::MAX),
    );
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, handler: Handler) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        threads.retain(|t| !t.is_finished());
        if shared.active.load(Ordering::SeqCst) >= MAX_CONNECTION_THREADS {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                shared.active.fetch_add(1, Ordering::SeqCst);
                let conn_shared = shared.clone();
                let handler = handler.clone();
                let spawned = std::thread::Builder::new()
                    .name("tcp-backend-conn".into())
                    .spawn(move || {
                        let mut conn = Conn {
                            stream,
                            peer,
                            shared: conn_shared,
                        };
                        let setup = conn
                            .stream
                            .set_nonblocking(false)
                            .and_then(|()| conn.stream.set_read_timeout(Some(POLL_SLICE)))
                            .and_then(|()| conn.stream.set_write_timeout(Some(POLL_SLICE)))
                            .and_then(|()| conn.stream.set_nodelay(true));
                        if setup.is_ok() {
                            let _ = handler(&mut conn);
                        }
                        conn.shared.active.fetch_sub(1, Ordering::SeqCst);
                    });
                match spawned {
                    Ok(thread) => threads.push(thread),
                    Err(e) => {
                        shared.active.fetch_sub(1, Ordering::SeqCst);
                        eprintln!("[backend] cannot spawn a connection thread: {e}");
                    }
                }
            }
            Err(e) if is_retry(&e) => wait_readable(&listener),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("[backend] accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    drop(listener);
    for thread in threads {
        let _ = thread.join();
    }
}

macro_rules! backend_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name(TcpServer);

        impl Deref for $name {
            type Target = TcpServer;
            fn deref(&self) -> &TcpServer {
                &self.0
            }
        }
    };
}

backend_newtype!(
    /// Echoes every byte back; answers the client's FIN with its own.
    TcpEcho
);

impl TcpEcho {
    /// An echo backend on `127.0.0.1:<free port>`.
    pub fn start() -> TcpEcho {
        Self::start_on(SocketAddr::new(LOCALHOST, 0))
    }

    /// An echo backend on `addr`.
    pub fn start_on(addr: SocketAddr) -> TcpEcho {
        TcpEcho(TcpServer::start(addr, Conn::echo))
    }
}

backend_newtype!(
    /// Writes `name` and `\n` on each connection, then echoes: lets a test
    /// see which backend a connection reached (see [`crate::net::tcp_tag`]).
    TcpTagged
);

impl TcpTagged {
    /// A tagged backend called `name` on `127.0.0.1:<free port>`.
    pub fn start(name: &str) -> TcpTagged {
        Self::start_on(name, SocketAddr::new(LOCALHOST, 0))
    }

    /// A tagged backend called `name` on `addr`.
    pub fn start_on(name: &str, addr: SocketAddr) -> TcpTagged {
        assert!(!name.contains('\n'), "a tag is one line");
        let tag = format!("{name}\n").into_bytes();
        TcpTagged(TcpServer::start(addr, move |conn| {
            conn.write_all(&tag)?;
            conn.echo()
        }))
    }
}

backend_newtype!(
    /// Reads everything until the client half-closes, then writes
    /// `"<length> <sha256 hex>\n"` of what it received and closes. Pair with
    /// [`crate::net::send_bulk_and_hash`].
    TcpHashSink
);

/// What a [`TcpHashSink`] received on each finished connection:
/// `(length, sha256 hex)`.
#[derive(Debug, Default, Clone)]
pub struct HashReports(Arc<Mutex<Vec<(u64, String)>>>);

impl HashReports {
    /// A snapshot of the reports so far, in completion order.
    pub fn get(&self) -> Vec<(u64, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl TcpHashSink {
    /// A hash sink on `127.0.0.1:<free port>`, and the handle to its reports.
    pub fn start() -> (TcpHashSink, HashReports) {
        Self::start_on(SocketAddr::new(LOCALHOST, 0))
    }

    /// A hash sink on `addr`, and the handle to its reports.
    pub fn start_on(addr: SocketAddr) -> (TcpHashSink, HashReports) {
        let reports = HashReports::default();
        let sink_reports = reports.clone();
        let server = TcpServer::start(addr, move |conn| {
            let mut hash = HashCounter::new();
            let mut buf = vec![0; 256 * 1024];
            loop {
                match conn.read(&mut buf)? {
                    0 => break,
                    n => hash.update(&buf[..n]),
                }
            }
            let (len, hex) = hash.finish();
            let line = format!("{len} {hex}\n");
            // Reported before the reply goes out: a client that has read
            // the reply finds the report there.
            sink_reports
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((len, hex));
            conn.write_all(line.as_bytes())?;
            conn.shutdown_write()
        });
        (TcpHashSink(server), reports)
    }
}

backend_newtype!(
    /// On each connection writes `len` pseudo-random bytes from `seed`
    /// ([`PseudoRandom`]), half-closes, and waits for the client to close.
    /// Pair with [`crate::net::receive_bulk_and_hash`].
    TcpSource
);

impl TcpSource {
    /// A source of `len` bytes from `seed` on `127.0.0.1:<free port>`.
    pub fn start(seed: u64, len: u64) -> TcpSource {
        Self::start_on(SocketAddr::new(LOCALHOST, 0), seed, len)
    }

    /// A source of `len` bytes from `seed` on `addr`.
    pub fn start_on(addr: SocketAddr, seed: u64, len: u64) -> TcpSource {
        TcpSource(TcpServer::start(addr, move |conn| {
            let mut source = PseudoRandom::new(seed, len);
            let mut buf = vec![0; 256 * 1024];
            loop {
                let n = source.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                conn.write_all(&buf[..n])?;
            }
            conn.shutdown_write()?;
            conn.drain().map(drop)
        }))
    }
}

/// An echo backend for many connections: one thread, nonblocking sockets and
/// `poll(2)`, so thousands of concurrent connections cost no threads (only
/// file descriptors: see [`crate::tools::raise_nofile_limit`]). Echoes like
/// [`TcpEcho`], including answering FIN with FIN.
#[derive(Debug)]
pub struct TcpEchoMany {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct PolledConn {
    stream: TcpStream,
    pending: Vec<u8>,
    eof: bool,
}

impl TcpEchoMany {
    /// A poll-based echo backend on `127.0.0.1:<free port>`.
    pub fn start() -> TcpEchoMany {
        Self::start_on(SocketAddr::new(LOCALHOST, 0))
    }

    /// A poll-based echo backend on `addr`.
    pub fn start_on(addr: SocketAddr) -> TcpEchoMany {
        assert!(
            addr.ip().is_loopback(),
            "tests listen on loopback only, not {addr}"
        );
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("backend cannot bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("tcp-echo-many-{}", addr.port()))
                .spawn(move || poll_echo_loop(listener, &shared))
                .expect("spawn backend thread")
        };
        TcpEchoMany {
            addr,
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection and joins the thread.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for TcpEchoMany {
    fn drop(&mut self) {
        self.stop();
    }
}

fn poll_echo_loop(listener: TcpListener, shared: &Shared) {
    let mut conns: Vec<PolledConn> = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        let ready: Vec<PollFlags> = {
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            for conn in &conns {
                let interest = if conn.pending.is_empty() {
                    PollFlags::POLLIN
                } else {
                    PollFlags::POLLOUT
                };
                fds.push(PollFd::new(conn.stream.as_fd(), interest));
            }
            let timeout = PollTimeout::try_from(POLL_SLICE).unwrap_or(PollTimeout::MAX);
            if poll(&mut fds, timeout).is_err() {
                continue;
            }
            fds.iter()
                .map(|fd| fd.revents().unwrap_or(PollFlags::POLLERR))
                .collect()
        };
        if !ready[0].is_empty() {
            // Accept a bounded batch so connections already open get served too.
            for _ in 0..64 {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_ok() {
                            shared.accepted.fetch_add(1, Ordering::SeqCst);
                            conns.push(PolledConn {
                                stream,
                                pending: Vec::new(),
                                eof: false,
                            });
                        }
                    }
                    Err(e) if is_retry(&e) => break,
                    Err(e) => {
                        eprintln!("[backend] accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                        break;
                    }
                }
            }
        }
        // `ready[1..]` lines up with the connections that were polled; ones
        // accepted just now come after and are polled next round.
        let polled = ready.len() - 1;
        let mut keep = Vec::with_capacity(conns.len());
        for (i, mut conn) in conns.drain(..).enumerate() {
            let alive = if i < polled && !ready[i + 1].is_empty() {
                service(&mut conn, &mut buf)
            } else {
                true
            };
            if alive {
                keep.push(conn);
            }
        }
        conns = keep;
        shared.active.store(conns.len(), Ordering::SeqCst);
    }
    shared.active.store(0, Ordering::SeqCst);
}

/// One step of echo on a ready connection; false when it is finished.
fn service(conn: &mut PolledConn, buf: &mut [u8]) -> bool {
    if conn.pending.is_empty() {
        match conn.stream.read(buf) {
            Ok(0) => conn.eof = true,
            Ok(n) => conn.pending.extend_from_slice(&buf[..n]),
            Err(e) if is_retry(&e) => return true,
            Err(_) => return false,
        }
    }
    while !conn.pending.is_empty() {
        match conn.stream.write(&conn.pending) {
            Ok(0) => return false,
            Ok(n) => {
                conn.pending.drain(..n);
            }
            Err(e) if is_retry(&e) => return true,
            Err(_) => return false,
        }
    }
    if conn.eof {
        let _ = conn.stream.shutdown(Shutdown::Write);
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{
        connect_with_retry, echo_roundtrip, read_line_within, receive_bulk_and_hash,
        send_bulk_and_hash, tcp_tag,
    };
    use crate::{eventually, DEADLINE};

    #[test]
    fn echo_and_tag() {
        let echo = TcpEcho::start();
        let mut stream = connect_with_retry(echo.addr(), DEADLINE);
        echo_roundtrip(&mut stream, b"hello", DEADLINE);
        eventually(DEADLINE, "one accepted connection", || echo.accepted() == 1);

        let tagged = TcpTagged::start("b1");
        assert_eq!(tcp_tag(tagged.addr(), DEADLINE), "b1");
        let mut stream = connect_with_retry(tagged.addr(), DEADLINE);
        assert_eq!(read_line_within(&mut stream, DEADLINE).unwrap(), "b1");
        echo_roundtrip(&mut stream, &[7; 100_000], DEADLINE);
        eventually(DEADLINE, "two accepted connections", || {
            tagged.accepted() == 2
        });
    }

    #[test]
    fn bulk_both_ways() {
        let (sink, reports) = TcpHashSink::start();
        let len = 3_000_001;
        let got = send_bulk_and_hash(sink.addr(), 42, len, DEADLINE);
        assert_eq!(got, (len, PseudoRandom::expected_sha256_hex(42, len)));
        assert_eq!(reports.get(), vec![got]);

        let source = TcpSource::start(9, len);
        let got = receive_bulk_and_hash(source.addr(), DEADLINE);
        assert_eq!(got, (len, PseudoRandom::expected_sha256_hex(9, len)));
    }

    #[test]
    fn stop_closes_listener_and_connections() {
        let echo = TcpEcho::start();
        let addr = echo.addr();
        let mut stream = connect_with_retry(addr, DEADLINE);
        echo_roundtrip(&mut stream, b"x", DEADLINE);
        echo.stop();
        assert!(
            crate::net::closed_within(&mut stream, DEADLINE),
            "connection closed on stop"
        );
        assert!(TcpStream::connect(addr).is_err(), "listener closed on stop");
        // The address can be taken again by a backend that comes back.
        let again = TcpEcho::start_on(addr);
        let mut stream = connect_with_retry(addr, DEADLINE);
        echo_roundtrip(&mut stream, b"y", DEADLINE);
        drop(again);
    }

    #[test]
    fn echo_many_serves_hundreds_of_connections_on_one_thread() {
        let echo = TcpEchoMany::start();
        let mut streams: Vec<TcpStream> = (0..300)
            .map(|_| connect_with_retry(echo.addr(), DEADLINE))
            .collect();
        for (i, stream) in streams.iter_mut().enumerate() {
            echo_roundtrip(stream, format!("conn {i}").as_bytes(), DEADLINE);
        }
        assert_eq!(echo.accepted(), 300);
        for stream in &streams {
            stream.shutdown(Shutdown::Write).unwrap();
        }
        for stream in &mut streams {
            assert!(crate::net::closed_within(stream, DEADLINE));
        }
        eventually(DEADLINE, "no open connections", || echo.active() == 0);
    }
}
