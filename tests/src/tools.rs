//! External tools the tests drive (promtool, knotd, kdig, dnsperf, …) and
//! process limits.
//!
//! A test that needs a tool calls [`require_tool`]: when the tool is
//! missing the test is skipped with a message, unless the environment says
//! the tool must be there (`scripts/test.sh` installs the tools and exports
//! `SLUICE_REQUIRE_PROMTOOL=1`; `SLUICE_REQUIRE_TOOLS=1` requires them all),
//! in which case it fails.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::wait_output;

/// Directories searched besides `PATH` (daemons like `knotd` live in sbin,
/// which is not on a normal user's `PATH`).
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The full path of the executable `name`, from `PATH` or the sbin
/// directories; `None` if it is not installed.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True if the variable `var` is set to `1`/`true`/`yes`.
pub fn env_flag(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
}

/// The path of tool `name` (installed by the Debian package `package`), or
/// `None` after printing why the calling test skips. Panics instead when
/// `SLUICE_REQUIRE_TOOLS=1`, or when `require_var` (e.g.
/// `"SLUICE_REQUIRE_PROMTOOL"`) is set: then a missing tool is a failure.
#[track_caller]
pub fn require_tool(name: &str, package: &str, require_var: Option<&str>) -> Option<PathBuf> {
    if let Some(path) = find_tool(name) {
        return Some(path);
    }
    let required = env_flag("SLUICE_REQUIRE_TOOLS") || require_var.is_some_and(env_flag);
    assert!(
        !required,
        "{name} is required but not installed (apt-get install {package}, or run scripts/test.sh)"
    );
    eprintln!("SKIPPED: {name} not installed (apt-get install {package})");
    None
}

/// Runs `promtool check metrics` on `exposition` (Prometheus text format)
/// and panics with promtool's output if it finds problems. Returns false
/// (after printing a skip note) when promtool is missing, unless
/// `SLUICE_REQUIRE_PROMTOOL=1`, in which case that is a failure.
#[track_caller]
pub fn promtool_check_metrics(exposition: &str) -> bool {
    let Some(promtool) = require_tool("promtool", "prometheus", Some("SLUICE_REQUIRE_PROMTOOL"))
    else {
        return false;
    };
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", promtool.display()));
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(exposition.as_bytes())
            .expect("writing to promtool");
    }
    let output = wait_output(child, Duration::from_secs(30), "promtool check metrics");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && text.trim().is_empty(),
        "promtool check metrics rejected the exposition ({}):\n{text}\n--- exposition ---\n{exposition}",
        output.status
    );
    true
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to at least `want`
/// (capped at the hard limit) and returns the new soft limit. Call it
/// before opening thousands of sockets; child processes (sluice) inherit it.
pub fn raise_nofile_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let target = want.min(hard);
    if soft >= target {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(e) => {
            eprintln!("cannot raise RLIMIT_NOFILE to {target}: {e}");
            soft
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promtool_accepts_good_and_rejects_bad_exposition() {
        let good = "# HELP x_total A counter.\n# TYPE x_total counter\nx_total 1\n";
        if !promtool_check_metrics(good) {
            return; // promtool not installed, and not required
        }
        let bad = "# HELP x A counter.\n# TYPE x counter\nx 1\n";
        let result = std::panic::catch_unwind(|| promtool_check_metrics(bad));
        assert!(result.is_err(), "a counter without _total must be rejected");
    }

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("no-such-tool-sluice").is_none());
        if !env_flag("SLUICE_REQUIRE_TOOLS") {
            assert!(require_tool("no-such-tool-sluice", "none", None).is_none());
        }
    }
}
