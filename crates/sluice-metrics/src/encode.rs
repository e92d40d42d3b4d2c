//! Scrape-time snapshot and Prometheus text encoding.
//!
//! Rule: a scrape reads every per-core cell once into an owned [`Snapshot`]
//! (sums, gauges clamped at 0), and the snapshot is what gets encoded; the
//! encoder never touches a live cell twice, never blocks a worker and never
//! fails. Every family of SPEC.md is emitted, with `# HELP` and `# TYPE`,
//! even when no service exists, so dashboards and alerts see the families
//! from the first scrape.
//!
//! The output is the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]), which
//! `promtool check metrics` parses and lints. It is produced by
//! prometheus-client (0.25) through its [`Collector`] API, with one twist:
//! that crate's `encode_counter` writes OpenMetrics, where the family
//! `x` has the sample `x_total`. In the 0.0.4 format the `# TYPE` line must
//! carry the sample's own name, so counters are declared under their full
//! SPEC name (`sluice_connections_total`, type `counter`) and their samples
//! are written with the suffix-free value writer. The exposed names are
//! exactly [`crate::names`]; no `_total_total`, no `# EOF`.
//!
//! ```
//! use std::sync::Arc;
//! use sluice_metrics::{encode, BackendMetrics, GlobalMetrics, ServiceMetrics};
//!
//! let global = GlobalMetrics::default();
//! let web = Arc::new(ServiceMetrics::new("web", 2));
//! let b1 = Arc::new(BackendMetrics::new("web", "10.0.0.1:443", 2));
//! b1.connections.inc(1);
//! let text = encode(&global, &[web], &[b1]);
//! assert!(text.contains("# TYPE sluice_connections_total counter\n"));
//! assert!(text.contains(
//!     "sluice_connections_total{service=\"web\",backend=\"10.0.0.1:443\"} 1\n"
//! ));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::api::{BackendMetrics, GlobalMetrics, ServiceMetrics, CONNECT_BUCKETS};
use crate::names::*;

/// The `Content-Type` the admin endpoint must send with [`encode`]'s text
/// (Prometheus text format 0.0.4; not OpenMetrics).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encode all metrics as Prometheus text exposition (format 0.0.4, see
/// [`CONTENT_TYPE`]).
///
/// `services` and `backends` are whatever the control thread currently
/// holds; entries that share a label set (same service name, or same
/// service and backend address) are merged by summing, so the output never
/// repeats a series.
pub fn encode(
    global: &GlobalMetrics,
    services: &[Arc<ServiceMetrics>],
    backends: &[Arc<BackendMetrics>],
) -> String {
    Snapshot::take(global, services, backends).to_text()
}

/// All metric values at one scrape, summed over cores.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub reloads_success: u64,
    pub reloads_failure: u64,
    /// One per distinct service name, in first-seen order.
    pub services: Vec<ServiceSnapshot>,
    /// One per distinct (service, backend), in first-seen order.
    pub backends: Vec<BackendSnapshot>,
}

/// One service's values (label `service`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSnapshot {
    pub service: String,
    pub no_backend: u64,
    pub udp_to_backend: u64,
    pub udp_to_client: u64,
    pub udp_dropped: u64,
    /// Clamped at 0.
    pub udp_sessions: u64,
    pub dns_answered: u64,
    pub dns_timeout: u64,
    pub dns_orphan_reply: u64,
}

/// One backend's values (labels `service`, `backend`).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSnapshot {
    pub service: String,
    pub backend: String,
    pub connections: u64,
    /// Clamped at 0.
    pub active: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub connect_errors: u64,
    pub up: bool,
    pub checks_pass: u64,
    pub checks_fail: u64,
    /// Non-cumulative counts, one per [`CONNECT_BUCKETS`] bound, then `+Inf`.
    pub connect_buckets: Vec<u64>,
    pub connect_sum_seconds: f64,
}

impl BackendSnapshot {
    /// Number of connect-duration observations.
    pub fn connect_count(&self) -> u64 {
        self.connect_buckets
            .iter()
            .fold(0u64, |a, &b| a.wrapping_add(b))
    }
}

fn clamp(raw: i64) -> u64 {
    u64::try_from(raw).unwrap_or(0)
}

impl Snapshot {
    /// Read every cell once. Duplicate label sets are merged (counters and
    /// gauges summed before clamping, `up` if any copy is up).
    pub fn take(
        global: &GlobalMetrics,
        services: &[Arc<ServiceMetrics>],
        backends: &[Arc<BackendMetrics>],
    ) -> Self {
        let mut svc_out: Vec<ServiceSnapshot> = Vec::with_capacity(services.len());
        let mut svc_raw_sessions: Vec<i64> = Vec::with_capacity(services.len());
        let mut svc_index: HashMap<&str, usize> = HashMap::with_capacity(services.len());
        for s in services {
            let read = ServiceSnapshot {
                service: s.service.clone(),
                no_backend: s.no_backend.get(),
                udp_to_backend: s.udp_to_backend.get(),
                udp_to_client: s.udp_to_client.get(),
                udp_dropped: s.udp_dropped.get(),
                udp_sessions: 0,
                dns_answered: s.dns_answered.get(),
                dns_timeout: s.dns_timeout.get(),
                dns_orphan_reply: s.dns_orphan_reply.get(),
            };
            let raw = s.udp_sessions.get();
            match svc_index.get(s.service.as_str()) {
                Some(&i) => {
                    let o = &mut svc_out[i];
                    o.no_backend = o.no_backend.wrapping_add(read.no_backend);
                    o.udp_to_backend = o.udp_to_backend.wrapping_add(read.udp_to_backend);
                    o.udp_to_client = o.udp_to_client.wrapping_add(read.udp_to_client);
                    o.udp_dropped = o.udp_dropped.wrapping_add(read.udp_dropped);
                    o.dns_answered = o.dns_answered.wrapping_add(read.dns_answered);
                    o.dns_timeout = o.dns_timeout.wrapping_add(read.dns_timeout);
                    o.dns_orphan_reply = o.dns_orphan_reply.wrapping_add(read.dns_orphan_reply);
                    svc_raw_sessions[i] = svc_raw_sessions[i].wrapping_add(raw);
                }
                None => {
                    svc_index.insert(s.service.as_str(), svc_out.len());
                    svc_out.push(read);
                    svc_raw_sessions.push(raw);
                }
            }
        }
        for (o, raw) in svc_out.iter_mut().zip(svc_raw_sessions) {
            o.udp_sessions = clamp(raw);
        }

        let mut be_out: Vec<BackendSnapshot> = Vec::with_capacity(backends.len());
        let mut be_raw_active: Vec<i64> = Vec::with_capacity(backends.len());
        let mut be_index: HashMap<(&str, &str), usize> = HashMap::with_capacity(backends.len());
        for b in backends {
            let (connect_buckets, connect_sum_seconds) = b.connect_duration.snapshot();
            let read = BackendSnapshot {
                service: b.service.clone(),
                backend: b.backend.clone(),
                connections: b.connections.get(),
                active: 0,
                bytes_to_backend: b.bytes_to_backend.get(),
                bytes_to_client: b.bytes_to_client.get(),
                connect_errors: b.connect_errors.get(),
                up: b.up.load(Ordering::Relaxed),
                checks_pass: b.checks_pass.load(Ordering::Relaxed),
                checks_fail: b.checks_fail.load(Ordering::Relaxed),
                connect_buckets,
                connect_sum_seconds,
            };
            let raw = b.active.get();
            match be_index.get(&(b.service.as_str(), b.backend.as_str())) {
                Some(&i) => {
                    let o = &mut be_out[i];
                    o.connections = o.connections.wrapping_add(read.connections);
                    o.bytes_to_backend = o.bytes_to_backend.wrapping_add(read.bytes_to_backend);
                    o.bytes_to_client = o.bytes_to_client.wrapping_add(read.bytes_to_client);
                    o.connect_errors = o.connect_errors.wrapping_add(read.connect_errors);
                    o.up |= read.up;
                    o.checks_pass = o.checks_pass.wrapping_add(read.checks_pass);
                    o.checks_fail = o.checks_fail.wrapping_add(read.checks_fail);
                    for (x, y) in o.connect_buckets.iter_mut().zip(read.connect_buckets) {
                        *x = x.wrapping_add(y);
                    }
                    o.connect_sum_seconds += read.connect_sum_seconds;
                    be_raw_active[i] = be_raw_active[i].wrapping_add(raw);
                }
                None => {
                    be_index.insert((b.service.as_str(), b.backend.as_str()), be_out.len());
                    be_out.push(read);
                    be_raw_active.push(raw);
                }
            }
        }
        for (o, raw) in be_out.iter_mut().zip(be_raw_active) {
            o.active = clamp(raw);
        }

        Snapshot {
            reloads_success: global.reloads_success.load(Ordering::Relaxed),
            reloads_failure: global.reloads_failure.load(Ordering::Relaxed),
            services: svc_out,
            backends: be_out,
        }
    }

    /// Prometheus text exposition of this snapshot (see [`CONTENT_TYPE`]).
    pub fn to_text(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(16 * 1024);
        // Cannot fail: writing to a String is infallible and every family
        // below is well-formed (histograms always carry their buckets).
        let result = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
        debug_assert!(result.is_ok(), "metrics encoding failed: {result:?}");
        out
    }
}

// HELP texts, one per family (same order as `names::ALL`).
const HELP_CONNECTIONS: &str = "TCP connections established to the backend.";
const HELP_ACTIVE: &str = "TCP connections currently open to the backend.";
const HELP_BYTES: &str = "Bytes relayed between client and backend, by direction.";
const HELP_CONNECT_ERRORS: &str = "Failed connect attempts to the backend.";
const HELP_NO_BACKEND: &str =
    "TCP connections closed and UDP datagrams dropped because no backend was healthy.";
const HELP_UP: &str = "1 if the backend is healthy and eligible for new flows, 0 if down.";
const HELP_CHECKS: &str = "Health checks run against the backend, by result.";
const HELP_CONNECT_DURATION: &str = "Time to connect to the backend, for successful connects.";
const HELP_UDP_DATAGRAMS: &str = "UDP datagrams relayed or dropped, by direction.";
const HELP_UDP_SESSIONS: &str = "UDP sessions currently open.";
const HELP_DNS: &str = "DNS-mode queries by outcome.";
const HELP_RELOADS: &str = "Configuration reloads (SIGHUP), by result.";

/// Write one scalar family: descriptor, then one sample per label set.
///
/// Counters go through `encode_gauge` on purpose: it writes the family
/// name as given (already ending in `_total`), where `encode_counter`
/// would append a second `_total` (see the module docs).
fn scalar_family<S: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (S, u64)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

fn backend_labels(b: &BackendSnapshot) -> [(&'static str, &str); 2] {
    [
        (LABEL_SERVICE, b.service.as_str()),
        (LABEL_BACKEND, b.backend.as_str()),
    ]
}

fn backend_labels_and<'a>(
    b: &'a BackendSnapshot,
    key: &'static str,
    value: &'static str,
) -> [(&'static str, &'a str); 3] {
    [
        (LABEL_SERVICE, b.service.as_str()),
        (LABEL_BACKEND, b.backend.as_str()),
        (key, value),
    ]
}

fn service_labels(s: &ServiceSnapshot) -> [(&'static str, &str); 1] {
    [(LABEL_SERVICE, s.service.as_str())]
}

fn service_labels_and<'a>(
    s: &'a ServiceSnapshot,
    key: &'static str,
    value: &'static str,
) -> [(&'static str, &'a str); 2] {
    [(LABEL_SERVICE, s.service.as_str()), (key, value)]
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let bs = &self.backends;
        let ss = &self.services;

        scalar_family(
            &mut enc,
            CONNECTIONS_TOTAL,
            HELP_CONNECTIONS,
            Counter,
            bs.iter().map(|b| (backend_labels(b), b.connections)),
        )?;
        scalar_family(
            &mut enc,
            ACTIVE_CONNECTIONS,
            HELP_ACTIVE,
            Gauge,
            bs.iter().map(|b| (backend_labels(b), b.active)),
        )?;
        scalar_family(
            &mut enc,
            BYTES_TOTAL,
            HELP_BYTES,
            Counter,
            bs.iter().flat_map(|b| {
                [
                    (
                        backend_labels_and(b, LABEL_DIRECTION, TO_BACKEND),
                        b.bytes_to_backend,
                    ),
                    (
                        backend_labels_and(b, LABEL_DIRECTION, TO_CLIENT),
                        b.bytes_to_client,
                    ),
                ]
            }),
        )?;
        scalar_family(
            &mut enc,
            CONNECT_ERRORS_TOTAL,
            HELP_CONNECT_ERRORS,
            Counter,
            bs.iter().map(|b| (backend_labels(b), b.connect_errors)),
        )?;
        scalar_family(
            &mut enc,
            NO_BACKEND_TOTAL,
            HELP_NO_BACKEND,
            Counter,
            ss.iter().map(|s| (service_labels(s), s.no_backend)),
        )?;
        scalar_family(
            &mut enc,
            BACKEND_UP,
            HELP_UP,
            Gauge,
            bs.iter().map(|b| (backend_labels(b), u64::from(b.up))),
        )?;
        scalar_family(
            &mut enc,
            HEALTH_CHECKS_TOTAL,
            HELP_CHECKS,
            Counter,
            bs.iter().flat_map(|b| {
                [
                    (backend_labels_and(b, LABEL_RESULT, PASS), b.checks_pass),
                    (backend_labels_and(b, LABEL_RESULT, FAIL), b.checks_fail),
                ]
            }),
        )?;

        {
            let mut family = enc.encode_descriptor(
                CONNECT_DURATION_SECONDS,
                HELP_CONNECT_DURATION,
                None,
                MetricType::Histogram,
            )?;
            for b in bs {
                // Bounds come from the constant, so `+Inf` is always present
                // even if a hand-built snapshot has a short bucket vector.
                let buckets: Vec<(f64, u64)> = CONNECT_BUCKETS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY])
                    .enumerate()
                    .map(|(i, bound)| (bound, b.connect_buckets.get(i).copied().unwrap_or(0)))
                    .collect();
                let count = buckets.iter().fold(0u64, |a, &(_, n)| a.wrapping_add(n));
                let labels = backend_labels(b);
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(b.connect_sum_seconds, count, &buckets, None)?;
            }
        }

        scalar_family(
            &mut enc,
            UDP_DATAGRAMS_TOTAL,
            HELP_UDP_DATAGRAMS,
            Counter,
            ss.iter().flat_map(|s| {
                [
                    (
                        service_labels_and(s, LABEL_DIRECTION, TO_BACKEND),
                        s.udp_to_backend,
                    ),
                    (
                        service_labels_and(s, LABEL_DIRECTION, TO_CLIENT),
                        s.udp_to_client,
                    ),
                    (
                        service_labels_and(s, LABEL_DIRECTION, DROPPED),
                        s.udp_dropped,
                    ),
                ]
            }),
        )?;
        scalar_family(
            &mut enc,
            UDP_SESSIONS,
            HELP_UDP_SESSIONS,
            Gauge,
            ss.iter().map(|s| (service_labels(s), s.udp_sessions)),
        )?;
        scalar_family(
            &mut enc,
            DNS_QUERIES_TOTAL,
            HELP_DNS,
            Counter,
            ss.iter().flat_map(|s| {
                [
                    (
                        service_labels_and(s, LABEL_RESULT, ANSWERED),
                        s.dns_answered,
                    ),
                    (service_labels_and(s, LABEL_RESULT, TIMEOUT), s.dns_timeout),
                    (
                        service_labels_and(s, LABEL_RESULT, ORPHAN_REPLY),
                        s.dns_orphan_reply,
                    ),
                ]
            }),
        )?;
        scalar_family(
            &mut enc,
            CONFIG_RELOADS_TOTAL,
            HELP_RELOADS,
            Counter,
            [
                ([(LABEL_RESULT, SUCCESS)], self.reloads_success),
                ([(LABEL_RESULT, FAILURE)], self.reloads_failure),
            ],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_backend() -> (
        GlobalMetrics,
        Vec<Arc<ServiceMetrics>>,
        Vec<Arc<BackendMetrics>>,
    ) {
        let s = Arc::new(ServiceMetrics::new("web", 2));
        let b = Arc::new(BackendMetrics::new("web", "10.0.0.1:443", 2));
        (GlobalMetrics::default(), vec![s], vec![b])
    }

    #[test]
    fn no_family_name_gets_a_second_suffix() {
        let (g, s, b) = one_backend();
        let text = encode(&g, &s, &b);
        assert!(!text.contains("_total_total"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
    }

    #[cfg(not(feature = "counters-off"))] // the values stay 0 then
    #[test]
    fn duplicate_label_sets_are_merged() {
        let (g, mut s, mut b) = one_backend();
        b[0].connections.add(0, 2);
        b[0].active.add(0, 3);
        b[0].up.store(false, Ordering::Relaxed);
        b[0].connect_duration.observe_nanos(1, 1_000);
        let b2 = Arc::new(BackendMetrics::new("web", "10.0.0.1:443", 2));
        b2.connections.add(1, 5);
        b2.active.add(1, -1);
        b2.connect_duration.observe_nanos(0, 2_000_000_000);
        b.push(b2);
        s.push(Arc::new(ServiceMetrics::new("web", 2)));
        s[0].udp_sessions.inc(0);
        s[1].udp_sessions.add(0, 2);

        let snap = Snapshot::take(&g, &s, &b);
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.services[0].udp_sessions, 3);
        assert_eq!(snap.backends.len(), 1);
        let m = &snap.backends[0];
        assert_eq!(m.connections, 7);
        assert_eq!(m.active, 2);
        assert!(m.up, "one copy is up");
        assert_eq!(m.connect_count(), 2);

        let text = snap.to_text();
        let series = "sluice_connections_total{service=\"web\",backend=\"10.0.0.1:443\"}";
        assert_eq!(text.matches(series).count(), 1, "{text}");
    }

    #[test]
    fn negative_gauge_sums_are_clamped() {
        let (g, s, b) = one_backend();
        b[0].active.dec(1);
        s[0].udp_sessions.add(0, -4);
        let text = encode(&g, &s, &b);
        assert!(
            text.contains(
                "sluice_active_connections{service=\"web\",backend=\"10.0.0.1:443\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("sluice_udp_sessions{service=\"web\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let g = GlobalMetrics::default();
        let s = vec![Arc::new(ServiceMetrics::new("we\"ird\\na\nme", 1))];
        let text = encode(&g, &s, &[]);
        assert!(
            text.contains(r#"sluice_udp_sessions{service="we\"ird\\na\nme"} 0"#),
            "{text}"
        );
    }
}
