//! The `sluice` binary: parse the command line, set up logging, dispatch.
//! Everything else lives in the library crates.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before any thread exists: SIGHUP/SIGTERM/SIGINT are received only by
    // the control thread's signal waiter.
    if let Err(e) = sluice_control::signals::block() {
        eprintln!("error: cannot block signals: {e}");
        return ExitCode::from(cli::exit::START_FAILURE);
    }
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // --help and --version land here too (printed on stdout, exit 0).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                cli::exit::USAGE
            } else {
                cli::exit::OK
            });
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match args.command {
        cli::Command::Run { config, workers } => cli::run(&config, workers),
        cli::Command::Check { config } => cli::check(&config),
    }
}
