//! ambit-control's CA applies node authorization against the pods of its local
//! directory: a node agent gets a certificate for an identity only while a pod running
//! as it is scheduled on the agent's node. In process, over real TLS and gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/ca.rs"]
mod ca;

use std::net::SocketAddr;
use std::time::Duration;

use ca::{ca_client, request};
use clap::Parser;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const TOKEN: &str = "node-a-agent-token";

#[tokio::test]
async fn a_node_agent_gets_only_identities_of_pods_on_its_node_and_follows_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let k8s = dir.path().join("k8s");
    std::fs::create_dir(&k8s).unwrap();
    let pods = "\
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: cart, containers: [{name: c, image: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pay-1, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: pay, containers: [{name: c, image: c}]}
";
    std::fs::write(k8s.join("pods.yaml"), pods).unwrap();
    std::fs::write(
        dir.path().join("tokens.yaml"),
        format!(
            "- token: {TOKEN}\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  \
             nodeAgent: true\n  node: node-a\n"
        ),
    )
    .unwrap();
    let config = ambit_control::config::Config::try_parse_from([
        "ambit-control",
        "--local-dir",
        k8s.to_str().unwrap(),
        "--poll",
        "50ms",
        "--root-dir",
        dir.path().join("ca").to_str().unwrap(),
        "--tokens",
        dir.path().join("tokens.yaml").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .unwrap();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ambit_control::app::run(
        config,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let addr = addr_rx.await.unwrap();
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.path().join("ca/root-cert.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let client = ca_client(addr, roots, TOKEN, true);

    // cart runs on node-a: granted. pay runs on node-b: refused, naming why.
    let chain = request(&client, "spiffe://cluster.local/ns/shop/sa/cart")
        .await
        .unwrap();
    assert!(chain.len() >= 2, "{chain:?}");
    let refused = request(&client, "spiffe://cluster.local/ns/shop/sa/pay")
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("no running pod with that identity"),
        "{refused}"
    );

    // pay's pod moves to node-a: granted once the directory says so.
    std::fs::write(k8s.join("pods.yaml"), pods.replace("node-b", "node-a")).unwrap();
    let start = std::time::Instant::now();
    loop {
        match request(&client, "spiffe://cluster.local/ns/shop/sa/pay").await {
            Ok(_) => break,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                assert!(e.to_string().contains("no running pod"), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still refused after the pod moved: {e}"),
        }
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
