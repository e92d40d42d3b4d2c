//! UDP datagrams without per-datagram allocation: batched `recvmmsg(2)`
//! that also returns the local destination address of each datagram
//! (IP_PKTINFO / IPV6_PKTINFO), batched `sendmmsg(2)` of received
//! datagrams ([`RecvBatch::send_slots`]), and `sendmsg(2)` of one datagram
//! ([`send_to`]); both set the source address of a reply, so replies leave
//! from the address the client sent to even on a wildcard socket.
//!
//! Everything here is a plain non-blocking syscall (the readiness model:
//! wait with [`crate::op::poll`], then call these until `WouldBlock`).
//! Headers, addresses and control buffers live in a [`RecvBatch`] that is
//! allocated once and reused for every call, or on the stack ([`send_to`]);
//! nix's `sendmsg` is not used because it allocates a control-message `Vec`
//! per call. The syscalls are made with `syscall(2)` rather than through
//! libc's wrappers, which are thread-cancellation points and cost two
//! extra calls each (measured: about 6 % of a DNS worker's time).
//!
//! ```no_run
//! use std::os::fd::AsRawFd;
//! use sluice_uring::{op, socket, udp};
//! sluice_uring::runtime::start(64, async {
//!     let sock = socket::udp_socket("0.0.0.0:5300".parse().unwrap()).unwrap();
//!     let mut batch = udp::RecvBatch::new(32, udp::MAX_DATAGRAM);
//!     op::poll(sock.as_raw_fd(), op::READABLE).await.unwrap();
//!     let n = batch.recv(sock.as_raw_fd()).unwrap();
//!     for i in 0..n {
//!         let meta = batch.meta(i);
//!         let reply = batch.data(i).to_vec(); // echo (the example allocates; sluice does not)
//!         // reply from the address the client sent to
//!         udp::send_to(sock.as_raw_fd(), &reply, meta.src, meta.dst).unwrap();
//!     }
//! });
//! ```

use std::fmt;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Receive slot size that holds any UDP payload over IPv4 or IPv6 (65,507
/// and 65,527 bytes); a larger datagram is reported as truncated.
pub const MAX_DATAGRAM: usize = 65536;

/// Room for one control message carrying the larger of `in_pktinfo` and
/// `in6_pktinfo`, plus slack for one more small message. Aligned like
/// `cmsghdr` so the CMSG_* macros are valid on it.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgSpace([u8; 128]);

impl CmsgSpace {
    const fn zeroed() -> Self {
        CmsgSpace([0; 128])
    }
}

/// The local destination of a received datagram (from PKTINFO): the
/// address the client sent to, and the interface it arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PktInfo {
    pub addr: IpAddr,
    pub ifindex: u32,
}

/// What [`RecvBatch::meta`] tells about one received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Payload bytes in the slot (at most the slot size).
    pub len: usize,
    /// The sender (`None` if the kernel gave no IP address).
    pub src: Option<SocketAddr>,
    /// The local address it was sent to, when PKTINFO is on for the socket.
    pub dst: Option<PktInfo>,
    /// The datagram was larger than the slot (MSG_TRUNC): its tail is lost.
    pub truncated: bool,
}

/// Reused buffers for `recvmmsg(2)`: `capacity` slots of `slot_size` bytes,
/// each with its source-address storage and control buffer. Allocated once;
/// the slot memory is zero-filled lazily by the kernel (calloc'd pages), so
/// only what datagrams actually touch becomes resident.
///
/// The raw `msghdr`s point into the batch's own boxes; they are rebuilt at
/// every [`RecvBatch::recv`] call, so moving the batch is harmless.
pub struct RecvBatch {
    slot_size: usize,
    bufs: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    ctrls: Box<[CmsgSpace]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    filled: usize,
    /// Headers of [`RecvBatch::send_slots`], apart from the receive ones so
    /// that sending leaves the received metadata intact.
    out: SendHeaders,
}

/// `sendmmsg(2)` headers with their addresses and control buffers.
struct SendHeaders {
    names: Box<[libc::sockaddr_storage]>,
    ctrls: Box<[CmsgSpace]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

/// One datagram to send from a [`RecvBatch`]: the payload of `slot` (as
/// received, or rewritten through [`RecvBatch::data_mut`]), to `dst`
/// (`None` on a connected socket), leaving from `src` when given (see
/// [`send_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendSlot {
    pub slot: usize,
    pub dst: Option<SocketAddr>,
    pub src: Option<PktInfo>,
}

impl fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.hdrs.len())
            .field("slot_size", &self.slot_size)
            .field("filled", &self.filled)
            .finish()
    }
}

impl RecvBatch {
    /// A batch of `capacity` (at least 1) slots of `slot_size` (at least 1)
    /// bytes each.
    pub fn new(capacity: usize, slot_size: usize) -> Self {
        let capacity = capacity.max(1);
        let slot_size = slot_size.max(1);
        // SAFETY: all-zero bytes are a valid value of these plain C structs
        // (null pointers, zero lengths).
        let zero_name: libc::sockaddr_storage = unsafe { zeroed() };
        // SAFETY: as above.
        let zero_iov: libc::iovec = unsafe { zeroed() };
        // SAFETY: as above.
        let zero_hdr: libc::mmsghdr = unsafe { zeroed() };
        RecvBatch {
            slot_size,
            bufs: vec![0u8; capacity * slot_size].into_boxed_slice(),
            names: vec![zero_name; capacity].into_boxed_slice(),
            ctrls: vec![CmsgSpace::zeroed(); capacity].into_boxed_slice(),
            iovs: vec![zero_iov; capacity].into_boxed_slice(),
            hdrs: vec![zero_hdr; capacity].into_boxed_slice(),
            filled: 0,
            out: SendHeaders {
                names: vec![zero_name; capacity].into_boxed_slice(),
                ctrls: vec![CmsgSpace::zeroed(); capacity].into_boxed_slice(),
                iovs: vec![zero_iov; capacity].into_boxed_slice(),
                hdrs: vec![zero_hdr; capacity].into_boxed_slice(),
            },
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Datagrams held from the last [`recv`](Self::recv).
    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Receive up to `capacity` datagrams from the non-blocking socket `fd`
    /// without waiting (`recvmmsg` with `MSG_DONTWAIT`). Returns how many
    /// arrived (at least 1), or `WouldBlock` when none is queued, or the
    /// socket's pending error (e.g. `ConnectionRefused` after an ICMP port
    /// unreachable on a connected socket). Overwrites the previous batch.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.filled = 0;
        let cap = self.hdrs.len();
        let base = self.bufs.as_mut_ptr();
        for i in 0..cap {
            // SAFETY: `i * slot_size` is within `bufs`, which holds
            // `capacity * slot_size` bytes.
            let slot = unsafe { base.add(i * self.slot_size) };
            self.iovs[i] = libc::iovec {
                iov_base: slot.cast(),
                iov_len: self.slot_size,
            };
            let hdr = &mut self.hdrs[i];
            hdr.msg_len = 0;
            let m = &mut hdr.msg_hdr;
            m.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            m.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_iov = &mut self.iovs[i];
            m.msg_iovlen = 1;
            m.msg_control = self.ctrls[i].0.as_mut_ptr().cast();
            m.msg_controllen = size_of::<CmsgSpace>() as _;
            m.msg_flags = 0;
        }
        // SAFETY: every header points to a live iovec over `slot_size`
        // writable bytes of `bufs`, a `sockaddr_storage` and a control buffer
        // of the sizes given, all owned by `self` and not otherwise borrowed
        // during the call; `cap` is the length of `hdrs`; a null timeout is
        // allowed.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvmmsg,
                fd,
                self.hdrs.as_mut_ptr(),
                cap as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        self.filled = crate::socket::syscall_len(n)?;
        Ok(self.filled)
    }

    fn check(&self, i: usize) {
        assert!(
            i < self.filled,
            "datagram {i} of a batch of {}",
            self.filled
        );
    }

    /// Payload length of datagram `i` (capped at the slot size).
    fn payload_len(&self, i: usize) -> usize {
        (self.hdrs[i].msg_len as usize).min(self.slot_size)
    }

    /// The payload of datagram `i` (`i < len()`).
    pub fn data(&self, i: usize) -> &[u8] {
        self.check(i);
        let start = i * self.slot_size;
        &self.bufs[start..start + self.payload_len(i)]
    }

    /// The payload of datagram `i`, writable (e.g. to rewrite a DNS ID in
    /// place before forwarding it).
    pub fn data_mut(&mut self, i: usize) -> &mut [u8] {
        self.check(i);
        let start = i * self.slot_size;
        let len = self.payload_len(i);
        &mut self.bufs[start..start + len]
    }

    /// Send datagrams of the last batch on the non-blocking UDP socket `fd`
    /// with one `sendmmsg(2)`, in the order of `out` (at most `capacity` of
    /// them; each `slot < len()`), without waiting. Returns how many were
    /// sent, from the first: when that is fewer than `out.len()`, the next
    /// one failed, and calling again with the rest reports why. An error
    /// means the first one failed (`WouldBlock` when the send buffer is
    /// full; a connected socket's pending error, such as
    /// `ConnectionRefused`, is reported and cleared as by `send(2)`).
    /// No heap allocation.
    pub fn send_slots(&mut self, fd: RawFd, out: &[SendSlot]) -> io::Result<usize> {
        assert!(
            out.len() <= self.hdrs.len(),
            "{} datagrams to send from a batch of {} slots",
            out.len(),
            self.hdrs.len()
        );
        if out.is_empty() {
            return Ok(0);
        }
        let base = self.bufs.as_ptr();
        for (j, o) in out.iter().enumerate() {
            self.check(o.slot);
            // SAFETY: `o.slot < filled <= capacity`, so the slot starts
            // within `bufs` and `payload_len` bytes of it are in bounds.
            let start = unsafe { base.add(o.slot * self.slot_size) };
            self.out.iovs[j] = libc::iovec {
                iov_base: start as *mut libc::c_void,
                iov_len: self.payload_len(o.slot),
            };
            let hdr = &mut self.out.hdrs[j];
            hdr.msg_len = 0;
            let m = &mut hdr.msg_hdr;
            m.msg_iov = &mut self.out.iovs[j];
            m.msg_iovlen = 1;
            m.msg_flags = 0;
            address(
                m,
                &mut self.out.names[j],
                &mut self.out.ctrls[j],
                o.dst,
                o.src,
            );
        }
        // SAFETY: the first `out.len()` headers point to live iovecs over
        // bytes of `bufs` (only read by the kernel), and to addresses and
        // control buffers in `self.out` with their correct lengths, all
        // owned by `self` and not otherwise borrowed during the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendmmsg,
                fd,
                self.out.hdrs.as_mut_ptr(),
                out.len() as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        crate::socket::syscall_len(n)
    }

    /// Length, source, local destination and truncation of datagram `i`.
    pub fn meta(&self, i: usize) -> RecvMeta {
        self.check(i);
        let hdr = &self.hdrs[i];
        let m = &hdr.msg_hdr;
        let src = sockaddr_to_std(&self.names[i], m.msg_namelen);
        RecvMeta {
            len: self.payload_len(i),
            src,
            dst: pktinfo(m),
            truncated: m.msg_flags & libc::MSG_TRUNC != 0 || hdr.msg_len as usize > self.slot_size,
        }
    }
}

/// The IP_PKTINFO / IPV6_PKTINFO control message of a received header.
// The length fields are `size_t` on glibc and `socklen_t` on musl: the
// casts are needed on one of them.
#[allow(clippy::unnecessary_cast)]
fn pktinfo(m: &libc::msghdr) -> Option<PktInfo> {
    if m.msg_control.is_null() || (m.msg_controllen as usize) < size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: `m` is a header the kernel filled in by recvmmsg: its control
    // pointer and length describe our own control buffer, and the CMSG_*
    // macros only walk inside `msg_controllen` bytes of it. The data is
    // read unaligned, so its alignment does not matter.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            let level = (*c).cmsg_level;
            let ty = (*c).cmsg_type;
            let data_len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            if level == libc::IPPROTO_IP
                && ty == libc::IP_PKTINFO
                && data_len >= size_of::<libc::in_pktinfo>()
            {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return Some(PktInfo {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))),
                    ifindex: info.ipi_ifindex as u32,
                });
            }
            if level == libc::IPPROTO_IPV6
                && ty == libc::IPV6_PKTINFO
                && data_len >= size_of::<libc::in6_pktinfo>()
            {
                let info: libc::in6_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return Some(PktInfo {
                    addr: IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
                    ifindex: info.ipi6_ifindex,
                });
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    None
}

/// Convert a kernel-filled socket address of `len` bytes.
fn sockaddr_to_std(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match ss.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, and
            // `sockaddr_storage` is large and aligned enough for one.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for `sockaddr_in6`.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `addr` as a C socket address in `storage`; returns its length.
fn std_to_sockaddr(addr: &SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: `sockaddr_storage` is large and aligned enough for a
            // `sockaddr_in`, and all-zero bytes are a valid one.
            let sin: &mut libc::sockaddr_in =
                unsafe { &mut *(storage as *mut libc::sockaddr_storage).cast() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for `sockaddr_in6`.
            let sin6: &mut libc::sockaddr_in6 =
                unsafe { &mut *(storage as *mut libc::sockaddr_storage).cast() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Whether `ip` can be the source of a reply (not multicast, broadcast or
/// unspecified: for those the kernel picks the source).
fn usable_source(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()),
        IpAddr::V6(v6) => !(v6.is_multicast() || v6.is_unspecified()),
    }
}

/// Send `data` to `dst` from the non-blocking UDP socket `fd` in one
/// `sendmsg(2)`, without waiting. With `src`, the datagram leaves from
/// `src.addr` (IP_PKTINFO `ipi_spec_dst` / IPV6_PKTINFO `ipi6_addr`), which
/// is how a wildcard-bound socket answers from the address the client sent
/// to; the interface index is passed on for IPv6 link-local addresses.
/// `src` of the other address family than `dst`, or a multicast/broadcast
/// `src`, is ignored. No heap allocation: the control buffer is on the
/// stack. Returns the bytes sent, or `WouldBlock` when the send buffer is
/// full.
pub fn send_to(
    fd: RawFd,
    data: &[u8],
    dst: Option<SocketAddr>,
    src: Option<PktInfo>,
) -> io::Result<usize> {
    // SAFETY: all-zero bytes are valid values of these C structs.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    let mut ctrl = CmsgSpace::zeroed();
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    address(&mut msg, &mut name, &mut ctrl, dst, src);
    // SAFETY: `msg` points to the live `name`, `iov` (over `data`, which
    // the kernel only reads) and `ctrl` on this stack frame, with their
    // correct lengths.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendmsg,
            fd,
            &msg as *const libc::msghdr,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    crate::socket::syscall_len(n)
}

/// Point `msg` at its destination `dst` (written into `name`; none on a
/// connected socket) and at a PKTINFO control message in `ctrl` that makes
/// it leave from `src` (see [`send_to`]). Only the iovec of `msg` is left
/// as it was.
fn address(
    msg: &mut libc::msghdr,
    name: &mut libc::sockaddr_storage,
    ctrl: &mut CmsgSpace,
    dst: Option<SocketAddr>,
    src: Option<PktInfo>,
) {
    msg.msg_name = std::ptr::null_mut();
    msg.msg_namelen = 0;
    msg.msg_control = std::ptr::null_mut();
    msg.msg_controllen = 0;
    if let Some(dst) = &dst {
        msg.msg_namelen = std_to_sockaddr(dst, name);
        msg.msg_name = (name as *mut libc::sockaddr_storage).cast();
    }
    let src = src.filter(|s| usable_source(s.addr));
    match (src, dst) {
        (
            Some(PktInfo {
                addr: IpAddr::V4(ip),
                ..
            }),
            None | Some(SocketAddr::V4(_)),
        ) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            // SAFETY: `ctrl` is a cmsghdr-aligned buffer larger than
            // CMSG_SPACE(in_pktinfo); `put_cmsg` points `msg` at it with that
            // length, so CMSG_FIRSTHDR returns a header inside it with room
            // for the data.
            unsafe { put_cmsg(msg, ctrl, libc::IPPROTO_IP, libc::IP_PKTINFO, info) };
        }
        (
            Some(PktInfo {
                addr: IpAddr::V6(ip),
                ifindex,
            }),
            None | Some(SocketAddr::V6(_)),
        ) => {
            let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: if link_local { ifindex } else { 0 },
            };
            // SAFETY: as above, for `in6_pktinfo`.
            unsafe { put_cmsg(msg, ctrl, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info) };
        }
        _ => {}
    }
}

/// Write one control message holding `value` at the start of `ctrl` and
/// point `msg` at it.
///
/// # Safety
/// `CMSG_SPACE(size_of::<T>())` must fit in `ctrl`; `T` must be a plain C
/// struct.
unsafe fn put_cmsg<T>(
    msg: &mut libc::msghdr,
    ctrl: &mut CmsgSpace,
    level: libc::c_int,
    ty: libc::c_int,
    value: T,
) {
    let space = libc::CMSG_SPACE(size_of::<T>() as u32) as usize;
    debug_assert!(space <= size_of::<CmsgSpace>());
    msg.msg_control = ctrl.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let c = libc::CMSG_FIRSTHDR(msg);
    (*c).cmsg_level = level;
    (*c).cmsg_type = ty;
    (*c).cmsg_len = libc::CMSG_LEN(size_of::<T>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<T>(), value);
}

/// Send `data` on the connected non-blocking UDP socket `fd` without
/// waiting. A pending socket error (an earlier ICMP port unreachable) is
/// returned instead and cleared, as for `send(2)`.
pub use crate::socket::send;

/// A global allocator that counts allocations (and reallocations) and
/// otherwise forwards to the system allocator: tests install it with
/// `#[global_allocator]` to prove that the UDP fast path does not allocate
/// per datagram, without `unsafe` outside this crate.
///
/// ```
/// use sluice_uring::udp::CountingAllocator;
/// static COUNTER: CountingAllocator = CountingAllocator::new();
/// // in a test binary: #[global_allocator] static A: CountingAllocator = ...;
/// assert_eq!(COUNTER.count(), 0);
/// ```
#[derive(Debug)]
pub struct CountingAllocator {
    count: std::sync::atomic::AtomicU64,
}

impl CountingAllocator {
    pub const fn new() -> Self {
        CountingAllocator {
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Allocations and reallocations so far (all threads).
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for CountingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every method forwards to `System` with the arguments it got, so
// the `GlobalAlloc` contract holds exactly as for `System`; counting is a
// relaxed atomic add that cannot allocate.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc_zeroed`'s contract for `layout`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: `ptr`/`layout` come from `System` (through us); the
        // caller upholds `realloc`'s contract for `new_size`.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn wait_recv(batch: &mut RecvBatch, fd: RawFd) -> usize {
        for _ in 0..2000 {
            match batch.recv(fd) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        panic!("nothing received");
    }

    /// A server socket on the IPv4 wildcard address (its port), and a
    /// client on 127.0.0.1 that waits at most 2 s for a reply.
    fn wildcard_server_and_client() -> (UdpSocket, u16, UdpSocket) {
        let server = crate::socket::udp_socket("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        (server, port, client)
    }

    #[test]
    fn wildcard_socket_learns_destination_and_replies_from_it() {
        let (server, port, client) = wildcard_server_and_client();
        let to: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        client.send_to(b"hello", to).unwrap();

        let mut batch = RecvBatch::new(4, 1024);
        let n = wait_recv(&mut batch, server.as_raw_fd());
        assert_eq!(n, 1);
        let meta = batch.meta(0);
        assert_eq!(batch.data(0), b"hello");
        assert_eq!(meta.len, 5);
        assert!(!meta.truncated);
        assert_eq!(meta.src, Some(client.local_addr().unwrap()));
        let dst = meta.dst.expect("pktinfo");
        assert_eq!(dst.addr, "127.0.0.2".parse::<IpAddr>().unwrap());

        send_to(server.as_raw_fd(), b"world", meta.src, meta.dst).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"world");
        assert_eq!(
            from, to,
            "the reply must leave from the address the client sent to"
        );
    }

    #[test]
    fn batch_receives_several_and_flags_truncation() {
        let server = crate::socket::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(&[1u8; 10], addr).unwrap();
        client.send_to(&[2u8; 100], addr).unwrap();
        client.send_to(&[], addr).unwrap();
        let mut batch = RecvBatch::new(8, 64);
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = wait_recv(&mut batch, server.as_raw_fd());
            for i in 0..n {
                let m = batch.meta(i);
                got.push((m.len, m.truncated, batch.data(i).first().copied()));
            }
        }
        assert_eq!(
            got,
            vec![(10, false, Some(1)), (64, true, Some(2)), (0, false, None)]
        );
        assert!(
            matches!(batch.recv(server.as_raw_fd()), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        );
    }

    #[test]
    fn largest_datagram_fits_and_is_not_truncated() {
        let server = crate::socket::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let big = vec![7u8; 65507];
        client.send_to(&big, addr).unwrap();
        let mut batch = RecvBatch::new(2, MAX_DATAGRAM);
        wait_recv(&mut batch, server.as_raw_fd());
        let m = batch.meta(0);
        assert_eq!(m.len, 65507);
        assert!(!m.truncated);
        assert_eq!(batch.data(0), &big[..]);
        batch.data_mut(0)[0] = 9;
        assert_eq!(batch.data(0)[0], 9);
    }

    #[test]
    fn ipv6_pktinfo_when_available() {
        let Ok(server) = crate::socket::udp_socket("[::]:0".parse().unwrap()) else {
            return; // no IPv6 on this host
        };
        let port = server.local_addr().unwrap().port();
        let Ok(client) = UdpSocket::bind("[::1]:0") else {
            return;
        };
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let to: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        client.send_to(b"six", to).unwrap();
        let mut batch = RecvBatch::new(1, 512);
        wait_recv(&mut batch, server.as_raw_fd());
        let m = batch.meta(0);
        assert_eq!(m.dst.unwrap().addr, "::1".parse::<IpAddr>().unwrap());
        send_to(server.as_raw_fd(), b"back", m.src, m.dst).unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"back"[..], to));
    }

    #[test]
    fn a_batch_is_sent_back_in_one_call_and_a_failure_stops_it_where_it_is() {
        let server = crate::socket::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let clients: Vec<UdpSocket> = (0..2)
            .map(|_| {
                let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                c
            })
            .collect();
        clients[0].send_to(b"a1", addr).unwrap();
        clients[1].send_to(b"b1", addr).unwrap();
        clients[0].send_to(b"a2", addr).unwrap();
        let mut batch = RecvBatch::new(8, 64);
        // A loopback send has queued its datagram when it returns.
        assert_eq!(wait_recv(&mut batch, server.as_raw_fd()), 3);
        batch.data_mut(1)[1] = b'X';
        let from: Vec<_> = (0..3).map(|i| batch.meta(i).src).collect();
        let back = |i: usize| SendSlot {
            slot: i,
            dst: from[i],
            src: None,
        };
        let out = [back(2), back(1), back(0)];
        assert_eq!(batch.send_slots(server.as_raw_fd(), &out).unwrap(), 3);
        let mut buf = [0u8; 8];
        let mut got = |c: &UdpSocket| {
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(from, addr);
            buf[..n].to_vec()
        };
        assert_eq!(got(&clients[0]), b"a2", "sent in the order given");
        assert_eq!(got(&clients[0]), b"a1");
        assert_eq!(got(&clients[1]), b"bX", "the payload as rewritten");

        // An IPv6 destination on an IPv4 socket fails: the call stops there.
        let v6 = SendSlot {
            slot: 0,
            dst: Some("[::1]:9".parse().unwrap()),
            src: None,
        };
        let out = [back(0), v6, back(2)];
        assert_eq!(batch.send_slots(server.as_raw_fd(), &out).unwrap(), 1);
        assert!(batch.send_slots(server.as_raw_fd(), &out[1..]).is_err());
        assert_eq!(batch.send_slots(server.as_raw_fd(), &out[2..]).unwrap(), 1);
        assert_eq!(got(&clients[0]), b"a1");
        assert_eq!(got(&clients[0]), b"a2");
        assert_eq!(batch.send_slots(server.as_raw_fd(), &[]).unwrap(), 0);
    }

    #[test]
    fn wildcard_batch_replies_leave_from_each_address_queried() {
        let (server, port, client) = wildcard_server_and_client();
        let to: Vec<SocketAddr> = ["127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|ip| format!("{ip}:{port}").parse().unwrap())
            .collect();
        client.send_to(b"2", to[0]).unwrap();
        client.send_to(b"3", to[1]).unwrap();
        let mut batch = RecvBatch::new(4, 64);
        assert_eq!(wait_recv(&mut batch, server.as_raw_fd()), 2);
        let out: Vec<SendSlot> = (0..2)
            .map(|i| SendSlot {
                slot: i,
                dst: batch.meta(i).src,
                src: batch.meta(i).dst,
            })
            .collect();
        assert_eq!(batch.send_slots(server.as_raw_fd(), &out).unwrap(), 2);
        let mut buf = [0u8; 4];
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let (n, from) = client.recv_from(&mut buf).unwrap();
            seen.push((buf[..n].to_vec(), from));
        }
        assert!(seen.contains(&(b"2".to_vec(), to[0])), "{seen:?}");
        assert!(seen.contains(&(b"3".to_vec(), to[1])), "{seen:?}");
    }

    #[test]
    fn connected_send_reports_refused_port() {
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let sock = crate::socket::udp_connected(addr).unwrap();
        send(sock.as_raw_fd(), b"x").unwrap();
        // The ICMP error arrives asynchronously; then recv reports it.
        let mut batch = RecvBatch::new(1, 64);
        let mut refused = false;
        for _ in 0..2000 {
            match batch.recv(sock.as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    refused = true;
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        assert!(refused);
    }
}
