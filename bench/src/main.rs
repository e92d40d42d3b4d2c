//! The sluice benchmark harness: load tools used by the orchestration in
//! `bench/harness/` (see `docs/benchmarks.md`).
//!
//! The peers, workloads, tables and charts are driven by
//! `scripts/bench.sh`; this binary only provides what no Debian package
//! does:
//!
//! - `conn`: a connection-per-request HTTP/1.0-style client with latency
//!   percentiles measured from `connect()` to end-of-stream (tcp_conn);
//! - `hold`: opens N connections, exchanges a few bytes on each so the whole
//!   path is set up, and holds them idle until stdin closes (idle_mem);
//! - `sink`: an echo server that holds every connection it accepts
//!   (idle_mem backends).
//!
//! Every tool prints one JSON object per line on stdout.
#![forbid(unsafe_code)]

mod args;
mod conn;
mod hold;
mod sink;

use std::process::ExitCode;

const USAGE: &str = "\
usage: sluice-bench <tool> [options]

tools:
  conn  --target IP:PORT [--concurrency 32] [--duration 10s] [--warmup 1s]
        [--timeout 5s] [--request STRING]
        new connection per request; prints connections/s, p50/p99 (us)
  hold  --target IP:PORT --count N [--payload-bytes 16]
        open N connections, echo a few bytes on each, hold them until stdin
        closes; prints {\"ready\": n} when all are up
  sink  --listen IP:PORT [--listen IP:PORT ...]
        echo server that holds its connections; runs until killed
";

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let Some(tool) = argv.next() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = argv.collect();
    let result = match tool.as_str() {
        "conn" => args::Args::parse(&rest).and_then(|a| conn::run(&a)),
        "hold" => args::Args::parse(&rest).and_then(|a| hold::run(&a)),
        "sink" => args::Args::parse(&rest).and_then(|a| sink::run(&a)),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => Err(format!("unknown tool `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench {tool}: {e}");
            ExitCode::from(1)
        }
    }
}

/// Raise RLIMIT_NOFILE to its hard limit (idle_mem holds thousands of
/// sockets).
pub(crate) fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
