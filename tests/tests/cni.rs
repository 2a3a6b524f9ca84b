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
//! - the agent's restart keeps the enrolled pods as they are.
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

    // Deleted (CNI DEL): unenrolled and gone from the model.
    h.mesh.remove_pod(&client).unwrap();
    h.ambient
        .node_agent("node-a")
        .unwrap()
        .wait_for_log("pod deleted (CNI DEL)", DEADLINE)
        .unwrap();
}
