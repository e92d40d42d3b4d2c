//! Support for the control-plane end-to-end tests (health checks, reloads,
//! drain): a backend that resets every connection, steady client traffic
//! that records every attempt, long bulk transfers with progress, and
//! access-log parsing.
//!
//! Like the rest of this crate, every loop here ends by itself: client
//! threads stop when asked (checked between exchanges) and every socket
//! operation has a timeout.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bulk::{HashCounter, PseudoRandom};
use crate::net::{
    parse_hash_report, read_exact_within, read_line_within, set_io_timeouts, LOCALHOST,
};
use crate::tcp::TcpServer;

/// Accepts every connection and resets it at once (SO_LINGER 0, close)
/// without sending a byte. A `tcp` health check passes against it (the
/// connect succeeds), but every proxied connection fails: the pattern of a
/// broken or overloaded process whose listener still accepts.
#[derive(Debug)]
pub struct ResettingBackend(TcpServer);

impl ResettingBackend {
    /// On `127.0.0.1:<free port>`.
    pub fn start() -> ResettingBackend {
        ResettingBackend(TcpServer::start(SocketAddr::new(LOCALHOST, 0), |conn| {
            socket2::SockRef::from(conn.stream()).set_linger(Some(Duration::ZERO))?;
            Ok(())
        }))
    }
}

impl Deref for ResettingBackend {
    type Target = TcpServer;
    fn deref(&self) -> &TcpServer {
        &self.0
    }
}

/// Why a client exchange failed, and the backend tag it had read by then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeError {
    /// The tag line, if the backend had sent it (the connection had reached
    /// that backend).
    pub tag: Option<String>,
    pub what: String,
}

/// One short exchange with a [`crate::tcp::TcpTagged`] backend through
/// `addr`: connect (once, no retry), read the tag line, echo `payload`,
/// close. Returns the tag. The client sends nothing before the tag arrives
/// (a server-speaks-first protocol).
pub fn tagged_exchange(
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<String, ExchangeError> {
    let err = |tag: Option<&str>, what: String| ExchangeError {
        tag: tag.map(str::to_string),
        what,
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| err(None, format!("connect: {e}")))?;
    set_io_timeouts(&s, timeout);
    let tag = read_line_within(&mut s, timeout)
        .map_err(|e| err(None, format!("reading the tag: {e}")))?;
    s.write_all(payload)
        .map_err(|e| err(Some(&tag), format!("writing: {e}")))?;
    let got = read_exact_within(&mut s, payload.len(), timeout)
        .map_err(|e| err(Some(&tag), format!("reading the echo: {e}")))?;
    if got != payload {
        return Err(err(Some(&tag), "wrong echo".to_string()));
    }
    Ok(tag)
}

/// One recorded client attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub started: Instant,
    pub finished: Instant,
    pub result: Result<String, ExchangeError>,
}

/// A steady stream of short [`tagged_exchange`]s from several client
/// threads, recording every attempt, until [`Traffic::stop`].
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// `clients` threads, each doing one exchange after another with
    /// `pause` in between.
    pub fn start(addr: SocketAddr, clients: usize, pause: Duration) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|i| {
                let (stop, attempts) = (stop.clone(), attempts.clone());
                std::thread::Builder::new()
                    .name(format!("traffic-{i}"))
                    .spawn(move || {
                        let mut n = 0u64;
                        while !stop.load(Ordering::SeqCst) {
                            let payload = format!("client {i} exchange {n}\n");
                            n += 1;
                            let started = Instant::now();
                            let result =
                                tagged_exchange(addr, payload.as_bytes(), Duration::from_secs(5));
                            let finished = Instant::now();
                            attempts
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Attempt {
                                    started,
                                    finished,
                                    result,
                                });
                            std::thread::sleep(pause);
                        }
                    })
                    .expect("spawn a traffic thread")
            })
            .collect();
        Traffic {
            stop,
            attempts,
            threads,
        }
    }

    /// Every attempt so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether an attempt that started after `since` reached the backend
    /// tagged `tag`.
    pub fn reached_since(&self, tag: &str, since: Instant) -> bool {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|a| a.started >= since && a.result.as_deref() == Ok(tag))
    }

    /// Stops the threads (each finishes its current exchange) and returns
    /// every attempt.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.attempts()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What [`bulk_to_sink`] sent and what the sink reported, each as
/// `(length, sha256 hex)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkResult {
    pub sent: (u64, String),
    pub reported: (u64, String),
}

/// Sends `len` pseudo-random bytes from `seed` to a
/// [`crate::tcp::TcpHashSink`] through `addr` in 64 KiB writes, at most
/// `rate` bytes per second, adding each write to `progress` and hashing
/// what it sent; then half-closes and reads the sink's report. Errors
/// instead of panicking, so many can run on threads.
pub fn bulk_to_sink(
    addr: SocketAddr,
    seed: u64,
    len: u64,
    rate: u64,
    progress: &AtomicU64,
    timeout: Duration,
) -> Result<BulkResult, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    set_io_timeouts(&s, timeout);
    let mut source = PseudoRandom::new(seed, len);
    let mut hash = HashCounter::new();
    let mut buf = vec![0; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let n = source.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])
            .map_err(|e| format!("sending after {sent} bytes: {e}"))?;
        hash.update(&buf[..n]);
        sent += n as u64;
        progress.store(sent, Ordering::Relaxed);
        // Pace: never ahead of `rate`.
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let line = read_line_within(&mut s, timeout).map_err(|e| format!("reading the report: {e}"))?;
    let reported = parse_hash_report(&line).ok_or_else(|| format!("bad report {line:?}"))?;
    Ok(BulkResult {
        sent: hash.finish(),
        reported,
    })
}

/// Sends pseudo-random bytes to `addr` until `stop` is set or the
/// connection fails; returns how many bytes were sent and how it ended.
pub fn endless_send(addr: SocketAddr, stop: &AtomicBool, sent: &AtomicU64) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_write_timeout(Some(Duration::from_millis(200)))?;
    let buf = crate::bulk::pseudo_random_bytes(1, 64 * 1024);
    while !stop.load(Ordering::SeqCst) {
        match s.write(&buf) {
            Ok(n) => {
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `access ...` log line of sluice (`access_log: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLine {
    pub service: String,
    pub worker: usize,
    pub backend: String,
    pub end: String,
}

/// The access-log lines in `log`, in order.
pub fn access_lines(log: &str) -> Vec<AccessLine> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find(" access service=")? + 1..];
            let field = |key: &str| {
                rest.split(' ')
                    .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                    .map(str::to_string)
            };
            Some(AccessLine {
                service: field("service")?,
                worker: field("worker")?.parse().ok()?,
                backend: field("backend")?,
                end: field("end")?,
            })
        })
        .collect()
}

/// Whether a new TCP connection to `addr` is refused right now.
pub fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_are_parsed() {
        let log = "[2024-01-01T00:00:00.000Z INFO  sluice_dataplane::tcp] access service=web worker=1 client=127.0.0.1:5 \
                   listener=127.0.0.1:8 backend=127.0.0.1:9 bytes_to_backend=1 bytes_to_client=2 duration_ms=0 end=client_close\n\
                   other line\n";
        assert_eq!(
            access_lines(log),
            vec![AccessLine {
                service: "web".into(),
                worker: 1,
                backend: "127.0.0.1:9".into(),
                end: "client_close".into()
            }]
        );
    }

    #[test]
    fn resetting_backend_accepts_then_resets() {
        let b = ResettingBackend::start();
        let err = tagged_exchange(b.addr(), b"x", Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.tag, None);
        assert!(b.accepted() >= 1);
    }
}
