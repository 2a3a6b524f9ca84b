//! The waypoint (L7) projection of an AuthorizationPolicy attached with `targetRefs`
//! (or the deprecated `targetRef`): every field as written, validated as Istio's
//! admission does (reference §1.6) with the same checks and messages as the L4
//! projection, plus what only L7 reads (path templates, header names).
//!
//! Targets ([`Targets`], shared with RequestAuthentication, `crate::request_authn`):
//! `Gateway` and `GatewayClass` (group `gateway.networking.k8s.io`; a class
//! only from the root namespace and only `istio-waypoint`), `Service` (group `""` or
//! `core`), `ServiceEntry` (group `networking.istio.io`); at most 16; `namespace`
//! empty or the policy's own.
//!
//! An invalid policy fails closed at the targets that are valid: an invalid ALLOW
//! allows nothing there, an invalid AUDIT audits nothing, any other invalid policy
//! (or one whose action cannot be read) denies everything there. Its condition names
//! the field at fault.

use super::*;

/// `targetRefs[]`: Istio's PolicyTargetReference.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TargetRef {
    group: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
}

/// At most this many `targetRefs`.
pub(crate) const MAX_TARGETS: usize = 16;

/// A policy's `targetRef`/`targetRefs` as written: the valid targets, the first
/// error, and how many were written. `None` when it has neither.
pub(crate) struct Targets {
    pub(crate) valid: Vec<PolicyTarget>,
    pub(crate) error: Option<String>,
    pub(crate) written: usize,
}

impl Targets {
    /// Read from the document itself, so that a policy whose spec cannot be read still
    /// fails closed where it was attached.
    pub(crate) fn read(spec: &Value, key: &ObjectKey, root_namespace: &str) -> Option<Targets> {
        let mut refs: Vec<(String, &Value)> = Vec::new();
        let mut error = None;
        if let Some(r) = spec.get("targetRef").filter(|r| !r.is_null()) {
            refs.push(("spec.targetRef".into(), r));
        }
        match spec.get("targetRefs") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                refs.extend(
                    list.iter()
                        .enumerate()
                        .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
                );
            }
            Some(_) => error = Some("spec.targetRefs: must be a list".to_owned()),
        }
        if refs.is_empty() && error.is_none() {
            return None;
        }
        let mut valid = Vec::new();
        for (path, r) in &refs {
            match target(r, path, key, root_namespace) {
                Ok(t) => valid.push(t),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        Some(Targets {
            valid,
            error,
            written: refs.len(),
        })
    }

    /// Every target written is valid (and there is one): an invalid policy can fail
    /// closed exactly there.
    pub(crate) fn complete(&self) -> bool {
        self.error.is_none() && !self.valid.is_empty()
    }
}

pub(super) fn waypoint_projection(
    key: &ObjectKey,
    read: &Read<'_>,
    root_namespace: &str,
) -> Option<WaypointPolicy> {
    let Targets {
        valid: targets,
        error: target_error,
        written,
    } = Targets::read(read.spec, key, root_namespace)?;
    let invalid = |message: String| closed(key, read, targets.clone(), message);
    if let Some(why) = read.unreadable {
        return Some(invalid(format!("unreadable: {why}")));
    }
    let Some(action) = read.action else {
        return Some(invalid(format!(
            "spec.action: {:?} is not ALLOW, DENY, AUDIT or CUSTOM",
            read.action_text
        )));
    };
    if let Some(e) = target_error.clone() {
        return Some(invalid(e));
    }
    let parsed = match &read.parsed {
        Ok(p) => p,
        Err(e) => return Some(invalid(e.clone())),
    };
    if parsed.selector.is_some() || (parsed.target_ref.is_some() && parsed.target_refs.is_some()) {
        return Some(invalid(
            "spec: only one of selector, targetRef and targetRefs may be set".into(),
        ));
    }
    if written > MAX_TARGETS {
        return Some(invalid(format!(
            "spec.targetRefs: at most {MAX_TARGETS} entries, not {written}"
        )));
    }
    if parsed.provider.is_some() && action != Action::Custom {
        return Some(invalid(
            "spec.provider: only a CUSTOM policy names a provider".into(),
        ));
    }
    let rules_spec = parsed.rules.as_deref().unwrap_or_default();
    if rules_spec.is_empty() && matches!(action, Action::Deny | Action::Custom) {
        return Some(invalid(format!(
            "spec.rules: a {} policy without rules is meaningless",
            read.action_text
        )));
    }
    let mut rules = Vec::new();
    for (i, rule) in rules_spec.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let Some(rule) = rule else {
            return Some(invalid(format!("{path}: a rule may not be null")));
        };
        match l7_rule(rule, &path, action, &key.namespace) {
            Ok(r) => rules.push(r),
            Err(e) => return Some(invalid(e)),
        }
    }
    let policy = l7::Policy {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        action,
        dry_run: read.dry_run,
        rules,
    };
    let acceptance = accepted(&policy, parsed);
    Some(WaypointPolicy {
        targets,
        policy,
        acceptance,
    })
}

/// The condition of a valid policy: accepted, with what is worth knowing.
fn accepted(policy: &l7::Policy, parsed: &Spec) -> Acceptance {
    if policy.action == Action::Custom {
        let provider = parsed
            .provider
            .as_ref()
            .and_then(|p| p.get("name"))
            .and_then(Value::as_str)
            .map(|n| format!(" (provider {n:?})"))
            .unwrap_or_default();
        return Acceptance {
            accepted: false,
            reason: "UnsupportedValue",
            message: format!(
                "CUSTOM: Ambit has no external authorization provider{provider}; the waypoint denies the requests its rules match"
            ),
        };
    }
    let mut message = if policy.dry_run {
        "enforced by the waypoint in dry-run: evaluated and logged, never applied".to_owned()
    } else {
        "enforced by the waypoint".to_owned()
    };
    if policy.action == Action::Deny {
        // §1.6's warning: on plain TCP its HTTP attributes are ignored.
        let projected = policy.tcp_projection();
        for (i, (rule, tcp)) in policy.rules.iter().zip(&projected.rules).enumerate() {
            let everything = tcp.from.iter().all(|s| *s == l7::Source::default())
                && tcp.to.iter().all(|o| *o == l7::Operation::default())
                && tcp.when.is_empty();
            if rule.is_http() && everything {
                message.push_str(&format!(
                    "; spec.rules[{i}] uses only HTTP attributes, so it denies all plain TCP traffic at its targets"
                ));
            }
        }
    }
    Acceptance {
        accepted: true,
        reason: "Accepted",
        message,
    }
}

/// An invalid policy, closed: ALLOW allows nothing, AUDIT audits nothing, anything
/// else (an unreadable action included) denies everything, at `targets`.
fn closed(
    key: &ObjectKey,
    read: &Read<'_>,
    targets: Vec<PolicyTarget>,
    message: String,
) -> WaypointPolicy {
    let action = read.action.unwrap_or(Action::Deny);
    let (rules, effect) = match action {
        Action::Allow => (Vec::new(), "it allows nothing at its targets"),
        Action::Audit => (Vec::new(), "it audits nothing"),
        Action::Deny | Action::Custom => (
            vec![l7::Rule::default()],
            "it denies everything at its targets",
        ),
    };
    let nowhere = if targets.is_empty() {
        " (it has no valid target, so it applies nowhere)"
    } else {
        ""
    };
    WaypointPolicy {
        targets,
        policy: l7::Policy {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            action,
            dry_run: read.dry_run,
            rules,
        },
        acceptance: Acceptance {
            accepted: false,
            reason: "Invalid",
            message: format!("{message}; {effect}{nowhere}"),
        },
    }
}

fn target(
    value: &Value,
    path: &str,
    key: &ObjectKey,
    root_namespace: &str,
) -> Result<PolicyTarget, String> {
    let r: TargetRef = serde_json::from_value(value.clone()).map_err(|e| format!("{path}: {e}"))?;
    let present = |s: Option<String>| s.filter(|s| !s.is_empty());
    let kind = present(r.kind).ok_or_else(|| format!("{path}.kind: is required"))?;
    let name = present(r.name).ok_or_else(|| format!("{path}.name: is required"))?;
    let group = r.group.unwrap_or_default();
    if let Some(ns) = present(r.namespace) {
        if ns != key.namespace {
            return Err(format!(
                "{path}.namespace: {ns:?}: a policy attaches only to objects of its own namespace ({})",
                key.namespace
            ));
        }
    }
    let (kind, namespace) = match (kind.as_str(), group.as_str()) {
        ("Gateway", "gateway.networking.k8s.io") => (TargetKind::Gateway, key.namespace.clone()),
        ("GatewayClass", "gateway.networking.k8s.io") => {
            if key.namespace != root_namespace {
                return Err(format!(
                    "{path}: only a policy of the root namespace ({root_namespace}) may target a GatewayClass"
                ));
            }
            if name != WAYPOINT_GATEWAY_CLASS {
                return Err(format!(
                    "{path}.name: {name:?}: the GatewayClass of waypoints is {WAYPOINT_GATEWAY_CLASS}"
                ));
            }
            (TargetKind::GatewayClass, String::new())
        }
        ("Service", "" | "core") => (TargetKind::Service, key.namespace.clone()),
        ("ServiceEntry", "networking.istio.io") => {
            (TargetKind::ServiceEntry, key.namespace.clone())
        }
        (kind, group) => {
            return Err(format!(
                "{path}: kind {kind:?} of group {group:?} cannot be targeted (Gateway or GatewayClass of gateway.networking.k8s.io, Service of the core group, ServiceEntry of networking.istio.io)"
            ))
        }
    };
    Ok(PolicyTarget {
        kind,
        namespace,
        name,
    })
}

fn l7_rule(
    rule: &RuleSpec,
    path: &str,
    action: Action,
    namespace: &str,
) -> Result<l7::Rule, String> {
    let mut out = l7::Rule::default();
    if let Some(from) = &rule.from {
        if from.is_empty() {
            return Err(format!("{path}.from: may not be empty (leave it out)"));
        }
        for (i, entry) in from.iter().enumerate() {
            let p = format!("{path}.from[{i}].source");
            let source = entry
                .as_ref()
                .and_then(|f| f.source.as_ref())
                .ok_or_else(|| format!("{p}: is required"))?;
            out.from.push(l7_source(source, &p, action, namespace)?);
        }
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            return Err(format!("{path}.to: may not be empty (leave it out)"));
        }
        for (i, entry) in to.iter().enumerate() {
            let p = format!("{path}.to[{i}].operation");
            let operation = entry
                .as_ref()
                .and_then(|t| t.operation.as_ref())
                .ok_or_else(|| format!("{p}: is required"))?;
            out.to.push(l7_operation(operation, &p)?);
        }
    }
    for (i, condition) in rule.when.iter().flatten().enumerate() {
        let p = format!("{path}.when[{i}]");
        let c = condition
            .as_ref()
            .ok_or_else(|| format!("{p}: may not be null"))?;
        let key = c.key.as_deref().unwrap_or_default();
        let condition = l7::Condition::parse(
            key,
            c.values.as_deref().unwrap_or_default(),
            c.not_values.as_deref().unwrap_or_default(),
            namespace,
        )
        .map_err(|e| {
            if e.starts_with("key:") || e.starts_with("values[") || e.starts_with("notValues[") {
                format!("{p}.{e}")
            } else {
                format!("{p}: {e}")
            }
        })?;
        if action == Action::Custom && condition.is_identity() {
            return Err(format!("{p}.key: {key} is not allowed in a CUSTOM policy"));
        }
        out.when.push(condition);
    }
    Ok(out)
}

fn l7_source(
    s: &Source,
    path: &str,
    action: Action,
    namespace: &str,
) -> Result<l7::Source, String> {
    // The L4 reading checks every rule both projections share.
    source_match(s, path, action, namespace, &mut Vec::new())?;
    let request_principals = |list: &List| -> Vec<l7::RequestPrincipalMatch> {
        list.iter()
            .flatten()
            .map(|v| l7::RequestPrincipalMatch::parse(v))
            .collect()
    };
    Ok(l7::Source {
        principals: strings(&s.principals, path, "principals")?,
        not_principals: strings(&s.not_principals, path, "notPrincipals")?,
        request_principals: request_principals(&s.request_principals),
        not_request_principals: request_principals(&s.not_request_principals),
        namespaces: strings(&s.namespaces, path, "namespaces")?,
        not_namespaces: strings(&s.not_namespaces, path, "notNamespaces")?,
        service_accounts: service_accounts(
            &s.service_accounts,
            path,
            "serviceAccounts",
            namespace,
        )?,
        not_service_accounts: service_accounts(
            &s.not_service_accounts,
            path,
            "notServiceAccounts",
            namespace,
        )?,
        ip_blocks: cidrs(&s.ip_blocks, path, "ipBlocks")?,
        not_ip_blocks: cidrs(&s.not_ip_blocks, path, "notIpBlocks")?,
        remote_ip_blocks: cidrs(&s.remote_ip_blocks, path, "remoteIpBlocks")?,
        not_remote_ip_blocks: cidrs(&s.not_remote_ip_blocks, path, "notRemoteIpBlocks")?,
        trust_domains: trust_domains(&s.trust_domains, path, "trustDomains")?,
        not_trust_domains: trust_domains(&s.not_trust_domains, path, "notTrustDomains")?,
    })
}

fn l7_operation(o: &Operation, path: &str) -> Result<l7::Operation, String> {
    operation_match(o, path, &mut Vec::new())?;
    let hosts = |list: &List| -> Vec<l7::HostMatch> {
        list.iter()
            .flatten()
            .map(|v| l7::HostMatch::parse(v))
            .collect()
    };
    let methods = |list: &List| -> Vec<StringMatch> {
        list.iter()
            .flatten()
            .map(|v| StringMatch::parse(v))
            .collect()
    };
    let paths = |list: &List, field: &str| -> Result<Vec<l7::PathMatch>, String> {
        list.iter()
            .flatten()
            .enumerate()
            .map(|(i, v)| l7::PathMatch::parse(v).map_err(|e| format!("{path}.{field}[{i}]: {e}")))
            .collect()
    };
    Ok(l7::Operation {
        hosts: hosts(&o.hosts),
        not_hosts: hosts(&o.not_hosts),
        ports: ports(&o.ports, path, "ports")?,
        not_ports: ports(&o.not_ports, path, "notPorts")?,
        methods: methods(&o.methods),
        not_methods: methods(&o.not_methods),
        paths: paths(&o.paths, "paths")?,
        not_paths: paths(&o.not_paths, "notPaths")?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ambit_core::l7::{evaluate, normalize_path, Connection, Denial, Request};
    use ambit_core::SpiffeId;
    use serde_json::json;

    fn tr(ns: &str, spec: Value) -> TranslatedPolicy {
        translate_policy(&ObjectKey::new(ns, "p"), None, &spec, "istio-system")
    }

    fn waypoint(ns: &str, spec: Value) -> WaypointPolicy {
        tr(ns, spec).waypoint.expect("a waypoint projection")
    }

    fn web() -> Value {
        json!([{"kind": "Service", "group": "", "name": "web"}])
    }

    fn target(kind: TargetKind, ns: &str, name: &str) -> PolicyTarget {
        PolicyTarget {
            kind,
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// `method path` from shop/client with header `x-user: bob`.
    fn allowed(p: &l7::Policy, method: &str, path: &str) -> Result<(), Denial> {
        let peer = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/client").unwrap();
        let path = normalize_path(path).unwrap();
        let headers: &[(&str, &str)] = &[("x-user", "bob")];
        let request = Request {
            connection: Connection {
                peer: Some(&peer),
                source_ip: "10.1.0.2".parse().unwrap(),
                destination_ip: "10.96.0.10".parse().unwrap(),
                destination_port: 80,
                sni: None,
            },
            remote_ip: "10.1.0.2".parse().unwrap(),
            host: "web.shop.svc.cluster.local",
            method,
            path: &path,
            headers: &headers,
            auth: None,
        };
        evaluate([p], &request).decision
    }

    #[test]
    fn a_targetrefs_policy_is_projected_for_waypoints_and_left_out_of_ztunnel() {
        let t = tr(
            "shop",
            json!({"targetRefs": web(), "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        );
        assert_eq!(t.scope, None, "not for ztunnel, as before");
        assert_eq!(t.acceptance.reason, "UnsupportedValue");
        let w = t.waypoint.unwrap();
        assert_eq!(w.targets, [target(TargetKind::Service, "shop", "web")]);
        assert!(w.acceptance.accepted, "{:?}", w.acceptance);
        assert_eq!(w.acceptance.reason, "Accepted");
        assert!(allowed(&w.policy, "GET", "/").is_ok());
        assert_eq!(allowed(&w.policy, "POST", "/"), Err(Denial::NotAllowed));
    }

    #[test]
    fn selector_and_namespace_policies_do_not_apply_to_waypoints() {
        for spec in [
            json!({"rules": [{}]}),
            json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]}),
            json!({"targetRefs": [], "rules": [{}]}),
            json!({"action": "DENY"}),
        ] {
            assert_eq!(tr("shop", spec.clone()).waypoint, None, "{spec}");
        }
        assert_eq!(tr("istio-system", json!({})).waypoint, None);
    }

    #[test]
    fn every_field_reaches_the_waypoint() {
        let w = waypoint(
            "shop",
            json!({
                "targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"},
                "action": "DENY",
                "rules": [{
                    "from": [{"source": {
                        "principals": ["spiffe://cluster.local/ns/shop/sa/client"], "notPrincipals": ["x"],
                        "requestPrincipals": ["iss/sub"], "notRequestPrincipals": ["iss/other"],
                        "ipBlocks": ["10.1.0.0/16"], "notIpBlocks": ["10.9.0.0/16"],
                        "remoteIpBlocks": ["10.1.0.2"], "notRemoteIpBlocks": ["192.0.2.0/24"],
                        "trustDomains": ["cluster.local"], "notTrustDomains": ["other.*"]}},
                        {"source": {"namespaces": ["shop"], "notNamespaces": ["legacy"]}},
                        {"source": {"serviceAccounts": ["client"], "notServiceAccounts": ["legacy/web"]}}],
                    "to": [{"operation": {
                        "hosts": ["web.*"], "notHosts": ["*.example"], "ports": ["80"], "notPorts": ["81"],
                        "methods": ["POST"], "notMethods": ["GET"], "paths": ["/admin/{**}"], "notPaths": ["/admin/public"]}}],
                    "when": [{"key": "request.headers[X-User]", "values": ["bob"]},
                             {"key": "source.serviceAccount", "notValues": ["web"]}],
                }],
            }),
        );
        assert!(w.acceptance.accepted, "{:?}", w.acceptance);
        assert_eq!(w.targets, [target(TargetKind::Gateway, "shop", "waypoint")]);
        let rule = &w.policy.rules[0];
        let s = &rule.from[0];
        assert_eq!(
            s.principals,
            [StringMatch::parse("cluster.local/ns/shop/sa/client")]
        );
        assert_eq!(s.request_principals[0].to_string(), "iss/sub");
        assert_eq!(s.not_request_principals.len(), 1);
        assert_eq!(s.remote_ip_blocks[0].to_string(), "10.1.0.2/32");
        assert_eq!(s.not_remote_ip_blocks.len(), 1);
        assert_eq!(s.not_trust_domains, [StringMatch::parse("other.*")]);
        assert_eq!(rule.from[1].not_namespaces, [StringMatch::parse("legacy")]);
        assert_eq!(rule.from[2].service_accounts[0].namespace, "shop");
        let o = &rule.to[0];
        assert_eq!(o.hosts[0].to_string(), "web.*");
        assert_eq!((o.ports.clone(), o.not_ports.clone()), (vec![80], vec![81]));
        assert_eq!(o.paths[0], l7::PathMatch::parse("/admin/{**}").unwrap());
        assert_eq!(rule.when[0].key(), "request.headers[x-user]");
        // The first source needs a JWT no request has yet; the second matches.
        assert!(matches!(
            allowed(&w.policy, "POST", "/admin/x"),
            Err(Denial::Denied(_))
        ));
        assert!(allowed(&w.policy, "GET", "/admin/x").is_ok());

        let w = waypoint(
            "shop",
            json!({"targetRefs": web(), "action": "DENY", "rules": [{
                "from": [{"source": {"namespaces": ["shop"]}}],
                "to": [{"operation": {"methods": ["POST"], "paths": ["/admin/{**}"], "notPaths": ["/admin/public"]}}],
                "when": [{"key": "request.headers[X-User]", "values": ["bob"]}],
            }]}),
        );
        assert_eq!(
            allowed(&w.policy, "POST", "/admin/../admin/x"),
            Err(Denial::Denied(l7::RuleRef {
                policy: "shop/p".into(),
                rule: 0
            }))
        );
        assert!(allowed(&w.policy, "POST", "/admin/public").is_ok());
        assert!(allowed(&w.policy, "GET", "/admin/x").is_ok());
    }

    #[test]
    fn targets_are_validated_and_an_invalid_one_fails_the_policy_closed() {
        let gw = |name: &str| json!({"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": name});
        let cases = [
            (
                json!([{"kind": "Deployment", "group": "apps", "name": "web"}]),
                "spec.targetRefs[0]: kind \"Deployment\"",
            ),
            (
                json!([{"kind": "Gateway", "name": "w"}]),
                "kind \"Gateway\" of group \"\"",
            ),
            (
                json!([{"kind": "Service", "group": "networking.istio.io", "name": "w"}]),
                "cannot be targeted",
            ),
            (
                json!([gw("w"), {"kind": "Service", "name": "web", "namespace": "other"}]),
                "spec.targetRefs[1].namespace",
            ),
            (
                json!([{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}]),
                "root namespace",
            ),
            (
                json!([{"name": "web"}]),
                "spec.targetRefs[0].kind: is required",
            ),
            (
                json!([{"kind": "Service"}]),
                "spec.targetRefs[0].name: is required",
            ),
            (
                json!([{"kind": "Service", "name": "web", "sectionName": "http"}]),
                "unknown field `sectionName`",
            ),
            (
                json!((0..17).map(|i| gw(&format!("w{i}"))).collect::<Vec<_>>()),
                "at most 16",
            ),
            (json!("web"), "spec.targetRefs: must be a list"),
        ];
        for (refs, why) in cases {
            for (action, rules, denies) in
                [("ALLOW", json!([{}]), false), ("DENY", json!([{}]), true)]
            {
                let w = waypoint(
                    "shop",
                    json!({"targetRefs": refs.clone(), "action": action, "rules": rules}),
                );
                assert!(!w.acceptance.accepted);
                assert_eq!(w.acceptance.reason, "Invalid");
                assert!(
                    w.acceptance.message.contains(why),
                    "{refs}: {}",
                    w.acceptance.message
                );
                match (denies, allowed(&w.policy, "GET", "/")) {
                    (false, Err(Denial::NotAllowed)) | (true, Err(Denial::Denied(_))) => {}
                    (_, other) => panic!("{refs} {action}: {other:?}"),
                }
            }
        }
        // The valid targets keep the closed policy.
        let w = waypoint(
            "shop",
            json!({"targetRefs": [gw("w"), {"kind": "Pod", "name": "x"}], "rules": [{}]}),
        );
        assert_eq!(w.targets, [target(TargetKind::Gateway, "shop", "w")]);
        let w = waypoint(
            "shop",
            json!({"targetRefs": [{"kind": "Pod", "name": "x"}], "action": "DENY", "rules": [{}]}),
        );
        assert!(
            w.acceptance.message.contains("applies nowhere"),
            "{}",
            w.acceptance.message
        );

        // What is valid.
        let class = json!([{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}]);
        let w = waypoint("istio-system", json!({"targetRefs": class, "rules": [{}]}));
        assert!(w.acceptance.accepted, "{:?}", w.acceptance);
        assert_eq!(
            w.targets,
            [target(TargetKind::GatewayClass, "", "istio-waypoint")]
        );
        let other_class = json!([{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio"}]);
        let w = waypoint(
            "istio-system",
            json!({"targetRefs": other_class, "rules": [{}]}),
        );
        assert!(
            w.acceptance.message.contains("istio-waypoint"),
            "{}",
            w.acceptance.message
        );
        let w = waypoint(
            "shop",
            json!({"targetRefs": [
                {"kind": "Service", "group": "core", "name": "a", "namespace": "shop"},
                {"kind": "ServiceEntry", "group": "networking.istio.io", "name": "b"}],
              "rules": [{}]}),
        );
        assert!(w.acceptance.accepted, "{:?}", w.acceptance);
        assert_eq!(
            w.targets,
            [
                target(TargetKind::Service, "shop", "a"),
                target(TargetKind::ServiceEntry, "shop", "b")
            ]
        );
    }

    #[test]
    fn invalid_rules_fail_closed_at_the_targets_and_name_the_field() {
        let cases = [
            (
                json!({"rules": [{"to": [{"operation": {"paths": ["/a/{**}/{*}"]}}]}]}),
                "spec.rules[0].to[0].operation.paths[0]",
                false,
            ),
            (
                json!({"rules": [{"to": [{"operation": {"notPaths": ["/a*/{*}"]}}]}]}),
                "notPaths[0]",
                false,
            ),
            (
                json!({"rules": [{"to": [{"operation": {"methods": [""]}}]}]}),
                "methods[0]: may not be empty",
                false,
            ),
            (
                json!({"rules": [{"when": [{"key": "request.headers[x user]", "values": ["a"]}]}]}),
                "spec.rules[0].when[0].key",
                false,
            ),
            (
                json!({"rules": [{"when": [{"key": "request.headers[x]"}]}]}),
                "spec.rules[0].when[0]: one of values",
                false,
            ),
            (
                json!({"rules": [{"when": [{"key": "source.ip", "values": ["nope"]}]}]}),
                "spec.rules[0].when[0].values[0]",
                false,
            ),
            (
                json!({"rules": [{"when": [{"values": ["a"]}]}]}),
                "when[0].key: is required",
                false,
            ),
            (
                json!({"rules": [{"from": [{"source": {"remoteIpBlocks": ["x"]}}]}]}),
                "remoteIpBlocks[0]",
                false,
            ),
            (
                json!({"rules": [{"from": [{"source": {"requestPrincipals": [""]}}]}]}),
                "requestPrincipals[0]: may not be empty",
                false,
            ),
            (
                json!({"rules": [{"from": []}]}),
                "spec.rules[0].from",
                false,
            ),
            (
                json!({"rules": [{"to": [{"operation": {}}]}]}),
                "at least one field",
                false,
            ),
            (json!({"rules": [null]}), "may not be null", false),
            (
                json!({"provider": {"name": "x"}, "rules": [{}]}),
                "spec.provider",
                false,
            ),
            (json!({"action": "DENY"}), "meaningless", true),
            (
                json!({"action": "DENY", "rules": [{"to": [{"operation": {"hosts": [""]}}]}]}),
                "hosts[0]",
                true,
            ),
            (
                json!({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"when": [{"key": "request.auth.claims[a]", "values": ["b"]}]}]}),
                "not allowed in a CUSTOM policy",
                true,
            ),
            (
                json!({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"from": [{"source": {"requestPrincipals": ["a/b"]}}]}]}),
                "requestPrincipals: not allowed in a CUSTOM",
                true,
            ),
            (
                json!({"action": "MAYBE", "rules": [{}]}),
                "spec.action",
                true,
            ),
            (
                json!({"rules": [{"form": []}]}),
                "unknown field `form`",
                false,
            ),
        ];
        for (mut spec, field, denies) in cases {
            spec["targetRefs"] = web();
            // Its targets are known: ztunnel leaves it to their waypoint, rather than
            // failing the policy's whole namespace closed.
            let t = tr("shop", spec.clone());
            assert_eq!(t.scope, None, "{spec}");
            assert!(!t.acceptance.accepted, "{spec}");
            if t.acceptance.reason == "InvalidValue" {
                assert!(
                    t.acceptance.message.contains(field),
                    "{spec}: {:?}",
                    t.acceptance
                );
            }
            let w = waypoint("shop", spec.clone());
            assert!(!w.acceptance.accepted, "{spec}");
            assert_eq!(w.acceptance.reason, "Invalid", "{spec}");
            assert!(
                w.acceptance.message.contains(field),
                "{spec}: {}",
                w.acceptance.message
            );
            assert_eq!(w.targets.len(), 1, "{spec}");
            match (denies, allowed(&w.policy, "GET", "/")) {
                (false, Err(Denial::NotAllowed))
                | (true, Err(Denial::Denied(_) | Denial::Custom(_))) => {}
                (_, other) => panic!("{spec}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_invalid_policy_whose_targets_cannot_all_be_told_fails_its_namespace_closed_at_ztunnel() {
        let rules = json!([{"to": [{"operation": {"methods": [""]}}]}]);
        for (targets, spec_extra) in [
            // One target of a kind no waypoint serves: where was it meant to apply?
            (
                json!([{"kind": "Service", "group": "", "name": "web"}, {"kind": "Pod", "group": "", "name": "x"}]),
                json!({}),
            ),
            (json!("web"), json!({})),
            // Both a selector and targetRefs.
            (web(), json!({"selector": {"matchLabels": {"app": "web"}}})),
        ] {
            let mut spec = json!({"action": "DENY", "targetRefs": targets, "rules": rules});
            for (k, v) in spec_extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let t = tr("shop", spec.clone());
            assert!(
                matches!(t.scope, Some(Scope::Namespace(_) | Scope::Selector { .. })),
                "{spec}: {:?}",
                t.scope
            );
            assert_eq!(
                t.policy.rules,
                vec![Rule::default()],
                "denies everything: {spec}"
            );
        }
    }

    #[test]
    fn an_unreadable_waypoint_policy_fails_closed_where_it_was_attached() {
        let policy = crate::security::AuthorizationPolicy {
            spec: json!({"targetRefs": web(), "action": "ALLOW", "rules": "garbage"}),
            unreadable: Some("metadata.labels: not a map".into()),
            ..Default::default()
        };
        let t = translate(&ObjectKey::new("shop", "p"), &policy, "istio-system");
        let w = t.waypoint.unwrap();
        assert!(
            w.acceptance.message.contains("unreadable"),
            "{}",
            w.acceptance.message
        );
        assert_eq!(w.targets, [target(TargetKind::Service, "shop", "web")]);
        assert_eq!(allowed(&w.policy, "GET", "/"), Err(Denial::NotAllowed));
    }

    #[test]
    fn custom_denies_what_it_matches_and_says_why() {
        let w = waypoint(
            "shop",
            json!({"targetRefs": web(), "action": "CUSTOM", "provider": {"name": "ext-authz"},
                   "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}),
        );
        assert!(!w.acceptance.accepted);
        assert_eq!(w.acceptance.reason, "UnsupportedValue");
        assert!(
            w.acceptance.message.contains("\"ext-authz\""),
            "{}",
            w.acceptance.message
        );
        assert!(matches!(
            allowed(&w.policy, "GET", "/admin/x"),
            Err(Denial::Custom(_))
        ));
        assert!(allowed(&w.policy, "GET", "/public").is_ok());
    }

    #[test]
    fn an_http_only_deny_warns_that_it_denies_all_plain_tcp_and_dry_run_is_kept() {
        let w = waypoint(
            "shop",
            json!({"targetRefs": web(), "action": "DENY", "rules": [
                {"to": [{"operation": {"methods": ["POST"]}}]},
                {"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]}]}),
        );
        assert!(w.acceptance.accepted);
        assert!(
            w.acceptance
                .message
                .contains("spec.rules[0] uses only HTTP"),
            "{}",
            w.acceptance.message
        );
        assert!(
            !w.acceptance.message.contains("spec.rules[1]"),
            "{}",
            w.acceptance.message
        );

        let annotations: BTreeMap<String, String> =
            [(DRY_RUN_ANNOTATION.to_owned(), "true".to_owned())].into();
        let t = translate_policy(
            &ObjectKey::new("shop", "p"),
            Some(&annotations),
            &json!({"targetRefs": web(), "action": "DENY", "rules": [{}]}),
            "istio-system",
        );
        let w = t.waypoint.unwrap();
        assert!(w.policy.dry_run);
        assert!(w.acceptance.message.contains("dry-run"));
        assert!(allowed(&w.policy, "GET", "/").is_ok());
    }
}
