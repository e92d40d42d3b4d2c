//! `metrics_overhead`: the load tool of `bench/metrics_overhead.sh`
//! (docs/benchmarks.md "Metrics overhead").
//!
//! One thread and one epoll set play both ends of a TCP request/response
//! workload through sluice: an echo server on `--echo` (sluice's backend)
//! and `--connections` clients to `--target` (sluice's listener), each
//! sending `--size` bytes and waiting for them to come back, over and over
//! on the same connection. After `--warmup` it counts round trips for
//! `--duration` and prints one JSON line:
//!
//! ```text
//! {"roundtrips":812345,"seconds":5.0,"roundtrips_per_sec":162469.0,
//!  "sluice_cpu_seconds":4.97,"roundtrips_per_sluice_cpu_sec":163449.0,...}
//! ```
//!
//! Doing both ends in one thread keeps the load generator's CPU cost low
//! (no thread switches), so the CPU running sluice is the bottleneck.
//!
//! With `--watch-pid PID` (sluice's) it also reads the CPU time every
//! thread of that process spent during the measured window (the first field
//! of `/proc/PID/task/*/schedstat`, nanoseconds on a CPU) and reports the
//! round trips per CPU-second of sluice: the cost per round trip, which
//! other tenants of a shared machine disturb far less than the wall-clock
//! rate.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

const USAGE: &str = "\
usage: metrics_overhead --echo IP:PORT --target IP:PORT [--connections 32]
                        [--size 64] [--warmup 1s] [--duration 5s]
                        [--watch-pid PID]
";

/// Tokens: the listener, echo connections, client connections.
const LISTENER: u64 = u64::MAX;
const ECHO_BIT: u64 = 1 << 62;

struct Args {
    echo: SocketAddr,
    target: SocketAddr,
    connections: usize,
    size: usize,
    warmup: Duration,
    duration: Duration,
    watch_pid: Option<u32>,
}

fn duration(text: &str) -> Result<Duration, String> {
    let (num, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| text.split_at(i))
        .ok_or_else(|| format!("{text:?}: a duration needs a unit (ms, s)"))?;
    let n: f64 = num.parse().map_err(|_| format!("{text:?}: bad number"))?;
    match unit {
        "ms" => Ok(Duration::from_secs_f64(n / 1000.0)),
        "s" => Ok(Duration::from_secs_f64(n)),
        _ => Err(format!("{text:?}: unit must be ms or s")),
    }
}

fn parse(argv: &[String]) -> Result<Args, String> {
    let mut echo = None;
    let mut target = None;
    let mut args = Args {
        echo: SocketAddr::from(([127, 0, 0, 1], 0)),
        target: SocketAddr::from(([127, 0, 0, 1], 0)),
        connections: 32,
        size: 64,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(5),
        watch_pid: None,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let addr = |v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| format!("{flag} {v}: {e}"))
        };
        let count = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{flag} {v}: expected a positive integer"))
        };
        match flag.as_str() {
            "--echo" => echo = Some(addr(value)?),
            "--target" => target = Some(addr(value)?),
            "--connections" => args.connections = count(value)?,
            "--size" => args.size = count(value)?,
            "--warmup" => args.warmup = duration(value)?,
            "--duration" => args.duration = duration(value)?,
            "--watch-pid" => {
                args.watch_pid = Some(
                    value
                        .parse()
                        .map_err(|_| format!("{flag} {value}: expected a process ID"))?,
                )
            }
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    args.echo = echo.ok_or_else(|| format!("--echo is required\n{USAGE}"))?;
    args.target = target.ok_or_else(|| format!("--target is required\n{USAGE}"))?;
    Ok(args)
}

/// An echo connection: what it read and could not write back yet.
struct Echo {
    stream: TcpStream,
    pending: Vec<u8>,
}

/// A client connection: bytes of the current reply still to come.
struct Client {
    stream: TcpStream,
    waiting: usize,
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Connect to sluice, retrying while it starts (up to 10 s).
fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                return Err(format!("connect to {target}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Nanoseconds the threads of process `pid` (`"self"` for this one) have
/// spent on a CPU so far: the sum of the first field of every
/// `/proc/PID/task/TID/schedstat`.
fn cpu_nanos(pid: &str) -> Result<u64, String> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        // A thread may end between the listing and the read: skip it.
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .ok_or_else(|| format!("{}: unexpected {text:?}", task.path().display()))?;
        }
    }
    Ok(total)
}

/// CPU time of sluice (if watched) and of this process, in nanoseconds.
fn cpu_sample(watch: Option<u32>) -> Result<(Option<u64>, u64), String> {
    let sluice = watch.map(|pid| cpu_nanos(&pid.to_string())).transpose()?;
    Ok((sluice, cpu_nanos("self")?))
}

fn errno(what: &str) -> impl Fn(nix::errno::Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn run(args: &Args) -> Result<(), String> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(errno("epoll_create"))?;
    let listener = TcpListener::bind(args.echo).map_err(|e| format!("bind {}: {e}", args.echo))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    epoll
        .add(
            listener.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, LISTENER),
        )
        .map_err(errno("epoll_ctl"))?;

    let request = vec![0x5au8; args.size];
    let mut clients = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let stream = connect(args.target)?;
        stream
            .set_nodelay(true)
            .and_then(|()| stream.set_nonblocking(true))
            .map_err(|e| format!("client socket: {e}"))?;
        epoll
            .add(
                stream.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
            )
            .map_err(errno("epoll_ctl"))?;
        clients.push(Client { stream, waiting: 0 });
    }
    let mut echoes: Vec<Option<Echo>> = Vec::new();
    // Every client sends its first request.
    for c in &mut clients {
        (&c.stream)
            .write_all(&request)
            .map_err(|e| format!("first request: {e}"))?;
        c.waiting = args.size;
    }

    let mut roundtrips = 0u64;
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut at_measure: Option<(u64, Instant, (Option<u64>, u64))> = None;
    loop {
        let now = Instant::now();
        if at_measure.is_none() && now >= measure_from {
            at_measure = Some((roundtrips, now, cpu_sample(args.watch_pid)?));
        }
        if now >= end {
            break;
        }
        let n = epoll
            .wait(&mut events, 100u16)
            .map_err(errno("epoll_wait"))?;
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream
                                .set_nodelay(true)
                                .and_then(|()| stream.set_nonblocking(true))
                                .map_err(|e| format!("echo socket: {e}"))?;
                            let slot = echoes.len() as u64;
                            epoll
                                .add(
                                    stream.as_fd(),
                                    EpollEvent::new(EpollFlags::EPOLLIN, ECHO_BIT | slot),
                                )
                                .map_err(errno("epoll_ctl"))?;
                            echoes.push(Some(Echo {
                                stream,
                                pending: Vec::new(),
                            }));
                        }
                        Err(e) if would_block(&e) => break,
                        Err(e) => return Err(format!("accept: {e}")),
                    }
                }
            } else if token & ECHO_BIT != 0 {
                let slot = (token & !ECHO_BIT) as usize;
                let Some(echo) = echoes.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                let mut closed = false;
                loop {
                    match (&echo.stream).read(&mut buf) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(n) => echo.pending.extend_from_slice(&buf[..n]),
                        Err(e) if would_block(&e) => break,
                        Err(_) => {
                            closed = true;
                            break;
                        }
                    }
                }
                while !echo.pending.is_empty() && !closed {
                    match (&echo.stream).write(&echo.pending) {
                        Ok(n) => {
                            echo.pending.drain(..n);
                        }
                        // A 64-byte ping-pong never fills a socket buffer;
                        // if it ever does, spin until it drains.
                        Err(e) if would_block(&e) => {}
                        Err(_) => closed = true,
                    }
                }
                if closed {
                    let _ = epoll.delete(echo.stream.as_fd());
                    echoes[slot] = None;
                }
            } else {
                let c = &mut clients[token as usize];
                loop {
                    match (&c.stream).read(&mut buf[..c.waiting]) {
                        Ok(0) => return Err("sluice closed a client connection".into()),
                        Ok(n) => {
                            c.waiting -= n;
                            if c.waiting == 0 {
                                roundtrips += 1;
                                (&c.stream)
                                    .write_all(&request)
                                    .map_err(|e| format!("request: {e}"))?;
                                c.waiting = args.size;
                            }
                        }
                        Err(e) if would_block(&e) => break,
                        Err(e) => return Err(format!("client read: {e}")),
                    }
                }
            }
        }
    }
    let (from, t0, cpu0) = match at_measure {
        Some(m) => m,
        None => (0, start, cpu_sample(args.watch_pid)?),
    };
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_sample(args.watch_pid)?;
    let counted = roundtrips - from;
    let rate = counted as f64 / seconds;
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let mut report = serde_json::json!({
        "roundtrips": counted,
        "roundtrips_total": roundtrips,
        "seconds": round3(seconds),
        "roundtrips_per_sec": rate.round(),
        "tool_cpu_seconds": round3((cpu1.1 - cpu0.1) as f64 / 1e9),
        "connections": args.connections,
        "size": args.size,
    });
    if let (Some(a), Some(b)) = (cpu0.0, cpu1.0) {
        let cpu = (b - a) as f64 / 1e9;
        report["sluice_cpu_seconds"] = round3(cpu).into();
        report["roundtrips_per_sluice_cpu_sec"] = (counted as f64 / cpu).round().into();
    }
    println!("{report}");
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match parse(&argv).and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metrics_overhead: {e}");
            ExitCode::from(1)
        }
    }
}
