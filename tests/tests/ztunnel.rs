//! ztunnel end to end: the real `ambit-ca` and `ztunnel` binaries in a local mesh of
//! network namespaces, pods created through the CNI chain, the shared redirect rules
//! installed in each enrolled pod, and pods handed to ztunnel over the hand-off socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_localmesh::{Pod, PodSpec, Protocol, ServiceSpec, Signal};
use ambit_net::netns::{ConnectOpts, NetnsHandle};
use support::{assert_refused, eventually, metric, pod, two_nodes, Harness, DEADLINE, TEST_LOG};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A two-node mesh with an HBONE `client` pod on `client_node` and an HBONE `server`
/// pod on `server_node`, both in namespace `shop`.
fn client_server(client_node: &str, server_node: &str) -> (Harness, Pod, Pod) {
    client_server_with(client_node, server_node, &[])
}

/// [`client_server`] with more ztunnel flags.
fn client_server_with(
    client_node: &str,
    server_node: &str,
    ztunnel_flags: &[&str],
) -> (Harness, Pod, Pod) {
    let mesh = two_nodes();
    let client = mesh
        .add_pod(
            client_node,
            PodSpec::new("shop", "client").service_account("client"),
        )
        .unwrap();
    let server = mesh
        .add_pod(
            server_node,
            PodSpec::new("shop", "server").service_account("server"),
        )
        .unwrap();
    // Both are reported as captured (HBONE) when the harness enrols them.
    (
        Harness::start_with(mesh, TEST_LOG, ztunnel_flags),
        client,
        server,
    )
}

/// Sends through both ztunnels and checks bytes, the source IP the app saw and that
/// each side's ztunnel carried the connection over HBONE.
async fn pod_to_pod_over_hbone(client_node: &str, server_node: &str, bytes: u64) {
    let (h, client, server) = client_server(client_node, server_node);
    let echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&server).await;

    h.send_ok(&client, server.addr(8080), bytes, 1);
    // The app saw the client pod's own address.
    echo.wait_for_log(&format!("accepted from {}:", client.ip()), DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    // And it went out of the client's ztunnel over HBONE and into the server's.
    // (Their access logs say so: one line per connection as it ends.)
    let inbound = h
        .ztunnel(server_node)
        .wait_for_log("direction=\"inbound\"", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    for want in [
        "connection complete".to_owned(),
        format!("bytes_recv={bytes} "),
        format!("dst.hbone_addr={}", server.addr(8080)),
        "src.identity=spiffe://cluster.local/ns/shop/sa/client".to_owned(),
        "dst.workload=server".to_owned(),
    ] {
        assert!(inbound.contains(&want), "no {want} in {inbound}");
    }
    let outbound = h
        .ztunnel(client_node)
        .wait_for_log(&format!("dst.addr={}", server.addr(15008)), DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    for want in [
        "connection complete".to_owned(),
        "direction=\"outbound\"".to_owned(),
        format!("dst.hbone_addr={}", server.addr(8080)),
        format!("bytes_sent={bytes} "),
    ] {
        assert!(outbound.contains(&want), "no {want} in {outbound}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_to_pod_across_nodes_goes_over_hbone_and_the_app_sees_the_client_ip() {
    pod_to_pod_over_hbone("node-a", "node-b", 1_000_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_to_pod_on_the_same_node_goes_over_hbone_100_mb_intact_and_the_app_sees_the_client_ip()
{
    pod_to_pod_over_hbone("node-a", "node-a", 100_000_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_mb_transfer_across_nodes_arrives_intact() {
    pod_to_pod_over_hbone("node-a", "node-b", 100_000_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn service_vip_traffic_reaches_every_endpoint() {
    let mesh = two_nodes();
    let client = pod(&mesh, "node-a", "shop", "client", "client");
    let web_a = pod(&mesh, "node-a", "shop", "web-a", "web");
    let web_b = pod(&mesh, "node-b", "shop", "web-b", "web");
    for pod in [&client, &web_a, &web_b] {
        mesh.set_protocol(pod, Protocol::Hbone).unwrap();
    }
    let h = Harness::start(mesh);
    let _servers: Vec<_> = [(&web_a, "web-a"), (&web_b, "web-b")]
        .into_iter()
        .map(|(pod, name)| h.serve(pod, &["http", "--port", "8080", "--name", name]))
        .collect();
    for pod in [&client, &web_a, &web_b] {
        h.enrol(pod).await;
    }
    // The service comes after ztunnel started: it must pick it up from the model file.
    let web = h
        .mesh
        .add_service(
            ServiceSpec::new("shop", "web")
                .port(80, 8080)
                .endpoints([&web_a, &web_b]),
        )
        .unwrap();
    h.update_model().await;

    let to = web.addr(80).to_string();
    let mut seen = BTreeSet::new();
    let start = Instant::now();
    // Endpoint choice may be random: ask until both answered (each round is 10 GETs).
    while seen.len() < 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "only {seen:?} answered on {to}\n{}",
            h.logs()
        );
        let out = h.run_app(&client, &["get", "--to", &to, "--count", "10"], DEADLINE);
        assert!(
            out.status.success(),
            "GET {to} failed: {}\n{}",
            out.log,
            h.logs()
        );
        for line in out.log.lines() {
            let pod = line.split_whitespace().find_map(|w| w.strip_prefix("pod="));
            if let Some(pod) = pod {
                // Each endpoint saw the client pod's own address.
                assert!(line.contains(&format!("client={}:", client.ip())), "{line}");
                seen.insert(pod.to_owned());
            }
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["web-a".to_owned(), "web-b".to_owned()])
    );
    // And it went over HBONE to endpoints, never to the VIP itself.
    let outbound = h
        .ztunnel("node-a")
        .wait_for_log("direction=\"outbound\"", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(outbound.contains("15008"), "{outbound}");

    // web-b leaves the service's endpoints (its EndpointSlice changes): once the model
    // has reached the ztunnels, only web-a answers.
    h.mesh.set_endpoints(&web, [&web_a]).unwrap();
    h.update_model().await;
    let out = h.run_app(&client, &["get", "--to", &to, "--count", "10"], DEADLINE);
    assert!(out.status.success(), "GET {to} failed: {}", out.log);
    let answered: BTreeSet<&str> = out
        .log
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("pod=")))
        .collect();
    assert_eq!(answered, BTreeSet::from(["web-a"]), "{}", out.log);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_outside_the_mesh_reaches_a_mesh_pod_through_15006() {
    let mesh = two_nodes();
    // Not enrolled, plain TCP in the model.
    let outsider = mesh
        .add_pod("node-a", PodSpec::new("legacy", "outsider"))
        .unwrap();
    let server = pod(&mesh, "node-b", "shop", "server", "server");
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    let h = Harness::start(mesh);
    let echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&server).await;

    h.send_ok(&outsider, server.addr(8080), 100_000, 1);
    echo.wait_for_log(&format!("accepted from {}:", outsider.ip()), DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    // It went through the server's ztunnel (inbound plaintext), which counted it.
    // In plaintext nobody proved an identity: both principals are unknown.
    eventually(
        DEADLINE,
        || async {
            let text = h.metrics("node-b").await;
            let bytes = metric(
                &text,
                "istio_tcp_received_bytes_total",
                &[
                    ("reporter", "destination"),
                    ("destination_workload", "server"),
                    ("destination_principal", "unknown"),
                    ("source_principal", "unknown"),
                    ("connection_security_policy", "unknown"),
                ],
            );
            (bytes >= 100_000.0).then_some(())
        },
        || format!("no plaintext inbound counted\n{}", h.logs()),
    )
    .await;

    // ztunnel's own ports are not the app's: a connection to one is closed, not proxied
    // to the pod's address, where ztunnel's listener would take it again, without end.
    let to = server.addr(15006);
    let out = h.run_app(
        &outsider,
        &["send", "--to", &to.to_string(), "--bytes", "10"],
        DEADLINE,
    );
    assert!(!out.status.success(), "{to} answered: {}", out.log);
    h.ztunnel("node-b")
        .wait_for_log("is one of ztunnel's own ports", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_marker_never_crosses_nodes_in_plaintext_unless_the_destination_is_outside_the_mesh() {
    marker_stays_encrypted(Family::V4).await;
}

/// The local mesh is dual-stack: over IPv6 the pod's traffic is captured and carried
/// over HBONE just the same, and the app sees the client pod's own IPv6 address.
#[tokio::test(flavor = "multi_thread")]
async fn over_ipv6_too_a_marker_never_crosses_in_plaintext_and_the_app_sees_the_client_ipv6() {
    marker_stays_encrypted(Family::V6).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn addr(self, pod: &Pod, port: u16) -> std::net::SocketAddr {
        match self {
            Family::V4 => pod.addr(port),
            Family::V6 => pod.addr6(port),
        }
    }

    fn ip(self, pod: &Pod) -> std::net::IpAddr {
        self.addr(pod, 0).ip()
    }
}

/// HTTP to a mesh pod and to a pod outside the mesh on another node, over `family`,
/// each answering with a marker: only the outside one's may show on the bridge.
async fn marker_stays_encrypted(family: Family) {
    let mesh = two_nodes();
    let client = pod(&mesh, "node-a", "shop", "client", "client");
    let server = pod(&mesh, "node-b", "shop", "server", "server");
    // Outside the mesh: the client's ztunnel passes its traffic through in plaintext.
    let outside = mesh
        .add_pod("node-b", PodSpec::new("legacy", "outside"))
        .unwrap();
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    let h = Harness::start(mesh);
    let secret = "AMBITSECRETMARKER7f3a";
    let open = "AMBITOPENMARKER91c2";
    let _s1 = h.serve(&server, &["http", "--port", "8080", "--name", secret]);
    let _s2 = h.serve(&outside, &["http", "--port", "8080", "--name", open]);
    h.enrol(&client).await;
    h.enrol(&server).await;

    let dump = support::capture(&h);
    let client_ip = match family.ip(&client) {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
    };
    for (to, marker) in [
        (family.addr(&server, 8080), secret),
        (family.addr(&outside, 8080), open),
    ] {
        let to = to.to_string();
        let path = format!("/{marker}");
        let out = h.run_app(
            &client,
            &["get", "--to", &to, "--path", &path, "--count", "3"],
            DEADLINE,
        );
        assert!(
            out.status.success() && out.log.contains(marker),
            "GET {to} failed: {}\n{}",
            out.log,
            h.logs()
        );
        // Both apps saw the client pod's own address (through the mesh, the server's
        // ztunnel connected from it).
        assert!(
            out.log.contains(&format!("client={client_ip}:")),
            "GET {to}: the app did not see {client_ip}: {}",
            out.log
        );
    }
    // The passthrough marker on the wire also proves the capture saw the traffic.
    let hbone_port = format!("{}.15008", family.ip(&server));
    dump.wait_for_log(open, DEADLINE)
        .unwrap_or_else(|e| panic!("passthrough marker not captured: {e}\n{}", h.logs()));
    dump.wait_for_log(&hbone_port, DEADLINE)
        .unwrap_or_else(|e| panic!("no HBONE traffic captured: {e}\n{}", h.logs()));
    dump.stop().unwrap();
    let captured = dump.log();
    assert!(
        !captured.contains(secret),
        "the mesh marker crossed the bridge in plaintext:\n{captured}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_the_connections_and_bytes_sent() {
    let (h, client, server) = client_server("node-a", "node-b");
    let _echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&server).await;
    let (connections, bytes) = (3u64, 250_000u64);
    h.send_ok(&client, server.addr(8080), bytes, connections);

    let src = "spiffe://cluster.local/ns/shop/sa/client";
    let dst = "spiffe://cluster.local/ns/shop/sa/server";
    for (node, reporter) in [("node-b", "destination"), ("node-a", "source")] {
        let labels = [
            ("reporter", reporter),
            ("source_principal", src),
            ("destination_principal", dst),
        ];
        eventually(
            DEADLINE,
            || async {
                let text = h.metrics(node).await;
                let opened = metric(&text, "istio_tcp_connections_opened_total", &labels);
                let closed = metric(&text, "istio_tcp_connections_closed_total", &labels);
                let received = metric(&text, "istio_tcp_received_bytes_total", &labels);
                let sent = metric(&text, "istio_tcp_sent_bytes_total", &labels);
                (opened >= connections as f64
                    && closed >= connections as f64
                    && received >= (connections * bytes) as f64
                    && sent >= (connections * bytes) as f64)
                    .then_some(())
            },
            || {
                format!(
                    "{node}'s {reporter} metrics do not count {connections} x {bytes} bytes\n{}",
                    h.logs()
                )
            },
        )
        .await;
    }
    let text = h.metrics("node-b").await;
    let opened = metric(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", src),
            ("destination_principal", dst),
        ],
    );
    assert_eq!(opened, connections as f64, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_a_pod_closes_its_listeners() {
    let (h, client, server) = client_server("node-a", "node-b");
    let _echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&server).await;
    h.send_ok(&client, server.addr(8080), 1000, 1);

    h.remove(&client).await;
    h.ztunnel("node-a")
        .wait_for_log("no longer serving pod", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    // The rules still capture the client's traffic for 15001, where nothing listens:
    // refused, in plaintext least of all.
    assert_refused(&h, &client, server.addr(8080));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_open_connections_refuses_new_ones_then_exits() {
    // A drain deadline long enough that only the open connection's end, never the
    // deadline, can end the drain within this test.
    let (h, client, server) = client_server_with("node-a", "node-b", &["--drain-deadline", "60s"]);
    let _echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&server).await;
    let mut open = captured_connection(&client, server.addr(8080)).await;
    round_trip(&mut open, b"before").await;

    let (source, destination) = (h.ztunnel("node-a"), h.ztunnel("node-b"));
    source.signal(Signal::SIGTERM);
    destination.signal(Signal::SIGTERM);
    for z in [source, destination] {
        z.wait_for_log("draining", DEADLINE)
            .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    }
    // The open connection carries on through both draining ztunnels...
    round_trip(&mut open, b"during the drain").await;
    // ...while a new one is refused: the pod's outbound listener is gone, and its
    // traffic is still captured, so it fails closed.
    assert_refused(&h, &client, server.addr(8080));
    for z in [source, destination] {
        assert!(z.try_wait().unwrap().is_none(), "{}", h.logs());
    }

    // Its end ends the drain: both exit cleanly with nothing left behind.
    drop(open);
    for z in [source, destination] {
        let status = z
            .wait(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
        assert!(status.success(), "ztunnel exited {status}\n{}", h.logs());
        let stopped = z
            .wait_for_log("ztunnel stopped", Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(stopped.contains("left=0"), "{stopped}");
    }
}

/// The control plane going away takes nothing down: open connections keep flowing,
/// and new ones are made with the model and certificates the ztunnels already hold.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_control_plane_down_traffic_flows_on_the_last_model() {
    let (mut h, client, server) = client_server("node-a", "node-b");
    let _echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&server).await;
    let mut open = captured_connection(&client, server.addr(8080)).await;
    round_trip(&mut open, b"before").await;

    // It exits on SIGTERM even with ztunnels subscribed: their streams end with it.
    let stopped = h.control().stop().unwrap();
    assert!(
        stopped.success(),
        "ambit-control did not exit cleanly: {stopped:?}"
    );
    for node in ["node-a", "node-b"] {
        h.ztunnel(node)
            .wait_for_log("reconnecting", DEADLINE)
            .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    }
    round_trip(&mut open, b"with the control plane down").await;
    h.send_ok(&client, server.addr(8080), 100_000, 3);

    // Restarted, it resyncs every ztunnel: a pod added meanwhile reaches both, and the
    // connection opened before it all keeps flowing.
    let added = pod(&h.mesh, "node-a", "shop", "added", "added");
    h.restart_control();
    let start = Instant::now();
    h.update_model().await;
    eprintln!("ztunnels resynced {:?} after the restart", start.elapsed());
    for node in ["node-a", "node-b"] {
        let dump = h.config_dump(node).await;
        assert!(
            dump.contains(&format!("\"{}\"", added.uid())),
            "{node}: {dump}"
        );
    }
    round_trip(&mut open, b"after the restart").await;
    h.send_ok(&client, server.addr(8080), 100_000, 3);
}

/// A connection from `pod` to `to` as its app makes it: unmarked, so captured.
async fn captured_connection(pod: &Pod, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let app = NetnsHandle::from_path(pod.netns().path()).unwrap();
    let unmarked = ConnectOpts {
        mark: None,
        ..ConnectOpts::default()
    };
    app.connect(to, unmarked).await.unwrap()
}

/// Writes `data` to an echoed connection and reads it back.
async fn round_trip(stream: &mut tokio::net::TcpStream, data: &[u8]) {
    stream.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .expect("echo within the deadline")
        .unwrap();
    assert_eq!(back, data);
}

/// Established TCP connections to 15008 in `pod`'s namespace.
fn hbone_connections(pod: &Pod) -> usize {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns().path().display()))
        .args(["ss", "-Htn", "state", "established", "( sport = :15008 )"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ss: {:?}", out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_connections_use_at_most_ten_tls_connections() {
    thousand_connections("node-a", "node-b").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_connections_on_one_node_use_at_most_ten_tls_connections() {
    thousand_connections("node-a", "node-a").await;
}

/// 1,000 concurrent connections of 100 KB each from a client pod to a server pod: all
/// echoed intact, each seen by the app from the client's address, over at most ten
/// TLS connections (counted with `ss` in the server pod).
async fn thousand_connections(client_node: &str, server_node: &str) {
    ambit_localmesh::raise_nofile_limit().unwrap();
    let (h, client, server) = client_server(client_node, server_node);
    let echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&server).await;

    let to = server.addr(8080).to_string();
    let sender = h
        .mesh
        .spawn_in(
            client.netns(),
            support::app(),
            [
                "send",
                "--to",
                &to,
                "--bytes",
                "100000",
                "--connections",
                "1000",
            ],
            &[],
        )
        .unwrap();
    // Count while the connections are open, and after (the pool keeps them idle).
    let mut most = 0;
    let start = Instant::now();
    let status = loop {
        most = most.max(hbone_connections(&server));
        if let Some(status) = sender.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "send still running: {}\n{}",
            sender.log(),
            h.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    most = most.max(hbone_connections(&server));
    assert!(
        status.success(),
        "send failed ({status}): {}\n{}",
        sender.log(),
        h.logs()
    );
    assert!(
        sender
            .log()
            .contains("1000 of 1000 connections echoed 100000 bytes intact"),
        "{}",
        sender.log()
    );
    let accepted = echo
        .log()
        .lines()
        .filter(|l| l.contains(&format!("accepted from {}:", client.ip())))
        .count();
    assert_eq!(accepted, 1000, "the app saw another source");
    println!("1,000 tunnels used at most {most} TLS connections");
    assert!(
        (1..=10).contains(&most),
        "{most} TLS connections for 1,000 tunnels\n{}",
        h.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_with_the_wrong_identity_is_refused_and_the_source_logs_why() {
    let mesh = two_nodes();
    let client = pod(&mesh, "node-a", "shop", "client", "client");
    let server = pod(&mesh, "node-b", "shop", "server", "server");
    // A pod running as shop/impostor on the server's node, so that node's agent may
    // get that identity (node authorization).
    let _impostor = pod(&mesh, "node-b", "shop", "impostor", "impostor");
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    let h = Harness::start(mesh);
    let echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    // The model says the server runs as shop/server, but its ztunnel serves it as
    // shop/impostor: the certificate it presents on 15008 is not the expected one.
    h.enrol_as(&server, "impostor").await;

    let target = format!("{}:8080", server.ip());
    let sent = h.run_app(
        &client,
        &["send", "--to", &target, "--bytes", "1000"],
        DEADLINE,
    );
    assert!(
        !sent.status.success(),
        "traffic reached an impostor: {}\n{}",
        sent.log,
        h.logs()
    );
    let why = h
        .ztunnel("node-a")
        .wait_for_log("HBONE connection failed", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(
        why.contains("expected=spiffe://cluster.local/ns/shop/sa/server")
            && why.contains("spiffe://cluster.local/ns/shop/sa/impostor"),
        "the source ztunnel should name both identities: {why}"
    );
    assert!(
        !echo.log().contains("accepted from"),
        "the app must never see the connection:\n{}",
        echo.log()
    );
}

/// Connects to `to` from `from`'s namespace as fast as it can until `stop`, dropping
/// each connection once made: whenever a listener appears, a connection is already
/// queued in its backlog.
fn flood(
    from: &Pod,
    to: std::net::SocketAddr,
    mark: Option<u32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let ns = NetnsHandle::from_path(from.netns().path()).unwrap();
    tokio::spawn(async move {
        let opts = ConnectOpts {
            mark,
            timeout: Duration::from_secs(1),
            ..ConnectOpts::default()
        };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(made) = ns.connect(to, opts).await {
                // Reset, not closed: no TIME_WAIT, so the flood never runs out of ports.
                // (A zero linger never blocks the drop, which tokio's warning is about.)
                #[allow(deprecated)]
                let _ = made.set_linger(Some(Duration::ZERO));
            }
        }
    })
}

/// Issue 12 item 10: an accept loop that took a queued connection before the pod was
/// in ztunnel's map returned and dropped its listener. Handed over again 20 times under
/// a flood of SYNs, each of the pod's listeners still serves after every hand-off.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_queued_at_hand_off_never_costs_the_pod_a_listener() {
    let mesh = two_nodes();
    let outsider = mesh
        .add_pod("node-a", PodSpec::new("legacy", "outsider"))
        .unwrap();
    let server = pod(&mesh, "node-a", "shop", "server", "server");
    let client = pod(&mesh, "node-b", "shop", "client", "client");
    let h = Harness::start(mesh);
    let _server_echo = h.serve(&server, &["echo", "--port", "8080"]);
    let _outsider_echo = h.serve(&outsider, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&server).await;

    // SYNs keep arriving at each of the server pod's three listeners: 15008 (HBONE,
    // delivered directly), 15006 (plaintext to the app, TPROXY) and 15001 (the app's
    // own outbound, TPROXY). Before a listener exists they are refused.
    let socket = h.ambient.handoff_socket("node-a").unwrap().to_owned();
    let agent = ambit_net::handoff::HandoffClient::connect(&socket)
        .await
        .unwrap();
    let ns = std::fs::File::open(server.netns().path()).unwrap();
    for round in 0..20 {
        // Handed over again with connections queued: every listener must keep serving.
        // The floods run only across the hand-off, so the checks below run unloaded.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let floods = [
            flood(&outsider, server.addr(15008), None, stop.clone()),
            flood(&outsider, server.addr(8080), None, stop.clone()),
            flood(&server, outsider.addr(8080), None, stop.clone()),
        ];
        agent.remove(&server.uid()).await.unwrap();
        let info = ambit_proto::handoff::WorkloadInfo {
            name: server.name().to_string(),
            namespace: server.namespace().to_string(),
            service_account: server.service_account().to_string(),
        };
        agent
            .add(&server.uid(), info, std::os::fd::AsFd::as_fd(&ns))
            .await
            .unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for f in floods {
            f.await.unwrap();
        }
        let what = |path: &str| format!("round {round}: {path}");
        // 15008: over HBONE from the client pod on the other node.
        let mut hbone = captured_connection(&client, server.addr(8080)).await;
        round_trip(&mut hbone, what("hbone").as_bytes()).await;
        // 15006: plaintext from the outsider.
        let outsider_ns = NetnsHandle::from_path(outsider.netns().path()).unwrap();
        let mut plain = outsider_ns
            .connect(server.addr(8080), ConnectOpts::default())
            .await
            .unwrap();
        round_trip(&mut plain, what("plaintext").as_bytes()).await;
        // 15001: the server's app calling out.
        let mut out = captured_connection(&server, outsider.addr(8080)).await;
        round_trip(&mut out, what("outbound").as_bytes()).await;
    }
}
