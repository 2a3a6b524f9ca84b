//! Support for net's component tests, included by each test file that needs it with
//! `mod support;`:
//!
//! - test certificates, made at test time with rcgen;
//! - real network namespaces (needs root): a namespace deleted when dropped, a pod
//!   joined by a veth pair to a peer that plays the rest of the network, and plain
//!   sockets made inside them, independent of the code under test.
// Each test crate (every file in tests/ is one) compiles this whole module but uses a
// different subset of it: the HBONE tests the certificates, the netns and redirect
// tests the namespaces. What one crate leaves unused is used by another, hence
// `dead_code`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_net::tls::WorkloadCert;
use nix::sched::{setns, CloneFlags};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use socket2::{Domain, Socket, Type};

// ---------------------------------------------------------------------------------
// Certificates

/// A throwaway mesh root that issues SPIFFE leaf certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = params.self_signed(&key).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            root_pem: root.pem(),
        }
    }

    pub fn issue(&self, identity: &str) -> WorkloadCert {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        WorkloadCert::from_pem(
            &[leaf.pem(), self.root_pem.clone()],
            &key.serialize_pem(),
            None,
        )
        .unwrap()
    }
}

// ---------------------------------------------------------------------------------
// Network namespaces

/// The node, as the pod sees it: its default gateway and the health probes' source.
pub const NODE: &str = "192.0.2.1";
pub const NODE6: &str = "2001:db8:1::1";
/// Another peer on the pod's network.
pub const OTHER: &str = "192.0.2.3";
pub const OTHER6: &str = "2001:db8:1::3";
pub const POD: &str = "192.0.2.2";
pub const POD6: &str = "2001:db8:1::2";
/// A destination beyond the gateway.
pub const REMOTE: &str = "198.51.100.7:80";
pub const REMOTE6: &str = "[2001:db8::7]:80";

/// How long a connection, an accept or a read gets before the test gives up on it.
pub const CONNECTED: Duration = Duration::from_secs(3);

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A network namespace, deleted when dropped (also when the test panics).
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// A new, empty namespace. Its name carries the test crate's name and `tag`.
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "ambit-{}-{tag}-{:08x}",
            env!("CARGO_CRATE_NAME"),
            rand::random::<u32>()
        );
        run(&["ip", "netns", "add", &name]);
        let path = PathBuf::from(format!("/run/netns/{name}"));
        Netns { name, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Runs a command inside the namespace; panics unless it succeeds.
    pub fn run(&self, args: &[&str]) -> String {
        let net = format!("--net={}", self.path.display());
        let mut all = vec!["nsenter", net.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    pub fn ip(&self, args: &str) {
        let mut all = vec!["ip"];
        all.extend(args.split_whitespace());
        self.run(&all);
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates stay there. The
    /// test's own way in, independent of the code under test.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(&self.path).unwrap();
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.enter(move || listener(addr, false))
    }

    /// A listener that accepts TPROXYed connections, like ztunnel's 15006.
    pub fn listen_transparent(&self, addr: SocketAddr) -> TcpListener {
        self.enter(move || listener(addr, true))
    }

    pub fn udp(&self, addr: SocketAddr) -> UdpSocket {
        self.enter(move || {
            let socket = UdpSocket::bind(addr).unwrap();
            socket.set_read_timeout(Some(CONNECTED)).unwrap();
            socket
        })
    }

    /// Connects from inside the namespace, as `dial` says.
    pub fn connect(&self, target: SocketAddr, dial: &Dial) -> io::Result<TcpStream> {
        let dial = dial.clone();
        self.enter(move || dial.connect(target))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panics: this also runs while a failing test unwinds.
        let deleted = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(deleted, Ok(s) if s.success()) {
            eprintln!(
                "could not delete network namespace {}: {deleted:?}",
                self.name
            );
        }
    }
}

/// A pod namespace and a peer namespace joined by a veth pair. The peer is the node
/// (192.0.2.1, 2001:db8:1::1: the pod's gateway and the probes' source), another host
/// on the pod's network (192.0.2.3, 2001:db8:1::3) and a remote destination
/// (198.51.100.7, 2001:db8::7) beyond it.
pub struct Network {
    pub pod: Netns,
    pub peer: Netns,
}

impl Network {
    pub fn new(tag: &str) -> Network {
        // Should a step below fail, both namespaces are dropped, and deleted, as it
        // unwinds.
        let pod = Netns::new(&format!("{tag}-pod"));
        let peer = Netns::new(&format!("{tag}-peer"));
        run(&[
            "ip", "link", "add", "eth0", "netns", &pod.name, "type", "veth", "peer", "name",
            "veth0", "netns", &peer.name,
        ]);
        for ns in [&pod, &peer] {
            ns.ip("link set lo up");
        }
        pod.ip(&format!("addr add {POD}/24 dev eth0"));
        pod.ip(&format!("-6 addr add {POD6}/64 dev eth0 nodad"));
        pod.ip("link set eth0 up");
        pod.ip(&format!("route add default via {NODE}"));
        pod.ip(&format!("-6 route add default via {NODE6}"));

        peer.ip(&format!("addr add {NODE}/24 dev veth0"));
        peer.ip(&format!("addr add {OTHER}/24 dev veth0"));
        peer.ip(&format!("-6 addr add {NODE6}/64 dev veth0 nodad"));
        peer.ip(&format!("-6 addr add {OTHER6}/64 dev veth0 nodad"));
        peer.ip("addr add 198.51.100.7/32 dev lo");
        // nodad: even on loopback an address is tentative until a queued DAD job
        // runs, and binding it fails meanwhile (seen under load).
        peer.ip("-6 addr add 2001:db8::7/128 dev lo nodad");
        peer.ip("link set veth0 up");
        // The peer does not forward, whatever the host does (a new namespace takes
        // the host's net.ipv4.ip_forward; a container runtime on the host sets it),
        // so a SYN to a host beyond it is dropped, not answered "unreachable".
        run(&[
            "ip",
            "netns",
            "exec",
            &peer.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=0",
        ]);
        Network { pod, peer }
    }
}

/// How a test client (an app, a peer, a stand-in for ztunnel) connects: a plain
/// socket, not the code under test's.
#[derive(Debug, Clone)]
pub struct Dial {
    pub mark: Option<u32>,
    pub bind: Option<SocketAddr>,
    /// IP_TRANSPARENT, to bind an address that is not the namespace's own.
    pub transparent: bool,
    pub timeout: Duration,
}

impl Default for Dial {
    fn default() -> Self {
        Dial {
            mark: None,
            bind: None,
            transparent: false,
            timeout: CONNECTED,
        }
    }
}

impl Dial {
    /// Connects from the calling thread's namespace.
    pub fn connect(&self, target: SocketAddr) -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
        if let Some(mark) = self.mark {
            socket.set_mark(mark)?;
        }
        if self.transparent {
            match target {
                SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
            }
        }
        if let Some(bind) = self.bind {
            socket.bind(&bind.into())?;
        }
        socket.connect_timeout(&target.into(), self.timeout)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(CONNECTED))?;
        Ok(stream)
    }
}

/// A non-blocking test listener; IPv6 ones are IPv6-only.
pub fn listener(addr: SocketAddr, transparent: bool) -> TcpListener {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    if addr.is_ipv6() {
        socket.set_only_v6(true).unwrap();
    }
    if transparent {
        match addr {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true).unwrap(),
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true).unwrap(),
        }
    }
    socket.bind(&addr.into()).unwrap();
    socket.listen(16).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket.into()
}

/// The next connection on a test listener and its peer, polled for until a deadline.
/// The stream is blocking, with a read timeout.
pub fn accept(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + CONNECTED;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(CONNECTED)).unwrap();
                return Some((stream, peer));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept on {:?}: {e}", listener.local_addr()),
        }
    }
}

/// Asserts no connection is waiting on a test listener. Called after a connection that
/// went elsewhere was accepted there, so a misrouted one would already be queued.
pub fn assert_nothing_pending(listener: &TcpListener) {
    match listener.accept() {
        Ok((stream, peer)) => panic!(
            "unexpected connection on {:?} from {peer} to {:?}",
            listener.local_addr(),
            stream.local_addr()
        ),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}"),
    }
}

/// Runs a command; panics unless it succeeds. Returns its standard output.
pub fn run(args: &[&str]) -> String {
    let output = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        output.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
