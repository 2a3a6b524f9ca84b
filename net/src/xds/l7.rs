//! The waypoints' L7 authorization policies as xDS resources, both ways: an
//! [`L7PolicySpec`] becomes an [`L7Authorization`] named `l7authz/<namespace>/<name>`
//! whose values are in Istio's notation, and a received one is read back through
//! `ambit_core::l7`'s parsers, so a value the control plane could not have produced
//! (a bad path template, a CIDR that does not parse, an unknown target kind) rejects
//! that resource alone.

use ambit_core::authz::{Action, Cidr, StringMatch};
use ambit_core::l7::{
    self, Condition, HostMatch, Operation, PathMatch, Policy, RequestPrincipalMatch, Rule, Source,
};
use ambit_core::model::{L7PolicySpec, PolicyTarget, TargetKind};
use ambit_proto::workload::{
    AuthorizationAction, L7Authorization, L7Condition, L7Operation, L7PolicyTarget, L7Rule,
    L7Source,
};

/// The resource name of a waypoint policy.
pub fn l7_policy_name(namespace: &str, name: &str) -> String {
    format!("l7authz/{namespace}/{name}")
}

/// The resource of `spec`.
pub fn l7_policy_to_proto(spec: &L7PolicySpec) -> L7Authorization {
    let p = &spec.policy;
    L7Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        action: match p.action {
            Action::Allow => AuthorizationAction::Allow,
            Action::Deny => AuthorizationAction::Deny,
            Action::Audit => AuthorizationAction::Audit,
            Action::Custom => AuthorizationAction::Custom,
        } as i32,
        rules: p.rules.iter().map(rule_to_proto).collect(),
        dry_run: p.dry_run,
        condition: spec
            .condition
            .as_ref()
            .map(super::resources::condition_to_proto),
        targets: spec.targets.iter().map(target_to_proto).collect(),
    }
}

fn texts<T: ToString>(list: &[T]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

fn rule_to_proto(r: &Rule) -> L7Rule {
    L7Rule {
        from: r
            .from
            .iter()
            .map(|s| L7Source {
                principals: texts(&s.principals),
                request_principals: texts(&s.request_principals),
                namespaces: texts(&s.namespaces),
                ip_blocks: texts(&s.ip_blocks),
                not_principals: texts(&s.not_principals),
                not_request_principals: texts(&s.not_request_principals),
                not_namespaces: texts(&s.not_namespaces),
                not_ip_blocks: texts(&s.not_ip_blocks),
                remote_ip_blocks: texts(&s.remote_ip_blocks),
                not_remote_ip_blocks: texts(&s.not_remote_ip_blocks),
                service_accounts: s
                    .service_accounts
                    .iter()
                    .map(|a| format!("{}/{}", a.namespace, a.name))
                    .collect(),
                not_service_accounts: s
                    .not_service_accounts
                    .iter()
                    .map(|a| format!("{}/{}", a.namespace, a.name))
                    .collect(),
                trust_domains: texts(&s.trust_domains),
                not_trust_domains: texts(&s.not_trust_domains),
            })
            .collect(),
        to: r
            .to
            .iter()
            .map(|o| L7Operation {
                hosts: texts(&o.hosts),
                ports: o.ports.iter().map(|p| u32::from(*p)).collect(),
                methods: texts(&o.methods),
                paths: texts(&o.paths),
                not_hosts: texts(&o.not_hosts),
                not_ports: o.not_ports.iter().map(|p| u32::from(*p)).collect(),
                not_methods: texts(&o.not_methods),
                not_paths: texts(&o.not_paths),
            })
            .collect(),
        when: r
            .when
            .iter()
            .map(|c| {
                let (key, values, not_values) = c.to_parts();
                L7Condition {
                    key,
                    values,
                    not_values,
                }
            })
            .collect(),
    }
}

pub(super) fn target_to_proto(t: &PolicyTarget) -> L7PolicyTarget {
    let (group, kind) = match t.kind {
        TargetKind::Gateway => ("gateway.networking.k8s.io", "Gateway"),
        TargetKind::GatewayClass => ("gateway.networking.k8s.io", "GatewayClass"),
        TargetKind::Service => ("", "Service"),
        TargetKind::ServiceEntry => ("networking.istio.io", "ServiceEntry"),
    };
    L7PolicyTarget {
        group: group.into(),
        kind: kind.into(),
        name: t.name.clone(),
        namespace: t.namespace.clone(),
    }
}

/// Reads a received resource; the error says what is unusable in it.
pub fn l7_policy_from_proto(a: &L7Authorization) -> Result<L7PolicySpec, String> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err("L7 authorization policy without a name or namespace".into());
    }
    let action = match AuthorizationAction::try_from(a.action) {
        Ok(AuthorizationAction::Allow) => Action::Allow,
        Ok(AuthorizationAction::Deny) => Action::Deny,
        Ok(AuthorizationAction::Audit) => Action::Audit,
        Ok(AuthorizationAction::Custom) => Action::Custom,
        Err(_) => return Err(format!("unknown action {}", a.action)),
    };
    let rules = a
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule_from_proto(r).map_err(|e| format!("rules[{i}]: {e}")))
        .collect::<Result<_, _>>()?;
    let targets = a
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| target_from_proto(t).map_err(|e| format!("targets[{i}]: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(L7PolicySpec {
        targets,
        policy: Policy {
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            action,
            dry_run: a.dry_run,
            rules,
        },
        condition: a
            .condition
            .as_ref()
            .map(super::resources::condition_from_proto),
    })
}

/// Each value of `list` read by `parse`; an empty one is refused (the control plane
/// never sends one).
fn each<T>(
    list: &[String],
    field: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            if v.is_empty() {
                return Err(format!("{field}[{i}]: empty"));
            }
            parse(v).map_err(|e| format!("{field}[{i}]: {e}"))
        })
        .collect()
}

fn string(v: &str) -> Result<StringMatch, String> {
    Ok(StringMatch::parse(v))
}

fn cidr(v: &str) -> Result<Cidr, String> {
    Cidr::parse(v)
}

fn account(v: &str) -> Result<l7::ServiceAccountRef, String> {
    // Always written `namespace/name`: a bare name has no namespace to complete it.
    l7::parse_service_account(v, "")
}

fn ports(list: &[u32], field: &str) -> Result<Vec<u16>, String> {
    list.iter()
        .map(|p| u16::try_from(*p).map_err(|_| format!("{field}: port {p} out of range")))
        .collect()
}

fn rule_from_proto(r: &L7Rule) -> Result<Rule, String> {
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let source = || -> Result<Source, String> {
                Ok(Source {
                    principals: each(&s.principals, "principals", string)?,
                    not_principals: each(&s.not_principals, "notPrincipals", string)?,
                    request_principals: each(&s.request_principals, "requestPrincipals", |v| {
                        Ok(RequestPrincipalMatch::parse(v))
                    })?,
                    not_request_principals: each(
                        &s.not_request_principals,
                        "notRequestPrincipals",
                        |v| Ok(RequestPrincipalMatch::parse(v)),
                    )?,
                    namespaces: each(&s.namespaces, "namespaces", string)?,
                    not_namespaces: each(&s.not_namespaces, "notNamespaces", string)?,
                    service_accounts: each(&s.service_accounts, "serviceAccounts", account)?,
                    not_service_accounts: each(
                        &s.not_service_accounts,
                        "notServiceAccounts",
                        account,
                    )?,
                    ip_blocks: each(&s.ip_blocks, "ipBlocks", cidr)?,
                    not_ip_blocks: each(&s.not_ip_blocks, "notIpBlocks", cidr)?,
                    remote_ip_blocks: each(&s.remote_ip_blocks, "remoteIpBlocks", cidr)?,
                    not_remote_ip_blocks: each(&s.not_remote_ip_blocks, "notRemoteIpBlocks", cidr)?,
                    trust_domains: each(&s.trust_domains, "trustDomains", l7::parse_trust_domain)?,
                    not_trust_domains: each(
                        &s.not_trust_domains,
                        "notTrustDomains",
                        l7::parse_trust_domain,
                    )?,
                })
            };
            source().map_err(|e| format!("from[{i}].{e}"))
        })
        .collect::<Result<_, _>>()?;
    let to =
        r.to.iter()
            .enumerate()
            .map(|(i, o)| {
                let host = |v: &str| Ok(HostMatch::parse(v));
                let operation = || -> Result<Operation, String> {
                    Ok(Operation {
                        hosts: each(&o.hosts, "hosts", host)?,
                        not_hosts: each(&o.not_hosts, "notHosts", host)?,
                        ports: ports(&o.ports, "ports")?,
                        not_ports: ports(&o.not_ports, "notPorts")?,
                        methods: each(&o.methods, "methods", string)?,
                        not_methods: each(&o.not_methods, "notMethods", string)?,
                        paths: each(&o.paths, "paths", PathMatch::parse)?,
                        not_paths: each(&o.not_paths, "notPaths", PathMatch::parse)?,
                    })
                };
                operation().map_err(|e| format!("to[{i}].{e}"))
            })
            .collect::<Result<_, _>>()?;
    let when = r
        .when
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Condition::parse(&c.key, &c.values, &c.not_values, "")
                .map_err(|e| format!("when[{i}] ({}): {e}", c.key))
        })
        .collect::<Result<_, _>>()?;
    Ok(Rule { from, to, when })
}

pub(super) fn target_from_proto(t: &L7PolicyTarget) -> Result<PolicyTarget, String> {
    let kind = match (t.group.as_str(), t.kind.as_str()) {
        ("gateway.networking.k8s.io", "Gateway") => TargetKind::Gateway,
        ("gateway.networking.k8s.io", "GatewayClass") => TargetKind::GatewayClass,
        ("" | "core", "Service") => TargetKind::Service,
        ("networking.istio.io", "ServiceEntry") => TargetKind::ServiceEntry,
        (group, kind) => return Err(format!("kind {kind:?} of group {group:?} is not a target")),
    };
    if t.name.is_empty() {
        return Err("a target without a name".into());
    }
    if kind != TargetKind::GatewayClass && t.namespace.is_empty() {
        return Err(format!("{kind:?} {} without a namespace", t.name));
    }
    Ok(PolicyTarget {
        kind,
        namespace: t.namespace.clone(),
        name: t.name.clone(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> L7PolicySpec {
        serde_yaml_ng::from_str(
            r#"
targets:
- {kind: Gateway, namespace: shop, name: waypoint}
- {kind: GatewayClass, name: istio-waypoint}
- {kind: Service, namespace: shop, name: web}
- {kind: ServiceEntry, namespace: shop, name: ext}
policy:
  namespace: shop
  name: every-field
  action: DENY
  dryRun: true
  rules:
  - from:
    - principals: [cluster.local/ns/shop/sa/client, "*"]
      notPrincipals: ["*/sa/web"]
      requestPrincipals: ["https://issuer.example/*", "*"]
      notRequestPrincipals: [iss]
      namespaces: [shop, "a*b"]
      notNamespaces: [legacy]
      ipBlocks: [10.1.0.0/16, "fd10::/16"]
      notIpBlocks: [10.1.0.9/32]
      remoteIpBlocks: [192.0.2.0/24]
      notRemoteIpBlocks: [192.0.2.7/32]
      trustDomains: ["*.local"]
      notTrustDomains: [other.org]
    - serviceAccounts: [{namespace: shop, name: client}]
      notServiceAccounts: [{namespace: shop, name: web}]
    to:
    - hosts: ["web.*", "*.shop:8080"]
      notHosts: [evil.example]
      ports: [80, 8080]
      notPorts: [81]
      methods: [GET, "PO*"]
      notMethods: [DELETE]
      paths: ["/api/{*}/items/{**}", "/static/*", "*.png", "*"]
      notPaths: [/admin]
    when:
    - {key: "request.headers[x-user]", values: [bob], notValues: ["eve*"]}
    - {key: source.serviceAccount, values: [shop/client]}
    - {key: remote.ip, values: [192.0.2.0/24]}
    - {key: "request.auth.claims[realm][role]", values: [admin]}
    - {key: "experimental.envoy.filters.network.mysql_proxy[db.table]", values: ["[t]"]}
    - {key: destination.port, notValues: ["9090"]}
  - {}
condition: {accepted: true, reason: Accepted, message: enforced by the waypoint}
"#,
        )
        .unwrap()
    }

    #[test]
    fn an_l7_policy_survives_the_round_trip_through_its_resource() {
        let spec = spec();
        let proto = l7_policy_to_proto(&spec);
        assert_eq!(proto.targets[2].group, "");
        assert_eq!(proto.rules[0].when[0].key, "request.headers[x-user]");
        assert_eq!(proto.rules[0].from[1].service_accounts, ["shop/client"]);
        assert_eq!(l7_policy_from_proto(&proto).unwrap(), spec);
        assert_eq!(l7_policy_name("shop", "p"), "l7authz/shop/p");
    }

    #[test]
    fn l7_policies_travel_as_named_resources_and_a_bad_one_is_rejected_alone() {
        use crate::xds::{from_resources, to_resources};
        use ambit_proto::workload::address;
        let mut other = spec();
        other.policy.name = "other".into();
        let config = ambit_core::model::MeshConfig {
            l7_policies: vec![spec(), other.clone()],
            ..Default::default()
        };
        let mut resources = to_resources(&config);
        let names: Vec<&str> = resources.keys().map(String::as_str).collect();
        assert_eq!(names, ["l7authz/shop/every-field", "l7authz/shop/other"]);
        let (received, errors) = from_resources(&resources);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(received, config);

        let Some(address::Type::L7Authorization(a)) =
            &mut resources.get_mut("l7authz/shop/other").unwrap().r#type
        else {
            panic!("not an L7 policy");
        };
        a.rules[0].when[0].values = vec![];
        a.rules[0].when[0].not_values = vec![];
        let (received, errors) = from_resources(&resources);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].name, "l7authz/shop/other");
        assert!(errors[0].reason.contains("one of values"), "{}", errors[0]);
        assert_eq!(received.l7_policies, [spec()]);
    }

    #[test]
    fn an_unusable_l7_policy_is_refused_with_what_is_wrong() {
        let good = l7_policy_to_proto(&spec());
        type Spoil = Box<dyn Fn(&mut L7Authorization)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("without a name", Box::new(|a| a.name.clear())),
            ("unknown action 9", Box::new(|a| a.action = 9)),
            (
                "rules[0]: to[0].paths[0]",
                Box::new(|a| a.rules[0].to[0].paths[0] = "/{**}/{*}".into()),
            ),
            (
                "rules[0]: from[0].ipBlocks[1]",
                Box::new(|a| a.rules[0].from[0].ip_blocks[1] = "nope".into()),
            ),
            (
                "rules[0]: from[0].principals[0]: empty",
                Box::new(|a| a.rules[0].from[0].principals[0].clear()),
            ),
            (
                "from[1].serviceAccounts[0]",
                Box::new(|a| a.rules[0].from[1].service_accounts[0] = "client".into()),
            ),
            (
                "to[0].ports: port 70000",
                Box::new(|a| a.rules[0].to[0].ports[0] = 70000),
            ),
            (
                "when[0] (request.headers[x y])",
                Box::new(|a| a.rules[0].when[0].key = "request.headers[x y]".into()),
            ),
            (
                "targets[1]: kind \"Deployment\"",
                Box::new(|a| a.targets[1].kind = "Deployment".into()),
            ),
            (
                "targets[0]: Gateway waypoint without a namespace",
                Box::new(|a| a.targets[0].namespace.clear()),
            ),
        ];
        for (want, spoil) in cases {
            let mut bad = good.clone();
            spoil(&mut bad);
            let err = l7_policy_from_proto(&bad).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
