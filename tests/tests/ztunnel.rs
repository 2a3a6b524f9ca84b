//! ztunnel end to end: the real `ambit-ca` and `ztunnel` binaries in a local mesh of
//! network namespaces, pods created through the CNI chain, the shared redirect rules
//! installed in each enrolled pod, and pods handed to ztunnel over the hand-off socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use ambit_localmesh::{target_binary, LocalMesh, Pod, PodSpec, Process, Protocol};
use ambit_net::handoff::HandoffClient;
use ambit_net::redirect::{self, RedirectConfig};
use ambit_proto::handoff::WorkloadInfo;

const DEADLINE: Duration = Duration::from_secs(30);

/// A mesh with a CA and one ztunnel per node, ready to enrol pods.
struct Harness {
    mesh: LocalMesh,
    _ca: Process,
    ztunnels: Vec<(String, Process, PathBuf)>,
}

fn bin(name: &str) -> PathBuf {
    target_binary(name)
        .unwrap_or_else(|e| panic!("{e}: build the binaries first (cargo build --bins)"))
}

impl Harness {
    /// Builds the mesh, writes the model (with `hbone` pods marked HBONE), starts the
    /// CA in the fabric namespace and a ztunnel in every node.
    fn start(mesh: LocalMesh) -> Harness {
        let dir = mesh.dir().to_path_buf();
        let ca_dir = dir.join("ca");
        let mut tokens = String::new();
        for node in mesh.nodes() {
            let token = format!("node-agent-token-for-{}", node.name());
            std::fs::write(dir.join(format!("{}.token", node.name())), &token).unwrap();
            tokens.push_str(&format!(
                "- token: \"{token}\"\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  nodeAgent: true\n  node: {}\n",
                node.name()
            ));
        }
        std::fs::write(dir.join("tokens.yaml"), tokens).unwrap();
        let ca_addr = format!("{}:15012", mesh.fabric_ip());
        let ca = mesh
            .spawn_in(
                mesh.fabric(),
                bin("ambit-ca"),
                [
                    "--root-dir",
                    ca_dir.to_str().unwrap(),
                    "--listen",
                    &ca_addr,
                    "--tokens",
                    dir.join("tokens.yaml").to_str().unwrap(),
                ],
                &[],
            )
            .unwrap();
        ca.wait_for_log("CA serving", DEADLINE).unwrap();
        let model = mesh.write_model().unwrap();
        let mut ztunnels = Vec::new();
        for node in mesh.nodes() {
            let socket = dir.join(format!("{}.sock", node.name()));
            let z = mesh
                .spawn_in(
                    node.netns(),
                    bin("ztunnel"),
                    [
                        "--node",
                        node.name(),
                        "--model-file",
                        model.to_str().unwrap(),
                        "--model-poll",
                        "100ms",
                        "--ca-address",
                        &ca_addr,
                        "--ca-root",
                        ca_dir.join("root-cert.pem").to_str().unwrap(),
                        "--ca-token-file",
                        dir.join(format!("{}.token", node.name())).to_str().unwrap(),
                        "--handoff-socket",
                        socket.to_str().unwrap(),
                        "--log",
                        "info,ambit_ztunnel=debug",
                    ],
                    &[],
                )
                .unwrap();
            z.wait_for_log("ztunnel ready", DEADLINE).unwrap();
            ztunnels.push((node.name().to_string(), z, socket));
        }
        Harness {
            mesh,
            _ca: ca,
            ztunnels,
        }
    }

    fn ztunnel(&self, node: &str) -> &Process {
        &self.ztunnels.iter().find(|(n, _, _)| n == node).unwrap().1
    }

    /// Installs the redirect rules in `pod` and hands it to its node's ztunnel, as the
    /// node agent will.
    async fn enrol(&self, pod: &Pod) {
        let node = self.mesh.node(pod.node()).unwrap();
        let gateway = IpAddr::V4(node.pod_cidr().host(1));
        redirect::install(
            pod.netns().path(),
            &RedirectConfig {
                probe_sources: vec![gateway],
                ..RedirectConfig::default()
            },
        )
        .unwrap();
        let socket = &self
            .ztunnels
            .iter()
            .find(|(n, _, _)| n == pod.node())
            .unwrap()
            .2;
        let client = HandoffClient::connect(socket).await.unwrap();
        let ns = std::fs::File::open(pod.netns().path()).unwrap();
        let info = WorkloadInfo {
            name: pod.name().to_string(),
            namespace: pod.namespace().to_string(),
            service_account: pod.service_account().to_string(),
        };
        client.add(&pod.uid(), info, ns.as_fd()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_to_pod_across_nodes_goes_over_hbone_and_the_app_sees_the_client_ip() {
    let mesh = LocalMesh::builder()
        .nodes(["node-a", "node-b"])
        .build()
        .unwrap();
    let client = mesh
        .add_pod(
            "node-a",
            PodSpec::new("shop", "client").service_account("client"),
        )
        .unwrap();
    let server = mesh
        .add_pod(
            "node-b",
            PodSpec::new("shop", "server").service_account("server"),
        )
        .unwrap();
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    let h = Harness::start(mesh);
    let app = bin("localmesh-app");
    let echo = h
        .mesh
        .spawn_in(server.netns(), &app, ["echo", "--port", "8080"], &[])
        .unwrap();
    echo.wait_for_log("listening", DEADLINE).unwrap();
    h.enrol(&client).await;
    h.enrol(&server).await;

    let target = format!("{}:8080", server.ip());
    let sent = h
        .mesh
        .run_in(
            client.netns(),
            &app,
            ["send", "--to", target.as_str(), "--bytes", "1000000"],
            DEADLINE,
        )
        .unwrap();
    assert!(
        sent.status.success(),
        "transfer failed: {}\nclient ztunnel:\n{}\nserver ztunnel:\n{}",
        sent.log,
        h.ztunnel("node-a").log(),
        h.ztunnel("node-b").log()
    );
    // The app saw the client pod's own address.
    echo.wait_for_log(&format!("accepted from {}:", client.ip()), DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\necho log:\n{}", echo.log()));
    // And it went through both ztunnels over HBONE.
    h.ztunnel("node-b")
        .wait_for_log("inbound tunnel closed", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nserver ztunnel:\n{}", h.ztunnel("node-b").log()));
    h.ztunnel("node-a")
        .wait_for_log("outbound HBONE connection closed", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nclient ztunnel:\n{}", h.ztunnel("node-a").log()));
}
