//! Health checking: the rise/fall state machine of each backend, the
//! schedule of active checks, and the probes themselves.
//!
//! The rule: the machine ([`Machine`], [`HealthTable`]) is pure. Events go
//! in (a check passed or failed, a worker saw a connect fail or recover),
//! transitions come out; it never touches a socket or a clock, so it is
//! tested without either. The schedule ([`first_due`], [`next_due`]) takes
//! time as an argument. Only the probes ([`probe`]) and the checker tasks
//! ([`spawn_checkers`]) do I/O; they run as tasks on the control thread's
//! tokio runtime and never block it: every probe is bounded by the check's
//! `timeout`, and results go back to the control loop over a channel.
//!
//! Semantics (SPEC.md "health_check"):
//!
//! - Backends start up.
//! - An up backend goes down after `fall` consecutive failed checks; a down
//!   backend comes back after `rise` consecutive passing checks.
//! - Passive ejection: the workers report every failed connect to a backend
//!   (refused, timed out, or reset/closed before any byte moved). `fall`
//!   consecutive such failures, counted across all workers, mark the
//!   backend down at once, without waiting for the next active check; the
//!   active checks bring it back after `rise` passes. A successful connect
//!   (`ConnectRecovered`) or a passing check resets that count. Active and
//!   passive failures are counted separately.
//! - `kind: none`: no active checks, and so no passive ejection either
//!   (nothing could ever bring an ejected backend back): every backend of
//!   such a service is always up.
//!
//! ```
//! use sluice_control::health::{Event, Machine, Policy, Transition};
//!
//! let mut m = Machine::new(Policy { rise: 2, fall: 3, checks: true });
//! assert_eq!(m.on(Event::Fail("connection refused".into())), None);
//! assert_eq!(m.on(Event::Fail("connection refused".into())), None);
//! let down = m.on(Event::Fail("connection refused".into())).unwrap();
//! assert_eq!(down.to_string(), "DOWN (3 consecutive failures: connection refused)");
//! assert_eq!(m.on(Event::Pass), None);
//! assert!(matches!(m.on(Event::Pass), Some(Transition::Up(_))));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use sluice_config::{CheckKind, DnsQuery, HealthCheck, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

// ------------------------------------------------------------------ machine

/// What the rise/fall machine of a backend takes from its service's
/// `health_check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Consecutive passes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failures (of active checks, or of connects seen by the
    /// workers) that take an up backend down.
    pub fall: u32,
    /// Active checks run (`kind` is not `none`). Passive ejection is on
    /// exactly when this is.
    pub checks: bool,
}

impl Policy {
    pub fn of(hc: &HealthCheck) -> Policy {
        Policy {
            rise: hc.rise.get(),
            fall: hc.fall.get(),
            checks: hc.kind != CheckKind::None,
        }
    }
}

/// Something observed about one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An active check passed.
    Pass,
    /// An active check failed, and why (`connection refused`, ...).
    Fail(String),
    /// A worker failed to connect to the backend for a client, and why.
    ConnectFailed(String),
    /// A worker connected to the backend again after failures.
    ConnectRecovered,
}

/// Why a backend came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpCause {
    /// `rise` consecutive passing checks (the count).
    Passes(u32),
    /// The service's checks were turned off (`kind: none`) by a reload.
    ChecksOff,
}

/// A change of a backend's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Up(UpCause),
    Down {
        /// How many consecutive failures it took.
        failures: u32,
        /// The last failure's reason.
        why: String,
        /// Seen by the workers on client connects (passive ejection), not
        /// by an active check.
        traffic: bool,
    },
}

impl Transition {
    pub fn is_up(&self) -> bool {
        matches!(self, Transition::Up(_))
    }
}

fn plural(n: u32, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

impl fmt::Display for Transition {
    /// `UP (2 consecutive passes)`, `DOWN (3 consecutive failures:
    /// connection refused)`, `DOWN (3 consecutive connect failures in
    /// traffic: connection refused)`, `UP (health checks are off)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transition::Up(UpCause::Passes(n)) => {
                write!(f, "UP ({n} consecutive {})", plural(*n, "pass", "passes"))
            }
            Transition::Up(UpCause::ChecksOff) => f.write_str("UP (health checks are off)"),
            Transition::Down {
                failures,
                why,
                traffic: false,
            } => {
                write!(
                    f,
                    "DOWN ({failures} consecutive {}: {why})",
                    plural(*failures, "failure", "failures")
                )
            }
            Transition::Down {
                failures,
                why,
                traffic: true,
            } => write!(
                f,
                "DOWN ({failures} consecutive connect {} in traffic: {why})",
                plural(*failures, "failure", "failures")
            ),
        }
    }
}

/// The rise/fall state of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    policy: Policy,
    up: bool,
    /// Consecutive passing checks (counted while down).
    passes: u32,
    /// Consecutive failed checks.
    fails: u32,
    /// Consecutive failed connects reported by the workers.
    traffic_fails: u32,
}

impl Machine {
    /// A backend that starts up (SPEC: "Backends start as up").
    pub fn new(policy: Policy) -> Machine {
        Machine {
            policy,
            up: true,
            passes: 0,
            fails: 0,
            traffic_fails: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Apply one event; returns the transition it caused, if any.
    pub fn on(&mut self, event: Event) -> Option<Transition> {
        match event {
            Event::Pass => {
                self.fails = 0;
                self.traffic_fails = 0;
                if self.up {
                    return None;
                }
                self.passes += 1;
                (self.passes >= self.policy.rise).then(|| {
                    let n = self.passes;
                    self.set(true);
                    Transition::Up(UpCause::Passes(n))
                })
            }
            Event::Fail(why) => {
                self.passes = 0;
                self.fails = self.fails.saturating_add(1);
                (self.up && self.fails >= self.policy.fall).then(|| {
                    let failures = self.fails;
                    self.set(false);
                    Transition::Down {
                        failures,
                        why,
                        traffic: false,
                    }
                })
            }
            Event::ConnectFailed(why) => {
                if !self.policy.checks || !self.up {
                    // Off without active checks (nothing would bring the
                    // backend back); already down: nothing more to learn
                    // (workers may still be using routes that have it).
                    return None;
                }
                self.traffic_fails = self.traffic_fails.saturating_add(1);
                (self.traffic_fails >= self.policy.fall).then(|| {
                    let failures = self.traffic_fails;
                    self.set(false);
                    Transition::Down {
                        failures,
                        why,
                        traffic: true,
                    }
                })
            }
            Event::ConnectRecovered => {
                self.traffic_fails = 0;
                None
            }
        }
    }

    /// A new policy (reload). Up/down is kept and the streaks start over;
    /// a down backend whose service no longer runs checks comes up.
    pub fn set_policy(&mut self, policy: Policy) -> Option<Transition> {
        self.policy = policy;
        self.passes = 0;
        self.fails = 0;
        self.traffic_fails = 0;
        if !policy.checks && !self.up {
            self.up = true;
            return Some(Transition::Up(UpCause::ChecksOff));
        }
        None
    }

    fn set(&mut self, up: bool) {
        self.up = up;
        self.passes = 0;
        self.fails = 0;
        self.traffic_fails = 0;
    }
}

/// The machines of every backend of every service, keyed by service name
/// and resolved backend address, so health survives reloads.
#[derive(Debug, Default)]
pub struct HealthTable {
    services: HashMap<String, ServiceHealth>,
}

#[derive(Debug)]
struct ServiceHealth {
    policy: Policy,
    backends: HashMap<SocketAddr, Machine>,
}

impl HealthTable {
    pub fn new() -> HealthTable {
        HealthTable::default()
    }

    /// Set up (or update, on reload) the machines of `service`: backends
    /// that stay keep their up/down state, new ones start up, removed ones
    /// are forgotten. Returns the transitions this causes (backends that
    /// come up because the service's checks were turned off).
    pub fn configure(&mut self, service: &Service) -> Vec<(SocketAddr, Transition)> {
        let policy = Policy::of(&service.health_check);
        let entry = self
            .services
            .entry(service.name.clone())
            .or_insert_with(|| ServiceHealth {
                policy,
                backends: HashMap::new(),
            });
        let mut transitions = Vec::new();
        let mut backends = HashMap::with_capacity(service.backends.len());
        for b in &service.backends {
            let machine = match entry.backends.remove(&b.addr) {
                Some(mut m) => {
                    if m.policy() != policy {
                        if let Some(t) = m.set_policy(policy) {
                            transitions.push((b.addr, t));
                        }
                    }
                    m
                }
                None => Machine::new(policy),
            };
            backends.insert(b.addr, machine);
        }
        entry.policy = policy;
        entry.backends = backends;
        transitions
    }

    /// Forget a service and its backends.
    pub fn remove(&mut self, service: &str) {
        self.services.remove(service);
    }

    /// Apply `event` to one backend; `None` for a backend or service that
    /// is not configured (a late report after a reload removed it).
    pub fn observe(&mut self, service: &str, addr: SocketAddr, event: Event) -> Option<Transition> {
        self.services
            .get_mut(service)?
            .backends
            .get_mut(&addr)?
            .on(event)
    }

    /// Whether the backend is up; `None` if it is not configured.
    pub fn is_up(&self, service: &str, addr: SocketAddr) -> Option<bool> {
        self.services
            .get(service)?
            .backends
            .get(&addr)
            .map(Machine::is_up)
    }

    pub fn policy(&self, service: &str) -> Option<Policy> {
        self.services.get(service).map(|s| s.policy)
    }
}

// ----------------------------------------------------------------- schedule

/// The shortest interval the scheduler uses (a guard: config validation
/// already refuses a zero interval).
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// When the first check of backend `index` (of `count`) of a service runs:
/// the checks are spread evenly over the first interval from `start`, so
/// the backends of a service are not all probed at the same instant.
pub fn first_due(start: Instant, interval: Duration, index: usize, count: usize) -> Instant {
    let count = count.max(1) as u32;
    let index = (index as u32).min(count - 1);
    start + interval.max(MIN_INTERVAL) / count * index
}

/// When the next check runs, given that the last one was due at `due` and
/// finished at `now`: one interval after `due`; if the check ran so long
/// that this time has passed, the first slot of the same grid after `now`
/// (missed slots are skipped, checks never pile up or run back to back).
pub fn next_due(due: Instant, interval: Duration, now: Instant) -> Instant {
    let interval = interval.max(MIN_INTERVAL);
    let next = due + interval;
    if next > now {
        return next;
    }
    let behind = now.duration_since(due);
    let slots = behind.as_nanos() / interval.as_nanos() + 1;
    due + interval * u32::try_from(slots).unwrap_or(u32::MAX)
}

/// The result of one check: `Err` carries the reason, one short line.
pub type Outcome = Result<(), String>;

/// Run checks forever: wait until each is due, run `probe` bounded by
/// `timeout`, hand the outcome to `report` (which returns false to stop),
/// schedule the next one with [`next_due`]. Time comes from tokio's clock,
/// so a paused test runtime drives it virtually.
pub async fn run_checker<P, F, R>(
    first: tokio::time::Instant,
    interval: Duration,
    timeout: Duration,
    mut probe: P,
    mut report: R,
) where
    P: FnMut() -> F,
    F: Future<Output = Outcome>,
    R: FnMut(Outcome) -> bool,
{
    let mut due = first;
    loop {
        tokio::time::sleep_until(due).await;
        let outcome = match tokio::time::timeout(timeout, probe()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {}", show_duration(timeout))),
        };
        if !report(outcome) {
            return;
        }
        let now = tokio::time::Instant::now();
        due = tokio::time::Instant::from_std(next_due(due.into_std(), interval, now.into_std()));
    }
}

fn show_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{d:?}")
    }
}

/// One check result, sent from a checker task to the control loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub service: String,
    /// The checker generation of the service that produced it; reports of
    /// an older generation (before a reload restarted the checkers) are
    /// dropped.
    pub generation: u64,
    pub backend: SocketAddr,
    pub outcome: Outcome,
}

/// Start one checker task per backend of `service` (none for `kind:
/// none`) on the current tokio runtime. Abort the handles to stop them.
pub fn spawn_checkers(
    service: &Service,
    generation: u64,
    tx: &UnboundedSender<CheckReport>,
) -> Vec<JoinHandle<()>> {
    let hc = &service.health_check;
    if hc.kind == CheckKind::None {
        return Vec::new();
    }
    let start = Instant::now();
    let count = service.backends.len();
    service
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let first = tokio::time::Instant::from_std(first_due(start, hc.interval, i, count));
            let kind = hc.kind.clone();
            let addr = b.addr;
            let name = service.name.clone();
            let tx = tx.clone();
            let report = move |outcome| {
                tx.send(CheckReport {
                    service: name.clone(),
                    generation,
                    backend: addr,
                    outcome,
                })
                .is_ok()
            };
            tokio::spawn(run_checker(
                first,
                hc.interval,
                hc.timeout,
                move || probe(kind.clone(), addr),
                report,
            ))
        })
        .collect()
}

// ------------------------------------------------------------------- probes

/// Run one check of `kind` against `addr` (unbounded: the caller applies
/// the timeout).
pub async fn probe(kind: CheckKind, addr: SocketAddr) -> Outcome {
    match kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => tcp_probe(addr).await,
        CheckKind::SendExpect { send, expect } => send_expect_probe(addr, &send, &expect).await,
        CheckKind::Dns(query) => dns_probe(addr, &query).await,
    }
}

/// A short, lowercase reason for an I/O error (`connection refused`).
pub fn describe(e: &io::Error) -> String {
    use io::ErrorKind as K;
    let fixed = match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::TimedOut => "timed out",
        K::BrokenPipe => "connection closed while sending",
        K::UnexpectedEof => "connection closed",
        _ => "",
    };
    if !fixed.is_empty() {
        return fixed.to_string();
    }
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => "error".to_string(),
    }
}

async fn connect(addr: SocketAddr) -> Result<tokio::net::TcpStream, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| describe(&e))?;
    // Close with a reset: a check leaves no TIME_WAIT behind (as HAProxy's
    // checks do).
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    Ok(stream)
}

/// `tcp`: the connect succeeds, i.e. the handshake completes. A reset
/// reported by the connect itself (`ECONNRESET`, not `ECONNREFUSED`) came
/// after the handshake had completed (the backend accepted, then reset
/// before the connect call returned): that passes too, so the outcome does
/// not depend on who was scheduled first.
async fn tcp_probe(addr: SocketAddr) -> Outcome {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(describe(&e)),
    }
}

/// `send_expect`: connect, send `send`, and the first bytes received start
/// with `expect`.
async fn send_expect_probe(addr: SocketAddr, send: &[u8], expect: &[u8]) -> Outcome {
    let mut stream = connect(addr).await?;
    stream.write_all(send).await.map_err(|e| describe(&e))?;
    let mut got = Vec::with_capacity(expect.len());
    let mut buf = [0u8; 512];
    while got.len() < expect.len() {
        let n = stream.read(&mut buf).await.map_err(|e| describe(&e))?;
        if n == 0 {
            return Err(if got.is_empty() {
                "connection closed without a reply".to_string()
            } else {
                format!("connection closed after \"{}\"", got.escape_ascii())
            });
        }
        got.extend_from_slice(&buf[..n]);
        if !expect.starts_with(&got[..got.len().min(expect.len())]) {
            break;
        }
    }
    expect_verdict(&got, expect)
}

/// Pass when `got` starts with `expect`.
pub fn expect_verdict(got: &[u8], expect: &[u8]) -> Outcome {
    if got.starts_with(expect) {
        Ok(())
    } else {
        let shown = &got[..got.len().min(expect.len().max(16))];
        Err(format!(
            "unexpected reply \"{}\", expected \"{}\"",
            shown.escape_ascii(),
            expect.escape_ascii()
        ))
    }
}

/// `dns`: a recursive query for the configured name and type over UDP with
/// a random ID; passes on the reply with that ID when its RCODE is
/// NOERROR. Other datagrams are ignored.
async fn dns_probe(addr: SocketAddr, query: &DnsQuery) -> Outcome {
    let local: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = tokio::net::UdpSocket::bind((local, 0))
        .await
        .map_err(|e| describe(&e))?;
    // Connected: replies from anyone else are filtered by the kernel, and an
    // ICMP port unreachable fails the check at once (connection refused).
    socket.connect(addr).await.map_err(|e| describe(&e))?;
    let id = Message::query().metadata.id; // hickory's random ID
    let wire = dns_query_bytes(id, query)?;
    socket.send(&wire).await.map_err(|e| describe(&e))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| describe(&e))?;
        if let Some(verdict) = dns_verdict(id, &buf[..n]) {
            return verdict;
        }
    }
}

/// The wire form of the health query: ID `id`, RD set, one question.
pub fn dns_query_bytes(id: u16, query: &DnsQuery) -> Result<Vec<u8>, String> {
    let name = Name::from_ascii(&query.name)
        .map_err(|e| format!("bad query name {:?}: {e}", query.name))?;
    let qtype = RecordType::from_str(&query.qtype)
        .map_err(|e| format!("bad query type {:?}: {e}", query.qtype))?;
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name, qtype));
    message
        .to_vec()
        .map_err(|e| format!("cannot encode the query: {e}"))
}

/// What a datagram says about the query with ID `id`: `None` when it is not
/// the reply to it (another ID, not a response, not DNS), else pass on
/// NOERROR or fail with the RCODE.
pub fn dns_verdict(id: u16, datagram: &[u8]) -> Option<Outcome> {
    let reply = Message::from_vec(datagram).ok()?;
    if reply.metadata.id != id || reply.metadata.message_type != MessageType::Response {
        return None;
    }
    Some(match reply.metadata.response_code {
        ResponseCode::NoError => Ok(()),
        code => Err(format!("answered {}", rcode_name(code))),
    })
}

/// The conventional upper-case mnemonic of an RCODE (`SERVFAIL`).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE {}", u16::from(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rise: u32, fall: u32) -> Policy {
        Policy {
            rise,
            fall,
            checks: true,
        }
    }

    fn fail() -> Event {
        Event::Fail("connection refused".into())
    }

    fn refused() -> Event {
        Event::ConnectFailed("connection refused".into())
    }

    #[test]
    fn starts_up_and_falls_after_fall_failures() {
        let mut m = Machine::new(policy(2, 3));
        assert!(m.is_up());
        assert_eq!(m.on(fail()), None);
        assert_eq!(m.on(fail()), None);
        assert_eq!(
            m.on(fail()),
            Some(Transition::Down {
                failures: 3,
                why: "connection refused".into(),
                traffic: false
            })
        );
        assert!(!m.is_up());
        // More failures while down change nothing.
        assert_eq!(m.on(fail()), None);
    }

    #[test]
    fn a_pass_breaks_a_failure_streak() {
        let mut m = Machine::new(policy(2, 3));
        for _ in 0..10 {
            assert_eq!(m.on(fail()), None);
            assert_eq!(m.on(fail()), None);
            assert_eq!(m.on(Event::Pass), None);
        }
        assert!(m.is_up());
    }

    #[test]
    fn rises_after_rise_consecutive_passes() {
        let mut m = Machine::new(policy(3, 1));
        assert!(m.on(fail()).is_some());
        assert_eq!(m.on(Event::Pass), None);
        assert_eq!(m.on(Event::Pass), None);
        // A failure restarts the count.
        assert_eq!(m.on(fail()), None);
        assert_eq!(m.on(Event::Pass), None);
        assert_eq!(m.on(Event::Pass), None);
        assert_eq!(m.on(Event::Pass), Some(Transition::Up(UpCause::Passes(3))));
        assert!(m.is_up());
        // And it takes `fall` failures again to go down.
        assert!(m.on(fail()).is_some());
    }

    #[test]
    fn rise_and_fall_of_one() {
        let mut m = Machine::new(policy(1, 1));
        assert!(matches!(
            m.on(fail()),
            Some(Transition::Down { failures: 1, .. })
        ));
        assert_eq!(m.on(Event::Pass), Some(Transition::Up(UpCause::Passes(1))));
    }

    #[test]
    fn passive_ejection_after_fall_connect_failures() {
        let mut m = Machine::new(policy(2, 3));
        assert_eq!(m.on(refused()), None);
        assert_eq!(m.on(refused()), None);
        let t = m.on(refused()).unwrap();
        assert_eq!(
            t,
            Transition::Down {
                failures: 3,
                why: "connection refused".into(),
                traffic: true
            }
        );
        assert_eq!(
            t.to_string(),
            "DOWN (3 consecutive connect failures in traffic: connection refused)"
        );
        // Connect failures while down (workers on old routes) are ignored...
        assert_eq!(m.on(refused()), None);
        // ...and active checks bring it back after `rise` passes.
        assert_eq!(m.on(Event::Pass), None);
        assert_eq!(m.on(Event::Pass), Some(Transition::Up(UpCause::Passes(2))));
    }

    #[test]
    fn recovery_or_a_pass_resets_the_passive_count() {
        let mut m = Machine::new(policy(2, 3));
        m.on(refused());
        m.on(refused());
        m.on(Event::ConnectRecovered);
        assert_eq!(m.on(refused()), None);
        assert_eq!(m.on(refused()), None);
        assert_eq!(m.on(Event::Pass), None);
        assert_eq!(m.on(refused()), None);
        assert_eq!(m.on(refused()), None);
        assert!(m.on(refused()).is_some());
    }

    #[test]
    fn active_and_passive_failures_count_separately() {
        let mut m = Machine::new(policy(2, 3));
        m.on(fail());
        m.on(fail());
        m.on(refused());
        m.on(refused());
        assert!(m.is_up());
    }

    #[test]
    fn no_passive_ejection_without_checks() {
        let mut m = Machine::new(Policy {
            rise: 2,
            fall: 1,
            checks: false,
        });
        for _ in 0..100 {
            assert_eq!(m.on(refused()), None);
        }
        assert!(m.is_up());
    }

    #[test]
    fn turning_checks_off_brings_a_down_backend_up() {
        let mut m = Machine::new(policy(2, 1));
        m.on(fail());
        assert_eq!(
            m.set_policy(Policy {
                rise: 2,
                fall: 1,
                checks: false
            }),
            Some(Transition::Up(UpCause::ChecksOff))
        );
        assert!(m.is_up());
        // A new policy with checks keeps the state and restarts the streaks.
        let mut m = Machine::new(policy(2, 3));
        m.on(fail());
        m.on(fail());
        assert_eq!(m.set_policy(policy(2, 3)), None);
        assert_eq!(m.on(fail()), None);
        assert!(m.is_up());
    }

    #[test]
    fn transition_texts() {
        assert_eq!(
            Transition::Up(UpCause::Passes(2)).to_string(),
            "UP (2 consecutive passes)"
        );
        assert_eq!(
            Transition::Up(UpCause::Passes(1)).to_string(),
            "UP (1 consecutive pass)"
        );
        assert_eq!(
            Transition::Up(UpCause::ChecksOff).to_string(),
            "UP (health checks are off)"
        );
        let down = Transition::Down {
            failures: 1,
            why: "timed out".into(),
            traffic: false,
        };
        assert_eq!(down.to_string(), "DOWN (1 consecutive failure: timed out)");
    }

    fn service(yaml_backends: &[&str], check: &str) -> Service {
        let mut yaml = format!(
            "services:\n  - name: web\n    protocol: tcp\n    listen: [\"127.0.0.1:1\"]\n    health_check: {check}\n    backends:\n"
        );
        for b in yaml_backends {
            yaml.push_str(&format!("      - address: {b}\n"));
        }
        sluice_config::load_str(&yaml, "t.yaml")
            .unwrap()
            .services
            .remove(0)
    }

    #[test]
    fn table_keeps_health_of_staying_backends_across_reconfigure() {
        let a: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:9003".parse().unwrap();
        let mut t = HealthTable::new();
        let svc = service(
            &["127.0.0.1:9001", "127.0.0.1:9002"],
            "{ kind: tcp, fall: 1 }",
        );
        assert!(t.configure(&svc).is_empty());
        assert!(t.observe("web", a, fail()).is_some());
        assert_eq!(t.is_up("web", a), Some(false));
        // Reload: b removed, c added, same checks.
        let svc = service(
            &["127.0.0.1:9001", "127.0.0.1:9003"],
            "{ kind: tcp, fall: 1 }",
        );
        assert!(t.configure(&svc).is_empty());
        assert_eq!(t.is_up("web", a), Some(false));
        assert_eq!(t.is_up("web", b), None);
        assert_eq!(t.is_up("web", c), Some(true));
        assert_eq!(
            t.observe("web", b, fail()),
            None,
            "a removed backend is ignored"
        );
        assert_eq!(t.observe("nope", a, fail()), None);
        // Checks turned off: the down backend comes up.
        let svc = service(&["127.0.0.1:9001", "127.0.0.1:9003"], "{ kind: none }");
        assert_eq!(
            t.configure(&svc),
            vec![(a, Transition::Up(UpCause::ChecksOff))]
        );
        assert_eq!(t.policy("web").map(|p| p.checks), Some(false));
        t.remove("web");
        assert_eq!(t.is_up("web", a), None);
    }

    // ------------------------------------------------------------ schedule

    #[test]
    fn first_checks_are_spread_over_one_interval() {
        let t0 = Instant::now();
        let i = Duration::from_secs(2);
        let due: Vec<Duration> = (0..4).map(|k| first_due(t0, i, k, 4) - t0).collect();
        assert_eq!(due, [0, 500, 1000, 1500].map(Duration::from_millis));
        assert_eq!(first_due(t0, i, 0, 0), t0);
    }

    #[test]
    fn next_due_keeps_the_grid_and_skips_missed_slots() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let i = ms(200);
        // A quick check: one interval after the due time, not after "now".
        assert_eq!(next_due(t0, i, t0 + ms(30)) - t0, ms(200));
        // A check that ran exactly one interval: the next slot after now.
        assert_eq!(next_due(t0, i, t0 + ms(200)) - t0, ms(400));
        // One that ran 2.5 intervals: slots at 200 and 400 are skipped.
        assert_eq!(next_due(t0, i, t0 + ms(500)) - t0, ms(600));
    }

    #[tokio::test(start_paused = true)]
    async fn checker_runs_on_schedule_on_a_virtual_clock() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let start = tokio::time::Instant::now();
        let calls: Rc<RefCell<Vec<Duration>>> = Rc::default();
        let outcomes: Rc<RefCell<Vec<Outcome>>> = Rc::default();
        let (c, o) = (calls.clone(), outcomes.clone());
        // Every third check hangs past the timeout.
        let n = Rc::new(RefCell::new(0u32));
        run_checker(
            start + Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_millis(300),
            move || {
                c.borrow_mut().push(start.elapsed());
                let k = {
                    let mut n = n.borrow_mut();
                    *n += 1;
                    *n
                };
                async move {
                    if k % 3 == 0 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Ok(())
                }
            },
            move |outcome| {
                o.borrow_mut().push(outcome);
                o.borrow().len() < 6
            },
        )
        .await;
        let ms = Duration::from_millis;
        assert_eq!(*calls.borrow(), [100, 1100, 2100, 3100, 4100, 5100].map(ms));
        let fails: Vec<usize> = outcomes
            .borrow()
            .iter()
            .enumerate()
            .filter(|(_, o)| o.is_err())
            .map(|(k, _)| k)
            .collect();
        assert_eq!(fails, [2, 5]);
        assert_eq!(
            outcomes.borrow()[2],
            Err("no answer within 300ms".to_string())
        );
        assert_eq!(start.elapsed(), ms(5400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_check_skips_slots_instead_of_piling_up() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let start = tokio::time::Instant::now();
        let calls: Rc<RefCell<Vec<Duration>>> = Rc::default();
        let c = calls.clone();
        let mut reports = 0;
        run_checker(
            start,
            Duration::from_millis(200),
            Duration::from_millis(500),
            move || {
                c.borrow_mut().push(start.elapsed());
                async {
                    tokio::time::sleep(Duration::from_millis(450)).await;
                    Ok(())
                }
            },
            |_| {
                reports += 1;
                reports < 3
            },
        )
        .await;
        assert_eq!(*calls.borrow(), [0, 600, 1200].map(Duration::from_millis));
    }

    // -------------------------------------------------------------- probes

    #[test]
    fn describe_io_errors_briefly() {
        assert_eq!(
            describe(&io::ErrorKind::ConnectionRefused.into()),
            "connection refused"
        );
        assert_eq!(
            describe(&io::Error::from_raw_os_error(libc::EHOSTUNREACH)),
            "no route to host"
        );
    }

    #[test]
    fn expect_compares_the_first_bytes() {
        assert_eq!(expect_verdict(b"+PONG\r\n", b"+PONG"), Ok(()));
        assert_eq!(
            expect_verdict(b"-ERR", b"+PONG"),
            Err("unexpected reply \"-ERR\", expected \"+PONG\"".to_string())
        );
    }

    #[test]
    fn dns_query_and_verdicts() {
        let q = DnsQuery {
            name: "health.example.".into(),
            qtype: "AAAA".into(),
        };
        let wire = dns_query_bytes(0x1234, &q).unwrap();
        let m = Message::from_vec(&wire).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.metadata.message_type, MessageType::Query);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].name().to_ascii(), "health.example.");
        assert_eq!(m.queries[0].query_type(), RecordType::AAAA);

        let reply = |id, code| {
            let mut r = Message::response(id, OpCode::Query);
            r.metadata.response_code = code;
            r.to_vec().unwrap()
        };
        assert_eq!(
            dns_verdict(0x1234, &reply(0x1234, ResponseCode::NoError)),
            Some(Ok(()))
        );
        assert_eq!(
            dns_verdict(0x1234, &reply(0x1234, ResponseCode::ServFail)),
            Some(Err("answered SERVFAIL".to_string()))
        );
        assert_eq!(
            dns_verdict(0x1234, &reply(0x4321, ResponseCode::NoError)),
            None,
            "another ID"
        );
        assert_eq!(dns_verdict(0x1234, &wire), None, "a query is not a reply");
        assert_eq!(dns_verdict(0x1234, b"junk"), None);
    }
}
