//! AuthorizationPolicy → what ztunnel enforces (`ambit_core::authz::Policy`) and where
//! it applies, with Istio's semantics (`../shared/reference/istio-ambient-api.md` §1)
//! and without its fail-open corners:
//!
//! - `targetRefs` policies are for waypoints: not sent to ztunnel, but projected for
//!   waypoints with every field ([`WaypointPolicy`], `waypoint.rs`). Selector and
//!   namespace policies are for ztunnel only, as in Istio.
//! - At L4, an ALLOW rule that needs an HTTP attribute is dropped (it can never
//!   match: fails closed, as Istio). A DENY, CUSTOM or AUDIT rule keeps its L4 part,
//!   and a source, operation or condition made only of HTTP attributes matches every
//!   connection: an L7-only DENY denies all traffic it scopes, where Istio's ztunnel
//!   lets it through (decision record 0007).
//! - `trustDomains`, and the `when` keys `source.serviceAccount` and
//!   `source.trustDomain`, are enforced (they come from the peer certificate).
//! - A policy that fails validation is never skipped: an invalid ALLOW allows nothing
//!   in its scope, any other invalid policy denies everything in it. Its notes name the
//!   offending field.
//!
//! Pure: the caller gives the object's metadata and its spec as JSON.

use std::collections::BTreeMap;

use ambit_core::authz::{
    Action, Cidr, Clause, Match, Policy, Rule, ServiceAccountRef, StringMatch,
};
use ambit_core::l7;
use ambit_core::model::{PolicyTarget, TargetKind, WAYPOINT_GATEWAY_CLASS};
use serde::Deserialize;
use serde_json::Value;

use crate::resources::ObjectKey;

mod waypoint;
use waypoint::waypoint_projection;
pub(crate) use waypoint::{Targets, MAX_TARGETS};

/// The annotation that makes a policy shadow-only.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Where a policy applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every workload of the mesh (root namespace, no selector).
    Global,
    /// Every workload of one namespace.
    Namespace(String),
    /// The workloads whose labels include these; in one namespace, or (`None`, a
    /// policy of the root namespace) in all.
    Selector {
        namespace: Option<String>,
        labels: BTreeMap<String, String>,
    },
}

/// The status condition a policy gets (`ZtunnelAccepted`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptance {
    /// Enforced exactly as written.
    pub accepted: bool,
    /// Istio's reason: `Accepted`, `UnsupportedValue` (enforced differently from what
    /// is written, or not by ztunnel) or `InvalidValue` (failed validation).
    pub reason: &'static str,
    pub message: String,
}

/// One AuthorizationPolicy, translated: read once, projected for ztunnel (L4) and,
/// when attached with `targetRefs`, for waypoints (L7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslatedPolicy {
    /// `None`: not for ztunnel (it attaches to a waypoint).
    pub scope: Option<Scope>,
    pub policy: Policy,
    /// The `ZtunnelAccepted` condition.
    pub acceptance: Acceptance,
    /// The waypoint projection; `None` without `targetRefs` (selector and namespace
    /// policies do not apply to waypoints).
    pub waypoint: Option<WaypointPolicy>,
}

/// What waypoints enforce of a `targetRefs` policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointPolicy {
    /// The valid `targetRefs`, in order.
    pub targets: Vec<PolicyTarget>,
    /// Every field, as written; an invalid policy fails closed here too.
    pub policy: l7::Policy,
    /// The `WaypointAccepted` condition as far as the policy alone decides it
    /// (`Accepted`, `Invalid`, or `UnsupportedValue` for CUSTOM); whether its targets
    /// exist and have a waypoint is the binding's to add.
    pub acceptance: Acceptance,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    selector: Option<Selector>,
    target_ref: Option<Value>,
    target_refs: Option<Vec<Value>>,
    /// Read before the rest (see `translate_policy`); here so it is a known field.
    #[serde(rename = "action")]
    _action: Option<String>,
    provider: Option<Value>,
    rules: Option<Vec<Option<RuleSpec>>>,
}

/// `selector` of a security policy.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Selector {
    #[serde(default)]
    pub(crate) match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    from: Option<Vec<Option<From>>>,
    to: Option<Vec<Option<To>>>,
    when: Option<Vec<Option<Condition>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct From {
    source: Option<Source>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct To {
    operation: Option<Operation>,
}

type List = Option<Vec<String>>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Source {
    principals: List,
    not_principals: List,
    request_principals: List,
    not_request_principals: List,
    namespaces: List,
    not_namespaces: List,
    service_accounts: List,
    not_service_accounts: List,
    ip_blocks: List,
    not_ip_blocks: List,
    remote_ip_blocks: List,
    not_remote_ip_blocks: List,
    trust_domains: List,
    not_trust_domains: List,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Operation {
    hosts: List,
    not_hosts: List,
    ports: List,
    not_ports: List,
    methods: List,
    not_methods: List,
    paths: List,
    not_paths: List,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Condition {
    key: Option<String>,
    values: List,
    not_values: List,
}

/// `when` keys that need a request (HTTP): valid, but not evaluable by ztunnel.
fn is_l7_key(key: &str) -> bool {
    matches!(key, "remote.ip" | "connection.sni")
        || key.starts_with("request.headers[")
        || key.starts_with("request.auth.")
        || key.starts_with("experimental.envoy.filters.")
}

/// What one rule became, and what was noted about it.
struct RuleOutcome {
    rule: Rule,
    /// HTTP attributes it uses, by field path.
    l7: Vec<String>,
}

/// Translates one policy. `root_namespace` holds the mesh-wide policies.
pub fn translate_policy(
    key: &ObjectKey,
    annotations: Option<&BTreeMap<String, String>>,
    spec: &Value,
    root_namespace: &str,
) -> TranslatedPolicy {
    translate_read(key, annotations, spec, root_namespace, None)
}

/// Translates an AuthorizationPolicy as the source kept it: one marked unreadable
/// (`AuthorizationPolicy::unreadable`) is invalid in its namespace's scope (or the
/// scope its readable selector gives), denying everything there unless its readable
/// spec says ALLOW, which then allows nothing.
pub fn translate(
    key: &ObjectKey,
    policy: &crate::security::AuthorizationPolicy,
    root_namespace: &str,
) -> TranslatedPolicy {
    translate_read(
        key,
        policy.metadata.annotations.as_ref(),
        &policy.spec,
        root_namespace,
        policy.unreadable.as_deref(),
    )
}

fn translate_read(
    key: &ObjectKey,
    annotations: Option<&BTreeMap<String, String>>,
    spec: &Value,
    root_namespace: &str,
    unreadable: Option<&str>,
) -> TranslatedPolicy {
    let read = read(annotations, spec, unreadable);
    // An invalid policy whose targets can all be told fails closed there, at their
    // waypoint; ztunnel only falls back to the policy's whole namespace when it cannot
    // tell where the policy was meant to apply.
    let at_targets = unreadable.is_none()
        && spec.get("selector").is_none_or(Value::is_null)
        && waypoint::Targets::read(spec, key, root_namespace).is_some_and(|t| t.complete());
    let mut translated = l4_projection(key, &read, root_namespace, at_targets);
    translated.waypoint = waypoint_projection(key, &read, root_namespace);
    translated
}

/// The one reading of a policy both projections work from.
struct Read<'a> {
    spec: &'a Value,
    dry_run: bool,
    /// As written (`ALLOW` when absent).
    action_text: &'a str,
    /// `None`: not a known action, or the document is unreadable.
    action: Option<Action>,
    unreadable: Option<&'a str>,
    /// The spec's fields, or why they cannot be read.
    parsed: Result<Spec, String>,
}

fn read<'a>(
    annotations: Option<&BTreeMap<String, String>>,
    spec: &'a Value,
    unreadable: Option<&'a str>,
) -> Read<'a> {
    let dry_run = annotations
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    // Read first on its own, so an invalid policy still fails closed the right way.
    let action_text = match spec.get("action") {
        None | Some(Value::Null) => "ALLOW",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => "(not a string)",
    };
    let action = match action_text {
        "ALLOW" => Some(Action::Allow),
        "DENY" => Some(Action::Deny),
        "AUDIT" => Some(Action::Audit),
        "CUSTOM" => Some(Action::Custom),
        _ => None,
    };
    // A document read only in part: without a readable spec its action is unknown.
    let action = action.filter(|_| unreadable.is_none() || spec.is_object());
    let parsed = if spec.is_null() {
        Ok(Spec::default())
    } else {
        serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))
    };
    Read {
        spec,
        dry_run,
        action_text,
        action,
        unreadable,
        parsed,
    }
}

/// What ztunnel enforces (the translation as it was before waypoints). With
/// `at_targets`, the policy is attached with `targetRefs` that are all valid, so an
/// invalid one is left to the waypoint projection, which fails it closed there.
fn l4_projection(
    key: &ObjectKey,
    read: &Read<'_>,
    root_namespace: &str,
    at_targets: bool,
) -> TranslatedPolicy {
    let Read {
        spec,
        dry_run,
        action_text,
        action,
        unreadable,
        ..
    } = *read;
    let invalid = |scope: Option<Scope>, message: String| {
        // An unreadable action is treated as DENY: the closed side.
        let action = action.unwrap_or(Action::Deny);
        if at_targets && scope.is_none() {
            return TranslatedPolicy {
                scope: None,
                policy: Policy {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    action,
                    dry_run,
                    rules: Vec::new(),
                },
                acceptance: Acceptance {
                    accepted: false,
                    reason: "InvalidValue",
                    message: format!(
                        "{message}; attached with targetRefs, it fails closed at its targets' waypoint, not at ztunnel"
                    ),
                },
                waypoint: None,
            };
        }
        let rules = match action {
            Action::Allow | Action::Audit => Vec::new(),
            Action::Deny | Action::Custom => vec![Rule::default()],
        };
        let effect = match action {
            Action::Allow => "it allows nothing in its scope",
            Action::Audit => "it audits nothing",
            Action::Deny | Action::Custom => "it denies everything in its scope",
        };
        TranslatedPolicy {
            scope: Some(scope.unwrap_or_else(|| fallback_scope(key, root_namespace, spec))),
            policy: Policy {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                action,
                dry_run,
                rules,
            },
            acceptance: Acceptance {
                accepted: false,
                reason: "InvalidValue",
                message: format!("{message}; {effect}"),
            },
            waypoint: None,
        }
    };
    if let Some(why) = unreadable {
        return invalid(None, format!("unreadable: {why}"));
    }
    let Some(action) = action else {
        return invalid(
            None,
            format!("spec.action: {action_text:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
        );
    };
    let parsed = match &read.parsed {
        Ok(s) => s,
        Err(e) => return invalid(None, e.clone()),
    };

    // Where it applies.
    let attachments = [
        parsed.selector.is_some(),
        parsed.target_ref.is_some(),
        parsed.target_refs.as_ref().is_some_and(|t| !t.is_empty()),
    ];
    if attachments.iter().filter(|a| **a).count() > 1 {
        return invalid(
            None,
            "spec: only one of selector, targetRef and targetRefs may be set".into(),
        );
    }
    let scope = match (&parsed.selector, attachments[1] || attachments[2]) {
        (_, true) => None,
        (Some(selector), false) => {
            if let Err(e) = check_labels(&selector.match_labels) {
                return invalid(None, format!("spec.selector.matchLabels: {e}"));
            }
            Some(Scope::Selector {
                namespace: (key.namespace != root_namespace).then(|| key.namespace.clone()),
                labels: selector.match_labels.clone(),
            })
        }
        (None, false) if key.namespace == root_namespace => Some(Scope::Global),
        (None, false) => Some(Scope::Namespace(key.namespace.clone())),
    };

    if parsed.provider.is_some() && action != Action::Custom {
        return invalid(
            scope,
            "spec.provider: only a CUSTOM policy names a provider".into(),
        );
    }
    let rules_spec = parsed.rules.as_deref().unwrap_or_default();
    if rules_spec.is_empty() && matches!(action, Action::Deny | Action::Custom) {
        return invalid(
            scope,
            format!("spec.rules: a {action_text} policy without rules is meaningless"),
        );
    }
    let mut rules = Vec::new();
    let mut l7_notes = Vec::new();
    let mut dropped = 0;
    for (i, rule) in rules_spec.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let Some(rule) = rule else {
            return invalid(scope, format!("{path}: a rule may not be null"));
        };
        let outcome = match translate_rule(rule, &path, action, &key.namespace) {
            Ok(o) => o,
            Err(e) => return invalid(scope, e),
        };
        if !outcome.l7.is_empty() {
            l7_notes.push(outcome.l7.join(", "));
            if action == Action::Allow {
                // It can never match at L4: dropped, so the policy allows less.
                dropped += 1;
                continue;
            }
        }
        rules.push(outcome.rule);
    }

    let policy = Policy {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        action,
        dry_run,
        rules,
    };
    let acceptance = if scope.is_none() {
        Acceptance {
            accepted: false,
            reason: "UnsupportedValue",
            message: "attached with targetRefs: enforced by a waypoint, not by ztunnel".into(),
        }
    } else if !l7_notes.is_empty() {
        let effect = match action {
            Action::Allow => format!(
                "the {dropped} ALLOW rule(s) using them are omitted, so they allow nothing"
            ),
            _ => "only the rules' L4 parts are enforced, and a source, operation or condition of HTTP attributes alone matches all traffic".into(),
        };
        Acceptance {
            accepted: false,
            reason: "UnsupportedValue",
            message: format!(
                "HTTP attributes ztunnel cannot evaluate: {}; {effect}",
                l7_notes.join(", ")
            ),
        }
    } else {
        Acceptance {
            accepted: true,
            reason: "Accepted",
            message: if dry_run {
                "enforced by ztunnel in dry-run: evaluated and logged, never applied".into()
            } else {
                "enforced by ztunnel".into()
            },
        }
    };
    TranslatedPolicy {
        scope,
        policy,
        acceptance,
        waypoint: None,
    }
}

/// Where an invalid policy applies when its selector could not be read: its
/// namespace (or the mesh), the widest scope it could have meant.
fn fallback_scope(key: &ObjectKey, root_namespace: &str, spec: &Value) -> Scope {
    let labels: Option<BTreeMap<String, String>> = spec
        .get("selector")
        .and_then(|s| s.get("matchLabels"))
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .filter(|l: &BTreeMap<String, String>| !l.is_empty() && check_labels(l).is_ok());
    match labels {
        Some(labels) => Scope::Selector {
            namespace: (key.namespace != root_namespace).then(|| key.namespace.clone()),
            labels,
        },
        None if key.namespace == root_namespace => Scope::Global,
        None => Scope::Namespace(key.namespace.clone()),
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > 4096 {
        return Err("at most 4096 labels".into());
    }
    for (k, v) in labels {
        if k.is_empty() {
            return Err("a label key may not be empty".into());
        }
        if k.contains('*') || v.contains('*') {
            return Err(format!("{k}={v}: wildcards are not allowed"));
        }
        if v.len() > 63 {
            return Err(format!("{k}: a value is at most 63 characters"));
        }
    }
    Ok(())
}

fn translate_rule(
    rule: &RuleSpec,
    path: &str,
    action: Action,
    namespace: &str,
) -> Result<RuleOutcome, String> {
    let mut clauses = Vec::new();
    let mut l7 = Vec::new();
    if let Some(from) = &rule.from {
        if from.is_empty() {
            return Err(format!("{path}.from: may not be empty (leave it out)"));
        }
        let mut matches = Vec::new();
        for (i, entry) in from.iter().enumerate() {
            let p = format!("{path}.from[{i}].source");
            let source = entry
                .as_ref()
                .and_then(|f| f.source.as_ref())
                .ok_or_else(|| format!("{p}: is required"))?;
            matches.push(source_match(source, &p, action, namespace, &mut l7)?);
        }
        clauses.push(Clause { matches });
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            return Err(format!("{path}.to: may not be empty (leave it out)"));
        }
        let mut matches = Vec::new();
        for (i, entry) in to.iter().enumerate() {
            let p = format!("{path}.to[{i}].operation");
            let operation = entry
                .as_ref()
                .and_then(|t| t.operation.as_ref())
                .ok_or_else(|| format!("{p}: is required"))?;
            matches.push(operation_match(operation, &p, &mut l7)?);
        }
        clauses.push(Clause { matches });
    }
    for (i, condition) in rule.when.iter().flatten().enumerate() {
        let p = format!("{path}.when[{i}]");
        let condition = condition
            .as_ref()
            .ok_or_else(|| format!("{p}: may not be null"))?;
        clauses.push(Clause {
            matches: vec![condition_match(condition, &p, action, namespace, &mut l7)?],
        });
    }
    Ok(RuleOutcome {
        rule: Rule { clauses },
        l7,
    })
}

fn values<'a>(list: &'a List, path: &str, field: &str) -> Result<&'a [String], String> {
    let values = list.as_deref().unwrap_or_default();
    if let Some(i) = values.iter().position(String::is_empty) {
        return Err(format!("{path}.{field}[{i}]: may not be empty"));
    }
    Ok(values)
}

fn strings(list: &List, path: &str, field: &str) -> Result<Vec<StringMatch>, String> {
    Ok(values(list, path, field)?
        .iter()
        .map(|v| StringMatch::parse(v.strip_prefix("spiffe://").unwrap_or(v)))
        .collect())
}

fn cidrs(list: &List, path: &str, field: &str) -> Result<Vec<Cidr>, String> {
    values(list, path, field)?
        .iter()
        .enumerate()
        .map(|(i, v)| Cidr::parse(v).map_err(|e| format!("{path}.{field}[{i}]: {e}")))
        .collect()
}

fn ports(list: &List, path: &str, field: &str) -> Result<Vec<u16>, String> {
    values(list, path, field)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<u16>()
                .map_err(|_| format!("{path}.{field}[{i}]: {v:?} is not a port (0..65535)"))
        })
        .collect()
}

fn trust_domains(list: &List, path: &str, field: &str) -> Result<Vec<StringMatch>, String> {
    let values = values(list, path, field)?;
    for (i, v) in values.iter().enumerate() {
        let stars = v.matches('*').count();
        let misplaced = stars == 1 && !(v.starts_with('*') || v.ends_with('*'));
        if v.contains('/') || stars > 1 || misplaced {
            return Err(format!(
                "{path}.{field}[{i}]: {v:?}: a trust domain has no `/` and at most one `*`, at its start or end"
            ));
        }
    }
    Ok(values.iter().map(|v| StringMatch::parse(v)).collect())
}

fn service_accounts(
    list: &List,
    path: &str,
    field: &str,
    namespace: &str,
) -> Result<Vec<ServiceAccountRef>, String> {
    let values = values(list, path, field)?;
    if values.len() > 16 {
        return Err(format!("{path}.{field}: at most 16 entries"));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let bad = |why: &str| format!("{path}.{field}[{i}]: {v:?}: {why}");
            if v.len() > 320 {
                return Err(bad("at most 320 characters"));
            }
            if v.contains('*') {
                return Err(bad("wildcards are not allowed"));
            }
            let (ns, sa) = match v.split_once('/') {
                Some((ns, sa)) if sa.contains('/') => {
                    let _ = ns;
                    return Err(bad("at most one `/` (namespace/name)"));
                }
                Some((ns, sa)) => (ns, sa),
                None => (namespace, v.as_str()),
            };
            if ns.is_empty() || sa.is_empty() {
                return Err(bad("namespace and name may not be empty"));
            }
            Ok(ServiceAccountRef {
                namespace: ns.to_owned(),
                name: sa.to_owned(),
            })
        })
        .collect()
}

fn set(list: &List) -> bool {
    list.as_ref().is_some_and(|l| !l.is_empty())
}

fn source_match(
    s: &Source,
    path: &str,
    action: Action,
    namespace: &str,
    l7: &mut Vec<String>,
) -> Result<Match, String> {
    let all = [
        &s.principals,
        &s.not_principals,
        &s.request_principals,
        &s.not_request_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        &s.trust_domains,
        &s.not_trust_domains,
    ];
    if !all.iter().any(|l| set(l)) {
        return Err(format!("{path}: at least one field must be set"));
    }
    let sa = set(&s.service_accounts) || set(&s.not_service_accounts);
    let others = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
    ];
    if sa && others.iter().any(|l| set(l)) {
        return Err(format!(
            "{path}: serviceAccounts cannot be combined with principals or namespaces"
        ));
    }
    if action == Action::Custom {
        let identity = [
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            ("trustDomains", &s.trust_domains),
            ("notTrustDomains", &s.not_trust_domains),
        ];
        if let Some((field, _)) = identity.iter().find(|(_, l)| set(l)) {
            return Err(format!("{path}.{field}: not allowed in a CUSTOM policy"));
        }
    }
    for (field, list) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        values(list, path, field)?;
        if set(list) {
            l7.push(format!("{path}.{field}"));
        }
    }
    // Checked even though ztunnel cannot use them: a bad value is still invalid.
    cidrs(&s.remote_ip_blocks, path, "remoteIpBlocks")?;
    cidrs(&s.not_remote_ip_blocks, path, "notRemoteIpBlocks")?;
    Ok(Match {
        principals: strings(&s.principals, path, "principals")?,
        not_principals: strings(&s.not_principals, path, "notPrincipals")?,
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
        trust_domains: trust_domains(&s.trust_domains, path, "trustDomains")?,
        not_trust_domains: trust_domains(&s.not_trust_domains, path, "notTrustDomains")?,
        source_ips: cidrs(&s.ip_blocks, path, "ipBlocks")?,
        not_source_ips: cidrs(&s.not_ip_blocks, path, "notIpBlocks")?,
        ..Match::default()
    })
}

fn operation_match(o: &Operation, path: &str, l7: &mut Vec<String>) -> Result<Match, String> {
    let all = [
        &o.hosts,
        &o.not_hosts,
        &o.ports,
        &o.not_ports,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ];
    if !all.iter().any(|l| set(l)) {
        return Err(format!("{path}: at least one field must be set"));
    }
    for (field, list) in [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ] {
        values(list, path, field)?;
        if set(list) {
            l7.push(format!("{path}.{field}"));
        }
    }
    Ok(Match {
        destination_ports: ports(&o.ports, path, "ports")?,
        not_destination_ports: ports(&o.not_ports, path, "notPorts")?,
        ..Match::default()
    })
}

fn condition_match(
    c: &Condition,
    path: &str,
    action: Action,
    namespace: &str,
    l7: &mut Vec<String>,
) -> Result<Match, String> {
    let key = c
        .key
        .as_deref()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| format!("{path}.key: is required"))?;
    if !set(&c.values) && !set(&c.not_values) {
        return Err(format!("{path}: one of values and notValues must be set"));
    }
    let identity_key = matches!(
        key,
        "source.namespace" | "source.principal" | "source.serviceAccount" | "source.trustDomain"
    ) || key.starts_with("request.auth.");
    if action == Action::Custom && identity_key {
        return Err(format!(
            "{path}.key: {key} is not allowed in a CUSTOM policy"
        ));
    }
    let mut m = Match::default();
    match key {
        "source.ip" => {
            m.source_ips = cidrs(&c.values, path, "values")?;
            m.not_source_ips = cidrs(&c.not_values, path, "notValues")?;
        }
        "destination.ip" => {
            m.destination_ips = cidrs(&c.values, path, "values")?;
            m.not_destination_ips = cidrs(&c.not_values, path, "notValues")?;
        }
        "destination.port" => {
            m.destination_ports = ports(&c.values, path, "values")?;
            m.not_destination_ports = ports(&c.not_values, path, "notValues")?;
        }
        "source.namespace" => {
            m.namespaces = strings(&c.values, path, "values")?;
            m.not_namespaces = strings(&c.not_values, path, "notValues")?;
        }
        "source.principal" => {
            m.principals = strings(&c.values, path, "values")?;
            m.not_principals = strings(&c.not_values, path, "notValues")?;
        }
        "source.serviceAccount" => {
            m.service_accounts = service_accounts(&c.values, path, "values", namespace)?;
            m.not_service_accounts = service_accounts(&c.not_values, path, "notValues", namespace)?;
        }
        "source.trustDomain" => {
            m.trust_domains = trust_domains(&c.values, path, "values")?;
            m.not_trust_domains = trust_domains(&c.not_values, path, "notValues")?;
        }
        k if is_l7_key(k) => {
            if k.starts_with("request.headers[") && !k.ends_with(']') {
                return Err(format!("{path}.key: {k:?} must have the form a[b]"));
            }
            values(&c.values, path, "values")?;
            values(&c.not_values, path, "notValues")?;
            l7.push(format!("{path} ({k})"));
        }
        "destination.namespace" | "destination.name" | "destination.user" => {
            return Err(format!(
                "{path}.key: {key} is not supported (use the policy's namespace or selector)"
            ))
        }
        k if k.starts_with("destination.labels[") => {
            return Err(format!(
                "{path}.key: {k} is not supported (use the selector)"
            ))
        }
        k => return Err(format!("{path}.key: unknown attribute {k:?}")),
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_core::authz::{evaluate, Connection, Denial};
    use ambit_core::SpiffeId;
    use serde_json::json;

    fn key(ns: &str) -> ObjectKey {
        ObjectKey::new(ns, "p")
    }

    fn tr(ns: &str, spec: Value) -> TranslatedPolicy {
        translate_policy(&key(ns), None, &spec, "istio-system")
    }

    fn conn<'a>(peer: Option<&'a SpiffeId>, port: u16) -> Connection<'a> {
        Connection {
            peer,
            source_ip: "10.1.0.2".parse().unwrap(),
            destination_ip: "10.2.0.2".parse().unwrap(),
            destination_port: port,
        }
    }

    fn allowed(t: &TranslatedPolicy, peer: Option<&SpiffeId>, port: u16) -> bool {
        evaluate([&t.policy], &conn(peer, port)).allowed()
    }

    fn client() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/client").unwrap()
    }

    #[test]
    fn scopes() {
        assert_eq!(tr("istio-system", json!({})).scope, Some(Scope::Global));
        assert_eq!(
            tr("shop", json!({})).scope,
            Some(Scope::Namespace("shop".into()))
        );
        let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        assert_eq!(
            tr("shop", json!({"selector": {"matchLabels": {"app": "web"}}})).scope,
            Some(Scope::Selector {
                namespace: Some("shop".into()),
                labels: labels.clone()
            })
        );
        assert_eq!(
            tr(
                "istio-system",
                json!({"selector": {"matchLabels": {"app": "web"}}})
            )
            .scope,
            Some(Scope::Selector {
                namespace: None,
                labels
            })
        );
        let waypoint = tr(
            "shop",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], "rules": [{}]}),
        );
        assert_eq!(waypoint.scope, None);
        assert_eq!(waypoint.acceptance.reason, "UnsupportedValue");
    }

    #[test]
    fn empty_spec_allows_nothing_and_an_empty_rule_everything() {
        let id = client();
        let nothing = tr("shop", json!({}));
        assert!(nothing.acceptance.accepted);
        assert!(!allowed(&nothing, Some(&id), 80));
        let everything = tr("shop", json!({"rules": [{}]}));
        assert!(allowed(&everything, Some(&id), 80));
        assert!(allowed(&everything, None, 80));
    }

    #[test]
    fn l4_fields_are_enforced_including_trust_domains_and_service_accounts() {
        let id = client();
        let policy = tr(
            "shop",
            json!({"rules": [{
                "from": [{"source": {"serviceAccounts": ["client"], "trustDomains": ["cluster.local"]}}],
                "to": [{"operation": {"ports": ["8080"]}}],
                "when": [{"key": "source.trustDomain", "values": ["*.local"]},
                         {"key": "source.serviceAccount", "notValues": ["shop/web"]}],
            }]}),
        );
        assert!(policy.acceptance.accepted, "{:?}", policy.acceptance);
        assert!(allowed(&policy, Some(&id), 8080));
        assert!(!allowed(&policy, Some(&id), 80));
        assert!(
            !allowed(&policy, None, 8080),
            "plaintext has no service account"
        );
        let other = SpiffeId::parse("spiffe://other.org/ns/shop/sa/client").unwrap();
        assert!(!allowed(&policy, Some(&other), 8080), "trust domain");
    }

    #[test]
    fn an_allow_rule_with_http_attributes_is_dropped_and_fails_closed() {
        let id = client();
        let policy = tr(
            "shop",
            json!({"rules": [
                {"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]},
            ]}),
        );
        assert_eq!(policy.policy.rules.len(), 0);
        assert!(!policy.acceptance.accepted);
        assert_eq!(policy.acceptance.reason, "UnsupportedValue");
        assert!(
            policy
                .acceptance
                .message
                .contains("spec.rules[0].to[0].operation.methods"),
            "{}",
            policy.acceptance.message
        );
        assert!(!allowed(&policy, Some(&id), 8080));
    }

    #[test]
    fn a_deny_rule_keeps_its_l4_part_and_an_l7_only_deny_denies_everything_it_scopes() {
        let id = client();
        let with_port = tr(
            "shop",
            json!({"action": "DENY", "rules": [
                {"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]},
            ]}),
        );
        assert!(!allowed(&with_port, Some(&id), 8080));
        assert!(allowed(&with_port, Some(&id), 80));
        let l7_only = tr(
            "shop",
            json!({"action": "DENY", "rules": [
                {"to": [{"operation": {"paths": ["/admin"]}}]},
            ]}),
        );
        assert!(!allowed(&l7_only, Some(&id), 80));
        assert!(!allowed(&l7_only, None, 9000));
        assert_eq!(l7_only.acceptance.reason, "UnsupportedValue");
        let l7_when = tr(
            "shop",
            json!({"action": "DENY", "rules": [
                {"from": [{"source": {"namespaces": ["legacy"]}}],
                 "when": [{"key": "request.headers[x-user]", "values": ["bob"]}]},
            ]}),
        );
        assert!(
            allowed(&l7_when, Some(&id), 80),
            "the L4 part (namespace legacy) still decides"
        );
    }

    #[test]
    fn invalid_policies_fail_closed_and_name_the_field() {
        let id = client();
        let cases = [
            (
                json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}]}),
                "spec.rules[0].from[0].source.ipBlocks[0]",
                false,
            ),
            (
                json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
                "spec.rules[0].to[0].operation.ports[0]",
                false,
            ),
            (
                json!({"rules": [{"from": []}]}),
                "spec.rules[0].from",
                false,
            ),
            (
                json!({"rules": [{"from": [{"source": {}}]}]}),
                "at least one field",
                false,
            ),
            (
                json!({"rules": [{"from": [{"source": {"principals": [""]}}]}]}),
                "principals[0]: may not be empty",
                false,
            ),
            (
                json!({"rules": [{"from": [{"source": {"serviceAccounts": ["a"], "namespaces": ["b"]}}]}]}),
                "cannot be combined",
                false,
            ),
            (
                json!({"rules": [{"from": [{"source": {"trustDomains": ["a*b"]}}]}]}),
                "trustDomains[0]",
                false,
            ),
            (
                json!({"rules": [{"when": [{"key": "destination.namespace", "values": ["x"]}]}]}),
                "destination.namespace",
                false,
            ),
            (
                json!({"rules": [{"when": [{"key": "no.such.key", "values": ["x"]}]}]}),
                "unknown attribute",
                false,
            ),
            (
                json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
                "one of values and notValues",
                false,
            ),
            (
                json!({"rules": [{"from": [{"source": {"principal": ["typo"]}}]}]}),
                "unknown field `principal`",
                false,
            ),
            (
                json!({"selector": {"matchLabels": {"app": "web"}}, "targetRefs": [{"kind": "Gateway", "name": "w"}]}),
                "only one of selector",
                false,
            ),
            (
                json!({"provider": {"name": "x"}, "rules": [{}]}),
                "spec.provider",
                false,
            ),
            (
                json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["99999"]}}]}]}),
                "ports[0]",
                true,
            ),
            (json!({"action": "DENY"}), "meaningless", true),
            (
                json!({"action": "CUSTOM", "rules": [{"from": [{"source": {"principals": ["x"]}}]}]}),
                "not allowed in a CUSTOM policy",
                true,
            ),
            (
                json!({"action": "MAYBE", "rules": [{}]}),
                "spec.action",
                true,
            ),
        ];
        for (spec, field, denies_all) in cases {
            let t = tr("shop", spec.clone());
            assert!(!t.acceptance.accepted, "{spec}");
            assert_eq!(t.acceptance.reason, "InvalidValue", "{spec}");
            assert!(
                t.acceptance.message.contains(field),
                "{spec}: {}",
                t.acceptance.message
            );
            assert!(t.scope.is_some(), "{spec}: an invalid policy still applies");
            // Invalid ALLOW: allows nothing; invalid DENY/CUSTOM: denies everything.
            let verdict = evaluate([&t.policy], &conn(Some(&id), 8080));
            match (denies_all, verdict.decision) {
                (false, Err(Denial::NotAllowed)) => {}
                (true, Err(Denial::Denied { .. } | Denial::Custom { .. })) => {}
                (_, other) => panic!("{spec}: {other:?}"),
            }
        }
    }

    #[test]
    fn ip_blocks_with_host_bits_set_are_the_network_they_lie_in_as_in_istio() {
        let id = client();
        let t = tr(
            "shop",
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.2/16"]}}]}]}),
        );
        assert!(t.acceptance.accepted, "{:?}", t.acceptance);
        assert_eq!(
            t.policy.rules[0].clauses[0].matches[0].source_ips[0].to_string(),
            "10.1.0.0/16"
        );
        // conn() comes from 10.1.0.2.
        assert!(allowed(&t, Some(&id), 80));
        let elsewhere = Connection {
            source_ip: "10.2.0.9".parse().unwrap(),
            ..conn(Some(&id), 80)
        };
        assert!(!evaluate([&t.policy], &elsewhere).allowed());
        let deny = tr(
            "shop",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"notIpBlocks": ["fd10:1::2/16"]}}]}]}),
        );
        assert!(deny.acceptance.accepted, "{:?}", deny.acceptance);
    }

    #[test]
    fn dry_run_annotation_marks_the_policy() {
        let annotations: BTreeMap<String, String> =
            [(DRY_RUN_ANNOTATION.to_owned(), "true".to_owned())].into();
        let t = translate_policy(
            &key("shop"),
            Some(&annotations),
            &json!({"action": "DENY", "rules": [{}]}),
            "istio-system",
        );
        assert!(t.policy.dry_run);
        assert!(evaluate([&t.policy], &conn(None, 80)).allowed());
    }

    #[test]
    fn principals_accept_the_spiffe_prefix_or_not() {
        let id = client();
        for value in [
            "cluster.local/ns/shop/sa/client",
            "spiffe://cluster.local/ns/shop/sa/client",
        ] {
            let t = tr(
                "shop",
                json!({"rules": [{"from": [{"source": {"principals": [value]}}]}]}),
            );
            assert!(allowed(&t, Some(&id), 80), "{value}");
        }
    }
}
