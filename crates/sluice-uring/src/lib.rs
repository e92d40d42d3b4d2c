//! sluice-uring: every io_uring detail of sluice, and the only crate allowed
//! to contain `unsafe` (each block carries a `// SAFETY:` comment).
//!
//! The dataplane works in a readiness model: it waits for a socket with an
//! io_uring `POLL_ADD` ([`op::poll`]) and then moves bytes with inline,
//! non-blocking syscalls (`recv`/`send`, `splice` through a pooled pipe,
//! `recvmmsg`/`sendmsg`). Keep-alive conversations receive with a
//! multishot `IORING_OP_RECV` into a ring of provided buffers instead
//! ([`bufring`]): no poll and no `recv` per message. IORING_OP_SPLICE is deliberately not used: it always
//! runs in an io-wq kernel thread and parks one per idle connection.
//!
//! Rules this crate enforces for its callers:
//! - every socket and pipe it hands out is `O_NONBLOCK` and `O_CLOEXEC`;
//! - an fd with an operation in flight is closed only after
//!   [`op::cancel_fd`] has completed for it ([`op::close`] does both), so the
//!   kernel never keeps a "closed" socket alive behind a pending poll;
//! - pipes come from a bounded per-core [`pipe::PipePool`]; when it is empty
//!   callers fall back to copying.
//!
//! ```no_run
//! use std::os::fd::AsRawFd;
//! sluice_uring::runtime::start(256, async {
//!     let listener = sluice_uring::socket::tcp_listener("127.0.0.1:0".parse().unwrap(), 128).unwrap();
//!     // wait until a connection is pending, then accept it without blocking
//!     sluice_uring::op::poll(listener.as_raw_fd(), sluice_uring::op::READABLE).await.unwrap();
//!     let (stream, peer) = sluice_uring::socket::accept(&listener).unwrap();
//!     println!("{peer} connected");
//!     sluice_uring::op::close(stream).await;
//! });
//! ```
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bufring;
pub mod op;
pub mod pipe;
pub mod probe;
pub mod runtime;
pub mod socket;
pub mod sys;
pub mod udp;
