//! The health-check probes against real sockets on loopback (port 0), and
//! the checker tasks feeding reports into a channel.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use sluice_config::{CheckKind, DnsQuery};
use sluice_control::health::{probe, spawn_checkers, CheckReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

const LIMIT: Duration = Duration::from_secs(5);

async fn run(kind: CheckKind, addr: SocketAddr) -> Result<(), String> {
    tokio::time::timeout(LIMIT, probe(kind, addr))
        .await
        .expect("probe finished in time")
}

/// An address nothing listens on (bound, then closed).
async fn closed_tcp_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn tcp_passes_on_connect_and_fails_when_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    assert_eq!(run(CheckKind::Tcp, addr).await, Ok(()));
    drop(listener);
    assert_eq!(
        run(CheckKind::Tcp, addr).await,
        Err("connection refused".to_string())
    );
}

#[tokio::test]
async fn tcp_passes_against_a_backend_that_accepts_and_resets() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    // The handshake completes every time, whoever wins the race with the
    // reset.
    for _ in 0..50 {
        assert_eq!(run(CheckKind::Tcp, addr).await, Ok(()));
    }
}

/// A server that answers every connection with `reply` after reading
/// `expect_in` bytes, then closes.
async fn reply_server(expect_in: usize, reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; expect_in];
                if s.read_exact(&mut buf).await.is_err() || buf != b"PING\r\n"[..expect_in] {
                    return;
                }
                // Dribble the reply to exercise reassembly.
                for chunk in reply.chunks(2) {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        }
    });
    addr
}

fn send_expect(send: &[u8], expect: &[u8]) -> CheckKind {
    CheckKind::SendExpect {
        send: send.to_vec(),
        expect: expect.to_vec(),
    }
}

#[tokio::test]
async fn send_expect_checks_the_first_bytes_of_the_reply() {
    let good = reply_server(6, b"+PONG\r\nmore").await;
    assert_eq!(run(send_expect(b"PING\r\n", b"+PONG"), good).await, Ok(()));

    let bad = reply_server(6, b"-ERR busy\r\n").await;
    // It fails on the first bytes that differ (here "-E"), without waiting
    // for the rest.
    let err = run(send_expect(b"PING\r\n", b"+PONG"), bad)
        .await
        .unwrap_err();
    assert!(
        err.starts_with("unexpected reply \"-E") && err.ends_with("expected \"+PONG\""),
        "{err}"
    );

    let silent_close = reply_server(6, b"").await;
    assert_eq!(
        run(send_expect(b"PING\r\n", b"+PONG"), silent_close).await,
        Err("connection closed without a reply".to_string())
    );

    let short = reply_server(6, b"+PO").await;
    assert_eq!(
        run(send_expect(b"PING\r\n", b"+PONG"), short).await,
        Err("connection closed after \"+PO\"".to_string())
    );

    assert_eq!(
        run(send_expect(b"PING\r\n", b"+PONG"), closed_tcp_addr().await).await,
        Err("connection refused".to_string())
    );
}

#[tokio::test]
async fn send_expect_without_a_reply_is_bounded_by_the_caller() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts (in the backlog) but never answers.
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        probe(send_expect(b"PING\r\n", b"+PONG"), addr),
    )
    .await;
    assert!(r.is_err(), "still waiting for a reply");
    drop(listener);
}

#[derive(Clone, Copy)]
enum DnsBehaviour {
    NoError,
    ServFail,
    /// First a reply with another ID (must be ignored), then the real one.
    WrongIdFirst,
    Silent,
}

async fn dns_server(
    behaviour: DnsBehaviour,
) -> (SocketAddr, tokio::task::JoinHandle<Vec<Message>>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        let Ok(Ok((n, from))) = tokio::time::timeout(LIMIT, socket.recv_from(&mut buf)).await
        else {
            return seen;
        };
        let q = Message::from_vec(&buf[..n]).unwrap();
        seen.push(q.clone());
        let reply = |id, code| {
            let mut r = Message::response(id, q.metadata.op_code);
            r.metadata.response_code = code;
            r.add_queries(q.queries.iter().cloned());
            r.to_vec().unwrap()
        };
        match behaviour {
            DnsBehaviour::NoError => drop(
                socket
                    .send_to(&reply(q.metadata.id, ResponseCode::NoError), from)
                    .await,
            ),
            DnsBehaviour::ServFail => drop(
                socket
                    .send_to(&reply(q.metadata.id, ResponseCode::ServFail), from)
                    .await,
            ),
            DnsBehaviour::WrongIdFirst => {
                let other = q.metadata.id.wrapping_add(1);
                let _ = socket
                    .send_to(&reply(other, ResponseCode::ServFail), from)
                    .await;
                let _ = socket
                    .send_to(&reply(q.metadata.id, ResponseCode::NoError), from)
                    .await;
            }
            DnsBehaviour::Silent => {}
        }
        seen
    });
    (addr, task)
}

fn dns_check() -> CheckKind {
    CheckKind::Dns(DnsQuery {
        name: "health.example.".into(),
        qtype: "A".into(),
    })
}

#[tokio::test]
async fn dns_check_sends_a_real_query_and_needs_noerror() {
    let (addr, server) = dns_server(DnsBehaviour::NoError).await;
    assert_eq!(run(dns_check(), addr).await, Ok(()));
    let seen = server.await.unwrap();
    let q = &seen[0];
    assert_eq!(q.metadata.message_type, MessageType::Query);
    assert!(q.metadata.recursion_desired);
    assert_eq!(q.queries[0].name().to_ascii(), "health.example.");
    assert_eq!(q.queries[0].query_type().to_string(), "A");

    let (addr, _) = dns_server(DnsBehaviour::ServFail).await;
    assert_eq!(
        run(dns_check(), addr).await,
        Err("answered SERVFAIL".to_string())
    );

    let (addr, _) = dns_server(DnsBehaviour::WrongIdFirst).await;
    assert_eq!(run(dns_check(), addr).await, Ok(()));
}

#[tokio::test]
async fn dns_check_ids_are_random() {
    let mut ids = std::collections::HashSet::new();
    for _ in 0..4 {
        let (addr, server) = dns_server(DnsBehaviour::NoError).await;
        assert_eq!(run(dns_check(), addr).await, Ok(()));
        ids.insert(server.await.unwrap()[0].metadata.id);
    }
    assert!(ids.len() > 1, "the same ID four times: {ids:?}");
}

#[tokio::test]
async fn dns_check_fails_on_a_closed_port_or_silence() {
    let closed = {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.local_addr().unwrap()
    };
    assert_eq!(
        run(dns_check(), closed).await,
        Err("connection refused".to_string())
    );
    let (addr, _) = dns_server(DnsBehaviour::Silent).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), probe(dns_check(), addr))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn checkers_report_every_backend_with_their_generation() {
    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let down_addr = closed_tcp_addr().await;
    let yaml = format!(
        "services:\n  - name: web\n    protocol: tcp\n    listen: [\"127.0.0.1:1\"]\n    \
         health_check: {{ kind: tcp, interval: 50ms, timeout: 40ms }}\n    backends:\n      \
         - address: {up_addr}\n      - address: {down_addr}\n"
    );
    let config = sluice_config::load_str(&yaml, "t.yaml").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<CheckReport>();
    let tasks = spawn_checkers(&config.services[0], 7, &tx);
    assert_eq!(tasks.len(), 2);
    let mut reports = Vec::new();
    while reports.len() < 6 {
        let r = tokio::time::timeout(LIMIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.service.as_str(), r.generation), ("web", 7));
        reports.push(r);
    }
    for t in tasks {
        t.abort();
    }
    assert!(reports
        .iter()
        .any(|r| r.backend == up_addr && r.outcome.is_ok()));
    assert!(reports
        .iter()
        .any(|r| r.backend == down_addr && r.outcome == Err("connection refused".into())));
    assert!(reports
        .iter()
        .all(|r| (r.backend == up_addr) == r.outcome.is_ok()));

    // kind none: no checker at all.
    let none = yaml.replace("kind: tcp,", "kind: none,");
    let config = sluice_config::load_str(&none, "t.yaml").unwrap();
    assert!(spawn_checkers(&config.services[0], 8, &tx).is_empty());
    drop(up);
}
