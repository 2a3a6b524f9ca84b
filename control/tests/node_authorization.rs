//! ambit-control's CA applies node authorization against the pods of its local
//! directory: a node agent gets a certificate for an identity only while a pod running
//! as it is scheduled on the agent's node. In process, over real TLS and gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/control.rs"]
mod control;

use control::{ca_client, request, roots_in, until, xds_model, Control};

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
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: pay-1, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: pay, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.2}
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
    let control = Control::local_in(dir.path()).await;
    let roots = roots_in(&dir.path().join("ca/root-cert.pem"));
    let client = ca_client(control.addr, roots.clone(), TOKEN, true);

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

    // pay's pod moves to node-a: granted once the directory says so. The placements
    // change in the same step as the model, so the model showing the move is the
    // moment to ask.
    let (mut model, _xds) = xds_model(control.addr, roots, TOKEN);
    std::fs::write(k8s.join("pods.yaml"), pods.replace("node-b", "node-a")).unwrap();
    until(&mut model, "pay-1 on node-a", |m| {
        m.workloads
            .iter()
            .any(|w| w.uid == "shop/pay-1" && w.node == "node-a")
    })
    .await;
    request(&client, "spiffe://cluster.local/ns/shop/sa/pay")
        .await
        .unwrap_or_else(|e| panic!("still refused after the pod moved: {e}"));
    control.stop().await;
}
