//! Pipes for `splice(2)`, from a bounded per-core pool.
//!
//! A pipe is held by a connection only while bytes sit in it; an empty pipe
//! goes back to the pool. When the pool has handed out its maximum (or the
//! kernel refuses a new pipe: fd limit, pipe-user-pages), [`PipePool::get`]
//! returns `None` and the caller copies through a buffer instead, as HAProxy
//! does.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// One pipe (read end, write end) and how many bytes it holds.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    pending: usize,
}

/// `splice(2)` of up to `len` bytes from `from` to `to` (one of them a
/// pipe), never waiting (`SPLICE_F_NONBLOCK | SPLICE_F_MOVE`). Made with
/// `syscall(2)`: libc's wrapper is a thread-cancellation point and costs
/// two extra calls (see `socket::send`).
fn splice<A: AsFd, B: AsFd>(from: A, to: B, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    // SAFETY: both fds are borrowed open descriptors for the duration of
    // the call; null offsets are allowed (they mean the current position).
    let n = unsafe {
        libc::syscall(
            libc::SYS_splice,
            from.as_fd().as_raw_fd(),
            std::ptr::null_mut::<libc::loff_t>(),
            to.as_fd().as_raw_fd(),
            std::ptr::null_mut::<libc::loff_t>(),
            len,
            flags,
        )
    };
    crate::socket::syscall_len(n)
}

impl Pipe {
    fn new(size: usize) -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Past fs.pipe-max-size or the user's pipe pages this fails with
        // EPERM; the pipe then keeps the default size.
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(size as i32)) {
            Ok(n) => n as usize,
            Err(_) => fcntl(&write, FcntlArg::F_GETPIPE_SZ)
                .map(|n| n as usize)
                .unwrap_or(65536),
        };
        Ok(Self {
            read,
            write,
            capacity,
            pending: 0,
        })
    }

    /// Bytes in the pipe, not yet spliced out.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Room left in the pipe.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.pending)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Splice up to the pipe's free room from `src` (a non-blocking socket)
    /// into the pipe. `Ok(0)` means end of stream; `WouldBlock` means no data
    /// (or no room).
    pub fn fill_from<F: AsFd>(&mut self, src: F) -> io::Result<usize> {
        let room = self.room();
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = splice(src, &self.write, room)?;
        self.pending += n;
        Ok(n)
    }

    /// Splice what the pipe holds into `dst`. `WouldBlock` means `dst` has no
    /// room now.
    pub fn drain_to<F: AsFd>(&mut self, dst: F) -> io::Result<usize> {
        if self.pending == 0 {
            return Ok(0);
        }
        let n = splice(&self.read, dst, self.pending)?;
        self.pending -= n;
        Ok(n)
    }
}

/// A per-core pool of pipes (not `Sync`: one per worker).
#[derive(Debug)]
pub struct PipePool {
    idle: Vec<Pipe>,
    /// Pipes handed out and not yet returned or dropped.
    out: usize,
    max_pipes: usize,
    max_idle: usize,
    pipe_size: usize,
    /// Times `get` said no (the caller copied instead).
    pub exhausted: u64,
}

impl PipePool {
    /// At most `max_pipes` pipes exist at once (idle plus handed out); up to
    /// `max_idle` empty ones are kept for reuse; each asks for `pipe_size`
    /// bytes of capacity.
    pub fn new(max_pipes: usize, max_idle: usize, pipe_size: usize) -> Self {
        Self {
            idle: Vec::new(),
            out: 0,
            max_pipes,
            max_idle,
            pipe_size,
            exhausted: 0,
        }
    }

    /// An empty pipe, or `None` when the pool is at its limit or the kernel
    /// refuses a new one.
    pub fn get(&mut self) -> Option<Pipe> {
        if let Some(p) = self.idle.pop() {
            self.out += 1;
            return Some(p);
        }
        if self.out >= self.max_pipes {
            self.exhausted += 1;
            return None;
        }
        match Pipe::new(self.pipe_size) {
            Ok(p) => {
                self.out += 1;
                Some(p)
            }
            Err(e) => {
                self.exhausted += 1;
                log::debug!("no pipe for splice, copying instead: {e}");
                None
            }
        }
    }

    /// Give a pipe back. An empty one is kept for reuse (up to `max_idle`);
    /// one that still holds bytes is closed (they belonged to a finished
    /// connection).
    pub fn put(&mut self, pipe: Pipe) {
        self.out = self.out.saturating_sub(1);
        if pipe.pending == 0 && self.idle.len() < self.max_idle {
            self.idle.push(pipe);
        }
    }

    /// Pipes handed out right now.
    pub fn in_use(&self) -> usize {
        self.out
    }

    /// Empty pipes kept for reuse.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }
}
