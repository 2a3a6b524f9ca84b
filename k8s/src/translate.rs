//! From Kubernetes objects to Ambit's mesh model: a pure function, tested with golden
//! files (`control/tests/golden/`).
//!
//! Workloads: one per running pod with an address and a node. It speaks HBONE only
//! when all of these hold (DESIGN.md, "Who decides that a pod speaks HBONE"):
//! - the pod, or else its namespace, is labelled `istio.io/dataplane-mode=ambient` (a
//!   pod label `none` opts a pod out of an ambient namespace);
//! - it is not on the host network (those are never enrolled);
//! - its redirection is reported in place: annotation
//!   `ambient.istio.io/redirection: enabled`, which the node agent sets once the pod's
//!   traffic is captured. Until then it is reached in plaintext, so no peer sends HBONE
//!   to a pod that does not listen on 15008.
//!
//! Services: ClusterIP services (one VIP per cluster IP), TCP ports, endpoints from the
//! service's EndpointSlices when it has any (a cluster's controller writes them) and
//! else from its selector over the namespace's pods (the local directory has no
//! controller). A named target port resolves per endpoint: from the EndpointSlice's
//! port, or from the pod's container port of that name.
//!
//! An object that cannot be translated is skipped and reported ([`Skipped`]); the rest
//! of the model is unaffected.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ambit_core::model::{
    EndpointSpec, L7PolicySpec, MeshConfig, PolicyCondition, PolicyScope, PolicySpec, Protocol,
    ServicePort, ServiceSpec, WaypointAddress, WorkloadSpec,
};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::resources::{ObjectKey, Resources};

pub use crate::{authz, peer_authn};
pub mod destination_rules;
pub mod routes;
mod service_entries;
pub use crate::waypoints;

/// The label that enrols a namespace or a pod (`ambient`) or opts a pod out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The annotation the node agent sets once a pod's traffic is captured.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The label an EndpointSlice names its service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The model, and what had to be left out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    pub config: MeshConfig,
    pub skipped: Vec<Skipped>,
    /// Objects kept in the model without something they asked for (a waypoint that
    /// does not exist).
    pub warnings: Vec<Skipped>,
    /// Whether each AuthorizationPolicy and PeerAuthentication is enforced as written
    /// (condition `ZtunnelAccepted`), and each RequestAuthentication by waypoints
    /// (`WaypointAccepted`): kind, key, acceptance.
    pub policy_status: PolicyStatus,
    /// The waypoint Gateways' status, and the waypoint conditions of Services and
    /// `targetRefs` policies.
    pub waypoint_status: waypoints::WaypointStatus,
    /// Each HTTPRoute's status per Service parent.
    pub route_status: routes::RouteStatus,
}

/// Kind, key and acceptance of each security policy (and DestinationRule).
pub type PolicyStatus = Vec<(&'static str, ObjectKey, authz::Acceptance)>;

/// An object left out of the model, and why. Logged by the caller, and later written
/// as a status condition where the object has status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub kind: &'static str,
    pub key: ObjectKey,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.key, self.reason)
    }
}

/// The mesh model of `resources`, with the default root namespace.
pub fn translate(resources: &Resources) -> Translation {
    translate_with(resources, DEFAULT_ROOT_NAMESPACE)
}

/// The mesh model of `resources`; policies in `root_namespace` apply mesh-wide.
pub fn translate_with(resources: &Resources, root_namespace: &str) -> Translation {
    let mut skipped = Vec::new();
    let mut warnings = Vec::new();
    let gateways = waypoints::Gateways::index(resources);
    let mut waypoint_status = waypoints::WaypointStatus::default();
    // Service and ServiceEntry keys → the waypoint each is bound to.
    let mut bound_to = BTreeMap::new();
    let mut bind = |kind: &'static str,
                    key: &ObjectKey,
                    labels: Option<&BTreeMap<String, String>>,
                    waypoint: &mut Option<WaypointAddress>| {
        let traffic = match kind {
            "Pod" => waypoints::Traffic::Workload,
            _ => waypoints::Traffic::Service,
        };
        let binding = gateways.bind(resources, key, labels, traffic);
        if let Some(c) = &binding.condition {
            if c.reason != "WaypointAccepted" {
                warnings.push(Skipped {
                    kind,
                    key: key.clone(),
                    reason: format!("{}: {}", c.reason, c.message),
                });
            }
            if kind != "Pod"
                && !waypoint_status
                    .bound
                    .iter()
                    .any(|(k, o, _)| *k == kind && o == key)
            {
                waypoint_status.bound.push((kind, key.clone(), c.clone()));
            }
        }
        if let (Some(w), true) = (&binding.waypoint, kind != "Pod") {
            bound_to.insert((kind, key.clone()), ObjectKey::new(&w.namespace, &w.name));
        }
        *waypoint = binding.waypoint;
    };
    let mut skip = |kind: &'static str, key: &ObjectKey, reason: String| {
        skipped.push(Skipped {
            kind,
            key: key.clone(),
            reason,
        })
    };
    // Addresses already taken, so the model ztunnel gets is always consistent: of two
    // objects claiming one address, the first (in name order) keeps it.
    let mut addresses = Addresses::default();
    let mut workloads = Vec::new();
    // Pods that became workloads, for the services' endpoints.
    let mut running: BTreeMap<&ObjectKey, &Pod> = BTreeMap::new();
    for (key, pod) in &resources.pods {
        match workload(resources, key, pod) {
            Ok(Some(mut w)) => match addresses.claim(&format!("Pod {}", w.uid), &w.ips, &[], &[]) {
                Ok(()) => {
                    if gateways.owns_pod(&key.namespace, pod) {
                        // A waypoint's pod terminates HBONE itself; it is never
                        // captured (label `istio.io/dataplane-mode: none`).
                        w.protocol = Protocol::Hbone;
                        w.ambient = false;
                    }
                    bind("Pod", key, pod.metadata.labels.as_ref(), &mut w.waypoint);
                    running.insert(key, pod);
                    workloads.push(w);
                }
                Err(reason) => skip("Pod", key, reason),
            },
            Ok(None) => {}
            Err(reason) => skip("Pod", key, reason),
        }
    }
    let mut services = Vec::new();
    for (key, service) in &resources.services {
        match service_spec(resources, &running, key, service) {
            Ok(Some(mut s)) => {
                bind(
                    "Service",
                    key,
                    service.metadata.labels.as_ref(),
                    &mut s.waypoint,
                );
                let name = format!("{}/{}", s.namespace, s.hostname());
                match addresses.claim(
                    &format!("service {name}"),
                    &[],
                    &s.vips,
                    std::slice::from_ref(&name),
                ) {
                    Ok(()) => services.push(s),
                    Err(reason) => skip("Service", key, reason),
                }
            }
            Ok(None) => {}
            Err(reason) => skip("Service", key, reason),
        }
    }
    for (key, entry) in &resources.service_entries {
        let claimed = service_entries::translate_entry(key, entry, &running).and_then(|m| {
            let ips: Vec<IpAddr> = m.workloads.iter().flat_map(|w| w.ips.clone()).collect();
            let vips: Vec<IpAddr> = m
                .services
                .first()
                .map(|s| s.vips.clone())
                .unwrap_or_default();
            let names: Vec<String> = m
                .services
                .iter()
                .map(|s| format!("{}/{}", s.namespace, s.hostname()))
                .collect();
            addresses
                .claim(&format!("ServiceEntry {key}"), &ips, &vips, &names)
                .map(|()| m)
        });
        match claimed {
            Ok(mut m) => {
                for s in &mut m.services {
                    bind(
                        "ServiceEntry",
                        key,
                        entry.metadata.labels.as_ref(),
                        &mut s.waypoint,
                    );
                }
                workloads.extend(m.workloads);
                services.extend(m.services);
            }
            Err(reason) => skip("ServiceEntry", key, reason),
        }
    }
    let (policies, l7_policies, mut policy_status) =
        attach_policies(resources, &running, &mut workloads, root_namespace);
    // RequestAuthentication: for waypoints only, attached like L7 policies.
    let mut request_authns = Vec::new();
    for (key, ra) in &resources.request_authentications {
        let t = crate::request_authn::translate(key, ra, root_namespace);
        if !t.acceptance.accepted {
            warnings.push(Skipped {
                kind: "RequestAuthentication",
                key: key.clone(),
                reason: format!("{}: {}", t.acceptance.reason, t.acceptance.message),
            });
        }
        policy_status.push(("RequestAuthentication", key.clone(), t.acceptance));
        request_authns.extend(t.spec);
    }
    let waypoints = gateways.finish(resources, &bound_to, root_namespace, &mut waypoint_status);
    let routes = routes::translate(resources, &services);
    skipped.extend(routes.skipped);
    warnings.extend(routes.warnings);
    let http_routes = routes.routes;
    let rules = destination_rules::translate(resources, &services);
    skipped.extend(rules.skipped);
    warnings.extend(rules.warnings);
    policy_status.extend(
        rules
            .status
            .into_iter()
            .map(|(key, a)| ("DestinationRule", key, a)),
    );
    Translation {
        config: MeshConfig {
            workloads,
            services,
            policies,
            l7_policies,
            waypoints,
            http_routes,
            destination_rules: rules.rules,
            request_authns,
        },
        skipped,
        warnings,
        policy_status,
        waypoint_status,
        route_status: routes.status,
    }
}

/// The namespace whose policies apply mesh-wide, unless configured otherwise (Istio's
/// default root namespace).
pub use crate::DEFAULT_ROOT_NAMESPACE;

/// Translates every AuthorizationPolicy, and lists each selector policy on the
/// workloads it selects. Pods are found through `running` by namespace, so a policy
/// costs the size of its namespace, not of the cluster. `targetRefs` policies also
/// become the waypoints' L7 policies.
fn attach_policies(
    resources: &Resources,
    running: &BTreeMap<&ObjectKey, &Pod>,
    workloads: &mut [WorkloadSpec],
    root_namespace: &str,
) -> (Vec<PolicySpec>, Vec<L7PolicySpec>, PolicyStatus) {
    let mut policies = Vec::new();
    let mut l7_policies = Vec::new();
    let mut status = Vec::new();
    let index: BTreeMap<String, usize> = workloads
        .iter()
        .enumerate()
        .map(|(i, w)| (w.uid.clone(), i))
        .collect();
    let mut selected: Vec<(usize, String)> = Vec::new();
    for (key, ap) in &resources.authorization_policies {
        let t = authz::translate(key, ap, root_namespace);
        status.push(("AuthorizationPolicy", key.clone(), t.acceptance.clone()));
        if let Some(w) = &t.waypoint {
            l7_policies.push(L7PolicySpec {
                targets: w.targets.clone(),
                policy: w.policy.clone(),
                condition: Some(PolicyCondition {
                    accepted: w.acceptance.accepted,
                    reason: w.acceptance.reason.to_owned(),
                    message: w.acceptance.message.clone(),
                }),
            });
        }
        let scope = match t.scope {
            None => continue,
            Some(authz::Scope::Global) => PolicyScope::Global,
            Some(authz::Scope::Namespace(_)) => PolicyScope::Namespace,
            Some(authz::Scope::Selector { namespace, labels }) => {
                let pods: Box<dyn Iterator<Item = (&&ObjectKey, &&Pod)>> = match &namespace {
                    Some(ns) => Box::new(running.iter().filter(move |(k, _)| k.namespace == *ns)),
                    None => Box::new(running.iter()),
                };
                for (pod_key, pod) in pods {
                    let pod_labels = pod.metadata.labels.as_ref();
                    let matches = labels
                        .iter()
                        .all(|(k, v)| pod_labels.and_then(|l| l.get(k)) == Some(v));
                    if let (true, Some(i)) = (matches, index.get(&pod_key.to_string())) {
                        selected.push((*i, key.to_string()));
                    }
                }
                PolicyScope::WorkloadSelector
            }
        };
        policies.push(PolicySpec {
            scope,
            policy: t.policy,
            condition: Some(PolicyCondition {
                accepted: t.acceptance.accepted,
                reason: t.acceptance.reason.to_owned(),
                message: t.acceptance.message,
            }),
        });
    }
    for (i, policy) in selected {
        workloads[i].authorization_policies.push(policy);
    }
    // PeerAuthentication: a DENY of plaintext where STRICT, per workload.
    let read: Vec<peer_authn::PeerAuthn> = resources
        .peer_authentications
        .iter()
        .map(|(key, pa)| peer_authn::read_object(key, pa))
        .collect();
    for pa in &read {
        status.push(("PeerAuthentication", pa.key.clone(), pa.acceptance.clone()));
    }
    let peer_authns = peer_authn::Index::new(&read, root_namespace);
    if !peer_authns.is_empty() {
        let mut converted: BTreeMap<String, PolicySpec> = BTreeMap::new();
        for (pod_key, pod) in running {
            let Some(i) = index.get(&pod_key.to_string()) else {
                continue;
            };
            let Some(policy) =
                peer_authns.policy_for(&pod_key.namespace, pod.metadata.labels.as_ref())
            else {
                continue;
            };
            let key = policy.key();
            workloads[*i].authorization_policies.push(key.clone());
            converted.entry(key).or_insert(PolicySpec {
                scope: PolicyScope::WorkloadSelector,
                policy,
                condition: None,
            });
        }
        policies.extend(converted.into_values());
    }
    (policies, l7_policies, status)
}

pub use crate::waypoints::{GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL};

/// Workload IPs, service VIPs and service names in use, and by whom.
#[derive(Default)]
struct Addresses {
    ips: BTreeMap<IpAddr, String>,
    names: BTreeMap<String, String>,
}

impl Addresses {
    /// Takes `ips` (workload addresses), `vips` (service addresses, which may be
    /// shared by the services of one claimant) and service `names` for `owner`, or
    /// says which is already taken, taking nothing.
    fn claim(
        &mut self,
        owner: &str,
        ips: &[IpAddr],
        vips: &[IpAddr],
        names: &[String],
    ) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for ip in ips.iter().chain(vips) {
            if let Some(other) = self.ips.get(ip) {
                return Err(format!("address {ip} is already used by {other}"));
            }
            if ips.contains(ip) && !seen.insert(*ip) {
                return Err(format!("address {ip} is listed twice"));
            }
        }
        for name in names {
            if let Some(other) = self.names.get(name) {
                return Err(format!("service {name} is already defined by {other}"));
            }
        }
        for ip in ips.iter().chain(vips) {
            self.ips.insert(*ip, owner.to_owned());
        }
        for name in names {
            self.names.insert(name.clone(), owner.to_owned());
        }
        Ok(())
    }
}

/// The workload of a pod; `None` for a pod that is not (or no longer) running, which
/// is normal and not reported.
fn workload(
    resources: &Resources,
    key: &ObjectKey,
    pod: &Pod,
) -> Result<Option<WorkloadSpec>, String> {
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let node = match spec.node_name.as_deref() {
        Some(node) if !node.is_empty() => node.to_owned(),
        // Not scheduled yet.
        _ => return Ok(None),
    };
    let ips = pod_ips(pod)?;
    if ips.is_empty() {
        // No address yet.
        return Ok(None);
    }
    let labels = pod.metadata.labels.as_ref();
    let label = |name: &str| labels.and_then(|l| l.get(name)).map(String::as_str);
    let annotation = |name: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(name))
            .map(String::as_str)
    };
    let ambient = wants_ambient(resources, key, pod);
    let captured = annotation(REDIRECTION_ANNOTATION) == Some("enabled");
    let protocol = if ambient && captured {
        Protocol::Hbone
    } else {
        Protocol::Tcp
    };
    let (workload_kind, workload_name) = owner(pod);
    let canonical_name = [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .into_iter()
    .find_map(label)
    .map(str::to_owned)
    .or_else(|| workload_name.clone());
    let canonical_revision = [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .into_iter()
    .find_map(label)
    .map(str::to_owned);
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status == "True");
    let terminating = pod.metadata.deletion_timestamp.is_some();
    Ok(Some(WorkloadSpec {
        uid: key.to_string(),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node,
        ips,
        protocol,
        canonical_name,
        canonical_revision,
        workload_kind,
        workload_name,
        // A pod without a Ready condition (as in the local directory) counts as ready.
        healthy: ready.unwrap_or(true) && !terminating,
        // Bound by `translate`, which reports a waypoint it cannot find.
        waypoint: None,
        ambient,
        authorization_policies: Vec::new(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    }))
}

/// Whether the labels ask for `pod` to be captured: its own
/// `istio.io/dataplane-mode` (`ambient`, or `none` to opt out), else its namespace's;
/// never for a pod on the host network. The node agent captures such a pod; it speaks
/// HBONE once that is reported.
pub fn wants_ambient(resources: &Resources, key: &ObjectKey, pod: &Pod) -> bool {
    let own = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str);
    let namespace = resources
        .namespaces
        .get(&key.namespace)
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str);
    let asked = match own {
        Some("ambient") => true,
        Some("none") => false,
        _ => namespace == Some("ambient"),
    };
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    asked && !host_network
}

/// `status.podIPs`, or else `status.podIP`.
fn pod_ips(pod: &Pod) -> Result<Vec<IpAddr>, String> {
    let Some(status) = pod.status.as_ref() else {
        return Ok(Vec::new());
    };
    let listed: Vec<&str> = match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    listed
        .into_iter()
        .map(|ip| {
            ip.parse()
                .map_err(|_| format!("status.podIPs: {ip:?} is not an IP address"))
        })
        .collect()
}

/// The owning workload's kind and name: a ReplicaSet's pods belong to its Deployment
/// (the ReplicaSet's name less the pod-template hash).
fn owner(pod: &Pod) -> (Option<String>, Option<String>) {
    let Some(owner) = pod
        .metadata
        .owner_references
        .as_ref()
        .and_then(|o| o.iter().find(|o| o.controller == Some(true)).or(o.first()))
    else {
        return (None, None);
    };
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match (owner.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => match owner.name.strip_suffix(&format!("-{hash}")) {
            Some(deployment) => (Some("Deployment".into()), Some(deployment.to_owned())),
            None => (Some(owner.kind.clone()), Some(owner.name.clone())),
        },
        _ => (Some(owner.kind.clone()), Some(owner.name.clone())),
    }
}

/// One port of a service as the model needs it, with its name for named lookups.
struct Port {
    name: Option<String>,
    port: u16,
    target: Target,
    app_protocol: Option<String>,
}

enum Target {
    Number(u16),
    Named(String),
}

/// The service's model; `None` for a service without a VIP (headless, ExternalName),
/// which ztunnel has nothing to capture for.
fn service_spec(
    resources: &Resources,
    running: &BTreeMap<&ObjectKey, &Pod>,
    key: &ObjectKey,
    service: &Service,
) -> Result<Option<ServiceSpec>, String> {
    let spec = service.spec.as_ref().ok_or("no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if listed.is_empty() || listed.contains(&"None") {
        return Ok(None);
    }
    let vips = listed
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| format!("spec.clusterIPs: {ip:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {} is out of range", p.port))?;
        let target = match &p.target_port {
            None => Target::Number(port),
            Some(IntOrString::Int(n)) => Target::Number(
                u16::try_from(*n)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("port {port}: targetPort {n} is out of range"))?,
            ),
            Some(IntOrString::String(name)) => match name.parse::<u16>() {
                Ok(n) if n > 0 => Target::Number(n),
                _ => Target::Named(name.clone()),
            },
        };
        ports.push(Port {
            name: p.name.clone(),
            port,
            target,
            app_protocol: app_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
        });
    }
    if ports.is_empty() {
        return Ok(None);
    }
    let slices: Vec<_> = in_namespace(&resources.endpoint_slices, &key.namespace)
        .filter(|(_, s)| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                == Some(&key.name)
        })
        .map(|(_, s)| s)
        .collect();
    let endpoints = if slices.is_empty() {
        selected_endpoints(running, key, service, &ports)
    } else {
        slice_endpoints(running, key, &slices, &ports)
    };
    Ok(Some(ServiceSpec {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        hostname: None,
        vips,
        ports: ports
            .iter()
            .map(|p| ServicePort {
                port: p.port,
                // A named target port resolves per endpoint; this is only a fallback.
                target_port: match p.target {
                    Target::Number(n) => n,
                    Target::Named(_) => p.port,
                },
                app_protocol: p.app_protocol.clone(),
            })
            .collect(),
        endpoints,
        // Bound by `translate`, which reports a waypoint it cannot find.
        waypoint: None,
    }))
}

/// A Service port's application protocol, lower-case: its `appProtocol`
/// (`kubernetes.io/h2c` read as `http2`), else its name's prefix before a `-` (or the
/// whole name) when that is a protocol Istio knows by name; None: sniff.
fn app_protocol(declared: Option<&str>, name: Option<&str>) -> Option<String> {
    match declared.filter(|d| !d.is_empty()) {
        Some(d) if d.eq_ignore_ascii_case("kubernetes.io/h2c") => Some("http2".into()),
        Some(d) => Some(d.to_ascii_lowercase()),
        None => name.and_then(name_protocol),
    }
}

/// The protocol a port name declares (`http-web`, `grpc`, `tcp-db`), if any.
pub(crate) fn name_protocol(name: &str) -> Option<String> {
    let prefix = name.split('-').next().unwrap_or(name).to_ascii_lowercase();
    ["http", "http2", "grpc", "tcp", "https", "tls"]
        .contains(&prefix.as_str())
        .then_some(prefix)
}

pub(crate) use crate::resources::in_namespace;

/// Endpoints from the service's selector over the running pods of its namespace. A pod
/// that lacks a named target port is not an endpoint.
fn selected_endpoints(
    running: &BTreeMap<&ObjectKey, &Pod>,
    key: &ObjectKey,
    service: &Service,
    ports: &[Port],
) -> Vec<EndpointSpec> {
    let Some(selector) = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
    else {
        return Vec::new();
    };
    let mut endpoints = Vec::new();
    'pods: for (pod_key, pod) in in_namespace(running, &key.namespace) {
        let labels = pod.metadata.labels.as_ref();
        if !selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        {
            continue;
        }
        let mut named = Vec::new();
        for port in ports {
            if let Target::Named(name) = &port.target {
                match container_port(pod, name) {
                    Some(target_port) => named.push(ServicePort {
                        port: port.port,
                        target_port,
                        app_protocol: None,
                    }),
                    None => continue 'pods,
                }
            }
        }
        endpoints.push(EndpointSpec {
            workload_uid: pod_key.to_string(),
            ports: named,
        });
    }
    endpoints
}

/// The TCP container port of `pod` named `name`.
fn container_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name)
                && p.protocol.as_deref().is_none_or(|proto| proto == "TCP")
        })
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// Endpoints from EndpointSlices: the ready pod endpoints that are running workloads,
/// named target ports resolved from the slice's ports.
fn slice_endpoints(
    running: &BTreeMap<&ObjectKey, &Pod>,
    key: &ObjectKey,
    slices: &[&k8s_openapi::api::discovery::v1::EndpointSlice],
    ports: &[Port],
) -> Vec<EndpointSpec> {
    let mut endpoints = BTreeMap::new();
    'slices: for slice in slices {
        let mut named = Vec::new();
        for port in ports {
            if matches!(port.target, Target::Named(_)) {
                // The slice's port of the same name as the service port carries the
                // resolved number.
                let resolved = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name == port.name)
                    .and_then(|p| p.port)
                    .and_then(|n| u16::try_from(n).ok());
                match resolved {
                    Some(target_port) => named.push(ServicePort {
                        port: port.port,
                        target_port,
                        app_protocol: None,
                    }),
                    None => continue 'slices,
                }
            }
        }
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(target) = endpoint
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
            else {
                continue;
            };
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let pod_key = ObjectKey::new(
                target.namespace.as_deref().unwrap_or(&key.namespace),
                target.name.as_deref().unwrap_or_default(),
            );
            if running.contains_key(&pod_key) {
                endpoints.insert(
                    pod_key.to_string(),
                    EndpointSpec {
                        workload_uid: pod_key.to_string(),
                        ports: named.clone(),
                    },
                );
            }
        }
    }
    endpoints.into_values().collect()
}
