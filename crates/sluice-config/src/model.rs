//! The validated configuration model. Every field is already checked and
//! typed; code outside this crate never sees raw YAML values.
//!
//! Defaults (applied by the loader when neither the service nor `defaults:`
//! sets a field): balance `maglev`, transfer `auto`, proxy_protocol `none`,
//! max_connections `0` (unlimited), connect_timeout `3s`, connect_retries
//! `2`, idle_timeout `5m`, access_log `false`; health_check: tcp services get
//! kind `tcp`, udp services kind `none`; interval `2s`, timeout `1s` (or the
//! interval, if shorter), rise `2`, fall `3`; udp: mode `session`,
//! session_timeout `30s`, query_timeout `2s`, max_sessions `100000`; backend
//! weight `100`, max_connections `0`; shutdown_timeout `30s`; workers `auto`.
//! The same values are constants in [`defaults`].

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

/// Built-in defaults, applied when neither a service nor `defaults:` sets a
/// field (the same values as listed at the top of this module).
pub mod defaults {
    use std::time::Duration;

    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_CONNECTIONS: u32 = 0;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    pub const CONNECT_RETRIES: u32 = 2;
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    pub const ACCESS_LOG: bool = false;
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
    /// The check timeout when none is given (or the interval, if that is
    /// shorter).
    pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
    pub const CHECK_RISE: u32 = 2;
    pub const CHECK_FALL: u32 = 3;
    pub const UDP_SESSION_TIMEOUT: Duration = Duration::from_secs(30);
    pub const UDP_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
    pub const UDP_MAX_SESSIONS: u32 = 100_000;
    pub const BACKEND_WEIGHT: u32 = 100;
    pub const BACKEND_MAX_CONNECTIONS: u32 = 0;
    /// Backend weights are `1..=MAX_WEIGHT`.
    pub const MAX_WEIGHT: u32 = 10_000;
    /// `workers: N` accepts `1..=MAX_WORKERS`.
    pub const MAX_WORKERS: usize = 1024;
}

impl Config {
    /// The service called `name`, if any.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

impl Service {
    /// The backend with resolved address `addr`, if any.
    pub fn backend(&self, addr: SocketAddr) -> Option<&Backend> {
        self.backends.iter().find(|b| b.addr == addr)
    }
}

impl HealthCheck {
    /// The check a service gets when it has no `health_check` block and
    /// `defaults:` gives none that fits it: kind `tcp` for tcp services,
    /// `none` for udp services, with the default timings.
    pub fn default_for(protocol: Protocol) -> HealthCheck {
        HealthCheck {
            kind: match protocol {
                Protocol::Tcp => CheckKind::Tcp,
                Protocol::Udp => CheckKind::None,
            },
            interval: defaults::CHECK_INTERVAL,
            timeout: defaults::CHECK_TIMEOUT,
            rise: NonZeroU32::MIN.saturating_add(defaults::CHECK_RISE - 1),
            fall: NonZeroU32::MIN.saturating_add(defaults::CHECK_FALL - 1),
        }
    }
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            mode: UdpMode::Session,
            session_timeout: defaults::UDP_SESSION_TIMEOUT,
            query_timeout: defaults::UDP_QUERY_TIMEOUT,
            max_sessions: defaults::UDP_MAX_SESSIONS,
        }
    }
}

impl CheckKind {
    /// The `kind:` spelling (`tcp`, `send_expect`, `dns`, `none`).
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::SendExpect { .. } => "send_expect",
            CheckKind::Dns(_) => "dns",
            CheckKind::None => "none",
        }
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Count(n) => write!(f, "{n}"),
        }
    }
}

impl std::fmt::Display for DnsQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.qtype)
    }
}

impl std::fmt::Display for HealthCheck {
    /// `tcp every 2s, timeout 1s, rise 2, fall 3`; `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            CheckKind::None => return f.write_str("none"),
            CheckKind::Tcp => f.write_str("tcp")?,
            CheckKind::SendExpect { send, expect } => write!(
                f,
                "send_expect send \"{}\" expect \"{}\"",
                send.escape_ascii(),
                expect.escape_ascii()
            )?,
            CheckKind::Dns(q) => write!(f, "dns \"{q}\"")?,
        }
        write!(
            f,
            " every {}, timeout {}, rise {}, fall {}",
            humantime::format_duration(self.interval),
            humantime::format_duration(self.timeout),
            self.rise,
            self.fall
        )
    }
}

/// `as_str()` (the YAML spelling), `Display` and the list of all values for
/// the simple enums.
macro_rules! yaml_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in documentation order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The spelling used in the YAML file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }

            /// Parses the YAML spelling.
            pub fn from_name(name: &str) -> Option<$ty> {
                match name {
                    $($text => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

yaml_enum!(Protocol { Tcp => "tcp", Udp => "udp" });
yaml_enum!(Balance {
    Maglev => "maglev",
    SourceIp => "source_ip",
    RoundRobin => "round_robin",
    LeastConn => "least_conn",
    Random => "random",
    TwoChoices => "two_choices",
    LeastLatency => "least_latency",
});
yaml_enum!(Transfer { Splice => "splice", Copy => "copy", Auto => "auto" });
yaml_enum!(ProxyProtocol { None => "none", V1 => "v1", V2 => "v2" });
yaml_enum!(UdpMode { Dns => "dns", Session => "session" });
