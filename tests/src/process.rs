//! Running the real `sluice` binary: in the background as a [`Sluice`]
//! handle, or once ([`run_sluice`]) for commands like `check`.
//!
//! The binary is found by [`sluice_bin`]: `$SLUICE_BIN` if set, else
//! `<target dir>/<profile>/sluice` next to the test executable (which lives
//! in `<target dir>/<profile>/deps/`). `cargo test` does not build another
//! package's binary, so build it first: `cargo build -p sluice` (as
//! `scripts/test.sh` does).

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{poll_until, DEADLINE};

/// How long [`Sluice::wait_started`] waits for `sluice started`.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(15);

/// How long [`run_sluice`] lets a one-shot command run before killing it.
pub const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(20);

/// The log line `sluice run` prints once every listener is bound.
pub const STARTED_MARKER: &str = "sluice started";

/// The log line `sluice run` prints on SIGTERM/SIGINT.
pub const SHUTDOWN_MARKER: &str = "shutting down";

/// The path of the `sluice` binary under test (see the module docs).
/// Panics with what to do if it does not exist.
pub fn sluice_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = match std::env::var_os("SLUICE_BIN") {
            Some(path) => PathBuf::from(path),
            None => {
                let exe = std::env::current_exe().expect("current_exe");
                // <target>/<profile>/deps/<test-binary> -> <target>/<profile>/sluice
                let profile_dir = exe
                    .parent()
                    .filter(|deps| deps.ends_with("deps"))
                    .and_then(Path::parent)
                    .or_else(|| exe.parent())
                    .expect("test executable has a parent directory");
                profile_dir.join("sluice")
            }
        };
        assert!(
            path.is_file(),
            "the sluice binary is not at {}: run `cargo build -p sluice` first (with the same \
             CARGO_TARGET_DIR and profile as the tests), or set SLUICE_BIN to its path",
            path.display()
        );
        path
    })
}

/// The `RUST_LOG` given to a background sluice: `$SLUICE_E2E_RUST_LOG` if
/// set (e.g. `debug` while chasing a failure), else `info`. Tests wait for
/// info lines, so do not set it lower than `info`.
pub fn default_rust_log() -> String {
    std::env::var("SLUICE_E2E_RUST_LOG").unwrap_or_else(|_| "info".to_string())
}

/// Lines of text collected from a child's output by a background thread.
#[derive(Debug, Clone, Default)]
struct Captured(Arc<Mutex<String>>);

impl Captured {
    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reads `stream` line by line into `captured`, echoing each line to the
/// test's stderr with `prefix` (libtest shows it only if the test fails).
/// Ends at EOF, i.e. when the process exits (sluice starts no children that
/// could keep the pipe open).
fn spawn_capture(
    stream: impl Read + Send + 'static,
    captured: Captured,
    prefix: &'static str,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("sluice-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end_matches(['\n', '\r']);
                        if !prefix.is_empty() {
                            eprintln!("{prefix}{text}");
                        }
                        let mut all = captured.0.lock().unwrap_or_else(|p| p.into_inner());
                        all.push_str(text);
                        all.push('\n');
                    }
                }
            }
        })
        .expect("spawn output reader")
}

/// Joins `threads` if they finish within `deadline` (they end at EOF); a
/// thread still running then is left detached rather than hanging the test.
fn join_within(threads: &mut Vec<JoinHandle<()>>, deadline: Duration) {
    let start = Instant::now();
    while threads.iter().any(|t| !t.is_finished()) && start.elapsed() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for thread in threads.drain(..) {
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

/// Describes how a process ended, for messages.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!(
            "killed by signal {}",
            Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string())
        ),
        _ => status.to_string(),
    }
}

/// A `sluice run` process in the background, with its config in a temp dir
/// and its log captured. Dropping it kills the process (SIGKILL) if it is
/// still running and reaps it.
#[derive(Debug)]
pub struct Sluice {
    child: Child,
    dir: tempfile::TempDir,
    config: PathBuf,
    log: Captured,
    stdout: Captured,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Sluice {
    /// Writes `yaml` to `<tempdir>/sluice.yaml` and starts `sluice run
    /// --config <file>` with `RUST_LOG=info` (see [`default_rust_log`]).
    /// Does not wait: see [`Sluice::wait_started`] and [`Sluice::started`].
    pub fn start(yaml: &str) -> Sluice {
        Self::start_with(yaml, &[], &[])
    }

    /// [`Sluice::start`], then [`Sluice::wait_started`]: the usual way to
    /// get a running load balancer.
    #[track_caller]
    pub fn started(yaml: &str) -> Sluice {
        let mut sluice = Self::start(yaml);
        sluice.wait_started();
        sluice
    }

    /// Like [`Sluice::start`], adding `args` after `run --config <file>`
    /// (e.g. `["--workers", "1"]`).
    pub fn start_with_args(yaml: &str, args: &[&str]) -> Sluice {
        Self::start_with(yaml, args, &[])
    }

    /// Like [`Sluice::start_with_args`], also setting environment variables
    /// (`RUST_LOG` given here overrides the default).
    pub fn start_with(yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Sluice {
        Self::spawn(sluice_bin(), yaml, args, env)
    }

    fn spawn(bin: &Path, yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Sluice {
        let dir = tempfile::Builder::new()
            .prefix("sluice-e2e-")
            .tempdir()
            .expect("creating a temp dir");
        let config = dir.path().join("sluice.yaml");
        fs::write(&config, yaml).expect("writing the config");
        let mut command = Command::new(bin);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", default_rust_log())
            // A panic in the background process should be debuggable.
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = spawn_retrying_busy(&mut command)
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let log = Captured::default();
        let stdout = Captured::default();
        let readers = vec![
            spawn_capture(
                child.stderr.take().expect("piped stderr"),
                log.clone(),
                "[sluice] ",
            ),
            spawn_capture(
                child.stdout.take().expect("piped stdout"),
                stdout.clone(),
                "[sluice stdout] ",
            ),
        ];
        Sluice {
            child,
            dir,
            config,
            log,
            stdout,
            readers,
            status: None,
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file it was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The temp dir holding the config (removed on drop); tests may put
    /// other files there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything it wrote to stderr so far (its log).
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// The exit status, if it has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
            if self.status.is_some() {
                // The pipes close at exit; let the readers catch the last lines.
                join_within(&mut self.readers, Duration::from_secs(5));
            }
        }
        self.status
    }

    /// Panics with `message`, the exit status if any, and the whole log.
    #[track_caller]
    fn fail(&mut self, message: &str) -> ! {
        let status = self
            .try_exit()
            .map_or_else(|| "still running".to_string(), describe_status);
        panic!("{message} (sluice {status}); its log:\n{}", self.log())
    }

    /// Waits up to [`STARTUP_DEADLINE`] for `sluice started` in the log;
    /// panics with the log if it does not come or if the process exits first.
    #[track_caller]
    pub fn wait_started(&mut self) {
        self.wait_for_log(STARTED_MARKER, STARTUP_DEADLINE);
    }

    /// Waits up to `deadline` for a log line containing `needle` and returns
    /// that line; panics with the log on timeout or if the process exits
    /// without printing it.
    #[track_caller]
    pub fn wait_for_log(&mut self, needle: &str, deadline: Duration) -> String {
        let found = poll_until(deadline, || {
            let exited = self.try_exit().is_some();
            match self.log().lines().find(|l| l.contains(needle)) {
                Some(line) => Some(Ok(line.to_string())),
                None if exited => Some(Err(())),
                None => None,
            }
        });
        match found {
            Some(Ok(line)) => line,
            Some(Err(())) => self.fail(&format!("sluice exited without logging {needle:?}")),
            None => self.fail(&format!("no log line with {needle:?} within {deadline:?}")),
        }
    }

    /// Waits up to `deadline` until `needle` appears in at least `count`
    /// log lines (e.g. the second `reload` message); panics with the log.
    #[track_caller]
    pub fn wait_for_log_count(&mut self, needle: &str, count: usize, deadline: Duration) {
        let found = poll_until(deadline, || {
            let exited = self.try_exit().is_some();
            let seen = self.log_count(needle);
            (seen >= count || exited).then_some(seen >= count)
        });
        if found != Some(true) {
            self.fail(&format!(
                "fewer than {count} log lines with {needle:?} within {deadline:?}"
            ));
        }
    }

    /// Replaces the config file atomically (write a temp file, then rename),
    /// so sluice never reads a half-written file. Follow with
    /// [`Sluice::reload`].
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".sluice.yaml.tmp");
        fs::write(&tmp, yaml).expect("writing the new config");
        fs::rename(&tmp, &self.config).expect("renaming the new config into place");
    }

    /// Sends `signal`. Panics if the process was already reaped (its PID may
    /// belong to someone else by now).
    #[track_caller]
    pub fn signal(&mut self, signal: Signal) {
        if self.status.is_some() {
            self.fail(&format!("cannot send {signal}: sluice has exited"));
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits in i32"));
        if let Err(e) = kill(pid, signal) {
            self.fail(&format!("sending {signal}: {e}"));
        }
    }

    /// Sends SIGHUP (reload the config file).
    #[track_caller]
    pub fn reload(&mut self) {
        self.signal(Signal::SIGHUP);
    }

    /// Sends SIGTERM (graceful shutdown).
    #[track_caller]
    pub fn terminate(&mut self) {
        self.signal(Signal::SIGTERM);
    }

    /// Waits up to `deadline` for the process to exit and returns its status
    /// (the log is complete afterwards); panics with the log on timeout.
    #[track_caller]
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        match poll_until(deadline, || self.try_exit()) {
            Some(status) => status,
            None => self.fail(&format!("sluice did not exit within {deadline:?}")),
        }
    }

    /// [`Sluice::terminate`], then [`Sluice::wait_exit`] with [`DEADLINE`],
    /// asserting a clean exit (code 0).
    #[track_caller]
    pub fn stop(&mut self) {
        self.terminate();
        let status = self.wait_exit(DEADLINE);
        if status.code() != Some(0) {
            self.fail("sluice did not exit cleanly on SIGTERM");
        }
    }

    /// The number of open file descriptors (entries of `/proc/PID/fd`), for
    /// leak checks.
    pub fn fd_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
            .count()
    }

    /// The number of open sockets (entries of `/proc/PID/fd` that link to
    /// `socket:[...]`): a leak check that pooled splice pipes do not move.
    pub fn socket_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
            .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    /// The names of its threads (from `/proc/PID/task/*/comm`), sorted.
    pub fn threads(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.pid());
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
            .filter_map(Result::ok)
            .filter_map(|task| fs::read_to_string(task.path().join("comm")).ok())
            .map(|name| name.trim_end().to_string())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        join_within(&mut self.readers, Duration::from_secs(2));
    }
}

/// Runs `sluice ARGS…` to completion (for `check`, `--version`, …) with
/// [`ONE_SHOT_TIMEOUT`], and returns its output. `RUST_LOG` and
/// `RUST_BACKTRACE` are removed from its environment, so it logs at the
/// default level and prints exactly what an operator would see.
#[track_caller]
pub fn run_sluice<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_sluice_timeout(args, ONE_SHOT_TIMEOUT)
}

/// [`run_sluice`] with a timeout of your choice; panics (after killing the
/// process) with what it printed if it runs longer.
#[track_caller]
pub fn run_sluice_timeout<I, S>(args: I, timeout: Duration) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let what = format!(
        "sluice {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let child = Command::new(sluice_bin())
        .args(&args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", sluice_bin().display()));
    wait_output(child, timeout, &what)
}

/// Collects `child`'s piped stdout/stderr and waits up to `timeout` for it
/// to exit; kills it and panics with what it printed if it runs longer.
#[track_caller]
pub fn wait_output(mut child: Child, timeout: Duration, what: &str) -> Output {
    let stdout = Captured::default();
    let stderr = Captured::default();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(spawn_capture(out, stdout.clone(), ""));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(spawn_capture(err, stderr.clone(), ""));
    }
    let status = poll_until(timeout, || child.try_wait().expect("try_wait"));
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        join_within(&mut readers, Duration::from_secs(2));
        panic!(
            "`{what}` did not finish within {timeout:?}; killed it.\nstdout:\n{}\nstderr:\n{}",
            stdout.text(),
            stderr.text()
        );
    };
    join_within(&mut readers, Duration::from_secs(5));
    Output {
        status,
        stdout: stdout.text().into_bytes(),
        stderr: stderr.text().into_bytes(),
    }
}

/// `Command::spawn`, tried again for a moment on `ETXTBSY`. A test that
/// has just written an executable (a fake `sluice` script) can find it
/// "busy": another test thread forked meanwhile, and its child holds the
/// write descriptor until it execs. That passes within milliseconds.
fn spawn_retrying_busy(command: &mut Command) -> std::io::Result<Child> {
    let mut busy = None;
    crate::poll_until(Duration::from_secs(5), || match command.spawn() {
        Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
            busy = Some(e);
            None
        }
        other => Some(other),
    })
    .unwrap_or_else(|| Err(busy.take().expect("poll_until tried at least once")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the binary, so the handle itself is tested without it.
    /// Perl, not sh: a shell cannot trap a signal that was ignored when it
    /// started (under `nohup`, SIGHUP is), and the handlers are set before
    /// it says it started, so a signal sent at once finds them.
    const FAKE: &str = r#"#!/usr/bin/perl
$| = 1;
$SIG{TERM} = sub { print STDERR "[INFO sluice] shutting down\n"; exit 0 };
$SIG{HUP} = sub { print STDERR "[INFO sluice] reloading\n" };
print STDERR "config: $ARGV[2]\n";
print STDERR "[INFO sluice] sluice started\n";
print "to stdout\n";
while (1) { select(undef, undef, undef, 0.02) }
"#;

    fn fake_bin(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("fake-sluice");
        fs::write(&path, FAKE).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn handle_captures_log_signals_and_exits() {
        let bins = tempfile::tempdir().unwrap();
        let bin = fake_bin(bins.path());
        let mut sluice = Sluice::spawn(&bin, "services: []\n", &[], &[]);
        sluice.wait_started();
        assert!(sluice
            .log()
            .contains(&sluice.config_path().display().to_string()));
        assert_eq!(
            fs::read_to_string(sluice.config_path()).unwrap(),
            "services: []\n"
        );
        sluice.rewrite_config("services: [x]\n");
        assert_eq!(
            fs::read_to_string(sluice.config_path()).unwrap(),
            "services: [x]\n"
        );
        assert!(sluice.fd_count() >= 3);
        assert!(!sluice.threads().is_empty());
        sluice.reload();
        sluice.wait_for_log("reloading", DEADLINE);
        sluice.terminate();
        let status = sluice.wait_exit(DEADLINE);
        assert_eq!(status.code(), Some(0));
        assert!(sluice.log().contains(SHUTDOWN_MARKER));
        assert_eq!(sluice.stdout(), "to stdout\n");
    }

    #[test]
    fn drop_kills_a_running_process() {
        let bins = tempfile::tempdir().unwrap();
        let bin = fake_bin(bins.path());
        let mut sluice = Sluice::spawn(&bin, "", &[], &[]);
        sluice.wait_started();
        let proc_dir = PathBuf::from(format!("/proc/{}", sluice.pid()));
        drop(sluice);
        assert!(!proc_dir.exists(), "process reaped after drop");
    }

    #[test]
    #[should_panic(expected = "exited without logging")]
    fn wait_fails_early_when_the_process_exits() {
        let bins = tempfile::tempdir().unwrap();
        let bin = bins.path().join("exits");
        fs::write(&bin, "#!/bin/sh\necho 'bind failed' >&2\nexit 3\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let mut sluice = Sluice::spawn(&bin, "", &[], &[]);
        sluice.wait_for_log("never", Duration::from_secs(60));
    }

    #[test]
    fn wait_output_kills_on_timeout() {
        let child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let result =
            std::panic::catch_unwind(|| wait_output(child, Duration::from_millis(200), "sleep 30"));
        assert!(result.is_err());
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
