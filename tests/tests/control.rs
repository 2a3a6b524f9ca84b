//! ambit-control in local mode feeding real ztunnels over delta xDS, in a local mesh
//! (needs root): the ztunnel's model follows the YAML directory, a file that stops
//! parsing leaves the model as it was, and the control plane's restart leaves the
//! ztunnel with its last model until it resyncs. With traffic: a pod deleted from the
//! YAML stops receiving it until declared again, and relabelling a namespace moves its
//! pods between HBONE and plaintext.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Instant;

use ambit_localmesh::{LocalMesh, Pod};
use serde_json::Value;
use support::{eventually, metric, two_nodes, Harness, DEADLINE};

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
    wait_for_node_dump(h, "node-a", label, what).await
}

/// [`wait_for_dump`] on `node`'s ztunnel.
async fn wait_for_node_dump(
    h: &Harness,
    node: &str,
    label: &str,
    what: impl Fn(&str) -> bool,
) -> std::time::Duration {
    let start = Instant::now();
    eventually(
        DEADLINE,
        || async { what(&h.config_dump(node).await).then_some(()) },
        || {
            format!(
                "{node}'s ztunnel's model never showed {label}\n{}",
                h.logs()
            )
        },
    )
    .await;
    let took = start.elapsed();
    eprintln!("{node}: {label} after {took:?}");
    took
}

/// The protocol node's ztunnel holds for workload `uid` (`None`: not in its model).
fn protocol_in(dump: &str, uid: &str) -> Option<String> {
    let body = dump.split_once("\r\n\r\n").map_or(dump, |(_, body)| body);
    let dump: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {dump}"));
    dump["model"]["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["uid"] == uid)
        .map(|w| w["protocol"].as_str().unwrap_or("TCP").to_owned())
}

/// Rewrites the mesh's own YAML (`mesh.yaml`, written by the harness) with `edit`
/// applied to each object; an object for which it returns false is dropped. This is
/// what `kubectl edit`/`delete` would do to the cluster.
fn edit_mesh_yaml(h: &Harness, edit: impl Fn(&mut Value) -> bool) {
    let path = h.k8s_dir().join("mesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut object: Value = serde::Deserialize::deserialize(doc).unwrap();
        if object.is_null() || !edit(&mut object) {
            continue;
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&object).unwrap());
    }
    write(h, "mesh.yaml", &out);
}

fn is(object: &Value, kind: &str, namespace: &str, name: &str) -> bool {
    object["kind"] == kind
        && object["metadata"]["name"] == name
        && (kind == "Namespace" || object["metadata"]["namespace"] == namespace)
}

/// Connections node-b's ztunnel took in for `shop/client`'s identity: mutual TLS only.
async fn hbone_from_client(h: &Harness) -> f64 {
    metric(
        &h.metrics("node-b").await,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

/// `shop/client` on node-a and `shop/web` (TCP echo on 8080) on node-b, both enrolled:
/// redirect rules installed, handed to their ztunnels, redirection reported.
async fn client_and_web() -> (Harness, Pod, Pod, ambit_localmesh::Process) {
    let mesh = two_nodes();
    let client = support::pod(&mesh, "node-a", "shop", "client", "client");
    let web = support::pod(&mesh, "node-b", "shop", "web", "web");
    let h = Harness::start(mesh);
    let echo = h.serve(&web, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&web).await;
    (h, client, web, echo)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_deleted_from_the_yaml_stops_receiving_traffic_until_declared_again() {
    let (h, client, web, echo) = client_and_web().await;
    h.send_ok(&client, web.addr(8080), 1000, 1);
    let before = hbone_from_client(&h).await;
    assert!(before >= 1.0, "not over HBONE\n{}", h.logs());

    // Deleted from the YAML while its network namespace is still there (as in the
    // moments after a delete): both ztunnels drop it, and a new connection to it fails
    // instead of reaching the app, in plaintext or otherwise.
    edit_mesh_yaml(&h, |o| !is(o, "Pod", "shop", "web"));
    for node in ["node-a", "node-b"] {
        wait_for_node_dump(&h, node, "shop/web deleted", |d| {
            protocol_in(d, "shop/web").is_none()
        })
        .await;
    }
    let accepted = echo.log().matches("accepted from").count();
    let out = h.run_app(
        &client,
        &["send", "--to", &web.addr(8080).to_string(), "--bytes", "10"],
        DEADLINE,
    );
    assert!(
        !out.status.success(),
        "a deleted pod still got traffic: {}\n{}",
        out.log,
        h.logs()
    );
    assert_eq!(
        echo.log().matches("accepted from").count(),
        accepted,
        "{}",
        echo.log()
    );

    // Declared again: reachable over HBONE.
    h.update_model().await;
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert!(
        hbone_from_client(&h).await > before,
        "not over HBONE\n{}",
        h.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn relabelling_a_namespace_enrols_and_unenrols_its_pods() {
    let (h, client, web, _echo) = client_and_web().await;
    // Enrolment from the namespace's label alone: no pod carries one.
    let label = |ambient: bool| {
        move |o: &mut Value| {
            if o["kind"] == "Pod" {
                if let Some(labels) = o["metadata"]["labels"].as_object_mut() {
                    labels.remove("istio.io/dataplane-mode");
                }
            }
            if is(o, "Namespace", "", "shop") {
                o["metadata"]["labels"] = if ambient {
                    serde_json::json!({"istio.io/dataplane-mode": "ambient"})
                } else {
                    serde_json::json!({})
                };
            }
            true
        }
    };
    let protocol_is =
        |want: &'static str| move |d: &str| protocol_in(d, "shop/web").as_deref() == Some(want);

    // The namespace labelled: HBONE.
    edit_mesh_yaml(&h, label(true));
    wait_for_dump(&h, "shop/web over HBONE", protocol_is("HBONE")).await;
    let before = hbone_from_client(&h).await;
    h.send_ok(&client, web.addr(8080), 1000, 1);
    let enrolled = hbone_from_client(&h).await;
    assert!(enrolled > before, "not over HBONE\n{}", h.logs());

    // Label removed: the pods are plaintext peers; traffic still flows, not over HBONE.
    edit_mesh_yaml(&h, label(false));
    wait_for_dump(&h, "shop/web unenrolled", protocol_is("TCP")).await;
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert_eq!(
        hbone_from_client(&h).await,
        enrolled,
        "still over HBONE\n{}",
        h.logs()
    );

    // Labelled again: HBONE again.
    edit_mesh_yaml(&h, label(true));
    wait_for_dump(&h, "shop/web enrolled again", protocol_is("HBONE")).await;
    h.send_ok(&client, web.addr(8080), 1000, 1);
    assert!(
        hbone_from_client(&h).await > enrolled,
        "not over HBONE\n{}",
        h.logs()
    );
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

#[tokio::test(flavor = "multi_thread")]
async fn node_agent_tokens_are_random_and_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::start(two_nodes());
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let mut tokens = Vec::new();
    for node in ["node-a", "node-b"] {
        let path = ambit_localmesh::ambient::token_file(&h.mesh, node);
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        let token = std::fs::read_to_string(&path).unwrap();
        assert!(
            token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
            "{node}'s token is not 256 random bits in hex: {token:?}"
        );
        assert!(!token.contains(node), "{token:?}");
        tokens.push(token);
    }
    assert_ne!(tokens[0], tokens[1]);
    let list = h.mesh.dir().join("tokens.yaml");
    assert_eq!(mode(&list), 0o600, "{}", list.display());
    // The tokens work: each ztunnel is ready only once it has its model over xDS,
    // fetched with its node's token.
    assert!(h.ambient.ztunnels().count() == 2);
    // A new mesh, new tokens.
    let other = Harness::start(LocalMesh::builder().nodes(["node-a"]).build().unwrap());
    let again =
        std::fs::read_to_string(ambit_localmesh::ambient::token_file(&other.mesh, "node-a"))
            .unwrap();
    assert_ne!(again, tokens[0]);
}
