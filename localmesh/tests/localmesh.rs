//! The local mesh end to end, in real network namespaces (needs root): pods made by the
//! real CNI chain reach each other on one node and across nodes with their own source
//! address, service VIPs spread connections over endpoints on every node, dropping a
//! mesh leaves nothing behind, the sweeper removes what dead runs left, and meshes
//! built at the same time do not collide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_core::identity::TrustDomain;
use ambit_core::model::{MeshState, Protocol};
use ambit_localmesh::{
    sweep_stale_with_prefix, LocalMesh, MeshError, Pod, PodSpec, Process, ServiceSpec,
};

const DEADLINE: Duration = Duration::from_secs(10);
const ECHO_PORT: &str = "7000";

fn app() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_localmesh-app"))
}

fn two_nodes() -> LocalMesh {
    LocalMesh::builder()
        .nodes(["node-a", "node-b"])
        .stop_grace(Duration::from_millis(500))
        .build()
        .unwrap()
}

fn echo_server(mesh: &LocalMesh, pod: &Pod) -> Process {
    let echo = mesh
        .spawn_in(pod.netns(), app(), ["echo", "--port", ECHO_PORT], &[])
        .unwrap();
    echo.wait_for_log("listening on", DEADLINE).unwrap();
    echo
}

fn http_server(mesh: &LocalMesh, pod: &Pod) -> Process {
    let http = mesh
        .spawn_in(
            pod.netns(),
            app(),
            ["http", "--port", "8080", "--name", pod.name()],
            &[],
        )
        .unwrap();
    http.wait_for_log("listening on", DEADLINE).unwrap();
    http
}

/// Sends `bytes` from `client` to `to` and asserts they all came back intact.
fn send(mesh: &LocalMesh, client: &Pod, to: &str, bytes: u64) {
    let done = mesh
        .run_in(
            client.netns(),
            app(),
            ["send", "--to", to, "--bytes", &bytes.to_string()],
            DEADLINE,
        )
        .unwrap();
    assert!(
        done.status.success(),
        "{} -> {to}: {:?}\n{}",
        client.uid(),
        done.status,
        done.log
    );
}

/// The pod names that answered `count` GETs from `client` to `to`, and the client
/// addresses they saw.
fn get(
    mesh: &LocalMesh,
    client: &Pod,
    to: &str,
    count: u32,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let done = mesh
        .run_in(
            client.netns(),
            app(),
            ["get", "--to", to, "--count", &count.to_string()],
            DEADLINE,
        )
        .unwrap();
    assert!(
        done.status.success(),
        "GET {to}: {:?}\n{}",
        done.status,
        done.log
    );
    let mut pods = BTreeSet::new();
    let mut clients = BTreeSet::new();
    for line in done.log.lines() {
        // "200 pod=NAME client=IP:PORT"
        for field in line.split_whitespace() {
            if let Some(pod) = field.strip_prefix("pod=") {
                pods.insert(pod.to_owned());
            }
            if let Some(client) = field.strip_prefix("client=") {
                clients.insert(client.rsplit_once(':').unwrap().0.to_owned());
            }
        }
    }
    (pods, clients)
}

fn netns_names() -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn root_links() -> BTreeSet<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Pids of processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            found.push(pid);
        }
    }
    found
}

/// A pid no process has: a child that has been reaped.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn pods_reach_each_other_on_one_node_and_across_nodes_from_their_own_ip() {
    let mesh = two_nodes();
    let a1 = mesh.add_pod("node-a", PodSpec::new("shop", "a1")).unwrap();
    let a2 = mesh.add_pod("node-a", PodSpec::new("shop", "a2")).unwrap();
    let b1 = mesh.add_pod("node-b", PodSpec::new("shop", "b1")).unwrap();
    let b2 = mesh.add_pod("node-b", PodSpec::new("shop", "b2")).unwrap();
    assert!(mesh.node("node-a").unwrap().pod_cidr().contains(a1.ip()));
    assert!(mesh.node("node-b").unwrap().pod_cidr().contains(b2.ip()));

    let echo_a2 = echo_server(&mesh, &a2);
    let echo_b1 = echo_server(&mesh, &b1);

    send(&mesh, &a1, &a2.addr(7000).to_string(), 1 << 20);
    echo_a2
        .wait_for_log(&format!("accepted from {}:", a1.ip()), DEADLINE)
        .unwrap();

    send(&mesh, &a1, &b1.addr(7000).to_string(), 1 << 20);
    echo_b1
        .wait_for_log(&format!("accepted from {}:", a1.ip()), DEADLINE)
        .unwrap();

    send(&mesh, &b2, &a2.addr(7000).to_string(), 1 << 20);
    echo_a2
        .wait_for_log(&format!("accepted from {}:", b2.ip()), DEADLINE)
        .unwrap();
}

#[test]
fn service_vip_spreads_connections_over_endpoints_on_both_nodes_and_follows_endpoint_changes() {
    let mesh = two_nodes();
    let web_a = mesh
        .add_pod("node-a", PodSpec::new("shop", "web-a"))
        .unwrap();
    let web_b = mesh
        .add_pod("node-b", PodSpec::new("shop", "web-b"))
        .unwrap();
    let client = mesh
        .add_pod("node-a", PodSpec::new("shop", "client"))
        .unwrap();
    let _servers = [http_server(&mesh, &web_a), http_server(&mesh, &web_b)];
    let web = mesh
        .add_service(
            ServiceSpec::new("shop", "web")
                .port(80, 8080)
                .endpoints([&web_a, &web_b]),
        )
        .unwrap();
    assert!(ambit_localmesh::SERVICE_CIDR.contains(web.vip()));
    let to = web.addr(80).to_string();

    let (answered, sources) = get(&mesh, &client, &to, 40);
    assert_eq!(answered, BTreeSet::from(["web-a".into(), "web-b".into()]));
    assert_eq!(sources, BTreeSet::from([client.ip().to_string()]));

    mesh.set_endpoints(&web, [&web_b]).unwrap();
    let (answered, _) = get(&mesh, &client, &to, 10);
    assert_eq!(answered, BTreeSet::from(["web-b".into()]));

    // Removing a pod takes it out of the service.
    mesh.set_endpoints(&web, [&web_a, &web_b]).unwrap();
    mesh.remove_pod(&web_b).unwrap();
    let (answered, _) = get(&mesh, &client, &to, 10);
    assert_eq!(answered, BTreeSet::from(["web-a".into()]));
}

#[test]
fn pod_reaches_itself_through_its_own_service() {
    let mesh = two_nodes();
    let web = mesh.add_pod("node-b", PodSpec::new("shop", "web")).unwrap();
    let _server = http_server(&mesh, &web);
    let svc = mesh
        .add_service(
            ServiceSpec::new("shop", "web")
                .port(80, 8080)
                .endpoints([&web]),
        )
        .unwrap();
    let (answered, _) = get(&mesh, &web, &svc.addr(80).to_string(), 3);
    assert_eq!(answered, BTreeSet::from(["web".into()]));
}

#[test]
fn dropping_the_mesh_leaves_no_namespace_interface_process_or_cni_state() {
    let links_before = root_links();
    let mesh = two_nodes();
    let prefix = format!("{}-", mesh.id());
    let dir = mesh.dir().to_owned();
    let a = mesh.add_pod("node-a", PodSpec::new("shop", "a")).unwrap();
    let b = mesh.add_pod("node-b", PodSpec::new("shop", "b")).unwrap();
    mesh.add_service(ServiceSpec::new("shop", "b").port(80, 8080).endpoints([&b]))
        .unwrap();
    let marker = format!("marker-{}", mesh.id());
    let server = mesh
        .spawn_in(
            b.netns(),
            app(),
            ["http", "--port", "8080", "--name", &marker],
            &[],
        )
        .unwrap();
    server.wait_for_log("listening on", DEADLINE).unwrap();
    assert_eq!(processes_with(&marker).len(), 1);
    assert_eq!(
        netns_names()
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .count(),
        5,
        "fabric, two nodes, two pods"
    );
    assert!(dir
        .join("cni/node-a/ipam/ambit-pods")
        .join(a.ip().to_string())
        .exists());

    // The process handle outlives the mesh: the mesh stops it all the same.
    drop(mesh);

    let left: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(server.try_wait().unwrap().is_some(), "server still running");
    assert_eq!(processes_with(&marker), Vec::<u32>::new());
    assert!(!dir.exists(), "{} left", dir.display());
    // Other programs may add links to the host meanwhile; none may be of the kinds a
    // mesh makes (ptp's host veths, node uplinks, the bridge).
    let added: Vec<String> = root_links()
        .difference(&links_before)
        .filter(|l| l.starts_with("veth") || l.starts_with('n') || l.starts_with("br"))
        .cloned()
        .collect();
    assert!(added.is_empty(), "host interfaces added: {added:?}");
}

#[test]
fn sweeper_removes_namespaces_processes_and_state_of_dead_owners_only() {
    let root = std::env::temp_dir().join(format!("ambit-localmesh-sweep-{}", std::process::id()));
    fs::create_dir_all(&root).unwrap();
    // Names with the mesh prefix `am` would be swept by any mesh that another test
    // builds meanwhile, even while `ip netns add` is still making them; this prefix is
    // ours alone.
    const P: &str = "amsweeptest";
    let dead = dead_pid();
    let stale_ns = format!("{P}{dead}x0-n-node-a");
    // A name of our own pid that no mesh of ours holds: a dead run whose pid we reuse.
    let reused_ns = format!("{P}{}x{}-fabric", std::process::id(), u32::MAX);
    // pid 1 lives as long as the machine.
    let live_ns = format!("{P}1x{dead}-n-node-a");
    let _made = [&stale_ns, &reused_ns, &live_ns].map(|ns| TestNetns::add(ns));
    let stale_dir = root.join(format!("{P}{dead}x0"));
    fs::create_dir_all(stale_dir.join("cni/node-a/ipam")).unwrap();
    let live_dir = root.join(format!("{P}1x{dead}"));
    fs::create_dir_all(&live_dir).unwrap();
    // A process left in a stale namespace (its parent death signal never came).
    // nsenter enters before it runs the shell, so the line means it is in there.
    let mut orphan = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{stale_ns}"),
            "sh",
            "-c",
            "echo entered; exec sleep 60",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut entered = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(orphan.stdout.take().unwrap()),
        &mut entered,
    )
    .unwrap();
    assert_eq!(entered, "entered\n");

    let report = sweep_stale_with_prefix(&root, P).unwrap();

    let names = netns_names();
    assert!(!names.contains(&stale_ns), "{report:?}");
    assert!(!names.contains(&reused_ns), "{report:?}");
    assert!(names.contains(&live_ns), "{report:?}");
    assert!(!stale_dir.exists(), "{report:?}");
    assert!(live_dir.exists(), "{report:?}");
    let status = orphan.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");

    fs::remove_dir_all(&root).unwrap();
}

/// A namespace a test makes by hand, deleted when dropped (if still there).
struct TestNetns(String);

impl TestNetns {
    fn add(name: &str) -> TestNetns {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestNetns(name.to_owned())
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if Path::new("/run/netns").join(&self.0).exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
}

#[test]
fn meshes_built_at_the_same_time_in_one_process_do_not_collide() {
    let results: Vec<(String, Pod)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mesh = two_nodes();
                    let client = mesh
                        .add_pod("node-a", PodSpec::new("shop", "client"))
                        .unwrap();
                    let server = mesh
                        .add_pod("node-b", PodSpec::new("shop", "server"))
                        .unwrap();
                    let _echo = echo_server(&mesh, &server);
                    send(&mesh, &client, &server.addr(7000).to_string(), 64 * 1024);
                    (mesh.id().to_string(), server)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_ne!(results[0].0, results[1].0);
    // Same address plan, separate namespaces.
    assert_eq!(results[0].1.ip(), results[1].1.ip());
    assert_ne!(results[0].1.netns(), results[1].1.netns());
}

#[test]
fn chained_plugin_runs_after_ptp_with_its_result_and_a_failing_chain_leaves_no_pod() {
    let mesh = LocalMesh::builder()
        .nodes(["node-a"])
        .chain_plugin(serde_json::json!({"type": "tuning", "mtu": 1400}))
        .build()
        .unwrap();
    let pod = mesh
        .add_pod("node-a", PodSpec::new("shop", "tuned"))
        .unwrap();
    let link = Command::new("ip")
        .args(["-n", pod.netns().name(), "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("mtu 1400"),
        "{link:?}"
    );
    mesh.remove_pod(&pod).unwrap();
    assert!(!pod.netns().path().exists());
    drop(mesh);

    let mesh = LocalMesh::builder()
        .nodes(["node-a"])
        .chain_plugin(serde_json::json!({"type": "no-such-plugin"}))
        .build()
        .unwrap();
    let err = mesh
        .add_pod("node-a", PodSpec::new("shop", "broken"))
        .unwrap_err();
    assert!(matches!(err, MeshError::Cni { .. }), "{err}");
    assert!(err.to_string().contains("no-such-plugin"), "{err}");
    let prefix = format!("{}-p", mesh.id());
    assert!(!netns_names().iter().any(|n| n.starts_with(&prefix)));
    let ipam = mesh.dir().join("cni/node-a/ipam/ambit-pods");
    let reserved: Vec<_> = fs::read_dir(&ipam)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        reserved
            .iter()
            .all(|n| !n.to_string_lossy().starts_with("10.")),
        "addresses still reserved: {reserved:?}"
    );
}

#[test]
fn model_export_describes_pods_and_services_in_ambits_model_format() {
    let mesh = two_nodes();
    let a = mesh
        .add_pod(
            "node-a",
            PodSpec::new("shop", "cart").service_account("cart"),
        )
        .unwrap();
    let b = mesh.add_pod("node-b", PodSpec::new("shop", "web")).unwrap();
    let svc = mesh
        .add_service(
            ServiceSpec::new("shop", "web")
                .port(80, 8080)
                .endpoints([&b]),
        )
        .unwrap();
    mesh.set_protocol(&a, Protocol::Hbone).unwrap();

    let config = mesh.model();
    let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
    let cart = state.workload_by_ip(a.ip().into()).unwrap();
    assert_eq!(cart.uid(), "shop/cart");
    assert_eq!(cart.spec.node, "node-a");
    assert_eq!(cart.spec.service_account, "cart");
    assert!(cart.is_hbone());
    let web = state.workload("shop/web").unwrap();
    assert_eq!(web.spec.service_account, "default");
    assert!(!web.is_hbone());
    let service = state.service_by_vip(svc.vip().into()).unwrap();
    assert_eq!(service.spec.endpoints[0].workload_uid, "shop/web");
    assert_eq!(service.spec.ports[0].target_port, 8080);

    let path = mesh.write_model().unwrap();
    let reread: ambit_core::model::MeshConfig =
        serde_yaml_ng::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(reread, config);
    assert!(path.starts_with(mesh.dir()));
}

fn one_node() -> LocalMesh {
    LocalMesh::builder()
        .nodes(["node-a"])
        .stop_grace(Duration::from_millis(200))
        .build()
        .unwrap()
}

#[test]
fn waiting_for_a_log_line_fails_at_once_when_the_process_exits_first() {
    let mesh = one_node();
    let node = mesh.node("node-a").unwrap();
    let quitter = mesh
        .spawn_in(node.netns(), "sh", ["-c", "echo hello; exit 3"], &[])
        .unwrap();
    let err = quitter.wait_for_log("never printed", DEADLINE).unwrap_err();
    match err {
        ambit_localmesh::ProcessError::ExitedBeforeLog { status, log, .. } => {
            assert_eq!(status.code(), Some(3));
            assert_eq!(log, "hello\n");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn stopping_a_process_that_ignores_sigterm_kills_it_after_the_grace_period() {
    let mesh = one_node();
    let node = mesh.node("node-a").unwrap();
    // An ignored signal stays ignored across exec.
    let stubborn = mesh
        .spawn_in(
            node.netns(),
            "sh",
            ["-c", "trap '' TERM; echo ready; exec sleep 60"],
            &[("GREETING", "unused")],
        )
        .unwrap();
    stubborn.wait_for_log("ready", DEADLINE).unwrap();
    let start = Instant::now();
    let status = stubborn.stop().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(start.elapsed() >= Duration::from_millis(200));
}
