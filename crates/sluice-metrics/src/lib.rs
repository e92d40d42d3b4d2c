//! sluice metrics: names, per-core counters, Prometheus text encoding.
//!
//! What it owns: the metric names of SPEC.md ([`names`]), the per-core cells
//! the workers write ([`PerCoreCounter`], [`PerCoreGauge`],
//! [`PerCoreHistogram`]), the per-service / per-backend / process metric sets
//! built from them, and the scrape-time encoder ([`encode`]).
//!
//! Rule: on the hot path a worker only ever writes its own slot (`core`
//! index) of a cell, with a relaxed load+store (single writer, no atomic
//! read-modify-write, no lock); each slot sits on its own cache line so
//! workers never share one. Nothing is shared between cores except what
//! `least_conn` needs (that lives in `sluice-balance`). The scrape sums the
//! slots. This crate must never do I/O, spawn threads, read the clock or
//! allocate on the hot path: the admin endpoint calls [`encode`] and serves
//! the text with [`CONTENT_TYPE`]; durations are measured by the caller and
//! passed in.
//!
//! Feature `counters-off` (benchmarking only, off by default): the
//! hot-path writers ([`PerCoreCounter::add`], [`PerCoreGauge::add`],
//! [`PerCoreHistogram::observe_nanos`]) compile to nothing, so a build can
//! be compared with and without the counters (`bench/metrics_overhead.sh`).
//! The exposition is unchanged but shows those counters at 0; the tests
//! and examples here assume the feature is off.
//!
//! ```
//! use std::sync::Arc;
//! use sluice_metrics::{encode, BackendMetrics, GlobalMetrics, ServiceMetrics, CONTENT_TYPE};
//!
//! let cores = 2;
//! let global = GlobalMetrics::default();
//! let svc = Arc::new(ServiceMetrics::new("web", cores));
//! let be = Arc::new(BackendMetrics::new("web", "10.0.0.1:443", cores));
//!
//! // worker 1 accepts a connection, connects in 300 µs, relays 512 bytes
//! be.connections.inc(1);
//! be.active.add(1, 1);
//! be.connect_duration.observe_nanos(1, 300_000);
//! be.bytes_to_backend.add(1, 512);
//!
//! // the admin endpoint, on scrape
//! let body = encode(&global, &[svc], &[be]);
//! assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
//! assert!(body.contains(
//!     "sluice_bytes_total{service=\"web\",backend=\"10.0.0.1:443\",direction=\"to_backend\"} 512\n"
//! ));
//! ```
#![forbid(unsafe_code)]

mod api;
mod encode;
pub mod names;

pub use api::*;
pub use encode::{encode, BackendSnapshot, ServiceSnapshot, Snapshot, CONTENT_TYPE};
