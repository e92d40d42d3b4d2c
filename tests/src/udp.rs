//! UDP backends for end-to-end tests, all on loopback.
//!
//! [`UdpServer`] is the engine: one thread, one socket, a handler that maps a
//! datagram to an optional reply. [`UdpEcho`] and [`UdpTagged`] wrap it and
//! dereference to it for [`UdpServer::addr`], [`UdpServer::received`],
//! [`UdpServer::peers`], [`UdpServer::stop`], …

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
#[cfg(test)]
use std::time::Duration;

use crate::net::LOCALHOST;
use crate::POLL_SLICE;

/// Maps a datagram and its source to an optional reply (sent back to the
/// source from the server's socket).
pub type UdpHandler = Box<dyn FnMut(&[u8], SocketAddr) -> Option<Vec<u8>> + Send>;

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    received: AtomicUsize,
    /// Distinct source addresses seen (capped at [`MAX_PEERS`]).
    peers: Mutex<BTreeSet<SocketAddr>>,
}

/// The most distinct peer addresses a [`UdpServer`] remembers.
pub const MAX_PEERS: usize = 100_000;

/// A one-thread UDP server on loopback.
pub struct UdpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for UdpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpServer")
            .field("addr", &self.addr)
            .field("received", &self.received())
            .finish()
    }
}

impl UdpServer {
    /// Binds `addr` (port 0 for any free port; loopback only) and answers
    /// each datagram with `handler`.
    pub fn start(
        addr: SocketAddr,
        handler: impl FnMut(&[u8], SocketAddr) -> Option<Vec<u8>> + Send + 'static,
    ) -> UdpServer {
        assert!(
            addr.ip().is_loopback(),
            "tests listen on loopback only, not {addr}"
        );
        let socket =
            UdpSocket::bind(addr).unwrap_or_else(|e| panic!("backend cannot bind {addr}: {e}"));
        let addr = socket.local_addr().expect("local_addr");
        socket
            .set_read_timeout(Some(POLL_SLICE))
            .expect("set timeout");
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            let handler: UdpHandler = Box::new(handler);
            std::thread::Builder::new()
                .name(format!("udp-backend-{}", addr.port()))
                .spawn(move || serve(socket, &shared, handler))
                .expect("spawn backend thread")
        };
        UdpServer {
            addr,
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// Distinct source addresses seen so far (in `session` mode, one per
    /// client flow sluice opened towards this backend).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Closes the socket and joins the thread. Idempotent; also done on drop.
    /// Afterwards datagrams to the address get ICMP port unreachable, and the
    /// address can be bound again.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                eprintln!("[backend {}] UDP handler panicked", self.addr);
            }
        }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(socket: UdpSocket, shared: &Shared, mut handler: UdpHandler) {
    let mut buf = vec![0; 65536];
    while !shared.stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                shared.received.fetch_add(1, Ordering::SeqCst);
                {
                    let mut peers = shared.peers.lock().unwrap_or_else(|p| p.into_inner());
                    if peers.len() < MAX_PEERS {
                        peers.insert(peer);
                    }
                }
                if let Some(reply) = handler(&buf[..n], peer) {
                    // A client that went away gives ECONNREFUSED later; ignore.
                    let _ = socket.send_to(&reply, peer);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => {
                eprintln!("[backend] udp recv: {e}");
                std::thread::sleep(POLL_SLICE);
            }
        }
    }
}

/// Echoes each datagram back to its source.
#[derive(Debug)]
pub struct UdpEcho(UdpServer);

impl UdpEcho {
    /// A UDP echo backend on `127.0.0.1:<free port>`.
    pub fn start() -> UdpEcho {
        Self::start_on(SocketAddr::new(LOCALHOST, 0))
    }

    /// A UDP echo backend on `addr`.
    pub fn start_on(addr: SocketAddr) -> UdpEcho {
        UdpEcho(UdpServer::start(addr, |payload, _| Some(payload.to_vec())))
    }
}

impl Deref for UdpEcho {
    type Target = UdpServer;
    fn deref(&self) -> &UdpServer {
        &self.0
    }
}

/// Replies to each datagram with its `name`, `\n`, then the payload: lets a
/// test see which backend a datagram reached (split with [`split_tag`]).
#[derive(Debug)]
pub struct UdpTagged(UdpServer);

impl UdpTagged {
    /// A tagged UDP backend called `name` on `127.0.0.1:<free port>`.
    pub fn start(name: &str) -> UdpTagged {
        Self::start_on(name, SocketAddr::new(LOCALHOST, 0))
    }

    /// A tagged UDP backend called `name` on `addr`.
    pub fn start_on(name: &str, addr: SocketAddr) -> UdpTagged {
        assert!(!name.contains('\n'), "a tag is one line");
        let tag = format!("{name}\n").into_bytes();
        UdpTagged(UdpServer::start(addr, move |payload, _| {
            let mut reply = tag.clone();
            reply.extend_from_slice(payload);
            Some(reply)
        }))
    }
}

impl Deref for UdpTagged {
    type Target = UdpServer;
    fn deref(&self) -> &UdpServer {
        &self.0
    }
}

/// Splits a [`UdpTagged`] reply into `(backend name, payload)`.
pub fn split_tag(reply: &[u8]) -> Option<(String, &[u8])> {
    let at = reply.iter().position(|&b| b == b'\n')?;
    Some((
        String::from_utf8_lossy(&reply[..at]).into_owned(),
        &reply[at + 1..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{udp_client, udp_request};
    use crate::DEADLINE;

    #[test]
    fn echo_and_tag() {
        let echo = UdpEcho::start();
        let client = udp_client();
        assert_eq!(
            udp_request(&client, echo.addr(), b"ping", DEADLINE).unwrap(),
            b"ping"
        );

        let tagged = UdpTagged::start("u1");
        let reply = udp_request(&client, tagged.addr(), b"ping", DEADLINE).unwrap();
        assert_eq!(split_tag(&reply), Some(("u1".to_string(), &b"ping"[..])));
        assert_eq!(tagged.peers(), vec![client.local_addr().unwrap()]);
        assert_eq!(tagged.received(), 1);

        tagged.stop();
        assert!(udp_request(&client, tagged.addr(), b"ping", Duration::from_millis(200)).is_none());
    }
}
