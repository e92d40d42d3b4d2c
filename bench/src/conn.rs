//! `conn`: one new TCP connection per request, `concurrency` at a time, on
//! one epoll loop. A request is: connect, write the request, read until the
//! server closes. Its latency runs from before `connect()` to end-of-stream,
//! so it includes the handshake and the load balancer's backend connect.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use socket2::{Domain, Socket, Type};

use crate::args::Args;

const DEFAULT_REQUEST: &str = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

#[derive(Debug)]
struct Opts {
    target: SocketAddr,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    timeout: Duration,
    request: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Reading,
}

#[derive(Debug)]
struct Slot {
    stream: TcpStream,
    started: Instant,
    state: State,
    got: usize,
    status_ok: bool,
}

#[derive(Debug, Default)]
struct Tally {
    /// Latencies (microseconds) of requests finished inside the window.
    lat_us: Vec<u32>,
    /// Every request finished with a 200, warm-up included.
    all_ok: u64,
    errors: u64,
    bad_status: u64,
    timeouts: u64,
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let opts = Opts {
        target: args.addr("target")?,
        concurrency: args.usize_or("concurrency", 32)?.max(1),
        warmup: args.duration_or("warmup", Duration::from_secs(1))?,
        duration: args.duration_or("duration", Duration::from_secs(10))?,
        timeout: args.duration_or("timeout", Duration::from_secs(5))?,
        request: args
            .str("request")
            .unwrap_or(DEFAULT_REQUEST)
            .replace("\\r\\n", "\r\n")
            .into_bytes(),
    };
    if opts.duration.is_zero() {
        return Err("--duration must be > 0".into());
    }
    crate::raise_nofile();
    let report = drive(&opts).map_err(|e| format!("{}: {e}", opts.target))?;
    println!("{report}");
    Ok(())
}

fn drive(o: &Opts) -> io::Result<serde_json::Value> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut slots: Vec<Option<Slot>> = (0..o.concurrency).map(|_| None).collect();
    let t0 = Instant::now();
    let window_start = t0 + o.warmup;
    let end = window_start + o.duration;
    let mut tally = Tally::default();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_sweep = t0;
    let in_window = |t: Instant| t >= window_start && t < end;

    for (i, slot) in slots.iter_mut().enumerate() {
        *slot = start(&epoll, o, i).ok();
    }
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let n = epoll.wait(&mut events, 10u16).or_else(|e| {
            if e == nix::errno::Errno::EINTR {
                Ok(0)
            } else {
                Err(e)
            }
        })?;
        for ev in &events[..n] {
            let i = ev.data() as usize;
            let Some(slot) = slots.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            match step(slot, &epoll, o, i, &mut buf) {
                Step::Pending => continue,
                Step::Done => {
                    let t = Instant::now();
                    if slot.status_ok {
                        tally.all_ok += 1;
                    }
                    if in_window(t) {
                        if slot.status_ok {
                            let us = t.duration_since(slot.started).as_micros();
                            tally.lat_us.push(us.min(u32::MAX as u128) as u32);
                        } else {
                            tally.bad_status += 1;
                        }
                    }
                }
                Step::Failed => {
                    if in_window(Instant::now()) {
                        tally.errors += 1;
                    }
                }
            }
            if let Some(old) = slots[i].take() {
                let _ = epoll.delete(&old.stream);
            }
            slots[i] = start(&epoll, o, i).ok();
        }
        // Every 50 ms: time out stuck requests, retry slots whose connect
        // could not even start (for example no free local port).
        let now = Instant::now();
        if now.duration_since(last_sweep) >= Duration::from_millis(50) {
            last_sweep = now;
            for (i, slot) in slots.iter_mut().enumerate() {
                let stuck = slot
                    .as_ref()
                    .is_some_and(|s| now.duration_since(s.started) > o.timeout);
                if stuck {
                    if let Some(old) = slot.take() {
                        let _ = epoll.delete(&old.stream);
                    }
                    if in_window(now) {
                        tally.timeouts += 1;
                    }
                }
                if slot.is_none() {
                    *slot = start(&epoll, o, i).ok();
                }
            }
        }
    }
    let secs = o.duration.as_secs_f64();
    let mut lat = tally.lat_us;
    lat.sort_unstable();
    let pct = |p: f64| -> Option<u32> {
        if lat.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        Some(lat[rank.clamp(1, lat.len()) - 1])
    };
    Ok(serde_json::json!({
        "tool": "conn",
        "target": o.target.to_string(),
        "concurrency": o.concurrency,
        "seconds": secs,
        "connections": lat.len(),
        "connections_per_s": lat.len() as f64 / secs,
        "all_connections": tally.all_ok,
        "all_seconds": t0.elapsed().as_secs_f64(),
        "errors": tally.errors,
        "bad_status": tally.bad_status,
        "timeouts": tally.timeouts,
        "p50_us": pct(50.0),
        "p90_us": pct(90.0),
        "p99_us": pct(99.0),
        "max_us": lat.last(),
    }))
}

fn start(epoll: &Epoll, o: &Opts, i: usize) -> io::Result<Slot> {
    let started = Instant::now();
    let sock = Socket::new(Domain::for_address(o.target), Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&o.target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream: TcpStream = sock.into();
    epoll.add(&stream, EpollEvent::new(EpollFlags::EPOLLOUT, i as u64))?;
    Ok(Slot {
        stream,
        started,
        state: State::Connecting,
        got: 0,
        status_ok: false,
    })
}

enum Step {
    Pending,
    Done,
    Failed,
}

fn step(slot: &mut Slot, epoll: &Epoll, o: &Opts, i: usize, buf: &mut [u8]) -> Step {
    if slot.state == State::Connecting {
        match slot.stream.take_error() {
            Ok(None) => {}
            _ => return Step::Failed,
        }
        match (&slot.stream).write(&o.request) {
            Ok(n) if n == o.request.len() => {}
            _ => return Step::Failed,
        }
        let ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, i as u64);
        let mut ev = ev;
        if epoll.modify(&slot.stream, &mut ev).is_err() {
            return Step::Failed;
        }
        slot.state = State::Reading;
        return Step::Pending;
    }
    loop {
        match (&slot.stream).read(buf) {
            Ok(0) => {
                return if slot.got > 0 {
                    Step::Done
                } else {
                    Step::Failed
                };
            }
            Ok(n) => {
                if slot.got == 0 {
                    slot.status_ok = buf[..n].starts_with(b"HTTP/1.1 200")
                        || buf[..n].starts_with(b"HTTP/1.0 200");
                }
                slot.got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Pending,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Failed,
        }
    }
}
