//! The mesh as Ambit's model (`ambit_core::model::MeshConfig`): what ztunnel's model
//! file (and later the control plane) needs to know about the pods and services the
//! local mesh made.

use ambit_core::model::{
    EndpointSpec, MeshConfig, Protocol, ServicePort, ServiceSpec as ModelService, WorkloadSpec,
};

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
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    MeshConfig {
        workloads,
        services,
    }
}

/// The same mesh as the Kubernetes objects a cluster would hold, multi-document YAML
/// for `ambit-control --local-dir`: a Namespace per pod namespace, each Pod with the
/// node and addresses the local mesh gave it (`spec.nodeName`, `status.podIPs`), and,
/// for a pod the mesh enrolled, the ambient label and the redirection annotation the
/// node agent sets once its traffic is captured; each Service with its VIP and an
/// EndpointSlice naming the endpoints that exist.
pub(crate) fn export_kubernetes(
    pods: &[ModelPod<'_>],
    services: &[(&Service, Vec<String>)],
) -> String {
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    let mut documents: Vec<Value> = Vec::new();
    let namespaces: BTreeSet<&str> = pods
        .iter()
        .map(|p| p.pod.namespace())
        .chain(services.iter().map(|(s, _)| s.namespace()))
        .collect();
    for namespace in namespaces {
        documents.push(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        );
    }
    let mut by_uid = std::collections::BTreeMap::new();
    for p in pods {
        by_uid.insert(p.pod.uid(), p.pod);
        let mut labels: serde_json::Map<String, Value> = p
            .pod
            .labels()
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let mut annotations = serde_json::Map::new();
        if p.protocol == Protocol::Hbone {
            labels.insert("istio.io/dataplane-mode".into(), "ambient".into());
            annotations.insert("ambient.istio.io/redirection".into(), "enabled".into());
        }
        documents.push(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": p.pod.name(),
                "namespace": p.pod.namespace(),
                "labels": labels,
                "annotations": annotations,
            },
            "spec": {
                "nodeName": p.pod.node(),
                "serviceAccountName": p.pod.service_account(),
                "containers": [{"name": "app", "image": "localmesh-app"}],
            },
            "status": {
                "phase": "Running",
                "podIP": p.pod.ip().to_string(),
                "podIPs": [{"ip": p.pod.ip().to_string()}, {"ip": p.pod.ip6().to_string()}],
            },
        }));
    }
    for (service, endpoints) in services {
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
            .filter_map(|uid| by_uid.get(uid))
            .map(|pod| {
                json!({
                    "addresses": [pod.ip().to_string()],
                    "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": pod.name(), "namespace": pod.namespace()},
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
