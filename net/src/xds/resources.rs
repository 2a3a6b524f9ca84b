//! The mesh model as delta xDS resources, both ways: ambit-control turns its
//! `MeshConfig` into named [`Address`] resources, and ztunnel turns the resources it
//! holds back into a `MeshConfig`.
//!
//! - A workload is a resource named by its uid. The services it is an endpoint of
//!   travel on it (`Workload.services`, keyed `<namespace>/<hostname>`, with its own
//!   target ports where a named port resolves differently), as in Istio's workload API:
//!   a pod coming or going changes one resource, not every service it backs.
//! - A service is a resource named `<namespace>/<hostname>`.
//! - An authorization policy is a resource named `authz/<namespace>/<name>`; a workload
//!   lists the selector policies that select it by `<namespace>/<name>`.
//! - A waypoint's L7 authorization policy is a resource named
//!   `l7authz/<namespace>/<name>` ([`super::l7`]).
//! - A RequestAuthentication for waypoints is a resource named
//!   `requestauthn/<namespace>/<name>` ([`super::request_authn`]).
//! - A waypoint is a resource named `waypoint/<namespace>/<name>`; what is bound to it
//!   names it in its `GatewayAddress`.
//! - An HTTPRoute is `httproute/<namespace>/<name>` ([`super::route`]); a
//!   DestinationRule `destinationrule/<namespace>/<name>` ([`super::destination`]).
//!
//! A resource that cannot be used is rejected on its own ([`ResourceError`] names it),
//! so the client can NACK it and keep the rest.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_core::authz::{self, Action, Cidr, Clause, Match, Policy, Rule, ServiceAccountRef};
use ambit_core::model::{
    EndpointSpec, MeshConfig, PolicyCondition, PolicyScope, PolicySpec, Protocol, ServicePort,
    ServiceSpec, WaypointAddress, WaypointFor, WaypointSpec, WorkloadSpec,
};
use ambit_proto::workload::{
    address, gateway_address, string_match, Address, Authorization, AuthorizationAction,
    AuthorizationClause, AuthorizationMatch, AuthorizationRule, AuthorizationScope, CidrAddress,
    GatewayAddress, NetworkAddress, Port, PortList, Presence, Service, ServiceAccountMatch,
    StringMatch, TunnelProtocol, Waypoint, WaypointTrafficType, Workload, WorkloadStatus,
};

/// A resource that cannot be turned into the model, by name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resource {name}: {reason}")]
pub struct ResourceError {
    pub name: String,
    pub reason: String,
}

/// The resources of `config`, by name.
pub fn to_resources(config: &MeshConfig) -> BTreeMap<String, Address> {
    // Which services each workload backs, and with which ports.
    let mut backs: BTreeMap<&str, BTreeMap<String, PortList>> = BTreeMap::new();
    let mut resources = BTreeMap::new();
    for service in &config.services {
        let key = service_name(&service.namespace, &service.hostname());
        for endpoint in &service.endpoints {
            backs.entry(&endpoint.workload_uid).or_default().insert(
                key.clone(),
                PortList {
                    ports: endpoint.ports.iter().map(port).collect(),
                },
            );
        }
        resources.insert(
            key,
            Address {
                r#type: Some(address::Type::Service(Service {
                    name: service.name.clone(),
                    namespace: service.namespace.clone(),
                    hostname: service.hostname(),
                    addresses: service
                        .vips
                        .iter()
                        .map(|ip| NetworkAddress {
                            network: String::new(),
                            address: ip_bytes(*ip),
                        })
                        .collect(),
                    ports: service.ports.iter().map(port).collect(),
                    waypoint: service.waypoint.as_ref().map(gateway),
                })),
            },
        );
    }
    for w in &config.workloads {
        let workload = Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses: w.ips.iter().map(|ip| ip_bytes(*ip)).collect(),
            tunnel_protocol: match w.protocol {
                Protocol::Hbone => TunnelProtocol::Hbone,
                Protocol::Tcp => TunnelProtocol::None,
            } as i32,
            trust_domain: String::new(),
            service_account: w.service_account.clone(),
            waypoint: w.waypoint.as_ref().map(gateway),
            node: w.node.clone(),
            canonical_name: w.canonical_name.clone().unwrap_or_default(),
            canonical_revision: w.canonical_revision.clone().unwrap_or_default(),
            workload_name: w.workload_name.clone().unwrap_or_default(),
            services: backs
                .remove(w.uid.as_str())
                .unwrap_or_default()
                .into_iter()
                .collect(),
            status: if w.healthy {
                WorkloadStatus::Healthy
            } else {
                WorkloadStatus::Unhealthy
            } as i32,
            workload_kind: w.workload_kind.clone().unwrap_or_default(),
            ambient: w.ambient,
            authorization_policies: w.authorization_policies.clone(),
            labels: w.labels.clone().into_iter().collect(),
        };
        resources.insert(
            w.uid.clone(),
            Address {
                r#type: Some(address::Type::Workload(workload)),
            },
        );
    }
    for p in &config.policies {
        resources.insert(
            policy_name(&p.policy.namespace, &p.policy.name),
            Address {
                r#type: Some(address::Type::Authorization(authorization_to_proto(p))),
            },
        );
    }
    for p in &config.l7_policies {
        resources.insert(
            super::l7::l7_policy_name(&p.policy.namespace, &p.policy.name),
            Address {
                r#type: Some(address::Type::L7Authorization(
                    super::l7::l7_policy_to_proto(p),
                )),
            },
        );
    }
    for r in &config.http_routes {
        resources.insert(
            super::route::route_name(&r.route),
            Address {
                r#type: Some(address::Type::HttpRoute(super::route::route_to_proto(r))),
            },
        );
    }
    for r in &config.destination_rules {
        resources.insert(
            super::destination::destination_rule_name(&r.namespace, &r.name),
            Address {
                r#type: Some(address::Type::DestinationRule(
                    super::destination::destination_rule_to_proto(r),
                )),
            },
        );
    }
    for a in &config.request_authns {
        resources.insert(
            super::request_authn::request_authn_name(&a.namespace, &a.name),
            Address {
                r#type: Some(address::Type::RequestAuthentication(
                    super::request_authn::request_authn_to_proto(a),
                )),
            },
        );
    }
    for w in &config.waypoints {
        resources.insert(
            waypoint_name(&w.namespace, &w.name),
            Address {
                r#type: Some(address::Type::Waypoint(waypoint_to_proto(w))),
            },
        );
    }
    resources
}

/// The resource name of a waypoint.
pub fn waypoint_name(namespace: &str, name: &str) -> String {
    format!("waypoint/{namespace}/{name}")
}

fn waypoint_to_proto(w: &WaypointSpec) -> Waypoint {
    Waypoint {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        traffic_type: match w.traffic_type {
            WaypointFor::Service => WaypointTrafficType::Service,
            WaypointFor::Workload => WaypointTrafficType::Workload,
            WaypointFor::All => WaypointTrafficType::All,
            WaypointFor::None => WaypointTrafficType::None,
        } as i32,
        service_account: w.service_account.clone(),
        address: w.address.map(|ip| NetworkAddress {
            network: String::new(),
            address: ip_bytes(ip),
        }),
        policies: w.policies.clone(),
    }
}

fn waypoint_from_proto(w: &Waypoint) -> Result<WaypointSpec, String> {
    if w.name.is_empty() || w.namespace.is_empty() || w.service_account.is_empty() {
        return Err("waypoint without a name, namespace or service account".into());
    }
    let traffic_type = match WaypointTrafficType::try_from(w.traffic_type) {
        Ok(WaypointTrafficType::Service) => WaypointFor::Service,
        Ok(WaypointTrafficType::Workload) => WaypointFor::Workload,
        Ok(WaypointTrafficType::All) => WaypointFor::All,
        Ok(WaypointTrafficType::None) => WaypointFor::None,
        Err(_) => return Err(format!("unknown waypoint traffic type {}", w.traffic_type)),
    };
    Ok(WaypointSpec {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        traffic_type,
        service_account: w.service_account.clone(),
        address: w
            .address
            .as_ref()
            .map(|a| ip_from_bytes(&a.address))
            .transpose()?,
        policies: w.policies.clone(),
    })
}

/// The resource name of an authorization policy.
pub fn policy_name(namespace: &str, name: &str) -> String {
    format!("authz/{namespace}/{name}")
}

fn authorization_to_proto(p: &PolicySpec) -> Authorization {
    let strings = |l: &[authz::StringMatch]| -> Vec<StringMatch> {
        l.iter()
            .map(|m| StringMatch {
                match_type: Some(match m {
                    authz::StringMatch::Exact(s) => string_match::MatchType::Exact(s.clone()),
                    authz::StringMatch::Prefix(s) => string_match::MatchType::Prefix(s.clone()),
                    authz::StringMatch::Suffix(s) => string_match::MatchType::Suffix(s.clone()),
                    authz::StringMatch::Presence => string_match::MatchType::Presence(Presence {}),
                }),
            })
            .collect()
    };
    let cidrs = |l: &[Cidr]| -> Vec<CidrAddress> {
        l.iter()
            .map(|c| CidrAddress {
                address: ip_bytes(c.address),
                length: u32::from(c.prefix_len),
            })
            .collect()
    };
    let accounts = |l: &[ServiceAccountRef]| -> Vec<ServiceAccountMatch> {
        l.iter()
            .map(|a| ServiceAccountMatch {
                namespace: a.namespace.clone(),
                service_account: a.name.clone(),
            })
            .collect()
    };
    let ports = |l: &[u16]| l.iter().map(|p| u32::from(*p)).collect::<Vec<u32>>();
    Authorization {
        name: p.policy.name.clone(),
        namespace: p.policy.namespace.clone(),
        scope: match p.scope {
            PolicyScope::Global => AuthorizationScope::Global,
            PolicyScope::Namespace => AuthorizationScope::Namespace,
            PolicyScope::WorkloadSelector => AuthorizationScope::WorkloadSelector,
        } as i32,
        action: match p.policy.action {
            Action::Allow => AuthorizationAction::Allow,
            Action::Deny => AuthorizationAction::Deny,
            Action::Audit => AuthorizationAction::Audit,
            Action::Custom => AuthorizationAction::Custom,
        } as i32,
        rules: p
            .policy
            .rules
            .iter()
            .map(|r| AuthorizationRule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| AuthorizationClause {
                        matches: c
                            .matches
                            .iter()
                            .map(|m| AuthorizationMatch {
                                namespaces: strings(&m.namespaces),
                                not_namespaces: strings(&m.not_namespaces),
                                principals: strings(&m.principals),
                                not_principals: strings(&m.not_principals),
                                source_ips: cidrs(&m.source_ips),
                                not_source_ips: cidrs(&m.not_source_ips),
                                destination_ips: cidrs(&m.destination_ips),
                                not_destination_ips: cidrs(&m.not_destination_ips),
                                destination_ports: ports(&m.destination_ports),
                                not_destination_ports: ports(&m.not_destination_ports),
                                service_accounts: accounts(&m.service_accounts),
                                not_service_accounts: accounts(&m.not_service_accounts),
                                trust_domains: strings(&m.trust_domains),
                                not_trust_domains: strings(&m.not_trust_domains),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: p.policy.dry_run,
        condition: p.condition.as_ref().map(condition_to_proto),
    }
}

fn authorization_from_proto(a: &Authorization) -> Result<PolicySpec, String> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err("authorization policy without a name or namespace".into());
    }
    let strings = |l: &[StringMatch]| -> Result<Vec<authz::StringMatch>, String> {
        l.iter()
            .map(|m| match &m.match_type {
                Some(string_match::MatchType::Exact(s)) => Ok(authz::StringMatch::Exact(s.clone())),
                Some(string_match::MatchType::Prefix(s)) => {
                    Ok(authz::StringMatch::Prefix(s.clone()))
                }
                Some(string_match::MatchType::Suffix(s)) => {
                    Ok(authz::StringMatch::Suffix(s.clone()))
                }
                Some(string_match::MatchType::Presence(_)) => Ok(authz::StringMatch::Presence),
                None => Err("a string match without a value".to_owned()),
            })
            .collect()
    };
    let cidrs = |l: &[CidrAddress]| -> Result<Vec<Cidr>, String> {
        l.iter()
            .map(|c| {
                let address = ip_from_bytes(&c.address)?;
                let max = if address.is_ipv4() { 32 } else { 128 };
                let prefix_len = u8::try_from(c.length)
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("prefix length {} for {address}", c.length))?;
                Ok(Cidr {
                    address,
                    prefix_len,
                })
            })
            .collect()
    };
    let accounts = |l: &[ServiceAccountMatch]| -> Vec<ServiceAccountRef> {
        l.iter()
            .map(|a| ServiceAccountRef {
                namespace: a.namespace.clone(),
                name: a.service_account.clone(),
            })
            .collect()
    };
    let ports = |l: &[u32]| -> Result<Vec<u16>, String> {
        l.iter()
            .map(|p| u16::try_from(*p).map_err(|_| format!("port {p} out of range")))
            .collect()
    };
    let scope = match AuthorizationScope::try_from(a.scope) {
        Ok(AuthorizationScope::Global) => PolicyScope::Global,
        Ok(AuthorizationScope::Namespace) => PolicyScope::Namespace,
        Ok(AuthorizationScope::WorkloadSelector) => PolicyScope::WorkloadSelector,
        Err(_) => return Err(format!("unknown scope {}", a.scope)),
    };
    let action = match AuthorizationAction::try_from(a.action) {
        Ok(AuthorizationAction::Allow) => Action::Allow,
        Ok(AuthorizationAction::Deny) => Action::Deny,
        Ok(AuthorizationAction::Audit) => Action::Audit,
        Ok(AuthorizationAction::Custom) => Action::Custom,
        Err(_) => return Err(format!("unknown action {}", a.action)),
    };
    let mut rules = Vec::new();
    for r in &a.rules {
        let mut clauses = Vec::new();
        for c in &r.clauses {
            let mut matches = Vec::new();
            for m in &c.matches {
                matches.push(Match {
                    principals: strings(&m.principals)?,
                    not_principals: strings(&m.not_principals)?,
                    namespaces: strings(&m.namespaces)?,
                    not_namespaces: strings(&m.not_namespaces)?,
                    service_accounts: accounts(&m.service_accounts),
                    not_service_accounts: accounts(&m.not_service_accounts),
                    trust_domains: strings(&m.trust_domains)?,
                    not_trust_domains: strings(&m.not_trust_domains)?,
                    source_ips: cidrs(&m.source_ips)?,
                    not_source_ips: cidrs(&m.not_source_ips)?,
                    destination_ips: cidrs(&m.destination_ips)?,
                    not_destination_ips: cidrs(&m.not_destination_ips)?,
                    destination_ports: ports(&m.destination_ports)?,
                    not_destination_ports: ports(&m.not_destination_ports)?,
                });
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(PolicySpec {
        scope,
        condition: a.condition.as_ref().map(condition_from_proto),
        policy: Policy {
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            action,
            dry_run: a.dry_run,
            rules,
        },
    })
}

/// The model of the resources a client holds. Resources that cannot be used are left
/// out and returned as errors; the rest make the model.
pub fn from_resources<'a>(
    resources: impl IntoIterator<Item = (&'a String, &'a Address)>,
) -> (MeshConfig, Vec<ResourceError>) {
    let mut errors = Vec::new();
    let mut workloads = Vec::new();
    let mut services: BTreeMap<String, ServiceSpec> = BTreeMap::new();
    // (service key, endpoint) pairs, joined to the services once all are known.
    let mut endpoints: Vec<(String, EndpointSpec)> = Vec::new();
    let mut policies = Vec::new();
    let mut l7_policies = Vec::new();
    let mut http_routes = Vec::new();
    let mut destination_rules = Vec::new();
    let mut waypoints = Vec::new();
    let mut request_authns = Vec::new();
    for (name, resource) in resources {
        let error = |reason: String| ResourceError {
            name: name.clone(),
            reason,
        };
        match &resource.r#type {
            Some(address::Type::Workload(w)) => match workload(w) {
                Ok(spec) => {
                    for (key, ports) in &w.services {
                        match ports.ports.iter().map(model_port).collect() {
                            Ok(ports) => endpoints.push((
                                key.clone(),
                                EndpointSpec {
                                    workload_uid: spec.uid.clone(),
                                    ports,
                                },
                            )),
                            Err(reason) => errors.push(error(format!("service {key}: {reason}"))),
                        }
                    }
                    workloads.push(spec);
                }
                Err(reason) => errors.push(error(reason)),
            },
            Some(address::Type::Service(s)) => match service(s) {
                Ok(spec) => {
                    services.insert(service_name(&s.namespace, &s.hostname), spec);
                }
                Err(reason) => errors.push(error(reason)),
            },
            Some(address::Type::Authorization(a)) => match authorization_from_proto(a) {
                Ok(p) => policies.push(p),
                // Not usable: the client NACKs it. A workload listing it then makes the
                // model fail as a whole, and the last good one stays.
                Err(reason) => errors.push(error(reason)),
            },
            Some(address::Type::L7Authorization(a)) => match super::l7::l7_policy_from_proto(a) {
                Ok(p) => l7_policies.push(p),
                Err(reason) => errors.push(error(reason)),
            },
            Some(address::Type::Waypoint(w)) => match waypoint_from_proto(w) {
                Ok(w) => waypoints.push(w),
                Err(reason) => errors.push(error(reason)),
            },
            Some(address::Type::HttpRoute(r)) => match super::route::route_from_proto(r) {
                Ok(r) => http_routes.push(r),
                Err(reason) => errors.push(error(reason)),
            },
            Some(address::Type::DestinationRule(r)) => {
                match super::destination::destination_rule_from_proto(r) {
                    Ok(r) => destination_rules.push(r),
                    Err(reason) => errors.push(error(reason)),
                }
            }
            Some(address::Type::RequestAuthentication(a)) => {
                match super::request_authn::request_authn_from_proto(a) {
                    Ok(a) => request_authns.push(a),
                    Err(reason) => errors.push(error(reason)),
                }
            }
            None => errors.push(error(
                "neither a workload, a service, a policy, a waypoint, a route, a destination rule nor a request authentication".into(),
            )),
        }
    }
    endpoints.sort_by(|a, b| (&a.0, &a.1.workload_uid).cmp(&(&b.0, &b.1.workload_uid)));
    for (key, endpoint) in endpoints {
        // An endpoint of a service the client does not (yet) hold waits for it.
        if let Some(service) = services.get_mut(&key) {
            service.endpoints.push(endpoint);
        }
    }
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    (
        MeshConfig {
            workloads,
            services: services.into_values().collect(),
            policies,
            l7_policies,
            waypoints,
            http_routes,
            destination_rules,
            request_authns,
        },
        errors,
    )
}

/// The resource name of a service.
pub fn service_name(namespace: &str, hostname: &str) -> String {
    format!("{namespace}/{hostname}")
}

fn workload(w: &Workload) -> Result<WorkloadSpec, String> {
    if w.uid.is_empty() {
        return Err("workload without a uid".into());
    }
    let ips = w
        .addresses
        .iter()
        .map(|a| ip_from_bytes(a))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(TunnelProtocol::None) => Protocol::Tcp,
        Err(_) => return Err(format!("unknown tunnel protocol {}", w.tunnel_protocol)),
    };
    if !w.trust_domain.is_empty() {
        // One trust domain per mesh for now; another one would be a different identity.
        return Err(format!(
            "trust domain {:?}: only the mesh's own is supported",
            w.trust_domain
        ));
    }
    let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    Ok(WorkloadSpec {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: some(&w.service_account).unwrap_or_else(|| "default".into()),
        node: w.node.clone(),
        ips,
        protocol,
        canonical_name: some(&w.canonical_name),
        canonical_revision: some(&w.canonical_revision),
        workload_kind: some(&w.workload_kind),
        workload_name: some(&w.workload_name),
        healthy: w.status != WorkloadStatus::Unhealthy as i32,
        waypoint: w.waypoint.as_ref().map(waypoint).transpose()?,
        ambient: w.ambient,
        authorization_policies: w.authorization_policies.clone(),
        labels: w.labels.clone().into_iter().collect(),
    })
}

fn service(s: &Service) -> Result<ServiceSpec, String> {
    if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
        return Err("service without a name, namespace or hostname".into());
    }
    Ok(ServiceSpec {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: Some(s.hostname.clone()),
        vips: s
            .addresses
            .iter()
            .map(|a| ip_from_bytes(&a.address))
            .collect::<Result<_, _>>()?,
        ports: s.ports.iter().map(model_port).collect::<Result<_, _>>()?,
        endpoints: Vec::new(),
        waypoint: s.waypoint.as_ref().map(waypoint).transpose()?,
    })
}

fn gateway(w: &WaypointAddress) -> GatewayAddress {
    GatewayAddress {
        destination: Some(gateway_address::Destination::Address(NetworkAddress {
            network: String::new(),
            address: ip_bytes(w.address),
        })),
        hbone_mtls_port: u32::from(w.hbone_port),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
    }
}

fn waypoint(g: &GatewayAddress) -> Result<WaypointAddress, String> {
    let address = match &g.destination {
        Some(gateway_address::Destination::Address(a)) => ip_from_bytes(&a.address)?,
        Some(gateway_address::Destination::Hostname(h)) => {
            return Err(format!(
                "waypoint {}/{}: a waypoint by hostname is not supported, only by address",
                h.namespace, h.hostname
            ))
        }
        None => return Err("waypoint without an address".into()),
    };
    let hbone_port = u16::try_from(g.hbone_mtls_port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("waypoint HBONE port {} is out of range", g.hbone_mtls_port))?;
    Ok(WaypointAddress {
        address,
        hbone_port,
        name: g.name.clone(),
        namespace: g.namespace.clone(),
    })
}

fn port(p: &ServicePort) -> Port {
    Port {
        service_port: u32::from(p.port),
        target_port: u32::from(p.target_port),
        app_protocol: p.app_protocol.clone().unwrap_or_default(),
    }
}

fn model_port(p: &Port) -> Result<ServicePort, String> {
    let number = |n: u32| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("port {n} is out of range"))
    };
    Ok(ServicePort {
        port: number(p.service_port)?,
        target_port: number(p.target_port)?,
        app_protocol: (!p.app_protocol.is_empty()).then(|| p.app_protocol.clone()),
    })
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(format!(
            "an address of {} bytes is neither IPv4 nor IPv6",
            bytes.len()
        ))
    }
}

/// A policy's status condition, as the model keeps it and as xDS carries it (the
/// same for every policy kind).
pub(crate) fn condition_to_proto(c: &PolicyCondition) -> ambit_proto::workload::PolicyCondition {
    ambit_proto::workload::PolicyCondition {
        accepted: c.accepted,
        reason: c.reason.clone(),
        message: c.message.clone(),
    }
}

pub(crate) fn condition_from_proto(c: &ambit_proto::workload::PolicyCondition) -> PolicyCondition {
    PolicyCondition {
        accepted: c.accepted,
        reason: c.reason.clone(),
        message: c.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> MeshConfig {
        serde_yaml_ng::from_str(
            "workloads:\n\
             - {uid: shop/web-a, name: web-a, namespace: shop, serviceAccount: web, node: node-a,\n\
                ips: [10.1.0.10, 'fd10:1::10'], protocol: HBONE, canonicalName: web,\n\
                canonicalRevision: v1, workloadKind: Deployment, workloadName: web,\n\
                labels: {app: web, version: v1},\n\
                waypoint: {address: 10.96.0.100, name: waypoint, namespace: shop}}\n\
             - {uid: shop/web-b, name: web-b, namespace: shop, node: node-b, ips: [10.2.0.10],\n\
                healthy: false}\n\
             - {uid: shop/client, name: client, namespace: shop, node: node-a, ips: [10.1.0.2]}\n\
             services:\n\
             - name: web\n  namespace: shop\n  vips: [10.96.0.10, 'fd00:96::10']\n\
             \x20 ports: [{port: 80, targetPort: 8080, appProtocol: http}, {port: 9090, targetPort: 9090}]\n\
             \x20 endpoints:\n\
             \x20 - {workloadUid: shop/web-a, ports: [{port: 80, targetPort: 8081}]}\n\
             \x20 - {workloadUid: shop/web-b}\n\
             - {name: db, namespace: shop, hostname: db.example.com, vips: [10.96.0.11],\n\
                ports: [{port: 5432, targetPort: 5432}],\n\
                waypoint: {address: 'fd00:96::100', hbonePort: 15009}}\n\
             waypoints:\n\
             - {name: waypoint, namespace: shop, trafficType: all, serviceAccount: waypoint,\n\
                address: 10.96.0.100, policies: [shop/admin-only]}\n\
             - {name: bare, namespace: infra, serviceAccount: bare}\n\
             destinationRules:\n\
             - {namespace: shop, name: web, serviceNamespace: shop, serviceName: web,\n\
                subsets: [{name: v1, labels: {version: v1}}]}\n",
        )
        .unwrap()
    }

    /// The model with every default spelled out and in the order `from_resources`
    /// returns it.
    fn normalized(mut config: MeshConfig) -> MeshConfig {
        config.workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        for s in &mut config.services {
            s.hostname = Some(s.hostname());
            s.endpoints
                .sort_by(|a, b| a.workload_uid.cmp(&b.workload_uid));
        }
        config
            .services
            .sort_by_key(|s| service_name(&s.namespace, &s.hostname()));
        config
            .waypoints
            .sort_by_key(|w| waypoint_name(&w.namespace, &w.name));
        config
    }

    #[test]
    fn a_waypoint_travels_with_its_traffic_type_policies_and_the_names_bound_to_it() {
        let resources = to_resources(&model());
        let Some(address::Type::Waypoint(w)) = &resources["waypoint/shop/waypoint"].r#type else {
            panic!("not a waypoint");
        };
        assert_eq!(w.traffic_type, WaypointTrafficType::All as i32);
        assert_eq!(w.policies, ["shop/admin-only"]);
        let Some(address::Type::Workload(web_a)) = &resources["shop/web-a"].r#type else {
            panic!("not a workload");
        };
        let bound = web_a.waypoint.as_ref().unwrap();
        assert_eq!(
            (bound.namespace.as_str(), bound.name.as_str()),
            ("shop", "waypoint")
        );
        // A waypoint without its identity is rejected on its own.
        let mut bad = resources.clone();
        let Some(address::Type::Waypoint(w)) =
            &mut bad.get_mut("waypoint/infra/bare").unwrap().r#type
        else {
            panic!("not a waypoint");
        };
        w.service_account.clear();
        let (config, errors) = from_resources(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].name, "waypoint/infra/bare");
        assert_eq!(config.waypoints.len(), 1);
    }

    #[test]
    fn the_model_survives_the_round_trip_through_resources() {
        let resources = to_resources(&model());
        let names: Vec<&str> = resources.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "destinationrule/shop/web",
                "shop/client",
                "shop/db.example.com",
                "shop/web-a",
                "shop/web-b",
                "shop/web.shop.svc.cluster.local",
                "waypoint/infra/bare",
                "waypoint/shop/waypoint",
            ]
        );
        let (config, errors) = from_resources(&resources);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config, normalized(model()));
    }

    #[test]
    fn endpoints_travel_on_their_workloads() {
        let resources = to_resources(&model());
        let Some(address::Type::Workload(web_a)) = &resources["shop/web-a"].r#type else {
            panic!("not a workload");
        };
        assert_eq!(
            web_a.services["shop/web.shop.svc.cluster.local"].ports,
            [Port {
                service_port: 80,
                target_port: 8081,
                app_protocol: String::new(),
            }]
        );
        assert_eq!(web_a.addresses[1].len(), 16);
        // Without its service, a workload's endpoint waits: the service has none yet.
        let mut partial = resources.clone();
        partial.remove("shop/web.shop.svc.cluster.local");
        let (config, errors) = from_resources(&partial);
        assert!(errors.is_empty());
        assert_eq!(config.workloads.len(), 3);
        assert_eq!(config.services.len(), 1);
    }

    #[test]
    fn a_bad_resource_is_rejected_by_name_and_the_rest_kept() {
        let mut resources = to_resources(&model());
        let Some(address::Type::Workload(w)) =
            &mut resources.get_mut("shop/client").unwrap().r#type
        else {
            panic!("not a workload");
        };
        w.addresses = vec![vec![10, 1, 0]];
        resources.insert("odd".into(), Address { r#type: None });
        let (config, errors) = from_resources(&resources);
        let names: Vec<&str> = errors.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["odd", "shop/client"], "{errors:?}");
        assert!(errors[1].reason.contains("3 bytes"), "{}", errors[1]);
        assert_eq!(config.workloads.len(), 2);
        assert_eq!(config.services.len(), 2);
    }

    #[test]
    fn a_waypoint_by_hostname_or_without_a_port_is_rejected_with_its_resource() {
        let mut resources = to_resources(&model());
        let Some(Address {
            r#type: Some(address::Type::Workload(w)),
        }) = resources.get_mut("shop/web-a")
        else {
            panic!("no shop/web-a")
        };
        w.waypoint = Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(
                ambit_proto::workload::NamespacedHostname {
                    namespace: "shop".into(),
                    hostname: "waypoint.shop.svc.cluster.local".into(),
                },
            )),
            hbone_mtls_port: 15008,
            ..GatewayAddress::default()
        });
        let (config, errors) = from_resources(&resources);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].name, "shop/web-a");
        assert!(errors[0].reason.contains("by hostname"), "{errors:?}");
        assert!(config.workloads.iter().all(|w| w.uid != "shop/web-a"));

        let Some(Address {
            r#type: Some(address::Type::Service(s)),
        }) = resources.get_mut("shop/db.example.com")
        else {
            panic!("no db")
        };
        s.waypoint.as_mut().unwrap().hbone_mtls_port = 0;
        let (_, errors) = from_resources(&resources);
        assert!(
            errors.iter().any(|e| e.reason.contains("HBONE port 0")),
            "{errors:?}"
        );
    }
}
