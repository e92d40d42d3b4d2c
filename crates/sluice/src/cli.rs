//! Command line of `sluice` (clap), and what each command does.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes (SPEC.md "Command line").
pub mod exit {
    /// Clean shutdown, or a valid configuration.
    pub const OK: u8 = 0;
    /// Invalid configuration.
    pub const INVALID_CONFIG: u8 = 1;
    /// Usage error (clap exits with 2 itself).
    pub const USAGE: u8 = 2;
    /// Start-up failure: a bind failed, io_uring unavailable, ...
    pub const START_FAILURE: u8 = 3;
}

/// A Layer-4 TCP/UDP load balancer on io_uring.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run in the foreground until SIGTERM/SIGINT (SIGHUP reloads the file).
    Run {
        /// Configuration file (YAML).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Number of io_uring worker loops (overrides `workers:` in the file).
        #[arg(long, value_name = "N")]
        workers: Option<NonZeroUsize>,
    },
    /// Validate the configuration and print a summary; binds nothing.
    Check {
        /// Configuration file (YAML).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
}

fn print_config_errors(err: &sluice_config::LoadError) {
    for line in err.to_string().lines() {
        eprintln!("error: {line}");
    }
}

/// `sluice check`: exit 0 with a summary on stdout, or 1 with the errors.
pub fn check(path: &Path) -> ExitCode {
    match sluice_config::load_file(path) {
        Ok(cfg) => {
            print!("{}", sluice_config::summary(&cfg));
            println!("{}: configuration is valid", path.display());
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            print_config_errors(&e);
            ExitCode::from(exit::INVALID_CONFIG)
        }
    }
}

/// `sluice run`: load, probe io_uring, raise the fd limit, then run until
/// shutdown.
pub fn run(path: &Path, workers: Option<NonZeroUsize>) -> ExitCode {
    let config = match sluice_config::load_file(path) {
        Ok(c) => c,
        Err(e) => {
            print_config_errors(&e);
            return ExitCode::from(exit::INVALID_CONFIG);
        }
    };
    if let Err(e) = sluice_uring::probe::probe() {
        eprintln!("error: {e}");
        return ExitCode::from(exit::START_FAILURE);
    }
    match sluice_uring::sys::raise_nofile_limit() {
        Ok(n) => log::debug!("open-file limit: {n}"),
        Err(e) => log::warn!("cannot raise the open-file limit: {e}"),
    }
    let opts = sluice_control::RunOptions {
        config_path: path.to_path_buf(),
        config,
        workers: workers.map(NonZeroUsize::get),
    };
    match sluice_control::run(opts) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit::START_FAILURE)
        }
    }
}
