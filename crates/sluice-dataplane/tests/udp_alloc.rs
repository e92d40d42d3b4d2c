//! The UDP fast path does not allocate per datagram: a counting global
//! allocator sees (almost) no allocation while thousands of DNS queries and
//! session datagrams go through a worker after warm-up. The clients and
//! backends of this test are allocation-free themselves (fixed buffers,
//! std sockets), so what is counted is the worker's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_balance::{Algorithm, BuildOptions, Endpoint, Load, Member, Snapshot};
use sluice_dataplane::{
    spawn_worker, BackendRoute, ServiceLimit, ServiceRoutes, WorkerConfig, WorkerMsg,
};
use sluice_metrics::{BackendMetrics, ServiceMetrics};
use sluice_uring::udp::CountingAllocator;

#[global_allocator]
static ALLOCS: CountingAllocator = CountingAllocator::new();

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// An allocation-free backend: answers each datagram with the same bytes,
/// QR bit set.
fn backend(stop: Arc<AtomicBool>) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let socket = UdpSocket::bind((LOCAL, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                buf[2] |= 0x80;
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    (addr, t)
}

fn routes(mode: &str, backend: SocketAddr) -> Arc<ServiceRoutes> {
    let yaml = format!(
        "services:\n  - name: u\n    protocol: udp\n    listen: [\"127.0.0.1:1\"]\n    \
         balance: maglev\n    udp: {{ mode: {mode} }}\n    backends:\n      - address: \"{backend}\"\n"
    );
    let cfg = sluice_config::load_str(&yaml, "t.yaml").unwrap();
    let load = Arc::new(Load::default());
    let member = Member::new(
        Endpoint::from_address(0, 100, &backend.to_string()),
        load.clone(),
        0,
    );
    Arc::new(ServiceRoutes {
        service: Arc::new(cfg.services[0].clone()),
        snapshot: Snapshot::build(Algorithm::Maglev, vec![member], BuildOptions::default()),
        backends: vec![BackendRoute {
            addr: backend,
            load,
            metrics: Arc::new(BackendMetrics::new("u", &backend.to_string(), 1)),
            max_connections: 0,
        }],
        metrics: Arc::new(ServiceMetrics::new("u", 1)),
        limit: Arc::new(ServiceLimit::default()),
    })
}

/// Allocations while `n` request/reply exchanges go through `mode`.
fn allocations_per_exchange(mode: &str, n: u32) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let (backend_addr, backend_thread) = backend(stop.clone());
    let routes = routes(mode, backend_addr);
    let socket = sluice_uring::socket::udp_socket(SocketAddr::new(LOCAL, 0)).unwrap();
    let listen = socket.local_addr().unwrap();
    let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut cfg = WorkerConfig::new(0, 1);
    cfg.pin = false;
    let worker = spawn_worker(cfg, events).unwrap();
    worker.send(WorkerMsg::Routes(vec![routes.clone()]));
    worker.send(WorkerMsg::AddUdpListener {
        service: "u".into(),
        addr: listen,
        socket,
    });

    let client = UdpSocket::bind((LOCAL, 0)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut query = [0u8; 40];
    query[2] = 0x01;
    query[5] = 1;
    let mut buf = [0u8; 2048];
    let mut exchange = |id: u16| -> bool {
        query[..2].copy_from_slice(&id.to_be_bytes());
        client.send_to(&query, listen).unwrap();
        matches!(client.recv_from(&mut buf), Ok((40, _)) if buf[..2] == id.to_be_bytes())
    };
    // Warm up: the worker opens its pools/flow, the tables fill their
    // capacity, the first timers are armed.
    let start = Instant::now();
    let mut ok = 0;
    while ok < 2000 {
        if exchange(ok as u16) {
            ok += 1;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "warm-up failed");
    }
    let before = ALLOCS.count();
    for i in 0..n {
        assert!(exchange(i as u16), "exchange {i} failed");
    }
    let allocs = ALLOCS.count() - before;
    worker.send(WorkerMsg::Shutdown {
        deadline: Instant::now() + Duration::from_secs(2),
    });
    worker.join();
    stop.store(true, Ordering::Relaxed);
    backend_thread.join().unwrap();
    drop(events_rx);
    assert_eq!(routes.metrics.udp_dropped.get(), 0);
    allocs as f64 / f64::from(n)
}

#[test]
fn dns_and_session_fast_paths_do_not_allocate_per_datagram() {
    // The counter works.
    let before = ALLOCS.count();
    std::hint::black_box(vec![0u8; 64]);
    assert!(ALLOCS.count() > before);
    // One test, so the two runs do not count each other's allocations.
    let dns = allocations_per_exchange("dns", 5000);
    let session = allocations_per_exchange("session", 5000);
    eprintln!("allocations per exchange: dns {dns:.4}, session {session:.4}");
    // A few stray allocations (a timer re-arm, a channel wake-up) are
    // fine; one per datagram is not.
    assert!(dns < 0.05, "dns mode allocates {dns:.3} times per query");
    assert!(
        session < 0.05,
        "session mode allocates {session:.3} times per datagram"
    );
}
