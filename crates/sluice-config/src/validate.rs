//! Stage two: raw serde structs -> the validated [`Config`]. Every problem
//! is recorded with its position and key path, and validation goes on, so
//! that one run reports all of a file's mistakes.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use crate::addr::{listen_conflict, Resolver};
use crate::error::{one_line, Diagnostic};
use crate::model::*;
use crate::pathindex::PathIndex;
use crate::raw::*;

/// Collects diagnostics for one file.
#[derive(Debug)]
pub(crate) struct Diags {
    file: String,
    pub(crate) list: Vec<Diagnostic>,
}

impl Diags {
    pub(crate) fn new(file: &str) -> Diags {
        Diags {
            file: file.to_owned(),
            list: Vec::new(),
        }
    }

    pub(crate) fn at_line(&mut self, line: usize, column: usize, path: &str, message: String) {
        self.list.push(Diagnostic {
            file: self.file.clone(),
            line: Some(line),
            column: Some(column),
            path: path.to_owned(),
            message: one_line(&message),
        });
    }

    pub(crate) fn at(&mut self, loc: Location, path: &str, message: impl AsRef<str>) {
        let (line, column) = if loc.line() == 0 {
            (None, None)
        } else {
            (
                usize::try_from(loc.line()).ok(),
                usize::try_from(loc.column()).ok(),
            )
        };
        self.list.push(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            path: path.to_owned(),
            message: one_line(message.as_ref()),
        });
    }
}

fn line_of(loc: Location) -> u64 {
    loc.line()
}

/// Typed values of the settings a service may take from `defaults:`;
/// `None` where the file does not set them (or set them wrongly, which has
/// been reported already).
#[derive(Debug, Default)]
struct Common {
    protocol: Option<Protocol>,
    balance: Option<Balance>,
    transfer: Option<Transfer>,
    proxy_protocol: Option<ProxyProtocol>,
    max_connections: Option<u32>,
    connect_timeout: Option<Duration>,
    connect_retries: Option<u32>,
    idle_timeout: Option<Duration>,
    access_log: Option<bool>,
    health_check: Option<CheckSpec>,
    udp: Option<UdpSettings>,
}

/// A parsed `health_check` block. `kind` is `None` when the block leaves it
/// to the service's protocol.
#[derive(Debug, Clone)]
struct CheckSpec {
    kind: Option<(CheckKind, Location)>,
    interval: Duration,
    timeout: Duration,
    rise: NonZeroU32,
    fall: NonZeroU32,
}

impl CheckSpec {
    fn build(&self, protocol: Protocol) -> HealthCheck {
        let kind = match &self.kind {
            Some((kind, _)) => kind.clone(),
            None => HealthCheck::default_for(protocol).kind,
        };
        HealthCheck {
            kind,
            interval: self.interval,
            timeout: self.timeout,
            rise: self.rise,
            fall: self.fall,
        }
    }

    /// Whether this block, given in `defaults:`, applies to a service of
    /// `protocol`: `tcp` and `send_expect` checks fit tcp services, `dns`
    /// fits udp services, `none` or no kind fits every service.
    fn fits(&self, protocol: Protocol) -> bool {
        match (&self.kind, protocol) {
            (None, _) | (Some((CheckKind::None, _)), _) => true,
            (Some((CheckKind::Tcp | CheckKind::SendExpect { .. }, _)), p) => p == Protocol::Tcp,
            (Some((CheckKind::Dns(_), _)), p) => p == Protocol::Udp,
        }
    }
}

pub(crate) struct Validator<'d> {
    d: &'d mut Diags,
    index: &'d PathIndex,
    resolver: Resolver,
}

/// Validates a deserialised file. `None` when anything was wrong (and then
/// `d` holds at least one diagnostic).
pub(crate) fn validate(raw: &Sp<RawConfig>, index: &PathIndex, d: &mut Diags) -> Option<Config> {
    let before = d.list.len();
    let mut v = Validator {
        d,
        index,
        resolver: Resolver::default(),
    };
    let config = v.config(raw);
    if v.d.list.len() > before {
        None
    } else {
        config
    }
}

impl Validator<'_> {
    fn err(&mut self, loc: Location, path: &str, message: impl AsRef<str>) {
        self.d.at(loc, path, message);
    }

    /// A required key is absent, or present with no value (`listen:` with
    /// nothing after it reads as null, the same as absent): report it at
    /// the key when it is written, else at the mapping that lacks it.
    fn missing(&mut self, parent: Location, parent_path: &str, key: &str, what: &str) {
        let path = if parent_path.is_empty() {
            key.to_owned()
        } else {
            format!("{parent_path}.{key}")
        };
        match self.index.key(&path) {
            Some((line, column)) => self.d.at_line(
                line,
                column,
                &path,
                format!("`{key}` has no value; expected {what}"),
            ),
            // At the top level there is no parent path to name: name the
            // missing key itself.
            None => self.err(
                parent,
                if parent_path.is_empty() {
                    key
                } else {
                    parent_path
                },
                format!("missing required key `{key}` ({what})"),
            ),
        }
    }

    fn config(&mut self, raw: &Sp<RawConfig>) -> Option<Config> {
        let r = &raw.value;
        let workers = r
            .workers
            .as_ref()
            .and_then(|w| self.workers(w))
            .unwrap_or(Workers::Auto);
        let admin = match &r.admin {
            Some(a) => self.admin(a),
            None => {
                // `admin:` with nothing after it: more likely a mistake than
                // a wish for no admin endpoint (leave the key out for that).
                if self.index.key("admin").is_some() {
                    self.missing(
                        raw.referenced,
                        "",
                        "admin",
                        "a mapping like `listen: 127.0.0.1:9100`",
                    );
                }
                None
            }
        };
        let shutdown_timeout = self
            .duration(&r.shutdown_timeout, "shutdown_timeout", false)
            .unwrap_or(defaults::SHUTDOWN_TIMEOUT);
        let defaults = match &r.defaults {
            Some(d) => self.defaults(d),
            None => Common::default(),
        };
        let Some(raw_services) = &r.services else {
            self.missing(
                raw.referenced,
                "",
                "services",
                "a list of services, each with name, protocol, listen and backends",
            );
            return None;
        };
        if raw_services.value.is_empty() {
            self.err(
                raw_services.referenced,
                "services",
                "must list at least one service",
            );
            return None;
        }
        let mut services = Vec::new();
        for (i, s) in raw_services.value.iter().enumerate() {
            if let Some(svc) = self.service(i, s, &defaults) {
                services.push((i, s, svc));
            }
        }
        self.cross_service_checks(&services, admin.as_ref(), r.admin.as_ref());
        Some(Config {
            workers,
            admin,
            shutdown_timeout,
            services: services.into_iter().map(|(_, _, s)| s).collect(),
        })
    }

    fn workers(&mut self, w: &Sp<Scalar>) -> Option<Workers> {
        let n = match &w.value {
            Scalar::Str(s) if s == "auto" => return Some(Workers::Auto),
            Scalar::Int(n) => Some(*n),
            Scalar::Str(s) => s.parse::<i128>().ok(),
            _ => None,
        };
        match n {
            Some(n) if (1..=defaults::MAX_WORKERS as i128).contains(&n) => usize::try_from(n)
                .ok()
                .and_then(NonZeroUsize::new)
                .map(Workers::Count),
            Some(n) if n > 0 => {
                self.err(
                    w.referenced,
                    "workers",
                    format!(
                        "expected `auto` or a number of workers from 1 to {}, got {n}",
                        defaults::MAX_WORKERS
                    ),
                );
                None
            }
            _ => {
                self.err(
                    w.referenced,
                    "workers",
                    format!(
                        "expected `auto` or a positive number of workers, got {}",
                        w.value.describe()
                    ),
                );
                None
            }
        }
    }

    fn admin(&mut self, a: &Sp<RawAdmin>) -> Option<Admin> {
        match &a.value.listen {
            None => {
                self.missing(
                    a.referenced,
                    "admin",
                    "listen",
                    "the admin HTTP address, like 127.0.0.1:9100",
                );
                None
            }
            Some(l) => self
                .address(l, "admin.listen")
                .map(|listen| Admin { listen }),
        }
    }

    // ---- scalar fields -------------------------------------------------

    fn text(&mut self, v: &Sp<Scalar>, path: &str, what: &str) -> Option<String> {
        match v.value.text() {
            Some(t) => Some(t),
            None => {
                self.err(
                    v.referenced,
                    path,
                    format!("expected {what}, got {}", v.value.describe()),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        v: &Field,
        path: &str,
        what: &str,
        all: &[T],
        parse: fn(&str) -> Option<T>,
        name: fn(T) -> &'static str,
    ) -> Option<T> {
        let v = v.as_ref()?;
        let names: Vec<&str> = all.iter().map(|x| name(*x)).collect();
        let expected = format!("expected one of: {}", names.join(", "));
        let Some(text) = v.value.text() else {
            let got = v.value.describe();
            self.err(
                v.referenced,
                path,
                format!("expected a {what} ({}), got {got}", names.join(", ")),
            );
            return None;
        };
        if let Some(x) = parse(&text) {
            return Some(x);
        }
        let hint = match parse(&text.to_ascii_lowercase()) {
            Some(x) => format!(" (did you mean {}?)", name(x)),
            None => crate::closest(&text, &names)
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default(),
        };
        self.err(
            v.referenced,
            path,
            format!("unknown {what} {text:?}; {expected}{hint}"),
        );
        None
    }

    /// A duration with a unit (`250ms`, `3s`, `5m`). `nonzero`: zero is an
    /// error.
    fn duration(&mut self, v: &Field, path: &str, nonzero: bool) -> Option<Duration> {
        let v = v.as_ref()?;
        const HINT: &str = "expected a duration with a unit, like \"3s\" or \"250ms\"";
        let d = match &v.value {
            Scalar::Str(s) => match humantime::parse_duration(s.trim()) {
                Ok(d) => d,
                Err(e) => {
                    let why = if s.trim().parse::<f64>().is_ok() {
                        "the unit is missing".to_owned()
                    } else {
                        match e {
                            humantime::DurationError::UnknownUnit { unit, .. } => {
                                format!("unknown unit {unit:?}; use ms, s, m, h or d")
                            }
                            humantime::DurationError::NumberOverflow => "too large".to_owned(),
                            humantime::DurationError::Empty => "it is empty".to_owned(),
                            _ => "not a number followed by a unit".to_owned(),
                        }
                    };
                    self.err(v.referenced, path, format!("{HINT}, got {s:?} ({why})"));
                    return None;
                }
            },
            Scalar::Int(_) | Scalar::Float(_) => {
                self.err(
                    v.referenced,
                    path,
                    format!(
                        "{HINT}, got the bare number {} (add a unit: ms, s, m, h)",
                        v.value.describe()
                    ),
                );
                return None;
            }
            other => {
                self.err(
                    v.referenced,
                    path,
                    format!("{HINT}, got {}", other.describe()),
                );
                return None;
            }
        };
        if nonzero && d.is_zero() {
            self.err(
                v.referenced,
                path,
                "must be greater than zero (a zero duration makes no sense here)",
            );
            return None;
        }
        Some(d)
    }

    /// An integer in `min..=max`.
    fn integer(&mut self, v: &Field, path: &str, min: u32, max: u32) -> Option<u32> {
        let v = v.as_ref()?;
        let n = match &v.value {
            Scalar::Int(n) => Some(*n),
            Scalar::Str(s) => s.trim().parse::<i128>().ok(),
            Scalar::Float(x) if x.fract() == 0.0 && x.abs() < 1e30 => Some(*x as i128),
            _ => None,
        };
        let range = if max == u32::MAX {
            format!("a whole number of at least {min}")
        } else {
            format!("a whole number between {min} and {max}")
        };
        match n {
            None => {
                self.err(
                    v.referenced,
                    path,
                    format!("expected {range}, got {}", v.value.describe()),
                );
                None
            }
            Some(n) if n < i128::from(min) || n > i128::from(max) => {
                let msg = if max == u32::MAX {
                    format!("must be at least {min}, got {n}")
                } else {
                    format!("must be between {min} and {max}, got {n}")
                };
                self.err(v.referenced, path, msg);
                None
            }
            Some(n) => u32::try_from(n).ok(),
        }
    }

    fn boolean(&mut self, v: &Field, path: &str) -> Option<bool> {
        let v = v.as_ref()?;
        match v.value {
            Scalar::Bool(b) => Some(b),
            _ => {
                self.err(
                    v.referenced,
                    path,
                    format!("expected true or false, got {}", v.value.describe()),
                );
                None
            }
        }
    }

    fn address(&mut self, v: &Sp<Scalar>, path: &str) -> Option<SocketAddr> {
        let text = self.text(v, path, "an address (IP:port, [v6]:port or host:port)")?;
        match self.resolver.parse(&text) {
            Ok(a) => Some(a),
            Err(msg) => {
                self.err(v.referenced, path, msg);
                None
            }
        }
    }

    // ---- shared service settings --------------------------------------

    fn common(&mut self, c: CommonRef<'_>, path: &str) -> Common {
        let p = |k: &str| format!("{path}.{k}");
        Common {
            protocol: self.choice(
                c.protocol,
                &p("protocol"),
                "protocol",
                Protocol::ALL,
                Protocol::from_name,
                Protocol::as_str,
            ),
            balance: self.choice(
                c.balance,
                &p("balance"),
                "balance algorithm",
                Balance::ALL,
                Balance::from_name,
                Balance::as_str,
            ),
            transfer: self.choice(
                c.transfer,
                &p("transfer"),
                "transfer method",
                Transfer::ALL,
                Transfer::from_name,
                Transfer::as_str,
            ),
            proxy_protocol: self.choice(
                c.proxy_protocol,
                &p("proxy_protocol"),
                "proxy_protocol version",
                ProxyProtocol::ALL,
                ProxyProtocol::from_name,
                ProxyProtocol::as_str,
            ),
            max_connections: self.integer(c.max_connections, &p("max_connections"), 0, u32::MAX),
            connect_timeout: self.duration(c.connect_timeout, &p("connect_timeout"), true),
            connect_retries: self.integer(c.connect_retries, &p("connect_retries"), 0, 100),
            idle_timeout: self.duration(c.idle_timeout, &p("idle_timeout"), true),
            access_log: self.boolean(c.access_log, &p("access_log")),
            health_check: c
                .health_check
                .as_ref()
                .and_then(|h| self.check_spec(h, &p("health_check"))),
            udp: c.udp.as_ref().and_then(|u| self.udp(u, &p("udp"))),
        }
    }

    fn defaults(&mut self, d: &Sp<RawDefaults>) -> Common {
        let r = &d.value;
        for (key, field) in [
            ("name", &r.name),
            ("listen", &r.listen),
            ("backends", &r.backends),
        ] {
            if let Some(f) = field {
                self.err(
                    f.referenced,
                    &format!("defaults.{key}"),
                    format!("`{key}` cannot be set in defaults; every service gives its own {key}"),
                );
            }
        }
        self.common(r.common(), "defaults")
    }

    fn check_spec(&mut self, h: &Sp<RawHealthCheck>, path: &str) -> Option<CheckSpec> {
        let r = &h.value;
        let p = |k: &str| format!("{path}.{k}");
        let errors_before = self.d.list.len();

        let kind_name = match &r.kind {
            None => None,
            Some(k) => {
                const KINDS: [&str; 4] = ["tcp", "send_expect", "dns", "none"];
                match k.value.text() {
                    Some(t) if KINDS.contains(&t.as_str()) => Some((t, k.referenced)),
                    _ => {
                        let got = k.value.describe();
                        let hint = k
                            .value
                            .text()
                            .and_then(|t| crate::closest(&t, &KINDS))
                            .map(|s| format!(" (did you mean {s}?)"))
                            .unwrap_or_default();
                        self.err(
                            k.referenced,
                            &p("kind"),
                            format!(
                                "unknown health check kind {got}; expected one of: tcp, send_expect, dns, none{hint}"
                            ),
                        );
                        return None;
                    }
                }
            }
        };
        let kind_str = kind_name.as_ref().map(|(k, _)| k.as_str());

        // Keys that belong to one kind only.
        for (key, field, owner) in [
            ("send", &r.send, "send_expect"),
            ("expect", &r.expect, "send_expect"),
            ("query", &r.query, "dns"),
        ] {
            if let Some(f) = field {
                if kind_str != Some(owner) {
                    let now = match kind_str {
                        Some(k) => format!("this check is kind {k}"),
                        None => "this block has no `kind`".to_owned(),
                    };
                    self.err(
                        f.referenced,
                        &p(key),
                        format!("`{key}` is only used by kind {owner}; {now}"),
                    );
                }
            }
        }

        let kind = match kind_name {
            None => None,
            Some((name, loc)) => {
                let kind = match name.as_str() {
                    "tcp" => Some(CheckKind::Tcp),
                    "none" => Some(CheckKind::None),
                    "send_expect" => self.send_expect(h, path),
                    _ => self.dns_query(h, path).map(CheckKind::Dns),
                };
                kind.map(|k| (k, loc))
            }
        };

        let interval = self.duration(&r.interval, &p("interval"), true);
        let timeout = self.duration(&r.timeout, &p("timeout"), true);
        let rise = self.integer(&r.rise, &p("rise"), 1, u32::MAX);
        let fall = self.integer(&r.fall, &p("fall"), 1, u32::MAX);
        let interval_v = interval.unwrap_or(defaults::CHECK_INTERVAL);
        let interval_ok = r.interval.is_none() || interval.is_some();
        let timeout_v = match (timeout, &r.timeout) {
            (Some(t), Some(raw_t)) => {
                if t > interval_v && interval_ok {
                    let whose = if r.interval.is_some() {
                        "the interval"
                    } else {
                        "the default interval"
                    };
                    self.err(
                        raw_t.referenced,
                        &p("timeout"),
                        format!(
                            "timeout {} is longer than {whose} {}; a check must end before the next one starts",
                            humantime::format_duration(t),
                            humantime::format_duration(interval_v)
                        ),
                    );
                }
                t
            }
            _ => defaults::CHECK_TIMEOUT.min(interval_v),
        };
        if self.d.list.len() > errors_before {
            return None;
        }
        let nz =
            |v: Option<u32>, d: u32| NonZeroU32::new(v.unwrap_or(d)).unwrap_or(NonZeroU32::MIN);
        Some(CheckSpec {
            kind,
            interval: interval_v,
            timeout: timeout_v,
            rise: nz(rise, defaults::CHECK_RISE),
            fall: nz(fall, defaults::CHECK_FALL),
        })
    }

    fn send_expect(&mut self, h: &Sp<RawHealthCheck>, path: &str) -> Option<CheckKind> {
        let r = &h.value;
        let send = match &r.send {
            None => {
                self.err(
                    h.referenced,
                    path,
                    "kind send_expect needs `send` (the bytes to send, like \"PING\\r\\n\"; \"\" to only read a banner)",
                );
                None
            }
            Some(s) => self.text(s, &format!("{path}.send"), "a string"),
        };
        let expect = match &r.expect {
            None => {
                self.err(
                    h.referenced,
                    path,
                    "kind send_expect needs `expect` (the start of a good reply, like \"+PONG\")",
                );
                None
            }
            Some(e) => {
                let t = self.text(e, &format!("{path}.expect"), "a string");
                if t.as_deref() == Some("") {
                    self.err(
                        e.referenced,
                        &format!("{path}.expect"),
                        "must not be empty (an empty `expect` would pass on any reply)",
                    );
                    None
                } else {
                    t
                }
            }
        };
        Some(CheckKind::SendExpect {
            send: send?.into_bytes(),
            expect: expect?.into_bytes(),
        })
    }

    fn dns_query(&mut self, h: &Sp<RawHealthCheck>, path: &str) -> Option<DnsQuery> {
        let Some(q) = &h.value.query else {
            self.err(
                h.referenced,
                path,
                "kind dns needs `query` (a name and a record type, like \"example.com. A\")",
            );
            return None;
        };
        let qpath = format!("{path}.query");
        let text = self.text(q, &qpath, "a DNS query like \"example.com. A\"")?;
        match parse_dns_query(&text) {
            Ok(query) => Some(query),
            Err(msg) => {
                self.err(q.referenced, &qpath, msg);
                None
            }
        }
    }

    fn udp(&mut self, u: &Sp<RawUdp>, path: &str) -> Option<UdpSettings> {
        let r = &u.value;
        let p = |k: &str| format!("{path}.{k}");
        let before = self.d.list.len();
        let mode = self.choice(
            &r.mode,
            &p("mode"),
            "udp mode",
            UdpMode::ALL,
            UdpMode::from_name,
            UdpMode::as_str,
        );
        let session_timeout = self.duration(&r.session_timeout, &p("session_timeout"), true);
        let query_timeout = self.duration(&r.query_timeout, &p("query_timeout"), true);
        let max_sessions = self.integer(&r.max_sessions, &p("max_sessions"), 1, u32::MAX);
        if self.d.list.len() > before {
            return None;
        }
        let d = UdpSettings::default();
        Some(UdpSettings {
            mode: mode.unwrap_or(d.mode),
            session_timeout: session_timeout.unwrap_or(d.session_timeout),
            query_timeout: query_timeout.unwrap_or(d.query_timeout),
            max_sessions: max_sessions.unwrap_or(d.max_sessions),
        })
    }

    // ---- one service -----------------------------------------------------

    fn service(&mut self, i: usize, s: &Sp<RawService>, defs: &Common) -> Option<Service> {
        let path = format!("services[{i}]");
        let p = |k: &str| format!("{path}.{k}");
        let r = &s.value;
        let before = self.d.list.len();

        let name = match &r.name {
            None => {
                self.missing(s.referenced, &path, "name", "a service name ([a-z0-9_-]+)");
                None
            }
            Some(n) => self.service_name(n, &p("name")),
        };
        let own = self.common(r.common(), &path);
        let protocol = own.protocol.or(defs.protocol);
        if protocol.is_none() && r.protocol.is_none() {
            self.missing(s.referenced, &path, "protocol", "tcp or udp");
        }

        let listen = self.listen(s, &path);

        // Settings that belong to one protocol only, given on the service
        // (from `defaults:` they are simply not used).
        if let Some(proto) = protocol {
            let at = |f: &Field| f.as_ref().map(|v| v.referenced);
            let (wrong, other) = match proto {
                Protocol::Udp => (
                    vec![
                        ("transfer", at(&r.transfer)),
                        ("proxy_protocol", at(&r.proxy_protocol)),
                    ],
                    "tcp",
                ),
                Protocol::Tcp => (vec![("udp", r.udp.as_ref().map(|v| v.referenced))], "udp"),
            };
            for (key, loc) in wrong {
                if let Some(loc) = loc {
                    self.err(
                        loc,
                        &p(key),
                        format!(
                            "`{key}` applies to {other} services only; this service is {proto}"
                        ),
                    );
                }
            }
        }

        let health_check =
            protocol.and_then(|proto| self.service_check(s, &path, proto, &own, defs));

        let backends = self.backends(s, &path);

        if self.d.list.len() > before {
            return None;
        }
        let protocol = protocol?;
        let pick = |a: Option<Duration>, b: Option<Duration>, d: Duration| a.or(b).unwrap_or(d);
        Some(Service {
            name: name?,
            protocol,
            listen: listen?,
            balance: own.balance.or(defs.balance).unwrap_or(Balance::Maglev),
            transfer: match protocol {
                Protocol::Tcp => own.transfer.or(defs.transfer).unwrap_or(Transfer::Auto),
                Protocol::Udp => Transfer::Auto,
            },
            proxy_protocol: match protocol {
                Protocol::Tcp => own
                    .proxy_protocol
                    .or(defs.proxy_protocol)
                    .unwrap_or(ProxyProtocol::None),
                Protocol::Udp => ProxyProtocol::None,
            },
            max_connections: own
                .max_connections
                .or(defs.max_connections)
                .unwrap_or(defaults::MAX_CONNECTIONS),
            connect_timeout: pick(
                own.connect_timeout,
                defs.connect_timeout,
                defaults::CONNECT_TIMEOUT,
            ),
            connect_retries: own
                .connect_retries
                .or(defs.connect_retries)
                .unwrap_or(defaults::CONNECT_RETRIES),
            idle_timeout: pick(own.idle_timeout, defs.idle_timeout, defaults::IDLE_TIMEOUT),
            access_log: own
                .access_log
                .or(defs.access_log)
                .unwrap_or(defaults::ACCESS_LOG),
            health_check: health_check?,
            udp: match protocol {
                Protocol::Udp => Some(own.udp.or(defs.udp).unwrap_or_default()),
                Protocol::Tcp => None,
            },
            backends: backends?,
        })
    }

    fn service_name(&mut self, n: &Sp<Scalar>, path: &str) -> Option<String> {
        let name = self.text(n, path, "a service name ([a-z0-9_-]+)")?;
        if name.is_empty() {
            self.err(n.referenced, path, "must not be empty; use [a-z0-9_-]+");
            return None;
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
        {
            self.err(
                n.referenced,
                path,
                format!(
                    "invalid service name {name:?}: {bad:?} is not allowed; use only a-z, 0-9, _ and -"
                ),
            );
            return None;
        }
        Some(name)
    }

    fn listen(&mut self, s: &Sp<RawService>, path: &str) -> Option<Vec<SocketAddr>> {
        let lpath = format!("{path}.listen");
        let Some(list) = &s.value.listen else {
            self.missing(
                s.referenced,
                path,
                "listen",
                "a list of addresses, like [\"0.0.0.0:8080\"]",
            );
            return None;
        };
        if list.value.is_empty() {
            self.err(
                list.referenced,
                &lpath,
                "must list at least one address, like [\"0.0.0.0:8080\"]",
            );
            return None;
        }
        let mut out: Vec<(SocketAddr, usize, Location)> = Vec::new();
        let mut ok = true;
        for (j, item) in list.value.iter().enumerate() {
            let ipath = format!("{lpath}[{j}]");
            let Some(addr) = self.address(item, &ipath) else {
                ok = false;
                continue;
            };
            if let Some((prev, k, loc)) = out.iter().find(|(a, _, _)| listen_conflict(*a, addr)) {
                let what = if *prev == addr {
                    format!(
                        "{addr} is listed twice (first as listen[{k}] at line {})",
                        line_of(*loc)
                    )
                } else {
                    format!(
                        "{addr} overlaps listen[{k}] ({prev}, line {}): a wildcard address already covers the port",
                        line_of(*loc)
                    )
                };
                self.err(item.referenced, &ipath, what);
                ok = false;
                continue;
            }
            out.push((addr, j, item.referenced));
        }
        ok.then(|| out.into_iter().map(|(a, _, _)| a).collect())
    }

    fn service_check(
        &mut self,
        s: &Sp<RawService>,
        path: &str,
        proto: Protocol,
        own: &Common,
        defs: &Common,
    ) -> Option<HealthCheck> {
        match (&s.value.health_check, &own.health_check) {
            // Given but invalid: already reported.
            (Some(_), None) => None,
            (Some(_), Some(spec)) => {
                if let Some((kind, loc)) = &spec.kind {
                    let wrong = match (kind, proto) {
                        (CheckKind::Dns(_), Protocol::Tcp) => {
                            Some("kind dns is for udp services; this service is tcp (use tcp or send_expect)")
                        }
                        (CheckKind::SendExpect { .. }, Protocol::Udp) => {
                            Some("kind send_expect is for tcp services; this service is udp (use dns, tcp or none)")
                        }
                        _ => None,
                    };
                    if let Some(msg) = wrong {
                        self.err(*loc, &format!("{path}.health_check.kind"), msg);
                        return None;
                    }
                }
                Some(spec.build(proto))
            }
            (None, _) => Some(match &defs.health_check {
                Some(spec) if spec.fits(proto) => spec.build(proto),
                _ => HealthCheck::default_for(proto),
            }),
        }
    }

    fn backends(&mut self, s: &Sp<RawService>, path: &str) -> Option<Vec<Backend>> {
        let bpath = format!("{path}.backends");
        let Some(list) = &s.value.backends else {
            self.missing(
                s.referenced,
                path,
                "backends",
                "a list of backends, each with an `address`",
            );
            return None;
        };
        if list.value.is_empty() {
            self.err(
                list.referenced,
                &bpath,
                "must list at least one backend, like [{address: \"10.0.0.1:443\"}]",
            );
            return None;
        }
        let mut out: Vec<(Backend, Location)> = Vec::new();
        let mut ok = true;
        for (j, b) in list.value.iter().enumerate() {
            let p = format!("{bpath}[{j}]");
            let r = &b.value;
            let weight = self.integer(&r.weight, &format!("{p}.weight"), 1, defaults::MAX_WEIGHT);
            let max_connections = self.integer(
                &r.max_connections,
                &format!("{p}.max_connections"),
                0,
                u32::MAX,
            );
            let Some(raw_addr) = &r.address else {
                self.missing(
                    b.referenced,
                    &p,
                    "address",
                    "IP:port, [v6]:port or host:port",
                );
                ok = false;
                continue;
            };
            let apath = format!("{p}.address");
            let Some(addr) = self.address(raw_addr, &apath) else {
                ok = false;
                continue;
            };
            if let Some(k) = out.iter().position(|(x, _)| x.addr == addr) {
                let (first, loc) = &out[k];
                let text = raw_addr.value.text().unwrap_or_default();
                let same = if first.address == text {
                    String::new()
                } else {
                    format!(" ({:?} and {text:?} are the same address)", first.address)
                };
                self.err(
                    raw_addr.referenced,
                    &apath,
                    format!(
                        "duplicate backend {addr}: already listed as backends[{k}] at line {}{same}",
                        line_of(*loc)
                    ),
                );
                ok = false;
                continue;
            }
            if (r.weight.is_some() && weight.is_none())
                || (r.max_connections.is_some() && max_connections.is_none())
            {
                ok = false;
            }
            out.push((
                Backend {
                    address: raw_addr.value.text().unwrap_or_default(),
                    addr,
                    weight: weight.unwrap_or(defaults::BACKEND_WEIGHT),
                    max_connections: max_connections.unwrap_or(defaults::BACKEND_MAX_CONNECTIONS),
                },
                raw_addr.referenced,
            ));
        }
        ok.then(|| out.into_iter().map(|(b, _)| b).collect())
    }

    // ---- across services -------------------------------------------------

    fn cross_service_checks(
        &mut self,
        services: &[(usize, &Sp<RawService>, Service)],
        admin: Option<&Admin>,
        raw_admin: Option<&Sp<RawAdmin>>,
    ) {
        // Unique names.
        for (n, (i, raw, svc)) in services.iter().enumerate() {
            if let Some((k, first_raw, _)) =
                services[..n].iter().find(|(_, _, s)| s.name == svc.name)
            {
                let loc = raw
                    .value
                    .name
                    .as_ref()
                    .map_or(raw.referenced, |v| v.referenced);
                let first_line = first_raw
                    .value
                    .name
                    .as_ref()
                    .map_or(first_raw.referenced, |v| v.referenced);
                self.err(
                    loc,
                    &format!("services[{i}].name"),
                    format!(
                        "duplicate service name {:?}: services[{k}] at line {} already uses it",
                        svc.name,
                        line_of(first_line)
                    ),
                );
            }
        }
        // Listen conflicts between services of the same protocol.
        for (n, (i, raw, svc)) in services.iter().enumerate() {
            for (j, addr) in svc.listen.iter().enumerate() {
                let clash = services[..n].iter().find_map(|(k, other_raw, other)| {
                    if other.protocol != svc.protocol {
                        return None;
                    }
                    other
                        .listen
                        .iter()
                        .position(|o| listen_conflict(*o, *addr))
                        .map(|m| (k, other_raw, other, m))
                });
                if let Some((k, other_raw, other, m)) = clash {
                    let loc = listen_item_loc(raw, j);
                    let other_line = line_of(listen_item_loc(other_raw, m));
                    let how = if other.listen[m] == *addr {
                        "the same address"
                    } else {
                        "a wildcard address on the same port"
                    };
                    self.err(
                        loc,
                        &format!("services[{i}].listen[{j}]"),
                        format!(
                            "{addr}/{} conflicts with service {:?} (services[{k}].listen[{m}] = {}, line {other_line}): {how}",
                            svc.protocol, other.name, other.listen[m]
                        ),
                    );
                }
            }
        }
        // The admin endpoint is a TCP listener too.
        if let (Some(admin), Some(raw_admin)) = (admin, raw_admin) {
            for (i, raw, svc) in services {
                if svc.protocol != Protocol::Tcp {
                    continue;
                }
                if let Some(m) = svc
                    .listen
                    .iter()
                    .position(|o| listen_conflict(*o, admin.listen))
                {
                    let loc = raw_admin
                        .value
                        .listen
                        .as_ref()
                        .map_or(raw_admin.referenced, |v| v.referenced);
                    self.err(
                        loc,
                        "admin.listen",
                        format!(
                            "{} conflicts with service {:?} (services[{i}].listen[{m}] = {}, line {})",
                            admin.listen,
                            svc.name,
                            svc.listen[m],
                            line_of(listen_item_loc(raw, m))
                        ),
                    );
                }
            }
        }
    }
}

fn listen_item_loc(raw: &Sp<RawService>, j: usize) -> Location {
    raw.value
        .listen
        .as_ref()
        .and_then(|l| l.value.get(j))
        .map_or(raw.referenced, |v: &Spanned<Scalar>| v.referenced)
}

/// Record types a dns health check may ask for.
const QTYPES: &[&str] = &[
    "A", "AAAA", "ANY", "CAA", "CNAME", "DNSKEY", "DS", "HINFO", "HTTPS", "MX", "NAPTR", "NS",
    "PTR", "SOA", "SRV", "SSHFP", "SVCB", "TLSA", "TXT",
];

/// `"example.com. A"` -> name `example.com.`, type `A`.
pub(crate) fn parse_dns_query(text: &str) -> Result<DnsQuery, String> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [name, qtype] = parts.as_slice() else {
        return Err(format!(
            "expected a name and a record type separated by a space, like \"example.com. A\", got {text:?}"
        ));
    };
    let fqdn = if name.ends_with('.') {
        (*name).to_owned()
    } else {
        format!("{name}.")
    };
    let labels_ok = fqdn == "."
        || (fqdn.len() <= 254
            && fqdn[..fqdn.len() - 1].split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }));
    if !labels_ok {
        return Err(format!(
            "{name:?} is not a valid DNS name (labels of letters, digits, - and _, separated by dots)"
        ));
    }
    let qtype = qtype.to_ascii_uppercase();
    if !QTYPES.contains(&qtype.as_str()) {
        return Err(format!(
            "unknown record type {qtype:?} in {text:?}; expected one of: {}",
            QTYPES.join(", ")
        ));
    }
    Ok(DnsQuery { name: fqdn, qtype })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_queries() {
        let q = parse_dns_query("example.com A").unwrap();
        assert_eq!((q.name.as_str(), q.qtype.as_str()), ("example.com.", "A"));
        let q = parse_dns_query("health.example. aaaa").unwrap();
        assert_eq!(
            (q.name.as_str(), q.qtype.as_str()),
            ("health.example.", "AAAA")
        );
        assert_eq!(parse_dns_query(". NS").unwrap().name, ".");
        assert!(parse_dns_query("example.com").is_err());
        assert!(parse_dns_query("example.com. A extra").is_err());
        assert!(parse_dns_query("exa mple.com. A").is_err());
        assert!(parse_dns_query("example..com. A").is_err());
        assert!(parse_dns_query("example.com. XYZ")
            .unwrap_err()
            .contains("unknown record type"));
    }
}
