//! Starting a per-core io_uring runtime and spawning tasks on it.

use std::future::Future;

/// Run `fut` to completion on a new tokio-uring runtime on this thread, with
/// a submission queue of `entries` (a power of two). Timers from
/// `tokio::time` and `tokio::sync` primitives work inside it.
pub fn start<F: Future>(entries: u32, fut: F) -> F::Output {
    tokio_uring::builder().entries(entries).start(fut)
}

/// Try to create the runtime's ring; used at start-up to fail with exit code
/// 3 before any worker thread is spawned.
pub fn try_ring(entries: u32) -> std::io::Result<()> {
    io_uring::IoUring::new(entries).map(drop)
}

/// Spawn a task on the current thread's runtime (the task need not be `Send`).
pub fn spawn<T: Future + 'static>(task: T) -> tokio::task::JoinHandle<T::Output> {
    tokio_uring::spawn(task)
}
