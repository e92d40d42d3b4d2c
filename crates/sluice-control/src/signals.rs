//! Signals: blocked in every thread, received by one thread that waits in
//! `sigwait(2)` and forwards them to the control loop over a channel.

use std::io;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// The signals sluice handles.
pub fn handled() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGHUP);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Block SIGHUP, SIGTERM and SIGINT in the calling thread. Call first thing
/// in `main`, before any thread exists: threads inherit the mask, so none
/// of them is ever interrupted and the signal thread sees every one.
pub fn block() -> io::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None)?;
    Ok(())
}

/// The handled signals, as they arrive.
#[derive(Debug)]
pub struct Signals {
    rx: UnboundedReceiver<Signal>,
}

impl Signals {
    /// Start the thread that waits for signals (named `sluice-signals`).
    pub fn start() -> io::Result<Self> {
        let (tx, rx) = unbounded_channel();
        std::thread::Builder::new()
            .name("sluice-signals".into())
            .spawn(move || {
                let set = handled();
                loop {
                    match set.wait() {
                        Ok(sig) => {
                            if tx.send(sig).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            log::error!("waiting for signals failed: {e}");
                            return;
                        }
                    }
                }
            })?;
        Ok(Self { rx })
    }

    /// The next signal; `None` if the signal thread ended.
    pub async fn recv(&mut self) -> Option<Signal> {
        self.rx.recv().await
    }
}
