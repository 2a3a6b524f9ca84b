//! Node agents' redirection reports in local mode, over real TLS and gRPC: a pod whose
//! labels ask for ambient mode is plaintext (and marked `ambient`) until its node's
//! agent reports it captured, then HBONE; withdrawn, plaintext again. Only a node agent
//! may report, only for its own node's pods; a pod that leaves the directory loses its
//! report. Asked at CNI ADD, it says whether a pod of the caller's node is to be
//! captured. Reports survive the control plane's restart (its state file); a corrupt
//! state file stops the start, naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/control.rs"]
mod control;

use ambit_core::model::{MeshConfig, Protocol};
use control::{enrolment, report, roots_in, until, xds_model, Control};

const NODE_A: &str = "node-a-agent-token-for-tests";
const WORKLOAD: &str = "a-workload-token-for-tests";

const PODS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: c}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: pay-1, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: pay, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-1, namespace: legacy}
spec: {nodeName: node-a, containers: [{name: c, image: c}]}
";

fn protocol_of(m: &MeshConfig, uid: &str) -> Option<Protocol> {
    m.workloads
        .iter()
        .find(|w| w.uid == uid)
        .map(|w| w.protocol)
}

#[tokio::test]
async fn a_pod_speaks_hbone_while_its_node_agent_reports_it_captured() {
    let dir = tempfile::tempdir().unwrap();
    let k8s = dir.path().join("k8s");
    std::fs::create_dir(&k8s).unwrap();
    std::fs::write(k8s.join("pods.yaml"), PODS).unwrap();
    std::fs::write(
        dir.path().join("tokens.yaml"),
        format!(
            "- token: {NODE_A}\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  nodeAgent: true\n  node: node-a\n\
             - token: {WORKLOAD}\n  identity: spiffe://cluster.local/ns/shop/sa/web\n"
        ),
    )
    .unwrap();
    let control = Control::local_in(dir.path()).await;
    let addr = control.addr;
    let roots = roots_in(&dir.path().join("ca/root-cert.pem"));

    // The node agent's view of the model, over xDS.
    let (mut model, client) = xds_model(addr, roots.clone(), NODE_A);

    // Asked for by its namespace, not captured yet: plaintext, marked ambient.
    until(&mut model, "web-1 waiting for capture", |m| {
        m.workloads
            .iter()
            .any(|w| w.uid == "shop/web-1" && w.ambient && w.protocol == Protocol::Tcp)
    })
    .await;

    // Asked at CNI ADD (plain-1 has no address yet): known, and whether to capture.
    assert_eq!(
        enrolment(addr, &roots, NODE_A, ("shop", "web-1"))
            .await
            .unwrap(),
        (true, true)
    );
    assert_eq!(
        enrolment(addr, &roots, NODE_A, ("legacy", "plain-1"))
            .await
            .unwrap(),
        (true, false)
    );
    assert_eq!(
        enrolment(addr, &roots, NODE_A, ("shop", "ghost"))
            .await
            .unwrap(),
        (false, false)
    );
    let e = enrolment(addr, &roots, NODE_A, ("shop", "pay-1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = enrolment(addr, &roots, WORKLOAD, ("shop", "web-1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // Reported captured by node-a's agent: HBONE.
    report(addr, &roots, NODE_A, ("shop", "web-1"), true)
        .await
        .unwrap();
    until(&mut model, "web-1 over HBONE", |m| {
        protocol_of(m, "shop/web-1") == Some(Protocol::Hbone)
    })
    .await;

    // Refused: a pod of another node, an unknown pod, a caller that is not a node agent.
    let e = report(addr, &roots, NODE_A, ("shop", "pay-1"), true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("runs on node-b"), "{e}");
    let e = report(addr, &roots, NODE_A, ("shop", "ghost"), true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = report(addr, &roots, WORKLOAD, ("shop", "web-1"), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = report(
        addr,
        &roots,
        "no-such-token-anywhere",
        ("shop", "web-1"),
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert_eq!(
        protocol_of(&model.borrow(), "shop/pay-1"),
        Some(Protocol::Tcp)
    );

    // Withdrawn: plaintext again.
    report(addr, &roots, NODE_A, ("shop", "web-1"), false)
        .await
        .unwrap();
    until(&mut model, "web-1 back to plaintext", |m| {
        protocol_of(m, "shop/web-1") == Some(Protocol::Tcp)
    })
    .await;

    // A pod that leaves the directory loses its report: declared again, it waits for a
    // new one.
    report(addr, &roots, NODE_A, ("shop", "web-1"), true)
        .await
        .unwrap();
    until(&mut model, "web-1 over HBONE again", |m| {
        protocol_of(m, "shop/web-1") == Some(Protocol::Hbone)
    })
    .await;
    std::fs::write(
        k8s.join("pods.yaml"),
        PODS.split("---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1")
            .next()
            .unwrap(),
    )
    .unwrap();
    until(&mut model, "web-1 gone", |m| {
        protocol_of(m, "shop/web-1").is_none()
    })
    .await;
    std::fs::write(k8s.join("pods.yaml"), PODS).unwrap();
    until(&mut model, "web-1 back, waiting for capture", |m| {
        protocol_of(m, "shop/web-1") == Some(Protocol::Tcp)
    })
    .await;

    client.abort();
    control.stop().await;
}

/// The directory laid out as [`Control::local_in`] reads it, with `PODS`.
fn local_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let k8s = dir.path().join("k8s");
    std::fs::create_dir(&k8s).unwrap();
    std::fs::write(k8s.join("pods.yaml"), PODS).unwrap();
    std::fs::write(
        dir.path().join("tokens.yaml"),
        format!(
            "- token: {NODE_A}\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  nodeAgent: true\n  node: node-a\n"
        ),
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn reports_survive_a_restart_of_the_control_plane_and_only_a_withdrawal_ends_them() {
    let dir = local_dir();
    let control = Control::local_in(dir.path()).await;
    let roots = roots_in(&dir.path().join("ca/root-cert.pem"));
    report(control.addr, &roots, NODE_A, ("shop", "web-1"), true)
        .await
        .unwrap();
    control.stop().await;

    // Restarted, and no node agent reports: web-1 is HBONE in the very first model.
    let control = Control::local_in(dir.path()).await;
    let (model, client) = xds_model(control.addr, roots.clone(), NODE_A);
    let mut model = model;
    until(&mut model, "the restarted control plane's model", |m| {
        protocol_of(m, "shop/pay-1").is_some()
    })
    .await;
    assert_eq!(
        protocol_of(&model.borrow(), "shop/web-1"),
        Some(Protocol::Hbone),
        "the report was lost with the restart"
    );
    let file = dir
        .path()
        .join("ca")
        .join(ambit_control::redirection::REPORTS_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Withdrawn, then restarted: plaintext, as the agent said.
    report(control.addr, &roots, NODE_A, ("shop", "web-1"), false)
        .await
        .unwrap();
    until(&mut model, "web-1 withdrawn", |m| {
        protocol_of(m, "shop/web-1") == Some(Protocol::Tcp)
    })
    .await;
    client.abort();
    control.stop().await;
    let control = Control::local_in(dir.path()).await;
    let (mut model, client) = xds_model(control.addr, roots.clone(), NODE_A);
    until(&mut model, "web-1 plaintext after the restart", |m| {
        protocol_of(m, "shop/web-1") == Some(Protocol::Tcp)
    })
    .await;
    client.abort();
    control.stop().await;
}

#[tokio::test]
async fn a_corrupt_reports_file_stops_the_start_naming_the_file() {
    let dir = local_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let file = state.join(ambit_control::redirection::REPORTS_FILE);
    std::fs::write(&file, "{\"captured\": [{\"namespace\": \"shop\"").unwrap();
    let path = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let config = <ambit_control::config::Config as clap::Parser>::try_parse_from([
        "ambit-control".to_owned(),
        "--local-dir".to_owned(),
        path("k8s"),
        "--root-dir".to_owned(),
        path("ca"),
        "--state-dir".to_owned(),
        path("state"),
        "--tokens".to_owned(),
        path("tokens.yaml"),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ])
    .unwrap();
    let e = ambit_control::app::run(config, |_| {}, std::future::pending())
        .await
        .unwrap_err();
    let message = format!("{e:#}");
    assert!(
        message.contains(&file.display().to_string()) && message.contains("not a reports file"),
        "{message}"
    );
    // Left as it was, for the operator to look at.
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .ends_with("\"shop\""));
}
