//! sluice dataplane: the per-core workers.
//!
//! Each worker is a thread pinned to one core running its own tokio-uring
//! runtime. It accepts on its own SO_REUSEPORT listeners, picks a backend
//! from the routing snapshot it was given, and moves bytes (TCP) or
//! datagrams (UDP). It never reads the config file, never runs a health
//! check and never builds a Maglev table: the control thread sends it
//! everything over a channel, and it reports connect failures back.
#![forbid(unsafe_code)]
