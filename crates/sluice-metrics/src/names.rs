//! Metric names (SPEC.md "Admin endpoint"), one constant each.

pub const CONNECTIONS_TOTAL: &str = "sluice_connections_total";
pub const ACTIVE_CONNECTIONS: &str = "sluice_active_connections";
pub const BYTES_TOTAL: &str = "sluice_bytes_total";
pub const CONNECT_ERRORS_TOTAL: &str = "sluice_connect_errors_total";
pub const NO_BACKEND_TOTAL: &str = "sluice_no_backend_total";
pub const BACKEND_UP: &str = "sluice_backend_up";
pub const HEALTH_CHECKS_TOTAL: &str = "sluice_health_checks_total";
pub const CONNECT_DURATION_SECONDS: &str = "sluice_connect_duration_seconds";
pub const UDP_DATAGRAMS_TOTAL: &str = "sluice_udp_datagrams_total";
pub const UDP_SESSIONS: &str = "sluice_udp_sessions";
pub const DNS_QUERIES_TOTAL: &str = "sluice_dns_queries_total";
pub const CONFIG_RELOADS_TOTAL: &str = "sluice_config_reloads_total";
