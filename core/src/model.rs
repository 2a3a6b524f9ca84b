//! The mesh model ztunnel works from: workloads (pods) and services, indexed for the
//! lookups traffic needs (by IP, by VIP). It is built once per config change from
//! whatever source supplies it (a local YAML file now, xDS later) and then only read.
//!
//! The YAML form (`MeshConfig`) is Ambit's own model format, camelCase:
//!
//! ```yaml
//! workloads:
//! - uid: shop/cart-7d9f
//!   name: cart-7d9f
//!   namespace: shop
//!   serviceAccount: cart
//!   node: node-a
//!   ips: [10.1.0.5]
//!   protocol: HBONE          # or TCP: not in the mesh, reached in plaintext
//!   canonicalName: cart      # optional, for telemetry
//!   canonicalRevision: v1
//! services:
//! - name: cart
//!   namespace: shop
//!   vips: [10.96.0.10]
//!   ports: [{port: 80, targetPort: 8080}]
//!   endpoints: [{workloadUid: shop/cart-7d9f}]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, SpiffeId, TrustDomain};

/// How a workload is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// Enrolled and listening on 15008: reached over HBONE.
    #[serde(rename = "HBONE")]
    Hbone,
    /// Not in the mesh (or not yet captured): reached in plaintext.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub canonical_name: Option<String>,
    #[serde(default)]
    pub canonical_revision: Option<String>,
    /// Kind and name of the owning workload (e.g. deployment `cart`), for telemetry.
    #[serde(default)]
    pub workload_kind: Option<String>,
    #[serde(default)]
    pub workload_name: Option<String>,
    /// Unhealthy workloads are not picked as service endpoints.
    #[serde(default = "default_true")]
    pub healthy: bool,
    /// The waypoint its inbound traffic is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointAddress>,
    /// Its labels ask for ambient mode, so its node agent captures it; `protocol` is
    /// HBONE only once the agent reports that done.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ambient: bool,
    /// Keys (`namespace/name`) of the selector-scoped authorization policies that
    /// select it; namespace and mesh-wide policies apply without being listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    /// Its pod's labels: what a DestinationRule's subsets select on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// The waypoint proxy a workload's or a service's traffic is bound to (label
/// `istio.io/use-waypoint`): the address of the waypoint's service, its HBONE port, and
/// the Gateway's name and namespace, which name its entry in [`MeshConfig::waypoints`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointAddress {
    pub address: IpAddr,
    #[serde(default = "default_hbone_port")]
    pub hbone_port: u16,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

impl WaypointAddress {
    /// `namespace/name` of the Gateway, the key of its [`WaypointSpec`].
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Which traffic a waypoint serves (label `istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    /// Traffic addressed to a bound Service's VIP.
    #[default]
    Service,
    /// Traffic addressed to a bound workload's own IP.
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn serves_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    pub fn serves_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }

    /// As in the label.
    pub fn as_str(self) -> &'static str {
        match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
            WaypointFor::None => "none",
        }
    }
}

/// A waypoint (a Gateway of class `istio-waypoint`): who it is and what it serves. Its
/// pods are ordinary workloads, the endpoints of its Service (`address`); what is bound
/// to it names it in a [`WaypointAddress`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub traffic_type: WaypointFor,
    /// Its pods' service account: its identity is
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub service_account: String,
    /// Its Service's VIP, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// Keys (`namespace/name`) of the AuthorizationPolicies attached to it with
    /// `targetRefs`: to its Gateway, its class, or a Service bound to it. A
    /// destination bound to a waypoint with any accepts traffic only from the waypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

impl WaypointSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn default_hbone_port() -> u16 {
    crate::hbone::HBONE_PORT
}

fn default_sa() -> String {
    "default".to_string()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    /// The declared application protocol, lower-case (`http`, `http2`, `grpc`, `tcp`,
    /// ...): the port's `appProtocol`, else its name's prefix. None: sniff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    pub workload_uid: String,
    /// Per-endpoint target ports (service port -> target port), for named ports that
    /// resolve differently per pod. Falls back to the service port's targetPort.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    /// Defaults to `<name>.<namespace>.svc.cluster.local`.
    #[serde(default)]
    pub hostname: Option<String>,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// The waypoint traffic to this service is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointAddress>,
}

impl ServiceSpec {
    /// `hostname`, or by default `<name>.<namespace>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", self.name, self.namespace))
    }
}

/// The whole model as a source supplies it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Authorization policies ztunnel enforces on inbound connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicySpec>,
    /// Authorization policies waypoints enforce per request (attached with
    /// `targetRefs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l7_policies: Vec<L7PolicySpec>,
    /// The waypoints of the mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<WaypointSpec>,
    /// HTTPRoutes attached to Services, for the waypoints of those Services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<HttpRouteSpec>,
    /// DestinationRules of Services, for the waypoints that route to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_rules: Vec<crate::destination::DestinationRule>,
    /// RequestAuthentications (JWT) waypoints enforce (attached with `targetRefs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_authns: Vec<RequestAuthnSpec>,
}

/// A RequestAuthentication a waypoint enforces (`ambit_core::jwt`), and what it is
/// attached to: the same kinds of target as an L7 authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthnSpec {
    pub namespace: String,
    pub name: String,
    pub targets: Vec<PolicyTarget>,
    /// Its `jwtRules`; an invalid policy has one rule that refuses every token.
    pub rules: Vec<crate::jwt::JwtRule>,
    /// Whether the waypoint enforces it as written (`WaypointAccepted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<PolicyCondition>,
}

impl RequestAuthnSpec {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// As [`L7PolicySpec::applies_to`].
    pub fn applies_to(&self, waypoint: (&str, &str), service: Option<(&str, &str)>) -> bool {
        targets_apply(&self.targets, waypoint, service)
    }
}

/// An HTTPRoute (Gateway API) attached to Services: the waypoint bound to a parent
/// routes the parent's requests by it instead of balancing over the parent's own
/// endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// The Services it is attached to (`parentRefs` of kind Service).
    pub parents: Vec<RouteParentSpec>,
    pub route: crate::route::HttpRoute,
}

impl HttpRouteSpec {
    /// `HTTPRoute/<namespace>/<name>` (or `GRPCRoute/...`).
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.route.kind(),
            self.route.namespace,
            self.route.name
        )
    }

    /// Whether it applies to requests to `service` (`namespace`, `name`) on `port`.
    pub fn applies_to(&self, service: (&str, &str), port: u16) -> bool {
        self.parents.iter().any(|p| {
            (p.namespace.as_str(), p.name.as_str()) == service && p.port.is_none_or(|q| q == port)
        })
    }
}

/// A Service a route is attached to; no port: all of its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteParentSpec {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// An authorization policy a waypoint enforces, and what it is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7PolicySpec {
    /// Its `targetRefs`; an invalid policy keeps those that are valid.
    pub targets: Vec<PolicyTarget>,
    pub policy: crate::l7::Policy,
    /// Whether the waypoint enforces it as written (the policy's `WaypointAccepted`
    /// condition, before binding is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<PolicyCondition>,
}

impl L7PolicySpec {
    /// Whether a waypoint (`namespace/name` of its Gateway) enforces it for traffic
    /// to `service` (`namespace/name`; `None` for traffic to a workload): attached to
    /// that Gateway, to the `istio-waypoint` class, or to that Service or
    /// ServiceEntry.
    pub fn applies_to(&self, waypoint: (&str, &str), service: Option<(&str, &str)>) -> bool {
        targets_apply(&self.targets, waypoint, service)
    }
}

/// Whether a waypoint (`namespace/name` of its Gateway) enforces what is attached to
/// `targets` for traffic to `service` (`None`: to a workload).
fn targets_apply(
    targets: &[PolicyTarget],
    waypoint: (&str, &str),
    service: Option<(&str, &str)>,
) -> bool {
    targets.iter().any(|t| match t.kind {
        TargetKind::Gateway => (t.namespace.as_str(), t.name.as_str()) == waypoint,
        TargetKind::GatewayClass => t.name == WAYPOINT_GATEWAY_CLASS,
        TargetKind::Service | TargetKind::ServiceEntry => {
            service == Some((t.namespace.as_str(), t.name.as_str()))
        }
    })
}

/// The GatewayClass of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

/// What an L7 policy is attached to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTarget {
    pub kind: TargetKind,
    /// The policy's namespace; empty for a GatewayClass.
    #[serde(default)]
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyTarget {
    /// Istio's ancestor form: `Kind.group:namespace/name` (`Kind.group:name` for a
    /// class).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = match self.kind {
            TargetKind::Gateway | TargetKind::GatewayClass => "gateway.networking.k8s.io",
            TargetKind::Service => "",
            TargetKind::ServiceEntry => "networking.istio.io",
        };
        write!(f, "{:?}.{group}:", self.kind)?;
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        f.write_str(&self.name)
    }
}

/// The kinds an L7 policy attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TargetKind {
    Gateway,
    GatewayClass,
    Service,
    ServiceEntry,
}

/// An authorization policy and the workloads it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    pub scope: PolicyScope,
    #[serde(flatten)]
    pub policy: crate::authz::Policy,
    /// How the control plane enforces it (the policy's `ZtunnelAccepted` condition),
    /// shown in ztunnel's config dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<PolicyCondition>,
}

/// A policy's `ZtunnelAccepted` condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    pub accepted: bool,
    /// Istio's reason: `Accepted`, `UnsupportedValue`, `InvalidValue`.
    pub reason: String,
    pub message: String,
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyScope {
    /// Every workload of the mesh.
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// The workloads listing it in `authorizationPolicies`.
    WorkloadSelector,
}

/// A workload with its identity resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub spec: WorkloadSpec,
    pub identity: SpiffeId,
}

impl Workload {
    pub fn uid(&self) -> &str {
        &self.spec.uid
    }

    pub fn is_hbone(&self) -> bool {
        self.spec.protocol == Protocol::Hbone
    }

    /// The workload's address in the same family as `like`, if it has one.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.spec
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
    }
}

/// A waypoint with its identity resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    pub spec: WaypointSpec,
    pub identity: SpiffeId,
}

impl Waypoint {
    pub fn key(&self) -> String {
        self.spec.key()
    }

    /// Whether an AuthorizationPolicy is attached to it: what is bound to it then
    /// takes traffic only through it.
    pub fn enforces_policy(&self) -> bool {
        !self.spec.policies.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub spec: ServiceSpec,
    pub hostname: String,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.spec.namespace, self.spec.name)
    }
}

/// Why a model cannot be built. Names the offending object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("workload {uid}: identity: {source}")]
    Identity { uid: String, source: IdentityError },
    #[error("workload uid {0} appears twice")]
    DuplicateUid(String),
    #[error("authorization policy {0} appears twice")]
    DuplicatePolicy(String),
    #[error("workload {uid} lists authorization policy {policy}, which the model does not have")]
    UnknownPolicy { uid: String, policy: String },
    #[error("workload {uid} has no IP address")]
    NoIp { uid: String },
    #[error("IP {ip} belongs to both workload {first} and {second}")]
    DuplicateIp {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("service {service}: VIP {vip} is also {other}")]
    DuplicateVip {
        service: String,
        vip: IpAddr,
        other: String,
    },
    #[error("waypoint {key}: identity: {source}")]
    WaypointIdentity { key: String, source: IdentityError },
    #[error("waypoint {0} appears twice")]
    DuplicateWaypoint(String),
    #[error("HTTPRoute {0} appears twice")]
    DuplicateRoute(String),
    #[error("service {service}: port {port}: {reason}")]
    BadPort {
        service: String,
        port: u16,
        reason: &'static str,
    },
}

/// The indexed, validated model.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    workloads: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: Vec<Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Workload uid → the services it is an endpoint of.
    backs: HashMap<String, Vec<Arc<Service>>>,
    policies: Policies,
    l7_policies: Vec<Arc<L7PolicySpec>>,
    waypoints: HashMap<String, Arc<Waypoint>>,
    http_routes: Vec<Arc<HttpRouteSpec>>,
    request_authns: Vec<Arc<RequestAuthnSpec>>,
    /// `(namespace, name, port)` of a Service → the routes attached to it there, in
    /// precedence order; absent: none (the Service's own endpoints).
    /// By Service (namespace, name), port, and the namespace of the clients a
    /// consumer route is for (`None`: the producer routes, for every client).
    route_tables: HashMap<(String, String, u16, Option<String>), Arc<crate::route::RouteTable>>,
    /// `(namespace, name)` → the Service.
    by_name: HashMap<(String, String), Arc<Service>>,
    /// `(namespace, name)` of a Service → the DestinationRule that applies to it.
    destination_rules: HashMap<(String, String), Arc<crate::destination::DestinationRule>>,
}

/// Authorization policies indexed the way a connection looks them up: the mesh-wide
/// ones, those of a namespace, and selector policies by key (each workload lists its
/// own). A decision touches only the policies that apply, however many exist.
#[derive(Debug, Clone, Default)]
struct Policies {
    global: Vec<Arc<crate::authz::Policy>>,
    by_namespace: HashMap<String, Vec<Arc<crate::authz::Policy>>>,
    by_key: HashMap<String, Arc<crate::authz::Policy>>,
}

impl MeshState {
    /// Validates and indexes `config`. Any error names the object at fault; the caller
    /// decides whether to keep its previous state.
    pub fn build(config: &MeshConfig, trust_domain: &TrustDomain) -> Result<Self, ModelError> {
        let mut state = MeshState::default();
        for spec in &config.policies {
            let policy = Arc::new(spec.policy.clone());
            let key = policy.key();
            match spec.scope {
                PolicyScope::Global => state.policies.global.push(policy.clone()),
                PolicyScope::Namespace => state
                    .policies
                    .by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(policy.clone()),
                PolicyScope::WorkloadSelector => {}
            }
            if state.policies.by_key.insert(key.clone(), policy).is_some() {
                return Err(ModelError::DuplicatePolicy(key));
            }
        }
        let mut route_keys = std::collections::HashSet::new();
        for spec in &config.http_routes {
            if !route_keys.insert(spec.key()) {
                return Err(ModelError::DuplicateRoute(spec.key()));
            }
            state.http_routes.push(Arc::new(spec.clone()));
        }
        let mut authn_keys = std::collections::HashSet::new();
        for spec in &config.request_authns {
            if !authn_keys.insert(spec.key()) {
                return Err(ModelError::DuplicatePolicy(format!(
                    "RequestAuthentication {}",
                    spec.key()
                )));
            }
            state.request_authns.push(Arc::new(spec.clone()));
        }
        let mut l7_keys = std::collections::HashSet::new();
        for spec in &config.l7_policies {
            if !l7_keys.insert(spec.policy.key()) {
                return Err(ModelError::DuplicatePolicy(spec.policy.key()));
            }
            state.l7_policies.push(Arc::new(spec.clone()));
        }
        for spec in &config.workloads {
            let identity =
                SpiffeId::new(trust_domain.clone(), &spec.namespace, &spec.service_account)
                    .map_err(|source| ModelError::Identity {
                        uid: spec.uid.clone(),
                        source,
                    })?;
            if spec.ips.is_empty() {
                return Err(ModelError::NoIp {
                    uid: spec.uid.clone(),
                });
            }
            if let Some(policy) = spec
                .authorization_policies
                .iter()
                .find(|k| !state.policies.by_key.contains_key(*k))
            {
                return Err(ModelError::UnknownPolicy {
                    uid: spec.uid.clone(),
                    policy: policy.clone(),
                });
            }
            let w = Arc::new(Workload {
                spec: spec.clone(),
                identity,
            });
            if state
                .workloads
                .insert(spec.uid.clone(), w.clone())
                .is_some()
            {
                return Err(ModelError::DuplicateUid(spec.uid.clone()));
            }
            for ip in &spec.ips {
                if let Some(prev) = state.by_ip.insert(*ip, w.clone()) {
                    return Err(ModelError::DuplicateIp {
                        ip: *ip,
                        first: prev.spec.uid.clone(),
                        second: spec.uid.clone(),
                    });
                }
            }
        }
        for spec in &config.services {
            let hostname = spec.hostname();
            let svc = Arc::new(Service {
                spec: spec.clone(),
                hostname,
            });
            for p in &spec.ports {
                if p.port == 0 || p.target_port == 0 {
                    return Err(ModelError::BadPort {
                        service: svc.key(),
                        port: p.port,
                        reason: "port and targetPort must be non-zero",
                    });
                }
                if spec.ports.iter().filter(|q| q.port == p.port).count() > 1 {
                    return Err(ModelError::BadPort {
                        service: svc.key(),
                        port: p.port,
                        reason: "listed twice",
                    });
                }
            }
            for vip in &spec.vips {
                let clash = state
                    .by_vip
                    .get(vip)
                    .map(|s| format!("a VIP of service {}", s.key()))
                    .or_else(|| {
                        state
                            .by_ip
                            .get(vip)
                            .map(|w| format!("the IP of workload {}", w.uid()))
                    });
                if let Some(other) = clash {
                    return Err(ModelError::DuplicateVip {
                        service: svc.key(),
                        vip: *vip,
                        other,
                    });
                }
                state.by_vip.insert(*vip, svc.clone());
            }
            for endpoint in &spec.endpoints {
                state
                    .backs
                    .entry(endpoint.workload_uid.clone())
                    .or_default()
                    .push(svc.clone());
            }
            state.services.push(svc);
        }
        for spec in &config.waypoints {
            let key = spec.key();
            let identity =
                SpiffeId::new(trust_domain.clone(), &spec.namespace, &spec.service_account)
                    .map_err(|source| ModelError::WaypointIdentity {
                        key: key.clone(),
                        source,
                    })?;
            let waypoint = Arc::new(Waypoint {
                spec: spec.clone(),
                identity,
            });
            if state.waypoints.insert(key.clone(), waypoint).is_some() {
                return Err(ModelError::DuplicateWaypoint(key));
            }
        }
        for service in &state.services {
            for port in &service.spec.ports {
                // Producer routes (in the Service's namespace) for every client;
                // consumer routes (in another namespace) for that namespace's clients
                // only, instead of the producer's (GAMMA).
                let mut by_consumer: BTreeMap<Option<String>, Vec<crate::route::HttpRoute>> =
                    BTreeMap::new();
                for r in state.http_routes.iter().filter(|r| {
                    r.applies_to((&service.spec.namespace, &service.spec.name), port.port)
                }) {
                    let consumer = (r.route.namespace != service.spec.namespace)
                        .then(|| r.route.namespace.clone());
                    by_consumer
                        .entry(consumer)
                        .or_default()
                        .push(r.route.clone());
                }
                for (consumer, mut routes) in by_consumer {
                    // An HTTPRoute (or GRPCRoute) wins over VirtualServices for the
                    // same Service and port, as in Istio's waypoints.
                    if routes.iter().any(|r| !r.virtual_service) {
                        routes.retain(|r| !r.virtual_service);
                    }
                    state.route_tables.insert(
                        (
                            service.spec.namespace.clone(),
                            service.spec.name.clone(),
                            port.port,
                            consumer,
                        ),
                        Arc::new(crate::route::RouteTable::new(routes)),
                    );
                }
            }
        }
        for rule in &config.destination_rules {
            // Of two rules for one Service, the older (then the first by key) applies,
            // whatever order they came in.
            let key = (rule.service_namespace.clone(), rule.service_name.clone());
            let older = |r: &crate::destination::DestinationRule| {
                (rule.created, rule.key()) < (r.created, r.key())
            };
            if state.destination_rules.get(&key).is_none_or(|r| older(r)) {
                state.destination_rules.insert(key, Arc::new(rule.clone()));
            }
        }
        for service in &state.services {
            state.by_name.insert(
                (service.spec.namespace.clone(), service.spec.name.clone()),
                service.clone(),
            );
        }
        Ok(state)
    }

    /// The routes for requests from a client in namespace `client` to `service` on
    /// `port`, in precedence order: the consumer routes of the client's namespace if
    /// it has any there, else the Service's own (producer) routes; `None` when none
    /// is attached (the Service's own endpoints take the request).
    pub fn routes_for(
        &self,
        service: &Service,
        port: u16,
        client: &str,
    ) -> Option<&Arc<crate::route::RouteTable>> {
        let key = |consumer: Option<String>| {
            (
                service.spec.namespace.clone(),
                service.spec.name.clone(),
                port,
                consumer,
            )
        };
        if client != service.spec.namespace {
            if let Some(table) = self.route_tables.get(&key(Some(client.to_owned()))) {
                return Some(table);
            }
        }
        self.route_tables.get(&key(None))
    }

    /// The DestinationRule of the Service `name` in `namespace`.
    pub fn destination_rule(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<&Arc<crate::destination::DestinationRule>> {
        self.destination_rules
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The Service `name` in `namespace`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.by_name.get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn http_routes(&self) -> impl Iterator<Item = &Arc<HttpRouteSpec>> {
        self.http_routes.iter()
    }

    /// The waypoint `namespace/name`.
    pub fn waypoint(&self, key: &str) -> Option<&Arc<Waypoint>> {
        self.waypoints.get(key)
    }

    pub fn waypoints(&self) -> impl Iterator<Item = &Arc<Waypoint>> {
        self.waypoints.values()
    }

    /// The services `uid` is an endpoint of.
    pub fn services_of(&self, uid: &str) -> &[Arc<Service>] {
        self.backs.get(uid).map_or(&[], Vec::as_slice)
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The authorization policies that apply to `workload`: the mesh-wide ones, its
    /// namespace's, and the selector policies it lists.
    pub fn policies_for<'a>(
        &'a self,
        workload: &'a WorkloadSpec,
    ) -> impl Iterator<Item = &'a crate::authz::Policy> + 'a {
        let namespace = self
            .policies
            .by_namespace
            .get(&workload.namespace)
            .into_iter()
            .flatten();
        let selected = workload
            .authorization_policies
            .iter()
            .filter_map(|k| self.policies.by_key.get(k));
        self.policies
            .global
            .iter()
            .chain(namespace)
            .chain(selected)
            .map(|p| &**p)
    }

    /// Every authorization policy, by key.
    pub fn policy(&self, key: &str) -> Option<&crate::authz::Policy> {
        self.policies.by_key.get(key).map(|p| &**p)
    }

    /// The L7 policies waypoint `namespace/name` enforces for traffic to `service`
    /// (`namespace/name`; `None` for workload traffic), in the order given.
    pub fn l7_policies_for<'a>(
        &'a self,
        waypoint: (&'a str, &'a str),
        service: Option<(&'a str, &'a str)>,
    ) -> impl Iterator<Item = &'a crate::l7::Policy> + 'a {
        self.l7_policies
            .iter()
            .filter(move |p| p.applies_to(waypoint, service))
            .map(|p| &p.policy)
    }

    /// The JWT rules waypoint `namespace/name` enforces for traffic to `service`,
    /// policy by policy in the order given.
    pub fn jwt_rules_for<'a>(
        &'a self,
        waypoint: (&'a str, &'a str),
        service: Option<(&'a str, &'a str)>,
    ) -> impl Iterator<Item = (&'a RequestAuthnSpec, &'a crate::jwt::JwtRule)> + 'a {
        self.request_authns
            .iter()
            .filter(move |p| p.applies_to(waypoint, service))
            .flat_map(|p| p.rules.iter().map(move |r| (&**p, r)))
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.iter()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_waypoint_enforces_the_l7_policies_of_its_gateway_its_class_and_its_services() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "l7Policies:\n\
             - {targets: [{kind: Gateway, namespace: shop, name: waypoint}],\n\
                policy: {namespace: shop, name: gw, action: ALLOW}}\n\
             - {targets: [{kind: GatewayClass, name: istio-waypoint}],\n\
                policy: {namespace: istio-system, name: class, action: DENY, rules: [{}]}}\n\
             - {targets: [{kind: Service, namespace: shop, name: web}, {kind: ServiceEntry, namespace: shop, name: ext}],\n\
                policy: {namespace: shop, name: svc, action: ALLOW}}\n\
             - {targets: [{kind: Gateway, namespace: other, name: waypoint}],\n\
                policy: {namespace: other, name: elsewhere, action: ALLOW}}\n",
        )
        .unwrap();
        let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
        let names = |service| {
            state
                .l7_policies_for(("shop", "waypoint"), service)
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Some(("shop", "web"))), ["gw", "class", "svc"]);
        assert_eq!(names(Some(("shop", "ext"))), ["gw", "class", "svc"]);
        assert_eq!(names(Some(("shop", "db"))), ["gw", "class"]);
        assert_eq!(names(None), ["gw", "class"]);
        assert_eq!(
            config.l7_policies[2].targets[1].to_string(),
            "ServiceEntry.networking.istio.io:shop/ext"
        );
        assert_eq!(
            config.l7_policies[1].targets[0].to_string(),
            "GatewayClass.gateway.networking.k8s.io:istio-waypoint"
        );

        let mut twice = config.clone();
        twice.l7_policies.push(config.l7_policies[0].clone());
        assert_eq!(
            MeshState::build(&twice, &TrustDomain::default()).unwrap_err(),
            ModelError::DuplicatePolicy("shop/gw".into())
        );
    }
}
