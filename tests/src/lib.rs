//! Support code for sluice's end-to-end tests.
//!
//! The tests in `tests/tests/` run the real `sluice` binary (built by
//! `cargo build -p sluice`) against real backends and clients on loopback.
//! This crate owns everything they share:
//!
//! - [`eventually`] / [`eventually_some`]: wait for a condition with a
//!   deadline. Tests never sleep and hope.
//! - [`process`]: find the binary ([`sluice_bin`]), run it in the background
//!   ([`Sluice`]) or once ([`run_sluice`]), and read its log.
//! - [`net`]: free ports, connecting with retries, small TCP/UDP/HTTP
//!   clients.
//! - [`tcp`], [`udp`], [`dns`]: backends that report which one a client
//!   reached, echo, or check bulk transfers end to end.
//! - [`bulk`]: SHA-256 and a deterministic pseudo-random byte stream.
//! - [`tools`]: external tools (promtool, knotd, …) and process limits.
//!
//! Rules every helper follows: every network loop ends by itself (deadlines
//! or a stop flag checked at least every [`POLL_SLICE`]), only loopback
//! addresses are used, and every backend closes its sockets and joins its
//! threads when stopped or dropped.
//!
//! ```no_run
//! use sluice_e2e::{net, tcp::TcpTagged, tcp_config, Sluice, DEADLINE};
//!
//! let backend = TcpTagged::start("a");
//! let listen = net::free_tcp_addr();
//! let mut lb = Sluice::started(&tcp_config("web", listen, &[backend.addr()]));
//! assert_eq!(net::tcp_tag(listen, DEADLINE), "a"); // reached backend "a"
//! lb.stop(); // SIGTERM, and assert a clean exit
//! ```
//!
//! The binary must be built first (`cargo build -p sluice`); a failing test
//! shows the sluice log, each line prefixed `[sluice] `.
#![forbid(unsafe_code)]

pub mod bulk;
pub mod control_support;
pub mod dns;
pub mod dns_support;
pub mod net;
pub mod process;
pub mod tcp;
pub mod tools;
pub mod udp;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use bulk::{pseudo_random_bytes, sha256, sha256_hex, PseudoRandom};
pub use net::{connect_with_retry, free_tcp_port, free_udp_port, LOCALHOST};
pub use process::{run_sluice, run_sluice_timeout, sluice_bin, Sluice};
pub use tools::promtool_check_metrics;

/// How often background loops (backends, readers) re-check their stop flag,
/// and the longest single blocking wait any helper does.
pub const POLL_SLICE: Duration = Duration::from_millis(50);

/// The default deadline for "this should happen soon" conditions: long
/// enough for a debug build on a loaded 2-core CI machine, short enough that
/// a hang fails the test quickly.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `f` until it returns `true`, with a short backoff (1 ms doubling up
/// to 50 ms); panics naming `what` if `deadline` passes first.
///
/// `f` is called at least once, and once more after the deadline, so a
/// condition that becomes true during the last pause is not missed.
#[track_caller]
pub fn eventually(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) {
    eventually_some(deadline, what, || f().then_some(()))
}

/// Polls `f` until it returns `Some(value)` and returns the value, with the
/// same backoff as [`eventually`]; panics naming `what` on timeout.
#[track_caller]
pub fn eventually_some<T>(deadline: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match poll_until(deadline, f) {
        Some(value) => value,
        None => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// Like [`eventually_some`] but returns `None` on timeout instead of
/// panicking, for callers that want to add context to the failure.
pub fn poll_until<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            // One last look: the condition may have become true while we slept.
            return f();
        }
        std::thread::sleep(pause.min(deadline - elapsed));
        pause = (pause * 2).min(POLL_SLICE);
    }
}

/// The repository root (the workspace directory), for `configs/` and
/// `tests/fixtures/`.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A minimal valid config: one TCP service called `name` listening on
/// `listen` and balancing over `backends` (default settings otherwise).
/// Extend the text for more; this only saves typing in the common case.
pub fn tcp_config(name: &str, listen: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut yaml = format!(
        "services:\n  - name: {name}\n    protocol: tcp\n    listen: [\"{listen}\"]\n    backends:\n"
    );
    for backend in backends {
        let _ = writeln!(yaml, "      - address: \"{backend}\"");
    }
    yaml
}

/// A minimal valid config: one UDP service called `name` in `mode`
/// (`session` or `dns`) listening on `listen`, balancing over `backends`.
pub fn udp_config(name: &str, mode: &str, listen: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut yaml = format!(
        "services:\n  - name: {name}\n    protocol: udp\n    listen: [\"{listen}\"]\n    \
         udp:\n      mode: {mode}\n    backends:\n"
    );
    for backend in backends {
        let _ = writeln!(yaml, "      - address: \"{backend}\"");
    }
    yaml
}

/// Panics if `text` (a process's stderr or log) shows a Rust panic, a
/// backtrace hint or a `{:?}` debug dump of an error, which the contract
/// forbids ("one clear line, never a panic or a Rust debug dump").
#[track_caller]
pub fn assert_no_panic_or_debug_dump(text: &str, context: &str) {
    const FORBIDDEN: &[&str] = &[
        "panicked",
        "RUST_BACKTRACE",
        "stack backtrace",
        "Os { code",
        "Custom { kind",
        "Error { kind",
        "stack overflow",
    ];
    for needle in FORBIDDEN {
        assert!(
            !text.contains(needle),
            "{context}: output contains {needle:?}:\n{text}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_returns_when_true() {
        let mut n = 0;
        eventually(DEADLINE, "n to reach 3", || {
            n += 1;
            n >= 3
        });
        assert_eq!(eventually_some(DEADLINE, "a value", || Some(5)), 5);
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible")]
    fn eventually_panics_naming_what() {
        eventually(Duration::from_millis(20), "the impossible", || false);
    }

    #[test]
    fn poll_until_times_out_with_none() {
        let start = Instant::now();
        assert_eq!(poll_until::<()>(Duration::from_millis(30), || None), None);
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
}
