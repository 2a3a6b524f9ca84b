//! What the supervisor changes on the running mesh when `local apply` or `local delete`
//! asks ([`super::requests`]):
//!
//! - a Gateway of class `istio-waypoint`: a waypoint pod on the first node, as `up`
//!   makes one (its own network namespace, its own service account with a token the
//!   control plane accepts, a certificate from the CA), its Service, and the objects
//!   for the control plane; deleting it stops the pod and removes them;
//! - a Namespace, Service or Pod of the running mesh whose only change is a waypoint
//!   label (`istio.io/use-waypoint`, `-namespace`, `istio.io/waypoint-for`): the
//!   control plane reads the object again; deleting it puts back the labels `up` read.
//!
//! Anything else in such an object (a port, a new pod) is refused, naming the object
//! and the field. A request is checked whole before anything is changed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ambit_localmesh::{
    LocalMesh, Pod, PodSpec, Process, Service, ServiceAccount, ServiceSpec, WaypointConfig,
};
use ambit_net::process::LogFormat;
use serde_json::Value;

use super::requests::{Reply, Request};
use super::state::{MeshState, PodState, ServiceState};
use crate::manifest::{self, WAYPOINT_CLASS, WAYPOINT_HBONE_PORT, WAYPOINT_STATUS_PORT};

/// The labels `local apply` may change on a running object.
pub const WAYPOINT_LABELS: [&str; 3] = [
    ambit_k8s::waypoints::USE_WAYPOINT_LABEL,
    ambit_k8s::waypoints::USE_WAYPOINT_NAMESPACE_LABEL,
    ambit_k8s::gateway::WAYPOINT_FOR_LABEL,
];

/// The kinds the supervisor takes; the others `local apply` writes for the control
/// plane itself.
pub const MESH_KINDS: [&str; 4] = ["Gateway", "Namespace", "Service", "Pod"];

/// The mesh's objects as they are now, and the waypoints started while it runs.
#[derive(Debug)]
pub struct Live {
    /// Every object the control plane reads from the mesh, as last changed.
    declared: Vec<Value>,
    /// As `up` read them.
    original: Vec<Value>,
    waypoints: BTreeMap<String, Started>,
    node: String,
    binary: PathBuf,
    log_format: LogFormat,
    deadline: std::time::Duration,
}

#[derive(Debug)]
struct Started {
    pod: Pod,
    service: Service,
    account: ServiceAccount,
    /// Stops the waypoint when dropped.
    _process: Process,
}

/// How the local mesh runs the waypoint of Gateway `namespace/gateway` as `account`,
/// whether `up` or `local apply` starts it.
pub fn waypoint_config(
    binary: PathBuf,
    namespace: &str,
    gateway: &str,
    account: ServiceAccount,
    log_format: LogFormat,
) -> WaypointConfig {
    WaypointConfig {
        binary,
        gateway: ServiceAccount {
            namespace: namespace.to_owned(),
            name: gateway.to_owned(),
        },
        account,
        log: "info,ambit_waypoint=debug".into(),
        log_format,
    }
}

/// `Kind namespace/name` (a Namespace: `Namespace name`).
fn describe(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if kind == "Namespace" {
        return format!("Namespace {name}");
    }
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    format!("{kind} {namespace}/{name}")
}

/// Why `object` cannot be applied to the running mesh as it stands, if it cannot.
fn first_difference(running: &Value, wanted: &Value, path: &str) -> Option<String> {
    match (running, wanted) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                first_difference(
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    &here,
                )
            })
        }
        (Value::Array(a), Value::Array(b)) => (0..a.len().max(b.len())).find_map(|i| {
            first_difference(
                a.get(i).unwrap_or(&Value::Null),
                b.get(i).unwrap_or(&Value::Null),
                &format!("{path}[{i}]"),
            )
        }),
        (a, b) if a == b => None,
        _ => Some(path.to_owned()),
    }
}

/// `object` without its waypoint labels (and without an empty label map).
fn without_waypoint_labels(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(labels) = object["metadata"]["labels"].as_object_mut() {
        labels.retain(|k, _| !WAYPOINT_LABELS.contains(&k.as_str()));
        if labels.is_empty() {
            if let Some(meta) = object["metadata"].as_object_mut() {
                meta.remove("labels");
            }
        }
    }
    object
}

/// `to`'s labels with `from`'s waypoint labels instead of its own.
fn with_waypoint_labels_of(to: &Value, from: &Value) -> Value {
    let mut out = without_waypoint_labels(to);
    let theirs: serde_json::Map<String, Value> = from["metadata"]["labels"]
        .as_object()
        .map(|l| {
            l.iter()
                .filter(|(k, _)| WAYPOINT_LABELS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    if !theirs.is_empty() {
        if !out["metadata"]["labels"].is_object() {
            out["metadata"]["labels"] = Value::Object(serde_json::Map::new());
        }
        if let Some(labels) = out["metadata"]["labels"].as_object_mut() {
            labels.extend(theirs);
        }
    }
    out
}

/// A change checked and ready to make.
enum Change {
    StartWaypoint {
        at: String,
        gateway: Value,
    },
    StopWaypoint {
        key: String,
    },
    /// Replace the declared object of the same kind, namespace and name by `object`
    /// (found again when made: stopping a waypoint removes objects before it).
    Labels {
        object: Value,
        what: String,
    },
}

impl Live {
    pub fn new(
        objects: Vec<Value>,
        node: String,
        binary: PathBuf,
        log_format: LogFormat,
        deadline: std::time::Duration,
    ) -> Live {
        Live {
            original: objects.clone(),
            declared: objects,
            waypoints: BTreeMap::new(),
            node,
            binary,
            log_format,
            deadline,
        }
    }

    fn find(&self, objects: &[Value], wanted: &Value) -> Option<usize> {
        let key = describe(wanted);
        objects.iter().position(|o| describe(o) == key)
    }

    /// Checks `request` whole; the changes to make, or why not.
    fn check(&self, request: &Request) -> Result<Vec<Change>, Vec<String>> {
        let mut changes = Vec::new();
        let mut refusals = Vec::new();
        for (at, object) in &request.objects {
            let what = describe(object);
            let kind = object["kind"].as_str().unwrap_or_default();
            let mut refuse = |why: String| refusals.push(format!("{at}: {what}: {why}"));
            if kind == "Gateway" {
                let key = what.trim_start_matches("Gateway ").to_owned();
                let class = object["spec"]["gatewayClassName"]
                    .as_str()
                    .unwrap_or_default();
                if class != WAYPOINT_CLASS {
                    refuse(format!(
                        "spec.gatewayClassName is {class:?}: the local mesh runs Gateways of class {WAYPOINT_CLASS} (waypoints) only"
                    ));
                    continue;
                }
                let running = self.find(&self.declared, object);
                if request.delete {
                    if self.waypoints.contains_key(&key) {
                        changes.push(Change::StopWaypoint { key });
                    } else if running.is_some() {
                        refuse("it comes from the directory `local up` ran; only a waypoint `local apply` started can be deleted (`local down` stops them all)".into());
                    } else {
                        refuse("no such waypoint runs".into());
                    }
                    continue;
                }
                match running {
                    Some(i) => match first_difference(&self.declared[i], object, "") {
                        None => {} // Unchanged.
                        Some(field) => refuse(format!(
                            "its waypoint runs already; field {field} differs, and a running waypoint's Gateway cannot change (delete it, then apply it again)"
                        )),
                    },
                    None => {
                        let name = object["metadata"]["name"].as_str().unwrap_or_default();
                        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default");
                        let taken: Vec<String> = [
                            format!("Pod {namespace}/{name}-0"),
                            format!("Service {namespace}/{name}"),
                        ]
                        .into_iter()
                        .filter(|k| self.declared.iter().any(|o| describe(o) == *k))
                        .collect();
                        if !taken.is_empty() {
                            refuse(format!("its waypoint needs {}, which the mesh has already", taken.join(" and ")));
                        } else if !manifest::is_dns_label(name) || !manifest::is_dns_label(namespace) {
                            refuse("a waypoint's name must be a DNS label (its pod and Service are named after it)".into());
                        } else {
                            changes.push(Change::StartWaypoint {
                                at: at.clone(),
                                gateway: object.clone(),
                            });
                        }
                    }
                }
                continue;
            }
            let Some(index) = self.find(&self.declared, object) else {
                refuse(format!(
                    "not in the running mesh: `local apply` changes only the waypoint labels ({}) of its namespaces, services and pods; new ones come from the directory given to `local up`",
                    WAYPOINT_LABELS.join(", ")
                ));
                continue;
            };
            let running = &self.declared[index];
            if let Some(field) = first_difference(
                &without_waypoint_labels(running),
                &without_waypoint_labels(object),
                "",
            ) {
                refuse(format!(
                    "field {field} differs from the running mesh's; on a running mesh `local apply` changes only the labels {}",
                    WAYPOINT_LABELS.join(", ")
                ));
                continue;
            }
            let replacement = if request.delete {
                let original = self
                    .find(&self.original, object)
                    .map(|i| &self.original[i])
                    .unwrap_or(running);
                with_waypoint_labels_of(running, original)
            } else {
                with_waypoint_labels_of(running, object)
            };
            let labels = |o: &Value| {
                WAYPOINT_LABELS
                    .iter()
                    .filter_map(|l| {
                        o["metadata"]["labels"][l]
                            .as_str()
                            .map(|v| format!("{l}={v}"))
                    })
                    .collect::<Vec<_>>()
            };
            let now = labels(&replacement);
            let said = if now.is_empty() {
                "no waypoint label".to_owned()
            } else {
                now.join(", ")
            };
            if replacement != *running {
                changes.push(Change::Labels {
                    object: replacement,
                    what: format!("{what}: now {said}"),
                });
            }
        }
        if refusals.is_empty() {
            Ok(changes)
        } else {
            Err(refusals)
        }
    }

    /// Does what `request` asks, or nothing if any of it is refused.
    pub async fn handle(
        &mut self,
        mesh: &LocalMesh,
        ambient: &mut ambit_localmesh::Ambient,
        recorded: &mut MeshState,
        request: &Request,
    ) -> Reply {
        let changes = match self.check(request) {
            Ok(c) => c,
            Err(lines) => {
                return Reply {
                    ok: false,
                    lines,
                    draining: Vec::new(),
                }
            }
        };
        let mut lines = Vec::new();
        let mut labels_changed = false;
        for change in changes {
            let done = match change {
                Change::Labels { object, what } => match self.find(&self.declared, &object) {
                    Some(index) => {
                        self.declared[index] = object;
                        labels_changed = true;
                        Ok(what)
                    }
                    None => Err(format!("{what}: the object is gone from the running mesh")),
                },
                Change::StartWaypoint { at, gateway } => self
                    .start(mesh, ambient, recorded, gateway)
                    .map_err(|e| format!("{at}: {e:#}")),
                Change::StopWaypoint { key } => self
                    .stop(mesh, ambient, recorded, &key)
                    .map_err(|e| format!("Gateway {key}: {e:#}")),
            };
            match done {
                Ok(line) => lines.push(line),
                Err(e) => {
                    lines.push(e);
                    return Reply {
                        ok: false,
                        lines,
                        draining: Vec::new(),
                    };
                }
            }
        }
        if labels_changed {
            mesh.declare_kubernetes(self.declared.clone());
            if let Err(e) = mesh.write_kubernetes() {
                lines.push(format!("cannot write the control plane's objects: {e}"));
                return Reply {
                    ok: false,
                    lines,
                    draining: Vec::new(),
                };
            }
        }
        Reply {
            ok: true,
            lines,
            draining: Vec::new(),
        }
    }

    fn start(
        &mut self,
        mesh: &LocalMesh,
        ambient: &mut ambit_localmesh::Ambient,
        recorded: &mut MeshState,
        gateway: Value,
    ) -> anyhow::Result<String> {
        let name = gateway["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let namespace = gateway["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let key = format!("{namespace}/{name}");
        let (pod_object, service_object) =
            manifest::waypoint_objects(&namespace, &name, &gateway, &self.node);
        let pod_name = format!("{name}-0");
        let account_name = pod_object["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or(&name)
            .to_owned();
        let account = ServiceAccount {
            namespace: namespace.clone(),
            name: account_name.clone(),
        };
        let before = self.declared.len();
        self.declared
            .extend([gateway, pod_object.clone(), service_object]);
        mesh.declare_kubernetes(self.declared.clone());
        let mut pod = None;
        let mut service = None;
        let made = (|| -> anyhow::Result<Process> {
            ambient.add_account(mesh, &account)?;
            let mut spec = PodSpec::new(&namespace, &pod_name).service_account(&account_name);
            for (k, v) in pod_object["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
            {
                spec = spec.label(k, v.as_str().unwrap_or_default());
            }
            let made_pod = pod.insert(mesh.add_pod(&self.node, spec)?);
            service = Some(
                mesh.add_service(
                    ServiceSpec::new(&namespace, &name)
                        .port(WAYPOINT_HBONE_PORT, WAYPOINT_HBONE_PORT)
                        .port(WAYPOINT_STATUS_PORT, WAYPOINT_STATUS_PORT)
                        .endpoints([&*made_pod]),
                )?,
            );
            let config = waypoint_config(
                self.binary.clone(),
                &namespace,
                &name,
                account.clone(),
                self.log_format,
            );
            Ok(ambit_localmesh::ambient::start_waypoint(
                mesh,
                made_pod,
                &config,
                self.deadline,
            )?)
        })();
        let (pod, service, process) = match (made, pod, service) {
            (Ok(process), Some(pod), Some(service)) => (pod, service, process),
            (made, pod, service) => {
                // Back to how it was: what was made goes, the objects too.
                self.declared.truncate(before);
                mesh.declare_kubernetes(self.declared.clone());
                if let Some(s) = service {
                    let _ = mesh.remove_service(&s);
                }
                if let Some(p) = pod {
                    let _ = mesh.remove_pod(&p);
                }
                let _ = ambient.remove_account(mesh, &account);
                let _ = mesh.write_kubernetes();
                let e = made
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("its pod or Service was not made"));
                return Err(e.context(format!("starting the waypoint of Gateway {key}")));
            }
        };
        recorded.pods.push(PodState {
            namespace: namespace.clone(),
            name: pod_name.clone(),
            node: pod.node().to_owned(),
            ip: pod.ip(),
            ip6: pod.ip6(),
            service_account: account_name.clone(),
            enrolled: false,
            netns: pod.netns().path().to_owned(),
            http_ports: Vec::new(),
            tcp_ports: Vec::new(),
            waypoint: Some(name.clone()),
        });
        recorded.services.push(ServiceState {
            namespace: namespace.clone(),
            name: name.clone(),
            vip: service.vip(),
            ports: vec![
                (WAYPOINT_HBONE_PORT, WAYPOINT_HBONE_PORT),
                (WAYPOINT_STATUS_PORT, WAYPOINT_STATUS_PORT),
            ],
            endpoints: vec![pod.uid()],
        });
        recorded.pids.push(process.pid());
        let line = format!(
            "Gateway {key}: waypoint pod {namespace}/{pod_name} on {} ({}) as {}, Service {key} {}",
            pod.node(),
            pod.ip(),
            account.identity(),
            service.vip()
        );
        self.waypoints.insert(
            key,
            Started {
                pod,
                service,
                account,
                _process: process,
            },
        );
        Ok(line)
    }

    fn stop(
        &mut self,
        mesh: &LocalMesh,
        ambient: &mut ambit_localmesh::Ambient,
        recorded: &mut MeshState,
        key: &str,
    ) -> anyhow::Result<String> {
        let started = self
            .waypoints
            .remove(key)
            .ok_or_else(|| anyhow::anyhow!("no such waypoint runs"))?;
        let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
        let gone = [
            format!("Gateway {key}"),
            format!("Pod {}", started.pod.uid()),
            format!("Service {key}"),
        ];
        self.declared.retain(|o| !gone.contains(&describe(o)));
        mesh.declare_kubernetes(self.declared.clone());
        let pid = started._process.pid();
        let pod_uid = started.pod.uid();
        mesh.remove_service(&started.service)?;
        mesh.remove_pod(&started.pod)?;
        ambient.remove_account(mesh, &started.account)?;
        drop(started);
        mesh.write_kubernetes()?;
        recorded.pods.retain(|p| p.uid() != pod_uid);
        recorded
            .services
            .retain(|s| !(s.namespace == namespace && s.name == name));
        recorded.pids.retain(|p| *p != pid);
        Ok(format!(
            "Gateway {key}: waypoint pod {pod_uid} stopped and removed, with Service {key}"
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn live() -> Live {
        Live::new(
            vec![
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders", "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}}),
            ],
            "node-a".into(),
            PathBuf::from("/nonexistent/waypoint"),
            LogFormat::Text,
            std::time::Duration::from_secs(1),
        )
    }

    fn request(delete: bool, objects: Vec<Value>) -> Request {
        Request {
            delete,
            objects: objects
                .into_iter()
                .map(|o| ("f.yaml:1".to_owned(), o))
                .collect(),
            upgrade: None,
        }
    }

    #[test]
    fn only_waypoint_labels_may_change_on_a_running_object() {
        let live = live();
        let labelled = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders", "namespace": "shop", "labels": {"istio.io/use-waypoint": "wp"}}, "spec": {"ports": [{"port": 80}]}});
        let changes = live.check(&request(false, vec![labelled.clone()])).unwrap();
        assert!(
            matches!(&changes[..], [Change::Labels { what, .. }] if what == "Service shop/orders: now istio.io/use-waypoint=wp")
        );

        let mut port = labelled.clone();
        port["spec"]["ports"][0]["port"] = json!(81);
        let refused = live
            .check(&request(false, vec![labelled, port]))
            .err()
            .unwrap();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("Service shop/orders: field spec.ports[0].port differs"),
            "{refused:?}"
        );

        let new_pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "new", "namespace": "shop"}});
        let refused = live.check(&request(false, vec![new_pod])).err().unwrap();
        assert!(
            refused[0].contains("Pod shop/new: not in the running mesh"),
            "{refused:?}"
        );

        let other_label = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient", "team": "x"}}});
        let refused = live
            .check(&request(false, vec![other_label]))
            .err()
            .unwrap();
        assert!(
            refused[0].contains("field metadata.labels.team differs"),
            "{refused:?}"
        );

        // Unchanged: nothing to do.
        let same = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}});
        assert!(live.check(&request(false, vec![same])).unwrap().is_empty());
    }

    #[test]
    fn gateways_of_other_classes_and_unknown_deletes_are_refused() {
        let live = live();
        let ingress = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "in", "namespace": "shop"}, "spec": {"gatewayClassName": "istio"}});
        let refused = live.check(&request(false, vec![ingress])).err().unwrap();
        assert!(
            refused[0].contains("spec.gatewayClassName is \"istio\""),
            "{refused:?}"
        );
        let wp = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "orders", "namespace": "shop"}, "spec": {"gatewayClassName": "istio-waypoint"}});
        // Its Service name is taken.
        let refused = live.check(&request(false, vec![wp.clone()])).err().unwrap();
        assert!(
            refused[0].contains("needs Service shop/orders"),
            "{refused:?}"
        );
        let refused = live.check(&request(true, vec![wp])).err().unwrap();
        assert!(refused[0].contains("no such waypoint runs"), "{refused:?}");
    }
}
