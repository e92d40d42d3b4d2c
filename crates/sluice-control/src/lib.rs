//! sluice control thread: configuration, signals, health checks, reloads
//! and the admin endpoint.
//!
//! It owns the running configuration and every long-lived object (load
//! counters, metrics, health state), binds the listeners, builds the
//! routing snapshots (Maglev tables are built here, never on a worker) and
//! sends them to the workers as messages. It never touches a worker's
//! state directly and never moves client bytes.
#![forbid(unsafe_code)]

pub mod admin;
pub mod health;
pub mod registry;
pub mod reload;
mod run;
pub mod signals;

pub use run::{run, RunOptions, StartError};
