//! The mesh as Ambit's model (`ambit_core::model::MeshConfig`): what ztunnel's model
//! file (and later the control plane) needs to know about the pods and services the
//! local mesh made.

use ambit_core::model::{
    EndpointSpec, MeshConfig, Protocol, ServicePort, ServiceSpec as ModelService, WorkloadSpec,
};

use std::collections::BTreeMap;

use crate::{Pod, Service};

/// A pod as the model sees it.
#[derive(Debug, Clone)]
pub(crate) struct ModelPod<'a> {
    pub pod: &'a Pod,
    pub protocol: Protocol,
}

/// The model of `pods` and `services` (each service with the uids of its endpoints
/// that still exist), in a stable order.
pub(crate) fn export(pods: &[ModelPod<'_>], services: &[(&Service, Vec<String>)]) -> MeshConfig {
    let mut workloads: Vec<WorkloadSpec> = pods
        .iter()
        .map(|p| WorkloadSpec {
            uid: p.pod.uid(),
            name: p.pod.name().to_owned(),
            namespace: p.pod.namespace().to_owned(),
            service_account: p.pod.service_account().to_owned(),
            node: p.pod.node().to_owned(),
            ips: vec![p.pod.ip().into(), p.pod.ip6().into()],
            protocol: p.protocol,
            canonical_name: None,
            canonical_revision: None,
            workload_kind: None,
            workload_name: None,
            healthy: true,
            waypoint: None,
            ambient: p.protocol == ambit_core::model::Protocol::Hbone,
            authorization_policies: Vec::new(),
            labels: Default::default(),
        })
        .collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<ModelService> = services
        .iter()
        .map(|(svc, endpoints)| ModelService {
            name: svc.name().to_owned(),
            namespace: svc.namespace().to_owned(),
            hostname: None,
            vips: vec![svc.vip().into()],
            ports: svc.ports().to_vec(),
            endpoints: endpoints
                .iter()
                .map(|uid| EndpointSpec {
                    workload_uid: uid.clone(),
                    ports: Vec::<ServicePort>::new(),
                })
                .collect(),
            waypoint: None,
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    MeshConfig {
        workloads,
        services,
        ..MeshConfig::default()
    }
}

/// The same mesh as the Kubernetes objects a cluster would hold, multi-document YAML
/// for `ambit-control --local-dir`.
///
/// `declared` are objects a user wrote (`ambitctl local up <dir>`): they are kept, with
/// what a cluster fills in added: a Pod the mesh made gets its node and addresses
/// (`spec.nodeName`, `status.podIPs`) and, once the mesh enrolled it, the redirection
/// annotation the node agent sets; a Service the mesh made gets its VIP
/// (`spec.clusterIP`). Its endpoints come from its selector, in the control plane as in
/// the mesh's rules.
///
/// Pods and services the mesh made without a declared object are written whole: a
/// Namespace per namespace, each Pod with its node and addresses and, for a pod the
/// mesh enrolled, the ambient label and the redirection annotation; each Service with
/// its VIP and an EndpointSlice naming the endpoints that exist.
pub(crate) fn export_kubernetes(
    pods: &[ModelPod<'_>],
    services: &[(&Service, Vec<String>)],
    cluster: &Cluster<'_>,
) -> String {
    let declared = cluster.declared;
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    let mut documents: Vec<Value> = Vec::new();
    let pod_by_uid: BTreeMap<String, &ModelPod<'_>> =
        pods.iter().map(|p| (p.pod.uid(), p)).collect();
    let service_by_key: BTreeMap<String, &Service> =
        services.iter().map(|(s, _)| (s.key(), *s)).collect();
    let pending_by_uid: BTreeMap<String, &(crate::PodSpec, String)> = cluster
        .pending
        .iter()
        .map(|p| (format!("{}/{}", p.0.namespace, p.0.name), p))
        .collect();
    let (mut declared_pods, mut declared_services, mut declared_namespaces) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for object in declared {
        let mut object = object.clone();
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let key = format!("{namespace}/{name}");
        match kind.as_str() {
            "Namespace" => {
                if let Some(labels) = cluster.namespace_labels.get(&name) {
                    object["metadata"]["labels"] = json!(labels);
                }
                declared_namespaces.insert(name);
            }
            "Pod" => {
                if let Some(p) = pod_by_uid.get(&key) {
                    fill_pod(&mut object, p);
                    declared_pods.insert(key);
                } else if let Some((_, node)) = pending_by_uid.get(&key) {
                    object["spec"]["nodeName"] = json!(node);
                    declared_pods.insert(key);
                }
            }
            "Service" => {
                if let Some(service) = service_by_key.get(&key) {
                    object["spec"]["clusterIP"] = json!(service.vip().to_string());
                    object["spec"]["clusterIPs"] = json!([service.vip().to_string()]);
                    declared_services.insert(key);
                }
            }
            _ => {}
        }
        documents.push(object);
    }
    let namespaces: BTreeSet<&str> = pods
        .iter()
        .map(|p| p.pod.namespace())
        .chain(
            cluster
                .pending
                .iter()
                .map(|(spec, _)| spec.namespace.as_str()),
        )
        .chain(services.iter().map(|(s, _)| s.namespace()))
        .chain(cluster.namespace_labels.keys().map(String::as_str))
        .filter(|ns| !declared_namespaces.contains(*ns))
        .collect();
    for namespace in namespaces {
        let mut object =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        if let Some(labels) = cluster.namespace_labels.get(namespace) {
            object["metadata"]["labels"] = json!(labels);
        }
        documents.push(object);
    }
    // Scheduled, not running yet: no addresses.
    for (spec, node) in cluster
        .pending
        .iter()
        .filter(|(spec, _)| !declared_pods.contains(&format!("{}/{}", spec.namespace, spec.name)))
    {
        let service_account = if spec.service_account.is_empty() {
            "default"
        } else {
            spec.service_account.as_str()
        };
        documents.push(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": spec.name,
                "namespace": spec.namespace,
                "labels": spec.labels,
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": service_account,
                "containers": [{"name": "app", "image": "localmesh-app"}],
            },
            "status": {"phase": "Pending"},
        }));
    }
    for p in pods
        .iter()
        .filter(|p| !declared_pods.contains(&p.pod.uid()))
    {
        let mut labels: serde_json::Map<String, Value> = p
            .pod
            .labels()
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        if p.protocol == Protocol::Hbone {
            labels.insert("istio.io/dataplane-mode".into(), "ambient".into());
        }
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": p.pod.name(),
                "namespace": p.pod.namespace(),
                "labels": labels,
                "annotations": {},
            },
            "spec": {
                "serviceAccountName": p.pod.service_account(),
                "containers": [{"name": "app", "image": "localmesh-app"}],
            },
        });
        fill_pod(&mut pod, p);
        documents.push(pod);
    }
    for (service, endpoints) in services
        .iter()
        .filter(|(s, _)| !declared_services.contains(&s.key()))
    {
        documents.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service.name(), "namespace": service.namespace()},
            "spec": {
                "clusterIP": service.vip().to_string(),
                "ports": service.ports().iter().map(|p| json!({
                    "name": format!("p{}", p.port),
                    "port": p.port,
                    "targetPort": p.target_port,
                })).collect::<Vec<_>>(),
            },
        }));
        let listed: Vec<Value> = endpoints
            .iter()
            .filter_map(|uid| pod_by_uid.get(uid))
            .map(|p| {
                json!({
                    "addresses": [p.pod.ip().to_string()],
                    "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": p.pod.name(), "namespace": p.pod.namespace()},
                })
            })
            .collect();
        documents.push(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-localmesh", service.name()),
                "namespace": service.namespace(),
                "labels": {"kubernetes.io/service-name": service.name()},
            },
            "addressType": "IPv4",
            "endpoints": listed,
        }));
    }
    documents
        .iter()
        .map(|d| serde_yaml_ng::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// What the mesh holds besides its pods and services, for [`export_kubernetes`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cluster<'a> {
    /// Objects a user wrote.
    pub declared: &'a [serde_json::Value],
    /// Pods being made (scheduled, with their node), not running yet.
    pub pending: &'a [(crate::PodSpec, String)],
    /// Namespace labels.
    pub namespace_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
}

/// What the cluster sets on a pod it runs: the node, the addresses, and once the node
/// agent has captured its traffic, the redirection annotation.
fn fill_pod(object: &mut serde_json::Value, p: &ModelPod<'_>) {
    use serde_json::json;

    object["spec"]["nodeName"] = json!(p.pod.node());
    object["status"] = json!({
        "phase": "Running",
        "podIP": p.pod.ip().to_string(),
        "podIPs": [{"ip": p.pod.ip().to_string()}, {"ip": p.pod.ip6().to_string()}],
    });
    if p.protocol == Protocol::Hbone {
        if !object["metadata"]["annotations"].is_object() {
            object["metadata"]["annotations"] = json!({});
        }
        object["metadata"]["annotations"]["ambient.istio.io/redirection"] = json!("enabled");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{json, Value};

    use super::*;
    use crate::topology::Netns;

    fn pod(namespace: &str, name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            service_account: name.into(),
            labels: BTreeMap::new(),
            node: "node-b".into(),
            ip: ip.into(),
            ip6: "fd10:2::2".parse().unwrap(),
            netns: Netns::named(format!("am1x0-p-{name}")),
            container_id: "c".into(),
        }
    }

    fn documents(yaml: &str) -> Vec<Value> {
        yaml.split("---\n")
            .map(|d| serde_yaml_ng::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn declared_objects_are_kept_and_filled_in_as_a_cluster_would() {
        let web = pod("shop", "web", [10, 2, 0, 2]);
        let extra = pod("shop", "extra", [10, 2, 0, 3]);
        let service = Service {
            namespace: "shop".into(),
            name: "web".into(),
            vip: [10, 96, 0, 10].into(),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                app_protocol: None,
            }],
        };
        let declared = vec![
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
                   "spec": {"serviceAccountName": "web", "containers": [{"name": "web"}]}}),
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "web", "namespace": "shop"},
                   "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
        ];
        let pods = [
            ModelPod {
                pod: &web,
                protocol: Protocol::Hbone,
            },
            ModelPod {
                pod: &extra,
                protocol: Protocol::Tcp,
            },
        ];
        let cluster = Cluster {
            declared: &declared,
            pending: &[],
            namespace_labels: &BTreeMap::new(),
        };
        let yaml = export_kubernetes(&pods, &[(&service, vec!["shop/web".into()])], &cluster);
        let docs = documents(&yaml);
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        // The declared four, then the undeclared pod; no second Namespace, no
        // EndpointSlice for a declared service (its selector says).
        assert_eq!(kinds, ["Namespace", "Pod", "Service", "ConfigMap", "Pod"]);
        let web = &docs[1];
        assert_eq!(web["spec"]["nodeName"], "node-b");
        assert_eq!(web["status"]["podIP"], "10.2.0.2");
        assert_eq!(web["status"]["podIPs"][1]["ip"], "fd10:2::2");
        assert_eq!(web["metadata"]["labels"]["app"], "web");
        assert_eq!(
            web["metadata"]["annotations"]["ambient.istio.io/redirection"],
            "enabled"
        );
        assert_eq!(docs[2]["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(docs[2]["spec"]["ports"][0]["targetPort"], "http");
        let extra = &docs[4];
        assert_eq!(extra["metadata"]["name"], "extra");
        assert_eq!(extra["status"]["podIP"], "10.2.0.3");
        assert!(extra["metadata"]["annotations"]
            .get("ambient.istio.io/redirection")
            .is_none());
    }
}
