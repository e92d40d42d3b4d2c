//! Custom io_uring operations: one-shot `POLL_ADD` and `ASYNC_CANCEL` by fd.
//!
//! Dropping a future returned by [`poll`] does not cancel the poll in the
//! kernel (tokio-uring keeps the operation until its completion arrives).
//! Until then the kernel holds a reference to the file, so a socket closed
//! with `close(2)` would stay alive. [`close`] therefore cancels every
//! operation on the fd and waits for the cancellation before closing.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{cqueue, opcode, types};
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

/// `POLLIN`: data (or a pending connection, or EOF) to read.
pub const READABLE: u32 = libc::POLLIN as u32;
/// `POLLOUT`: room to write (or a non-blocking connect finished).
pub const WRITABLE: u32 = libc::POLLOUT as u32;
/// `POLLRDHUP`: the peer shut down its write side.
pub const READ_HUP: u32 = libc::POLLRDHUP as u32;
/// `POLLERR`: an error is pending on the socket (always reported).
pub const ERROR: u32 = libc::POLLERR as u32;
/// `POLLHUP`: both directions are shut down (always reported).
pub const HANG_UP: u32 = libc::POLLHUP as u32;

/// Turns a CQE into `io::Result<u32>`.
#[derive(Debug, Clone, Copy)]
pub struct ResultTransform;

impl OneshotOutputTransform for ResultTransform {
    type Output = io::Result<u32>;
    type StoredData = ();

    fn transform_oneshot_output(self, _data: (), cqe: cqueue::Entry) -> io::Result<u32> {
        let res = cqe.result();
        if res >= 0 {
            Ok(res as u32)
        } else {
            Err(io::Error::from_raw_os_error(-res))
        }
    }
}

/// Wait until `fd` has one of `events` (or an error/hang-up) and return the
/// poll mask the kernel reported. One-shot: each call submits one
/// `IORING_OP_POLL_ADD`. Must be called inside a [`crate::runtime`].
pub async fn poll(fd: RawFd, events: u32) -> io::Result<u32> {
    let sqe = opcode::PollAdd::new(types::Fd(fd), events).build();
    UnsubmittedOneshot::new((), ResultTransform, sqe)
        .submit()
        .await
}

/// Cancel every in-flight io_uring operation on `fd` (IORING_ASYNC_CANCEL_FD
/// | IORING_ASYNC_CANCEL_ALL) and wait until the kernel has processed the
/// cancellation. Returns how many operations were cancelled. `fd` must stay
/// open until this returns: the kernel resolves it when the request runs.
pub async fn cancel_fd(fd: RawFd) -> io::Result<u32> {
    let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build();
    match UnsubmittedOneshot::new((), ResultTransform, sqe)
        .submit()
        .await
    {
        Ok(n) => Ok(n),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Cancel every operation in flight on `fd`'s descriptor, then close it.
/// After this returns the kernel holds no reference from this process's
/// ring to the file, so a socket is really closed (FIN/RST sent).
pub async fn close<F: AsRawFd + Into<OwnedFd>>(fd: F) {
    if let Err(e) = cancel_fd(fd.as_raw_fd()).await {
        log::debug!("cancel on fd {} failed: {e}", fd.as_raw_fd());
    }
    crate::socket::close(fd);
}

/// A multishot poll (`IORING_OP_POLL_ADD` with `IORING_POLL_ADD_MULTI`):
/// armed once, it reports every readiness event on the fd until it is
/// cancelled, where [`poll`] needs one submission per wait. For a socket
/// that waits many times (a keep-alive conversation) it saves the
/// submission, the arming and the disarming of each wait.
///
/// It is edge-like: an event is reported when the socket is woken (data,
/// end-of-stream, an error), and once when it is armed if the socket is
/// ready then. So the owner must read until the socket is drained (or a
/// read came back shorter than asked) before it waits again; a report may
/// come for data an earlier read already took.
///
/// Dropping it does not stop it in the kernel: close the fd with [`close`],
/// which cancels it first.
pub struct PollStream {
    op: tokio_uring::InFlightMultishot,
}

impl std::fmt::Debug for PollStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollStream")
            .field("done", &self.is_done())
            .finish()
    }
}

impl PollStream {
    /// Arm a multishot poll for `events` on `fd`. Must be called inside a
    /// [`crate::runtime`].
    pub fn new(fd: RawFd, events: u32) -> Self {
        let sqe = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(true)
            .build();
        Self {
            op: tokio_uring::InFlightMultishot::submit(sqe),
        }
    }

    /// The next event's poll mask. The kernel may end a multishot poll
    /// (its last report, which may still carry a mask, says so): after
    /// that [`PollStream::is_done`] is true and the caller arms a new one;
    /// `next` then returns `ECANCELED`.
    pub async fn next(&mut self) -> io::Result<u32> {
        match std::future::poll_fn(|cx| self.op.poll_next(cx)).await {
            Some((result, _more)) => result,
            None => Err(io::Error::from_raw_os_error(libc::ECANCELED)),
        }
    }

    /// Cancel it in the kernel (just this poll, not other operations on
    /// the fd) and let it go.
    pub fn cancel(self) {
        self.op.cancel();
    }

    /// Whether the kernel ended this poll (nothing is left in flight).
    pub fn is_done(&self) -> bool {
        self.op.is_done()
    }
}
