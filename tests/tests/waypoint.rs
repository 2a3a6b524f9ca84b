//! Waypoint routing at ztunnel, end to end in a local mesh (needs root): a pod bound to
//! a waypoint that has no ready workload and enforces a policy is never reached around
//! it (decision record 0011).
//!
//! - a mesh client's ztunnel refuses the connection, naming the waypoint (Istio would
//!   send it direct); while its model is still the old one, the destination refuses
//!   it instead (a stale client cannot skip the waypoint either);
//! - a plaintext client is refused at the destination (`bypasses_waypoint`), counted
//!   with the waypoint as the deciding policy;
//! - the Gateway deleted, the binding goes, and both connect directly again.
//!
//! The waypoint's own data path (HBONE to the waypoint with the original authority) is
//! tested with the waypoint binary, in the waypoint's end-to-end tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use ambit_localmesh::PodSpec;
use support::{apply, connects, eventually, metric, two_nodes, until_connects, Harness};

/// A waypoint serving workload traffic, its Service (an address, but no pod: not
/// ready), and a policy attached to it.
const WAYPOINT: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: workload}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec:
  clusterIP: 10.96.0.250
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
";

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_bound_to_a_waypoint_that_is_not_ready_is_refused_never_reached_around_it() {
    let mesh = two_nodes();
    let client = support::pod(&mesh, "node-a", "shop", "client", "client");
    let web = mesh
        .add_pod(
            "node-b",
            PodSpec::new("shop", "web")
                .service_account("web")
                .label("istio.io/use-waypoint", "waypoint"),
        )
        .unwrap();
    let outsider = support::pod(&mesh, "node-a", "legacy", "outsider", "outsider");
    let h = Harness::start(mesh);
    let _echo = h.serve(&web, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&web).await;
    let to = web.addr(8080);
    // The label names a waypoint that does not exist yet: no binding, direct.
    assert!(connects(&h, &client, to), "{}", h.logs());
    assert!(connects(&h, &outsider, to), "{}", h.logs());

    apply(&h, "waypoint.yaml", Some(WAYPOINT));
    // Until the client's ztunnel has the new model, the destination's refuses it as a
    // peer that skips the waypoint (`bypasses_waypoint`); then the client's own ztunnel
    // refuses, naming the waypoint.
    let refusal =
        "workload shop/web is bound to waypoint shop/waypoint, which has no ready workload";
    eventually(
        Duration::from_secs(15),
        || async {
            let refused = !connects(&h, &client, to);
            let log = h.ztunnel("node-a").log();
            (refused && log.contains("waypoint_not_ready") && log.contains(refusal)).then_some(())
        },
        || {
            format!(
                "the client's ztunnel refuses, naming the waypoint\n{}",
                h.logs()
            )
        },
    )
    .await;
    // A client that skips the waypoint (plaintext, from outside the mesh) is refused by
    // the destination, and counted with the waypoint as the reason.
    until_connects(
        &h,
        &outsider,
        to,
        false,
        "the destination refuses plaintext",
    )
    .await;
    let log = h.ztunnel("node-b").log();
    assert!(log.contains("bypasses_waypoint"), "{log}");
    assert!(log.contains("shop/waypoint"), "{log}");
    let metrics = h.metrics("node-b").await;
    let counted = metric(
        &metrics,
        "ambit_authorization_denials_total",
        &[
            ("policy", "waypoint/shop/waypoint"),
            ("reason", "bypasses_waypoint"),
        ],
    );
    assert!(counted >= 1.0, "{metrics}");

    // The waypoint deleted: the binding goes, and both connect directly again.
    apply(&h, "waypoint.yaml", None);
    until_connects(&h, &client, to, true, "direct again without the waypoint").await;
    until_connects(&h, &outsider, to, true, "plaintext in again").await;
}
