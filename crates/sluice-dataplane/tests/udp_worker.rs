//! In-process tests of the UDP dataplane: one real worker (its own
//! io_uring runtime) fed with routes and a listener on port 0, real UDP
//! sockets on loopback as clients and backends, metrics read directly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_balance::{Algorithm, BuildOptions, Endpoint, Load, Member, Snapshot};
use sluice_dataplane::{
    spawn_worker, BackendRoute, ServiceLimit, ServiceRoutes, WorkerConfig, WorkerHandle, WorkerMsg,
};
use sluice_metrics::{BackendMetrics, ServiceMetrics};

const DEADLINE: Duration = Duration::from_secs(10);
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Datagrams a backend received, with their sources.
type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A loopback UDP backend answering each datagram with `reply(data)` (any
/// number of datagrams back).
struct Backend {
    addr: SocketAddr,
    socket: UdpSocket,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    seen: Seen,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(reply: impl Fn(&[u8]) -> Vec<Vec<u8>> + Send + 'static) -> Backend {
        let socket = UdpSocket::bind((LOCAL, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let mine = socket.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, received, seen) = (stop.clone(), received.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        received.fetch_add(1, Ordering::SeqCst);
                        seen.lock().unwrap().push((from, buf[..n].to_vec()));
                        for r in reply(&buf[..n]) {
                            let _ = socket.send_to(&r, from);
                        }
                    }
                }
            })
        };
        Backend {
            addr,
            socket: mine,
            stop,
            received,
            seen,
            thread: Some(thread),
        }
    }

    /// Echoes with its `tag` byte prepended.
    fn tagged(tag: u8) -> Backend {
        Backend::start(move |d| {
            let mut r = vec![tag];
            r.extend_from_slice(d);
            vec![r]
        })
    }

    fn peers(&self) -> Vec<SocketAddr> {
        let mut p: Vec<_> = self.seen.lock().unwrap().iter().map(|(a, _)| *a).collect();
        p.sort();
        p.dedup();
        p
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A DNS-ish reply: same bytes with QR set.
fn as_response(q: &[u8]) -> Vec<u8> {
    let mut r = q.to_vec();
    if r.len() > 2 {
        r[2] |= 0x80;
    }
    r
}

fn query(id: u16, body: &[u8]) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(body);
    q
}

struct Lb {
    worker: Option<WorkerHandle>,
    routes: Arc<ServiceRoutes>,
    listen: SocketAddr,
}

impl Lb {
    /// One worker serving a udp service described by `udp` (the YAML flow
    /// mapping of `udp:`), balancing `algorithm` over `backends`, of which
    /// those in `down` are unhealthy. Listens on `listen_ip:0`.
    fn start(udp: &str, extra: &str, backends: &[SocketAddr], listen_ip: IpAddr) -> Lb {
        let socket = sluice_uring::socket::udp_socket(SocketAddr::new(listen_ip, 0)).unwrap();
        let listen = socket.local_addr().unwrap();
        let routes = routes(udp, extra, backends, &[], None);
        let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(_rx);
        let mut cfg = WorkerConfig::new(0, 1);
        cfg.pin = false;
        cfg.ring_entries = 256;
        let worker = spawn_worker(cfg, events).unwrap();
        worker.send(WorkerMsg::Routes(vec![routes.clone()]));
        worker.send(WorkerMsg::AddUdpListener {
            service: "u".into(),
            addr: listen,
            socket,
        });
        Lb {
            worker: Some(worker),
            routes,
            listen,
        }
    }

    fn send(&self, msg: WorkerMsg) {
        self.worker.as_ref().unwrap().send(msg);
    }

    fn metrics(&self) -> &ServiceMetrics {
        &self.routes.metrics
    }

    /// New routes with the same metric objects, `down` backends unhealthy.
    fn set_down(&mut self, down: &[usize]) {
        let addrs: Vec<SocketAddr> = self.routes.backends.iter().map(|b| b.addr).collect();
        let service = self.routes.service.clone();
        let new = routes_for(service, &addrs, down, Some(&self.routes));
        self.routes = new.clone();
        self.send(WorkerMsg::Routes(vec![new]));
    }

    fn shutdown(&mut self) -> Duration {
        let w = self.worker.take().unwrap();
        let t0 = Instant::now();
        w.send(WorkerMsg::Shutdown {
            deadline: Instant::now() + Duration::from_secs(5),
        });
        w.join();
        t0.elapsed()
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if self.worker.is_some() {
            self.shutdown();
        }
    }
}

fn routes(
    udp: &str,
    extra: &str,
    backends: &[SocketAddr],
    down: &[usize],
    old: Option<&ServiceRoutes>,
) -> Arc<ServiceRoutes> {
    let mut yaml = format!(
        "services:\n  - name: u\n    protocol: udp\n    listen: [\"127.0.0.1:1\"]\n    udp: {udp}\n{extra}    backends:\n"
    );
    for b in backends {
        yaml.push_str(&format!("      - address: \"{b}\"\n"));
    }
    let cfg = sluice_config::load_str(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    routes_for(Arc::new(cfg.services[0].clone()), backends, down, old)
}

fn routes_for(
    service: Arc<sluice_config::Service>,
    backends: &[SocketAddr],
    down: &[usize],
    old: Option<&ServiceRoutes>,
) -> Arc<ServiceRoutes> {
    let algorithm = match service.balance {
        sluice_config::Balance::RoundRobin => Algorithm::RoundRobin,
        sluice_config::Balance::LeastConn => Algorithm::LeastConn,
        _ => Algorithm::Maglev,
    };
    let mut routes = Vec::new();
    let mut members = Vec::new();
    for (i, addr) in backends.iter().enumerate() {
        let (load, metrics) = match old.and_then(|o| o.backends.iter().find(|b| b.addr == *addr)) {
            Some(b) => (b.load.clone(), b.metrics.clone()),
            None => (
                Arc::new(Load::default()),
                Arc::new(BackendMetrics::new("u", &addr.to_string(), 1)),
            ),
        };
        if !down.contains(&i) {
            members.push(Member::new(
                Endpoint::from_address(i as u32, 100, &addr.to_string()),
                load.clone(),
                0,
            ));
        }
        routes.push(BackendRoute {
            addr: *addr,
            load,
            metrics,
            max_connections: 0,
        });
    }
    Arc::new(ServiceRoutes {
        service,
        snapshot: Snapshot::build(algorithm, members, BuildOptions::default()),
        backends: routes,
        metrics: old.map_or_else(
            || Arc::new(ServiceMetrics::new("u", 1)),
            |o| o.metrics.clone(),
        ),
        limit: old.map_or_else(|| Arc::new(ServiceLimit::default()), |o| o.limit.clone()),
    })
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind((LOCAL, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

/// Send `data` and wait for one reply (retrying the send while the worker
/// may still be starting).
fn request(c: &UdpSocket, to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let start = Instant::now();
    loop {
        c.send_to(data, to).unwrap();
        match c.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(from, to, "reply from the address the client sent to");
                return buf[..n].to_vec();
            }
            Err(_) => assert!(start.elapsed() < DEADLINE, "no reply from {to}"),
        }
    }
}

fn recv_none(c: &UdpSocket, wait: Duration) -> bool {
    c.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    let none = c.recv_from(&mut buf).is_err();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    none
}

#[test]
fn dns_ids_are_rewritten_restored_and_extra_replies_are_orphans() {
    // Every query is answered twice: the second copy matches nothing.
    let backend = Backend::start(|q| vec![as_response(q), as_response(q)]);
    let lb = Lb::start("{ mode: dns }", "", &[backend.addr], LOCAL);
    let c = client();
    // The first exchange also waits for the worker to be up.
    let reply = request(&c, lb.listen, &query(0x4242, b"warmup"));
    assert_eq!(&reply[..2], &[0x42, 0x42]);
    eventually("the orphan of the warm-up", || {
        lb.metrics().dns_orphan_reply.get() >= 1
    });
    let base_answered = lb.metrics().dns_answered.get();
    for i in 0..200u32 {
        let q = query(0x4242, &i.to_be_bytes());
        c.send_to(&q, lb.listen).unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = c.recv_from(&mut buf).expect("an answer");
        // The original ID is restored, the rest is the backend's reply.
        assert_eq!(&buf[..n], &as_response(&q)[..]);
    }
    // Sends are counted once their batch's `sendmmsg` returns, which can be
    // after the client has read the reply: wait for those counts too.
    eventually("every answer, its send and every orphan counted", || {
        let m = lb.metrics();
        m.dns_answered.get() == base_answered + 200
            && m.dns_orphan_reply.get() >= 201
            && m.udp_to_client.get() == m.udp_to_backend.get()
    });
    assert!(
        recv_none(&c, Duration::from_millis(100)),
        "orphans never reach the client"
    );
    // The backend saw worker-chosen IDs, all different although the
    // client always used the same one.
    let seen = backend.seen.lock().unwrap();
    let mut ids: Vec<u16> = seen
        .iter()
        .map(|(_, d)| u16::from_be_bytes([d[0], d[1]]))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert!(ids.len() >= 200, "only {} distinct upstream IDs", ids.len());
    // A small pool of upstream sockets, not one per query.
    drop(seen);
    assert!(
        backend.peers().len() <= 4,
        "upstream sockets: {:?}",
        backend.peers()
    );
    let m = lb.metrics();
    assert_eq!(m.udp_to_backend.get(), m.udp_to_client.get());
    assert_eq!(m.dns_timeout.get(), 0);
    let b = &lb.routes.backends[0].metrics;
    assert_eq!(b.connections.get(), m.udp_to_backend.get());
    assert!(b.bytes_to_backend.get() > 0 && b.bytes_to_client.get() == b.bytes_to_backend.get());
}

#[test]
fn dns_bursts_from_many_clients_each_get_their_own_answers() {
    // Replies carry the backend's tag after the query's bytes.
    let tagged = |tag: u8| {
        Backend::start(move |q| {
            let mut r = as_response(q);
            r.push(tag);
            vec![r]
        })
    };
    let backends = [tagged(b'A'), tagged(b'B')];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = Lb::start("{ mode: dns }", "", &addrs, LOCAL);
    let clients: Vec<UdpSocket> = (0..16).map(|_| client()).collect();
    request(&clients[0], lb.listen, &query(7, b"warmup"));
    let base = lb.metrics().dns_answered.get();
    // Every client sends its 8 queries before anyone reads: the worker
    // takes them (and their answers) many to a batch, and sends each batch
    // with one call per socket.
    const PER_CLIENT: u16 = 8;
    for (c, sock) in clients.iter().enumerate() {
        for k in 0..PER_CLIENT {
            let id = c as u16 * 100 + k;
            sock.send_to(&query(id, &[c as u8, k as u8]), lb.listen)
                .unwrap();
        }
    }
    let mut per_backend = [0usize; 2];
    for (c, sock) in clients.iter().enumerate() {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while got.len() < PER_CLIENT as usize {
            let (n, from) = sock.recv_from(&mut buf).expect("an answer to each query");
            assert_eq!(from, lb.listen);
            let (reply, tag) = buf[..n].split_at(n - 1);
            let id = u16::from_be_bytes([reply[0], reply[1]]);
            let k = id.wrapping_sub(c as u16 * 100);
            assert!(k < PER_CLIENT, "client {c} got an answer for ID {id}");
            assert_eq!(reply, &as_response(&query(id, &[c as u8, k as u8]))[..]);
            per_backend[(tag[0] - b'A') as usize] += 1;
            got.push(k);
        }
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), PER_CLIENT as usize, "client {c}: {got:?}");
    }
    // Balanced by client (this service's default algorithm hashes the
    // flow): both backends get some of the 16 clients.
    assert!(
        per_backend[0] > 0 && per_backend[1] > 0 && per_backend[0] + per_backend[1] == 128,
        "answers per backend: {per_backend:?}"
    );
    // A reply is counted as answered when it is matched, but as sent (and
    // its bytes) only once its batch's `sendmmsg` returns, which can be
    // after the client has read it: wait for both.
    eventually("every answer counted and its send too", || {
        let m = lb.metrics();
        m.dns_answered.get() == base + 128 && m.udp_to_client.get() + m.udp_dropped.get() == 129
    });
    let m = lb.metrics();
    assert_eq!(m.udp_to_backend.get(), 129);
    assert_eq!(m.udp_to_client.get(), 129);
    assert_eq!(m.udp_dropped.get(), 0);
    let sent: u64 = lb
        .routes
        .backends
        .iter()
        .map(|b| b.metrics.connections.get())
        .sum();
    assert_eq!(sent, 129);
    for b in &lb.routes.backends {
        // Each answer is one tag byte longer than its query.
        let m = &b.metrics;
        assert_eq!(
            m.bytes_to_client.get(),
            m.bytes_to_backend.get() + m.connections.get()
        );
    }
}

#[test]
fn unanswered_dns_queries_time_out_and_late_replies_are_orphans() {
    let late: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let kept = late.clone();
    // Answers only queries whose body starts with 'a'; keeps the others.
    let backend = Backend::start(move |q| {
        if q.get(12) == Some(&b'a') {
            vec![as_response(q)]
        } else {
            kept.lock().unwrap().push(q.to_vec());
            vec![]
        }
    });
    let lb = Lb::start(
        "{ mode: dns, query_timeout: 200ms }",
        "",
        &[backend.addr],
        LOCAL,
    );
    let c = client();
    request(&c, lb.listen, &query(1, b"a"));
    let t0 = Instant::now();
    for i in 0..5u16 {
        c.send_to(&query(i, b"silent"), lb.listen).unwrap();
    }
    eventually("5 timeouts", || lb.metrics().dns_timeout.get() == 5);
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "expired before query_timeout"
    );
    assert_eq!(late.lock().unwrap().len(), 5);
    // The backend answers the expired queries now: orphans, never delivered.
    let before = lb.metrics().dns_orphan_reply.get();
    let silent: Vec<(SocketAddr, Vec<u8>)> = backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, d)| d.get(12) != Some(&b'a'))
        .cloned()
        .collect();
    for (from, q) in &silent {
        backend.socket.send_to(&as_response(q), from).unwrap();
    }
    eventually("5 orphans", || {
        lb.metrics().dns_orphan_reply.get() == before + 5
    });
    assert!(recv_none(&c, Duration::from_millis(50)));
    assert_eq!(lb.metrics().dns_answered.get(), 1);
    // Still answering.
    assert_eq!(&request(&c, lb.listen, &query(9, b"a"))[..2], &[0, 9]);
}

#[test]
fn malformed_datagrams_are_dropped_and_counted() {
    let backend = Backend::start(|q| vec![as_response(q)]);
    let lb = Lb::start("{ mode: dns }", "", &[backend.addr], LOCAL);
    let c = client();
    request(&c, lb.listen, &query(1, b"x"));
    let forwarded = backend.received.load(Ordering::SeqCst);
    c.send_to(&[], lb.listen).unwrap();
    c.send_to(&[1u8; 11], lb.listen).unwrap();
    c.send_to(&as_response(&query(7, b"not a query")), lb.listen)
        .unwrap();
    eventually("3 drops", || lb.metrics().udp_dropped.get() == 3);
    // The largest datagram is a valid (if odd) query: it is forwarded whole.
    let mut big = query(0x0102, &[]);
    big.resize(65507, 0x61);
    c.send_to(&big, lb.listen).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = c.recv_from(&mut buf).expect("the big answer");
    assert_eq!(&buf[..n], &as_response(&big)[..]);
    assert_eq!(backend.received.load(Ordering::SeqCst), forwarded + 1);
    assert_eq!(lb.metrics().udp_dropped.get(), 3);
}

#[test]
fn truncated_replies_pass_through_untouched_but_the_id() {
    // TC set, an arbitrary body the client must get byte for byte.
    let backend = Backend::start(|q| {
        let mut r = as_response(q);
        r[2] |= 0x02;
        r.truncate(12);
        r.extend_from_slice(b"\xde\xad\xbe\xef truncated");
        vec![r]
    });
    let lb = Lb::start("{ mode: dns }", "", &[backend.addr], LOCAL);
    let c = client();
    let reply = request(&c, lb.listen, &query(0xabcd, b"q"));
    assert_eq!(&reply[..2], &[0xab, 0xcd]);
    assert_eq!(reply[2] & 0x82, 0x82, "QR and TC kept");
    assert_eq!(&reply[12..], b"\xde\xad\xbe\xef truncated");
}

#[test]
fn dns_queries_spread_round_robin_and_skip_a_forgotten_backend() {
    let backends: Vec<Backend> = (0..3)
        .map(|_| Backend::start(|q| vec![as_response(q)]))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut lb = Lb::start("{ mode: dns }", "    balance: round_robin\n", &addrs, LOCAL);
    let c = client();
    request(&c, lb.listen, &query(0, b"w"));
    for i in 0..299u16 {
        request(&c, lb.listen, &query(i, b"q"));
    }
    let counts: Vec<usize> = backends
        .iter()
        .map(|b| b.received.load(Ordering::SeqCst))
        .collect();
    assert_eq!(
        counts,
        vec![100, 100, 100],
        "one client, each query balanced on its own"
    );
    // Backend 1 goes down: no query reaches it any more.
    lb.set_down(&[1]);
    lb.send(WorkerMsg::ForgetBackend {
        service: "u".into(),
        backend: addrs[1],
    });
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..100u16 {
        request(&c, lb.listen, &query(i, b"q"));
    }
    assert_eq!(backends[1].received.load(Ordering::SeqCst), 100);
    assert_eq!(
        backends[0].received.load(Ordering::SeqCst) + backends[2].received.load(Ordering::SeqCst),
        300
    );
}

#[test]
fn session_flow_keeps_its_backend_until_forgotten() {
    let backends: Vec<Backend> = (0..2).map(|i| Backend::tagged(b'A' + i)).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut lb = Lb::start(
        "{ mode: session }",
        "    balance: round_robin\n    access_log: true\n",
        &addrs,
        LOCAL,
    );
    let c = client();
    let first = request(&c, lb.listen, b"hello")[0];
    for _ in 0..20 {
        let r = request(&c, lb.listen, b"again");
        assert_eq!(r[0], first, "a flow keeps its backend");
        assert_eq!(&r[1..], b"again");
    }
    assert_eq!(lb.metrics().udp_sessions.get(), 1);
    let idx = (first - b'A') as usize;
    assert_eq!(lb.routes.backends[idx].metrics.active.get(), 1);
    assert_eq!(
        lb.routes.backends[idx].load.active.load(Ordering::SeqCst),
        1
    );
    assert_eq!(
        backends[idx].peers().len(),
        1,
        "one upstream socket per flow"
    );
    // Its backend goes down: the flow is forgotten, the next datagram goes
    // to the other backend.
    lb.set_down(&[idx]);
    lb.send(WorkerMsg::ForgetBackend {
        service: "u".into(),
        backend: addrs[idx],
    });
    eventually("the flow forgotten", || {
        lb.metrics().udp_sessions.get() == 0
    });
    assert_eq!(lb.routes.backends[idx].metrics.active.get(), 0);
    assert_eq!(
        lb.routes.backends[idx].load.active.load(Ordering::SeqCst),
        0
    );
    let r = request(&c, lb.listen, b"moved");
    assert_ne!(r[0], first);
    assert_eq!(lb.metrics().udp_sessions.get(), 1);
}

#[test]
fn session_flows_moved_by_new_routes_without_forget_message() {
    let backends: Vec<Backend> = (0..2).map(|i| Backend::tagged(b'A' + i)).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut lb = Lb::start(
        "{ mode: session }",
        "    balance: round_robin\n",
        &addrs,
        LOCAL,
    );
    let c = client();
    let first = request(&c, lb.listen, b"hello")[0];
    lb.set_down(&[(first - b'A') as usize]);
    // Only the routes changed: the next datagram sees it and re-balances.
    let start = Instant::now();
    loop {
        let r = request(&c, lb.listen, b"x");
        if r[0] != first {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "flow never moved");
    }
}

#[test]
fn idle_sessions_expire_and_max_sessions_limits_new_ones() {
    let backend = Backend::tagged(b'A');
    let lb = Lb::start(
        "{ mode: session, session_timeout: 300ms, max_sessions: 2 }",
        "",
        &[backend.addr],
        LOCAL,
    );
    let (a, b, c) = (client(), client(), client());
    request(&a, lb.listen, b"a");
    request(&b, lb.listen, b"b");
    assert_eq!(lb.metrics().udp_sessions.get(), 2);
    // A third flow is over max_sessions: dropped and counted.
    c.send_to(b"c", lb.listen).unwrap();
    assert!(recv_none(&c, Duration::from_millis(100)));
    assert_eq!(lb.metrics().udp_dropped.get(), 1);
    // Existing flows keep working.
    request(&a, lb.listen, b"a2");
    // Keep `a` alive while `b` idles out.
    let t0 = Instant::now();
    while lb.metrics().udp_sessions.get() != 1 {
        request(&a, lb.listen, b"keepalive");
        std::thread::sleep(Duration::from_millis(50));
        assert!(t0.elapsed() < DEADLINE);
    }
    assert!(t0.elapsed() >= Duration::from_millis(200));
    // Room again: `c` gets a flow.
    assert_eq!(&request(&c, lb.listen, b"c")[1..], b"c");
    // Everything idles out; the upstream sockets close (the backend's peers
    // were three distinct flows).
    eventually("all sessions expired", || {
        lb.metrics().udp_sessions.get() == 0
    });
    assert_eq!(backend.peers().len(), 3);
    assert_eq!(lb.routes.limit.active.load(Ordering::SeqCst), 0);
}

#[test]
fn wildcard_listener_replies_from_the_address_the_client_sent_to() {
    let backend = Backend::tagged(b'A');
    let lb = Lb::start(
        "{ mode: session }",
        "",
        &[backend.addr],
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    );
    let port = lb.listen.port();
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        let to: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let c = client();
        let r = request(&c, to, b"where");
        assert_eq!(&r[1..], b"where");
    }
    let dns_backend = Backend::start(|q| vec![as_response(q)]);
    let lb2 = Lb::start(
        "{ mode: dns }",
        "",
        &[dns_backend.addr],
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    );
    let to: SocketAddr = format!("127.0.0.2:{}", lb2.listen.port()).parse().unwrap();
    let c = client();
    assert_eq!(&request(&c, to, &query(5, b"q"))[..2], &[0, 5]);
}

#[test]
fn shutdown_closes_udp_flows_promptly() {
    let backend = Backend::tagged(b'A');
    let mut lb = Lb::start(
        "{ mode: session, session_timeout: 1h }",
        "",
        &[backend.addr],
        LOCAL,
    );
    let clients: Vec<UdpSocket> = (0..20).map(|_| client()).collect();
    for c in &clients {
        request(c, lb.listen, b"x");
    }
    assert_eq!(lb.metrics().udp_sessions.get(), 20);
    let took = lb.shutdown();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert_eq!(lb.metrics().udp_sessions.get(), 0);
}
