//! The sluice benchmark harness.
#![forbid(unsafe_code)]

fn main() {}
