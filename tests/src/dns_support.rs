//! Real DNS software for the UDP end-to-end tests: [`Knot`] runs `knotd`
//! (Debian package `knot`) as a backend on a loopback port with its own
//! config, zone and run directory in a temp dir; [`kdig`] asks a question
//! with `kdig` (`knot-dnsutils`); [`dnsperf`] runs a load (`dnsperf`) and
//! parses its report. [`DnsProbe`] sends queries steadily from a thread and
//! records what happened to each one (answered by whom, or lost).
//!
//! Each [`Knot`] serves the zone `test.` with:
//!
//! - `who.test. TXT "<its name>"`: which backend answered;
//! - `www.test. A 192.0.2.1`: a fixed answer (health checks, load).
//!
//! Every helper has a deadline; a `Knot` is stopped (SIGTERM, then SIGKILL)
//! when dropped.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::dns::{dns_query, dns_tag};
use crate::net::{udp_client_on, LOCALHOST};
use crate::process::wait_output;
use crate::tools::require_tool;
use crate::{poll_until, DEADLINE};

/// The address in `www.test. A`.
pub const WWW_ANSWER: &str = "192.0.2.1";

/// The paths of `knotd`, `kdig` and `dnsperf`, or `None` after printing
/// why the calling test skips (a failure instead under
/// `SLUICE_REQUIRE_TOOLS=1`).
pub fn dns_tools() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let knotd = require_tool("knotd", "knot", None)?;
    let kdig = require_tool("kdig", "knot-dnsutils", None)?;
    let dnsperf = require_tool("dnsperf", "dnsperf", None)?;
    Some((knotd, kdig, dnsperf))
}

/// A port on `ip` free for both UDP and TCP right now (knotd binds both).
pub fn free_dns_port(ip: IpAddr) -> u16 {
    for _ in 0..100 {
        let tcp = TcpListener::bind((ip, 0)).expect("bind a TCP port");
        let port = tcp.local_addr().expect("local_addr").port();
        if UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on {ip}");
}

/// A `knotd` serving the `test.` zone on `127.0.0.1:<port>`.
#[derive(Debug)]
pub struct Knot {
    name: String,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Knot {
    /// Starts a knotd called `name` (its `who.test. TXT` answer) on a free
    /// port and waits until it answers.
    #[track_caller]
    pub fn start(knotd: &Path, name: &str) -> Knot {
        Self::start_on(
            knotd,
            name,
            SocketAddr::new(LOCALHOST, free_dns_port(LOCALHOST)),
        )
    }

    /// Starts a knotd called `name` on `addr` and waits until it answers.
    #[track_caller]
    pub fn start_on(knotd: &Path, name: &str, addr: SocketAddr) -> Knot {
        assert!(
            addr.ip().is_loopback(),
            "tests listen on loopback only, not {addr}"
        );
        let dir = tempfile::Builder::new()
            .prefix("sluice-knot-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path();
        fs::create_dir_all(root.join("db")).expect("db dir");
        let zone = format!(
            "$ORIGIN test.\n$TTL 60\n@ IN SOA ns.test. admin.test. 1 3600 600 86400 60\n@ IN NS ns.test.\n\
             ns IN A 127.0.0.1\nwww IN A {WWW_ANSWER}\nwho IN TXT \"{name}\"\n"
        );
        fs::write(root.join("test.zone"), zone).expect("zone file");
        let conf = format!(
            "server:\n    rundir: \"{r}\"\n    listen: {ip}@{port}\n    udp-workers: 1\n    tcp-workers: 1\n    \
             background-workers: 1\n\ndatabase:\n    storage: \"{r}/db\"\n\ncontrol:\n    listen: \"{r}/knot.sock\"\n\n\
             log:\n  - target: stderr\n    any: notice\n\nzone:\n  - domain: test\n    storage: \"{r}\"\n    file: \"test.zone\"\n",
            r = root.display(),
            ip = addr.ip(),
            port = addr.port()
        );
        fs::write(root.join("knot.conf"), conf).expect("knot config");
        let log = fs::File::create(root.join("knotd.log")).expect("knot log");
        let child = Command::new(knotd)
            .arg("-c")
            .arg(root.join("knot.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", knotd.display()));
        let mut knot = Knot {
            name: name.to_string(),
            addr,
            dir,
            child: Some(child),
        };
        knot.wait_answering();
        knot
    }

    #[track_caller]
    fn wait_answering(&mut self) {
        let socket = udp_client_on(LOCALHOST);
        let ok = poll_until(DEADLINE, || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "knotd {} exited at start ({status}); its log:\n{}",
                        self.name,
                        self.log()
                    );
                }
            }
            let reply = dns_query(
                &socket,
                self.addr,
                "who.test.",
                RecordType::TXT,
                Duration::from_millis(200),
            )?;
            dns_tag(&reply)
        });
        match ok {
            Some(tag) => assert_eq!(tag, self.name, "knotd answers with its own name"),
            None => panic!(
                "knotd {} did not answer within {DEADLINE:?}; its log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// Its name (the `who.test. TXT` answer).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What knotd logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("knotd.log")).unwrap_or_default()
    }

    /// Kills it at once (SIGKILL, like a crash): its port answers ICMP
    /// port unreachable afterwards. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it (SIGTERM, SIGKILL after 5 s). Idempotent; also on drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let exited = poll_until(Duration::from_secs(5), || child.try_wait().ok().flatten());
            if exited.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What `kdig` printed for one question.
#[derive(Debug, Clone)]
pub struct KdigAnswer {
    /// True if kdig exited 0 and printed an answer.
    pub ok: bool,
    /// The `+short` answer lines (TXT strings keep their quotes).
    pub answers: Vec<String>,
    /// kdig's stdout and stderr, for messages.
    pub output: String,
}

/// Asks `server` (`@ip -p port`) for `name` `qtype` with `kdig +short`,
/// one try, `timeout_secs` to wait. kdig rejects a reply that comes from
/// another address than the one it asked.
pub fn kdig(
    kdig: &Path,
    server: SocketAddr,
    name: &str,
    qtype: &str,
    timeout_secs: u32,
) -> KdigAnswer {
    let child = Command::new(kdig)
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .arg(name)
        .arg(qtype)
        .arg("+short")
        .arg(format!("+timeout={timeout_secs}"))
        .arg("+retry=0")
        .arg("+notcp")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", kdig.display()));
    let out = wait_output(
        child,
        Duration::from_secs(u64::from(timeout_secs) + 10),
        "kdig",
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let answers: Vec<String> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(str::to_string)
        .collect();
    KdigAnswer {
        ok: out.status.success() && !answers.is_empty(),
        answers,
        output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// Writes a dnsperf input file of `count` lines alternating `www.test A`
/// and `who.test TXT`.
pub fn write_queries(path: &Path, count: usize) {
    let mut f = fs::File::create(path).expect("query file");
    for i in 0..count {
        let line = if i % 2 == 0 {
            "www.test A\n"
        } else {
            "who.test TXT\n"
        };
        f.write_all(line.as_bytes()).expect("write query file");
    }
}

/// The numbers of a dnsperf run.
#[derive(Debug, Clone, Default)]
pub struct DnsperfReport {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub noerror: u64,
    pub qps: f64,
    pub avg_latency_ms: f64,
    pub min_latency_ms: f64,
    pub max_latency_ms: f64,
    pub stddev_latency_ms: f64,
    /// Warnings about responses with an unexpected ID or question.
    pub mismatches: u64,
    /// Everything it printed.
    pub output: String,
}

/// Runs `dnsperf -s ip -p port -d queries -n 1 ARGS…` (one pass over the
/// file) and parses its report. Panics with the output if it does not
/// finish within `timeout` or prints no statistics.
pub fn dnsperf(
    dnsperf: &Path,
    server: SocketAddr,
    queries: &Path,
    args: &[&str],
    timeout: Duration,
) -> DnsperfReport {
    let child = Command::new(dnsperf)
        .arg("-s")
        .arg(server.ip().to_string())
        .arg("-p")
        .arg(server.port().to_string())
        .arg("-d")
        .arg(queries)
        .arg("-n")
        .arg("1")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", dnsperf.display()));
    let out = wait_output(child, timeout, "dnsperf");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dnsperf(&text)
        .unwrap_or_else(|| panic!("dnsperf printed no statistics ({}):\n{text}", out.status))
}

/// The first number in `text` after `key` (e.g. `"Queries sent:"`).
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let token: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    token.parse().ok()
}

/// Parses dnsperf's statistics block.
pub fn parse_dnsperf(text: &str) -> Option<DnsperfReport> {
    let ms = |key: &str| number_after(text, key).map(|s| s * 1000.0).unwrap_or(0.0);
    let sent = number_after(text, "Queries sent:")? as u64;
    let mismatches = text
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("unexpected") || l.contains("mismatch")
        })
        .count() as u64;
    Some(DnsperfReport {
        sent,
        completed: number_after(text, "Queries completed:")? as u64,
        lost: number_after(text, "Queries lost:")? as u64,
        noerror: number_after(text, "NOERROR").unwrap_or(0.0) as u64,
        qps: number_after(text, "Queries per second:").unwrap_or(0.0),
        avg_latency_ms: ms("Average Latency (s):"),
        min_latency_ms: ms("(min"),
        max_latency_ms: ms(", max"),
        stddev_latency_ms: ms("Latency StdDev (s):"),
        mismatches,
        output: text.to_string(),
    })
}

/// One query of a [`DnsProbe`].
#[derive(Debug, Clone)]
pub struct ProbeQuery {
    pub sent: Instant,
    /// The answering backend's name (`who.test. TXT`), or `None` if no
    /// answer came within the probe's timeout.
    pub answer: Option<String>,
}

/// Sends `who.test. TXT` queries to `target` one after another from a
/// background thread (a fresh random ID each, one source port per query
/// so balancing by 5-tuple also spreads them), waiting up to `timeout` for
/// each answer, and records every query.
#[derive(Debug)]
pub struct DnsProbe {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<ProbeQuery>>>,
    thread: Option<JoinHandle<()>>,
}

impl DnsProbe {
    /// Starts probing `target` with a pause of `pause` between queries.
    pub fn start(target: SocketAddr, timeout: Duration, pause: Duration) -> DnsProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, log) = (stop.clone(), log.clone());
            std::thread::Builder::new()
                .name("dns-probe".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let socket = udp_client_on(LOCALHOST);
                        let sent = Instant::now();
                        let answer =
                            dns_query(&socket, target, "who.test.", RecordType::TXT, timeout)
                                .and_then(|reply| dns_tag(&reply));
                        log.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(ProbeQuery { sent, answer });
                        std::thread::sleep(pause);
                    }
                })
                .expect("spawn the probe")
        };
        DnsProbe {
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// Every query so far.
    pub fn queries(&self) -> Vec<ProbeQuery> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queries sent so far.
    pub fn count(&self) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Stops the thread (after its current query) and returns every query.
    pub fn finish(mut self) -> Vec<ProbeQuery> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.queries()
    }
}

impl Drop for DnsProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value of the series `name{labels…}` in a Prometheus text
/// exposition: the first sample of `name` carrying every `(label, value)`
/// pair of `labels` (other labels may be present, in any order).
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_text, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let end = r.find('}')?;
                    (&r[..end], r[end + 1..].trim())
                }
                None if rest.starts_with(' ') => ("", rest.trim()),
                None => return None,
            };
            let all = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            });
            all.then(|| value.split_whitespace().next()?.parse().ok())
                .flatten()
        })
}

/// Scrapes `GET /metrics` from the admin endpoint `admin` and returns
/// [`metric_value`] of the series (panics if the scrape fails).
#[track_caller]
pub fn scrape_metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let r = crate::net::http_get(admin, "/metrics", DEADLINE)
        .unwrap_or_else(|e| panic!("GET /metrics on {admin}: {e}"));
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    metric_value(&r.body, name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_series_by_name_and_labels() {
        let text = "# HELP x y\nsluice_udp_sessions{service=\"s\"} 3\n\
                    sluice_udp_datagrams_total{service=\"d\",direction=\"dropped\"} 12\n\
                    sluice_udp_datagrams_total{service=\"d\",direction=\"to_client\"} 7\nplain 1.5\n";
        assert_eq!(
            metric_value(text, "sluice_udp_sessions", &[("service", "s")]),
            Some(3.0)
        );
        assert_eq!(
            metric_value(
                text,
                "sluice_udp_datagrams_total",
                &[("direction", "to_client"), ("service", "d")]
            ),
            Some(7.0)
        );
        assert_eq!(
            metric_value(text, "sluice_udp_datagrams_total", &[("service", "x")]),
            None
        );
        assert_eq!(metric_value(text, "plain", &[]), Some(1.5));
        assert_eq!(metric_value(text, "sluice_udp_session", &[]), None);
    }

    #[test]
    fn parses_a_dnsperf_report() {
        let text = "Statistics:\n\n  Queries sent:         10000\n  Queries completed:    9998 (99.98%)\n  \
                    Queries lost:         2 (0.02%)\n\n  Response codes:       NOERROR 9998 (100.00%)\n  \
                    Average packet size:  request 26, response 41\n  Run time (s):         2.001048\n  \
                    Queries per second:   4997.381372\n\n  Average Latency (s):  0.000580 (min 0.000058, max 0.011957)\n  \
                    Latency StdDev (s):   0.001308\n";
        let r = parse_dnsperf(text).unwrap();
        assert_eq!(
            (r.sent, r.completed, r.lost, r.noerror),
            (10000, 9998, 2, 9998)
        );
        assert!((r.qps - 4997.38).abs() < 0.01);
        assert!((r.avg_latency_ms - 0.58).abs() < 1e-9);
        assert!((r.min_latency_ms - 0.058).abs() < 1e-9);
        assert!((r.max_latency_ms - 11.957).abs() < 1e-9);
        assert_eq!(r.mismatches, 0);
        let warn = format!(
            "Warning: received a response with an unexpected (maybe timed out) id: 123\n{text}"
        );
        assert_eq!(parse_dnsperf(&warn).unwrap().mismatches, 1);
    }

    #[test]
    fn a_free_dns_port_is_free_for_udp_and_tcp() {
        let port = free_dns_port(LOCALHOST);
        UdpSocket::bind((LOCALHOST, port)).unwrap();
        TcpListener::bind((LOCALHOST, port)).unwrap();
    }
}
