//! What `local status` shows of each waypoint of the running mesh: its pod, whether
//! that pod answers ready on its own `/healthz/ready`, its identity, and the Services,
//! ServiceEntries and pods bound to it. Bindings are read from the objects the control
//! plane reads (the mesh's `k8s/` directory) with the control plane's own rules
//! (`ambit_k8s::waypoints`: the object's label over its namespace's, `none`,
//! `use-waypoint-namespace`, `waypoint-for`), so the two cannot disagree.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ambit_k8s::gateway::WAYPOINT_CLASS;
use ambit_k8s::waypoints::{Gateways, Traffic};
use ambit_k8s::{ObjectKey, Resources};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::state::{MeshState, PodState};

/// The waypoint's readiness port, in its pod.
const READINESS_PORT: u16 = ambit_localmesh::ambient::WAYPOINT_READINESS_PORT;
/// How long a waypoint may take to answer its readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One waypoint Gateway as `local status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointView {
    /// `namespace/name` of the Gateway.
    pub gateway: String,
    /// `namespace/name` of its pod, if it has one.
    pub pod: Option<String>,
    /// `ready`, or why not.
    pub readiness: String,
    pub identity: String,
    /// `Service ns/name`, `ServiceEntry ns/name`, `pod ns/name` bound to it.
    pub serves: Vec<String>,
}

/// The waypoints, and the objects whose waypoint label binds nothing, with why.
#[derive(Debug, Default)]
pub struct Waypoints {
    pub waypoints: Vec<WaypointView>,
    pub problems: Vec<String>,
}

/// Reads the control plane's objects from `k8s_dir` and probes each waypoint pod.
pub fn read(mesh: &MeshState, k8s_dir: &Path) -> anyhow::Result<Waypoints> {
    let resources = load(k8s_dir)?;
    let mut found = bound(&resources);
    for view in &mut found.waypoints {
        let pod = mesh.pods.iter().find(|p| {
            p.waypoint.is_some()
                && format!("{}/{}", p.namespace, p.waypoint.as_deref().unwrap_or(""))
                    == view.gateway
        });
        match pod {
            Some(pod) => {
                view.pod = Some(pod.uid());
                view.identity = format!(
                    "spiffe://cluster.local/ns/{}/sa/{}",
                    pod.namespace, pod.service_account
                );
                view.readiness = probe(pod);
            }
            None => view.readiness = "no pod".to_owned(),
        }
    }
    Ok(found)
}

/// The objects of every `*.yaml` in `dir`, as the control plane reads them.
pub fn load(dir: &Path) -> anyhow::Result<Resources> {
    let mut resources = Resources::default();
    let mut paths: Vec<_> = fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    for path in paths {
        // A file being replaced may be gone; what it held is in its replacement.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        for object in ambit_k8s::read::parse_file(&path, &text).objects {
            resources.insert(object);
        }
    }
    Ok(resources)
}

/// Each waypoint Gateway of `resources` with what is bound to it (pods and readiness
/// left for [`read`]).
fn bound(resources: &Resources) -> Waypoints {
    let gateways = Gateways::index(resources);
    let mut serves: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut bind = |kind: &str, key: &ObjectKey, labels, traffic| {
        let binding = gateways.bind(resources, key, labels, traffic);
        match (binding.waypoint, binding.condition) {
            (Some(w), _) => serves
                .entry(ObjectKey::new(&w.namespace, &w.name))
                .or_default()
                .push(format!("{kind} {key}")),
            (None, Some(c)) => problems.push(format!("{kind} {key}: {} ({})", c.message, c.reason)),
            (None, None) => {}
        }
    };
    for (key, service) in &resources.services {
        bind(
            "Service",
            key,
            service.metadata.labels.as_ref(),
            Traffic::Service,
        );
    }
    for (key, entry) in &resources.service_entries {
        bind(
            "ServiceEntry",
            key,
            entry.metadata.labels.as_ref(),
            Traffic::Service,
        );
    }
    for (key, pod) in &resources.pods {
        bind("pod", key, pod.metadata.labels.as_ref(), Traffic::Workload);
    }
    let waypoints = resources
        .gateways
        .iter()
        .filter(|(_, g)| g.spec.gateway_class_name == WAYPOINT_CLASS)
        .map(|(key, _)| WaypointView {
            gateway: key.to_string(),
            pod: None,
            readiness: String::new(),
            identity: "-".to_owned(),
            serves: serves.remove(key).unwrap_or_default(),
        })
        .collect();
    Waypoints {
        waypoints,
        problems,
    }
}

/// `ready`, or what the waypoint's readiness endpoint said instead.
fn probe(pod: &PodState) -> String {
    let addr = SocketAddr::new(IpAddr::V4(pod.ip), READINESS_PORT);
    match http_get(&pod.netns, addr, "/healthz/ready", PROBE_TIMEOUT) {
        Err(GetError::Timeout) => {
            format!("not ready (no answer on {READINESS_PORT} within {PROBE_TIMEOUT:?})")
        }
        // The kind ("connection refused"): the whole error names the namespace's path.
        Err(GetError::Io(e)) => format!("not ready ({} on {READINESS_PORT})", e.kind()),
        Ok((200, _)) => "ready".to_owned(),
        Ok((status, _)) => format!("not ready (HTTP {status})"),
    }
}

/// Why [`http_get`] got no answer.
#[derive(Debug)]
pub enum GetError {
    Timeout,
    Io(std::io::Error),
}

impl std::fmt::Display for GetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetError::Timeout => f.write_str("no answer in time"),
            GetError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// `GET path` (HTTP/1.0) to `addr` from inside the network namespace at `netns`: the
/// status and the body.
pub fn http_get(
    netns: &Path,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), GetError> {
    let ask = async {
        let netns = ambit_net::netns::NetnsHandle::from_path(netns)?;
        let mut stream = netns
            .connect(addr, ambit_net::netns::ConnectOpts::default())
            .await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(GetError::Io)?;
    let answer = runtime
        .block_on(async { tokio::time::timeout(timeout, ask).await })
        .map_err(|_| GetError::Timeout)?
        .map_err(GetError::Io)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn resources(yaml: &str) -> Resources {
        let mut resources = Resources::default();
        for object in ambit_k8s::read::parse_file(Path::new("t.yaml"), yaml).objects {
            resources.insert(object);
        }
        resources
    }

    #[test]
    fn bindings_follow_the_control_planes_rules() {
        let r = resources(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/use-waypoint: wp}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: shop}\n\
             spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: shop}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 15008}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: orders, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop, labels: {istio.io/use-waypoint: none}}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: inherits, namespace: shop}\nspec: {containers: [{name: a, image: a}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: asks, namespace: shop, labels: {istio.io/use-waypoint: wp}}\nspec: {containers: [{name: a, image: a}]}\n",
        );
        let found = bound(&r);
        assert_eq!(found.waypoints.len(), 1);
        let wp = &found.waypoints[0];
        assert_eq!(wp.gateway, "shop/wp");
        // The namespace's label binds orders (not cart: `none`; not the waypoint's own
        // Service); a pod only with waypoint-for workload or all, and one that asks
        // explicitly is told why not.
        assert_eq!(wp.serves, ["Service shop/orders"]);
        assert_eq!(found.problems.len(), 1, "{:?}", found.problems);
        assert!(
            found.problems[0].starts_with("pod shop/asks:")
                && found.problems[0].contains("UnsupportedTrafficType"),
            "{:?}",
            found.problems
        );
    }
}
