//! sluice configuration: YAML text in, a validated [`Config`] out, and a
//! [`diff`] between two configs for live reload.
//!
//! This crate owns parsing (serde-saphyr, with budget and alias limits),
//! validation (two stages: raw serde structs with `deny_unknown_fields`, then
//! the typed model in [`model`]) and the reload diff. It must never bind a
//! socket, start a thread or touch the clock: `sluice check` relies on that.
//! Host names in addresses are resolved while loading (a blocking lookup),
//! which is the one piece of the outside world it reads.
#![forbid(unsafe_code)]

pub mod model;

pub use model::*;
