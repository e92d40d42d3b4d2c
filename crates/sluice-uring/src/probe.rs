//! Start-up check that io_uring can be used, with one clear line when not.

use std::fmt;
use std::io;

use io_uring::{opcode, IoUring, Probe};

/// Why io_uring cannot be used. `Display` is one line naming the cause.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `kernel.io_uring_disabled` forbids it.
    #[error("io_uring is unavailable: disabled by sysctl kernel.io_uring_disabled={0}")]
    DisabledBySysctl(u8),
    /// `io_uring_setup` failed.
    #[error("io_uring is unavailable: io_uring_setup failed: {cause}")]
    Setup { cause: SetupCause },
    /// The kernel lacks an operation sluice needs.
    #[error(
        "io_uring is unavailable: the kernel does not support {0} (Linux 6.0 or newer is needed)"
    )]
    MissingOp(&'static str),
}

/// The errno of a failed `io_uring_setup`, explained.
#[derive(Debug)]
pub struct SetupCause(pub io::Error);

impl fmt::Display for SetupCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.0.raw_os_error() {
            Some(libc::ENOSYS) => {
                "the kernel has no io_uring (ENOSYS: too old or built without it)"
            }
            Some(libc::EPERM) => {
                "not permitted (EPERM: kernel.io_uring_disabled or a seccomp profile blocks it)"
            }
            Some(libc::EACCES) => "access denied (EACCES: a security policy blocks it)",
            Some(libc::ENOMEM) => "out of locked memory (ENOMEM: raise RLIMIT_MEMLOCK)",
            _ => "",
        };
        if why.is_empty() {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{why}")
        }
    }
}

/// Read `kernel.io_uring_disabled` (absent on kernels without the knob).
fn sysctl_disabled() -> Option<u8> {
    let text = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    text.trim().parse().ok()
}

/// Check that a ring can be created and that the operations sluice uses are
/// supported. Call once at start-up, before spawning workers.
pub fn probe() -> Result<(), ProbeError> {
    if let Some(v @ 2..) = sysctl_disabled() {
        return Err(ProbeError::DisabledBySysctl(v));
    }
    let ring = IoUring::new(8).map_err(|e| ProbeError::Setup {
        cause: SetupCause(e),
    })?;
    let mut probe = Probe::new();
    // IORING_REGISTER_PROBE exists since 5.6; without it we cannot tell.
    if ring.submitter().register_probe(&mut probe).is_err() {
        return Err(ProbeError::MissingOp("IORING_REGISTER_PROBE"));
    }
    for (code, name) in [
        (opcode::PollAdd::CODE, "IORING_OP_POLL_ADD"),
        (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(ProbeError::MissingOp(name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_succeeds_on_this_kernel() {
        // The test machines run Linux 6.x with io_uring enabled.
        probe().unwrap();
    }

    #[test]
    fn setup_causes_are_one_line() {
        for errno in [libc::ENOSYS, libc::EPERM, libc::ENOMEM, libc::EINVAL] {
            let e = ProbeError::Setup {
                cause: SetupCause(io::Error::from_raw_os_error(errno)),
            };
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(text.starts_with("io_uring is unavailable"), "{text}");
        }
        let e = ProbeError::DisabledBySysctl(2);
        assert_eq!(
            e.to_string(),
            "io_uring is unavailable: disabled by sysctl kernel.io_uring_disabled=2"
        );
    }
}
