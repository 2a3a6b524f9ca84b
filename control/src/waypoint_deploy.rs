//! In a cluster, each waypoint Gateway gets what runs it, as istiod deploys it
//! (reference §3.2): a ServiceAccount, a ClusterIP Service (15008 HBONE, 15021 status)
//! and a Deployment, all named like the Gateway (the ServiceAccount as
//! `gateway.istio.io/service-account` says, when set), owned by it (so deleting the
//! Gateway deletes them), labelled `gateway.networking.k8s.io/gateway-name`, its pods
//! labelled `istio.io/dataplane-mode: none` (a waypoint is never captured: it speaks
//! HBONE itself).
//!
//! [`objects`] is pure; [`Deployer`] server-side-applies what it says whenever it
//! changes, with field manager `ambit-control`, so what users add to the objects is
//! kept.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use crate::gateway::{waypoint_listener, Gateway, WAYPOINT_CLASS};
use crate::resources::{ObjectKey, Resources};
use crate::translate::waypoints::SERVICE_ACCOUNT_ANNOTATION;
use crate::translate::GATEWAY_NAME_LABEL;

const FIELD_MANAGER: &str = "ambit-control";

/// How waypoint pods are run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointPods {
    /// The image of the `waypoint` binary.
    pub image: String,
    /// Where the waypoint reaches the control plane (CA and xDS), `host:port`.
    pub control_plane: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

/// Where a waypoint pod reads its service-account token: projected for the CA's
/// audience (`istio-ca`, what the control plane's TokenReview asks for) and rotated
/// by the kubelet; the waypoint reads it again for every request.
pub const TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";

/// Where a waypoint pod reads the mesh root: ConfigMap `istio-ca-root-cert`, which
/// the control plane keeps in every namespace.
pub const ROOT_PATH: &str = "/var/run/secrets/istio/root-cert.pem";

/// The waypoint's ports in its pod: HBONE, metrics, readiness (its flags' defaults).
pub const PORTS: [(&str, u16); 3] = [("mesh", 15008), ("metrics", 15020), ("status-port", 15021)];

/// One object to apply: its kind and its applied configuration.
pub type Applied = (&'static str, ObjectKey, Value);

/// The objects every valid waypoint Gateway of `resources` needs, in apply order.
pub fn objects(resources: &Resources, pods: &WaypointPods) -> Vec<Applied> {
    let mut out = Vec::new();
    for (key, gateway) in &resources.gateways {
        if gateway.spec.gateway_class_name != WAYPOINT_CLASS || waypoint_listener(gateway).is_err()
        {
            continue;
        }
        // Without a uid the owner reference would be refused; the watcher always has
        // one for an object the API server holds.
        let Some(uid) = gateway.metadata.uid.as_deref() else {
            continue;
        };
        out.extend(for_gateway(key, gateway, uid, pods));
    }
    out
}

fn for_gateway(key: &ObjectKey, gateway: &Gateway, uid: &str, pods: &WaypointPods) -> Vec<Applied> {
    let name = key.name.as_str();
    let account = gateway
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_ACCOUNT_ANNOTATION))
        .filter(|s| !s.is_empty())
        .map_or(name, String::as_str);
    let labels = json!({ GATEWAY_NAME_LABEL: name });
    let metadata = |object_name: &str| {
        json!({
            "name": object_name,
            "namespace": key.namespace,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "name": name,
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        })
    };
    let service_account = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(account),
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name),
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [
                {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"},
                {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
            ],
        },
    });
    let pod_labels = json!({ GATEWAY_NAME_LABEL: name, "istio.io/dataplane-mode": "none" });
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name),
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                // Scraped like ztunnel (deploy/observability/prometheus-scrape.yaml).
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": "15020",
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": account,
                    "containers": [{
                        "name": "waypoint",
                        "image": pods.image,
                        "ports": PORTS.iter().map(|(name, port)| json!({
                            "name": name, "containerPort": port, "protocol": "TCP",
                        })).collect::<Vec<_>>(),
                        // Exactly the variables the waypoint's flags read
                        // (`waypoint/src/config.rs`; `tests/tests/waypoint_deploy.rs`
                        // parses them with its parser).
                        "env": [
                            {"name": "AMBIT_GATEWAY", "value": format!("{}/{name}", key.namespace)},
                            {"name": "AMBIT_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
                            {"name": "AMBIT_TRUST_DOMAIN", "value": pods.trust_domain},
                            {"name": "AMBIT_CONTROL_ADDRESS", "value": pods.control_plane},
                            {"name": "AMBIT_CA_ROOT", "value": ROOT_PATH},
                            {"name": "AMBIT_TOKEN_FILE", "value": TOKEN_PATH},
                            {"name": "INSTANCE_IP", "valueFrom": field("status.podIP")},
                        ],
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz/ready", "port": 15021},
                            "periodSeconds": 2,
                        },
                        "volumeMounts": [
                            {"name": "istio-token", "mountPath": parent(TOKEN_PATH), "readOnly": true},
                            {"name": "istiod-ca-cert", "mountPath": parent(ROOT_PATH), "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": crate::token_review::AUDIENCE,
                            "expirationSeconds": 43200,
                            "path": file_name(TOKEN_PATH),
                        }}]}},
                        {"name": "istiod-ca-cert", "configMap": {
                            "name": crate::cluster_ca::ROOT_CONFIGMAP,
                        }},
                    ],
                },
            },
        },
    });
    vec![
        (
            "ServiceAccount",
            ObjectKey::new(&key.namespace, account),
            service_account,
        ),
        ("Service", key.clone(), service),
        ("Deployment", key.clone(), deployment),
    ]
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("/", |(dir, _)| dir)
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, file)| file)
}

/// Applies what [`objects`] says, remembering what it applied so an unchanged object
/// is not applied again.
pub struct Deployer {
    client: Client,
    applied: BTreeMap<(&'static str, ObjectKey), Value>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("applied", &self.applied.len())
            .finish_non_exhaustive()
    }
}

impl Deployer {
    pub fn new(client: Client) -> Self {
        Deployer {
            client,
            applied: BTreeMap::new(),
        }
    }

    /// Applies each of `wanted` that changed; a failure is logged and retried on the
    /// next update. Objects no longer wanted are left to the Gateway's owner reference
    /// (deleting a Gateway deletes them).
    pub async fn update(&mut self, wanted: Vec<Applied>) {
        let keep: Vec<(&'static str, ObjectKey)> =
            wanted.iter().map(|(k, o, _)| (*k, o.clone())).collect();
        self.applied.retain(|k, _| keep.contains(k));
        for (kind, key, body) in wanted {
            if self.applied.get(&(kind, key.clone())) == Some(&body) {
                continue;
            }
            match self.apply(kind, &key, &body).await {
                Ok(()) => {
                    tracing::info!(%kind, object = %key, "waypoint object applied");
                    self.applied.insert((kind, key), body);
                }
                Err(e) => {
                    tracing::warn!(%kind, object = %key, error = %e, "cannot apply the waypoint object")
                }
            }
        }
    }

    async fn apply(&self, kind: &str, key: &ObjectKey, body: &Value) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(body);
        match kind {
            "ServiceAccount" => {
                Api::<ServiceAccount>::namespaced(self.client.clone(), &key.namespace)
                    .patch(&key.name, &params, &patch)
                    .await?;
            }
            "Service" => {
                Api::<Service>::namespaced(self.client.clone(), &key.namespace)
                    .patch(&key.name, &params, &patch)
                    .await?;
            }
            _ => {
                Api::<Deployment>::namespaced(self.client.clone(), &key.namespace)
                    .patch(&key.name, &params, &patch)
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waypoint_gets_an_account_a_service_and_a_deployment_owned_by_its_gateway() {
        let mut resources = Resources::default();
        for yaml in [
            "metadata: {name: waypoint, namespace: shop, uid: u-1}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}",
            "metadata: {name: other, namespace: shop, uid: u-2, annotations: {gateway.istio.io/service-account: wp-sa}}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}",
            // Not a waypoint's shape, or not the class: nothing to run.
            "metadata: {name: broken, namespace: shop, uid: u-3}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: http, port: 80, protocol: HTTP}]}",
            "metadata: {name: ingress, namespace: shop, uid: u-4}\nspec: {gatewayClassName: other, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}",
        ] {
            let g: Gateway = serde_yaml_ng::from_str(yaml).unwrap();
            resources.insert(crate::resources::Object::Gateway(Box::new(g)));
        }
        let pods = WaypointPods {
            image: "ambit/waypoint:test".into(),
            control_plane: "ambit-control.ambit-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
        };
        let objects = objects(&resources, &pods);
        let names: Vec<String> = objects.iter().map(|(k, o, _)| format!("{k} {o}")).collect();
        assert_eq!(
            names,
            [
                "ServiceAccount shop/wp-sa",
                "Service shop/other",
                "Deployment shop/other",
                "ServiceAccount shop/waypoint",
                "Service shop/waypoint",
                "Deployment shop/waypoint",
            ]
        );
        let deployment = &objects[5].2;
        assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            deployment["metadata"]["labels"][GATEWAY_NAME_LABEL],
            "waypoint"
        );
        let template = &deployment["spec"]["template"];
        assert_eq!(
            template["metadata"]["labels"]["istio.io/dataplane-mode"],
            "none"
        );
        assert_eq!(template["spec"]["serviceAccountName"], "waypoint");
        let service = &objects[4].2;
        let ports: Vec<i64> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_i64().unwrap())
            .collect();
        assert_eq!(ports, [15008, 15021]);
        assert!(objects[1].2["spec"]["template"].is_null());
        assert_eq!(
            objects[2].2["spec"]["template"]["spec"]["serviceAccountName"],
            "wp-sa"
        );
    }
}
