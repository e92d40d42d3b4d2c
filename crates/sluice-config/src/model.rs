//! The validated configuration model. Every field is already checked and
//! typed; code outside this crate never sees raw YAML values.
//!
//! Defaults (applied by the loader when neither the service nor `defaults:`
//! sets a field): balance `maglev`, transfer `auto`, proxy_protocol `none`,
//! max_connections `0` (unlimited), connect_timeout `3s`, connect_retries
//! `2`, idle_timeout `5m`, access_log `false`; health_check: tcp services get
//! kind `tcp`, udp services kind `none`; interval `2s`, timeout `1s`, rise
//! `2`, fall `3`; udp: mode `session`, session_timeout `30s`, query_timeout
//! `2s`, max_sessions `100000`; backend weight `100`, max_connections `0`;
//! shutdown_timeout `30s`; workers `auto`.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

/// A whole, validated configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub workers: Workers,
    pub admin: Option<Admin>,
    pub shutdown_timeout: Duration,
    pub services: Vec<Service>,
}

/// How many io_uring loops to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One per online CPU.
    Auto,
    Count(NonZeroUsize),
}

/// The admin HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// `balance:` in a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Balance {
    Maglev,
    SourceIp,
    RoundRobin,
    LeastConn,
    Random,
    TwoChoices,
    LeastLatency,
}

/// `transfer:` (tcp only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transfer {
    Splice,
    Copy,
    Auto,
}

/// `proxy_protocol:` (tcp only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    None,
    V1,
    V2,
}

/// One `services[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Unique, `[a-z0-9_-]+`.
    pub name: String,
    pub protocol: Protocol,
    /// Resolved listen addresses, at least one.
    pub listen: Vec<SocketAddr>,
    pub balance: Balance,
    /// Meaningful for tcp only (udp services carry the default).
    pub transfer: Transfer,
    /// Meaningful for tcp only (udp services carry the default).
    pub proxy_protocol: ProxyProtocol,
    /// Per service; 0 = unlimited.
    pub max_connections: u32,
    pub connect_timeout: Duration,
    pub connect_retries: u32,
    pub idle_timeout: Duration,
    pub access_log: bool,
    pub health_check: HealthCheck,
    /// `Some` exactly for udp services (with defaults filled in).
    pub udp: Option<UdpSettings>,
    /// At least one.
    pub backends: Vec<Backend>,
}

/// `health_check:` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: NonZeroU32,
    pub fall: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect that succeeds within `timeout` passes.
    Tcp,
    /// Connect, send `send`, pass when the reply starts with `expect`.
    SendExpect { send: Vec<u8>, expect: Vec<u8> },
    /// A DNS query over UDP; passes on a NOERROR answer.
    Dns(DnsQuery),
    /// No active check: backends are always up (passive ejection only).
    None,
}

/// `query: "example.com. A"` of a dns health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    /// Fully qualified name, with the trailing dot.
    pub name: String,
    /// Record type as written, upper case (`A`, `AAAA`, `NS`, `SOA`, ...).
    pub qtype: String,
}

/// `udp:` of a udp service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    pub mode: UdpMode,
    pub session_timeout: Duration,
    pub query_timeout: Duration,
    pub max_sessions: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UdpMode {
    Dns,
    Session,
}

/// One `backends[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The address as written in the file (`app2.internal:443`).
    pub address: String,
    /// The resolved address that sluice connects to. Backends are identified
    /// by this address (metric label `backend`, reload diff).
    pub addr: SocketAddr,
    /// 1..=10000.
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
}
