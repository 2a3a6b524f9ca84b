//! ambit-control in local mode feeding a real ztunnel over delta xDS, in a local mesh
//! (needs root): the ztunnel's model follows the YAML directory, a file that stops
//! parsing leaves the model as it was, and the control plane's restart leaves the
//! ztunnel with its last model until it resyncs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Instant;

use ambit_localmesh::LocalMesh;
use support::{eventually, Harness, DEADLINE};

const NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
";

/// A pod on node-a whose redirection is reported: HBONE in the model. Only the model
/// sees it; no namespace backs it.
fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  \
         annotations: {{ambient.istio.io/redirection: enabled}}\n\
         spec: {{nodeName: node-a, containers: [{{name: app, image: app}}]}}\n\
         status: {{podIP: {ip}}}\n"
    )
}

/// One node, and `files` in the control plane's directory next to the mesh's own.
fn start(files: &[(&str, String)]) -> Harness {
    let h = Harness::start(LocalMesh::builder().nodes(["node-a"]).build().unwrap());
    for (name, text) in files {
        write(&h, name, text);
    }
    h
}

/// Replaces a file of the control plane's directory in one rename.
fn write(h: &Harness, name: &str, text: &str) {
    let tmp = h.k8s_dir().join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, h.k8s_dir().join(name)).unwrap();
}

fn in_dump(dump: &str, uid: &str) -> bool {
    dump.contains(&format!("\"{uid}\""))
}

/// Waits until node-a's ztunnel's config dump satisfies `what`; returns how long it
/// took.
async fn wait_for_dump(
    h: &Harness,
    label: &str,
    what: impl Fn(&str) -> bool,
) -> std::time::Duration {
    let start = Instant::now();
    eventually(
        DEADLINE,
        || async { what(&h.config_dump("node-a").await).then_some(()) },
        || format!("ztunnel's model never showed {label}\n{}", h.logs()),
    )
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn ztunnels_model_follows_the_yaml_directory_over_xds() {
    let h = start(&[
        ("namespace.yaml", NAMESPACE.to_owned()),
        ("web.yaml", pod("web", "10.1.0.9")),
    ]);
    wait_for_dump(&h, "shop/web", |d| {
        in_dump(d, "shop/web") && d.contains("HBONE")
    })
    .await;

    // A pod added to the directory reaches ztunnel.
    write(&h, "api.yaml", &pod("api", "10.1.0.10"));
    let took = wait_for_dump(&h, "shop/api", |d| in_dump(d, "shop/api")).await;
    eprintln!("a new pod reached ztunnel in {took:?}");

    // A file that stops parsing is reported with its line, and its last good content
    // stays in the model.
    write(
        &h,
        "api.yaml",
        &format!("{}---\nkind: a: b\n", pod("api", "10.1.0.10")),
    );
    h.control()
        .wait_for_log("keeping the file's last good content", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(in_dump(&h.config_dump("node-a").await, "shop/api"));

    // Deleting a pod's file removes it.
    std::fs::remove_file(h.k8s_dir().join("api.yaml")).unwrap();
    wait_for_dump(&h, "shop/api gone", |d| {
        !in_dump(d, "shop/api") && in_dump(d, "shop/web")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ztunnel_keeps_its_model_while_the_control_plane_restarts_then_resyncs() {
    let mut h = start(&[
        ("namespace.yaml", NAMESPACE.to_owned()),
        ("web.yaml", pod("web", "10.1.0.9")),
    ]);
    wait_for_dump(&h, "shop/web", |d| in_dump(d, "shop/web")).await;

    let stopped = h.control().stop().unwrap();
    assert!(stopped.success(), "ambit-control exited {stopped:?}");
    h.ztunnel("node-a")
        .wait_for_log("reconnecting", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    // Meanwhile the directory changes; ztunnel keeps serving its last model.
    std::fs::remove_file(h.k8s_dir().join("web.yaml")).unwrap();
    write(&h, "api.yaml", &pod("api", "10.1.0.10"));
    assert!(in_dump(&h.config_dump("node-a").await, "shop/web"));

    h.restart_control();
    wait_for_dump(&h, "the restarted control plane's model", |d| {
        in_dump(d, "shop/api") && !in_dump(d, "shop/web")
    })
    .await;
}
