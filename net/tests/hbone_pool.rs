//! The HBONE connection pool over real mutual TLS on loopback: tunnels share
//! connections up to the stream limit, keys never share, concurrent callers do not
//! stampede, broken connections are replaced, idle ones close, and answers from the far
//! side are never retried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_core::hbone::{Baggage, ConnectRefusal, Forwarded, HboneTarget};
use ambit_core::{SpiffeId, TrustDomain};
use ambit_net::hbone::client::{OutboundRequest, TunnelError};
use ambit_net::hbone::pool::{
    BoxedIo, ConnectError, Connector, HbonePool, MeshConnector, PoolConfig, PoolError, PoolKey,
};
use ambit_net::hbone::server::{serve_connection, InboundHandler, InboundRequest, TunnelOutcome};
use ambit_net::hbone::H2Settings;
use ambit_net::tls::{self, CertSlot, ClientAuth, WorkloadCert};
use support::TestCa;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio::time::Instant;

const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const PAY: &str = "spiffe://cluster.local/ns/shop/sa/pay";
const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";

/// Any loopback target is "local" to the test server; it echoes in memory.
const LOCAL_TARGET: &str = "127.0.0.1:8080";
/// A target the test server refuses with 400 (not a local workload).
const REMOTE_TARGET: &str = "10.255.0.1:80";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// Echoes every tunnel in memory (no sockets, so a thousand tunnels cost no
/// descriptors) and refuses non-loopback targets.
#[derive(Clone, Default)]
struct EchoHandler {
    requests: Arc<AtomicUsize>,
}

impl InboundHandler for EchoHandler {
    type Upstream = DuplexStream;
    type Tunnel = ();

    async fn connect(
        &self,
        request: &InboundRequest,
    ) -> Result<(DuplexStream, ()), ConnectRefusal> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if request.target.port() == SILENT_PORT {
            // Never answers: the upstream connect hangs forever.
            std::future::pending::<()>().await;
        }
        if !request.target.ip().is_loopback() {
            return Err(ConnectRefusal::NotLocal(request.target));
        }
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(theirs);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
        Ok((ours, ()))
    }

    fn finished(&self, (): (), _outcome: TunnelOutcome) {}

    fn refused(&self, _request: Option<&InboundRequest>, _refusal: &ConnectRefusal) {}
}

/// An HBONE server on loopback that counts what it sees and can kill its connections.
#[derive(Clone)]
struct Server {
    addr: SocketAddr,
    handler: EchoHandler,
    /// TLS connections accepted, and the client identity of each.
    peers: Arc<Mutex<Vec<SpiffeId>>>,
    /// TLS connections being served right now.
    open: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

/// Counts a served connection out when its task ends, however it ends.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    async fn start(ca: &TestCa, identity: &str) -> Server {
        let cert = ca.issue(identity);
        let config = tls::server_config(
            CertSlot::new(&cert),
            cert.roots(),
            ClientAuth::Required(TrustDomain::default()),
        )
        .unwrap();
        let acceptor = config;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Server {
            addr: listener.local_addr().unwrap(),
            handler: EchoHandler::default(),
            peers: Arc::default(),
            open: Arc::default(),
            tasks: Arc::default(),
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer_addr) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                let s2 = s.clone();
                s.open.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(s.open.clone());
                let task = tokio::spawn(async move {
                    let _guard = guard;
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer =
                        tls::identity_of(&tls.get_ref().1.peer_certificates().unwrap()[0]).unwrap();
                    s2.peers.lock().unwrap().push(peer.clone());
                    let _ = serve_connection(
                        tls,
                        peer,
                        peer_addr,
                        H2Settings::default(),
                        s2.handler.clone(),
                        std::future::pending(),
                    )
                    .await;
                });
                s.tasks.lock().unwrap().push(task.abort_handle());
            }
        });
        server
    }

    fn accepted(&self) -> usize {
        self.peers.lock().unwrap().len()
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.handler.requests.load(Ordering::SeqCst)
    }

    /// Drops every connection's TLS stream, closing its TCP connection.
    fn kill_all(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// CONNECTs to this port are never answered by the test server.
const SILENT_PORT: u16 = 9;

fn key(source: &str, destination: &[&str], addr: SocketAddr) -> PoolKey {
    PoolKey {
        source: id(source),
        destination: destination.iter().map(|d| id(d)).collect::<BTreeSet<_>>(),
        addr,
    }
}

/// The setup most tests share: a mesh CA, a server with PAY's identity, CART's
/// certificate and the pool key for CART reaching PAY at the server.
struct Fixture {
    ca: TestCa,
    server: Server,
    cert: WorkloadCert,
    key: PoolKey,
}

async fn fixture() -> Fixture {
    let ca = TestCa::new();
    let server = Server::start(&ca, PAY).await;
    let cert = ca.issue(CART);
    let key = key(CART, &[PAY], server.addr);
    Fixture {
        ca,
        server,
        cert,
        key,
    }
}

fn request(target: &str) -> OutboundRequest {
    OutboundRequest {
        target: HboneTarget::new(target.parse().unwrap()),
        forwarded: Forwarded {
            for_addr: "10.1.0.5:40000".parse().unwrap(),
            host: None,
        },
        baggage: Baggage::default(),
        traceparent: None,
    }
}

fn config() -> PoolConfig {
    PoolConfig {
        connect_timeout: Duration::from_secs(5),
        ..PoolConfig::default()
    }
}

/// Sends `data` through `stream` and returns what came back once the far side closed.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async move {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    tokio::join!(writer, reader).1
}

/// Opens a tunnel through the pool, echoes `data` and closes it.
async fn echo_via<C: Connector>(
    pool: &HbonePool<C>,
    key: &PoolKey,
    cert: &WorkloadCert,
    data: &[u8],
) -> Vec<u8> {
    let mut tunnel = pool
        .connect(key, cert, &request(LOCAL_TARGET))
        .await
        .unwrap();
    echo(&mut tunnel.stream, data).await
}

/// Polls `condition` until it holds; fails after 5 s with `what` and what was seen.
async fn eventually(what: &str, mut condition: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match condition() {
            Ok(()) => return,
            Err(seen) if Instant::now() >= deadline => panic!("{what}: still {seen} after 5 s"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tunnels_fill_ten_connections_of_a_hundred() {
    const TUNNELS: usize = 1000;
    let Fixture {
        server, cert, key, ..
    } = fixture().await;
    let pool = HbonePool::new(config(), MeshConnector::new());
    // Every tunnel stays open until all are open, so all 1,000 are carried at once.
    let all_open = Arc::new(tokio::sync::Barrier::new(TUNNELS));
    let mut tasks = Vec::new();
    for i in 0..TUNNELS {
        let (pool, key, cert, all_open) =
            (pool.clone(), key.clone(), cert.clone(), all_open.clone());
        tasks.push(tokio::spawn(async move {
            let mut tunnel = pool
                .connect(&key, &cert, &request(LOCAL_TARGET))
                .await
                .unwrap();
            all_open.wait().await;
            let data = format!("tunnel {i} says hello")
                .repeat(1 + i % 50)
                .into_bytes();
            assert_eq!(echo(&mut tunnel.stream, &data).await, data, "tunnel {i}");
        }));
    }
    let all = futures::future::try_join_all(tasks);
    match tokio::time::timeout(Duration::from_secs(20), all).await {
        Ok(finished) => {
            finished.unwrap();
        }
        Err(_) => panic!(
            "tunnels did not all open and echo: server accepted {} connections, saw {} requests",
            server.accepted(),
            server.requests()
        ),
    }
    assert!(
        server.accepted() <= TUNNELS / 100,
        "{} connections for {TUNNELS} tunnels",
        server.accepted()
    );
    assert!(pool.connections(&key) <= TUNNELS / 100);
    assert_eq!(server.requests(), TUNNELS);
}

#[tokio::test]
async fn sequential_tunnels_reuse_one_connection() {
    let Fixture {
        server, cert, key, ..
    } = fixture().await;
    let pool = HbonePool::new(config(), MeshConnector::new());
    for i in 0..20u8 {
        assert_eq!(echo_via(&pool, &key, &cert, &[i; 100]).await, [i; 100]);
    }
    assert_eq!(server.accepted(), 1);
    assert_eq!(server.requests(), 20);
    assert_eq!(pool.connections(&key), 1);
}

#[tokio::test]
async fn a_renewed_certificate_gets_new_connections_and_the_old_one_no_new_tunnels() {
    let Fixture {
        ca,
        server,
        cert: old,
        key,
    } = fixture().await;
    let pool = HbonePool::new(config(), MeshConnector::new());
    assert_eq!(echo_via(&pool, &key, &old, b"old").await, b"old");
    // A tunnel left open on the old connection keeps it in the pool.
    let mut open = pool
        .connect(&key, &old, &request(LOCAL_TARGET))
        .await
        .unwrap();

    let renewed = ca.issue(CART);
    for _ in 0..3 {
        assert_eq!(echo_via(&pool, &key, &renewed, b"new").await, b"new");
    }
    assert_eq!(server.accepted(), 2, "one connection per certificate");
    assert_eq!(pool.connections(&key), 2);
    // The open tunnel on the old connection still works.
    open.stream.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    open.stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
}

#[tokio::test]
async fn concurrent_callers_for_a_new_key_share_one_connection_attempt() {
    // join_all polls every caller before the spawned attempt can run on this
    // single-threaded runtime, so all 50 find the pool empty at once.
    let Fixture {
        server, cert, key, ..
    } = fixture().await;
    let connector = TestConnector::default();
    let pool = HbonePool::new(config(), connector.clone());
    let request = request(LOCAL_TARGET);
    let tunnels =
        futures::future::join_all((0..50).map(|_| pool.connect(&key, &cert, &request))).await;
    assert!(tunnels.iter().all(Result::is_ok));
    assert_eq!(connector.connections(), 1);
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn different_keys_never_share_a_connection() {
    let ca = TestCa::new();
    let pay = Server::start(&ca, PAY).await;
    let waypoint = Server::start(&ca, WAYPOINT).await;
    let (cart, orders) = (ca.issue(CART), ca.issue(ORDERS));
    let pool = HbonePool::new(config(), MeshConnector::new());
    let keys = [
        (key(CART, &[PAY], pay.addr), &cart),
        // another source identity
        (key(ORDERS, &[PAY], pay.addr), &orders),
        // another set of accepted destination identities, same address
        (key(CART, &[PAY, WAYPOINT], pay.addr), &cart),
        // another address
        (key(CART, &[WAYPOINT], waypoint.addr), &cart),
    ];
    for round in 0..2u8 {
        for (key, cert) in &keys {
            assert_eq!(echo_via(&pool, key, cert, &[round; 10]).await, [round; 10]);
        }
    }
    for (key, _) in &keys {
        assert_eq!(pool.connections(key), 1, "{key}");
    }
    assert_eq!(pool.total_connections(), 4);
    let mut peers = pay.peers.lock().unwrap().clone();
    peers.sort();
    assert_eq!(peers, [id(CART), id(CART), id(ORDERS)]);
    assert_eq!(*waypoint.peers.lock().unwrap(), [id(CART)]);
}

#[tokio::test]
async fn a_connection_killed_by_the_server_is_replaced() {
    let Fixture {
        server, cert, key, ..
    } = fixture().await;
    let pool = HbonePool::new(config(), MeshConnector::new());
    assert_eq!(echo_via(&pool, &key, &cert, b"before").await, b"before");
    server.kill_all();
    // Whether or not the pool has noticed yet, the next tunnel must work.
    assert_eq!(echo_via(&pool, &key, &cert, b"after").await, b"after");
    assert_eq!(server.accepted(), 2);
    assert_eq!(pool.connections(&key), 1);
}

#[tokio::test]
async fn a_tunnel_failing_on_a_broken_connection_is_retried_once_on_a_new_one() {
    let Fixture {
        server, cert, key, ..
    } = fixture().await;
    let connector = TestConnector::default();
    let pool = HbonePool::new(config(), connector.clone());
    assert_eq!(echo_via(&pool, &key, &cert, b"one").await, b"one");
    // The pool cannot see this break until it writes the next CONNECT.
    connector.break_writes(0);
    assert_eq!(echo_via(&pool, &key, &cert, b"two").await, b"two");
    assert_eq!(connector.connections(), 2);
    assert_eq!(server.accepted(), 2);
    assert_eq!(
        server.requests(),
        2,
        "the failed CONNECT never left the client"
    );
    assert_eq!(pool.connections(&key), 1);

    // With the connection broken and every new one broken too, the single retry
    // fails as well, and its failure is what the caller gets.
    connector.break_writes(1);
    connector.break_new.store(true, Ordering::SeqCst);
    let error = pool
        .connect(&key, &cert, &request(LOCAL_TARGET))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            PoolError::Tunnel {
                source: TunnelError::H2(_),
                ..
            } | PoolError::Connect { .. }
        ),
        "{error:?}"
    );
    assert_eq!(error.reason(), "hbone_connection_failed");
    assert_eq!(connector.connections(), 3, "one retry, not more");
    assert_eq!(pool.connections(&key), 0);
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout_and_busy_ones_stay() {
    let idle_timeout = Duration::from_millis(200);
    let ca = TestCa::new();
    let busy_server = Server::start(&ca, PAY).await;
    let idle_server = Server::start(&ca, WAYPOINT).await;
    let cert = ca.issue(CART);
    let busy = key(CART, &[PAY], busy_server.addr);
    let idle = key(CART, &[WAYPOINT], idle_server.addr);
    let pool = HbonePool::new(
        PoolConfig {
            idle_timeout,
            ..config()
        },
        MeshConnector::new(),
    );
    let mut held = pool
        .connect(&busy, &cert, &request(LOCAL_TARGET))
        .await
        .unwrap();
    assert_eq!(echo_via(&pool, &idle, &cert, b"once").await, b"once");
    let idle_from = Instant::now();
    eventually(
        "idle connection closed at the server",
        || match idle_server.open() {
            0 => Ok(()),
            n => Err(format!("{n} open")),
        },
    )
    .await;
    assert!(
        idle_from.elapsed() >= idle_timeout,
        "closed after {:?}, before the idle timeout",
        idle_from.elapsed()
    );
    assert_eq!(pool.connections(&idle), 0);
    // The connection carrying a tunnel all along is still there and still works.
    assert_eq!(busy_server.open(), 1);
    assert_eq!(pool.connections(&busy), 1);
    assert_eq!(echo(&mut held.stream, b"still here").await, b"still here");
    drop(held);
    eventually("busy connection closed once idle", || {
        match (busy_server.open(), pool.total_connections()) {
            (0, 0) => Ok(()),
            seen => Err(format!("(server open, pool) = {seen:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_refused_connect_is_returned_as_such_and_not_retried() {
    let Fixture {
        server, cert, key, ..
    } = fixture().await;
    let pool = HbonePool::new(config(), MeshConnector::new());
    let error = pool
        .connect(&key, &cert, &request(REMOTE_TARGET))
        .await
        .unwrap_err();
    match &error {
        PoolError::Tunnel {
            source: TunnelError::Refused { status, reason, .. },
            ..
        } => {
            assert_eq!(*status, 400);
            assert_eq!(reason.as_deref(), Some("not_local"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(error.reason(), "refused");
    assert_eq!(error.key(), &key);
    assert_eq!(server.requests(), 1);
    // A refusal says nothing bad about the connection: it stays and is reused.
    assert_eq!(echo_via(&pool, &key, &cert, b"ok").await, b"ok");
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn a_connect_without_answer_times_out_and_its_connection_is_evicted() {
    let Fixture {
        server, cert, key, ..
    } = fixture().await;
    let pool = HbonePool::new(
        PoolConfig {
            response_timeout: Duration::from_millis(300),
            ..config()
        },
        MeshConnector::new(),
    );
    let started = std::time::Instant::now();
    let error = pool
        .connect(&key, &cert, &request("127.0.0.1:9"))
        .await
        .unwrap_err();
    assert!(matches!(error, PoolError::NoAnswer { .. }), "{error:?}");
    assert_eq!(error.reason(), "hbone_no_answer");
    assert!(
        error.to_string().contains("no answer within 300ms"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(server.requests(), 1, "not retried");
    assert_eq!(
        pool.connections(&key),
        0,
        "the silent connection was evicted"
    );
    // The next tunnel gets a fresh connection and works.
    assert_eq!(echo_via(&pool, &key, &cert, b"ok").await, b"ok");
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn connecting_where_nothing_listens_fails_fast_naming_the_address() {
    let ca = TestCa::new();
    let cert = ca.issue(CART);
    let nothing = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let key = key(CART, &[PAY], nothing);
    let pool = HbonePool::new(
        PoolConfig {
            connect_timeout: Duration::from_secs(30),
            ..config()
        },
        MeshConnector::new(),
    );
    let started = Instant::now();
    let error = pool
        .connect(&key, &cert, &request(LOCAL_TARGET))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&error, PoolError::Connect { source, .. } if matches!(**source, ConnectError::Tcp(_))),
        "{error:?}"
    );
    assert_eq!(error.reason(), "hbone_connect_failed");
    let message = error.to_string();
    assert!(message.contains(&nothing.to_string()), "{message}");
    assert!(message.contains(PAY), "{message}");
    assert_eq!(pool.total_connections(), 0);
}

#[tokio::test]
async fn the_tcp_hook_makes_the_socket_and_a_wrong_certificate_is_refused() {
    let Fixture {
        ca,
        server,
        cert,
        key,
    } = fixture().await;
    let hooked = Arc::new(AtomicUsize::new(0));
    let counter = hooked.clone();
    let pool = HbonePool::new(
        config(),
        MeshConnector::with_tcp(move |addr| {
            counter.fetch_add(1, Ordering::SeqCst);
            TcpStream::connect(addr)
        }),
    );
    assert_eq!(echo_via(&pool, &key, &cert, b"hooked").await, b"hooked");
    assert_eq!(hooked.load(Ordering::SeqCst), 1);

    let other = ca.issue(ORDERS);
    let error = pool
        .connect(&key, &other, &request(LOCAL_TARGET))
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "wrong_certificate", "{error}");
    assert_eq!(server.requests(), 1);
}

/// The mesh connector, counting the connections it makes and able to make their
/// writes fail (a connection that broke without the pool noticing).
#[derive(Clone, Default)]
struct TestConnector {
    switches: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    /// Connections made from now on start broken.
    break_new: Arc<AtomicBool>,
}

impl TestConnector {
    fn connections(&self) -> usize {
        self.switches.lock().unwrap().len()
    }

    fn break_writes(&self, connection: usize) {
        self.switches.lock().unwrap()[connection].store(true, Ordering::SeqCst);
    }
}

impl Connector for TestConnector {
    async fn connect(&self, key: &PoolKey, cert: &WorkloadCert) -> Result<BoxedIo, ConnectError> {
        let broken = Arc::new(AtomicBool::new(self.break_new.load(Ordering::SeqCst)));
        self.switches.lock().unwrap().push(broken.clone());
        let io = MeshConnector::new().connect(key, cert).await?;
        Ok(Box::new(Breakable { io, broken }))
    }
}

struct Breakable {
    io: BoxedIo,
    broken: Arc<AtomicBool>,
}

impl AsyncRead for Breakable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Breakable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
