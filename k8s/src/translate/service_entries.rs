//! ServiceEntries into the model, as Istio's ambient mode reads them:
//!
//! - one service per host, `<namespace>/<host>`, with the entry's `addresses` as VIPs
//!   (single IPs; a /32 or /128 counts as one) and its TCP-carried ports (every
//!   protocol but UDP);
//! - endpoints: the inline `endpoints` with an IP address, each a workload outside the
//!   mesh (no node, plaintext, its `serviceAccount` or `default`), its `ports` map
//!   overriding a port's target by name; or, with `workloadSelector`, the running pods
//!   of the entry's namespace whose labels match;
//! - `resolution: NONE` with neither endpoints nor a selector keeps the traffic on its
//!   original destination: nothing is added, so nothing is captured.
//!
//! What ztunnel cannot do yet is reported and the entry skipped: wildcard hosts,
//! address ranges, DNS resolution of host names (`DNS` or `DNS_ROUND_ROBIN` without IP
//! endpoints), entries without addresses (no address allocation).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambit_core::model::{EndpointSpec, Protocol, ServicePort, ServiceSpec, WorkloadSpec};
use k8s_openapi::api::core::v1::Pod;

use crate::resources::ObjectKey;
use crate::service_entry::ServiceEntry;

/// What one ServiceEntry adds to the model.
#[derive(Debug, Default)]
pub(super) struct EntryModel {
    pub workloads: Vec<WorkloadSpec>,
    pub services: Vec<ServiceSpec>,
}

/// The entry's services and inline workloads, or why it is skipped.
pub(super) fn translate_entry(
    key: &ObjectKey,
    entry: &ServiceEntry,
    running: &BTreeMap<&ObjectKey, &Pod>,
) -> Result<EntryModel, String> {
    let spec = &entry.spec;
    if spec.hosts.is_empty() {
        return Err("spec.hosts is required".into());
    }
    if let Some(host) = spec.hosts.iter().find(|h| h.contains('*')) {
        return Err(format!(
            "host {host:?}: wildcard hosts need DNS-based capture, which ztunnel does not do yet"
        ));
    }
    let resolution = spec.resolution.as_deref().unwrap_or("NONE");
    if !matches!(resolution, "NONE" | "STATIC" | "DNS" | "DNS_ROUND_ROBIN") {
        return Err(format!(
            "resolution {resolution:?} is not one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"
        ));
    }
    let vips = spec
        .addresses
        .iter()
        .map(|a| vip(a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if p.protocol
            .as_deref()
            .is_some_and(|proto| proto.eq_ignore_ascii_case("UDP"))
        {
            continue;
        }
        let number = port_number(p.number)
            .ok_or_else(|| format!("ports[{i}].number {} is out of range", p.number))?;
        let target = match p.target_port {
            None | Some(0) => number,
            Some(t) => port_number(t)
                .ok_or_else(|| format!("ports[{i}].targetPort {t} is out of range"))?,
        };
        ports.push((
            p.name.clone(),
            ServicePort {
                port: number,
                target_port: target,
                app_protocol: p
                    .protocol
                    .as_deref()
                    .map(str::to_ascii_lowercase)
                    .or_else(|| p.name.as_deref().and_then(super::name_protocol)),
            },
        ));
    }

    let mut model = EntryModel::default();
    let mut endpoints = Vec::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        let address = e.address.as_deref().unwrap_or("");
        let ip: IpAddr = match address.parse() {
            Ok(ip) => ip,
            Err(_) if address.starts_with("unix://") => {
                return Err(format!("endpoints[{i}]: unix socket address {address:?} cannot be reached over the network"))
            }
            Err(_) => {
                return Err(format!(
                    "endpoints[{i}]: address {address:?} is not an IP address; resolving host names (resolution {resolution}) is not supported by ztunnel yet"
                ))
            }
        };
        let uid = format!("ServiceEntry/{}/{}/{ip}", key.namespace, key.name);
        let mut overrides = Vec::new();
        for (name, port) in &e.ports {
            let Some((_, service_port)) = ports.iter().find(|(n, _)| n.as_deref() == Some(name))
            else {
                return Err(format!(
                    "endpoints[{i}].ports: {name:?} names no port of the entry"
                ));
            };
            let target_port = port_number(*port)
                .ok_or_else(|| format!("endpoints[{i}].ports.{name}: {port} is out of range"))?;
            overrides.push(ServicePort {
                port: service_port.port,
                target_port,
                app_protocol: None,
            });
        }
        model.workloads.push(WorkloadSpec {
            uid: uid.clone(),
            name: format!("{}-{ip}", key.name),
            namespace: key.namespace.clone(),
            service_account: e
                .service_account
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            // Outside the cluster's nodes, spoken to in plaintext.
            node: String::new(),
            ips: vec![ip],
            protocol: Protocol::Tcp,
            canonical_name: e
                .labels
                .get("app")
                .cloned()
                .or_else(|| Some(key.name.clone())),
            canonical_revision: e.labels.get("version").cloned(),
            workload_kind: Some("ServiceEntry".into()),
            workload_name: Some(key.name.clone()),
            healthy: true,
            waypoint: None,
            // Outside the mesh: no node agent captures it.
            ambient: false,
            authorization_policies: Vec::new(),
            labels: Default::default(),
        });
        endpoints.push(EndpointSpec {
            workload_uid: uid,
            ports: overrides,
        });
    }
    if let Some(selector) = &spec.workload_selector {
        if !spec.endpoints.is_empty() {
            return Err("endpoints and workloadSelector are mutually exclusive".into());
        }
        for (pod_key, pod) in super::in_namespace(running, &key.namespace) {
            let labels = pod.metadata.labels.as_ref();
            if selector
                .labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            {
                endpoints.push(EndpointSpec {
                    workload_uid: pod_key.to_string(),
                    ports: Vec::new(),
                });
            }
        }
    }
    let has_endpoints = !spec.endpoints.is_empty() || spec.workload_selector.is_some();
    if !has_endpoints {
        match resolution {
            // Traffic keeps its original destination: nothing to capture.
            "NONE" => return Ok(model),
            "STATIC" => return Err("resolution STATIC needs endpoints or a workloadSelector".into()),
            _ => {
                return Err(format!(
                    "resolution {resolution} of hosts {:?}: resolving host names is not supported by ztunnel yet",
                    spec.hosts
                ))
            }
        }
    }
    if vips.is_empty() {
        return Err("spec.addresses is empty: without address allocation, an entry needs addresses for ztunnel to capture its traffic".into());
    }
    if spec.hosts.len() > 1 {
        return Err(format!(
            "hosts {:?} would share addresses {:?}, but an address leads to one service: use one host per ServiceEntry",
            spec.hosts, spec.addresses
        ));
    }
    for host in &spec.hosts {
        model.services.push(ServiceSpec {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            hostname: Some(host.clone()),
            vips: vips.clone(),
            ports: ports.iter().map(|(_, p)| p.clone()).collect(),
            endpoints: endpoints.clone(),
            waypoint: None,
        });
    }
    Ok(model)
}

/// An address of `spec.addresses`: an IP, or a range of exactly one.
fn vip(address: &str) -> Result<IpAddr, String> {
    let (ip, prefix) = match address.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (address, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("addresses: {address:?} is not an IP address"))?;
    let single = if ip.is_ipv4() { "32" } else { "128" };
    match prefix {
        None => Ok(ip),
        Some(p) if p == single => Ok(ip),
        Some(_) => Err(format!(
            "addresses: {address:?} is a range; only single addresses can be VIPs"
        )),
    }
}

fn port_number(n: u32) -> Option<u16> {
    u16::try_from(n).ok().filter(|n| *n > 0)
}
