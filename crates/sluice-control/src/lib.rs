//! sluice control thread: configuration, signals, health checks, reloads
//! and the admin endpoint. It talks to the workers only through messages.
#![forbid(unsafe_code)]
