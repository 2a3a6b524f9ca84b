//! The application `ambitctl local up <dir>` runs: the Kubernetes objects in a directory
//! of multi-document YAML (`*.yaml`, `*.yml`), read into what the local mesh needs to
//! make (nodes, pods, services) and kept whole for the control plane.
//!
//! Nodes are the distinct `spec.nodeName` values of the pods, in order of appearance;
//! a pod without one goes to the first node (`node-a` when no pod names one). A pod is
//! enrolled when it, or else its namespace, carries `istio.io/dataplane-mode: ambient`
//! (a pod's `none` opts it out) and it is not on the host network, the rule the
//! control plane applies. Every pod gets its own network namespace.
//!
//! A Gateway of class `istio-waypoint` is a waypoint: as the control plane does in a
//! cluster (a Deployment, a Service and a ServiceAccount named like the Gateway), the
//! local mesh makes it a pod `<gateway>-0` on the first node running the `waypoint`
//! binary, as service account `<gateway>` (or the Gateway's
//! `gateway.istio.io/service-account` annotation), labelled
//! `gateway.networking.k8s.io/gateway-name` and `istio.io/dataplane-mode: none`, and a
//! Service `<gateway>` on 15008 (`mesh`) and 15021 (`status-port`). The pod and the
//! Service are added to the objects the control plane reads, as a cluster would show
//! them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The label that enrols a namespace or a pod in ambient mode.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The node pods go to when no pod names one.
pub const DEFAULT_NODE: &str = "node-a";
/// The GatewayClass whose Gateways are waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// The label a waypoint's pods carry: the Gateway's name.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The annotation naming the service account a waypoint runs as.
pub const WAYPOINT_ACCOUNT_ANNOTATION: &str = "gateway.istio.io/service-account";
/// A waypoint's HBONE port and its readiness port.
pub const WAYPOINT_HBONE_PORT: u16 = 15008;
pub const WAYPOINT_STATUS_PORT: u16 = 15021;
/// The demo app's ports when a pod declares none: HTTP echo and TCP echo.
pub const DEFAULT_HTTP_PORT: u16 = 8080;
pub const DEFAULT_TCP_PORT: u16 = 9000;

/// Why a directory cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no Kubernetes YAML (*.yaml, *.yml) in it", .0.display())]
    Empty(PathBuf),
    #[error("{at}: not valid YAML: {reason}")]
    Yaml { at: Location, reason: String },
    #[error("{at}: {reason}")]
    Object { at: Location, reason: String },
    #[error("{}: no Pod in it: nothing to run", .0.display())]
    NoPods(PathBuf),
}

/// Where in which file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based; 0 when unknown.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}", self.file.display(), self.line)
        } else {
            write!(f, "{}", self.file.display())
        }
    }
}

/// What a directory declares.
#[derive(Debug, Clone, Default)]
pub struct App {
    pub nodes: Vec<String>,
    pub pods: Vec<AppPod>,
    pub services: Vec<AppService>,
    /// Every object, as written, for the control plane.
    pub objects: Vec<Value>,
    /// Things worth telling the user (a pod placed on the first node, a port skipped).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled: bool,
    /// The demo app's HTTP echo ports and TCP echo ports.
    pub http_ports: Vec<u16>,
    pub tcp_ports: Vec<u16>,
    /// Named container ports, for named target ports.
    pub named_ports: BTreeMap<String, u16>,
    /// The Gateway (its name, in the pod's namespace) when the pod is a waypoint: it
    /// runs the `waypoint` binary, not the demo app.
    pub waypoint: Option<String>,
}

impl AppPod {
    pub fn uid(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppService {
    pub namespace: String,
    pub name: String,
    pub vip: Option<Ipv4Addr>,
    /// (port, target port) per endpoint pod uid: a named target port may differ by pod.
    pub ports: Vec<(u16, TargetPort)>,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// The `*.yaml`/`*.yml` files of `dir`, sorted by name.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ManifestError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (sorted by name).
pub fn load_dir(dir: &Path) -> Result<App, ManifestError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ManifestError::Io { path, source }
    };
    let files = yaml_files(dir)?;
    if files.is_empty() {
        return Err(ManifestError::Empty(dir.to_owned()));
    }
    let mut documents = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(io(file))?;
        documents.extend(parse_documents(file, &text)?);
    }
    let app = from_documents(documents)?;
    if app.pods.is_empty() {
        return Err(ManifestError::NoPods(dir.to_owned()));
    }
    Ok(app)
}

/// The non-empty documents of one file, each with the line it starts on, read by the
/// control plane's own reader (`ambit_k8s::read::documents`: the YAML library's
/// documents, keys converted as Kubernetes converts them).
pub fn parse_documents(file: &Path, text: &str) -> Result<Vec<(Location, Value)>, ManifestError> {
    let mut out = Vec::new();
    for document in ambit_k8s::read::documents(text) {
        let at = |line: usize| Location {
            file: file.to_owned(),
            line,
        };
        match document.value {
            Ok(None) => {}
            Ok(Some(value)) => out.push((at(document.line), value)),
            Err(problem) => {
                return Err(ManifestError::Yaml {
                    at: at(problem.line),
                    reason: problem.message,
                })
            }
        }
    }
    Ok(out)
}

/// The application the documents declare.
pub fn from_documents(documents: Vec<(Location, Value)>) -> Result<App, ManifestError> {
    let mut app = App::default();
    let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut pods = Vec::new();
    let mut services = Vec::new();
    let mut gateways = Vec::new();
    let mut seen = BTreeSet::new();
    for (at, object) in documents {
        let bad = |reason: String| ManifestError::Object {
            at: at.clone(),
            reason,
        };
        let kind = object["kind"]
            .as_str()
            .ok_or_else(|| bad("no `kind`: not a Kubernetes object".into()))?
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| bad(format!("{kind} without `metadata.name`")))?
            .to_owned();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        match kind.as_str() {
            "Namespace" => {
                namespace_labels.insert(name.clone(), labels(&object["metadata"]["labels"]));
            }
            "Pod" | "Service" => {
                if !is_dns_label(&name) || !is_dns_label(&namespace) {
                    return Err(bad(format!(
                        "{kind} {namespace}/{name}: names must be DNS labels (a-z, 0-9, `-`, at most 63)"
                    )));
                }
                if !seen.insert((kind.clone(), namespace.clone(), name.clone())) {
                    return Err(bad(format!("{kind} {namespace}/{name} is declared twice")));
                }
                if kind == "Pod" {
                    pods.push((at.clone(), namespace, name, object.clone()));
                } else {
                    services.push((at.clone(), namespace, name, object.clone()));
                }
            }
            "Gateway" if object["spec"]["gatewayClassName"].as_str() == Some(WAYPOINT_CLASS) => {
                if !is_dns_label(&name) || !is_dns_label(&namespace) {
                    return Err(bad(format!(
                        "Gateway {namespace}/{name}: a waypoint's name must be a DNS label (its pod and Service are named after it)"
                    )));
                }
                gateways.push((at.clone(), namespace, name, object.clone()));
            }
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "CronJob" => {
                app.notes.push(format!(
                    "{kind} {namespace}/{name}: the local mesh runs Pods only, so it makes no pods for it (write them as Pods)"
                ));
            }
            _ => {}
        }
        app.objects.push(object);
    }
    for (at, namespace, name, object) in pods {
        let pod = pod(&mut app, &at, namespace, name, &object, &namespace_labels)?;
        app.pods.push(pod);
    }
    let first_node = app
        .nodes
        .first()
        .cloned()
        .unwrap_or_else(|| DEFAULT_NODE.to_owned());
    for (at, namespace, name, gateway) in gateways {
        let (pod_object, service_object) =
            waypoint_objects(&namespace, &name, &gateway, &first_node);
        let pod_name = pod_object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for (kind, object_name) in [("Pod", &pod_name), ("Service", &name)] {
            if !seen.insert((kind.to_owned(), namespace.clone(), object_name.clone())) {
                return Err(ManifestError::Object {
                    at: at.clone(),
                    reason: format!(
                        "Gateway {namespace}/{name}: its waypoint needs {kind} {namespace}/{object_name}, which is declared already"
                    ),
                });
            }
        }
        let mut pod = pod(
            &mut app,
            &at,
            namespace.clone(),
            pod_name,
            &pod_object,
            &namespace_labels,
        )?;
        pod.waypoint = Some(name.clone());
        app.pods.push(pod);
        app.objects.push(pod_object);
        services.push((at, namespace, name, service_object.clone()));
        app.objects.push(service_object);
    }
    for (at, namespace, name, object) in services {
        if let Some(service) = service(&mut app, &at, namespace, name, &object)? {
            app.services.push(service);
        }
    }
    if app.nodes.is_empty() {
        app.nodes.push(DEFAULT_NODE.to_owned());
    }
    let first = app.nodes[0].clone();
    for pod in app.pods.iter_mut().filter(|p| p.node.is_empty()) {
        app.notes.push(format!(
            "pod {} names no node (spec.nodeName): it goes to the first node, {first}",
            pod.uid()
        ));
        pod.node = first.clone();
    }
    Ok(app)
}

fn pod(
    app: &mut App,
    at: &Location,
    namespace: String,
    name: String,
    object: &Value,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<AppPod, ManifestError> {
    let bad = |reason: String| ManifestError::Object {
        at: at.clone(),
        reason: format!("Pod {namespace}/{name}: {reason}"),
    };
    let spec = &object["spec"];
    let node = spec["nodeName"].as_str().unwrap_or_default().to_owned();
    if !node.is_empty() {
        if !is_dns_label(&node) {
            return Err(bad(format!("spec.nodeName {node:?} is not a DNS label")));
        }
        if !app.nodes.contains(&node) {
            app.nodes.push(node.clone());
        }
    }
    let labels = labels(&object["metadata"]["labels"]);
    let mode = labels.get(DATAPLANE_MODE).map(String::as_str).or_else(|| {
        namespace_labels
            .get(&namespace)
            .and_then(|l| l.get(DATAPLANE_MODE))
            .map(String::as_str)
    });
    let host_network = spec["hostNetwork"].as_bool() == Some(true);
    if host_network && mode == Some("ambient") {
        app.notes.push(format!(
            "pod {namespace}/{name} is on the host network: never enrolled (as in a cluster)"
        ));
    }
    let enrolled = mode == Some("ambient") && !host_network;
    let (mut http_ports, mut tcp_ports, mut named_ports) =
        (Vec::new(), Vec::new(), BTreeMap::new());
    for container in spec["containers"].as_array().into_iter().flatten() {
        for port in container["ports"].as_array().into_iter().flatten() {
            let number = port["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    bad(format!(
                        "containerPort {} is not a port",
                        port["containerPort"]
                    ))
                })?;
            if port["protocol"].as_str().is_some_and(|p| p != "TCP") {
                app.notes.push(format!(
                    "pod {namespace}/{name}: port {number} is not TCP; the demo app does not serve it"
                ));
                continue;
            }
            let port_name = port["name"].as_str().unwrap_or_default();
            if !port_name.is_empty() {
                named_ports.insert(port_name.to_owned(), number);
            }
            let http = port_name.starts_with("http")
                || port["appProtocol"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("http"))
                || (port_name.is_empty() && matches!(number, 80 | 8000 | 8080));
            if http {
                http_ports.push(number);
            } else {
                tcp_ports.push(number);
            }
        }
    }
    if http_ports.is_empty() && tcp_ports.is_empty() {
        http_ports.push(DEFAULT_HTTP_PORT);
        tcp_ports.push(DEFAULT_TCP_PORT);
    }
    Ok(AppPod {
        service_account: spec["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        namespace,
        name,
        node,
        labels,
        enrolled,
        http_ports,
        tcp_ports,
        named_ports,
        waypoint: None,
    })
}

/// The Pod and the Service a cluster's control plane would make for waypoint
/// Gateway `namespace/name` (its Deployment's one replica), on `node`.
pub(crate) fn waypoint_objects(
    namespace: &str,
    name: &str,
    gateway: &Value,
    node: &str,
) -> (Value, Value) {
    let account = gateway["metadata"]["annotations"][WAYPOINT_ACCOUNT_ANNOTATION]
        .as_str()
        .filter(|a| !a.is_empty())
        .unwrap_or(name);
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("{name}-0"),
            "namespace": namespace,
            "labels": {
                GATEWAY_NAME_LABEL: name,
                DATAPLANE_MODE: "none",
                "service.istio.io/canonical-name": name,
            },
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": account,
            "containers": [{
                "name": "istio-proxy",
                "image": "ambit/waypoint",
                "ports": [
                    {"name": "mesh", "containerPort": WAYPOINT_HBONE_PORT},
                    {"name": "status-port", "containerPort": WAYPOINT_STATUS_PORT},
                ],
            }],
        },
    });
    let service = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {GATEWAY_NAME_LABEL: name},
        },
        "spec": {
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [
                {"name": "mesh", "port": WAYPOINT_HBONE_PORT, "targetPort": WAYPOINT_HBONE_PORT},
                {"name": "status-port", "port": WAYPOINT_STATUS_PORT, "targetPort": WAYPOINT_STATUS_PORT},
            ],
        },
    });
    (pod, service)
}

fn service(
    app: &mut App,
    at: &Location,
    namespace: String,
    name: String,
    object: &Value,
) -> Result<Option<AppService>, ManifestError> {
    let bad = |reason: String| ManifestError::Object {
        at: at.clone(),
        reason: format!("Service {namespace}/{name}: {reason}"),
    };
    let spec = &object["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        app.notes.push(format!(
            "service {namespace}/{name} is ExternalName: the local mesh makes no VIP for it"
        ));
        return Ok(None);
    }
    let vip = match spec["clusterIP"].as_str() {
        None | Some("") => None,
        Some("None") => {
            app.notes.push(format!(
                "service {namespace}/{name} is headless: the local mesh makes no VIP for it"
            ));
            return Ok(None);
        }
        Some(ip) => Some(
            ip.parse::<Ipv4Addr>()
                .map_err(|_| bad(format!("spec.clusterIP {ip:?} is not an IPv4 address")))?,
        ),
    };
    let mut ports = Vec::new();
    for port in spec["ports"].as_array().into_iter().flatten() {
        if port["protocol"].as_str().is_some_and(|p| p != "TCP") {
            continue;
        }
        let number = port["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(format!("port {} is not a port", port["port"])))?;
        let target = match &port["targetPort"] {
            Value::Null => TargetPort::Number(number),
            Value::Number(n) => TargetPort::Number(
                n.as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad(format!("targetPort {n} is not a port")))?,
            ),
            Value::String(s) => match s.parse::<u16>() {
                Ok(p) if p > 0 => TargetPort::Number(p),
                _ => TargetPort::Name(s.clone()),
            },
            other => {
                return Err(bad(format!(
                    "targetPort {other} is neither a number nor a name"
                )))
            }
        };
        ports.push((number, target));
    }
    if ports.is_empty() {
        return Err(bad("no TCP port".into()));
    }
    let selector = labels(&spec["selector"]);
    let endpoints = if selector.is_empty() {
        app.notes.push(format!(
            "service {namespace}/{name} has no selector: it gets no endpoints"
        ));
        Vec::new()
    } else {
        app.pods
            .iter()
            .filter(|p| p.namespace == namespace)
            .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .map(AppPod::uid)
            .collect()
    };
    Ok(Some(AppService {
        namespace,
        name,
        vip,
        ports,
        endpoints,
    }))
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(yaml: &str) -> Result<App, ManifestError> {
        from_documents(parse_documents(Path::new("app.yaml"), yaml)?)
    }

    const SHOP: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers:
  - name: web
    ports: [{name: http, containerPort: 8080}, {containerPort: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, labels: {app: web, istio.io/dataplane-mode: none}}
spec: {nodeName: node-a, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stray, namespace: other}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
";

    #[test]
    fn nodes_pods_enrolment_and_services_come_from_the_yaml() {
        let app = app(SHOP).unwrap();
        assert_eq!(app.nodes, ["node-b", "node-a"]);
        let pods: Vec<(String, &str, bool)> = app
            .pods
            .iter()
            .map(|p| (p.uid(), p.node.as_str(), p.enrolled))
            .collect();
        assert_eq!(
            pods,
            [
                ("shop/web".to_owned(), "node-b", true),
                ("shop/legacy".to_owned(), "node-a", false),
                ("other/stray".to_owned(), "node-b", false),
            ]
        );
        assert!(
            app.notes.iter().any(|n| n.contains("other/stray")),
            "{:?}",
            app.notes
        );
        let web = &app.pods[0];
        assert_eq!(
            (web.http_ports.clone(), web.tcp_ports.clone()),
            (vec![8080], vec![9000])
        );
        assert_eq!(web.service_account, "web");
        let legacy = &app.pods[1];
        assert_eq!(
            (legacy.http_ports.clone(), legacy.tcp_ports.clone()),
            (vec![DEFAULT_HTTP_PORT], vec![DEFAULT_TCP_PORT])
        );
        assert_eq!(app.services.len(), 1);
        assert_eq!(app.services[0].endpoints, ["shop/web", "shop/legacy"]);
        assert_eq!(
            app.services[0].ports,
            [(80, TargetPort::Name("http".into()))]
        );
        assert_eq!(app.objects.len(), 5);
    }

    #[test]
    fn yaml_that_does_not_parse_is_named_by_file_and_line() {
        let err = app("kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata:\n  name: [b\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("app.yaml:"), "{err}");
        assert!(err.contains("not valid YAML"), "{err}");
        let line: usize = err["app.yaml:".len()..]
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((5..=7).contains(&line), "{err}");
    }

    #[test]
    fn an_object_without_a_kind_is_named_by_the_line_it_starts_on() {
        let err = app("kind: Namespace\nmetadata: {name: a}\n---\nmetadata: {name: b}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "app.yaml:4: no `kind`: not a Kubernetes object");
    }

    #[test]
    fn a_bad_cluster_ip_is_refused() {
        let err = app("kind: Pod\nmetadata: {name: a}\n---\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: nope, ports: [{port: 80}]}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "app.yaml:4: Service default/s: spec.clusterIP \"nope\" is not an IPv4 address"
        );
    }

    const WAYPOINT: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  gatewayClassName: other
  listeners: [{name: http, port: 80, protocol: HTTP}]
";

    #[test]
    fn a_waypoint_gateway_becomes_a_pod_and_a_service_named_like_it_on_the_first_node() {
        let app = app(&format!("{SHOP}---{WAYPOINT}")).unwrap();
        let pod = app.pods.iter().find(|p| p.waypoint.is_some()).unwrap();
        assert_eq!(pod.uid(), "shop/waypoint-0");
        assert_eq!(pod.waypoint.as_deref(), Some("waypoint"));
        assert_eq!(pod.service_account, "waypoint");
        assert_eq!(pod.node, "node-b", "the first node");
        assert!(
            !pod.enrolled,
            "a waypoint is never captured, even in an ambient namespace"
        );
        assert_eq!(pod.labels[GATEWAY_NAME_LABEL], "waypoint");
        let service = app.services.iter().find(|s| s.name == "waypoint").unwrap();
        assert_eq!(service.endpoints, ["shop/waypoint-0"]);
        assert_eq!(
            service.ports,
            [
                (15008, TargetPort::Number(15008)),
                (15021, TargetPort::Number(15021))
            ]
        );
        // The control plane reads the Gateway, its pod and its Service.
        let kinds: Vec<(&str, &str)> = app
            .objects
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap(),
                )
            })
            .filter(|(_, n)| n.starts_with("waypoint"))
            .collect();
        assert_eq!(
            kinds,
            [
                ("Gateway", "waypoint"),
                ("Pod", "waypoint-0"),
                ("Service", "waypoint")
            ]
        );
        assert_eq!(
            app.pods.iter().filter(|p| p.waypoint.is_some()).count(),
            1,
            "only istio-waypoint Gateways"
        );
    }

    #[test]
    fn a_waypoint_whose_pod_or_service_name_is_taken_is_refused_naming_both() {
        let taken = "kind: Pod\nmetadata: {name: a}\n---\nkind: Service\nmetadata: {name: waypoint, namespace: shop}\nspec: {ports: [{port: 80}]}\n---";
        let err = app(&format!("{taken}{WAYPOINT}")).unwrap_err().to_string();
        assert!(
            err.contains("Gateway shop/waypoint: its waypoint needs Service shop/waypoint, which is declared already"),
            "{err}"
        );
    }

    #[test]
    fn a_waypoint_runs_as_the_account_its_annotation_names() {
        let yaml = WAYPOINT.replace(
            "metadata: {name: waypoint, namespace: shop}",
            "metadata: {name: waypoint, namespace: shop, annotations: {gateway.istio.io/service-account: wp-sa}}",
        );
        let app = app(&format!("kind: Pod\nmetadata: {{name: a}}\n---{yaml}")).unwrap();
        let pod = app.pods.iter().find(|p| p.waypoint.is_some()).unwrap();
        assert_eq!(pod.service_account, "wp-sa");
    }
}
