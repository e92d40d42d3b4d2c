//! The TCP connections of one worker, for what the worker does to all of
//! them at once: close the ones idle for their service's `idle_timeout`, and
//! close every one at the shutdown deadline.
//!
//! Both work the same way: the worker shuts its sockets down
//! (`shutdown(SHUT_RDWR)`), which sends the FINs, completes every poll
//! waiting on them and makes every read see end-of-stream, so the
//! connection's own task finishes by itself and closes them; the reason is
//! left in the table for its access log. A connection therefore carries no
//! timer and no stop signal of its own: on the data path its only cost is
//! adding the bytes it moves to a counter here.
//!
//! Idle is judged by that counter: a sweep every `tick` (a sixteenth of the
//! smallest idle timeout among the open connections, between 5 ms and 1 s)
//! notes when each connection's counter last changed, and closes it once it
//! has not for `idle_timeout`. So a connection closes between `idle_timeout`
//! and `idle_timeout + 2 * tick` after its last byte, never before.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use slab::Slab;

/// Why the worker ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Idle,
    Shutdown,
}

const TICK_MIN: Duration = Duration::from_millis(5);
const TICK_MAX: Duration = Duration::from_secs(1);

fn tick_for(idle: Duration) -> Duration {
    (idle / 16).clamp(TICK_MIN, TICK_MAX)
}

#[derive(Debug)]
struct Conn {
    client: RawFd,
    /// Set once the connection proxies (the idle timeout starts then).
    backend: Option<RawFd>,
    idle: Duration,
    /// Bytes moved either way so far.
    moved: Cell<u64>,
    /// `moved` as of the last sweep, and when it last changed.
    seen: Cell<(u64, Instant)>,
    ended: Cell<Option<Ended>>,
}

impl Conn {
    fn shut_down(&self, why: Ended) {
        if self.ended.get().is_none() {
            self.ended.set(Some(why));
        }
        sluice_uring::socket::shutdown_both(self.client);
        if let Some(fd) = self.backend {
            sluice_uring::socket::shutdown_both(fd);
        }
    }
}

/// The table. Every fd in it belongs to a live connection: a connection
/// takes its backend out ([`TcpConns::unproxy`]) before closing it and
/// itself out ([`TcpConns::remove`]) before closing its client socket, and
/// nothing here awaits, so no fd is used after it was closed.
#[derive(Debug)]
pub(crate) struct TcpConns {
    conns: RefCell<Slab<Conn>>,
    stopping: Cell<bool>,
    tick: Cell<Duration>,
    /// Woken when a connection needs a shorter tick than the sweep sleeps.
    shorter: tokio::sync::Notify,
}

impl TcpConns {
    pub fn new() -> Self {
        Self {
            conns: RefCell::new(Slab::new()),
            stopping: Cell::new(false),
            tick: Cell::new(TICK_MAX),
            shorter: tokio::sync::Notify::new(),
        }
    }

    /// A new connection, by its client socket; its key.
    pub fn insert(&self, client: RawFd) -> usize {
        let key = self.conns.borrow_mut().insert(Conn {
            client,
            backend: None,
            idle: Duration::MAX,
            moved: Cell::new(0),
            seen: Cell::new((0, Instant::now())),
            ended: Cell::new(None),
        });
        if self.stopping.get() {
            self.conns.borrow()[key].shut_down(Ended::Shutdown);
        }
        key
    }

    /// The connection `key` now proxies to `backend`: from here on it is
    /// closed after `idle` without a byte either way.
    pub fn proxying(&self, key: usize, backend: RawFd, idle: Duration) {
        let mut conns = self.conns.borrow_mut();
        let Some(conn) = conns.get_mut(key) else {
            return;
        };
        conn.backend = Some(backend);
        conn.idle = idle;
        conn.seen.set((conn.moved.get(), Instant::now()));
        if self.stopping.get() {
            conn.shut_down(Ended::Shutdown);
        }
        drop(conns);
        if tick_for(idle) < self.tick.get() {
            self.tick.set(tick_for(idle));
            self.shorter.notify_one();
        }
    }

    /// `n` bytes moved on `key`.
    pub fn moved(&self, key: usize, n: u64) {
        if let Some(conn) = self.conns.borrow().get(key) {
            conn.moved.set(conn.moved.get() + n);
        }
    }

    /// The backend socket of `key` is about to be closed.
    pub fn unproxy(&self, key: usize) {
        if let Some(conn) = self.conns.borrow_mut().get_mut(key) {
            conn.backend = None;
        }
    }

    /// Whether, and why, the worker ended `key`.
    #[cfg(test)]
    pub fn ended(&self, key: usize) -> Option<Ended> {
        self.conns.borrow().get(key).and_then(|c| c.ended.get())
    }

    /// `key` is about to close its client socket: forget it, and say
    /// whether, and why, the worker ended it.
    pub fn remove(&self, key: usize) -> Option<Ended> {
        self.conns.borrow_mut().try_remove(key)?.ended.get()
    }

    pub fn stopping(&self) -> bool {
        self.stopping.get()
    }

    /// The shutdown deadline passed: end every connection now, and every
    /// one accepted or connected from now on.
    pub fn stop_all(&self) {
        self.stopping.set(true);
        for (_, conn) in self.conns.borrow().iter() {
            conn.shut_down(Ended::Shutdown);
        }
    }

    /// One sweep at `now`: end the connections idle for their timeout.
    /// Returns how long to wait before the next one.
    fn sweep(&self, now: Instant) -> Duration {
        let mut shortest = Duration::MAX;
        for (_, conn) in self.conns.borrow().iter() {
            if conn.backend.is_none() || conn.ended.get().is_some() {
                continue;
            }
            shortest = shortest.min(conn.idle);
            let (seen, since) = conn.seen.get();
            let moved = conn.moved.get();
            if moved != seen {
                conn.seen.set((moved, now));
            } else if now.saturating_duration_since(since) >= conn.idle {
                log::debug!("connection idle for {:?}: closing", conn.idle);
                conn.shut_down(Ended::Idle);
            }
        }
        // With no connection proxying, keep the last tick: the next
        // connection is likely of the same service.
        if shortest != Duration::MAX {
            self.tick.set(tick_for(shortest));
        }
        self.tick.get()
    }

    /// The worker's sweep task: runs until the worker's runtime ends.
    pub async fn sweep_loop(&self) {
        loop {
            let tick = self.tick.get();
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.shorter.notified() => {}
            }
            self.sweep(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn idle_connection_is_shut_down_after_its_timeout_not_before() {
        let table = TcpConns::new();
        let (client_peer, client) = pair();
        let (backend, backend_peer) = pair();
        let key = table.insert(client.as_raw_fd());
        let idle = Duration::from_secs(10);
        table.proxying(key, backend.as_raw_fd(), idle);
        assert_eq!(table.tick.get(), tick_for(idle));
        let t0 = Instant::now();
        // Bytes moved: the idle clock restarts at the sweep that sees them.
        table.moved(key, 5);
        table.sweep(t0 + Duration::from_secs(6));
        table.sweep(t0 + Duration::from_secs(15));
        assert_eq!(table.ended(key), None, "9 s after the last activity seen");
        table.sweep(t0 + Duration::from_secs(16));
        assert_eq!(table.ended(key), Some(Ended::Idle));
        // Both peers see end-of-stream.
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &client_peer, &mut buf).unwrap(), 0);
        assert_eq!(
            std::io::Read::read(&mut &backend_peer, &mut buf).unwrap(),
            0
        );
        table.unproxy(key);
        assert_eq!(table.remove(key), Some(Ended::Idle));
        assert_eq!(table.ended(key), None);
    }

    #[test]
    fn stop_all_ends_open_and_later_connections() {
        let table = TcpConns::new();
        let (peer_a, a) = pair();
        let (peer_b, b) = pair();
        let (backend, peer_backend) = pair();
        let ka = table.insert(a.as_raw_fd());
        table.stop_all();
        assert_eq!(table.ended(ka), Some(Ended::Shutdown));
        let kb = table.insert(b.as_raw_fd());
        assert_eq!(table.ended(kb), Some(Ended::Shutdown));
        table.proxying(kb, backend.as_raw_fd(), Duration::from_secs(1));
        let mut buf = [0u8; 1];
        for peer in [&peer_a, &peer_b, &peer_backend] {
            assert_eq!(std::io::Read::read(&mut &*peer, &mut buf).unwrap(), 0);
        }
        assert!(table.stopping());
    }

    #[test]
    fn a_connection_not_yet_proxying_is_never_idle() {
        let table = TcpConns::new();
        let (_peer, client) = pair();
        let key = table.insert(client.as_raw_fd());
        table.sweep(Instant::now() + Duration::from_secs(3600));
        assert_eq!(table.ended(key), None);
    }
}
