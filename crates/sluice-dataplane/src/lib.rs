//! sluice dataplane: the per-core workers.
//!
//! Each worker is a thread pinned to one core running its own tokio-uring
//! runtime. It accepts on its own SO_REUSEPORT listeners (bound by the
//! control thread and handed over in [`WorkerMsg`]s), picks a backend from
//! the routing snapshot it was given, and moves bytes (TCP) or datagrams
//! (UDP). It never reads the config file, never runs a health check and
//! never builds a Maglev table: the control thread sends it everything over
//! a channel and wakes it with a `Notify`; the worker reports connect
//! failures back as [`WorkerEvent`]s.
//!
//! ```no_run
//! use sluice_dataplane::{spawn_worker, WorkerConfig, WorkerMsg};
//! let (events_tx, _events_rx) = tokio::sync::mpsc::unbounded_channel();
//! let worker = spawn_worker(WorkerConfig::new(0, 1), events_tx).unwrap();
//! // ... send WorkerMsg::Routes and WorkerMsg::AddTcpListener ...
//! worker.send(WorkerMsg::Shutdown { deadline: std::time::Instant::now() });
//! worker.join();
//! ```
#![forbid(unsafe_code)]

mod conns;
pub mod proxy_proto;
pub mod routes;
mod tcp;
mod transfer;
pub mod udp;
mod worker;

pub use routes::{BackendRoute, ServiceLimit, ServiceRoutes};
pub use worker::{spawn_worker, WorkerConfig, WorkerHandle};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// A message from the control thread to one worker.
#[derive(Debug)]
pub enum WorkerMsg {
    /// New or updated routes for these services (replaces the previous
    /// routes of a service with the same name).
    Routes(Vec<Arc<ServiceRoutes>>),
    /// Forget a service: its listeners close at once; its open connections
    /// finish on the routes they have.
    RemoveService(String),
    /// Start accepting on this listener (bound with SO_REUSEPORT for this
    /// worker) for `service`.
    AddTcpListener {
        service: String,
        addr: SocketAddr,
        socket: std::net::TcpListener,
    },
    /// Start serving this UDP socket (SO_REUSEPORT, PKTINFO) for `service`.
    AddUdpListener {
        service: String,
        addr: SocketAddr,
        socket: std::net::UdpSocket,
    },
    /// Close the listener (TCP or UDP) of `service` on `addr`.
    RemoveListener { service: String, addr: SocketAddr },
    /// A backend was marked down or removed: forget UDP flows on it.
    ForgetBackend {
        service: String,
        backend: SocketAddr,
    },
    /// Stop accepting now; let connections finish until `deadline`, then
    /// close the rest and end the worker thread.
    Shutdown { deadline: Instant },
    /// A barrier: answered once every message sent before it is applied
    /// (the control thread waits for it before logging a reload as done).
    Sync(tokio::sync::oneshot::Sender<()>),
}

/// Why a connect attempt to a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Timeout,
    /// Reset or closed right after connecting.
    Reset,
    Other,
}

/// A report from a worker to the control thread.
#[derive(Debug, Clone)]
pub enum WorkerEvent {
    /// A connect to `backend` failed (passive health).
    ConnectFailed {
        worker: usize,
        service: String,
        backend: SocketAddr,
        why: ConnectFailure,
    },
    /// A connect to `backend` succeeded after failures on this worker.
    ConnectRecovered {
        worker: usize,
        service: String,
        backend: SocketAddr,
    },
    /// The worker finished draining and its thread is about to end.
    Exited { worker: usize },
}
