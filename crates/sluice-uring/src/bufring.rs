//! Multishot receives into a ring of provided buffers.
//!
//! A [`RecvStream`] is one `IORING_OP_RECV` with `IORING_RECV_MULTISHOT`:
//! armed once, the kernel receives every time the socket gets data, into a
//! buffer it takes from a [`BufRing`] (`IORING_REGISTER_PBUF_RING`), and
//! posts one completion per receive. Where a poll and then a `recv(2)` cost
//! a completion plus a system call per message, this costs the completion
//! alone. sluice uses it for keep-alive conversations (see
//! `sluice-dataplane`'s `transfer.rs`).
//!
//! The rules:
//! - A buffer's bytes are read through the [`RecvBuf`] its completion
//!   yields; dropping the `RecvBuf` publishes the buffer to the kernel again.
//! - A stream dropped before its final completion leaves the receive armed
//!   in the kernel; the owner closes the socket with [`crate::op::close`],
//!   which cancels it. Buffers filled in between come back through the
//!   runtime (`tokio_uring::take_orphan_buffers`) and are published again
//!   the next time a stream is armed on the ring ([`BufRing::reclaim`]).
//! - When the ring has no free buffer, the kernel ends the receive with
//!   `ENOBUFS`; the socket keeps its bytes and the owner reads them itself.
//!
//! One ring per runtime (the runtime keeps one list of orphaned buffers).

use std::cell::Cell;
use std::fmt;
use std::io;
use std::ops::Deref;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{opcode, types};

/// One anonymous, private mapping (page-aligned, as the kernel requires of
/// a buffer ring; pages are committed only when touched).
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint and no
        // fd: it aliases nothing and the kernel picks the place.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap at 0"))?;
        Ok(Mapping { ptr, len })
    }

    /// Unmap it (its owner does not touch it afterwards).
    fn unmap(&self) {
        // SAFETY: `ptr`/`len` are exactly one mapping made in `new`, and
        // the caller (BufRing::drop) has made sure the kernel no longer
        // uses it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A ring of `entries` provided buffers of `buf_size` bytes each, registered
/// with the current runtime's io_uring as one buffer group. Not `Send`: it
/// belongs to the runtime (worker) that registered it.
pub struct BufRing {
    bgid: u16,
    entries: u16,
    buf_size: usize,
    ring: Mapping,
    bufs: Mapping,
    /// The next tail to publish (the kernel reads up to it).
    tail: Cell<u16>,
}

impl fmt::Debug for BufRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufRing")
            .field("bgid", &self.bgid)
            .field("entries", &self.entries)
            .field("buf_size", &self.buf_size)
            .finish()
    }
}

impl BufRing {
    /// Map `entries` (a power of two, at most 32768) buffers of `buf_size`
    /// bytes and their ring, register them as group `bgid` and publish every
    /// buffer. Must be called inside a [`crate::runtime`]. Fails when the
    /// kernel has no provided-buffer rings (before 5.19) or the group is
    /// taken.
    pub fn new(bgid: u16, entries: u16, buf_size: usize) -> io::Result<Rc<Self>> {
        if !entries.is_power_of_two()
            || entries > 32768
            || buf_size == 0
            || buf_size > u32::MAX as usize
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad buffer ring size",
            ));
        }
        let ring = Mapping::new(entries as usize * std::mem::size_of::<types::BufRingEntry>())?;
        let bufs = match Mapping::new(entries as usize * buf_size) {
            Ok(b) => b,
            Err(e) => {
                ring.unmap();
                return Err(e);
            }
        };
        // SAFETY: `ring` is a fresh page-aligned mapping of `entries` ring
        // entries (zeroed, so its tail is 0); it and `bufs` stay mapped
        // until `Drop`, which unregisters the group before unmapping them
        // (or leaks them when it cannot).
        let registered =
            unsafe { tokio_uring::register_buf_ring(ring.ptr.as_ptr() as u64, entries, bgid) };
        if let Err(e) = registered {
            ring.unmap();
            bufs.unmap();
            return Err(e);
        }
        let me = BufRing {
            bgid,
            entries,
            buf_size,
            ring,
            bufs,
            tail: Cell::new(0),
        };
        for bid in 0..entries {
            me.publish(bid);
        }
        Ok(Rc::new(me))
    }

    /// The buffer group id receives select from.
    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Bytes per buffer: the most one completion carries.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Hand buffer `bid` (back) to the kernel.
    fn publish(&self, bid: u16) {
        debug_assert!(bid < self.entries);
        let tail = self.tail.get();
        let slot = (tail & (self.entries - 1)) as usize;
        let base = self.ring.ptr.as_ptr().cast::<types::BufRingEntry>();
        // SAFETY: `slot` < `entries`, so the entry lies inside the ring
        // mapping; the kernel reads entries only up to the published tail,
        // and this one is past it until the store below. The buffer address
        // is inside `bufs` (`bid` < `entries`).
        unsafe {
            let entry = &mut *base.add(slot);
            entry.set_addr(self.bufs.ptr.as_ptr() as u64 + bid as u64 * self.buf_size as u64);
            entry.set_len(self.buf_size as u32);
            entry.set_bid(bid);
        }
        let tail = tail.wrapping_add(1);
        self.tail.set(tail);
        // SAFETY: the tail field sits inside the first entry of the ring
        // mapping and is 2-byte aligned; the kernel reads it with an
        // acquire load, so this release store makes the entry visible first.
        unsafe {
            let tail_ptr = types::BufRingEntry::tail(base) as *mut u16;
            AtomicU16::from_ptr(tail_ptr).store(tail, Ordering::Release);
        }
    }

    /// Publish again the buffers the runtime got back in completions nobody
    /// took (receives dropped while armed). Returns how many.
    pub fn reclaim(&self) -> usize {
        let orphans = tokio_uring::take_orphan_buffers();
        let mut n = 0;
        for bid in orphans {
            if bid < self.entries {
                self.publish(bid);
                n += 1;
            }
        }
        n
    }

    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        assert!(
            bid < self.entries && len <= self.buf_size,
            "buffer {bid} of {} bytes",
            len
        );
        // SAFETY: the range is inside `bufs`; the kernel filled its first
        // `len` bytes and took the buffer off the ring, and it is not
        // published again (so not written) until the `RecvBuf` holding it
        // is dropped, which ends this borrow.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs.ptr.as_ptr().add(bid as usize * self.buf_size),
                len,
            )
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        match tokio_uring::unregister_buf_ring(self.bgid) {
            Ok(()) => {
                self.ring.unmap();
                self.bufs.unmap();
            }
            Err(e) => {
                // The kernel may still write into the buffers (a receive
                // cancelled while its runtime shuts down): leave them mapped.
                log::debug!(
                    "buffer group {}: unregister failed ({e}); leaving its memory mapped",
                    self.bgid
                );
            }
        }
    }
}

/// The bytes of one receive, in a buffer of a [`BufRing`]; dropping it
/// hands the buffer back to the kernel.
pub struct RecvBuf {
    ring: Rc<BufRing>,
    bid: u16,
    len: usize,
}

impl Deref for RecvBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.ring.bytes(self.bid, self.len)
    }
}

impl fmt::Debug for RecvBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBuf")
            .field("bid", &self.bid)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        self.ring.publish(self.bid);
    }
}

/// What a [`RecvStream`] yields.
#[derive(Debug)]
pub enum Recv {
    /// Received bytes; `more` is false when this was the receive's last
    /// completion (the kernel stopped it; arm a new one or read directly).
    Data(RecvBuf, bool),
    /// End of stream (final).
    Eof,
    /// The receive stopped without end of stream (final): `ENOBUFS` (the
    /// ring ran out of buffers; the bytes wait in the socket), `ECANCELED`
    /// (cancelled), `EINVAL` (no multishot receive in this kernel) or the
    /// socket's error.
    Stopped(io::Error),
}

/// A multishot receive on one socket, into a [`BufRing`].
pub struct RecvStream {
    op: tokio_uring::InFlightMultishot,
    ring: Rc<BufRing>,
    /// A cancel was asked for (one is enough).
    cancelling: bool,
}

impl fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvStream")
            .field("done", &self.op.is_done())
            .finish()
    }
}

impl RecvStream {
    /// Arm a multishot receive on the socket `fd` into `ring`'s buffers
    /// (after publishing any orphaned ones again). Must be called inside
    /// the [`crate::runtime`] the ring belongs to.
    pub fn new(fd: RawFd, ring: &Rc<BufRing>) -> Self {
        ring.reclaim();
        let sqe = opcode::RecvMulti::new(types::Fd(fd), ring.bgid()).build();
        RecvStream {
            op: tokio_uring::InFlightMultishot::submit(sqe),
            ring: Rc::clone(ring),
            cancelling: false,
        }
    }

    /// The next completion, oldest first. After a final one (`Eof`,
    /// `Stopped`, or `Data` with `more` false) it returns
    /// `Stopped(ECANCELED)`.
    pub async fn next(&mut self) -> Recv {
        let Some((result, flags)) = std::future::poll_fn(|cx| self.op.poll_next_flags(cx)).await
        else {
            return Recv::Stopped(io::Error::from_raw_os_error(libc::ECANCELED));
        };
        let more = io_uring::cqueue::more(flags);
        match result {
            Ok(0) => {
                // End of stream; give back a buffer it may carry.
                if let Some(bid) = io_uring::cqueue::buffer_select(flags) {
                    self.ring.publish(bid);
                }
                Recv::Eof
            }
            Ok(n) => match io_uring::cqueue::buffer_select(flags) {
                Some(bid) => Recv::Data(
                    RecvBuf {
                        ring: Rc::clone(&self.ring),
                        bid,
                        len: n as usize,
                    },
                    more,
                ),
                None => Recv::Stopped(io::Error::other("a receive completion without its buffer")),
            },
            Err(e) => Recv::Stopped(e),
        }
    }

    /// Ask the kernel to stop the receive. Completions already on their way
    /// (with bytes that left the socket) still come from
    /// [`RecvStream::next`], then a final `Stopped(ECANCELED)`, or `Eof`.
    /// Asking again does nothing.
    pub fn request_cancel(&mut self) {
        if !self.cancelling {
            self.cancelling = true;
            self.op.request_cancel();
        }
    }

    /// Whether the final completion was taken (nothing is left in flight).
    pub fn is_done(&self) -> bool {
        self.op.is_done()
    }
}
