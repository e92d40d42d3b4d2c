//! sluice balancing: pure algorithms that pick a backend for a flow.
//!
//! This crate owns Maglev (Eisenbud et al., NSDI 2016), source-IP Maglev,
//! smooth weighted round robin, least connections, weighted random, power of
//! two choices and peak-EWMA least latency. It must never do I/O, read a
//! clock, use a global RNG or take a lock: time and randomness come in as
//! arguments ([`PickCtx`]), so every algorithm is deterministic under test.
//! The only shared mutable state is [`Load`], a few atomics per backend that
//! every core updates (active connections, latency EWMA), and a global
//! atomic counter that numbers snapshots.
//!
//! What it owns:
//!
//! * [`stable_hash`]: XXH64 with seed 0, written here with fixed constants
//!   (never `RandomState`), so endpoint and flow hashes are the same in every
//!   process and on every run.
//! * [`maglev`]: the weighted Maglev population; tables are `Vec<u32>`
//!   member indexes, size M prime, `>= 100 x members` (default 65537).
//! * [`Snapshot`]: the immutable per-service routing state (healthy members
//!   plus tables), built on the control thread and shared with the workers
//!   through `Arc`; [`Snapshot::pick`] takes `&self`, never locks and does
//!   not allocate on the maglev/source_ip path.
//!
//! What it must never do: read a clock (`Instant::now`, `SystemTime::now`),
//! use a randomly keyed hasher or a global RNG, touch a socket or file, or
//! take a lock. The crate's `clippy.toml` disallows the clock and
//! `RandomState`. Health is the caller's business: build (or
//! [`Snapshot::rebuild_with`]) from the members that are up.
//!
//! ```
//! use std::sync::Arc;
//! use sluice_balance::{Algorithm, Endpoint, FlowKey, Load, Member, PickCtx, PickState, Snapshot};
//! let members = vec![
//!     Member::new(Endpoint::from_address(0, 100, "10.0.0.1:443"), Arc::new(Load::default()), 0),
//!     Member::new(Endpoint::from_address(1, 100, "10.0.0.2:443"), Arc::new(Load::default()), 0),
//! ];
//! let snap = Snapshot::build(Algorithm::Maglev, members, Default::default());
//! let flow = FlowKey::tcp("192.0.2.7:5555".parse().unwrap(), "198.51.100.1:443".parse().unwrap());
//! let mut state = PickState::default();
//! let id = snap.pick(&flow, &PickCtx { rand: 42, now_nanos: 0 }, &mut state, &[]);
//! assert!(id.is_some());
//! ```
#![forbid(unsafe_code)]

mod api;
mod hash;
mod latency;
pub mod maglev;
mod pick;

pub use api::*;
