//! The CNI plugin and the node agent in a local mesh (needs root), invoked as a
//! container runtime invokes them: every node's chain is Debian's `ptp` + `host-local`
//! followed by `ambit-cni`, which the real node agent (`ambit-cni agent`) put there;
//! pods are made with ADD and removed with DEL.
//!
//! - a pod created in an ambient namespace is captured before its first packet;
//! - labelling a namespace enrols its running pods, removing the label returns them
//!   to plaintext, without restarting them;
//! - ztunnel killed: enrolled pods' connections are refused, never plaintext; ztunnel
//!   back: the agent hands the pods over again and traffic resumes;
//! - a kubelet probe (from the node) reaches an enrolled pod's app directly;
//! - the agent's restart keeps the enrolled pods as they are;
//! - the control plane's restart, with a node agent down meanwhile, never makes an
//!   enrolled pod plaintext: no marker crosses the fabric unencrypted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ambit_core::model::Protocol;
use ambit_localmesh::{LocalMesh, Pod, PodSpec};
use support::{metric, two_nodes, Harness, DEADLINE};

/// Connections `node`'s ztunnel took in over mutual TLS from `source`'s identity.
async fn mtls_from(h: &Harness, node: &str, source: &Pod) -> f64 {
    let principal = format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        source.namespace(),
        source.service_account()
    );
    metric(
        &h.metrics(node).await,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", principal.as_str()),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

fn ambient_namespace(h: &Harness, namespace: &str, ambient: bool) {
    let labels: BTreeMap<String, String> = if ambient {
        [("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())].into()
    } else {
        BTreeMap::new()
    };
    h.mesh.set_namespace_labels(namespace, labels);
    h.mesh.write_kubernetes().unwrap();
}

async fn wait_for(h: &Harness, pod: &Pod, protocol: Protocol) -> Duration {
    h.ambient
        .wait_for_protocol(&h.mesh, pod, protocol)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn is_chained(mesh: &LocalMesh, node: &str) -> bool {
    let node = mesh.node(node).unwrap();
    mesh.conflist(node)
        .unwrap()
        .plugins
        .iter()
        .any(|p| p["type"] == "ambit-cni")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_created_in_an_ambient_namespace_speaks_hbone_from_its_first_connection() {
    let mesh = two_nodes();
    // Made before the agents run: the chain is ptp alone, and web is not captured.
    let web = support::pod(&mesh, "node-b", "shop", "web", "web");
    assert!(!is_chained(&mesh, "node-b"));
    let h = Harness::start_with_agents(mesh);
    assert!(is_chained(&h.mesh, "node-a") && is_chained(&h.mesh, "node-b"));
    let _echo = h.serve(&web, &["echo", "--port", "8080"]);

    // The namespace labelled: the running pod is enrolled without a restart.
    let started = Instant::now();
    ambient_namespace(&h, "shop", true);
    let took = wait_for(&h, &web, Protocol::Hbone).await;
    eprintln!("running pod enrolled after a namespace label in {took:?}");
    assert!(started.elapsed() < DEADLINE);

    // A pod made now goes through ambit-cni: its ADD returns once it is captured and
    // served, so its very first connection is mutual TLS.
    let client = support::pod(&h.mesh, "node-a", "shop", "client", "client");
    assert_eq!(mtls_from(&h, "node-b", &client).await, 0.0);
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert_eq!(
        mtls_from(&h, "node-b", &client).await,
        1.0,
        "the first connection was not over HBONE\n{}",
        h.logs()
    );
    let agent = h.ambient.node_agent("node-a").unwrap().log();
    assert!(agent.contains("pod enrolled"), "{agent}");

    // A pod of a namespace that is not ambient passes through the plugin untouched.
    let plain = h
        .mesh
        .add_pod(
            "node-a",
            PodSpec::new("legacy", "plain").service_account("plain"),
        )
        .unwrap();
    h.send_ok(&plain, web.addr(8080), 1000, 1);
    assert_eq!(mtls_from(&h, "node-b", &plain).await, 0.0);
    let agent = h.ambient.node_agent("node-a").unwrap().log();
    assert!(
        agent.contains("not enrolled: its labels do not ask for it pod=legacy/plain"),
        "{agent}"
    );
    // The runtime's CHECK goes through the whole chain, ambit-cni included.
    h.mesh.check_pod(&client).unwrap();
    h.mesh.check_pod(&plain).unwrap();

    // Deleted: unenrolled, by the CNI DEL or by the model the pod left first (as a
    // deleted pod leaves the API before its sandbox goes), whichever comes first.
    h.mesh.remove_pod(&client).unwrap();
    h.ambient
        .node_agent("node-a")
        .unwrap()
        .wait_for_log("pod unenrolled pod=shop/client", DEADLINE)
        .unwrap();
}

/// The last round `stream` reported.
fn rounds(stream: &ambit_localmesh::Process) -> u64 {
    stream
        .log()
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("round "))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `stream` has completed `more` rounds after `after`, or panics with its
/// log (a mismatch or an ended connection shows there).
fn streams_on(h: &Harness, stream: &ambit_localmesh::Process, after: u64, more: u64, what: &str) {
    let pattern = format!("round {}", after + more);
    if let Err(e) = stream.wait_for_log(&pattern, DEADLINE) {
        panic!(
            "{what}: the open connection stopped: {e}\n{}\n{}",
            stream.log(),
            h.logs()
        );
    }
}

/// Every connection `node`'s ztunnel took in, HBONE or plaintext.
async fn inbound_at(h: &Harness, node: &str) -> f64 {
    metric(
        &h.metrics(node).await,
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination")],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_move_running_pods_in_and_out_without_breaking_open_connections() {
    let mesh = two_nodes();
    let web = support::pod(&mesh, "node-b", "shop", "web", "web");
    let client = support::pod(&mesh, "node-a", "shop", "client", "client");
    let outsider = support::pod(&mesh, "node-a", "legacy", "outsider", "outsider");
    let h = Harness::start_with_agents(mesh);
    let _echo = h.serve(&web, &["echo", "--port", "8080"]);
    let to = web.addr(8080).to_string();

    // A connection opened in plaintext, kept busy through both changes.
    let stream = h
        .mesh
        .spawn_in(client.netns(), support::app(), ["stream", "--to", &to], &[])
        .unwrap();
    streams_on(&h, &stream, 0, 5, "before any change");

    // Labelled: both running pods are enrolled, no restart; new connections are mTLS.
    ambient_namespace(&h, "shop", true);
    let took = wait_for(&h, &web, Protocol::Hbone).await;
    wait_for(&h, &client, Protocol::Hbone).await;
    eprintln!("namespace labelled: enrolled in {took:?}");
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert_eq!(mtls_from(&h, "node-b", &client).await, 1.0, "{}", h.logs());
    let at = rounds(&stream);
    streams_on(&h, &stream, at, 5, "after enrolment");
    // A connection opened while enrolled: through both ztunnels, over HBONE.
    let captured = h
        .mesh
        .spawn_in(client.netns(), support::app(), ["stream", "--to", &to], &[])
        .unwrap();
    streams_on(&h, &captured, 0, 5, "captured connection");

    // A kubelet probe comes from the node: it reaches the app directly, while the same
    // connection from another pod is captured by the pod's ztunnel.
    let inbound = inbound_at(&h, "node-b").await;
    let node_b = h.mesh.node("node-b").unwrap();
    let probe = h
        .mesh
        .run_in(
            node_b.netns(),
            support::app(),
            ["send", "--to", &to, "--bytes", "100"],
            DEADLINE,
        )
        .unwrap();
    assert!(
        probe.status.success(),
        "probe failed: {}\n{}",
        probe.log,
        h.logs()
    );
    assert_eq!(
        inbound_at(&h, "node-b").await,
        inbound,
        "the probe was captured"
    );
    h.send_ok(&outsider, web.addr(8080), 100, 1);
    assert_eq!(
        inbound_at(&h, "node-b").await,
        inbound + 1.0,
        "a pod's plaintext connection was not captured\n{}",
        h.logs()
    );

    // Label removed: back to plaintext, still no restart.
    ambient_namespace(&h, "shop", false);
    let took = wait_for(&h, &web, Protocol::Tcp).await;
    wait_for(&h, &client, Protocol::Tcp).await;
    eprintln!("label removed: unenrolled in {took:?}");
    let mtls = mtls_from(&h, "node-b", &client).await;
    let inbound = inbound_at(&h, "node-b").await;
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert_eq!(mtls_from(&h, "node-b", &client).await, mtls);
    assert_eq!(inbound_at(&h, "node-b").await, inbound, "still captured");
    let at = rounds(&stream);
    streams_on(&h, &stream, at, 5, "after unenrolment");
    // The captured one is never corrupted: its packets no longer reach the ztunnels
    // that held it, so it is reset (decision 0005), or it goes on.
    let at = rounds(&captured);
    match captured.wait_for_log(&format!("round {}", at + 5), DEADLINE) {
        Ok(_) => eprintln!("the connection captured before unenrolment goes on"),
        Err(e) => {
            let log = captured.log();
            assert!(!log.contains("mismatch"), "corrupted: {log}");
            assert!(log.contains("ended:"), "{e}: {log}");
            eprintln!(
                "the connection captured before unenrolment: {}",
                log.lines().last().unwrap_or_default()
            );
        }
    }
    let agent = h.ambient.node_agent("node-b").unwrap().log();
    assert!(agent.contains("labels no longer ask for it"), "{agent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ztunnel_or_agent_restarts_keep_enrolled_pods_enrolled_and_never_leak_plaintext() {
    let mesh = two_nodes();
    let web = support::pod(&mesh, "node-b", "shop", "web", "web");
    let client = support::pod(&mesh, "node-a", "shop", "client", "client");
    let mut h = Harness::start_with_agents(mesh);
    let echo = h.serve(&web, &["echo", "--port", "8080"]);
    ambient_namespace(&h, "shop", true);
    wait_for(&h, &web, Protocol::Hbone).await;
    wait_for(&h, &client, Protocol::Hbone).await;
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert_eq!(mtls_from(&h, "node-b", &client).await, 1.0);

    // The client's ztunnel killed: its connections are refused, and the app never
    // sees one (no plaintext leak).
    let ztunnel = h.ztunnel("node-a");
    ztunnel.signal(ambit_localmesh::Signal::SIGKILL);
    ztunnel.wait(DEADLINE).unwrap();
    let accepted = echo.log().matches("accepted from").count();
    support::assert_refused(&h, &client, web.addr(8080));
    assert_eq!(echo.log().matches("accepted from").count(), accepted);

    // Back: the agent hands the pod over again (its snapshot), traffic resumes, mTLS.
    let started = Instant::now();
    h.ambient.restart_ztunnel(&h.mesh, "node-a").unwrap();
    let agent = h.ambient.node_agent("node-a").unwrap();
    agent
        .wait_for_log("pods handed over pods=1 refused=0", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    eprintln!(
        "ztunnel restarted and given its pod back in {:?}",
        started.elapsed()
    );
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert_eq!(mtls_from(&h, "node-b", &client).await, 2.0, "{}", h.logs());

    // The server's node agent restarted: nothing changes for the pod (its rules stay,
    // ztunnel keeps serving it), and the new agent finds it again from the model.
    let agent = h.ambient.node_agent("node-b").unwrap();
    agent.stop().unwrap();
    h.send_ok(&client, web.addr(8080), 1000, 1);
    h.ambient.restart_node_agent(&h.mesh, "node-b").unwrap();
    let agent = h.ambient.node_agent("node-b").unwrap();
    assert!(
        agent
            .log()
            .contains("pods of this node enrolled from the model enrolled=1"),
        "{}",
        agent.log()
    );
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert_eq!(mtls_from(&h, "node-b", &client).await, 4.0, "{}", h.logs());
    assert!(
        !h.ztunnel("node-b").log().contains("no longer serving pod"),
        "{}",
        h.logs()
    );
}

/// GETs `/<marker>` from `web`'s HTTP app (which answers with the marker) three times.
fn get_marker(h: &Harness, client: &Pod, web: &Pod, marker: &str, when: &str) {
    let to = web.addr(8080).to_string();
    let path = format!("/{marker}");
    let out = h.run_app(
        client,
        &["get", "--to", &to, "--path", &path, "--count", "3"],
        DEADLINE,
    );
    assert!(
        out.status.success() && out.log.contains(marker),
        "{when}: GET {to} failed: {}\n{}",
        out.log,
        h.logs()
    );
}

/// `node`'s ztunnel holds `uid` in its model; returns its protocol there.
async fn protocol_at(h: &Harness, node: &str, uid: &str) -> Option<Protocol> {
    let dump = h.config_dump(node).await;
    let body = dump
        .split_once("\r\n\r\n")
        .map_or(dump.as_str(), |(_, b)| b);
    let model: ambit_core::model::MeshConfig = serde_json::from_value(
        serde_json::from_str::<serde_json::Value>(body).ok()?["model"].clone(),
    )
    .ok()?;
    model
        .workloads
        .into_iter()
        .find(|w| w.uid == uid)
        .map(|w| w.protocol)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_restart_with_a_node_agent_down_never_sends_enrolled_pods_plaintext() {
    let mesh = two_nodes();
    let web = support::pod(&mesh, "node-b", "shop", "web", "web");
    let client = support::pod(&mesh, "node-a", "shop", "client", "client");
    let mut h = Harness::start_with_agents(mesh);
    let secret = "AMBITRESTARTMARKER5e1d";
    let _http = h.serve(&web, &["http", "--port", "8080", "--name", secret]);
    ambient_namespace(&h, "shop", true);
    wait_for(&h, &web, Protocol::Hbone).await;
    wait_for(&h, &client, Protocol::Hbone).await;
    let dump = support::capture(&h);
    get_marker(&h, &client, &web, secret, "before the restart");

    // The control plane stops, and so does web's node agent, which therefore cannot
    // report web again when the control plane is back.
    let stopped = h.control().stop().unwrap();
    assert!(stopped.success(), "ambit-control exited {stopped:?}");
    h.ambient.node_agent("node-b").unwrap().stop().unwrap();
    get_marker(&h, &client, &web, secret, "while the control plane is down");

    // Back: its first model already has both pods captured. A pod declared only now
    // shows that each ztunnel holds the restarted control plane's model.
    h.restart_control();
    std::fs::write(
        h.k8s_dir().join("after-restart.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: after-restart, namespace: legacy}\n\
         spec: {nodeName: node-a, containers: [{name: app, image: app}]}\n\
         status: {podIP: 10.1.0.200}\n",
    )
    .unwrap();
    for node in ["node-a", "node-b"] {
        support::eventually(
            DEADLINE,
            || async { protocol_at(&h, node, "legacy/after-restart").await },
            || {
                format!(
                    "{node}'s ztunnel never got the restarted control plane's model\n{}",
                    h.logs()
                )
            },
        )
        .await;
        for pod in ["shop/web", "shop/client"] {
            assert_eq!(
                protocol_at(&h, node, pod).await,
                Some(Protocol::Hbone),
                "{node}'s ztunnel: {pod} after the control plane's restart\n{}",
                h.logs()
            );
        }
    }
    get_marker(
        &h,
        &client,
        &web,
        secret,
        "after the restart, web's agent down",
    );

    // Web's agent back: it finds its pod enrolled and captured, nothing changes.
    h.ambient.restart_node_agent(&h.mesh, "node-b").unwrap();
    wait_for(&h, &web, Protocol::Hbone).await;
    get_marker(&h, &client, &web, secret, "after the agent's restart");

    let hbone_port = format!("{}.15008", web.addr(0).ip());
    dump.wait_for_log(&hbone_port, DEADLINE)
        .unwrap_or_else(|e| panic!("no HBONE traffic captured: {e}\n{}", h.logs()));
    dump.stop().unwrap();
    let captured = dump.log();
    assert!(
        !captured.contains(secret),
        "the marker crossed the fabric in plaintext:\n{captured}"
    );
    assert_eq!(
        mtls_from(&h, "node-b", &client).await,
        12.0,
        "every GET (3 per step, 4 steps) over mutual TLS\n{}",
        h.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_keeps_its_conflist_entry_and_uninstall_restores_the_file() {
    let mesh = LocalMesh::builder().nodes(["node-a"]).build().unwrap();
    let node = mesh.node("node-a").unwrap();
    let conf_dir = mesh.cni_conf_dir(node);
    let bin_dir = mesh.cni_bin_dir(node);
    let file = conf_dir.join("10-ambit-pods.conflist");
    let original = std::fs::read_to_string(&file).unwrap();
    let mut h = Harness::start_with_agents(mesh);
    let installed = std::fs::read_to_string(&file).unwrap();
    assert_ne!(installed, original);
    assert!(bin_dir.join("ambit-cni").is_file());

    // Idempotent: a restarted agent leaves the file as it was.
    h.ambient.node_agent("node-a").unwrap().stop().unwrap();
    h.ambient.restart_node_agent(&h.mesh, "node-a").unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), installed);

    // The network plugin rewrites its file: the agent puts itself back.
    std::fs::write(&file, &original).unwrap();
    h.ambient
        .node_agent("node-a")
        .unwrap()
        .wait_for_log("was missing from the node's CNI chain", DEADLINE)
        .unwrap();
    // The log line may come before the rewrite lands: poll for the file.
    let since = std::time::Instant::now();
    while std::fs::read_to_string(&file).unwrap() != installed {
        assert!(
            since.elapsed() < DEADLINE,
            "the agent did not put itself back: {}",
            std::fs::read_to_string(&file).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // Uninstalled (agent gone): the file is as the network plugin wrote it, the binary
    // is gone, and a pod of an ambient namespace made now is not captured.
    h.ambient.node_agent("node-a").unwrap().stop().unwrap();
    let out = std::process::Command::new(support::bin("ambit-cni"))
        .arg("uninstall")
        .arg("--conf-dir")
        .arg(&conf_dir)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let restored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(
        restored,
        serde_json::from_str::<serde_json::Value>(&original).unwrap()
    );
    assert!(!bin_dir.join("ambit-cni").exists());
    ambient_namespace(&h, "shop", true);
    let late = support::pod(&h.mesh, "node-a", "shop", "late", "late");
    assert!(!is_chained(&h.mesh, "node-a"));
    assert!(h.mesh.check_pod(&late).is_ok());
}

/// Whether a connection from `pod` to `to` echoes intact.
fn connects(h: &Harness, pod: &Pod, to: std::net::SocketAddr) -> bool {
    let to = to.to_string();
    h.run_app(pod, &["send", "--to", &to, "--bytes", "100"], DEADLINE)
        .status
        .success()
}

/// Runs `iptables args` in `node`'s namespace.
fn node_iptables(h: &Harness, node: &str, args: &[&str]) {
    let node = h.mesh.node(node).unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.netns().path().display()))
        .arg("iptables")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables {args:?}: {out:?}");
}

const BOOKSHOP_LOCKED: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bookshop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: bookshop}
spec:
  action: DENY
  rules: [{}]
";

/// Issue 12 item 1: every address of the node used to be exempt from capture, so a
/// NodePort-style DNAT with MASQUERADE on the pod's node (kube-proxy, for
/// `externalTrafficPolicy: Cluster`) reached a STRICT, DENY-all pod in plaintext. Now
/// only the node's own connections, SNATed to 169.254.7.127, are exempt: the
/// forwarded connection is captured and refused, a probe from the node still passes.
#[tokio::test(flavor = "multi_thread")]
async fn traffic_the_node_forwards_to_an_enrolled_pod_is_captured_while_its_probes_pass() {
    let mesh = two_nodes();
    let outsider = support::pod(&mesh, "node-a", "legacy", "outsider", "outsider");
    let h = Harness::start_with_agents(mesh);
    ambient_namespace(&h, "bookshop", true);
    // Made through the chain: enrolled at ADD.
    let catalog = support::pod(&h.mesh, "node-b", "bookshop", "catalog", "catalog");
    wait_for(&h, &catalog, Protocol::Hbone).await;
    let echo = h.serve(&catalog, &["echo", "--port", "8080"]);
    let to = catalog.addr(8080);
    let node_b = h.mesh.node("node-b").unwrap().ip();

    std::fs::write(h.k8s_dir().join("bookshop-locked.yaml"), BOOKSHOP_LOCKED).unwrap();
    // Enforced: the outsider's direct plaintext connection is captured and refused.
    support::eventually(
        DEADLINE,
        || async { (!connects(&h, &outsider, to)).then_some(()) },
        || format!("STRICT/DENY-all not enforced\n{}", h.logs()),
    )
    .await;

    // NodePort 30080 on node-b, forwarded to catalog with the node's address as source.
    let dest = to.to_string();
    node_iptables(
        &h,
        "node-b",
        &[
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "1",
            "-d",
            &node_b.to_string(),
            "-p",
            "tcp",
            "--dport",
            "30080",
            "-j",
            "DNAT",
            "--to-destination",
            &dest,
        ],
    );
    node_iptables(
        &h,
        "node-b",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            &catalog.ip().to_string(),
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
            "-j",
            "MASQUERADE",
        ],
    );
    let node_port = std::net::SocketAddr::from((node_b, 30080));
    let accepted = || echo.log().matches("accepted from").count();
    let before = accepted();
    assert!(
        !connects(&h, &outsider, node_port),
        "the NodePort reached the app in plaintext: {}\n{}",
        echo.log(),
        h.logs()
    );
    assert_eq!(accepted(), before, "{}", echo.log());

    // A probe (the node's own connection) still reaches the app, from the SNAT address.
    let node = h.mesh.node("node-b").unwrap();
    let probe = h
        .mesh
        .run_in(
            node.netns(),
            support::app(),
            ["send", "--to", &dest, "--bytes", "100"],
            DEADLINE,
        )
        .unwrap();
    assert!(
        probe.status.success(),
        "probe failed: {}\n{}",
        probe.log,
        h.logs()
    );
    echo.wait_for_log("accepted from 169.254.7.127:", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
}
