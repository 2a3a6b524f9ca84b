//! Waypoints (reference §3.1, §3.2): which Gateways are waypoints, what binds to
//! them, the policies attached to them, and the status each object should carry. Pure:
//! the objects in, the bindings and conditions out. The control plane's translation
//! and `ambitctl local status` (what each local waypoint serves) both read bindings
//! here, so they cannot disagree.
//!
//! - A Gateway of class `istio-waypoint` with one listener on 15008, protocol HBONE, is
//!   a waypoint; any other listener shape gets listener `Accepted=False`
//!   (`UnsupportedProtocol`) and binds nothing.
//! - Its identity is its pods' service account: annotation
//!   `gateway.istio.io/service-account`, else the Gateway's name. Its pods carry label
//!   `gateway.networking.k8s.io/gateway-name`; its address is the VIP of the Service
//!   named like it. It is ready (`Programmed=True`, `status.addresses` set) once one of
//!   its pods running as its identity is ready.
//! - Binding (`istio.io/use-waypoint`, `-namespace`): the object's own label, else its
//!   namespace's; `none` opts out; a waypoint's own pods and Service are never bound.
//!   A binding across namespaces must be admitted by the listener's
//!   `allowedRoutes.namespaces` (`Same` by default), else `AttachmentDenied`. A Service
//!   binding needs `waypoint-for` service or all, a pod binding workload or all; an
//!   explicit label that does not fit is `UnsupportedTrafficType`, an inherited one is
//!   silently not a binding.
//! - A binding to a waypoint that is not ready stays a binding (condition
//!   `WaypointIsNotReady`): ztunnel refuses its traffic, naming the waypoint, rather
//!   than sending it around (decision record 0011). A waypoint that does not exist, is
//!   invalid, or has no Service address binds nothing, and the object says why.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambit_core::model::{WaypointAddress, WaypointFor, WaypointSpec};
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use crate::gateway::{
    selector_matches, waypoint_listener, AdmittedNamespaces, Listener, WAYPOINT_CLASS,
    WAYPOINT_FOR_LABEL,
};
use crate::resources::{ObjectKey, Resources};

/// The label that binds a pod, service or namespace to a waypoint (`none`: to none).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The namespace of that waypoint, when it is not the object's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// The label a Gateway's (a waypoint's) own pods and service carry.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// The annotation naming a waypoint's service account, when not the Gateway's name.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "gateway.istio.io/service-account";
/// The Service condition of a binding.
pub const WAYPOINT_BOUND: &str = "istio.io/WaypointBound";
/// The AuthorizationPolicy condition of a `targetRefs` policy.
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";

/// A status condition: its status, Istio's (or Gateway API's) reason, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
    /// False only until the cluster has done its part: the waypoint's Service (which
    /// the control plane makes) has its cluster IP, or its pod is ready. What the
    /// objects as written say is fine; `ambitctl analyze` offline leaves it alone.
    pub pending: bool,
}

impl Condition {
    pub fn new(status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Condition {
            status,
            reason,
            message: message.into(),
            pending: false,
        }
    }

    /// A false condition that only waits for the cluster (see [`Condition::pending`]).
    pub fn pending(reason: &'static str, message: impl Into<String>) -> Self {
        Condition {
            pending: true,
            ..Condition::new(false, reason, message)
        }
    }
}

/// What the waypoint objects should carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaypointStatus {
    /// Service or ServiceEntry, key, condition `istio.io/WaypointBound`.
    pub bound: Vec<(&'static str, ObjectKey, Condition)>,
    pub gateways: Vec<(ObjectKey, GatewayStatus)>,
    /// `targetRefs` AuthorizationPolicies: condition `WaypointAccepted`.
    pub policies: Vec<(ObjectKey, Condition)>,
}

/// A waypoint Gateway's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayStatus {
    pub accepted: Condition,
    pub programmed: Condition,
    /// Each listener's name, `Accepted` and `Programmed`.
    pub listeners: Vec<(String, Condition, Condition)>,
    /// `status.addresses` (a Hostname), once it is ready.
    pub hostname: Option<String>,
}

/// The Gateways of class `istio-waypoint`, read once per translation.
#[derive(Debug, Default)]
pub struct Gateways<'a> {
    by_key: BTreeMap<ObjectKey, Waypoint<'a>>,
}

#[derive(Debug)]
struct Waypoint<'a> {
    listener: Result<&'a Listener, &'static str>,
    listener_names: Vec<String>,
    traffic_type: WaypointFor,
    service_account: String,
    address: Option<IpAddr>,
    ready: bool,
}

/// Which traffic a binding is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// A Service's or ServiceEntry's (its VIP).
    Service,
    /// A pod's (its own IP).
    Workload,
}

/// The outcome of an object's waypoint labels.
#[derive(Debug, Default)]
pub struct Binding {
    pub waypoint: Option<WaypointAddress>,
    /// `istio.io/WaypointBound`; none when the object asks for no waypoint.
    pub condition: Option<Condition>,
}

impl<'a> Gateways<'a> {
    pub fn index(resources: &'a Resources) -> Gateways<'a> {
        let mut by_key = BTreeMap::new();
        for (key, gateway) in &resources.gateways {
            if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
                continue;
            }
            let class_labels = resources
                .gateway_classes
                .get(WAYPOINT_CLASS)
                .and_then(|c| c.metadata.labels.as_ref());
            let traffic_type = [gateway.metadata.labels.as_ref(), class_labels]
                .into_iter()
                .flatten()
                .find_map(|l| l.get(WAYPOINT_FOR_LABEL))
                .map_or(WaypointFor::Service, |v| parse_traffic_type(v));
            let service_account = gateway
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SERVICE_ACCOUNT_ANNOTATION))
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| key.name.clone());
            let address = resources
                .services
                .get(key)
                .and_then(|s| s.spec.as_ref())
                .and_then(|spec| {
                    spec.cluster_ips
                        .iter()
                        .flatten()
                        .chain(spec.cluster_ip.as_ref())
                        .find_map(|ip| ip.parse::<IpAddr>().ok())
                });
            let ready = crate::resources::in_namespace(&resources.pods, &key.namespace)
                .any(|(_, pod)| is_ready_pod_of(pod, &key.name, &service_account));
            by_key.insert(
                key.clone(),
                Waypoint {
                    listener: waypoint_listener(gateway),
                    listener_names: gateway
                        .spec
                        .listeners
                        .iter()
                        .map(|l| l.name.clone())
                        .collect(),
                    traffic_type,
                    service_account,
                    address,
                    ready,
                },
            );
        }
        Gateways { by_key }
    }

    /// Whether `pod` (in `namespace`) is a pod of a valid waypoint: it then listens
    /// on 15008 itself.
    pub fn owns_pod(&self, namespace: &str, pod: &Pod) -> bool {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_NAME_LABEL))
            .and_then(|name| self.by_key.get(&ObjectKey::new(namespace, name)))
            .is_some_and(|w| w.listener.is_ok())
    }

    /// The binding of the object `key` with `labels`, for `traffic`.
    pub fn bind(
        &self,
        resources: &Resources,
        key: &ObjectKey,
        labels: Option<&BTreeMap<String, String>>,
        traffic: Traffic,
    ) -> Binding {
        // A waypoint's own pods (labelled) and Service (named like it) are never bound.
        let own_service = traffic == Traffic::Service && self.by_key.contains_key(key);
        if own_service || labels.is_some_and(|l| l.contains_key(GATEWAY_NAME_LABEL)) {
            return Binding::default();
        }
        let namespace_labels = resources
            .namespaces
            .get(&key.namespace)
            .and_then(|n| n.metadata.labels.as_ref());
        let own = labels.filter(|l| l.contains_key(USE_WAYPOINT_LABEL));
        let explicit = own.is_some();
        let Some(chosen) = own.or(namespace_labels.filter(|l| l.contains_key(USE_WAYPOINT_LABEL)))
        else {
            return Binding::default();
        };
        let name = chosen[USE_WAYPOINT_LABEL].as_str();
        if name.is_empty() || name == "none" {
            return Binding::default();
        }
        let namespace = chosen
            .get(USE_WAYPOINT_NAMESPACE_LABEL)
            .map_or(key.namespace.as_str(), String::as_str);
        let waypoint_key = ObjectKey::new(namespace, name);
        let not_bound = |reason, message: String| Binding {
            waypoint: None,
            condition: Some(Condition::new(false, reason, message)),
        };
        let Some(waypoint) = self.by_key.get(&waypoint_key) else {
            return not_bound(
                "WaypointIsNotReady",
                format!("{USE_WAYPOINT_LABEL}={name} names waypoint {waypoint_key}, which does not exist (no Gateway of class {WAYPOINT_CLASS}); not bound until it does"),
            );
        };
        let listener = match waypoint.listener {
            Ok(l) => l,
            Err(why) => {
                return not_bound(
                    "WaypointIsNotReady",
                    format!("waypoint {waypoint_key} is not valid ({why}); not bound"),
                )
            }
        };
        if namespace != key.namespace && !admits(listener, resources, &key.namespace) {
            return not_bound(
                "AttachmentDenied",
                format!("waypoint {waypoint_key} does not admit bindings from namespace {} (its listener's allowedRoutes.namespaces)", key.namespace),
            );
        }
        let serves = match traffic {
            Traffic::Service => waypoint.traffic_type.serves_services(),
            Traffic::Workload => waypoint.traffic_type.serves_workloads(),
        };
        if !serves {
            if !explicit {
                // An inherited binding the waypoint does not serve is simply not one.
                return Binding::default();
            }
            let (what, needs) = match traffic {
                Traffic::Service => ("service", "service or all"),
                Traffic::Workload => ("workload", "workload or all"),
            };
            return not_bound(
                "UnsupportedTrafficType",
                format!("waypoint {waypoint_key} serves {} traffic ({WAYPOINT_FOR_LABEL}); {what} traffic needs {needs}", waypoint.traffic_type.as_str()),
            );
        }
        let Some(address) = waypoint.address else {
            return Binding {
                waypoint: None,
                condition: Some(Condition::pending(
                    "WaypointIsNotReady",
                    format!("waypoint {waypoint_key} has no Service with a cluster IP yet; not bound until it has"),
                )),
            };
        };
        let condition = if waypoint.ready {
            Condition::new(
                true,
                "WaypointAccepted",
                format!("bound to waypoint {waypoint_key}"),
            )
        } else {
            Condition::pending(
                "WaypointIsNotReady",
                format!("bound to waypoint {waypoint_key}, which has no ready pod: its traffic is refused until it has, never sent around it"),
            )
        };
        Binding {
            waypoint: Some(WaypointAddress {
                address,
                hbone_port: ambit_core::hbone::HBONE_PORT,
                name: waypoint_key.name,
                namespace: waypoint_key.namespace,
            }),
            condition: Some(condition),
        }
    }

    /// The model's waypoints (the valid ones), each with the policies attached to it,
    /// and the status of each waypoint Gateway and `targetRefs` policy. `bound` maps a
    /// Service or ServiceEntry key to the waypoint it is bound to.
    pub fn finish(
        &self,
        resources: &Resources,
        bound: &BTreeMap<(&'static str, ObjectKey), ObjectKey>,
        root_namespace: &str,
        status: &mut WaypointStatus,
    ) -> Vec<WaypointSpec> {
        let mut attached: BTreeMap<&ObjectKey, Vec<String>> = BTreeMap::new();
        for (policy_key, policy) in &resources.authorization_policies {
            if policy.unreadable.is_some() {
                continue;
            }
            let refs = target_refs(&policy.spec);
            if refs.is_empty() {
                continue;
            }
            let mut to = Vec::new();
            let mut problems: Vec<(&'static str, String)> = Vec::new();
            for r in refs {
                let target = ObjectKey::new(&policy_key.namespace, &r.name);
                match r.kind.as_str() {
                    "Gateway" => match self.by_key.get_key_value(&target) {
                        Some((k, w)) if w.listener.is_ok() => to.push(k),
                        Some(_) => problems.push((
                            "Invalid",
                            format!("Gateway {target} is not a valid waypoint"),
                        )),
                        None => problems.push((
                            "TargetNotFound",
                            format!("Gateway {target} is not a waypoint (no Gateway of class {WAYPOINT_CLASS} of that name)"),
                        )),
                    },
                    "GatewayClass" if r.name == WAYPOINT_CLASS => {
                        if policy_key.namespace == root_namespace {
                            to.extend(
                                self.by_key
                                    .iter()
                                    .filter(|(_, w)| w.listener.is_ok())
                                    .map(|(k, _)| k),
                            );
                        } else {
                            problems.push((
                                "Invalid",
                                format!("a GatewayClass target applies only from the root namespace {root_namespace}"),
                            ));
                        }
                    }
                    kind @ ("Service" | "ServiceEntry") => {
                        let kind: &'static str = if kind == "Service" {
                            "Service"
                        } else {
                            "ServiceEntry"
                        };
                        match bound.get_key_value(&(kind, target.clone())) {
                            Some((_, w)) => {
                                if let Some((k, _)) = self.by_key.get_key_value(w) {
                                    to.push(k);
                                }
                            }
                            None => problems.push((
                                "NoWaypoint",
                                format!("{kind} {target} is not bound to a waypoint, so no waypoint enforces this policy"),
                            )),
                        }
                    }
                    other => problems.push((
                        "Invalid",
                        format!("a targetRef of kind {other:?} ({}) cannot be a waypoint's", r.name),
                    )),
                }
            }
            to.sort();
            to.dedup();
            for w in &to {
                attached.entry(w).or_default().push(policy_key.to_string());
            }
            let condition = match problems.first() {
                None => Condition::new(
                    true,
                    "Accepted",
                    format!(
                        "attached to waypoint {}",
                        to.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                Some((reason, _)) => Condition::new(
                    false,
                    reason,
                    problems
                        .iter()
                        .map(|(_, m)| m.as_str())
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            };
            status.policies.push((policy_key.clone(), condition));
        }
        let mut specs = Vec::new();
        for (key, w) in &self.by_key {
            status.gateways.push((key.clone(), gateway_status(key, w)));
            if w.listener.is_err() {
                continue;
            }
            let mut policies = attached.remove(key).unwrap_or_default();
            policies.sort();
            policies.dedup();
            specs.push(WaypointSpec {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                traffic_type: w.traffic_type,
                service_account: w.service_account.clone(),
                address: w.address,
                policies,
            });
        }
        specs
    }
}

fn gateway_status(key: &ObjectKey, w: &Waypoint<'_>) -> GatewayStatus {
    match w.listener {
        Err(why) => {
            let rejected = Condition::new(false, "UnsupportedProtocol", why);
            let invalid = Condition::new(false, "Invalid", why);
            GatewayStatus {
                accepted: Condition::new(false, "ListenersNotValid", why),
                programmed: invalid.clone(),
                listeners: w
                    .listener_names
                    .iter()
                    .map(|n| (n.clone(), rejected.clone(), invalid.clone()))
                    .collect(),
                hostname: None,
            }
        }
        Ok(listener) => {
            let programmed = match (w.ready, w.address) {
                (true, Some(_)) => Condition::new(true, "Programmed", "a waypoint pod is ready"),
                (_, None) => Condition::pending(
                    "Pending",
                    format!("no Service {key} with a cluster IP yet"),
                ),
                (false, Some(_)) => Condition::pending(
                    "Pending",
                    format!(
                        "no ready pod with label {GATEWAY_NAME_LABEL}={} running as service account {}",
                        key.name, w.service_account
                    ),
                ),
            };
            GatewayStatus {
                accepted: Condition::new(true, "Accepted", "a waypoint"),
                hostname: programmed
                    .status
                    .then(|| format!("{}.{}.svc.cluster.local", key.name, key.namespace)),
                listeners: vec![(
                    listener.name.clone(),
                    Condition::new(true, "Accepted", "a waypoint listener"),
                    programmed.clone(),
                )],
                programmed,
            }
        }
    }
}

/// A `targetRef`/`targetRefs` entry, as far as attachment reads it.
#[derive(Debug)]
struct TargetRef {
    kind: String,
    name: String,
}

fn target_refs(spec: &Value) -> Vec<TargetRef> {
    let one = spec.get("targetRef").into_iter();
    let many = spec
        .get("targetRefs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    one.chain(many)
        .filter_map(|r| {
            Some(TargetRef {
                kind: r.get("kind")?.as_str()?.to_owned(),
                name: r.get("name")?.as_str()?.to_owned(),
            })
        })
        .collect()
}

/// `istio.io/waypoint-for`; an unknown value reads as the default, `service`.
fn parse_traffic_type(value: &str) -> WaypointFor {
    match value {
        "workload" => WaypointFor::Workload,
        "all" => WaypointFor::All,
        "none" => WaypointFor::None,
        _ => WaypointFor::Service,
    }
}

/// Whether the listener admits a binding from `namespace`.
fn admits(listener: &Listener, resources: &Resources, namespace: &str) -> bool {
    match listener.admitted_namespaces() {
        AdmittedNamespaces::Same => false,
        AdmittedNamespaces::All => true,
        AdmittedNamespaces::Selector(selector) => {
            let empty = BTreeMap::new();
            let labels = resources
                .namespaces
                .get(namespace)
                .and_then(|n| n.metadata.labels.as_ref())
                .unwrap_or(&empty);
            selector_matches(selector, labels)
        }
    }
}

/// Whether `pod` is a ready pod of waypoint `name` running as `service_account`: on a
/// node, with an address, not finished or terminating, not reported unready (a pod
/// without a Ready condition, as in the local directory, counts as ready).
fn is_ready_pod_of(pod: &Pod, name: &str, service_account: &str) -> bool {
    let labelled = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(GATEWAY_NAME_LABEL))
        .is_some_and(|n| n == name);
    let spec = pod.spec.as_ref();
    let account = spec
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let scheduled = spec
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let status = pod.status.as_ref();
    let addressed = status.is_some_and(|s| {
        s.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
            || s.pod_ips.as_ref().is_some_and(|ips| !ips.is_empty())
    });
    let finished = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let unready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status != "True");
    labelled
        && account == service_account
        && scheduled
        && addressed
        && !finished
        && !unready
        && pod.metadata.deletion_timestamp.is_none()
}
