//! When io_uring cannot be used (here: a seccomp filter that makes
//! io_uring_setup fail with EPERM, as container runtimes do), `sluice run`
//! says so in one line naming the cause and exits 3.

use std::process::Command;
use std::time::Duration;

use sluice_e2e::net::free_tcp_addr;
use sluice_e2e::process::wait_output;
use sluice_e2e::{assert_no_panic_or_debug_dump, repo_root, sluice_bin};

#[test]
fn run_without_io_uring_exits_3_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    let listen = free_tcp_addr();
    std::fs::write(
        &config,
        format!(
            "services:\n  - name: web\n    protocol: tcp\n    listen: [\"{listen}\"]\n    \
             backends:\n      - address: 127.0.0.1:9\n"
        ),
    )
    .unwrap();
    let child = Command::new("python3")
        .arg(repo_root().join("tests/fixtures/no_io_uring.py"))
        .arg(sluice_bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed to install the seccomp filter");
    let out = wait_output(child, Duration::from_secs(20), "sluice run under seccomp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "exit code; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line:\n{stderr}");
    assert!(lines[0].contains("io_uring"), "names io_uring: {stderr}");
    assert!(lines[0].contains("EPERM"), "names the cause: {stderr}");
    assert_no_panic_or_debug_dump(&stderr, "sluice run without io_uring");

    // `check` does not need io_uring at all.
    let child = Command::new("python3")
        .arg(repo_root().join("tests/fixtures/no_io_uring.py"))
        .arg(sluice_bin())
        .args(["check", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(20), "sluice check under seccomp");
    assert_eq!(out.status.code(), Some(0));
}
