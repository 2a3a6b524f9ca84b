//! The model in Istio's workload xDS types (decision record 0017): what an Istio
//! ztunnel subscribed to `istio.workload.Address` and `istio.security.Authorization`
//! gets, translated from the same resources Ambit's own ztunnels get, so both kinds
//! of ztunnel in one mesh hold the same workloads, services and policies.
//!
//! Pure: resources in, resources out. What Istio's types cannot say is translated
//! into what they can, or fails closed, never dropped silently:
//! - Ambit's service-account and trust-domain matches become principal matches
//!   (`*/ns/<ns>/sa/<sa>`, `<trust domain>/*`); a match needing two positive identity
//!   lists at once (which one Istio field cannot AND) never matches in an ALLOW
//!   policy and matches everything in a DENY one;
//! - CUSTOM is enforced as DENY (Ambit's ztunnel does the same: no external
//!   authorizer at L4); AUDIT and dry-run policies never change a decision, and are
//!   not sent;
//! - L7 policies, waypoints, routes, DestinationRules and RequestAuthentications are
//!   Ambit's own and not sent (Istio's ztunnel has no use for them).
//!
//! Names: a workload by its uid, a service `<namespace>/<hostname>` (as Ambit's), a
//! policy `<namespace>/<name>` (the key workloads list, as istiod names them).

use std::collections::{BTreeMap, HashMap};

use ambit_core::TrustDomain;
use ambit_proto::istio_security as sec;
use ambit_proto::istio_workload as iw;
use ambit_proto::workload as aw;
use ambit_proto::workload::address::Type;

/// Istio's resources, by type: name → resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IstioResources {
    pub addresses: BTreeMap<String, iw::Address>,
    pub authorizations: BTreeMap<String, sec::Authorization>,
}

/// Translates Ambit's resources (name → resource, as the snapshot holds them) into
/// Istio's. `trust_domain` fills identities Ambit leaves implicit.
pub fn translate<'a>(
    resources: impl IntoIterator<Item = (&'a String, &'a aw::Address)>,
    trust_domain: &TrustDomain,
) -> IstioResources {
    let resources: Vec<(&String, &aw::Address)> = resources.into_iter().collect();
    // Each service's ports, for the workloads' full port lists.
    let service_ports: HashMap<String, &[aw::Port]> = resources
        .iter()
        .filter_map(|(_, a)| match &a.r#type {
            Some(Type::Service(s)) => {
                Some((format!("{}/{}", s.namespace, s.hostname), &s.ports[..]))
            }
            _ => None,
        })
        .collect();
    let mut out = IstioResources::default();
    for (name, address) in resources {
        match &address.r#type {
            Some(Type::Workload(w)) => {
                let workload = workload(w, trust_domain, &service_ports);
                out.addresses.insert(
                    name.clone(),
                    iw::Address {
                        r#type: Some(iw::address::Type::Workload(workload)),
                    },
                );
            }
            Some(Type::Service(s)) => {
                out.addresses.insert(
                    name.clone(),
                    iw::Address {
                        r#type: Some(iw::address::Type::Service(service(s))),
                    },
                );
            }
            Some(Type::Authorization(p)) => {
                if let Some(policy) = authorization(p) {
                    out.authorizations
                        .insert(format!("{}/{}", policy.namespace, policy.name), policy);
                }
            }
            // Ambit's own kinds, for Ambit's ztunnels and waypoints only.
            _ => {}
        }
    }
    out
}

fn workload(
    w: &aw::Workload,
    trust_domain: &TrustDomain,
    service_ports: &HashMap<String, &[aw::Port]>,
) -> iw::Workload {
    // Istio's ztunnel takes a workload's own port list for a service as complete, so
    // each carries every port of the service: the endpoint's own target port where
    // Ambit lists one (a named port), else the service's.
    let services = w
        .services
        .iter()
        .map(|(key, own)| {
            let ports = service_ports
                .get(key)
                .map(|ports| {
                    ports
                        .iter()
                        .map(|p| iw::Port {
                            service_port: p.service_port,
                            target_port: own
                                .ports
                                .iter()
                                .find(|o| o.service_port == p.service_port)
                                .map_or(p.target_port, |o| o.target_port),
                        })
                        .collect()
                })
                .unwrap_or_else(|| own.ports.iter().map(port).collect());
            (key.clone(), iw::PortList { ports })
        })
        .collect();
    iw::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.addresses.clone(),
        network: String::new(),
        tunnel_protocol: match w.tunnel_protocol() {
            aw::TunnelProtocol::Hbone => iw::TunnelProtocol::Hbone,
            aw::TunnelProtocol::None => iw::TunnelProtocol::None,
        } as i32,
        // Explicit: Istio's ztunnel would read an empty one as cluster.local.
        trust_domain: if w.trust_domain.is_empty() {
            trust_domain.to_string()
        } else {
            w.trust_domain.clone()
        },
        service_account: if w.service_account.is_empty() {
            "default".to_owned()
        } else {
            w.service_account.clone()
        },
        waypoint: w.waypoint.as_ref().map(gateway),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: workload_type(&w.workload_kind) as i32,
        workload_name: w.workload_name.clone(),
        services,
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status() {
            aw::WorkloadStatus::Healthy => iw::WorkloadStatus::Healthy,
            aw::WorkloadStatus::Unhealthy => iw::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: String::new(),
    }
}

/// Istio's closed set of kinds, for telemetry: controllers count as deployments, as
/// istiod reports them.
fn workload_type(kind: &str) -> iw::WorkloadType {
    match kind.to_ascii_lowercase().as_str() {
        "cronjob" => iw::WorkloadType::Cronjob,
        "job" => iw::WorkloadType::Job,
        "" | "pod" => iw::WorkloadType::Pod,
        _ => iw::WorkloadType::Deployment,
    }
}

fn port(p: &aw::Port) -> iw::Port {
    iw::Port {
        service_port: p.service_port,
        target_port: p.target_port,
    }
}

fn network_address(a: &aw::NetworkAddress) -> iw::NetworkAddress {
    iw::NetworkAddress {
        network: a.network.clone(),
        address: a.address.clone(),
    }
}

fn gateway(g: &aw::GatewayAddress) -> iw::GatewayAddress {
    use aw::gateway_address::Destination as A;
    use iw::gateway_address::Destination as I;
    iw::GatewayAddress {
        destination: g.destination.as_ref().map(|d| match d {
            A::Hostname(h) => I::Hostname(iw::NamespacedHostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            }),
            A::Address(a) => I::Address(network_address(a)),
        }),
        hbone_mtls_port: g.hbone_mtls_port,
    }
}

fn service(s: &aw::Service) -> iw::Service {
    iw::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s.addresses.iter().map(network_address).collect(),
        ports: s.ports.iter().map(port).collect(),
        waypoint: s.waypoint.as_ref().map(gateway),
    }
}

/// The policy as Istio's ztunnel enforces it, or `None` for one that never changes a
/// decision (AUDIT, dry-run).
fn authorization(p: &aw::Authorization) -> Option<sec::Authorization> {
    let action = match p.action() {
        _ if p.dry_run => return None,
        aw::AuthorizationAction::Audit => return None,
        aw::AuthorizationAction::Allow => sec::Action::Allow,
        aw::AuthorizationAction::Deny | aw::AuthorizationAction::Custom => sec::Action::Deny,
    };
    let scope = match p.scope() {
        aw::AuthorizationScope::Global => sec::Scope::Global,
        aw::AuthorizationScope::Namespace => sec::Scope::Namespace,
        aw::AuthorizationScope::WorkloadSelector => sec::Scope::WorkloadSelector,
    };
    let rules = p
        .rules
        .iter()
        .map(|rule| sec::Rule {
            clauses: rule
                .clauses
                .iter()
                .map(|clause| sec::Clause {
                    matches: clause.matches.iter().map(|m| match_of(m, action)).collect(),
                })
                .collect(),
        })
        .collect();
    Some(sec::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: scope as i32,
        action: action as i32,
        rules,
    })
}

fn string_match(m: &aw::StringMatch) -> sec::StringMatch {
    use aw::string_match::MatchType as A;
    use sec::string_match::MatchType as I;
    sec::StringMatch {
        match_type: m.match_type.as_ref().map(|t| match t {
            A::Exact(v) => I::Exact(v.clone()),
            A::Prefix(v) => I::Prefix(v.clone()),
            A::Suffix(v) => I::Suffix(v.clone()),
            A::Presence(_) => I::Presence(()),
        }),
    }
}

/// A principal match for a service account in any trust domain (a trust domain
/// holds no `/`, so the suffix pins namespace and account).
fn account_principal(sa: &aw::ServiceAccountMatch) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Suffix(format!(
            "/ns/{}/sa/{}",
            sa.namespace, sa.service_account
        ))),
    }
}

/// A principal match for a trust-domain match, where one exists: the principal starts
/// with the trust domain and a `/`.
fn trust_domain_principal(m: &aw::StringMatch) -> Option<sec::StringMatch> {
    use aw::string_match::MatchType as A;
    use sec::string_match::MatchType as I;
    let t = match m.match_type.as_ref()? {
        A::Exact(td) => I::Prefix(format!("{td}/")),
        A::Prefix(p) if !p.contains('/') => I::Prefix(p.clone()),
        A::Presence(_) => I::Presence(()),
        // A suffix of the trust domain is in the middle of the principal.
        _ => return None,
    };
    Some(sec::StringMatch {
        match_type: Some(t),
    })
}

fn cidr(c: &aw::CidrAddress) -> sec::Address {
    sec::Address {
        address: c.address.clone(),
        length: c.length,
    }
}

/// One match in Istio's fields. Negative identity lists merge into `not_principals`
/// (none of several lists ⇔ none of their union); positive ones translate when at most
/// one of principals, service accounts and trust domains is set, and otherwise fail
/// closed for `action`.
fn match_of(m: &aw::AuthorizationMatch, action: sec::Action) -> sec::Match {
    let mut not_principals: Vec<sec::StringMatch> =
        m.not_principals.iter().map(string_match).collect();
    not_principals.extend(m.not_service_accounts.iter().map(account_principal));
    let mut expressible = true;
    for td in &m.not_trust_domains {
        match trust_domain_principal(td) {
            Some(p) => not_principals.push(p),
            None => expressible = false,
        }
    }
    let positive: Vec<Vec<sec::StringMatch>> = [
        m.principals.iter().map(string_match).collect::<Vec<_>>(),
        m.service_accounts.iter().map(account_principal).collect(),
        m.trust_domains
            .iter()
            .map(|td| trust_domain_principal(td).ok_or(()))
            .collect::<Result<Vec<_>, ()>>()
            .unwrap_or_else(|()| {
                expressible = false;
                Vec::new()
            }),
    ]
    .into_iter()
    .filter(|list| !list.is_empty())
    .collect();
    if positive.len() > 1 || !expressible {
        return fail_closed(action);
    }
    sec::Match {
        namespaces: m.namespaces.iter().map(string_match).collect(),
        not_namespaces: m.not_namespaces.iter().map(string_match).collect(),
        principals: positive.into_iter().next().unwrap_or_default(),
        not_principals,
        source_ips: m.source_ips.iter().map(cidr).collect(),
        not_source_ips: m.not_source_ips.iter().map(cidr).collect(),
        destination_ips: m.destination_ips.iter().map(cidr).collect(),
        not_destination_ips: m.not_destination_ips.iter().map(cidr).collect(),
        destination_ports: m.destination_ports.clone(),
        not_destination_ports: m.not_destination_ports.clone(),
    }
}

/// A match Istio's fields cannot carry: in a DENY policy it matches everything (the
/// empty match), in an ALLOW one nothing (an identity both present and absent).
fn fail_closed(action: sec::Action) -> sec::Match {
    match action {
        sec::Action::Deny => sec::Match::default(),
        sec::Action::Allow => {
            let presence = || sec::StringMatch {
                match_type: Some(sec::string_match::MatchType::Presence(())),
            };
            sec::Match {
                principals: vec![presence()],
                not_principals: vec![presence()],
                ..sec::Match::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ambit_core::model::MeshConfig;

    fn istio(yaml: &str) -> IstioResources {
        let config: MeshConfig = serde_yaml_ng::from_str(yaml).unwrap();
        let resources = ambit_net::xds::to_resources(&config);
        translate(resources.iter(), &"example.org".parse().unwrap())
    }

    #[test]
    fn workloads_and_services_carry_istios_fields_with_full_port_lists() {
        let out = istio(
            "workloads:\n\
             - {uid: shop/web-1, name: web-1, namespace: shop, node: node-b, ips: [10.2.0.2], protocol: HBONE,\n\
                workloadKind: Deployment, workloadName: web}\n\
             - {uid: shop/job-1, name: job-1, namespace: shop, serviceAccount: batch, node: node-a, ips: [10.1.0.9], workloadKind: Job}\n\
             services:\n\
             - {name: web, namespace: shop, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}, {port: 90, targetPort: 9090}],\n\
                endpoints: [{workloadUid: shop/web-1, ports: [{port: 90, targetPort: 9999}]}]}\n",
        );
        let names: Vec<&str> = out.addresses.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "shop/job-1",
                "shop/web-1",
                "shop/web.shop.svc.cluster.local"
            ]
        );
        let Some(iw::address::Type::Workload(w)) = &out.addresses["shop/web-1"].r#type else {
            panic!()
        };
        assert_eq!(w.uid, "shop/web-1");
        assert_eq!(w.addresses, [vec![10, 2, 0, 2]]);
        assert_eq!(w.tunnel_protocol(), iw::TunnelProtocol::Hbone);
        assert_eq!(
            (w.trust_domain.as_str(), w.service_account.as_str()),
            ("example.org", "default")
        );
        assert_eq!(w.workload_type(), iw::WorkloadType::Deployment);
        let ports = &w.services["shop/web.shop.svc.cluster.local"].ports;
        assert_eq!(
            ports
                .iter()
                .map(|p| (p.service_port, p.target_port))
                .collect::<Vec<_>>(),
            [(80, 8080), (90, 9999)]
        );
        let Some(iw::address::Type::Workload(job)) = &out.addresses["shop/job-1"].r#type else {
            panic!()
        };
        assert_eq!(job.tunnel_protocol(), iw::TunnelProtocol::None);
        assert_eq!(job.workload_type(), iw::WorkloadType::Job);
        assert_eq!(job.service_account, "batch");
        let Some(iw::address::Type::Service(s)) =
            &out.addresses["shop/web.shop.svc.cluster.local"].r#type
        else {
            panic!()
        };
        assert_eq!(s.hostname, "web.shop.svc.cluster.local");
        assert_eq!(s.addresses[0].address, [10, 96, 0, 10]);
        assert_eq!(s.ports.len(), 2);
        assert!(out.authorizations.is_empty());
    }

    #[test]
    fn policies_translate_into_istios_fields_or_fail_closed() {
        let out = istio(
            "policies:\n\
             - {scope: NAMESPACE, namespace: shop, name: allow-sa, action: ALLOW, rules: [{clauses: [{matches: [\n\
                 {serviceAccounts: [{namespace: shop, name: cart}], notTrustDomains: [evil.org], destinationPorts: [8080]}]}]}]}\n\
             - {scope: NAMESPACE, namespace: shop, name: allow-both, action: ALLOW, rules: [{clauses: [{matches: [\n\
                 {principals: [cluster.local/ns/a/sa/b], trustDomains: [cluster.local]}]}]}]}\n\
             - {scope: NAMESPACE, namespace: shop, name: deny-both, action: DENY, rules: [{clauses: [{matches: [\n\
                 {principals: [cluster.local/ns/a/sa/b], serviceAccounts: [{namespace: a, name: b}]}]}]}]}\n\
             - {scope: GLOBAL, namespace: istio-system, name: custom, action: CUSTOM, rules: [{}]}\n\
             - {scope: GLOBAL, namespace: istio-system, name: audit, action: AUDIT, rules: [{}]}\n",
        );
        let names: Vec<&str> = out.authorizations.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "istio-system/custom",
                "shop/allow-both",
                "shop/allow-sa",
                "shop/deny-both"
            ]
        );
        let first = |name: &str| out.authorizations[name].rules[0].clauses[0].matches[0].clone();
        use sec::string_match::MatchType as T;
        let sm = |t: T| sec::StringMatch {
            match_type: Some(t),
        };
        assert_eq!(
            first("shop/allow-sa"),
            sec::Match {
                principals: vec![sm(T::Suffix("/ns/shop/sa/cart".into()))],
                not_principals: vec![sm(T::Prefix("evil.org/".into()))],
                destination_ports: vec![8080],
                ..sec::Match::default()
            }
        );
        // Two positive identity lists: an ALLOW never matches, a DENY always does.
        assert_eq!(
            first("shop/allow-both"),
            sec::Match {
                principals: vec![sm(T::Presence(()))],
                not_principals: vec![sm(T::Presence(()))],
                ..sec::Match::default()
            }
        );
        assert_eq!(first("shop/deny-both"), sec::Match::default());
        let custom = &out.authorizations["istio-system/custom"];
        assert_eq!(
            (custom.action(), custom.scope()),
            (sec::Action::Deny, sec::Scope::Global)
        );
    }
}
