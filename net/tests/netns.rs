//! Sockets made inside a pod's network namespace, in real namespaces (needs root): a
//! handle's jobs run inside its namespace and its worker thread ends with the last
//! handle; listeners live where they were made; connections carry ztunnel's mark by
//! default, reach other namespaces, and can come from a non-local source (ztunnel's
//! inbound upstream); with the redirect rules installed the 15006 and 15001 listeners
//! see the original destination as their local address; errors name the namespace and
//! the address.
//!
//! Each test builds its own namespaces: a "pod" joined by a veth pair to a "peer" that
//! plays the rest of the network (the node, other pods, the outside world). The
//! namespace plumbing, shared with `tests/redirect.rs`, is in `support`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambit_net::netns::{self, ConnectOpts, ListenOpts, NetnsError, NetnsHandle};
use ambit_net::redirect::{
    self, RedirectConfig, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, ZTUNNEL_MARK,
};
use socket2::SockRef;
// `accept` and `assert_nothing_pending` here are for the code under test's tokio
// listeners; `support`'s, for the test's own std ones, go by `_std`.
use support::{
    accept as accept_std, addr, assert_nothing_pending as assert_nothing_pending_std, at, Dial,
    Netns, Network, CONNECTED, NODE, OTHER, OTHER6, POD, POD6, REMOTE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client address the pod does not have: the original source of an inbound
/// connection that ztunnel terminated.
const CLIENT: &str = "10.99.0.7:40000";
const CLIENT6: &str = "[2001:db8:99::7]:40000";

// ---------------------------------------------------------------------------------
// The handle and its worker

#[tokio::test]
async fn jobs_run_inside_the_namespace_and_the_caller_stays_outside() {
    let ns = Netns::new("inside");
    let handle = NetnsHandle::from_path(ns.path()).unwrap();
    let own = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();

    let inside = handle
        .run(|| Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino()))
        .await
        .unwrap();

    assert_eq!(inside, std::fs::metadata(ns.path()).unwrap().ino());
    assert_ne!(inside, own);
    assert_eq!(
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino(),
        own,
        "the calling thread did not move"
    );
    let current = NetnsHandle::current().unwrap();
    let node = current
        .run(|| Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino()))
        .await
        .unwrap();
    assert_eq!(node, std::fs::metadata("/proc/self/ns/net").unwrap().ino());
}

#[tokio::test]
async fn the_worker_thread_lives_while_a_clone_does_and_ends_with_the_last() {
    let ns = Netns::new("life");
    let handle = NetnsHandle::from_path(ns.path()).unwrap();
    let clone = handle.clone();
    let tid = worker_tid(&handle).await;
    drop(handle);
    assert_eq!(worker_tid(&clone).await, tid, "one worker per namespace");
    assert!(thread_exists(&tid), "the clone keeps the worker alive");

    drop(clone);
    wait_until("the worker thread to end", || !thread_exists(&tid));
}

#[tokio::test]
async fn worker_threads_do_not_accumulate() {
    let ns = Netns::new("many");
    let mut tids = Vec::new();
    for _ in 0..32 {
        let handle = NetnsHandle::from_path(ns.path()).unwrap();
        let listener = handle
            .listen(at("127.0.0.1", 0), ListenOpts::default())
            .await
            .unwrap();
        tids.push(worker_tid(&handle).await);
        drop((handle, listener));
    }
    wait_until("every worker thread to end", || {
        tids.iter().all(|tid| !thread_exists(tid))
    });
}

#[tokio::test]
async fn a_panicking_job_fails_alone() {
    let ns = Netns::new("panic");
    let handle = NetnsHandle::from_path(ns.path()).unwrap();
    let err = handle
        .run(|| -> io::Result<()> { panic!("job panics on purpose") })
        .await
        .unwrap_err();
    assert!(err.to_string().contains(ns.path_str()), "{err}");
    assert!(err.to_string().contains("panicked"), "{err}");
    handle.run(|| Ok(())).await.expect("the worker survives");
}

#[tokio::test]
async fn a_missing_namespace_is_an_error_naming_it() {
    let path = PathBuf::from(format!(
        "/run/netns/ambit-ns-missing-{:08x}",
        rand::random::<u32>()
    ));
    let err = NetnsHandle::from_path(&path).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(matches!(
        err.get_ref().and_then(|e| e.downcast_ref::<NetnsError>()),
        Some(NetnsError::Open { .. })
    ));
}

#[tokio::test]
async fn a_file_that_is_not_a_namespace_fails_every_job_naming_it() {
    let handle = NetnsHandle::from_path(Path::new("/dev/null")).unwrap();
    for _ in 0..2 {
        let err = handle.run(|| Ok(())).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("/dev/null"), "{err}");
        assert!(err.to_string().contains("cannot enter"), "{err}");
    }
    let err = handle
        .listen(at("127.0.0.1", 15001), ListenOpts::default())
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("/dev/null") && message.contains("127.0.0.1:15001"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------
// Listening and connecting

#[tokio::test]
async fn a_listener_lives_in_its_namespace() {
    let ns = Netns::new("listen");
    ns.ip("link set lo up");
    let handle = NetnsHandle::from_path(ns.path()).unwrap();
    // The test's own namespace holds this very address: listening on it again works
    // only if the listener is elsewhere.
    let here = TcpListener::bind("127.0.0.1:0").unwrap();
    here.set_nonblocking(true).unwrap();
    let address = here.local_addr().unwrap();

    let there = handle.listen(address, ListenOpts::default()).await.unwrap();
    assert_eq!(there.local_addr().unwrap(), address);
    assert_eq!(SockRef::from(&there).mark().unwrap(), ZTUNNEL_MARK);

    let from_inside = ns.connect(address, &Dial::default()).unwrap();
    let (accepted, peer) = accept(&there).await.expect("a connection made inside");
    assert_eq!(peer, from_inside.local_addr().unwrap());
    assert_eq!(accepted.local_addr().unwrap(), address);

    let from_here = Dial::default().connect(address).unwrap();
    let (_, peer) = accept_std(&here).expect("a connection made outside stays outside");
    assert_eq!(peer, from_here.local_addr().unwrap());
    assert_nothing_pending(&there);
}

#[tokio::test]
async fn ipv4_and_ipv6_listeners_share_a_port() {
    let ns = Netns::new("dual");
    ns.ip("link set lo up");
    let handle = NetnsHandle::from_path(ns.path()).unwrap();
    let v4 = handle
        .listen(at("0.0.0.0", OUTBOUND_PORT), ListenOpts::default())
        .await
        .unwrap();
    let v6 = handle
        .listen(at("::", OUTBOUND_PORT), ListenOpts::default())
        .await
        .expect("IPv6 listeners are IPV6_V6ONLY");
    assert!(SockRef::from(&v6).only_v6().unwrap());

    ns.connect(at("::1", OUTBOUND_PORT), &Dial::default())
        .unwrap();
    accept(&v6).await.expect("IPv6 on the IPv6 listener");
    ns.connect(at("127.0.0.1", OUTBOUND_PORT), &Dial::default())
        .unwrap();
    accept(&v4).await.expect("IPv4 on the IPv4 listener");
}

#[tokio::test]
async fn connect_reaches_another_namespace_with_the_ztunnel_mark_by_default() {
    let net = Network::new("conn");
    let pod = NetnsHandle::from_path(net.pod.path()).unwrap();
    let server = net.peer.listen(at(NODE, 0));
    let target = server.local_addr().unwrap();

    let mut client = pod.connect(target, ConnectOpts::default()).await.unwrap();
    assert_eq!(SockRef::from(&client).mark().unwrap(), ZTUNNEL_MARK);
    assert!(client.nodelay().unwrap());
    let (mut upstream, peer) = accept_std(&server).expect("the peer accepts");
    assert_eq!(peer, client.local_addr().unwrap());
    assert_eq!(
        peer.ip(),
        addr(&format!("{POD}:0")).ip(),
        "the pod's address"
    );
    exchange(&mut client, &mut upstream).await;

    let marked = ConnectOpts {
        mark: Some(0x42),
        ..ConnectOpts::default()
    };
    let client = pod.connect(target, marked).await.unwrap();
    assert_eq!(SockRef::from(&client).mark().unwrap(), 0x42);
    netns::set_mark(&client, 0x43).unwrap();
    assert_eq!(SockRef::from(&client).mark().unwrap(), 0x43);
    let unmarked = ConnectOpts {
        mark: None,
        ..ConnectOpts::default()
    };
    let client = pod.connect(target, unmarked).await.unwrap();
    assert_eq!(SockRef::from(&client).mark().unwrap(), 0);
}

#[tokio::test]
async fn every_connect_comes_from_the_namespace_across_stock_refills() {
    let net = Network::new("stock");
    let pod = NetnsHandle::from_path(net.pod.path()).unwrap();
    let server = net.peer.listen(at(NODE, 0));
    let target = server.local_addr().unwrap();
    // More connects than one refill makes, some in quick succession while a refill
    // is still queued: each socket must still be the pod's, and marked.
    for i in 0..40 {
        let client = pod.connect(target, ConnectOpts::default()).await.unwrap();
        assert_eq!(SockRef::from(&client).mark().unwrap(), ZTUNNEL_MARK, "{i}");
        let (_upstream, peer) = accept_std(&server).expect("the peer accepts");
        assert_eq!(peer.ip(), addr(&format!("{POD}:0")).ip(), "connect {i}");
    }
}

#[tokio::test]
async fn connect_errors_name_the_namespace_and_the_address() {
    let net = Network::new("refuse");
    let pod = NetnsHandle::from_path(net.pod.path()).unwrap();
    // Nothing listens there: the peer resets.
    let closed = at(NODE, 9);
    let err = pod
        .connect(closed, ConnectOpts::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    let message = err.to_string();
    assert!(
        message.contains(net.pod.path_str()) && message.contains("192.0.2.1:9"),
        "{message}"
    );

    let mixed = ConnectOpts {
        bind_source: Some(addr("[2001:db8::9]:0")),
        ..ConnectOpts::default()
    };
    let err = pod.connect(closed, mixed).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("[2001:db8::9]:0"), "{err}");

    // The peer does not forward, so a SYN to a host beyond it is silently dropped.
    let quick = ConnectOpts {
        timeout: Duration::from_millis(200),
        ..ConnectOpts::default()
    };
    let err = pod
        .connect(addr("198.51.100.99:80"), quick)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    let message = err.to_string();
    assert!(
        message.contains(net.pod.path_str()) && message.contains("198.51.100.99:80"),
        "{message}"
    );
}

#[tokio::test]
async fn transparent_connect_reaches_the_app_from_the_original_client_address() {
    let net = Network::new("spoof");
    redirect::install(net.pod.path(), &RedirectConfig::default()).unwrap();
    let pod = NetnsHandle::from_path(net.pod.path()).unwrap();

    for (pod_ip, client) in [(POD, CLIENT), (POD6, CLIENT6)] {
        let app = net.pod.listen(at(pod_ip, 8080));
        // ztunnel's inbound upstream, after HBONE termination.
        let from_client = ConnectOpts {
            bind_source: Some(addr(client)),
            ..ConnectOpts::default()
        };
        let mut ztunnel = pod
            .connect(at(pod_ip, 8080), from_client)
            .await
            .expect("the app's replies come back to ztunnel");
        assert_eq!(ztunnel.local_addr().unwrap(), addr(client));
        assert_eq!(SockRef::from(&ztunnel).mark().unwrap(), ZTUNNEL_MARK);
        let (mut upstream, peer) = accept_std(&app).expect("the app accepts");
        assert_eq!(peer, addr(client), "the app sees the original client");
        exchange(&mut ztunnel, &mut upstream).await;
    }
}

#[tokio::test]
async fn tproxy_listener_sees_the_original_destination_as_local_address() {
    let net = Network::new("tproxy");
    redirect::install(net.pod.path(), &RedirectConfig::default()).unwrap();
    let pod = NetnsHandle::from_path(net.pod.path()).unwrap();
    let transparent = ListenOpts {
        transparent: true,
        ..ListenOpts::default()
    };

    for (any, pod_ip, other) in [("0.0.0.0", POD, OTHER), ("::", POD6, OTHER6)] {
        let inbound = pod
            .listen(at(any, INBOUND_PLAINTEXT_PORT), transparent)
            .await
            .unwrap();
        let mut client = net
            .peer
            .connect(
                at(pod_ip, 8080),
                &Dial {
                    bind: Some(at(other, 0)),
                    ..Dial::default()
                },
            )
            .unwrap();
        let (mut accepted, peer) = accept(&inbound).await.expect("inbound plaintext on 15006");
        assert_eq!(
            accepted.local_addr().unwrap(),
            at(pod_ip, 8080),
            "original destination"
        );
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(
            SockRef::from(&accepted).mark().unwrap(),
            ZTUNNEL_MARK,
            "accepted sockets inherit the listener's mark"
        );
        accepted.write_all(b"hello").await.unwrap();
        let mut reply = [0; 5];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"hello");
    }
}

#[tokio::test]
async fn outbound_listener_reads_the_original_destination() {
    let net = Network::new("redir");
    let remote = net.peer.listen(addr(REMOTE));
    redirect::install(net.pod.path(), &RedirectConfig::default()).unwrap();
    let pod = NetnsHandle::from_path(net.pod.path()).unwrap();
    let transparent = ListenOpts {
        transparent: true,
        ..ListenOpts::default()
    };
    let outbound = pod
        .listen(at("127.0.0.1", OUTBOUND_PORT), transparent)
        .await
        .unwrap();

    let app = net.pod.connect(addr(REMOTE), &Dial::default()).unwrap();
    let (accepted, peer) = accept(&outbound).await.expect("outbound on 15001");
    assert_eq!(peer, app.local_addr().unwrap());
    assert_eq!(netns::original_dst(&accepted).unwrap(), addr(REMOTE));
    assert_nothing_pending_std(&remote);

    // ztunnel's own connection to the same destination is not captured, thanks to the
    // default mark; without it, it would be.
    let _ztunnel = pod
        .connect(addr(REMOTE), ConnectOpts::default())
        .await
        .unwrap();
    accept_std(&remote).expect("ztunnel's socket reaches the real destination");
    assert_nothing_pending(&outbound);
    let unmarked = ConnectOpts {
        mark: None,
        ..ConnectOpts::default()
    };
    let _captured = pod.connect(addr(REMOTE), unmarked).await.unwrap();
    let (captured, _) = accept(&outbound)
        .await
        .expect("an unmarked socket is captured");
    assert_eq!(netns::original_dst(&captured).unwrap(), addr(REMOTE));
}

#[tokio::test]
async fn a_connection_to_the_outbound_listener_itself_has_no_original_destination() {
    let ns = Netns::new("noorig");
    ns.ip("link set lo up");
    let handle = NetnsHandle::from_path(ns.path()).unwrap();
    let transparent = ListenOpts {
        transparent: true,
        ..ListenOpts::default()
    };
    let listener = handle
        .listen(at("127.0.0.1", 0), transparent)
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    // Loopback is never captured: the app dialled the listener.
    let app = ns.connect(address, &Dial::default()).unwrap();
    let (accepted, _) = accept(&listener).await.unwrap();
    let err = netns::original_dst(&accepted).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&address.to_string())
            && message.contains(&app.local_addr().unwrap().to_string()),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------
// Test support: the namespaces, test sockets and addresses are in `support`; the
// helpers for the code under test's tokio sockets and for worker threads are here.

/// The next connection on a listener made by the code under test, within a deadline.
/// Two ztunnels holding a pod's 15006 at once, as during an upgrade: with
/// `steer_to_newest`, every new connection goes to the one that listened last, the
/// older one gets none (its queue stays empty until it closes), and once it has
/// closed the newer one takes everything, until a third listens and takes over.
#[tokio::test]
async fn the_newest_holder_of_a_shared_listener_takes_every_new_connection() {
    let net = Network::new("steer");
    redirect::install(net.pod.path(), &RedirectConfig::default()).unwrap();
    let pod = NetnsHandle::from_path(net.pod.path()).unwrap();
    let shared = ListenOpts {
        transparent: true,
        reuse_port: true,
        steer_to_newest: true,
        ..ListenOpts::default()
    };
    let addr = at("0.0.0.0", INBOUND_PLAINTEXT_PORT);
    let dial = || {
        net.peer
            .connect(
                at(POD, 8080),
                &Dial {
                    bind: Some(at(OTHER, 0)),
                    ..Dial::default()
                },
            )
            .unwrap()
    };
    let old = pod.listen(addr, shared).await.unwrap();
    let first = dial();
    accept(&old)
        .await
        .expect("the only holder takes its connections");
    let new = pod.listen(addr, shared).await.unwrap();
    let mut clients = vec![first];
    for _ in 0..20 {
        clients.push(dial());
        accept(&new).await.expect("the newest holder takes it");
        assert_nothing_pending(&old);
    }
    drop(old);
    for _ in 0..5 {
        clients.push(dial());
        accept(&new).await.expect("the one left takes it");
    }
    let newer = pod.listen(addr, shared).await.unwrap();
    for _ in 0..5 {
        clients.push(dial());
        accept(&newer).await.expect("the next replacement takes it");
        assert_nothing_pending(&new);
    }
}

async fn accept(listener: &tokio::net::TcpListener) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    within(listener.accept()).await.map(Result::unwrap)
}

/// Asserts no connection is waiting. Called after a connection that went elsewhere
/// was accepted there, so a misrouted one would already be queued. Asks the socket
/// itself, not tokio's readiness.
fn assert_nothing_pending(listener: &tokio::net::TcpListener) {
    match SockRef::from(listener).accept() {
        Ok((_, peer)) => panic!(
            "unexpected connection on {:?} from {peer:?}",
            listener.local_addr()
        ),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}"),
    }
}

/// Bytes both ways between a stream of the code under test and a test one.
async fn exchange(ours: &mut tokio::net::TcpStream, theirs: &mut TcpStream) {
    ours.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    theirs.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    theirs.write_all(b"pong").unwrap();
    within(ours.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"pong");
}

async fn within<T>(f: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(CONNECTED, f).await.ok()
}

/// The worker thread's id, as `/proc/self/task/<tid>` names it.
async fn worker_tid(handle: &NetnsHandle) -> String {
    let link = handle
        .run(|| std::fs::read_link("/proc/thread-self"))
        .await
        .unwrap();
    // "<pid>/task/<tid>"
    link.file_name().unwrap().to_string_lossy().into_owned()
}

fn thread_exists(tid: &str) -> bool {
    Path::new(&format!("/proc/self/task/{tid}")).exists()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONNECTED;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}
