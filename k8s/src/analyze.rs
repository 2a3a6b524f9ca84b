//! `ambitctl analyze`: what is wrong with a set of objects, found by the control
//! plane's own reader and translation ([`crate::read`], [`crate::translate`]) plus
//! checks across objects that no single object's validation can make (a policy that
//! selects nothing, conflicting PeerAuthentications, STRICT mTLS with clients outside
//! the mesh). Each finding names its object, a stable code, a severity and the fix;
//! each is reported once.
//!
//! Offline, the objects are taken as a cluster would hold them once applied: a Service
//! gets a cluster IP, a Pod a node and an address (and, when it asks for the mesh, the
//! node agent's redirection annotation), and each waypoint Gateway the Service and the
//! ready pod the control plane would make for it. Those filled-in parts are never the
//! subject of a finding. Pods are the workloads, and so are the pod templates of
//! Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs.
//!
//! The codes are stable (like Istio's `IST0xxx`); [`CODES`] lists them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde_json::Value;

use crate::resources::{ObjectKey, Resources};
use crate::translate::{translate_with, DATAPLANE_MODE_LABEL, REDIRECTION_ANNOTATION};
use crate::waypoints::{GATEWAY_NAME_LABEL, SERVICE_ACCOUNT_ANNOTATION};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "Error",
            Severity::Warning => "Warning",
            Severity::Info => "Info",
        }
    }

    /// `error`, `warning` or `info` (any case).
    pub fn parse(s: &str) -> Option<Severity> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Some(Severity::Error),
            "warning" | "warn" => Some(Severity::Warning),
            "info" => Some(Severity::Info),
            _ => None,
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every code, its name, its severity and what it means.
pub const CODES: &[(&str, &str, Severity, &str)] = &[
    ("AMB0001", "UnreadableDocument", Severity::Error, "a document cannot be read as the kind it says (a policy among them is enforced closed)"),
    ("AMB0002", "InvalidPolicy", Severity::Error, "a security policy fails validation: the control plane enforces it closed (deny, or STRICT), not as written"),
    ("AMB0003", "PolicyNotAsWritten", Severity::Warning, "a policy is enforced, but not exactly as written (e.g. L7 fields ztunnel cannot see deny instead)"),
    ("AMB0004", "ObjectLeftOut", Severity::Error, "an object cannot be translated and is left out of the mesh"),
    ("AMB0005", "WaypointNotBound", Severity::Error, "istio.io/use-waypoint names a waypoint that does not exist, is invalid, does not admit the namespace or does not serve this kind of traffic"),
    ("AMB0006", "WaypointPolicyNotAttached", Severity::Error, "a targetRefs policy attaches to nothing a waypoint serves: it is not enforced there"),
    ("AMB0007", "RouteNotAccepted", Severity::Error, "a route's parent or backends do not resolve"),
    ("AMB0008", "GatewayNotWaypoint", Severity::Error, "a Gateway of class istio-waypoint whose listeners are not a waypoint's"),
    ("AMB0009", "PolicySelectsNothing", Severity::Warning, "a policy's selector matches no workload in its scope"),
    ("AMB0010", "ServiceWithoutMeshEndpoints", Severity::Warning, "a Service none of whose workloads is in the mesh: its traffic is neither authenticated nor authorized by it"),
    ("AMB0011", "ConflictingPeerAuthentications", Severity::Error, "more than one PeerAuthentication for the same scope: which one applies is not defined"),
    ("AMB0012", "StrictWithNonMeshClients", Severity::Warning, "STRICT mTLS where workloads outside the mesh exist: they cannot connect"),
    ("AMB0013", "ObjectIncomplete", Severity::Warning, "an object is kept without something it asks for"),
];

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub name: &'static str,
    pub severity: Severity,
    pub kind: String,
    /// `namespace/name` (only `name` for cluster-scoped objects, empty for a document
    /// that could not be read as any object).
    pub object: String,
    /// `file:line` where the object is, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub place: Option<String>,
    pub message: String,
    pub fix: String,
}

fn finding(code: &'static str, kind: &str, key: &ObjectKey, message: String, fix: &str) -> Finding {
    let (name, severity) = CODES
        .iter()
        .find(|c| c.0 == code)
        .map(|c| (c.1, c.2))
        .unwrap_or(("Unknown", Severity::Error));
    Finding {
        code,
        name,
        severity,
        kind: kind.to_owned(),
        object: key.to_string(),
        place: None,
        message,
        fix: fix.to_owned(),
    }
}

/// A workload: a Pod, or a controller's pod template.
#[derive(Debug, Clone)]
struct Workload {
    namespace: String,
    labels: BTreeMap<String, String>,
    ambient: bool,
}

/// The objects of some files, read as the control plane reads them.
#[derive(Debug, Default)]
pub struct Input {
    resources: Resources,
    /// (kind, key) → `file:line`.
    places: BTreeMap<(String, ObjectKey), String>,
    errors: Vec<crate::read::DocumentError>,
    templates: Vec<(String, BTreeMap<String, String>)>,
}

impl Input {
    /// Adds one file's text (read by the caller).
    pub fn add_file(&mut self, path: &Path, text: &str) {
        let parsed = crate::read::parse_file(path, text);
        for (object, (_, line)) in parsed.objects.into_iter().zip(parsed.places) {
            self.places.insert(
                (object.kind().to_owned(), object.key()),
                format!("{}:{line}", path.display()),
            );
            self.resources.insert(object);
        }
        self.errors.extend(parsed.errors);
        for document in crate::read::documents(text) {
            let Ok(Some(value)) = document.value else {
                continue;
            };
            if let Some(labels) = template_labels(&value) {
                let namespace = value["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned();
                self.templates.push((namespace, labels));
            }
        }
    }
}

impl Input {
    /// Adds one object read from an API server; `place` says where (e.g. `cluster
    /// CONTEXT`).
    pub fn add_object(&mut self, object: crate::resources::Object, place: &str) {
        self.places
            .insert((object.kind().to_owned(), object.key()), place.to_owned());
        self.resources.insert(object);
    }

    /// Adds a workload controller (Deployment, StatefulSet, ...) as the API server
    /// sent it: its pod template's labels are a workload.
    pub fn add_controller(&mut self, value: &Value) {
        if let Some(labels) = template_labels(value) {
            let namespace = value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            self.templates.push((namespace, labels));
        }
    }

    /// An object the API server sent that could not be read as its kind.
    pub fn add_unreadable(&mut self, place: &str, message: String) {
        self.errors.push(crate::read::DocumentError {
            path: std::path::PathBuf::from(place),
            line: 0,
            document: 0,
            message,
            fails_closed: false,
        });
    }
}

/// The pod template's labels of a workload controller.
fn template_labels(value: &Value) -> Option<BTreeMap<String, String>> {
    let template = match value["kind"].as_str()? {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &value["spec"]["template"]
        }
        "CronJob" => &value["spec"]["jobTemplate"]["spec"]["template"],
        _ => return None,
    };
    let labels = template["metadata"]["labels"].as_object();
    Some(
        labels
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect(),
    )
}

/// What a cluster adds to the objects once applied; the keys of what was made up.
fn as_applied(resources: &mut Resources) -> BTreeSet<(&'static str, ObjectKey)> {
    let mut made = BTreeSet::new();
    let mut n: u32 = 0;
    let mut next_ip = |block: u8| {
        n += 1;
        format!("240.{block}.{}.{}", (n >> 8) & 0xff, n & 0xff)
    };
    for service in resources.services.values_mut() {
        let Some(spec) = service.spec.as_mut() else {
            continue;
        };
        let unset = spec.cluster_ip.as_deref().is_none_or(str::is_empty)
            && spec.cluster_ips.as_ref().is_none_or(Vec::is_empty);
        if unset && spec.type_.as_deref() != Some("ExternalName") {
            spec.cluster_ip = Some(next_ip(1));
        }
    }
    let keys: Vec<ObjectKey> = resources.pods.keys().cloned().collect();
    for key in keys {
        let ambient = {
            let pod = &resources.pods[&key];
            crate::translate::wants_ambient(resources, &key, pod)
        };
        let ip = next_ip(2);
        let Some(pod) = resources.pods.get_mut(&key) else {
            continue;
        };
        let spec = pod.spec.get_or_insert_with(PodSpec::default);
        if spec.node_name.as_deref().is_none_or(str::is_empty) {
            spec.node_name = Some("node".into());
        }
        let status = pod.status.get_or_insert_with(PodStatus::default);
        if status.pod_ip.as_deref().is_none_or(str::is_empty)
            && status.pod_ips.as_ref().is_none_or(Vec::is_empty)
        {
            status.pod_ip = Some(ip);
        }
        if status.phase.is_none() {
            status.phase = Some("Running".into());
        }
        if ambient {
            pod.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .entry(REDIRECTION_ANNOTATION.to_owned())
                .or_insert_with(|| "enabled".to_owned());
        }
    }
    let waypoints: Vec<(ObjectKey, String)> = resources
        .gateways
        .iter()
        .filter(|(_, g)| g.spec.gateway_class_name == crate::gateway::WAYPOINT_CLASS)
        .map(|(key, g)| {
            let account = g
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SERVICE_ACCOUNT_ANNOTATION))
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| key.name.clone());
            (key.clone(), account)
        })
        .collect();
    for (key, account) in waypoints {
        if !resources.services.contains_key(&key) {
            let service: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": key.name, "namespace": key.namespace},
                "spec": {
                    "clusterIP": next_ip(3),
                    "selector": {GATEWAY_NAME_LABEL: key.name},
                    "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008}],
                },
            }))
            .unwrap_or_default();
            resources.services.insert(key.clone(), service);
            made.insert(("Service", key.clone()));
        }
        let pod_key = ObjectKey::new(&key.namespace, &format!("{}-waypoint-pod", key.name));
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(pod_key.name.clone()),
                namespace: Some(key.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    GATEWAY_NAME_LABEL.to_owned(),
                    key.name.clone(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node".into()),
                service_account_name: Some(account),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(next_ip(4)),
                ..PodStatus::default()
            }),
        };
        resources.pods.insert(pod_key.clone(), pod);
        made.insert(("Pod", pod_key));
    }
    made
}

/// The mesh model of `input` as a cluster would hold it once applied (see the module
/// doc): what `ambitctl authz explain` decides on, offline.
pub fn model(input: &Input, root_namespace: &str) -> ambit_core::model::MeshConfig {
    let mut resources = input.resources.clone();
    as_applied(&mut resources);
    translate_with(&resources, root_namespace).config
}

/// Every finding about `input`, mesh-wide policies read from `root_namespace`; each
/// once, errors first.
pub fn analyze(input: &Input, root_namespace: &str) -> Vec<Finding> {
    let mut resources = input.resources.clone();
    let made = as_applied(&mut resources);
    let t = translate_with(&resources, root_namespace);
    let mut out: Vec<Finding> = Vec::new();
    let place =
        |kind: &str, key: &ObjectKey| input.places.get(&(kind.to_owned(), key.clone())).cloned();

    for e in &input.errors {
        let mut f = finding(
            "AMB0001",
            "",
            &ObjectKey::new("", ""),
            e.message.clone(),
            if e.fails_closed {
                "correct the field named; until then the policy is enforced closed in its scope"
            } else {
                "correct the document: it is not applied as written"
            },
        );
        f.place = Some(if e.line == 0 {
            e.path.display().to_string()
        } else {
            format!("{}:{}", e.path.display(), e.line)
        });
        out.push(f);
    }
    // Policies the reader kept as unreadable are reported above, by their document.
    let unreadable: BTreeSet<(&str, &ObjectKey)> = input
        .resources
        .authorization_policies
        .iter()
        .filter(|(_, p)| p.unreadable.is_some())
        .map(|(k, _)| ("AuthorizationPolicy", k))
        .chain(
            input
                .resources
                .peer_authentications
                .iter()
                .filter(|(_, p)| p.unreadable.is_some())
                .map(|(k, _)| ("PeerAuthentication", k)),
        )
        .chain(
            input
                .resources
                .request_authentications
                .iter()
                .filter(|(_, p)| p.unreadable.is_some())
                .map(|(k, _)| ("RequestAuthentication", k)),
        )
        .collect();
    let mut reported: BTreeSet<(String, ObjectKey)> = BTreeSet::new();
    for (kind, key, a) in &t.policy_status {
        if a.accepted || unreadable.contains(&(*kind, key)) {
            continue;
        }
        // Attached with targetRefs: waypoints enforce it, and whether they can is
        // its waypoint condition (AMB0006).
        let for_waypoints = *kind == "AuthorizationPolicy"
            && t.waypoint_status.policies.iter().any(|(k, _)| k == key);
        if for_waypoints && a.reason != "InvalidValue" {
            continue;
        }
        let (code, fix) = match (a.reason, *kind) {
            ("InvalidValue", _) => ("AMB0002", "correct the field named; until then the policy fails closed"),
            (_, "DestinationRule") => ("AMB0003", "keep one DestinationRule per host"),
            (_, "RequestAuthentication") => ("AMB0003", "correct the field named"),
            _ => ("AMB0003", "move the fields ztunnel cannot enforce to a policy attached to a waypoint (targetRefs), or remove them"),
        };
        out.push(finding(code, kind, key, a.message.clone(), fix));
        reported.insert(((*kind).to_owned(), key.clone()));
    }
    for s in &t.skipped {
        if made.contains(&(s.kind, s.key.clone()))
            || reported.contains(&(s.kind.to_owned(), s.key.clone()))
        {
            continue;
        }
        out.push(finding(
            "AMB0004",
            s.kind,
            &s.key,
            s.reason.clone(),
            "correct the object; it is left out of the mesh until then",
        ));
        reported.insert((s.kind.to_owned(), s.key.clone()));
    }
    for (kind, key, c) in &t.waypoint_status.bound {
        if c.status || c.pending || made.contains(&(kind, key.clone())) {
            continue;
        }
        out.push(finding("AMB0005", kind, key, c.message.clone(), "create the waypoint (ambitctl waypoint generate), or correct istio.io/use-waypoint (and -namespace) to name one that serves this traffic"));
        reported.insert(((*kind).to_owned(), key.clone()));
    }
    for (key, c) in &t.waypoint_status.policies {
        if c.status
            || c.pending
            || reported.contains(&("AuthorizationPolicy".to_owned(), key.clone()))
        {
            continue;
        }
        out.push(finding("AMB0006", "AuthorizationPolicy", key, c.message.clone(), "bind the targeted Service (or namespace) to a waypoint with istio.io/use-waypoint, or attach the policy with a selector for ztunnel"));
        reported.insert(("AuthorizationPolicy".to_owned(), key.clone()));
    }
    for (kind, key, parents) in &t.route_status.parents {
        for p in parents {
            for c in [&p.accepted, &p.resolved_refs] {
                if c.status || c.pending {
                    continue;
                }
                out.push(finding(
                    "AMB0007",
                    kind,
                    key,
                    format!(
                        "parent {} {}/{}: {}: {}",
                        p.kind, p.namespace, p.name, c.reason, c.message
                    ),
                    "correct the parentRefs or backendRefs named",
                ));
                reported.insert(((*kind).to_owned(), key.clone()));
            }
        }
    }
    for (kind, key, c) in &t.route_status.conditions {
        if c.status || c.pending {
            continue;
        }
        out.push(finding(
            "AMB0007",
            kind,
            key,
            format!("{}: {}", c.reason, c.message),
            "correct the hosts or destinations named",
        ));
        reported.insert(((*kind).to_owned(), key.clone()));
    }
    for (key, g) in &t.waypoint_status.gateways {
        if !g.accepted.status && !g.accepted.pending {
            out.push(finding("AMB0008", "Gateway", key, g.accepted.message.clone(), "give the waypoint one listener: name mesh, port 15008, protocol HBONE (ambitctl waypoint generate writes it)"));
            reported.insert(("Gateway".to_owned(), key.clone()));
        }
    }
    for w in &t.warnings {
        let kind_key = (w.kind.to_owned(), w.key.clone());
        let waypoint_binding = w.reason.starts_with("WaypointIsNotReady")
            || w.reason.starts_with("AttachmentDenied")
            || w.reason.starts_with("UnsupportedTrafficType");
        if reported.contains(&kind_key) || made.contains(&(w.kind, w.key.clone())) {
            continue;
        }
        if waypoint_binding {
            // A Pod's binding: same finding as a Service's.
            out.push(finding(
                "AMB0005",
                w.kind,
                &w.key,
                w.reason.clone(),
                "create the waypoint, or correct istio.io/use-waypoint on the pod",
            ));
        } else {
            out.push(finding(
                "AMB0013",
                w.kind,
                &w.key,
                w.reason.clone(),
                "add what the object refers to, or remove the reference",
            ));
        }
        reported.insert(kind_key);
    }

    let workloads = workloads(input, &resources, &made);
    selects_nothing(input, &workloads, root_namespace, &mut out);
    services_without_mesh_endpoints(input, &resources, &workloads, &made, &mut out);
    peer_authentications(input, &workloads, root_namespace, &mut out);

    for f in &mut out {
        if f.place.is_none() && !f.object.is_empty() {
            let key = match f.object.split_once('/') {
                Some((ns, name)) => ObjectKey::new(ns, name),
                None => ObjectKey::new("", &f.object),
            };
            f.place = place(&f.kind, &key);
        }
    }
    out.sort_by(|a, b| {
        (a.severity, &a.code, &a.kind, &a.object, &a.message)
            .cmp(&(b.severity, &b.code, &b.kind, &b.object, &b.message))
    });
    out.dedup();
    out
}

fn workloads(
    input: &Input,
    resources: &Resources,
    made: &BTreeSet<(&'static str, ObjectKey)>,
) -> Vec<Workload> {
    let namespace_mode = |ns: &str| {
        resources
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
            .cloned()
    };
    let mut out: Vec<Workload> = resources
        .pods
        .iter()
        .filter(|(key, _)| !made.contains(&("Pod", (*key).clone())))
        .map(|(key, pod)| Workload {
            namespace: key.namespace.clone(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ambient: crate::translate::wants_ambient(resources, key, pod),
        })
        .collect();
    for (namespace, labels) in &input.templates {
        let ambient = match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some("ambient") => true,
            Some("none") => false,
            _ => namespace_mode(namespace).as_deref() == Some("ambient"),
        };
        out.push(Workload {
            namespace: namespace.clone(),
            labels: labels.clone(),
            ambient,
        });
    }
    out
}

/// `spec.selector.matchLabels` of a policy, when it has one.
fn match_labels(spec: &Value) -> Option<BTreeMap<String, String>> {
    let labels = spec.get("selector")?.get("matchLabels")?.as_object()?;
    Some(
        labels
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect(),
    )
}

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn selects_nothing(input: &Input, workloads: &[Workload], root: &str, out: &mut Vec<Finding>) {
    let r = &input.resources;
    let policies = r
        .authorization_policies
        .iter()
        .filter(|(_, p)| p.unreadable.is_none())
        .map(|(k, p)| ("AuthorizationPolicy", k, &p.spec))
        .chain(
            r.peer_authentications
                .iter()
                .filter(|(_, p)| p.unreadable.is_none())
                .map(|(k, p)| ("PeerAuthentication", k, &p.spec)),
        )
        .chain(
            r.request_authentications
                .iter()
                .filter(|(_, p)| p.unreadable.is_none())
                .map(|(k, p)| ("RequestAuthentication", k, &p.spec)),
        );
    for (kind, key, spec) in policies {
        let Some(selector) = match_labels(spec) else {
            continue;
        };
        let in_scope = |w: &&Workload| key.namespace == root || w.namespace == key.namespace;
        if !workloads
            .iter()
            .filter(in_scope)
            .any(|w| matches(&selector, &w.labels))
        {
            let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push(finding(
                "AMB0009",
                kind,
                key,
                format!(
                    "spec.selector.matchLabels {} matches no workload in {}",
                    labels.join(","),
                    if key.namespace == root {
                        "the mesh".to_owned()
                    } else {
                        format!("namespace {}", key.namespace)
                    }
                ),
                "correct the labels, or remove the selector to apply it to the whole namespace",
            ));
        }
    }
}

fn services_without_mesh_endpoints(
    input: &Input,
    resources: &Resources,
    workloads: &[Workload],
    made: &BTreeSet<(&'static str, ObjectKey)>,
    out: &mut Vec<Finding>,
) {
    for (key, service) in &input.resources.services {
        if made.contains(&("Service", key.clone())) || resources.gateways.contains_key(key) {
            continue;
        }
        let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.clone()) else {
            continue;
        };
        if selector.is_empty() {
            continue;
        }
        let selected: Vec<&Workload> = workloads
            .iter()
            .filter(|w| w.namespace == key.namespace && matches(&selector, &w.labels))
            .collect();
        if !selected.is_empty() && selected.iter().all(|w| !w.ambient) {
            out.push(finding(
                "AMB0010",
                "Service",
                key,
                format!("none of its {} workload(s) is in the mesh (label {DATAPLANE_MODE_LABEL}=ambient on the namespace or the pods)", selected.len()),
                "enroll the namespace (kubectl label namespace <ns> istio.io/dataplane-mode=ambient), or ignore if it is meant to stay outside",
            ));
        }
    }
}

fn peer_authentications(input: &Input, workloads: &[Workload], root: &str, out: &mut Vec<Finding>) {
    // Scope → the PeerAuthentications for it: (namespace, selector) with no selector
    // as "".
    let mut scopes: BTreeMap<(String, String), Vec<&ObjectKey>> = BTreeMap::new();
    let mut strict: Vec<(&ObjectKey, Option<BTreeMap<String, String>>)> = Vec::new();
    for (key, p) in &input.resources.peer_authentications {
        if p.unreadable.is_some() {
            continue;
        }
        let selector = match_labels(&p.spec);
        let scope = selector
            .as_ref()
            .map(|s| {
                s.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        scopes
            .entry((key.namespace.clone(), scope))
            .or_default()
            .push(key);
        if p.spec["mtls"]["mode"].as_str() == Some("STRICT") {
            strict.push((key, selector));
        }
    }
    for ((namespace, scope), keys) in &scopes {
        if keys.len() < 2 {
            continue;
        }
        let names: Vec<String> = keys.iter().map(|k| k.name.clone()).collect();
        let what = match (namespace == root, scope.is_empty()) {
            (true, true) => "the whole mesh".to_owned(),
            (false, true) => format!("namespace {namespace}"),
            (_, false) => format!("the workloads labelled {scope} in {namespace}"),
        };
        for key in keys {
            out.push(finding(
                "AMB0011",
                "PeerAuthentication",
                key,
                format!(
                    "{} PeerAuthentications ({}) are for {what}",
                    keys.len(),
                    names.join(", ")
                ),
                "keep one PeerAuthentication per scope (namespace, or namespace and selector)",
            ));
        }
    }
    let outside: Vec<&Workload> = workloads.iter().filter(|w| !w.ambient).collect();
    if outside.is_empty() {
        return;
    }
    let outside_namespaces: BTreeSet<&str> = outside.iter().map(|w| w.namespace.as_str()).collect();
    for (key, selector) in strict {
        let applies_to_mesh_workload = workloads.iter().any(|w| {
            w.ambient
                && (key.namespace == root || w.namespace == key.namespace)
                && selector.as_ref().is_none_or(|s| matches(s, &w.labels))
        });
        if !applies_to_mesh_workload {
            continue;
        }
        out.push(finding(
            "AMB0012",
            "PeerAuthentication",
            key,
            format!(
                "STRICT mTLS, while workloads outside the mesh exist (in {}): their connections to the workloads it covers are refused",
                outside_namespaces.iter().copied().collect::<Vec<_>>().join(", ")
            ),
            "enroll those workloads, or use PERMISSIVE until they are",
        ));
    }
}
