//! sluice-uring: every io_uring detail of sluice, and the only crate with
//! `unsafe`. Each `unsafe` block carries a `// SAFETY:` comment.
#![deny(clippy::undocumented_unsafe_blocks)]
