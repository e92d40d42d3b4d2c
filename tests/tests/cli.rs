//! End-to-end tests of the command line (SPEC.md "Command line"): `check` on
//! every example config and every invalid fixture, pathological inputs,
//! usage errors, and the `run` lifecycle (start, SIGTERM/SIGINT, bind
//! failure, invalid config). They run the real binary: `cargo build -p
//! sluice` first (scripts/test.sh does).

use std::fs;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sluice_e2e::net::{connect_with_retry, free_tcp_addr, LOCALHOST};
use sluice_e2e::process::{describe_status, SHUTDOWN_MARKER, STARTED_MARKER};
use sluice_e2e::tcp::TcpEcho;
use sluice_e2e::udp::UdpEcho;
use sluice_e2e::{
    assert_no_panic_or_debug_dump, pseudo_random_bytes, repo_root, run_sluice, run_sluice_timeout,
    tcp_config, udp_config, Sluice, DEADLINE,
};

// ---------------------------------------------------------------- helpers

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Everything a command printed, for failure messages.
fn dump(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        describe_status(output.status),
        stdout(output),
        stderr(output)
    )
}

fn check(path: &Path) -> Output {
    run_sluice([Path::new("check"), Path::new("--config"), path])
}

/// Writes `contents` to `<dir>/<name>` and returns the path.
fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).expect("writing a test file");
    path
}

/// `*.yaml` / `*.yml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    files
}

/// Service names in a config, found by scanning for `name:` keys (in the
/// config format only services have a `name`), block or flow style.
fn service_names(yaml: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in yaml.lines() {
        let line = line.split(" #").next().unwrap_or(line);
        if line.trim_start().starts_with('#') {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("name:") {
            let before = rest[..at].chars().last();
            let after = &rest[at + "name:".len()..];
            if before.is_none_or(|c| matches!(c, ' ' | '{' | ',' | '-')) {
                let value = after.trim_start().trim_start_matches(['"', '\'']);
                let name: String = value
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
                    .collect();
                if !name.is_empty() {
                    names.push(name);
                }
            }
            rest = after;
        }
    }
    names
}

/// A failed command's stderr must be a few clear lines: between 1 and
/// `max_lines` non-empty lines, none huge, no panic or debug dump.
#[track_caller]
fn assert_few_clear_lines(output: &Output, max_lines: usize, context: &str) {
    let err = stderr(output);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        (1..=max_lines).contains(&lines.len()),
        "{context}: expected 1..={max_lines} lines on stderr, got {}:\n{}",
        lines.len(),
        dump(output)
    );
    for line in &lines {
        assert!(
            line.len() <= 1000,
            "{context}: a {} byte line on stderr:\n{line:.300}…",
            line.len()
        );
    }
    assert_no_panic_or_debug_dump(&err, context);
}

#[track_caller]
fn assert_exit(output: &Output, code: i32, context: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{context}: wrong exit status:\n{}",
        dump(output)
    );
}

// ------------------------------------------------ check: example configs

#[test]
fn every_example_config_passes_check() {
    let dir = repo_root().join("configs");
    let files = yaml_files(&dir);
    assert!(!files.is_empty(), "no example configs in {}", dir.display());
    let mut failures = Vec::new();
    for file in &files {
        let output = check(file);
        let text = fs::read_to_string(file).expect("reading an example config");
        let names = service_names(&text);
        if output.status.code() != Some(0) {
            failures.push(format!(
                "{}: `sluice check` failed: {}",
                file.display(),
                dump(&output)
            ));
            continue;
        }
        if names.is_empty() {
            failures.push(format!(
                "{}: no service names found in the file",
                file.display()
            ));
        }
        let summary = stdout(&output);
        for name in names.iter().filter(|name| !summary.contains(name.as_str())) {
            failures.push(format!(
                "{}: summary does not mention service {name:?}:\n{summary}",
                file.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn check_prints_a_summary_naming_each_service() {
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = tcp_config(
        "alpha",
        "127.0.0.1:18001".parse().unwrap(),
        &["127.0.0.1:18101".parse().unwrap()],
    );
    yaml.push_str(
        "  - name: beta\n    protocol: udp\n    listen: [\"127.0.0.1:18002\"]\n    \
         backends:\n      - address: \"127.0.0.1:18102\"\n",
    );
    let path = write(dir.path(), "two.yaml", &yaml);
    let output = check(&path);
    assert_exit(&output, 0, "check on a valid config");
    let summary = stdout(&output);
    assert!(
        summary.contains("alpha") && summary.contains("beta"),
        "summary:\n{summary}"
    );
    assert_no_panic_or_debug_dump(&stderr(&output), "check on a valid config");
}

#[test]
fn check_binds_no_socket() {
    // The listen address is taken: `run` would fail, `check` must not care.
    let taken = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "taken.yaml",
        tcp_config("web", addr, &["127.0.0.1:9".parse().unwrap()]),
    );
    let output = check(&path);
    assert_exit(&output, 0, "check with its listen address in use");
}

// ------------------------------------------------ check: invalid fixtures

/// The optional `# path: <field path>` header (line 3) of a fixture.
fn fixture_path_header(text: &str) -> Option<String> {
    let path = text.lines().nth(2)?.strip_prefix("# path:")?.trim();
    (!path.is_empty()).then(|| path.to_string())
}

/// The `# expect:` and `# line:` headers of a fixture.
fn fixture_headers(text: &str) -> Result<(String, usize), String> {
    let mut lines = text.lines();
    let expect = lines
        .next()
        .and_then(|l| l.strip_prefix("# expect:"))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or("line 1 is not `# expect: <substring>`")?;
    let line = lines
        .next()
        .and_then(|l| l.strip_prefix("# line:"))
        .and_then(|s| s.trim().parse::<usize>().ok())
        .ok_or("line 2 is not `# line: <N>`")?;
    Ok((expect, line))
}

#[test]
fn every_invalid_fixture_fails_check_with_its_error() {
    let dir = repo_root().join("tests/fixtures/config/invalid");
    let files = yaml_files(&dir);
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    let mut failures = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("reading a fixture");
        let (expect, line) = match fixture_headers(&text) {
            Ok(headers) => headers,
            Err(problem) => {
                failures.push(format!("{}: bad fixture: {problem}", file.display()));
                continue;
            }
        };
        let output = check(file);
        let err = stderr(&output);
        let file_name = file.file_name().unwrap().to_string_lossy();
        let position = format!("{file_name}:{line}:");
        let mut problems = Vec::new();
        if output.status.code() != Some(1) {
            problems.push(format!(
                "exit status is {}, not 1",
                describe_status(output.status)
            ));
        }
        if !err.contains(&expect) {
            problems.push(format!("stderr does not contain {expect:?}"));
        }
        if !err.lines().any(|l| l.contains(&position)) {
            problems.push(format!("no error points at line {line} (`{position}`)"));
        }
        if let Some(field) = fixture_path_header(&text) {
            if !err.contains(&field) {
                problems.push(format!("stderr does not name the field path {field:?}"));
            }
        }
        for forbidden in ["panicked", "RUST_BACKTRACE"] {
            if err.contains(forbidden) {
                problems.push(format!("stderr contains {forbidden:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n  - {}\n  stderr:\n{}",
                file.display(),
                problems.join("\n  - "),
                err.lines()
                    .map(|l| format!("    | {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}

// --------------------------------------------- check: pathological inputs

#[test]
fn check_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("does-not-exist.yaml");
    let output = check(&path);
    assert_exit(&output, 1, "check on a missing file");
    assert_few_clear_lines(&output, 1, "check on a missing file");
    assert!(
        stderr(&output).contains("does-not-exist.yaml"),
        "{}",
        dump(&output)
    );
}

#[test]
fn check_directory() {
    let dir = tempfile::tempdir().unwrap();
    let output = check(dir.path());
    assert_exit(&output, 1, "check on a directory");
    assert_few_clear_lines(&output, 3, "check on a directory");
}

#[test]
fn check_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "empty.yaml", "");
    let output = check(&path);
    assert_exit(&output, 1, "check on an empty file");
    assert_few_clear_lines(&output, 3, "check on an empty file");
}

#[test]
fn check_comments_only_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "comments.yaml", "# nothing here\n\n# at all\n");
    let output = check(&path);
    assert_exit(&output, 1, "check on a file of comments");
    assert_few_clear_lines(&output, 3, "check on a file of comments");
}

#[test]
fn check_binary_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = pseudo_random_bytes(0xb1a5, 4096);
    bytes[0] = 0;
    bytes[100] = 0;
    let path = write(dir.path(), "binary.yaml", &bytes);
    let output = check(&path);
    assert_exit(&output, 1, "check on a binary file");
    assert_few_clear_lines(&output, 3, "check on a binary file");
}

#[test]
fn check_not_yaml_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "json-ish.yaml",
        "{ \"services\": [ unterminated\n",
    );
    let output = check(&path);
    assert_exit(&output, 1, "check on a syntax error");
    assert_few_clear_lines(&output, 3, "check on a syntax error");
    assert!(
        stderr(&output).contains("json-ish.yaml"),
        "{}",
        dump(&output)
    );
}

/// Runs `check` on `path` with a 10 s budget and asserts a quick, clean exit 1.
#[track_caller]
fn assert_rejected_quickly(path: &Path, context: &str) {
    let start = Instant::now();
    let output = run_sluice_timeout(
        [Path::new("check"), Path::new("--config"), path],
        Duration::from_secs(10),
    );
    let took = start.elapsed();
    assert_exit(&output, 1, context);
    assert_few_clear_lines(&output, 5, context);
    assert!(took < Duration::from_secs(10), "{context}: took {took:?}");
}

#[test]
fn check_ten_megabytes_of_garbage() {
    let dir = tempfile::tempdir().unwrap();
    // Printable junk with YAML punctuation sprinkled in, 10 MB, in lines.
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789 :-[]{}&*!|>'\"%@`,#?";
    let mut rng = fastrand::Rng::with_seed(10);
    let mut text = Vec::with_capacity(10 << 20);
    while text.len() < 10 << 20 {
        for _ in 0..rng.usize(20..120) {
            text.push(alphabet[rng.usize(..alphabet.len())]);
        }
        text.push(b'\n');
    }
    let path = write(dir.path(), "garbage.yaml", &text);
    assert_rejected_quickly(&path, "check on 10 MB of garbage");
}

/// Well-formed, valid YAML: about `size` bytes of plausible services
/// (`s0`, `s1`, …); returns the text and the number of services.
fn many_services(size: usize) -> (String, u64) {
    let mut text = String::with_capacity(size + 1024);
    text.push_str("services:\n");
    let mut i = 0u64;
    while text.len() < size {
        let port = 1024 + (i % 60000);
        text.push_str(&format!(
            "  - {{ name: s{i}, protocol: tcp, listen: [\"127.0.0.1:{port}\"], \
             backends: [{{ address: \"127.0.0.1:{port}\" }}] }}\n"
        ));
        i += 1;
    }
    (text, i)
}

#[test]
fn check_ten_megabytes_of_services() {
    // Invalid only at the very end.
    let dir = tempfile::tempdir().unwrap();
    let (mut text, _) = many_services(10 << 20);
    text.push_str("no_such_key: true\n");
    let path = write(dir.path(), "huge.yaml", text);
    assert_rejected_quickly(&path, "check on 10 MB of services");
}

#[test]
fn check_thousands_of_services() {
    // ~200 KB, ~1900 services: small enough that no size or node budget
    // rejects it, so the whole file is parsed and validated. Validation
    // must not be quadratic, and the summary must list every service.
    let dir = tempfile::tempdir().unwrap();
    let (text, count) = many_services(200 << 10);
    let path = write(dir.path(), "many.yaml", &text);
    let start = Instant::now();
    let output = run_sluice_timeout(
        [Path::new("check"), Path::new("--config"), &path],
        Duration::from_secs(10),
    );
    assert_exit(&output, 0, "check on thousands of services");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    let summary = stdout(&output);
    let last = format!("s{}", count - 1);
    assert!(
        summary.contains("s0") && summary.contains(&last),
        "summary lacks s0 or {last}"
    );

    let path = write(
        dir.path(),
        "many-bad.yaml",
        format!("{text}no_such_key: true\n"),
    );
    assert_rejected_quickly(&path, "check on thousands of services and a bad key");
}

#[test]
fn check_yaml_alias_bomb() {
    // "Billion laughs": 9^9 strings if aliases were expanded naively.
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in names.windows(2) {
        let refs = vec![format!("*{}", pair[0]); 9].join(",");
        text.push_str(&format!("{}: &{} [{refs}]\n", pair[1], pair[1]));
    }
    text.push_str("services: *i\n");
    let path = write(dir.path(), "bomb.yaml", &text);
    assert_rejected_quickly(&path, "check on a YAML alias bomb");
}

#[test]
fn check_deeply_nested_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let depth = 100_000;
    let text = format!("services: {}{}\n", "[".repeat(depth), "]".repeat(depth));
    let path = write(dir.path(), "deep.yaml", &text);
    assert_rejected_quickly(&path, "check on deeply nested YAML");
}

// ------------------------------------------------------------- usage

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "ok.yaml",
        tcp_config(
            "web",
            "127.0.0.1:18003".parse().unwrap(),
            &["127.0.0.1:18103".parse().unwrap()],
        ),
    );
    let config = config.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["check"],
        &["run"],
        &["check", "--config"],
        &["check", "--config", config, "--frobnicate"],
        &["run", "--config", config, "--workers", "abc"],
        &["--no-such-flag"],
    ];
    let mut failures = Vec::new();
    for args in cases {
        let output = run_sluice_timeout(*args, Duration::from_secs(10));
        let err = stderr(&output);
        if output.status.code() != Some(2) || err.trim().is_empty() || err.contains("panicked") {
            failures.push(format!("sluice {}: {}", args.join(" "), dump(&output)));
        }
    }
    assert!(
        failures.is_empty(),
        "usage errors must exit 2 with a message:\n\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn version_prints_name_and_version() {
    let output = run_sluice(["--version"]);
    assert_exit(&output, 0, "--version");
    assert_eq!(
        stdout(&output).trim(),
        format!("sluice {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_describes_the_commands() {
    let output = run_sluice(["--help"]);
    assert_exit(&output, 0, "--help");
    let text = stdout(&output);
    assert!(
        text.contains("run") && text.contains("check"),
        "--help output:\n{text}"
    );

    for command in ["run", "check"] {
        let output = run_sluice([command, "--help"]);
        assert_exit(&output, 0, &format!("{command} --help"));
        assert!(
            stdout(&output).contains("--config"),
            "{command} --help:\n{}",
            dump(&output)
        );
    }
}

// ------------------------------------------------------------- run

/// A config for one TCP service on a free loopback port, and its backend.
fn running_config() -> (String, SocketAddr, TcpEcho) {
    let backend = TcpEcho::start();
    let listen = free_tcp_addr();
    let yaml = format!(
        "shutdown_timeout: 5s\n{}",
        tcp_config("web", listen, &[backend.addr()])
    );
    (yaml, listen, backend)
}

/// Starts sluice, checks it listens, sends `signal`, and asserts it logs
/// `shutting down` and exits 0 within 1 s of the signal.
fn start_then_stop_with(signal: Signal, args: &[&str]) {
    let (yaml, listen, _backend) = running_config();
    let mut sluice = Sluice::start_with_args(&yaml, args);
    sluice.wait_started();
    // Started means every listener is bound.
    drop(connect_with_retry(listen, Duration::from_secs(2)));

    let sent = Instant::now();
    sluice.signal(signal);
    let status = sluice.wait_exit(DEADLINE);
    let took = sent.elapsed();
    let log = sluice.log();
    assert_eq!(
        status.code(),
        Some(0),
        "exit on {signal}: {}\nlog:\n{log}",
        describe_status(status)
    );
    assert!(
        took <= Duration::from_secs(1),
        "exit took {took:?} after {signal}; log:\n{log}"
    );
    assert!(
        log.contains(SHUTDOWN_MARKER),
        "no {SHUTDOWN_MARKER:?} in the log:\n{log}"
    );
    assert_eq!(log.matches(STARTED_MARKER).count(), 1, "log:\n{log}");
    assert_no_panic_or_debug_dump(&log, "sluice run log");
    // Listeners are closed: new connects are refused.
    assert!(
        std::net::TcpStream::connect(listen).is_err(),
        "{listen} still accepts after exit"
    );
}

#[test]
fn run_starts_and_exits_0_on_sigterm() {
    start_then_stop_with(Signal::SIGTERM, &[]);
}

#[test]
fn run_starts_and_exits_0_on_sigint() {
    start_then_stop_with(Signal::SIGINT, &[]);
}

#[test]
fn run_accepts_workers_flag() {
    start_then_stop_with(Signal::SIGTERM, &["--workers", "1"]);
}

/// Starts sluice on `yaml` and expects it to fail with `code` quickly,
/// printing no `sluice started`; returns its log.
#[track_caller]
fn run_expecting_failure(yaml: &str, code: i32, context: &str) -> String {
    let mut sluice = Sluice::start(yaml);
    let status = sluice.wait_exit(Duration::from_secs(15));
    let log = sluice.log();
    assert_eq!(
        status.code(),
        Some(code),
        "{context}: {}\nlog:\n{log}",
        describe_status(status)
    );
    assert!(
        !log.contains(STARTED_MARKER),
        "{context}: logged {STARTED_MARKER:?}:\n{log}"
    );
    assert_no_panic_or_debug_dump(&log, context);
    log
}

#[test]
fn run_exits_3_when_tcp_listen_address_is_taken() {
    // std's listener sets SO_REUSEADDR but not SO_REUSEPORT: sluice's
    // SO_REUSEPORT listener cannot join it.
    let taken = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let addr = taken.local_addr().unwrap();
    let backend = TcpEcho::start();
    let log = run_expecting_failure(
        &tcp_config("web", addr, &[backend.addr()]),
        3,
        "run with its TCP port taken",
    );
    assert_eq!(
        error_lines_naming(&log, addr),
        1,
        "one error line must name {addr}:\n{log}"
    );
}

/// How many error lines in `log` name `addr`.
fn error_lines_naming(log: &str, addr: SocketAddr) -> usize {
    let addr = addr.to_string();
    log.lines()
        .filter(|l| l.contains(&addr) && l.to_ascii_lowercase().contains("error"))
        .count()
}

#[test]
fn run_exits_3_when_udp_listen_address_is_taken() {
    let taken = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    let addr = taken.local_addr().unwrap();
    let backend = UdpEcho::start();
    let log = run_expecting_failure(
        &udp_config("dns", "session", addr, &[backend.addr()]),
        3,
        "run with its UDP port taken",
    );
    assert_eq!(
        error_lines_naming(&log, addr),
        1,
        "one error line must name {addr}:\n{log}"
    );
}

#[test]
fn run_exits_1_on_invalid_config() {
    let (yaml, _listen, _backend) = running_config();
    let yaml = format!("{yaml}no_such_key: 1\n");
    let log = run_expecting_failure(&yaml, 1, "run with an unknown key");
    assert!(
        log.contains("no_such_key"),
        "the error should name the key:\n{log}"
    );
}

#[test]
fn run_exits_1_on_missing_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.yaml");
    let output = run_sluice_timeout(
        [Path::new("run"), Path::new("--config"), &path],
        Duration::from_secs(10),
    );
    assert_exit(&output, 1, "run with a missing config");
    assert_few_clear_lines(&output, 3, "run with a missing config");
    assert!(
        stderr(&output).contains("missing.yaml"),
        "{}",
        dump(&output)
    );
}

// ------------------------------------------------- the scanner itself

#[test]
fn service_name_scanner() {
    let yaml = "# name: not-this\nservices:\n  - name: web # comment\n    backends:\n      \
                - address: x:1\n  - {name: \"dns\", protocol: udp}\n    hostname: nope\n";
    assert_eq!(service_names(yaml), ["web", "dns"]);
}
