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
