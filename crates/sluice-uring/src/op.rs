//! Custom io_uring operations: one-shot `POLL_ADD` and `ASYNC_CANCEL` by fd.
//!
//! Dropping a future returned by [`poll`] does not cancel the poll in the
//! kernel (tokio-uring keeps the operation until its completion arrives).
//! Until then the kernel holds a reference to the file, so a socket closed
//! with `close(2)` would stay alive. [`close`] therefore cancels every
//! operation on the fd and waits for the cancellation before closing.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

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
pub async fn close<F: AsRawFd>(fd: F) {
    if let Err(e) = cancel_fd(fd.as_raw_fd()).await {
        log::debug!("cancel on fd {} failed: {e}", fd.as_raw_fd());
    }
    drop(fd);
}
