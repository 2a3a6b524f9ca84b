//! The local mesh demo (the README's first command, via `scripts/demo.sh`): a cluster
//! of two nodes on this machine, with the real `ambit-control` (fed the mesh as
//! Kubernetes YAML; the model over delta xDS, and the CA) and one `ztunnel` per node,
//! two pods enrolled in ambient mode, and HTTP traffic between them over HBONE. It keeps
//! running, printing how to look inside, until Ctrl-C; then it tears everything down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use ambit_localmesh::{LocalMesh, Protocol};
use support::{metric, pod, Harness};

#[tokio::main]
async fn main() {
    println!("==> building a local mesh: 2 nodes, the control plane, a ztunnel per node");
    let mesh = LocalMesh::builder().nodes(["node-a", "node-b"]).build().unwrap_or_else(|e| {
        eprintln!("local mesh: {e}\n(the local mesh needs root, iproute2, iptables, nftables and containernetworking-plugins)");
        std::process::exit(1)
    });
    let client = pod(&mesh, "node-a", "shop", "client", "client");
    let web = pod(&mesh, "node-b", "shop", "web", "web");
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    mesh.set_protocol(&web, Protocol::Hbone).unwrap();
    let h = Harness::start(mesh);
    let _server = h.serve(&web, &["http", "--port", "8080", "--name", "web"]);

    println!("==> enrolling pods shop/client (node-a) and shop/web (node-b) in ambient mode");
    h.enrol(&client).await;
    h.enrol(&web).await;

    let target = format!("{}:8080", web.ip());
    println!("==> shop/client -> http://{target}/ (captured on 15001, HBONE to node-b's 15008)");
    let got = h.run_app(
        &client,
        &["get", "--to", &target, "--count", "3"],
        Duration::from_secs(30),
    );
    print!("{}", got.log);

    let metrics = h.metrics("node-b").await;
    let opened = metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
        ],
    );
    println!("==> node-b ztunnel: istio_tcp_connections_opened_total{{reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"}} = {opened}");

    let m = &h.mesh;
    println!();
    println!("The mesh keeps running. To look inside (as root):");
    println!(
        "  ip netns exec {} {} get --to {target}      # a request from shop/client",
        client.netns().name(),
        support::app().display()
    );
    for node in m.nodes() {
        println!(
            "  ip netns exec {} curl -s localhost:15000/config_dump   # {} ztunnel admin",
            node.netns().name(),
            node.name()
        );
    }
    println!("  logs: {}/logs", m.dir().display());
    println!("Ctrl-C (or SIGTERM) to stop and tear everything down.");
    ambit_net::process::shutdown_signal().await;
    println!("==> tearing down");
}
