//! Starting a per-core io_uring runtime and spawning tasks on it.

use std::future::Future;

/// Run `fut` to completion on a new tokio-uring runtime on this thread, with
/// a submission queue of `entries` (a power of two). Timers from
/// `tokio::time` and `tokio::sync` primitives work inside it.
pub fn start<F: Future>(entries: u32, fut: F) -> F::Output {
    let mut builder = tokio_uring::builder();
    builder.entries(entries);
    if let Some(flags) = tuned_ring(entries) {
        builder.uring_builder(&flags);
    }
    builder.start(fut)
}

/// Ring set-up flags for a worker ring, if this kernel takes them:
/// COOP_TASKRUN (completions are posted when the thread next enters the
/// kernel, without an interrupt to the CPU running it) and SINGLE_ISSUER
/// (only the worker thread submits). Checked by building a throw-away ring,
/// because tokio-uring panics if its ring cannot be built.
fn tuned_ring(entries: u32) -> Option<io_uring::Builder> {
    let mut b = io_uring::IoUring::builder();
    b.setup_coop_taskrun().setup_single_issuer();
    b.build(entries).ok().map(|_| b)
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
