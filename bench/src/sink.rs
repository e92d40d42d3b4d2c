//! `sink`: an echo server on one or more addresses that keeps every
//! connection until the peer closes it. One epoll loop; runs until killed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use crate::args::{parse_addr, Args};

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let addrs = args.all("listen");
    if addrs.is_empty() {
        return Err("--listen is required".into());
    }
    crate::raise_nofile();
    let mut listeners = Vec::new();
    for a in addrs {
        let addr = parse_addr(a)?;
        let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        listeners.push(l);
    }
    let bound: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    println!(
        "{}",
        serde_json::json!({"tool": "sink", "listening": bound})
    );
    let _ = io::stdout().flush();
    serve(&listeners).map_err(|e| e.to_string())
}

fn serve(listeners: &[TcpListener]) -> io::Result<()> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, l) in listeners.iter().enumerate() {
        epoll.add(l, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
    }
    let first_conn = listeners.len() as u64;
    let mut next = first_conn;
    let mut conns: HashMap<u64, TcpStream> = HashMap::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match epoll.wait(&mut events, 1000u16) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token < first_conn {
                let l = &listeners[token as usize];
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(true)?;
                            epoll.add(&s, EpollEvent::new(EpollFlags::EPOLLIN, next))?;
                            conns.insert(next, s);
                            next += 1;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // EMFILE and friends: leave the rest in the backlog.
                        Err(_) => break,
                    }
                }
                continue;
            }
            let close = match conns.get(&token) {
                None => false,
                Some(s) => echo(s, &mut buf),
            };
            if close {
                if let Some(s) = conns.remove(&token) {
                    let _ = epoll.delete(&s);
                }
            }
        }
    }
}

/// Echo what is readable; true when the connection is finished.
fn echo(mut s: &TcpStream, buf: &mut [u8]) -> bool {
    loop {
        match s.read(buf) {
            Ok(0) => return true,
            Ok(n) => {
                // Small exchanges only: a short write drops the rest.
                if s.write_all(&buf[..n]).is_err() {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}
