//! sluice balancing: pure algorithms that pick a backend for a flow.
//!
//! This crate owns Maglev (Eisenbud et al., NSDI 2016), source-IP Maglev,
//! smooth weighted round robin, least connections, weighted random, power of
//! two choices and peak-EWMA least latency. It must never do I/O, read a
//! clock, use a global RNG or take a lock: time and randomness come in as
//! arguments ([`PickCtx`]), so every algorithm is deterministic under test.
//! The only shared mutable state is [`Load`], a few atomics per backend that
//! every core updates (active connections, latency EWMA).
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

pub use api::*;
