//! io_uring ownership rules (STYLE.md habit 11), each with a test on real
//! loopback sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use sluice_uring::{op, pipe::PipePool, runtime, socket};

fn loopback_listener() -> TcpListener {
    socket::tcp_listener("127.0.0.1:0".parse().unwrap(), 128).unwrap()
}

/// A loopback connection: (the peer's end, the end accepted through an
/// io_uring poll on the listener). Must run inside the runtime.
async fn accepted_pair() -> (TcpStream, TcpStream) {
    let listener = loopback_listener();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    op::poll(listener.as_raw_fd(), op::READABLE).await.unwrap();
    let (stream, _) = socket::accept(&listener).unwrap();
    (peer, stream)
}

/// A poll that is dropped (e.g. on a timeout) stays in the kernel; `close`
/// cancels it in the kernel, so the socket really closes: the peer sees EOF
/// at once. (Descriptor counts are checked end to end on the sluice process.)
#[test]
fn close_cancels_pending_poll_and_really_closes() {
    runtime::start(64, async {
        let (mut peer, stream) = accepted_pair().await;

        // A poll for data that never comes, abandoned after a short timeout.
        let fd = stream.as_raw_fd();
        let waited =
            tokio::time::timeout(Duration::from_millis(50), op::poll(fd, op::READABLE)).await;
        assert!(
            waited.is_err(),
            "nothing was sent, the poll must still be pending"
        );

        op::close(stream).await;
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 8];
        let start = Instant::now();
        let n = peer.read(&mut buf).unwrap();
        assert_eq!(n, 0, "peer must see EOF after close");
        assert!(start.elapsed() < Duration::from_secs(1));
    });
}

/// Without the cancel, the kernel keeps the file alive behind the pending
/// poll: this shows why `close` exists (the peer sees no EOF).
#[test]
fn plain_drop_with_pending_poll_keeps_socket_alive() {
    runtime::start(64, async {
        let (mut peer, stream) = accepted_pair().await;
        let fd = stream.as_raw_fd();
        let _ = tokio::time::timeout(Duration::from_millis(20), op::poll(fd, op::READABLE)).await;
        drop(stream); // close(2) without cancelling the in-flight poll
                      // Let the runtime flush; then the peer must NOT have seen EOF.
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 8];
        let r = peer.read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "socket should linger while the poll holds it, got {r:?}"
        );
        // Writing wakes the lingering poll, which releases the file.
        peer.write_all(b"x").unwrap();
    });
}

#[test]
fn cancel_on_idle_fd_is_ok() {
    runtime::start(64, async {
        let listener = loopback_listener();
        assert_eq!(op::cancel_fd(listener.as_raw_fd()).await.unwrap(), 0);
    });
}

#[test]
fn poll_reports_readable_and_accept_returns_peer() {
    runtime::start(64, async {
        let listener = loopback_listener();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mask = op::poll(listener.as_raw_fd(), op::READABLE).await.unwrap();
        assert!(mask & op::READABLE != 0);
        let (stream, peer) = socket::accept(&listener).unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let err = socket::accept(&listener).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock, "accept must not block");
        op::close(stream).await;
    });
}

/// Non-blocking connect to a refused port reports the error through
/// poll + finish_connect.
#[test]
fn connect_refused_is_reported() {
    runtime::start(64, async {
        let l = loopback_listener();
        let addr = l.local_addr().unwrap();
        drop(l);
        let (stream, done) = match socket::connect_start(addr) {
            Ok(v) => v,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
                return;
            }
        };
        if !done {
            op::poll(stream.as_raw_fd(), op::WRITABLE).await.unwrap();
        }
        let err = socket::finish_connect(&stream).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
        op::close(stream).await;
    });
}

/// Splice moves bytes socket -> pipe -> socket; the pool reuses empty
/// pipes and says no past its limit.
#[test]
fn splice_through_pooled_pipe() {
    runtime::start(64, async {
        let listener = loopback_listener();
        let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        op::poll(listener.as_raw_fd(), op::READABLE).await.unwrap();
        let (b, _) = socket::accept(&listener).unwrap();
        let out_listener = loopback_listener();
        let c = TcpStream::connect(out_listener.local_addr().unwrap()).unwrap();
        c.set_nonblocking(true).unwrap();
        let mut d = out_listener.accept().unwrap().0;

        let mut pool = PipePool::new(2, 1, 1 << 20);
        let mut pipe = pool.get().unwrap();
        let _second = pool.get().unwrap();
        assert!(pool.get().is_none(), "pool limit is 2");

        a.write_all(b"hello splice").unwrap();
        op::poll(b.as_raw_fd(), op::READABLE).await.unwrap();
        let n = pipe.fill_from(&b).unwrap();
        assert_eq!(n, 12);
        assert_eq!(pipe.drain_to(&c).unwrap(), 12);
        assert_eq!(pipe.pending(), 0);
        let mut buf = [0u8; 12];
        d.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello splice");

        pool.put(pipe);
        assert_eq!(pool.idle(), 1);
        assert!(pool.get().is_some(), "returned pipe is reused");
        op::close(b).await;
        op::close(c).await;
    });
}

/// Accepted sockets inherit TCP_NODELAY from the listener.
#[test]
fn accepted_sockets_have_nodelay() {
    runtime::start(64, async {
        let (_client, stream) = accepted_pair().await;
        assert!(stream.nodelay().unwrap());
        op::close(stream).await;
    });
}

/// A multishot poll reports one event per arrival, stays armed between
/// them, and `close` cancels it: the peer sees EOF, and the runtime ends
/// (its driver would wait forever for an operation nobody cancelled).
#[test]
fn poll_stream_reports_each_arrival_and_close_cancels_it() {
    runtime::start(64, async {
        let (mut peer, stream) = accepted_pair().await;
        let mut polls = op::PollStream::new(stream.as_raw_fd(), op::READABLE);
        let mut buf = [0u8; 64];
        for round in 0..20u8 {
            peer.write_all(&[round; 3]).unwrap();
            let mask = tokio::time::timeout(Duration::from_secs(2), polls.next())
                .await
                .expect("an event for each arrival")
                .unwrap();
            assert!(mask & op::READABLE != 0, "mask {mask:#x}");
            // The event may be one already taken by the previous read:
            // read until this round's bytes are there.
            let mut got = Vec::new();
            while got.len() < 3 {
                match (&stream).read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        polls.next().await.unwrap();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, [round; 3]);
            assert!(!polls.is_done(), "still armed after round {round}");
        }
        // Nothing more arrives: no event.
        for _ in 0..3 {
            let Ok(r) = tokio::time::timeout(Duration::from_millis(30), polls.next()).await else {
                break;
            };
            // Only a leftover report of the last arrival can come.
            r.unwrap();
            assert!(
                matches!((&stream).read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock)
            );
        }
        drop(polls);
        op::close(stream).await;
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(
            peer.read(&mut buf).unwrap(),
            0,
            "peer must see EOF after close"
        );
    });
}

/// `PollStream::cancel` stops just that poll in the kernel: a plain close
/// afterwards really closes the socket (the peer sees EOF), which it would
/// not with the poll still holding the file.
#[test]
fn poll_stream_cancel_releases_the_socket() {
    runtime::start(64, async {
        let (mut peer, stream) = accepted_pair().await;
        let mut polls = op::PollStream::new(stream.as_raw_fd(), op::READABLE);
        peer.write_all(b"hi").unwrap();
        polls.next().await.unwrap();
        // The peer waits for the close in a thread while the runtime runs
        // (it submits the cancel when it next parks).
        let reader = std::thread::spawn(move || {
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 8];
            peer.read(&mut buf)
        });
        polls.cancel();
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "the peer read did not return");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = reader.join().unwrap();
        // The unread "hi" makes the close a reset; either way the peer
        // learns at once that the socket is gone.
        assert!(
            matches!(&r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "peer must see the close, got {r:?}"
        );
    });
}
