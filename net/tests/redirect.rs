//! The pod redirect rule set in real network namespaces (needs root): installing is
//! idempotent and removing leaves nothing; with the rules in place a pod's outbound TCP
//! lands on 15001 with its original destination, inbound plaintext lands on 15006 with
//! the original destination as local address, while ztunnel's own sockets, loopback,
//! HBONE, health probes and UDP pass untouched, and the app's replies to ztunnel's
//! spoofed-source connections come back to ztunnel; IPv6 is captured or dropped, never
//! passed; a failed install leaves nothing behind.
//!
//! Each test builds its own namespaces: a "pod" joined by a veth pair to a "peer" that
//! plays the rest of the network (the node, other pods, the outside world).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_net::redirect::{
    self, IpFamily, Ipv6Mode, RedirectConfig, RedirectError, Step, INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT, ZTUNNEL_MARK,
};
use nix::sched::{setns, CloneFlags};
use socket2::{Domain, SockRef, Socket, Type};

/// The node, as the pod sees it: its default gateway and the health probes' source.
const NODE: &str = "192.0.2.1";
const NODE6: &str = "2001:db8:1::1";
/// Another peer on the pod's network.
const OTHER: &str = "192.0.2.3";
const OTHER6: &str = "2001:db8:1::3";
const POD: &str = "192.0.2.2";
const POD6: &str = "2001:db8:1::2";
/// A destination beyond the gateway.
const REMOTE: &str = "198.51.100.7:80";
const REMOTE6: &str = "[2001:db8::7]:80";

const CONNECTED: Duration = Duration::from_secs(3);
/// How long a connection that should be dropped gets to show it is not.
const DROPPED: Duration = Duration::from_millis(300);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

// ---------------------------------------------------------------------------------
// Install, reinstall, remove

#[test]
fn install_twice_leaves_one_copy_and_remove_leaves_nothing() {
    let ns = Netns::new("idem");
    ns.ip("link set lo up");
    let config = RedirectConfig {
        probe_sources: vec![NODE.parse().unwrap(), NODE6.parse().unwrap()],
        ..RedirectConfig::default()
    };

    for round in 1..=2 {
        redirect::install(ns.path(), &config).unwrap();
        for family in IpFamily::ALL {
            let save = ns.save(family);
            let tables = sections(&save);
            for (table, chain) in [
                ("mangle", "AMBIT_PRERT"),
                ("mangle", "AMBIT_OUTPUT"),
                ("nat", "AMBIT_OUTPUT"),
            ] {
                let lines = &tables[table];
                assert!(
                    lines.contains(&format!(":{chain} - [0:0]")),
                    "round {round}: {family} {table} lacks {chain}:\n{save}"
                );
            }
            for (table, jump) in [
                ("mangle", "-A PREROUTING -j AMBIT_PRERT"),
                ("mangle", "-A OUTPUT -j AMBIT_OUTPUT"),
                ("nat", "-A OUTPUT -j AMBIT_OUTPUT"),
            ] {
                let count = tables[table].iter().filter(|l| *l == jump).count();
                assert_eq!(
                    count, 1,
                    "round {round}: {family} {table} `{jump}`:\n{save}"
                );
            }
            let prerouting = tables["mangle"]
                .iter()
                .filter(|l| l.starts_with("-A AMBIT_PRERT "))
                .count();
            assert_eq!(prerouting, 6, "round {round}: {family}:\n{save}");
            let rules = ns.ip_rules(family);
            assert_eq!(
                rules.matches("fwmark 0x111/0xfff lookup 100").count(),
                1,
                "round {round}: {family}:\n{rules}"
            );
            let route = ns.run(&["ip", flag(family), "route", "show", "table", "100"]);
            assert!(route.contains("local default dev lo"), "{family}: {route}");
        }
    }

    redirect::remove(ns.path()).unwrap();
    ns.assert_clean();
    redirect::remove(ns.path()).unwrap();
    ns.assert_clean();
}

#[test]
fn reinstall_with_a_changed_config_replaces_the_old_rules() {
    let ns = Netns::new("change");
    ns.ip("link set lo up");
    redirect::install(ns.path(), &RedirectConfig::default()).unwrap();

    let changed = RedirectConfig {
        ipv6: Ipv6Mode::Drop,
        route_table: 200,
        ..RedirectConfig::default()
    };
    redirect::install(ns.path(), &changed).unwrap();

    let v4 = ns.ip_rules(IpFamily::V4);
    assert!(v4.contains("fwmark 0x111/0xfff lookup 200"), "{v4}");
    assert!(!v4.contains("lookup 100"), "{v4}");
    let v6 = ns.ip_rules(IpFamily::V6);
    assert!(
        !v6.contains("0x111"),
        "IPv6 is not captured, so no route back:\n{v6}"
    );
    let save6 = ns.save(IpFamily::V6);
    let tables = sections(&save6);
    assert!(!tables.contains_key("nat") || !tables["nat"].iter().any(|l| l.contains("AMBIT_")));
    assert!(
        !tables["mangle"].iter().any(|l| l.contains("AMBIT_")),
        "{save6}"
    );
    assert!(
        tables["filter"].contains(&"-A OUTPUT -j AMBIT_OUTPUT".to_owned()),
        "{save6}"
    );
    assert!(
        tables["filter"].contains(&"-A INPUT -j AMBIT_INPUT".to_owned()),
        "{save6}"
    );

    redirect::remove(ns.path()).unwrap();
    ns.assert_clean();
}

#[test]
fn install_into_a_missing_namespace_fails_naming_it() {
    let path = PathBuf::from(format!(
        "/run/netns/ambit-rd-missing-{}",
        rand::random::<u32>()
    ));
    let err = redirect::install(&path, &RedirectConfig::default()).unwrap_err();
    assert!(
        matches!(err, RedirectError::NetnsUnavailable { ref netns, .. } if *netns == path),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(matches!(
        redirect::remove(&path),
        Err(RedirectError::NetnsUnavailable { .. })
    ));
}

#[test]
fn failed_ipv6_capture_rolls_back_ipv4_and_ipv6_drop_then_installs() {
    let ns = Netns::new("rollback");
    ns.ip("link set lo up");
    // No IPv6 in this pod: its IPv6 return route cannot be added, after IPv4 is done.
    ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ns.run(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);

    let err = redirect::install(ns.path(), &RedirectConfig::default()).unwrap_err();
    let RedirectError::CommandFailed {
        ref netns,
        step,
        ref command,
        status,
        ref stderr,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(netns, ns.path());
    assert_eq!(step, Step::WriteRouting(IpFamily::V6));
    assert!(
        command.contains("ip -6 route replace local ::/0 dev lo table 100"),
        "{command}"
    );
    assert!(!status.success());
    assert!(stderr.contains("IPv6 is disabled"), "{stderr}");
    assert_eq!(err.failed_family(), Some(IpFamily::V6));
    let message = err.to_string();
    assert!(
        message.contains(&ns.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("ip -6 route replace"), "{message}");
    ns.assert_clean();

    // The caller's fallback: IPv6 dropped instead of captured.
    let drop = RedirectConfig {
        ipv6: Ipv6Mode::Drop,
        ..RedirectConfig::default()
    };
    redirect::install(ns.path(), &drop).unwrap();
    assert!(ns
        .save(IpFamily::V4)
        .contains("-A PREROUTING -j AMBIT_PRERT"));
    assert!(ns.save(IpFamily::V6).contains("-A OUTPUT -j AMBIT_OUTPUT"));
    redirect::remove(ns.path()).unwrap();
    ns.assert_clean();
}

// ---------------------------------------------------------------------------------
// Traffic

#[test]
fn outbound_tcp_lands_on_15001_with_its_original_destination() {
    let net = Network::new("out4");
    let remote = net.peer.listen(addr(REMOTE));
    net.install(Ipv6Mode::Capture);
    let ztunnel = net.pod.listen(at("0.0.0.0", OUTBOUND_PORT));

    let _client = net.pod.connect(addr(REMOTE), &Dial::default()).unwrap();

    let accepted = accept(&ztunnel).expect("outbound connection on 15001");
    let original = SockRef::from(&accepted).original_dst_v4().unwrap();
    assert_eq!(original.as_socket(), Some(addr(REMOTE)));
    assert_eq!(
        accepted.peer_addr().unwrap().ip(),
        POD.parse::<std::net::IpAddr>().unwrap()
    );
    assert_nothing_pending(&remote);
}

#[test]
fn ztunnel_sockets_loopback_self_and_udp_are_not_captured() {
    let net = Network::new("bypass");
    let remote = net.peer.listen(addr(REMOTE));
    let remote_udp = net.peer.udp(addr("198.51.100.7:53"));
    net.install(Ipv6Mode::Capture);
    let ztunnel = net.pod.listen(at("0.0.0.0", OUTBOUND_PORT));
    let local = net.pod.listen(addr("127.0.0.1:8081"));
    let own_ip = net.pod.listen(at(POD, 8082));

    let marked = Dial {
        mark: Some(ZTUNNEL_MARK),
        ..Dial::default()
    };
    let _z = net.pod.connect(addr(REMOTE), &marked).unwrap();
    accept(&remote).expect("ztunnel's marked socket reaches the real destination");

    let _l = net
        .pod
        .connect(addr("127.0.0.1:8081"), &Dial::default())
        .unwrap();
    accept(&local).expect("loopback connection reaches its listener");

    let _s = net.pod.connect(at(POD, 8082), &Dial::default()).unwrap();
    accept(&own_ip).expect("connection to the pod's own address reaches its listener");

    let sender = net.pod.udp(addr("0.0.0.0:0"));
    sender.send_to(b"dns?", addr("198.51.100.7:53")).unwrap();
    let mut buf = [0; 16];
    let (n, _) = remote_udp
        .recv_from(&mut buf)
        .expect("UDP reaches the network");
    assert_eq!(&buf[..n], b"dns?");

    assert_nothing_pending(&ztunnel);
}

#[test]
fn inbound_plaintext_lands_on_15006_but_hbone_and_probes_do_not() {
    let net = Network::new("in4");
    net.install(Ipv6Mode::Capture);
    let plaintext = net
        .pod
        .listen_transparent(at("0.0.0.0", INBOUND_PLAINTEXT_PORT));
    let hbone = net.pod.listen(at("0.0.0.0", redirect::HBONE_PORT));
    let app = net.pod.listen(at("0.0.0.0", 8080));
    let from_other = Dial {
        bind: Some(at(OTHER, 0)),
        ..Dial::default()
    };

    let _c = net.peer.connect(at(POD, 8080), &from_other).unwrap();
    let accepted = accept(&plaintext).expect("inbound plaintext on 15006");
    assert_eq!(accepted.local_addr().unwrap(), at(POD, 8080));
    assert_eq!(
        accepted.peer_addr().unwrap().ip(),
        OTHER.parse::<std::net::IpAddr>().unwrap()
    );
    assert_nothing_pending(&app);

    let _h = net
        .peer
        .connect(at(POD, redirect::HBONE_PORT), &from_other)
        .unwrap();
    accept(&hbone).expect("HBONE reaches the 15008 listener directly");
    assert_nothing_pending(&plaintext);

    let from_node = Dial {
        bind: Some(at(NODE, 0)),
        ..Dial::default()
    };
    let _p = net.peer.connect(at(POD, 8080), &from_node).unwrap();
    accept(&app).expect("a probe from the node reaches the app directly");
    assert_nothing_pending(&plaintext);
}

#[test]
fn app_replies_to_ztunnels_spoofed_source_connection_come_back_to_ztunnel() {
    let net = Network::new("spoof4");
    let app = net.pod.listen(at(POD, 8080));
    let ztunnel_dial = Dial {
        mark: Some(ZTUNNEL_MARK),
        bind: Some(at(OTHER, 40000)),
        transparent: true,
        timeout: DROPPED,
    };
    // Without the rules the app's SYN-ACK goes to the real 192.0.2.3, which resets it.
    net.pod
        .connect(at(POD, 8080), &ztunnel_dial)
        .expect_err("without rules the reply leaves the pod");
    drain(&app);

    net.install(Ipv6Mode::Capture);
    let mut ztunnel = net
        .pod
        .connect(
            at(POD, 8080),
            &Dial {
                bind: Some(at(OTHER, 40001)),
                ..ztunnel_dial
            },
        )
        .expect("with the rules the reply comes back to ztunnel");
    let mut upstream = accept(&app).expect("app accepts ztunnel's connection");
    assert_eq!(
        upstream.peer_addr().unwrap(),
        at(OTHER, 40001),
        "app sees the original source"
    );
    upstream.write_all(b"pong").unwrap();
    let mut reply = [0; 4];
    ztunnel.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"pong");
}

#[test]
fn ipv6_is_captured_like_ipv4() {
    let net = Network::new("cap6");
    let remote = net.peer.listen(addr(REMOTE6));
    net.install(Ipv6Mode::Capture);
    let outbound = net.pod.listen(at("::", OUTBOUND_PORT));
    let plaintext = net.pod.listen_transparent(at("::", INBOUND_PLAINTEXT_PORT));
    let app = net.pod.listen(at("::", 8080));

    let _c = net.pod.connect(addr(REMOTE6), &Dial::default()).unwrap();
    let accepted = accept(&outbound).expect("IPv6 outbound on 15001");
    let original = SockRef::from(&accepted).original_dst_v6().unwrap();
    assert_eq!(original.as_socket(), Some(addr(REMOTE6)));

    let marked = Dial {
        mark: Some(ZTUNNEL_MARK),
        ..Dial::default()
    };
    let _z = net.pod.connect(addr(REMOTE6), &marked).unwrap();
    accept(&remote).expect("ztunnel's marked IPv6 socket reaches the real destination");

    let from_other = Dial {
        bind: Some(at(OTHER6, 0)),
        ..Dial::default()
    };
    let _i = net.peer.connect(at(POD6, 8080), &from_other).unwrap();
    let accepted = accept(&plaintext).expect("IPv6 inbound plaintext on 15006");
    assert_eq!(accepted.local_addr().unwrap(), at(POD6, 8080));
    assert_nothing_pending(&app);
}

#[test]
fn ipv6_drop_mode_blocks_ipv6_tcp_while_ipv4_is_still_captured() {
    let net = Network::new("drop6");
    let remote6 = net.peer.listen(addr(REMOTE6));
    let app6 = net.pod.listen(at("::", 8080));
    // Without rules, IPv6 flows both ways in plaintext.
    net.pod.connect(addr(REMOTE6), &Dial::default()).unwrap();
    accept(&remote6).unwrap();
    net.peer.connect(at(POD6, 8080), &Dial::default()).unwrap();
    accept(&app6).unwrap();

    net.install(Ipv6Mode::Drop);
    let outbound = net.pod.listen(at("0.0.0.0", OUTBOUND_PORT));
    let outbound6 = net.pod.listen(at("::", OUTBOUND_PORT));
    let quick = Dial {
        timeout: DROPPED,
        ..Dial::default()
    };

    let err = net.pod.connect(addr(REMOTE6), &quick).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    let from_other = Dial {
        bind: Some(at(OTHER6, 0)),
        ..quick.clone()
    };
    net.peer
        .connect(at(POD6, 8080), &from_other)
        .expect_err("inbound IPv6 TCP is dropped");
    assert_nothing_pending(&remote6);
    assert_nothing_pending(&app6);
    assert_nothing_pending(&outbound6);

    // Loopback IPv6 still works.
    let local6 = net.pod.listen(addr("[::1]:8081"));
    net.pod
        .connect(addr("[::1]:8081"), &Dial::default())
        .unwrap();
    accept(&local6).expect("IPv6 loopback still works");

    net.pod.connect(addr(REMOTE), &Dial::default()).unwrap();
    let accepted = accept(&outbound).expect("IPv4 outbound still on 15001");
    let original = SockRef::from(&accepted).original_dst_v4().unwrap();
    assert_eq!(original.as_socket(), Some(addr(REMOTE)));
}

// ---------------------------------------------------------------------------------
// Test support

/// A network namespace, deleted when dropped.
struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("ambit-rd-{tag}-{:08x}", rand::random::<u32>());
        run(&["ip", "netns", "add", &name]);
        let path = PathBuf::from(format!("/run/netns/{name}"));
        Netns { name, path }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a command inside the namespace; panics unless it succeeds.
    fn run(&self, args: &[&str]) -> String {
        let net = format!("--net={}", self.path.display());
        let mut all = vec!["nsenter", net.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    fn ip(&self, args: &str) {
        let mut all = vec!["ip"];
        all.extend(args.split_whitespace());
        self.run(&all);
    }

    fn save(&self, family: IpFamily) -> String {
        self.run(&[match family {
            IpFamily::V4 => "iptables-save",
            IpFamily::V6 => "ip6tables-save",
        }])
    }

    fn ip_rules(&self, family: IpFamily) -> String {
        self.run(&["ip", flag(family), "rule", "list"])
    }

    fn assert_clean(&self) {
        for family in IpFamily::ALL {
            let save = self.save(family);
            assert!(!save.contains("AMBIT_"), "{family} rules left:\n{save}");
            let rules = self.ip_rules(family);
            assert!(!rules.contains("0x111"), "{family} ip rule left:\n{rules}");
            let routes = Command::new("nsenter")
                .arg(format!("--net={}", self.path.display()))
                .args(["ip", flag(family), "route", "show", "table", "100"])
                .output()
                .unwrap();
            let routes = String::from_utf8_lossy(&routes.stdout);
            assert!(!routes.contains("local"), "{family} route left:\n{routes}");
        }
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates stay there.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(&self.path).unwrap();
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.enter(move || listener(addr, false))
    }

    /// A listener that accepts TPROXYed connections, like ztunnel's 15006.
    fn listen_transparent(&self, addr: SocketAddr) -> TcpListener {
        self.enter(move || listener(addr, true))
    }

    fn udp(&self, addr: SocketAddr) -> UdpSocket {
        self.enter(move || {
            let socket = UdpSocket::bind(addr).unwrap();
            socket.set_read_timeout(Some(CONNECTED)).unwrap();
            socket
        })
    }

    fn connect(&self, target: SocketAddr, dial: &Dial) -> io::Result<TcpStream> {
        let dial = dial.clone();
        self.enter(move || dial.connect(target))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
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
/// (192.0.2.1, the pod's gateway and probe source), another host on the pod's network
/// (192.0.2.3) and a remote destination (198.51.100.7, 2001:db8::7) beyond it.
struct Network {
    pod: Netns,
    peer: Netns,
}

impl Network {
    fn new(tag: &str) -> Network {
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
        peer.ip("-6 addr add 2001:db8::7/128 dev lo");
        peer.ip("link set veth0 up");
        Network { pod, peer }
    }

    fn install(&self, ipv6: Ipv6Mode) {
        let config = RedirectConfig {
            probe_sources: vec![NODE.parse().unwrap(), NODE6.parse().unwrap()],
            ipv6,
            ..RedirectConfig::default()
        };
        redirect::install(self.pod.path(), &config).unwrap();
    }
}

/// How a test client connects.
#[derive(Debug, Clone)]
struct Dial {
    mark: Option<u32>,
    bind: Option<SocketAddr>,
    /// IP_TRANSPARENT, to bind an address that is not the namespace's own.
    transparent: bool,
    timeout: Duration,
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
    fn connect(&self, target: SocketAddr) -> io::Result<TcpStream> {
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

fn listener(addr: SocketAddr, transparent: bool) -> TcpListener {
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

/// The next connection on `listener`, polled for until a deadline.
fn accept(listener: &TcpListener) -> Option<TcpStream> {
    let deadline = Instant::now() + CONNECTED;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(CONNECTED)).unwrap();
                return Some(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept on {:?}: {e}", listener.local_addr()),
        }
    }
}

/// Asserts no connection is waiting on `listener`. Called after a connection that
/// went elsewhere was accepted there, so a misrouted one would already be queued.
fn assert_nothing_pending(listener: &TcpListener) {
    match listener.accept() {
        Ok((stream, peer)) => panic!(
            "unexpected connection on {:?} from {peer} to {:?}",
            listener.local_addr(),
            stream.local_addr()
        ),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}"),
    }
}

fn drain(listener: &TcpListener) {
    while listener.accept().is_ok() {}
}

/// Splits `iptables-save` output into its tables' lines.
fn sections(save: &str) -> std::collections::HashMap<String, Vec<String>> {
    let mut tables: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut current: Option<String> = None;
    for line in save.lines() {
        if let Some(table) = line.strip_prefix('*') {
            current = Some(table.to_owned());
            tables.insert(table.to_owned(), Vec::new());
        } else if let Some(lines) = current.as_ref().and_then(|t| tables.get_mut(t)) {
            lines.push(line.to_owned());
        }
    }
    tables
}

fn flag(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "-4",
        IpFamily::V6 => "-6",
    }
}

fn run(args: &[&str]) -> String {
    let output = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        output.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
