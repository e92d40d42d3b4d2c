//! The `sluice` binary.
#![forbid(unsafe_code)]

fn main() {}
