//! The runtime wakes for every completion, whether it arrives while the
//! worker is busy or while it sleeps. The patched driver keeps its eventfd
//! quiet while the worker runs and turns it back on as it parks
//! (vendor/tokio-uring/PATCHES.md, fourth patch); a wake-up lost in that
//! hand-over would leave a message unanswered. A peer thread plays
//! ping-pong with a task on the runtime, pausing between rounds for no
//! time, a few microseconds, or long enough for the worker to fall asleep,
//! so that its messages land in every phase of the worker's cycle.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use sluice_uring::bufring::{BufRing, Recv, RecvStream};
use sluice_uring::{op, runtime, socket};

const ROUNDS: u32 = 2000;
/// How long any one round may take before the test calls it lost.
const ROUND_DEADLINE: Duration = Duration::from_secs(5);

/// The peer's side: send a byte, wait for it to come back, pause, repeat.
/// Panics (failing the test) if an answer is late.
fn ping(mut peer: TcpStream) {
    peer.set_read_timeout(Some(ROUND_DEADLINE)).unwrap();
    peer.set_nodelay(true).unwrap();
    let mut byte = [0u8; 1];
    for i in 0..ROUNDS {
        let sent = (i % 251) as u8;
        peer.write_all(&[sent]).unwrap();
        peer.read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("round {i}: no answer within 5 s ({e})"));
        assert_eq!(byte[0], sent, "round {i}: wrong byte back");
        match i % 4 {
            0 => {}
            1 => {
                let until = Instant::now() + Duration::from_micros(20);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            2 => thread::sleep(Duration::from_micros(200)),
            _ => thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// A loopback connection: (the peer's end, the worker's end, non-blocking).
fn echo_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (stream, _) = listener.accept().unwrap();
    stream.set_nonblocking(true).unwrap();
    (peer, stream)
}

/// Run `echo` on a runtime in a thread of its own while this thread plays
/// the peer: a lost wake-up fails the test here, with the round it was lost
/// in, rather than hanging it.
fn play<F: std::future::Future<Output = ()> + 'static>(
    echo: impl FnOnce(TcpStream) -> F + Send + 'static,
) {
    let (peer, stream) = echo_pair();
    let worker = thread::spawn(move || runtime::start(64, echo(stream)));
    ping(peer);
    worker.join().expect("the worker answered every round");
}

/// Echo with a one-shot poll and a `recv` per message.
#[test]
fn every_poll_completion_wakes_the_worker() {
    play(|stream| async move {
        let mut buf = [0u8; 16];
        for i in 0..ROUNDS {
            op::poll(stream.as_raw_fd(), op::READABLE).await.unwrap();
            let n = socket::recv(stream.as_raw_fd(), &mut buf).unwrap();
            assert_eq!(n, 1, "round {i}: one byte per round");
            assert_eq!(socket::send(stream.as_raw_fd(), &buf[..n]).unwrap(), n);
        }
    });
}

/// Echo with one multishot receive into a provided-buffer ring (how
/// keep-alive conversations receive).
#[test]
fn every_multishot_receive_wakes_the_worker() {
    play(|stream| async move {
        let ring = BufRing::new(0, 8, 1024).unwrap();
        let mut recv = RecvStream::new(stream.as_raw_fd(), &ring);
        let mut i = 0;
        while i < ROUNDS {
            match recv.next().await {
                Recv::Data(buf, more) => {
                    assert_eq!(buf.len(), 1, "round {i}: one byte per round");
                    assert_eq!(socket::send(stream.as_raw_fd(), &buf).unwrap(), 1);
                    i += 1;
                    if !more {
                        // The kernel ended the receive (its choice): arm
                        // a new one.
                        drop(buf);
                        recv = RecvStream::new(stream.as_raw_fd(), &ring);
                    }
                }
                other => panic!("round {i}: expected a byte, got {other:?}"),
            }
        }
    });
}
