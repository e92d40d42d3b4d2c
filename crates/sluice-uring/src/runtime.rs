//! Starting a per-core io_uring runtime and spawning tasks on it.

use std::future::Future;

/// Run `fut` to completion on a new tokio-uring runtime on this thread, with
/// a submission queue of `entries` (a power of two). Timers from
/// `tokio::time` and `tokio::sync` primitives work inside it.
pub fn start<F: Future>(entries: u32, fut: F) -> F::Output {
    let mut builder = tokio_uring::builder();
    builder.entries(entries);
    if let Some((flags, defer)) = tuned_ring(entries) {
        builder.uring_builder(&flags).defer_taskrun(defer);
    }
    builder.start(fut)
}

/// Ring set-up flags for a worker ring, the best this kernel takes:
///
/// 1. DEFER_TASKRUN | SINGLE_ISSUER | TASKRUN_FLAG (Linux 6.1+): the
///    kernel's work for completions (poll wake-ups turned into CQEs) is
///    queued on the ring and run in one batch when the worker enters the
///    ring (the patched tokio-uring driver does so when woken, and when it
///    parks), instead of interrupting whatever system call the worker is in.
/// 2. COOP_TASKRUN | SINGLE_ISSUER | TASKRUN_FLAG (5.19+): no interrupt to
///    the running CPU; the work runs when the thread next enters the kernel.
/// 3. No flags.
///
/// Checked by building a throw-away ring, because tokio-uring panics if its
/// ring cannot be built. The flag says whether it is the first (the patched
/// driver then keeps its eventfd quiet while the worker runs).
fn tuned_ring(entries: u32) -> Option<(io_uring::Builder, bool)> {
    let mut defer = io_uring::IoUring::builder();
    defer
        .setup_defer_taskrun()
        .setup_single_issuer()
        .setup_taskrun_flag();
    let mut coop = io_uring::IoUring::builder();
    coop.setup_coop_taskrun()
        .setup_single_issuer()
        .setup_taskrun_flag();
    [(defer, true), (coop, false)]
        .into_iter()
        .find(|(b, _)| b.build(entries).is_ok())
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
