//! Socket set-up: SO_REUSEPORT listeners, non-blocking accept and connect,
//! UDP sockets that learn the destination address of each datagram; and
//! the non-blocking `send`/`recv` every data path uses.
//!
//! `send` and `recv` are made with `syscall(2)` rather than through libc's
//! wrappers: those are thread-cancellation points and wrap each call in two
//! extra calls that switch asynchronous cancellation off and on again
//! (sluice never cancels threads; `pthread_disable_asynccancel` alone was
//! 2% of the worker's samples in the keep-alive profile).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

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
    // (`syscall(2)`, not libc's cancellation-point wrapper: see above.)
    let fd = unsafe {
        libc::syscall(
            libc::SYS_accept4,
            listener.as_raw_fd(),
            raw.cast::<libc::sockaddr>(),
            &mut len as *mut libc::socklen_t,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    let fd = syscall_len(fd)? as RawFd;
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
    let sa = SockAddr::from(addr);
    // SAFETY: `sa` holds a valid socket address of `sa.len()` bytes for the
    // duration of the call, and the socket is open. (`syscall(2)`, not
    // libc's cancellation-point wrapper: see the module docs.)
    let r = unsafe {
        libc::syscall(
            libc::SYS_connect,
            socket.as_raw_fd(),
            sa.as_ptr().cast::<libc::sockaddr>(),
            sa.len(),
        )
    };
    let done = if r == 0 {
        true
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINPROGRESS) {
            false
        } else {
            return Err(e);
        }
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

/// Keep at most about `bytes` of not-yet-sent data queued in `stream`
/// (`TCP_NOTSENT_LOWAT`): a write beyond it says `WouldBlock`, and the
/// socket polls writable again once under half of it is left.
pub fn set_notsent_lowat(stream: &TcpStream, bytes: u32) -> io::Result<()> {
    socket2::SockRef::from(stream).set_tcp_notsent_lowat(bytes)
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
    let pollfd = |fd: &TcpStream, events: u32| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: events as u16 as i16,
        revents: 0,
    };
    let mut fds = [pollfd(a, a_events), pollfd(b, b_events)];
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: `fds` is a live array of two pollfds, the length given;
        // `zero` is a valid timespec; a null signal mask is allowed.
        // (`ppoll` through `syscall(2)`: libc's wrapper is a
        // cancellation point, see the module docs.)
        let r = unsafe {
            libc::syscall(
                libc::SYS_ppoll,
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &zero as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let mask = |fd: &libc::pollfd| fd.revents as u16 as u32;
    Ok((mask(&fds[0]), mask(&fds[1])))
}

/// The result of a `syscall(2)` that returns a count (or a descriptor):
/// the count, or the error in `errno` when it is negative.
pub(crate) fn syscall_len(n: libc::c_long) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Send from `data` on the connected non-blocking socket `fd` without
/// waiting (`send(2)` with `MSG_DONTWAIT | MSG_NOSIGNAL`): the bytes taken,
/// or `WouldBlock` when there is no room. A pending socket error (for UDP,
/// an earlier ICMP port unreachable) is returned instead and cleared.
pub fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    send_flags(fd, data, 0)
}

/// [`send`] with `MSG_MORE`: on TCP the kernel keeps a last partial
/// segment back until more data, a `shutdown`/`close` (whose FIN then
/// rides on that segment) or a later send without it pushes it out. Use it
/// only when one of those follows at once.
pub fn send_more(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    send_flags(fd, data, libc::MSG_MORE)
}

fn send_flags(fd: RawFd, data: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `data` is a valid readable buffer of `data.len()` bytes for
    // the duration of the call; a null address with length 0 is allowed.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            data.as_ptr(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | flags,
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        )
    };
    syscall_len(n)
}

/// Close `fd` now (`close(2)` through `syscall(2)`, not libc's
/// cancellation-point wrapper). Like dropping it, errors are ignored: the
/// descriptor is released either way. An fd with io_uring operations in
/// flight must go through [`crate::op::close`] instead.
pub fn close(fd: impl Into<OwnedFd>) {
    let raw = fd.into().into_raw_fd();
    // SAFETY: `raw` came out of an `OwnedFd`, so this process owns it and
    // nothing else will close or use it.
    unsafe {
        libc::syscall(libc::SYS_close, raw);
    }
}

/// Receive into `buf` from the non-blocking socket `fd` without waiting
/// (`recv(2)` with `MSG_DONTWAIT`): the bytes read, `Ok(0)` at end of
/// stream (or for an empty `buf`), `WouldBlock` when nothing is queued.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes, not
    // otherwise borrowed during the call; null address pointers are allowed.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf.as_mut_ptr(),
            buf.len(),
            libc::MSG_DONTWAIT,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    syscall_len(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit lands on the socket, and a connected socket that had none
    /// (the kernel's default is "no limit", `u32::MAX`) reports it.
    #[test]
    fn notsent_lowat_is_set_on_a_connected_socket() {
        let listener = tcp_listener("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let before = socket2::SockRef::from(&stream).tcp_notsent_lowat().unwrap();
        set_notsent_lowat(&stream, 1 << 20).unwrap();
        let after = socket2::SockRef::from(&stream).tcp_notsent_lowat().unwrap();
        assert_ne!(
            before,
            1 << 20,
            "the default must differ for this to show anything"
        );
        assert_eq!(after, 1 << 20);
    }
}
