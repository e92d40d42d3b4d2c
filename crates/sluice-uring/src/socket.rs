//! Socket set-up: SO_REUSEPORT listeners, non-blocking accept and connect,
//! UDP sockets that learn the destination address of each datagram.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

fn base_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        ty.nonblocking().cloexec(),
        Some(proto),
    )?;
    if addr.is_ipv6() {
        // `[::]:P` must not also take IPv4: `0.0.0.0:P` may be a separate listener.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    Ok(socket)
}

/// A non-blocking TCP listener with SO_REUSEADDR, SO_REUSEPORT (one per
/// worker on the same address), IPV6_V6ONLY for IPv6, TCP_NODELAY (inherited
/// by accepted sockets) and a real `backlog`.
pub fn tcp_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = base_socket(addr, Type::STREAM, Protocol::TCP)?;
    // Accepted sockets inherit TCP_NODELAY from the listener: a proxy must
    // not hold back small segments (Nagle), and this costs no syscall per
    // connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// A non-blocking UDP socket with SO_REUSEPORT that receives the local
/// destination address of every datagram (IP_PKTINFO / IPV6_RECVPKTINFO),
/// so replies can leave from the address the client sent to.
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = base_socket(addr, Type::DGRAM, Protocol::UDP)?;
    if addr.is_ipv6() {
        setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A non-blocking, unbound UDP socket connected to `peer` (an upstream
/// socket of the UDP dataplane).
pub fn udp_connected(peer: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(peer),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    socket.connect(&peer.into())?;
    Ok(socket.into())
}

/// Accept one pending connection without blocking. The stream is
/// non-blocking and close-on-exec; returns `WouldBlock` when none is queued.
pub fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let mut storage = SockAddrStorage::zeroed();
    let mut len = storage.size_of();
    // SAFETY: `view_as` gives a `sockaddr_storage`-sized view of zeroed
    // storage, which is a valid `sockaddr_storage` value.
    let raw: *mut libc::sockaddr_storage = unsafe { storage.view_as::<libc::sockaddr_storage>() };
    // SAFETY: `raw` points to writable storage of `len` bytes, as accept4
    // requires; the listener fd is open for the duration of the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            raw.cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: accept4 wrote the peer's address into `storage` and its length
    // into `len`, which is what SockAddr::new requires.
    let peer = unsafe { SockAddr::new(storage, len) };
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "peer is not an IP address"))?;
    Ok((TcpStream::from(owned), peer))
}

/// Start a non-blocking connect to `addr` (TCP_NODELAY on). Returns the
/// stream and whether it is already connected; otherwise wait for it to
/// become writable and call [`finish_connect`].
pub fn connect_start(addr: SocketAddr) -> io::Result<(TcpStream, bool)> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    let done = match socket.connect(&addr.into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) => return Err(e),
    };
    Ok((socket.into(), done))
}

/// After a pending connect became writable: `Ok` if it succeeded, else the
/// connect error (SO_ERROR).
pub fn finish_connect(stream: &TcpStream) -> io::Result<()> {
    match stream.take_error()? {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Shut both directions of the socket `fd` down (`shutdown(SHUT_RDWR)`):
/// the peer gets a FIN, every poll on it completes and every read sees
/// end-of-stream. Errors (already shut down, not connected) are ignored:
/// the socket is on its way out either way. The caller owns `fd`.
pub fn shutdown_both(fd: RawFd) {
    let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
}

/// The poll masks of two sockets right now (one `poll(2)` with a zero
/// timeout, no waiting), each polled for its own `events` (`POLLERR` and
/// `POLLHUP` are always reported). One system call where a `MSG_PEEK` read
/// or an `SO_ERROR` read per socket would take two.
pub fn ready_now(
    a: &TcpStream,
    a_events: u32,
    b: &TcpStream,
    b_events: u32,
) -> io::Result<(u32, u32)> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let flags = |e: u32| PollFlags::from_bits_retain(e as u16 as i16);
    let mut fds = [
        PollFd::new(a.as_fd(), flags(a_events)),
        PollFd::new(b.as_fd(), flags(b_events)),
    ];
    loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mask = |fd: &PollFd<'_>| fd.revents().map_or(0, |r| r.bits() as u16 as u32);
    Ok((mask(&fds[0]), mask(&fds[1])))
}
