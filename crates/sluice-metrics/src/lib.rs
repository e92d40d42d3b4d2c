//! sluice metrics: names, per-core counters, Prometheus text encoding.
//!
//! Rule: on the hot path a worker only ever writes its own slot
//! (`core` index) of a counter, with a relaxed load+store (single writer);
//! nothing is shared between cores except what `least_conn` needs (that
//! lives in `sluice-balance`). The scrape sums the slots. This crate does no
//! I/O; the admin endpoint calls [`encode`] and serves the text.
#![forbid(unsafe_code)]

pub mod names;
mod api;

pub use api::*;
