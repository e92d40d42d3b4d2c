//! A tiny DNS backend and client for the UDP `dns` mode and DNS health
//! checks, built on hickory-proto messages over [`crate::udp::UdpServer`].
//!
//! [`DnsBackend`] answers every query with NOERROR, an `A` record (for `A`
//! queries) and a `TXT` record carrying its name, so a test sees which
//! backend answered ([`dns_tag`]). [`DnsBackend::set_mode`] makes it silent
//! or answer SERVFAIL, to drive health checks and query timeouts.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::Deref;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::net::{udp_recv_from, LOCALHOST};
use crate::udp::UdpServer;

/// How a [`DnsBackend`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DnsMode {
    /// NOERROR with records (the default).
    Answer = 0,
    /// No reply at all (a dead resolver).
    Silent = 1,
    /// SERVFAIL, no records.
    ServFail = 2,
}

/// The address in the `A` answers of a [`DnsBackend`] (TEST-NET-1).
pub const ANSWER_IPV4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// A DNS server on loopback that tags its answers with its name.
#[derive(Debug)]
pub struct DnsBackend {
    server: UdpServer,
    mode: Arc<AtomicU8>,
}

impl DnsBackend {
    /// A DNS backend called `name` on `127.0.0.1:<free port>`.
    pub fn start(name: &str) -> DnsBackend {
        Self::start_on(name, SocketAddr::new(LOCALHOST, 0))
    }

    /// A DNS backend called `name` on `addr`.
    pub fn start_on(name: &str, addr: SocketAddr) -> DnsBackend {
        let mode = Arc::new(AtomicU8::new(DnsMode::Answer as u8));
        let tag = name.to_string();
        let server_mode = mode.clone();
        let server = UdpServer::start(addr, move |payload, _| {
            let mode = match server_mode.load(Ordering::SeqCst) {
                1 => DnsMode::Silent,
                2 => DnsMode::ServFail,
                _ => DnsMode::Answer,
            };
            answer(payload, &tag, mode)
        });
        DnsBackend { server, mode }
    }

    /// Changes how it answers from now on.
    pub fn set_mode(&self, mode: DnsMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Deref for DnsBackend {
    type Target = UdpServer;
    fn deref(&self) -> &UdpServer {
        &self.server
    }
}

/// The reply to one query datagram, or `None` (malformed, not a query, or
/// silent mode).
fn answer(payload: &[u8], tag: &str, mode: DnsMode) -> Option<Vec<u8>> {
    let query = Message::from_vec(payload).ok()?;
    if query.metadata.message_type != MessageType::Query || mode == DnsMode::Silent {
        return None;
    }
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(query.queries.iter().cloned());
    if mode == DnsMode::ServFail {
        reply.metadata.response_code = ResponseCode::ServFail;
    } else if let Some(q) = query.queries.first() {
        if q.query_type() == RecordType::A {
            reply.add_answer(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A(ANSWER_IPV4)),
            ));
        }
        let txt = TXT::new(vec![tag.to_string()]);
        reply.add_answer(Record::from_rdata(q.name().clone(), 60, RData::TXT(txt)));
    }
    reply.to_vec().ok()
}

/// The wire form of a recursive query for `name` (e.g. `"example.com."`)
/// of type `qtype`, with message ID `id`.
pub fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let name = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name, qtype));
    message.to_vec().expect("encoding a DNS query")
}

/// Sends a query for `name`/`qtype` from `socket` to `to` with a random ID
/// and waits up to `timeout` for the reply with that ID (others are
/// skipped); `None` on timeout.
pub fn dns_query(
    socket: &UdpSocket,
    to: SocketAddr,
    name: &str,
    qtype: RecordType,
    timeout: Duration,
) -> Option<Message> {
    let id = fastrand::u16(..);
    socket
        .send_to(&query_bytes(id, name, qtype), to)
        .expect("udp send");
    let start = Instant::now();
    loop {
        let left = timeout.checked_sub(start.elapsed())?;
        let reply = udp_recv_from(socket, to, left)?;
        if let Ok(message) = Message::from_vec(&reply) {
            if message.metadata.id == id {
                return Some(message);
            }
        }
    }
}

/// The name of the [`DnsBackend`] that produced `reply` (its TXT answer).
pub fn dns_tag(reply: &Message) -> Option<String> {
    reply.answers.iter().find_map(|record| match &record.data {
        RData::TXT(txt) => Some(txt.to_string()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::udp_client;

    #[test]
    fn backend_answers_and_tags() {
        let backend = DnsBackend::start("r1");
        let client = udp_client();
        let reply = dns_query(
            &client,
            backend.addr(),
            "example.com.",
            RecordType::A,
            crate::DEADLINE,
        )
        .expect("an answer");
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(dns_tag(&reply).as_deref(), Some("r1"));
        backend.set_mode(DnsMode::ServFail);
        let reply = dns_query(
            &client,
            backend.addr(),
            "example.com.",
            RecordType::A,
            crate::DEADLINE,
        )
        .expect("an answer");
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        backend.set_mode(DnsMode::Silent);
        let none = dns_query(
            &client,
            backend.addr(),
            "example.com.",
            RecordType::A,
            Duration::from_millis(200),
        );
        assert!(none.is_none());
        assert_eq!(backend.received(), 3);
    }
}
