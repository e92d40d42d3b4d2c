//! Metric names (SPEC.md "Admin endpoint"), one constant each, grouped by
//! family, plus the label keys and the fixed label values.
//!
//! Rule: a metric name or a fixed label value is written exactly once, here.
//! Code that records or encodes a metric refers to these constants; nothing
//! spells `"sluice_..."` inline. The names are the final exposed names: the
//! encoder adds no suffix to counters (see `crate::encode`).

// ---- per backend (labels: service, backend) -------------------------------

/// Counter: TCP connections established to the backend.
pub const CONNECTIONS_TOTAL: &str = "sluice_connections_total";
/// Gauge: TCP connections currently open to the backend.
pub const ACTIVE_CONNECTIONS: &str = "sluice_active_connections";
/// Counter: bytes relayed; extra label `direction` = [`TO_BACKEND`] | [`TO_CLIENT`].
pub const BYTES_TOTAL: &str = "sluice_bytes_total";
/// Counter: failed connect attempts to the backend.
pub const CONNECT_ERRORS_TOTAL: &str = "sluice_connect_errors_total";
/// Gauge: 1 while the backend is healthy, 0 while it is down.
pub const BACKEND_UP: &str = "sluice_backend_up";
/// Counter: health checks run; extra label `result` = [`PASS`] | [`FAIL`].
pub const HEALTH_CHECKS_TOTAL: &str = "sluice_health_checks_total";
/// Histogram: time to establish the backend connection (successful connects), in seconds.
pub const CONNECT_DURATION_SECONDS: &str = "sluice_connect_duration_seconds";

// ---- per service (label: service) -----------------------------------------

/// Counter: connections closed / datagrams dropped because no backend was up.
pub const NO_BACKEND_TOTAL: &str = "sluice_no_backend_total";
/// Counter: UDP datagrams; extra label `direction` =
/// [`TO_BACKEND`] | [`TO_CLIENT`] | [`DROPPED`].
pub const UDP_DATAGRAMS_TOTAL: &str = "sluice_udp_datagrams_total";
/// Gauge: UDP sessions currently open (one per client flow in `session` mode).
pub const UDP_SESSIONS: &str = "sluice_udp_sessions";
/// Counter: DNS-mode queries by outcome; extra label `result` =
/// [`ANSWERED`] | [`TIMEOUT`] | [`ORPHAN_REPLY`].
pub const DNS_QUERIES_TOTAL: &str = "sluice_dns_queries_total";

// ---- process (no service label) -------------------------------------------

/// Counter: SIGHUP reloads; extra label `result` = [`SUCCESS`] | [`FAILURE`].
pub const CONFIG_RELOADS_TOTAL: &str = "sluice_config_reloads_total";

/// Every family, in the order the exposition lists them.
pub const ALL: [&str; 12] = [
    CONNECTIONS_TOTAL,
    ACTIVE_CONNECTIONS,
    BYTES_TOTAL,
    CONNECT_ERRORS_TOTAL,
    NO_BACKEND_TOTAL,
    BACKEND_UP,
    HEALTH_CHECKS_TOTAL,
    CONNECT_DURATION_SECONDS,
    UDP_DATAGRAMS_TOTAL,
    UDP_SESSIONS,
    DNS_QUERIES_TOTAL,
    CONFIG_RELOADS_TOTAL,
];

// ---- label keys ------------------------------------------------------------

pub const LABEL_SERVICE: &str = "service";
/// The backend's `IP:port`.
pub const LABEL_BACKEND: &str = "backend";
pub const LABEL_DIRECTION: &str = "direction";
pub const LABEL_RESULT: &str = "result";

// ---- fixed label values ----------------------------------------------------

/// `direction`: client → backend.
pub const TO_BACKEND: &str = "to_backend";
/// `direction`: backend → client.
pub const TO_CLIENT: &str = "to_client";
/// `direction` (UDP only): datagram dropped.
pub const DROPPED: &str = "dropped";
/// `result` of a health check.
pub const PASS: &str = "pass";
/// `result` of a health check.
pub const FAIL: &str = "fail";
/// `result` of a DNS query: a backend reply was relayed to the client.
pub const ANSWERED: &str = "answered";
/// `result` of a DNS query: no reply within `query_timeout`.
pub const TIMEOUT: &str = "timeout";
/// `result` of a DNS query: a reply matching no outstanding query.
pub const ORPHAN_REPLY: &str = "orphan_reply";
/// `result` of a reload.
pub const SUCCESS: &str = "success";
/// `result` of a reload.
pub const FAILURE: &str = "failure";
