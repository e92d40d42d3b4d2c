//! Multishot receives into a provided-buffer ring, on real loopback sockets:
//! every byte arrives once and in order, buffers go back to the kernel, a
//! dry ring leaves the bytes in the socket, a cancel still delivers what
//! was received, and buffers of a dropped receive are reclaimed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use sluice_uring::bufring::{BufRing, Recv, RecvBuf, RecvStream};
use sluice_uring::{op, runtime, socket};

/// A loopback connection: (the peer's end, the end accepted through an
/// io_uring poll on the listener). Must run inside the runtime.
async fn accepted_pair() -> (TcpStream, TcpStream) {
    let listener = socket::tcp_listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    op::poll(listener.as_raw_fd(), op::READABLE).await.unwrap();
    let (stream, _) = socket::accept(&listener).unwrap();
    (peer, stream)
}

/// A ring of `entries` buffers of `size` bytes, a loopback connection
/// (peer end, accepted end) and a multishot receive armed on the accepted
/// end. Must run inside the runtime.
async fn receiving(entries: u16, size: usize) -> (Rc<BufRing>, TcpStream, TcpStream, RecvStream) {
    let ring = BufRing::new(0, entries, size).unwrap();
    let (peer, stream) = accepted_pair().await;
    let recv = RecvStream::new(stream.as_raw_fd(), &ring);
    (ring, peer, stream, recv)
}

/// Wait (at most 5 s) until the armed receive has taken what was sent: the
/// socket has nothing left to read. Nothing is read here, so nothing is
/// taken from the receive.
async fn until_received(stream: &TcpStream) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // Parking lets the runtime enter the ring, where the receive runs.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let (mask, _) = socket::ready_now(stream, op::READABLE, stream, op::READABLE).unwrap();
        if mask & op::READABLE == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no receive within 5 s"
        );
    }
}

/// The next completion, within a deadline.
async fn next(stream: &mut RecvStream) -> Recv {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a completion within 5 s")
}

fn data(r: Recv) -> (RecvBuf, bool) {
    match r {
        Recv::Data(buf, more) => (buf, more),
        other => panic!("expected bytes, got {other:?}"),
    }
}

/// A ring of 4 buffers carries 40 messages, one exchange at a time: each
/// arrives whole and in order, so every buffer went back to the kernel
/// (ten times over). End of stream ends the receive.
#[test]
fn messages_arrive_in_order_and_buffers_are_reused() {
    runtime::start(64, async {
        let (_ring, mut peer, stream, mut recv) = receiving(4, 1024).await;
        for i in 0..40u32 {
            let msg = format!("message {i:03}");
            peer.write_all(msg.as_bytes()).unwrap();
            let (buf, more) = data(next(&mut recv).await);
            assert_eq!(&*buf, msg.as_bytes());
            assert!(more, "the receive stays armed");
        }
        drop(peer);
        assert!(matches!(next(&mut recv).await, Recv::Eof));
        assert!(recv.is_done());
        op::close(stream).await;
    });
}

/// With every buffer held, the kernel stops the receive with ENOBUFS and
/// the bytes stay in the socket for a plain read; bytes received before
/// that are intact.
#[test]
fn a_dry_ring_stops_the_receive_and_leaves_the_bytes_in_the_socket() {
    runtime::start(64, async {
        let (ring, mut peer, stream, mut recv) = receiving(2, 64).await;
        let mut held = Vec::new();
        for msg in [&b"first"[..], b"second"] {
            peer.write_all(msg).unwrap();
            let (buf, _) = data(next(&mut recv).await);
            assert_eq!(&*buf, msg);
            held.push(buf);
        }
        peer.write_all(b"third").unwrap();
        match next(&mut recv).await {
            Recv::Stopped(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS), "{e}"),
            other => panic!("expected ENOBUFS, got {other:?}"),
        }
        assert!(recv.is_done());
        let mut buf = [0u8; 16];
        let n = socket::recv(stream.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"third");
        // Given back, the buffers serve a new receive.
        drop(held);
        let mut recv = RecvStream::new(stream.as_raw_fd(), &ring);
        peer.write_all(b"fourth").unwrap();
        let (buf, _) = data(next(&mut recv).await);
        assert_eq!(&*buf, b"fourth");
        drop(buf);
        op::close(stream).await;
    });
}

/// A cancelled receive still hands out what it received before the cancel
/// took effect, then ends with ECANCELED; nothing more is taken from the
/// socket afterwards.
#[test]
fn cancel_delivers_what_was_received_then_stops() {
    runtime::start(64, async {
        let (_ring, mut peer, stream, mut recv) = receiving(8, 256).await;
        peer.write_all(b"before").unwrap();
        // The kernel has received it; cancel before taking the completion.
        until_received(&stream).await;
        recv.request_cancel();
        let (buf, _) = data(next(&mut recv).await);
        assert_eq!(
            &*buf, b"before",
            "received bytes are not lost to the cancel"
        );
        drop(buf);
        match next(&mut recv).await {
            Recv::Stopped(e) => assert_eq!(e.raw_os_error(), Some(libc::ECANCELED), "{e}"),
            other => panic!("expected ECANCELED, got {other:?}"),
        }
        assert!(recv.is_done());
        peer.write_all(b"after").unwrap();
        op::poll(stream.as_raw_fd(), op::READABLE).await.unwrap();
        let mut buf = [0u8; 16];
        let n = socket::recv(stream.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"after",
            "the cancelled receive took nothing more"
        );
        op::close(stream).await;
    });
}

/// A receive dropped with a completion not taken leaves its buffer with
/// the runtime; closing the socket cancels the receive, and the next
/// receive armed on the ring publishes the buffer again, so a ring of one
/// buffer keeps working.
#[test]
fn buffers_of_a_dropped_receive_are_reclaimed() {
    runtime::start(64, async {
        let (ring, mut peer, stream, recv) = receiving(1, 128).await;
        peer.write_all(b"orphan").unwrap();
        // Wait until the kernel has received it (the socket is drained)
        // without taking the completion.
        until_received(&stream).await;
        drop(recv);
        op::close(stream).await;
        drop(peer);

        let (mut peer, stream) = accepted_pair().await;
        let mut recv = RecvStream::new(stream.as_raw_fd(), &ring);
        peer.write_all(b"again").unwrap();
        let (buf, _) = data(next(&mut recv).await);
        assert_eq!(&*buf, b"again", "the only buffer came back");
        drop(buf);
        op::close(stream).await;
        let mut rest = Vec::new();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(peer.read_to_end(&mut rest).unwrap(), 0, "closed: EOF");
    });
}
