//! ambit-control against a Kubernetes API server: kube-rs, unchanged, on top of an
//! in-process fake that speaks the real list/watch wire format. A ztunnel's xDS client
//! and CA client, authenticated by TokenReview, see what the API server holds: objects
//! added and deleted, watches broken, history compacted (410 Gone, relist). The CA's
//! root lives in a Secret, survives restarts, yields to a plug-in `cacerts`, and is
//! published in every namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/control.rs"]
mod control;

use std::net::SocketAddr;

use ambit_core::model::{MeshConfig, Protocol};
use ambit_kubefake::FakeApi;
use ambit_net::ca_client::GrpcCaClient;
use clap::Parser;
use control::{request, roots, until, xds_model, xds_model_of_any, Control};
use serde_json::{json, Value};
const NODE_A_TOKEN: &str = "projected-token-of-ztunnel-on-node-a";
const WEB_TOKEN: &str = "projected-token-of-shop-web";

const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ambit-system}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}, annotations: {ambient.istio.io/redirection: enabled}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: web, image: web, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pay-1, namespace: shop, labels: {app: pay}, annotations: {ambient.istio.io/redirection: enabled}}
spec: {nodeName: node-b, serviceAccountName: pay, containers: [{name: pay, image: pay}]}
status: {phase: Running, podIP: 10.2.0.2, podIPs: [{ip: 10.2.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ztunnel-a1, namespace: ambit-system}
spec: {nodeName: node-a, serviceAccountName: ztunnel, hostNetwork: true, containers: [{name: z, image: z}]}
status: {phase: Running, podIP: 192.168.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.2], targetRef: {kind: Pod, name: web-1, namespace: shop}}]
ports: [{port: 8080, name: http, protocol: TCP}]
";

fn pod(name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: shop, annotations: {{ambient.istio.io/redirection: enabled}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {name}, containers: [{{name: c, image: c}}]}}\n\
         status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

/// A cluster with the objects above, and TokenReview answers for a node agent bound to
/// ztunnel-a1 on node-a and for shop/web.
async fn cluster() -> FakeApi {
    let api = FakeApi::start().await;
    for doc in CLUSTER.split("\n---\n") {
        api.put(doc);
    }
    api.token(
        NODE_A_TOKEN,
        json!({"authenticated": true, "audiences": ["istio-ca"],
               "user": {"username": "system:serviceaccount:ambit-system:ztunnel",
                        "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-a1"],
                                  "authentication.kubernetes.io/pod-uid": [uid(&api, "ztunnel-a1")]}}}),
    );
    api.token(
        WEB_TOKEN,
        json!({"authenticated": true, "audiences": ["istio-ca"],
               "user": {"username": "system:serviceaccount:shop:web"}}),
    );
    api
}

fn uid(api: &FakeApi, pod: &str) -> String {
    let o = api.get("v1", "Pod", "ambit-system", pod).unwrap();
    o["metadata"]["uid"].as_str().unwrap().to_owned()
}

/// ambit-control against `api`.
async fn start(api: &FakeApi) -> Control {
    start_with(api, &[]).await
}

/// ambit-control against `api`, with more flags.
async fn start_with(api: &FakeApi, flags: &[&str]) -> Control {
    let config = ambit_control::config::Config::try_parse_from(
        ["ambit-control", "--listen", "127.0.0.1:0"]
            .iter()
            .chain(flags),
    )
    .unwrap();
    let client = api.client();
    Control::start(|on_listening, stopped| {
        ambit_control::app::run_kubernetes(config, client, on_listening, async move {
            let _ = stopped.await;
        })
    })
    .await
}

/// The root every namespace's `istio-ca-root-cert` ConfigMap carries.
fn published_root(api: &FakeApi, namespace: &str) -> Option<String> {
    let cm = api.get("v1", "ConfigMap", namespace, "istio-ca-root-cert")?;
    cm["data"]["root-cert.pem"].as_str().map(str::to_owned)
}

/// A ztunnel's model from the control plane at `addr`, trusting `root_pem`.
fn xds_client(
    addr: SocketAddr,
    root_pem: &str,
    token: &str,
) -> (
    tokio::sync::watch::Receiver<std::sync::Arc<MeshConfig>>,
    tokio::task::JoinHandle<()>,
) {
    xds_model(addr, roots(root_pem), token)
}

fn has_workload(m: &MeshConfig, uid: &str) -> bool {
    m.workloads.iter().any(|w| w.uid == uid)
}

#[tokio::test]
async fn the_model_follows_the_api_server_through_watches_bookmarks_and_410_gone() {
    let api = cluster().await;
    let control = start(&api).await;
    api.wait_until("root published in shop", || {
        published_root(&api, "shop").is_some()
    })
    .await;
    let root = published_root(&api, "shop").unwrap();
    let (mut model, _client) = xds_client(control.addr, &root, NODE_A_TOKEN);

    // The listed cluster: shop's pods speak HBONE; the service resolves its named port
    // from the EndpointSlice; the host-network ztunnel pod is never enrolled.
    until(&mut model, "initial model", |m| {
        has_workload(m, "shop/web-1") && has_workload(m, "shop/pay-1") && m.services.len() == 1
    })
    .await;
    {
        let m = model.borrow();
        assert!(
            m.workloads
                .iter()
                .all(|w| w.uid != "ambit-system/ztunnel-a1" || w.protocol != Protocol::Hbone),
            "{m:#?}"
        );
        let web = m.workloads.iter().find(|w| w.uid == "shop/web-1").unwrap();
        assert_eq!(web.protocol, Protocol::Hbone);
        assert_eq!(m.services[0].endpoints[0].workload_uid, "shop/web-1");
        assert_eq!(m.services[0].endpoints[0].ports[0].target_port, 8080);
    }
    // The watches asked for bookmarks, as kube-rs does by default.
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "{:#?}",
        api.requests()
    );

    // A pod its labels enrol waits, plaintext, for its node agent's report; the report
    // becomes its annotation in the API server, and the pod then speaks HBONE. A report
    // for another node's pod is refused.
    api.put(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: fresh-1, namespace: shop}\n\
         spec: {nodeName: node-a, serviceAccountName: fresh, containers: [{name: c, image: c}]}\n\
         status: {phase: Running, podIP: 10.1.0.7}\n",
    );
    until(&mut model, "fresh-1 waiting for capture", |m| {
        m.workloads
            .iter()
            .any(|w| w.uid == "shop/fresh-1" && w.ambient && w.protocol == Protocol::Tcp)
    })
    .await;
    control::report(
        control.addr,
        &roots(&root),
        NODE_A_TOKEN,
        ("shop", "fresh-1"),
        true,
    )
    .await
    .unwrap();
    let annotated = api.get("v1", "Pod", "shop", "fresh-1").unwrap();
    assert_eq!(
        annotated["metadata"]["annotations"]["ambient.istio.io/redirection"], "enabled",
        "{annotated}"
    );
    until(&mut model, "fresh-1 over HBONE", |m| {
        m.workloads
            .iter()
            .any(|w| w.uid == "shop/fresh-1" && w.protocol == Protocol::Hbone)
    })
    .await;
    let refused = control::report(
        control.addr,
        &roots(&root),
        NODE_A_TOKEN,
        ("shop", "pay-1"),
        true,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");

    // Watch events: an added pod appears, a deleted one goes.
    api.put(&pod("cart-1", "node-b", "10.2.0.3"));
    until(&mut model, "pod added", |m| has_workload(m, "shop/cart-1")).await;
    api.delete("v1", "Pod", "shop", "pay-1");
    until(&mut model, "pod deleted", |m| {
        !has_workload(m, "shop/pay-1")
    })
    .await;

    // A bookmark moves the watch's version on; after the watches break, they resume
    // from there and miss nothing.
    api.bookmark();
    api.break_watches();
    api.put(&pod("pay-2", "node-b", "10.2.0.4"));
    until(&mut model, "pod added while the watches were down", |m| {
        has_workload(m, "shop/pay-2")
    })
    .await;

    // History compacted while the watches are down, and a pod deleted meanwhile: the
    // resumed watches get 410 Gone, kube-rs relists, and the deletion is seen from the
    // list alone.
    let lists_before = pod_lists(&api);
    api.break_watches();
    api.delete("v1", "Pod", "shop", "cart-1");
    api.compact();
    until(&mut model, "pod deleted while the watches were down", |m| {
        !has_workload(m, "shop/cart-1")
    })
    .await;
    assert!(pod_lists(&api) > lists_before, "no relist after 410 Gone");

    // A ServiceEntry (Istio's YAML, served by the API server like any kind).
    api.put(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: payments, namespace: shop}\n\
         spec: {hosts: [api.payments.example], addresses: [192.0.2.10], resolution: STATIC,\n\
                ports: [{number: 443, name: https, protocol: TLS}], endpoints: [{address: 198.51.100.1}]}\n",
    );
    until(&mut model, "ServiceEntry added", |m| {
        m.services
            .iter()
            .any(|s| s.hostname.as_deref() == Some("api.payments.example"))
    })
    .await;

    // One that cannot be translated is skipped, and its status says why; fixed, the
    // condition goes.
    let bad = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
               metadata: {name: everything, namespace: shop}\n\
               spec: {hosts: ['*.example.com'], addresses: [192.0.2.11], resolution: STATIC,\n\
                      ports: [{number: 443, name: https}], endpoints: [{address: 198.51.100.2}]}\n";
    api.put(bad);
    let condition =
        || ztunnel_accepted(&api, "networking.istio.io/v1", "ServiceEntry", "everything");
    api.wait_until("ZtunnelAccepted=False on the skipped ServiceEntry", || {
        condition().is_some_and(|c| {
            c["status"] == "False" && c["message"].as_str().unwrap_or("").contains("wildcard")
        })
    })
    .await;
    api.put(&bad.replace("'*.example.com'", "everything.example.com"));
    api.wait_until("condition withdrawn once translated", || {
        condition().is_none()
    })
    .await;

    // An AuthorizationPolicy reaches the model, and its status says how ztunnel
    // enforces it: True as written, False (with Istio's reason) when it cannot be.
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                  metadata: {name: only-web, namespace: shop}\n\
                  spec: {rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]}\n";
    api.put(policy);
    until(&mut model, "AuthorizationPolicy in the model", |m| {
        m.policies.iter().any(|p| p.policy.name == "only-web")
    })
    .await;
    let policy_condition = || {
        ztunnel_accepted(
            &api,
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "only-web",
        )
    };
    api.wait_until("ZtunnelAccepted=True on the policy", || {
        policy_condition().is_some_and(|c| c["status"] == "True" && c["reason"] == "Accepted")
    })
    .await;
    api.put(&policy.replace(
        "from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]",
        "to: [{operation: {methods: [GET]}}]",
    ));
    api.wait_until(
        "ZtunnelAccepted=False (UnsupportedValue) once it needs HTTP",
        || {
            policy_condition().is_some_and(|c| {
                c["status"] == "False"
                    && c["reason"] == "UnsupportedValue"
                    && c["message"].as_str().unwrap_or("").contains("methods")
            })
        },
    )
    .await;

    // A namespace relabelled out of ambient: its pods drop to plaintext.
    api.put("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    until(&mut model, "namespace unenrolled", |m| {
        m.workloads
            .iter()
            .filter(|w| w.namespace == "shop")
            .all(|w| w.protocol != Protocol::Hbone)
    })
    .await;
    control.stop().await;
    // The redirection annotation and the status conditions above included.
    assert_allowed_by_rbac(&api);
}

/// Every request ambit-control made is allowed by the RBAC it ships with (the
/// manifests, `deploy/ambit.yaml`, rendered from the Helm chart): its ClusterRole
/// anywhere, its Role in ambit-system, each rule with `resourceNames` only for the
/// objects it names (by the request's path, or a list or watch by `metadata.name`).
fn assert_allowed_by_rbac(api: &FakeApi) {
    let manifests = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ambit.yaml");
    let text = std::fs::read_to_string(manifests).unwrap();
    let mut cluster_rules = Vec::new();
    let mut namespace_rules = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["metadata"]["name"] != "ambit-control" {
            continue;
        }
        match v["kind"].as_str() {
            Some("ClusterRole") => cluster_rules.extend(v["rules"].as_array().unwrap().clone()),
            Some("Role") => {
                assert_eq!(v["metadata"]["namespace"], "ambit-system");
                namespace_rules.extend(v["rules"].as_array().unwrap().clone())
            }
            _ => {}
        }
    }
    assert!(!cluster_rules.is_empty() && !namespace_rules.is_empty());
    let allows = |rules: &[serde_json::Value],
                  verb: &str,
                  group: &str,
                  resource: &str,
                  name: Option<&str>| {
        rules.iter().any(|r| {
            let has =
                |field: &str, want: &str| r[field].as_array().unwrap().iter().any(|x| x == want);
            let named = match r["resourceNames"].as_array() {
                None => true,
                Some(names) => name.is_some_and(|n| names.iter().any(|x| x == n)),
            };
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb) && named
        })
    };
    for request in api.requests() {
        let (method, rest) = request.split_once(' ').unwrap();
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, tail) = match segments.as_slice() {
            ["api", "v1", tail @ ..] => ("", tail),
            ["apis", group, _version, tail @ ..] => (*group, tail),
            _ => panic!("unexpected request {request}"),
        };
        let (namespace, resource, name) = match tail {
            [plural] => (None, plural.to_string(), None),
            ["namespaces", name] => (None, "namespaces".to_owned(), Some(*name)),
            [plural, name] => (None, plural.to_string(), Some(*name)),
            ["namespaces", ns, plural] => (Some(*ns), plural.to_string(), None),
            ["namespaces", ns, plural, name] => (Some(*ns), plural.to_string(), Some(*name)),
            ["namespaces", ns, plural, name, sub] => {
                (Some(*ns), format!("{plural}/{sub}"), Some(*name))
            }
            _ => panic!("unexpected request {request}"),
        };
        let verb = match method {
            "GET" if query.contains("watch=true") => "watch",
            "GET" if name.is_some() => "get",
            "GET" => "list",
            "POST" => "create",
            "PATCH" => "patch",
            "PUT" => "update",
            "DELETE" => "delete",
            other => panic!("unexpected method {other}"),
        };
        // A list or watch of one object by name is authorized by its name.
        let selected = query
            .split('&')
            .find_map(|p| p.strip_prefix("fieldSelector=metadata.name%3D"));
        let name = name.or(selected);
        let allowed = allows(&cluster_rules, verb, group, &resource, name)
            || (namespace == Some("ambit-system")
                && allows(&namespace_rules, verb, group, &resource, name));
        assert!(
            allowed,
            "{request}: {verb} {group}/{resource} {name:?} is not allowed by {manifests}"
        );
    }
}

/// Pod lists (not watches) the API server has answered.
fn pod_lists(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods") && !r.contains("watch=true"))
        .count()
}

fn ca_client(addr: SocketAddr, root: &str, token: &str, impersonate: bool) -> GrpcCaClient {
    control::ca_client(addr, roots(root), token, impersonate)
}

#[tokio::test]
async fn the_ca_authenticates_with_token_review_and_authorizes_node_agents_by_node() {
    let api = cluster().await;
    // Without Istio's CRDs there are no ServiceEntries, and the rest is served.
    api.not_installed("serviceentries");
    let control = start(&api).await;
    api.wait_until("root published", || published_root(&api, "shop").is_some())
        .await;
    let root = published_root(&api, "shop").unwrap();

    let reviews = || {
        api.requests()
            .iter()
            .filter(|r| r.contains("tokenreviews"))
            .count()
    };

    // A workload's token: its own identity, not another. The token is reviewed once
    // for both requests: an accepted token is remembered for a minute.
    let before = reviews();
    let web = ca_client(control.addr, &root, WEB_TOKEN, false);
    request(&web, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .unwrap();
    let refused = request(&web, "spiffe://cluster.local/ns/shop/sa/pay")
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("CSR"), "{refused}");
    assert_eq!(reviews(), before + 1);

    // The node agent on node-a: web runs there, pay on node-b.
    let agent = ca_client(control.addr, &root, NODE_A_TOKEN, true);
    request(&agent, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .unwrap();
    let refused = request(&agent, "spiffe://cluster.local/ns/shop/sa/pay")
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("no running pod with that identity"),
        "{refused}"
    );

    // A token the API server does not know, or issued for another audience.
    let stranger = ca_client(control.addr, &root, "not-a-token-the-cluster-knows", false);
    let refused = request(&stranger, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("invalid bearer token"),
        "{refused}"
    );
    api.token(
        "token-for-the-api-server-audience",
        json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
               "user": {"username": "system:serviceaccount:shop:web"}}),
    );
    let other = ca_client(
        control.addr,
        &root,
        "token-for-the-api-server-audience",
        false,
    );
    let refused = request(&other, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("audience istio-ca"),
        "{refused}"
    );

    // xDS takes the same callers: an unknown token gets no model, however often the
    // client retries (a refusal is never remembered).
    let before = reviews();
    let (model, _client) = xds_client(control.addr, &root, "not-a-token-the-cluster-knows");
    api.wait_until("xDS client refused twice", || reviews() >= before + 2)
        .await;
    assert!(model.borrow().workloads.is_empty(), "{:#?}", model.borrow());
    control.stop().await;
    assert_allowed_by_rbac(&api);
}

#[tokio::test]
async fn the_root_is_kept_in_a_secret_published_everywhere_and_a_plugin_ca_wins() {
    let api = cluster().await;
    let control = start(&api).await;
    api.wait_until("root published in every namespace", || {
        published_root(&api, "shop").is_some() && published_root(&api, "ambit-system").is_some()
    })
    .await;
    let secret = api
        .get("v1", "Secret", "ambit-system", "istio-ca-secret")
        .expect("the generated root is stored in istio-ca-secret");
    let root = published_root(&api, "shop").unwrap();
    assert!(root.contains("BEGIN CERTIFICATE"), "{root}");

    // Put back when deleted or edited; published in a new namespace.
    api.delete("v1", "ConfigMap", "shop", "istio-ca-root-cert");
    api.put(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio-ca-root-cert, namespace: ambit-system}\ndata: {root-cert.pem: tampered}\n",
    );
    api.put("apiVersion: v1\nkind: Namespace\nmetadata: {name: billing}\n");
    api.wait_until("root restored and published in a new namespace", || {
        published_root(&api, "shop").as_ref() == Some(&root)
            && published_root(&api, "ambit-system").as_ref() == Some(&root)
            && published_root(&api, "billing").as_ref() == Some(&root)
    })
    .await;
    control.stop().await;

    // A restart reuses the stored root: same Secret, same published root.
    let control = start(&api).await;
    let again = api
        .get("v1", "Secret", "ambit-system", "istio-ca-secret")
        .unwrap();
    assert_eq!(again["data"], secret["data"], "the root was regenerated");
    let (mut model, _client) = xds_client(control.addr, &root, NODE_A_TOKEN);
    until(&mut model, "model after restart", |m| {
        has_workload(m, "shop/web-1")
    })
    .await;
    control.stop().await;

    // A plug-in cacerts Secret takes precedence: the CA now chains to its root, and
    // that root is what gets published.
    let plugin = ambit_ca::authority::CertificateAuthority::generate_root(
        &"cluster.local".parse().unwrap(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let b64 = |s: &str| {
        use k8s_openapi::ByteString;
        serde_json::to_value(ByteString(s.as_bytes().to_vec())).unwrap()
    };
    api.put(&serde_json::to_string(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "cacerts", "namespace": "ambit-system"},
        "data": {"ca-cert.pem": b64(&plugin.ca_cert_pem), "ca-key.pem": b64(&plugin.ca_key_pem),
                 "cert-chain.pem": b64(&plugin.cert_chain_pem), "root-cert.pem": b64(&plugin.root_cert_pem)}
    })).unwrap());
    let control = start_with(&api, &["--ca-reload", "200ms"]).await;
    api.wait_until("plug-in root published", || {
        published_root(&api, "shop").as_deref() == Some(plugin.root_cert_pem.as_str())
    })
    .await;
    let agent = ca_client(control.addr, &plugin.root_cert_pem, NODE_A_TOKEN, true);
    request(&agent, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .unwrap();

    // cacerts changed in place, without a restart: half-written first (a key that is
    // not the certificate's), refused while the current CA keeps signing...
    let next = ambit_ca::authority::CertificateAuthority::generate_root(
        &"cluster.local".parse().unwrap(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let cacerts = |cert: &str, key: &str, roots: &str| {
        serde_json::to_string(&json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "cacerts", "namespace": "ambit-system"},
            "data": {"ca-cert.pem": b64(cert), "ca-key.pem": b64(key),
                     "cert-chain.pem": b64(""), "root-cert.pem": b64(roots)}
        }))
        .unwrap()
    };
    api.put(&cacerts(
        &plugin.ca_cert_pem,
        &next.ca_key_pem,
        &plugin.root_cert_pem,
    ));
    // The control plane has read the Secret as it is now (twice: a whole reload
    // period after the change) and refused it.
    let reads = || {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/namespaces/ambit-system/secrets/cacerts"))
            .count()
    };
    let before = reads();
    api.wait_until("the changed Secret read twice", || reads() >= before + 2)
        .await;
    assert_eq!(
        published_root(&api, "shop").as_deref(),
        Some(plugin.root_cert_pem.as_str())
    );
    request(&agent, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .unwrap();
    // ...then a rotation's first step, the new root added to root-cert.pem: taken,
    // and the bundle of both published.
    let both = format!("{}{}", plugin.root_cert_pem, next.root_cert_pem);
    api.put(&cacerts(&plugin.ca_cert_pem, &plugin.ca_key_pem, &both));
    api.wait_until("both roots published", || {
        published_root(&api, "shop").is_some_and(|r| r.matches("BEGIN CERTIFICATE").count() == 2)
    })
    .await;
    let chain = request(&agent, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .unwrap();
    assert_eq!(
        chain.last().unwrap().matches("BEGIN CERTIFICATE").count(),
        2,
        "a response ends with the whole bundle"
    );
    control.stop().await;
    assert_allowed_by_rbac(&api);
}

#[tokio::test]
async fn a_waypoint_gateway_is_deployed_and_programmed_once_its_pod_is_ready_and_what_binds_to_it_says_so(
) {
    let api = cluster().await;
    let control = start(&api).await;
    api.wait_until("root published in shop", || {
        published_root(&api, "shop").is_some()
    })
    .await;
    let root = published_root(&api, "shop").unwrap();
    // The class of waypoints is the control plane's to make, as istiod does.
    api.wait_until("GatewayClass istio-waypoint applied", || {
        api.get(
            "gateway.networking.k8s.io/v1",
            "GatewayClass",
            "",
            "istio-waypoint",
        )
        .is_some_and(|c| c["spec"]["controllerName"] == "istio.io/mesh-controller")
    })
    .await;
    let (mut model, _client) = xds_client(control.addr, &root, NODE_A_TOKEN);
    api.put(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: waypoint, namespace: shop}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    // What runs it, owned by the Gateway.
    api.wait_until(
        "the waypoint's Deployment, Service and ServiceAccount",
        || {
            ["Deployment", "Service", "ServiceAccount"]
                .iter()
                .all(|kind| {
                    let api_version = if *kind == "Deployment" {
                        "apps/v1"
                    } else {
                        "v1"
                    };
                    api.get(api_version, kind, "shop", "waypoint")
                        .is_some_and(|o| o["metadata"]["ownerReferences"][0]["kind"] == "Gateway")
                })
        },
    )
    .await;
    let deployment = api
        .get("apps/v1", "Deployment", "shop", "waypoint")
        .unwrap();
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"],
        "none"
    );
    let gateway_condition = |type_: &str| {
        let o = api.get(
            "gateway.networking.k8s.io/v1",
            "Gateway",
            "shop",
            "waypoint",
        )?;
        o["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    };
    api.wait_until("Programmed=False while nothing runs", || {
        gateway_condition("Programmed").is_some_and(|c| c["status"] == "False")
    })
    .await;
    // The API server allocates the Service's IP; the Deployment's pod becomes ready.
    let mut service = api.get("v1", "Service", "shop", "waypoint").unwrap();
    service["spec"]["clusterIP"] = "10.96.0.100".into();
    api.put(&serde_json::to_string(&service).unwrap());
    api.put(
        "apiVersion: v1\nkind: Pod\n\
         metadata: {name: waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}\n\
         spec: {nodeName: node-a, serviceAccountName: waypoint, containers: [{name: waypoint, image: w}]}\n\
         status: {phase: Running, podIP: 10.1.0.100, podIPs: [{ip: 10.1.0.100}], conditions: [{type: Ready, status: 'True'}]}\n",
    );
    api.wait_until("Programmed=True with the waypoint's address", || {
        let o = api.get(
            "gateway.networking.k8s.io/v1",
            "Gateway",
            "shop",
            "waypoint",
        );
        gateway_condition("Programmed").is_some_and(|c| c["status"] == "True")
            && o.is_some_and(|o| {
                o["status"]["addresses"][0]["value"] == "waypoint.shop.svc.cluster.local"
                    && o["status"]["listeners"][0]["conditions"][0]["status"] == "True"
            })
    })
    .await;
    // A Service bound to it: in the model, and its condition says so.
    let mut web = api.get("v1", "Service", "shop", "web").unwrap();
    web["metadata"]["labels"] = json!({"istio.io/use-waypoint": "waypoint"});
    api.put(&serde_json::to_string(&web).unwrap());
    until(
        &mut model,
        "web bound to the waypoint, which is in the model",
        |m| {
            m.waypoints.iter().any(|w| w.name == "waypoint")
                && m.services.iter().any(|s| {
                    s.name == "web" && s.waypoint.as_ref().is_some_and(|w| w.name == "waypoint")
                })
        },
    )
    .await;
    api.wait_until("istio.io/WaypointBound=True on web", || {
        api.get("v1", "Service", "shop", "web").is_some_and(|o| {
            o["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "istio.io/WaypointBound"
                        && c["status"] == "True"
                        && c["reason"] == "WaypointAccepted"
                })
            })
        })
    })
    .await;
    // An HTTPRoute on the bound Service: its status per parent says it is accepted and
    // which backend does not exist. (Node agents are not sent routes: only waypoints.)
    api.put(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: split, namespace: shop}\n\
         spec: {parentRefs: [{group: '', kind: Service, name: web}], rules: [{backendRefs: [{name: web, port: 80, weight: 9}, {name: gone, port: 80, weight: 1}]}]}\n",
    );
    api.wait_until("the route's status for its parent", || {
        api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", "split")
            .is_some_and(|o| {
                let p = &o["status"]["parents"][0];
                p["parentRef"]["name"] == "web"
                    && p["controllerName"] == "istio.io/mesh-controller"
                    && p["conditions"][0]["type"] == "Accepted"
                    && p["conditions"][0]["status"] == "True"
                    && p["conditions"][1]["reason"] == "BackendNotFound"
                    && p["conditions"][1]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("shop/gone"))
            })
    })
    .await;
    // A VirtualService on the same Service: the HTTPRoute wins there, and its
    // `Accepted` condition says so.
    api.put(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: web, namespace: shop}\n\
         spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}\n",
    );
    api.wait_until("the VirtualService's condition", || {
        api.get("networking.istio.io/v1", "VirtualService", "shop", "web")
            .is_some_and(|o| {
                o["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter().any(|c| {
                        c["type"] == "Accepted"
                            && c["status"] == "False"
                            && c["message"].as_str().is_some_and(|m| {
                                m.contains("HTTPRoute shop/split") && m.contains("wins")
                            })
                    })
                })
            })
    })
    .await;
    control.stop().await;
    assert_allowed_by_rbac(&api);
}

/// The `ZtunnelAccepted` condition of object `shop/<name>`, if it has one.
fn ztunnel_accepted(api: &FakeApi, api_version: &str, kind: &str, name: &str) -> Option<Value> {
    let o = api.get(api_version, kind, "shop", name)?;
    o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "ZtunnelAccepted")
        .cloned()
}

/// An object the control plane cannot read, in the list or in a watch event, is left
/// out by name (a security policy is kept and fails closed) while the rest of its kind
/// goes on: typed by kube-rs, one such object failed the kind's whole list and watch on
/// every retry.
#[tokio::test]
async fn an_object_that_cannot_be_read_is_left_out_alone_and_a_policy_fails_closed() {
    let api = cluster().await;
    // In the first list: a Gateway whose listeners are not a list.
    api.put(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: broken, namespace: shop}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: nope}\n",
    );
    let control = start(&api).await;
    api.wait_until("root published in shop", || {
        published_root(&api, "shop").is_some()
    })
    .await;
    let root = published_root(&api, "shop").unwrap();
    let (mut model, _client) = xds_client(control.addr, &root, NODE_A_TOKEN);
    until(&mut model, "initial model", |m| {
        has_workload(m, "shop/web-1")
    })
    .await;

    // The good Gateway beside it is served: its Deployment is applied.
    api.put(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: waypoint, namespace: shop}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    api.wait_until("the good Gateway's Deployment", || {
        api.get("apps/v1", "Deployment", "shop", "waypoint")
            .is_some()
    })
    .await;
    assert!(api.get("apps/v1", "Deployment", "shop", "broken").is_none());

    // A policy whose metadata cannot be read, in a watch event: kept, failing closed.
    api.put(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: broken-policy, namespace: shop, labels: 5}\n\
         spec: {action: DENY, rules: [{from: [{source: {namespaces: [elsewhere]}}]}]}\n",
    );
    until(&mut model, "the unreadable policy, failing closed", |m| {
        m.policies
            .iter()
            .any(|p| p.policy.name == "broken-policy" && p.policy.namespace == "shop")
    })
    .await;
    // And the kind still follows the API server: a good policy after it arrives.
    api.put(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: good, namespace: shop}\n\
         spec: {rules: [{from: [{source: {namespaces: [shop]}}]}]}\n",
    );
    until(&mut model, "the good policy beside it", |m| {
        m.policies.iter().any(|p| p.policy.name == "good")
    })
    .await;
    control.stop().await;
}

/// A leader that died left `ZtunnelAccepted: False` on a Service and a policy that are
/// fine now: the next leader takes over what was written before its term and
/// withdraws it, while it keeps (writes again) what still applies.
#[tokio::test]
async fn a_new_leader_withdraws_conditions_its_predecessor_left_that_no_longer_apply() {
    let api = cluster().await;
    let stale = "status: {conditions: [{type: ZtunnelAccepted, status: 'False', reason: NotTranslated, message: 'left by a leader that died', lastTransitionTime: '2026-01-01T00:00:00Z'}]}";
    api.put(&format!(
        "apiVersion: v1\nkind: Service\n\
         metadata: {{name: web, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n{stale}\n"
    ));
    api.put(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: fine, namespace: shop}}\n\
         spec: {{rules: [{{from: [{{source: {{namespaces: [shop]}}}}]}}]}}\n{stale}\n"
    ));
    assert!(ztunnel_accepted(&api, "v1", "Service", "web").is_some());
    let control = start(&api).await;
    // The Service is translated: the stale condition goes.
    api.wait_until("the stale condition withdrawn from the Service", || {
        ztunnel_accepted(&api, "v1", "Service", "web").is_none()
    })
    .await;
    // The policy is enforced as written: its condition is rewritten True.
    api.wait_until("the policy's condition written again, True", || {
        ztunnel_accepted(&api, "security.istio.io/v1", "AuthorizationPolicy", "fine")
            .is_some_and(|c| c["status"] == "True")
    })
    .await;
    control.stop().await;
}

/// A replica of ambit-control named `who` (its identity in the election and its API
/// client's name in [`FakeApi::requests_of`]), with short election times.
async fn replica(api: &FakeApi, who: &str) -> Control {
    let config = ambit_control::config::Config::try_parse_from([
        "ambit-control",
        "--listen",
        "127.0.0.1:0",
        "--leader-identity",
        who,
        "--leader-lease-duration",
        "2s",
        "--leader-renew-deadline",
        "1s",
        "--leader-retry-period",
        "100ms",
    ])
    .unwrap();
    let client = api.client_of(who);
    Control::start(|on_listening, stopped| {
        ambit_control::app::run_kubernetes(config, client, on_listening, async move {
            let _ = stopped.await;
        })
    })
    .await
}

fn lease_holder(api: &FakeApi) -> Option<String> {
    let lease = api.get(
        "coordination.k8s.io/v1",
        "Lease",
        "ambit-system",
        "ambit-control-leader",
    )?;
    lease["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
}

/// Writes to the cluster other than the election's own and a lost race to store the
/// first root: status conditions, ConfigMaps, waypoint objects, the GatewayClass.
fn cluster_writes(requests: &[String]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| !r.starts_with("GET "))
        .filter(|r| !r.contains("/leases"))
        .filter(|r| !r.contains("tokenreviews"))
        .filter(|r| !r.starts_with("POST /api/v1/namespaces/ambit-system/secrets"))
        .cloned()
        .collect()
}

/// Two replicas serve xDS and the CA at once; only the one holding the Lease writes to
/// the cluster. Killed in the middle of a push, the leader loses nothing: a ztunnel
/// resumes from the other replica (resource versions are content hashes, the same on
/// every replica) and gets the change, and the other replica takes the Lease and writes
/// the status the change needs. A replica stopped cleanly hands the Lease over at once.
#[tokio::test]
async fn two_replicas_serve_and_only_the_lease_holder_writes_and_a_killed_leader_loses_no_update() {
    let api = cluster().await;
    let a = replica(&api, "control-a").await;
    let b = replica(&api, "control-b").await;
    api.wait_until("a leader", || lease_holder(&api).is_some())
        .await;
    let leader_name = lease_holder(&api).unwrap();
    let (leader, follower, follower_name) = if leader_name == "control-a" {
        (a, b, "control-b")
    } else {
        (b, a, "control-a")
    };
    api.wait_until("root published by the leader", || {
        published_root(&api, "shop").is_some()
    })
    .await;
    let root = published_root(&api, "shop").unwrap();

    // Both serve: the CA (TokenReview from either) and xDS.
    for control in [&leader, &follower] {
        let ca = ca_client(control.addr, &root, WEB_TOKEN, false);
        request(&ca, "spiffe://cluster.local/ns/shop/sa/web")
            .await
            .unwrap();
        let (mut model, client) = xds_client(control.addr, &root, NODE_A_TOKEN);
        until(&mut model, "the model from each replica", |m| {
            has_workload(m, "shop/web-1")
        })
        .await;
        client.abort();
    }

    // A policy gets its status from the leader alone.
    api.put(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: first, namespace: shop}\n\
         spec: {rules: [{from: [{source: {namespaces: [shop]}}]}]}\n",
    );
    api.wait_until("the first policy's status", || {
        ztunnel_accepted(&api, "security.istio.io/v1", "AuthorizationPolicy", "first").is_some()
    })
    .await;
    assert!(!cluster_writes(&api.requests_of(&leader_name)).is_empty());
    assert_eq!(
        cluster_writes(&api.requests_of(follower_name)),
        Vec::<String>::new(),
        "the replica that does not hold the lease wrote to the cluster"
    );

    // A ztunnel on the leader (its reconnections go to the other replica in turn).
    let (mut model, _client) =
        xds_model_of_any(vec![leader.addr, follower.addr], roots(&root), NODE_A_TOKEN);
    until(&mut model, "the model from the leader", |m| {
        has_workload(m, "shop/web-1")
    })
    .await;
    // A change, and the leader killed at once: no clean stop, no release.
    api.put(&pod("late-1", "node-a", "10.1.0.9"));
    api.put(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: second, namespace: shop}\n\
         spec: {rules: [{from: [{source: {namespaces: [shop]}}]}]}\n",
    );
    drop(leader);
    until(&mut model, "the change, from the other replica", |m| {
        has_workload(m, "shop/late-1") && m.policies.iter().any(|p| p.policy.name == "second")
    })
    .await;
    api.wait_until("the other replica leads once the lease expires", || {
        lease_holder(&api).as_deref() == Some(follower_name)
    })
    .await;
    api.wait_until("the second policy's status, by the new leader", || {
        ztunnel_accepted(
            &api,
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "second",
        )
        .is_some()
    })
    .await;
    let lease = api
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "ambit-system",
            "ambit-control-leader",
        )
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease:#}");

    // A third replica waits; the leader stopped cleanly releases the lease first.
    let c = replica(&api, "control-c").await;
    follower.stop().await;
    assert_ne!(lease_holder(&api).as_deref(), Some(follower_name));
    api.wait_until("the third replica leads", || {
        lease_holder(&api).as_deref() == Some("control-c")
    })
    .await;
    c.stop().await;
    assert_allowed_by_rbac(&api);
}
