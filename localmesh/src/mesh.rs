//! [`LocalMesh`]: its pods and services, the processes it runs, its model, and its
//! teardown. Building the fabric and the nodes is in `builder`.

mod builder;

pub use builder::MeshBuilder;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use ambit_core::model::{MeshConfig, Protocol};
use serde_json::{Map, Value};

use crate::cmd::{self, Cmd};
use crate::cni::{self, Invocation, NetworkConfigList};
use crate::naming::{LiveId, MeshId};
use crate::process::{self, Process, ProcessInner};
use crate::services::{self, ServiceRules};
use crate::sweep;
use crate::topology::{
    is_dns_label, Netns, Node, Pod, PodSpec, Service, ServiceSpec, FABRIC_IP, FIRST_AUTO_VIP,
    SERVICE_CIDR,
};
use crate::MeshError;

/// Where Debian's containernetworking-plugins live.
pub const DEFAULT_CNI_PATH: &str = "/usr/lib/cni";
/// The name of every node's pod network (the conflist's `name`).
pub const POD_NETWORK: &str = "ambit-pods";
/// How long a stopped process gets between SIGTERM and SIGKILL, by default.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a pod's ADD is retried while a plugin says to try again later.
const ADD_RETRY_FOR: Duration = Duration::from_secs(60);
/// The pause between those tries.
const ADD_RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// How many CNI invocations or node set-ups run at once.
const PARALLELISM: usize = 8;

/// A mesh on this machine: a fabric namespace with a bridge, node namespaces joined to
/// it, pod namespaces made by each node's CNI chain, kube-proxy-like service rules in
/// every node, and the processes started in them.
///
/// Every method takes `&self`, so one mesh can be used from several threads. Dropping
/// it (also while a test panics) stops its processes, runs CNI `DEL` for its pods and
/// removes its namespaces and state directory; [`LocalMesh::teardown`] does the same
/// and says what failed. Processes die with the test process too, whichever thread
/// made them.
#[derive(Debug)]
pub struct LocalMesh {
    dir: PathBuf,
    fabric: Netns,
    nodes: Vec<Node>,
    cni_path: Vec<PathBuf>,
    chained: Vec<Map<String, Value>>,
    stop_grace: Duration,
    state: Mutex<State>,
    processes: Mutex<Vec<Weak<ProcessInner>>>,
    next_process: AtomicU32,
    torn_down: bool,
    /// Dropped last: until then no sweeper in this process takes our names as stale.
    live: LiveId,
}

#[derive(Debug, Default)]
struct State {
    next_pod: u32,
    /// By uid; `None` while the pod is being made.
    pods: BTreeMap<String, Option<PodState>>,
    next_service: u32,
    /// By key (`namespace/name`).
    services: BTreeMap<String, ServiceState>,
    /// The per-service chains last written into the nodes.
    chains: BTreeSet<String>,
    /// Kubernetes objects a user declared, written with the mesh's own.
    declared: Vec<Value>,
    /// Pods whose sandbox is being made, by uid: already scheduled (on their node, with
    /// their labels), as a cluster's API server holds them before the runtime's ADD.
    pending: BTreeMap<String, (PodSpec, String)>,
    /// Labels of namespaces, by name.
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug)]
struct PodState {
    pod: Pod,
    protocol: Protocol,
    /// The chain's ADD result, handed back on DEL.
    cni_result: Value,
    /// The chain ADD ran (libcni caches it too): DEL runs the same plugins, whatever
    /// the conflist says by then.
    chain: NetworkConfigList,
}

#[derive(Debug)]
struct ServiceState {
    id: u32,
    service: Service,
    endpoints: Vec<String>,
}

/// A process that ran to completion.
#[derive(Debug, Clone)]
pub struct Completed {
    pub status: ExitStatus,
    /// Its standard output and standard error.
    pub log: String,
}

impl LocalMesh {
    /// The id every name of this mesh starts with.
    pub fn id(&self) -> MeshId {
        self.live.id()
    }

    /// The mesh's state directory: logs, CNI configs and IPAM state, the model file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The namespace holding the bridge that joins the nodes. It has the address
    /// [`FABRIC_IP`] on the underlay and routes to every pod: the place for mesh-wide
    /// services (the CA, the control plane).
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    pub fn fabric_ip(&self) -> Ipv4Addr {
        FABRIC_IP
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Result<&Node, MeshError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| MeshError::UnknownNode(name.to_owned()))
    }

    /// The node's CNI configuration directory (`/etc/cni/net.d` of a node): the
    /// conflist the mesh wrote for its primary network, which a node agent may edit.
    pub fn cni_conf_dir(&self, node: &Node) -> PathBuf {
        self.node_dir(node)
    }

    /// The node's own CNI bin directory (`/opt/cni/bin` of a node), searched before
    /// the system's plugins; a node agent installs its plugin there.
    pub fn cni_bin_dir(&self, node: &Node) -> PathBuf {
        self.node_dir(node).join("bin")
    }

    /// The CNI chain pods on `node` are made with, read as a runtime does: the first
    /// `.conflist` of the node's configuration directory by name.
    pub fn conflist(&self, node: &Node) -> Result<NetworkConfigList, MeshError> {
        let dir = self.cni_conf_dir(node);
        let io = |path: &Path, source| MeshError::Io {
            path: path.to_owned(),
            source,
        };
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| io(&dir, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        files.sort();
        let path = files.into_iter().next().ok_or_else(|| {
            io(
                &dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no .conflist"),
            )
        })?;
        let text = fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| MeshError::Model(format!("{}: {e}", path.display())))
    }

    /// The chain the mesh writes for `node`: `ptp` and the plugins chained at build.
    pub(crate) fn base_conflist(&self, node: &Node) -> NetworkConfigList {
        let mut list = NetworkConfigList::ptp(
            POD_NETWORK,
            &[&node.pod_cidr.to_string(), &node.pod_cidr6.to_string()],
            &self.node_dir(node).join("ipam"),
        );
        list.plugins.extend(self.chained.iter().cloned());
        list
    }

    /// Makes a pod on `node`: a network namespace, then the loopback network and the
    /// node's chain, invoked as a container runtime does (`CNI_COMMAND=ADD`, plugins run
    /// in the node's namespace). If a plugin fails, the chain's DEL runs and nothing is
    /// left.
    pub fn add_pod(&self, node: &str, spec: PodSpec) -> Result<Pod, MeshError> {
        let node = self.node(node)?;
        for name in [&spec.namespace, &spec.name] {
            if !is_dns_label(name) {
                return Err(MeshError::BadName(name.clone()));
            }
        }
        let uid = format!("{}/{}", spec.namespace, spec.name);
        let seq = {
            let mut state = self.state();
            if state.pods.contains_key(&uid) {
                return Err(MeshError::DuplicatePod(uid));
            }
            state.pods.insert(uid.clone(), None);
            state
                .pending
                .insert(uid.clone(), (spec.clone(), node.name.clone()));
            state.next_pod += 1;
            state.next_pod
        };
        // Scheduled before its sandbox exists, as in a cluster: a node agent asks the
        // control plane about the pod during ADD.
        let announced = self.announce();
        let made = announced.and_then(|()| self.make_pod(node, spec, seq));
        let mut state = self.state();
        state.pending.remove(&uid);
        let result = match made {
            Ok((pod, cni_result, chain)) => {
                state.pods.insert(
                    uid.clone(),
                    Some(PodState {
                        pod: pod.clone(),
                        protocol: Protocol::Tcp,
                        cni_result,
                        chain,
                    }),
                );
                if state.services.values().any(|s| s.endpoints.contains(&uid)) {
                    self.apply_services(&mut state).map(|()| pod)
                } else {
                    Ok(pod)
                }
            }
            Err(e) => {
                state.pods.remove(&uid);
                Err(e)
            }
        };
        drop(state);
        // Its addresses, as the kubelet posts them.
        let announced = self.announce();
        result.and_then(|pod| announced.map(|()| pod))
    }

    /// Removes a pod: stops the processes in it, takes it out of every service, runs
    /// the chain's DEL (in reverse order) and deletes its namespace.
    pub fn remove_pod(&self, pod: &Pod) -> Result<(), MeshError> {
        let removed = {
            let mut state = self.state();
            let uid = pod.uid();
            let current = state.pods.get(&uid).and_then(Option::as_ref);
            if current.is_none_or(|p| p.pod.container_id != pod.container_id) {
                return Err(MeshError::UnknownPod(uid));
            }
            let Some(Some(removed)) = state.pods.remove(&uid) else {
                return Err(MeshError::UnknownPod(uid));
            };
            // Out of the services first, so no new connection goes to it; its
            // network goes even if that fails.
            let rules = if state.services.values().any(|s| s.endpoints.contains(&uid)) {
                self.apply_services(&mut state)
            } else {
                Ok(())
            };
            (removed, rules)
        };
        let (removed, rules) = removed;
        // Gone from the API first, as a deleted pod is, then its sandbox.
        if let Err(e) = self.announce() {
            tracing::warn!("writing the mesh's Kubernetes YAML: {e}");
        }
        self.stop_processes_in(&removed.pod.netns);
        self.unmake_pod(&removed.pod, &removed.chain, Some(&removed.cni_result))?;
        rules
    }

    /// Runs the chain's CHECK for `pod`, as a runtime does to verify a sandbox's
    /// network (each plugin gets the cached ADD result).
    pub fn check_pod(&self, pod: &Pod) -> Result<(), MeshError> {
        let (chain, cached) = {
            let state = self.state();
            match state.pods.get(&pod.uid()) {
                Some(Some(p)) if p.pod.container_id == pod.container_id => {
                    (p.chain.clone(), p.cni_result.clone())
                }
                _ => return Err(MeshError::UnknownPod(pod.uid())),
            }
        };
        let inv = self.pod_invocation(pod)?;
        cni::check(&chain, &inv, &cached).map_err(|source| MeshError::Cni {
            pod: pod.uid(),
            source: Box::new(source),
        })
    }

    /// The pods that exist now, by uid.
    pub fn pods(&self) -> Vec<Pod> {
        self.state()
            .pods
            .values()
            .flatten()
            .map(|p| p.pod.clone())
            .collect()
    }

    /// Adds a ClusterIP service: every node DNATs `vip:port` to one of the endpoints'
    /// `target_port`, chosen at random per connection.
    pub fn add_service(&self, spec: ServiceSpec) -> Result<Service, MeshError> {
        for name in [&spec.namespace, &spec.name] {
            if !is_dns_label(name) {
                return Err(MeshError::BadName(name.clone()));
            }
        }
        let key = format!("{}/{}", spec.namespace, spec.name);
        if spec.ports.is_empty() || spec.ports.iter().any(|p| p.port == 0 || p.target_port == 0) {
            return Err(MeshError::BadService {
                service: key,
                reason: "needs ports, none of them 0".into(),
            });
        }
        let mut state = self.state();
        if state.services.contains_key(&key) {
            return Err(MeshError::DuplicateService(key));
        }
        let taken: BTreeSet<Ipv4Addr> = state.services.values().map(|s| s.service.vip).collect();
        let vip = match spec.vip {
            Some(vip) if taken.contains(&vip) => {
                return Err(MeshError::BadService {
                    service: key,
                    reason: format!("VIP {vip} is taken"),
                })
            }
            Some(vip) => vip,
            None => (FIRST_AUTO_VIP..)
                .map(|n| SERVICE_CIDR.host(n))
                .take_while(|ip| SERVICE_CIDR.contains(*ip))
                .find(|ip| !taken.contains(ip))
                .ok_or_else(|| MeshError::BadService {
                    service: key.clone(),
                    reason: format!("no free VIP left in {SERVICE_CIDR}"),
                })?,
        };
        let service = Service {
            namespace: spec.namespace,
            name: spec.name,
            vip,
            ports: spec.ports,
        };
        state.next_service += 1;
        let id = state.next_service;
        state.services.insert(
            key.clone(),
            ServiceState {
                id,
                service: service.clone(),
                endpoints: spec.endpoints,
            },
        );
        if let Err(e) = self.apply_services(&mut state) {
            state.services.remove(&key);
            return Err(e);
        }
        Ok(service)
    }

    /// Replaces a service's endpoints, rewriting every node's rules at once.
    pub fn set_endpoints<'a>(
        &self,
        service: &Service,
        endpoints: impl IntoIterator<Item = &'a Pod>,
    ) -> Result<(), MeshError> {
        let mut state = self.state();
        let entry = state
            .services
            .get_mut(&service.key())
            .ok_or_else(|| MeshError::UnknownService(service.key()))?;
        entry.endpoints = endpoints.into_iter().map(Pod::uid).collect();
        self.apply_services(&mut state)
    }

    pub fn remove_service(&self, service: &Service) -> Result<(), MeshError> {
        let mut state = self.state();
        state
            .services
            .remove(&service.key())
            .ok_or_else(|| MeshError::UnknownService(service.key()))?;
        self.apply_services(&mut state)
    }

    /// Replaces `pod`'s labels (as `kubectl label` would); written with the next
    /// [`write_kubernetes`](Self::write_kubernetes).
    pub fn set_pod_labels(
        &self,
        pod: &Pod,
        labels: BTreeMap<String, String>,
    ) -> Result<(), MeshError> {
        let mut state = self.state();
        match state.pods.get_mut(&pod.uid()) {
            Some(Some(p)) => {
                p.pod.labels = labels;
                Ok(())
            }
            _ => Err(MeshError::UnknownPod(pod.uid())),
        }
    }

    /// Replaces the labels of namespace `namespace` (as `kubectl label namespace`
    /// would): `istio.io/dataplane-mode=ambient` enrols its pods. Written with the next
    /// [`write_kubernetes`](Self::write_kubernetes).
    pub fn set_namespace_labels(&self, namespace: &str, labels: BTreeMap<String, String>) {
        self.state()
            .namespace_labels
            .insert(namespace.to_owned(), labels);
    }

    /// Sets how the model says `pod` is reached (TCP until it is enrolled, then HBONE).
    pub fn set_protocol(&self, pod: &Pod, protocol: Protocol) -> Result<(), MeshError> {
        let mut state = self.state();
        match state.pods.get_mut(&pod.uid()) {
            Some(Some(p)) => {
                p.protocol = protocol;
                Ok(())
            }
            _ => Err(MeshError::UnknownPod(pod.uid())),
        }
    }

    /// How the model says `pod` is reached.
    pub fn protocol(&self, pod: &Pod) -> Result<Protocol, MeshError> {
        match self.state().pods.get(&pod.uid()) {
            Some(Some(p)) => Ok(p.protocol),
            _ => Err(MeshError::UnknownPod(pod.uid())),
        }
    }

    /// The mesh as Ambit's model: a workload per pod (uid `<namespace>/<name>`), a
    /// service per service with the endpoints that exist.
    pub fn model(&self) -> MeshConfig {
        self.export(crate::model::export)
    }

    /// [`model`](Self::model) as YAML.
    pub fn model_yaml(&self) -> Result<String, MeshError> {
        serde_yaml_ng::to_string(&self.model()).map_err(|e| MeshError::Model(e.to_string()))
    }

    /// Writes the model to `<dir>/model.yaml` and returns the path.
    pub fn write_model(&self) -> Result<PathBuf, MeshError> {
        let path = self.dir.join("model.yaml");
        write_replacing(&path, &self.model_yaml()?)?;
        Ok(path)
    }

    /// The mesh as Kubernetes YAML (see `model::export_kubernetes`), written to
    /// `<dir>/k8s/mesh.yaml` for `ambit-control --local-dir <dir>/k8s`; returns the
    /// directory.
    pub fn write_kubernetes(&self) -> Result<PathBuf, MeshError> {
        let dir = self.dir.join("k8s");
        fs::create_dir_all(&dir).map_err(|source| MeshError::Io {
            path: dir.clone(),
            source,
        })?;
        let (declared, pending, namespace_labels) = {
            let state = self.state();
            let pending: Vec<(PodSpec, String)> = state.pending.values().cloned().collect();
            (
                state.declared.clone(),
                pending,
                state.namespace_labels.clone(),
            )
        };
        let cluster = crate::model::Cluster {
            declared: &declared,
            pending: &pending,
            namespace_labels: &namespace_labels,
        };
        write_replacing(
            &dir.join("mesh.yaml"),
            &self
                .export(|pods, services| crate::model::export_kubernetes(pods, services, &cluster)),
        )?;
        Ok(dir)
    }

    /// Writes the Kubernetes YAML again if a control plane reads it (it has been
    /// written before).
    fn announce(&self) -> Result<(), MeshError> {
        if self.dir.join("k8s/mesh.yaml").exists() {
            self.write_kubernetes()?;
        }
        Ok(())
    }

    /// Kubernetes objects (as JSON values) that [`write_kubernetes`](Self::write_kubernetes)
    /// writes too, from now on: the YAML a user wrote for the pods and services they
    /// then made in the mesh under the same names. Each is written with what a cluster
    /// fills in: a Pod's node, addresses and redirection annotation, a Service's VIP.
    pub fn declare_kubernetes(&self, objects: Vec<Value>) {
        self.state().declared = objects;
    }

    /// `export` applied to the pods that exist and the services with the endpoints
    /// that exist, under the state lock.
    fn export<R>(
        &self,
        export: impl FnOnce(&[crate::model::ModelPod<'_>], &[(&Service, Vec<String>)]) -> R,
    ) -> R {
        let state = self.state();
        let pods: Vec<crate::model::ModelPod<'_>> = state
            .pods
            .values()
            .flatten()
            .map(|p| crate::model::ModelPod {
                pod: &p.pod,
                protocol: p.protocol,
            })
            .collect();
        let services: Vec<(&Service, Vec<String>)> = state
            .services
            .values()
            .map(|s| (&s.service, existing(&state, &s.endpoints)))
            .collect();
        export(&pods, &services)
    }

    /// Starts `program` inside `netns` (a node's, a pod's or the fabric's) with `env`
    /// added to this process's environment. Its output goes to a log file under
    /// `<dir>/logs`. The returned handle stops it when dropped, and so does the mesh.
    pub fn spawn_in<I, S>(
        &self,
        netns: &Netns,
        program: impl AsRef<OsStr>,
        args: I,
        env: &[(&str, &str)],
    ) -> Result<Process, MeshError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let seq = self.next_process.fetch_add(1, Ordering::Relaxed);
        let stem = Path::new(program)
            .file_name()
            .map_or_else(|| "process".into(), |s| s.to_string_lossy().into_owned());
        let role = netns
            .name()
            .strip_prefix(&format!("{}-", self.id()))
            .unwrap_or(netns.name());
        let label = format!("{seq}-{stem}-{role}");
        let log_path = self.dir.join("logs").join(format!("{label}.log"));
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let process = Process::spawn(
            label.clone(),
            netns.path(),
            program,
            args,
            env,
            log_path,
            self.stop_grace,
        )
        .map_err(|source| MeshError::Spawn {
            command: format!("{} in {}", program.to_string_lossy(), netns.name()),
            source,
        })?;
        let mut processes = self
            .processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        processes.retain(|p| p.strong_count() > 0);
        processes.push(Arc::downgrade(process.inner()));
        Ok(process)
    }

    /// Runs `program` inside `netns` to completion (at most `deadline`, then it is
    /// stopped and this fails, quoting its log).
    pub fn run_in<I, S>(
        &self,
        netns: &Netns,
        program: impl AsRef<OsStr>,
        args: I,
        deadline: Duration,
    ) -> Result<Completed, MeshError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let process = self.spawn_in(netns, program, args, &[])?;
        let status = process.wait(deadline)?;
        Ok(Completed {
            status,
            log: process.log(),
        })
    }

    /// Tears the mesh down now; the error lists everything that could not be removed.
    pub fn teardown(mut self) -> Result<(), MeshError> {
        let failures = self.teardown_inner();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(MeshError::Teardown {
                mesh: self.id().to_string(),
                failures,
            })
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update of the state is a single insert or remove: consistent even if
        // a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn node_dir(&self, node: &Node) -> PathBuf {
        self.dir.join("cni").join(&node.name)
    }

    fn invocation(
        &self,
        node: &Node,
        netns: &Netns,
        container_id: &str,
        spec_ns: &str,
        spec_name: &str,
    ) -> Invocation {
        Invocation::for_pod(
            std::iter::once(self.cni_bin_dir(node))
                .chain(self.cni_path.iter().cloned())
                .collect(),
            node.netns.path().to_owned(),
            container_id.to_owned(),
            netns.path().to_owned(),
            spec_ns,
            spec_name,
        )
    }

    /// The CNI parameters of an existing pod, as its ADD had them.
    fn pod_invocation(&self, pod: &Pod) -> Result<Invocation, MeshError> {
        let node = self.node(&pod.node)?;
        Ok(self.invocation(
            node,
            &pod.netns,
            &pod.container_id,
            &pod.namespace,
            &pod.name,
        ))
    }

    fn make_pod(
        &self,
        node: &Node,
        spec: PodSpec,
        seq: u32,
    ) -> Result<(Pod, Value, NetworkConfigList), MeshError> {
        let uid = format!("{}/{}", spec.namespace, spec.name);
        let netns = Netns::named(
            self.id()
                .netns_name(&format!("p{seq}-{}-{}", spec.namespace, spec.name)),
        );
        let container_id = format!("{}-p{seq}", self.id());
        Cmd::new("ip").args(["netns", "add", netns.name()]).run()?;
        // No duplicate address detection on the pod's interfaces: the addresses are
        // the IPAM's to give, and `ptp` would otherwise wait about a second for DAD.
        if let Err(e) = Cmd::in_netns(netns.path(), "sysctl")
            .args(["-q", "-w", "net.ipv6.conf.default.accept_dad=0"])
            .run()
        {
            sweep::delete_netns(&[netns.name().to_owned()]);
            return Err(e);
        }
        let inv = self.invocation(node, &netns, &container_id, &spec.namespace, &spec.name);
        let chain = match self.conflist(node) {
            Ok(chain) => chain,
            Err(e) => {
                sweep::delete_netns(&[netns.name().to_owned()]);
                return Err(e);
            }
        };
        // A plugin that says "try again later" (CNI error 11: a node agent not ready,
        // a pod its control plane does not know yet) is retried after a DEL, as the
        // kubelet does, for a while.
        let give_up = Instant::now() + ADD_RETRY_FOR;
        let added = loop {
            let added =
                cni::add(&NetworkConfigList::loopback(), &inv).and_then(|_| cni::add(&chain, &inv));
            match added {
                Err(cni::CniError::Plugin { code: 11, .. }) if Instant::now() < give_up => {
                    let _ = cni::del(&chain, &inv, None);
                    std::thread::sleep(ADD_RETRY_INTERVAL);
                }
                other => break other,
            }
        };
        let added = added
            .map_err(|source| MeshError::Cni {
                pod: uid.clone(),
                source: Box::new(source),
            })
            .and_then(|result| {
                let no_ip = || MeshError::NoPodIp {
                    pod: uid.clone(),
                    result: result.raw.to_string(),
                };
                let ip = result
                    .ips
                    .iter()
                    .find_map(|c| match c.address {
                        IpAddr::V4(ip) => Some(ip),
                        IpAddr::V6(_) => None,
                    })
                    .ok_or_else(no_ip)?;
                let ip6 = result
                    .ips
                    .iter()
                    .find_map(|c| match c.address {
                        IpAddr::V6(ip) => Some(ip),
                        IpAddr::V4(_) => None,
                    })
                    .ok_or_else(no_ip)?;
                Ok(((ip, ip6), result.raw))
            });
        let ((ip, ip6), raw) = match added {
            Ok(added) => added,
            Err(e) => {
                // As a runtime does after a failed ADD: DEL, then drop the sandbox.
                let _ = cni::del(&chain, &inv, None);
                let _ = cni::del(&NetworkConfigList::loopback(), &inv, None);
                sweep::delete_netns(&[netns.name().to_owned()]);
                return Err(e);
            }
        };
        // libcni keeps each ADD result in a cache for DEL; ours is for humans.
        let cached = self
            .dir
            .join("cni/results")
            .join(format!("{container_id}.json"));
        let _ = fs::write(&cached, raw.to_string());
        let service_account = if spec.service_account.is_empty() {
            "default".to_owned()
        } else {
            spec.service_account
        };
        let pod = Pod {
            namespace: spec.namespace,
            name: spec.name,
            service_account,
            labels: spec.labels,
            node: node.name.clone(),
            ip,
            ip6,
            netns,
            container_id,
        };
        Ok((pod, raw, chain))
    }

    /// CNI DEL of the chain (reverse order) and of the loopback network, then the
    /// namespace goes.
    fn unmake_pod(
        &self,
        pod: &Pod,
        chain: &NetworkConfigList,
        cni_result: Option<&Value>,
    ) -> Result<(), MeshError> {
        let inv = self.pod_invocation(pod)?;
        let chain = cni::del(chain, &inv, cni_result);
        let lo = cni::del(&NetworkConfigList::loopback(), &inv, None);
        let _ = fs::remove_file(
            self.dir
                .join("cni/results")
                .join(format!("{}.json", pod.container_id)),
        );
        sweep::delete_netns(&[pod.netns.name().to_owned()]);
        chain.and(lo).map_err(|source| MeshError::Cni {
            pod: pod.uid(),
            source: Box::new(source),
        })?;
        if pod.netns.path().exists() {
            return Err(MeshError::NetnsLeft(pod.netns.name().to_owned()));
        }
        Ok(())
    }

    /// Rewrites the service rules of every node from `state`.
    fn apply_services(&self, state: &mut State) -> Result<(), MeshError> {
        let mut services: Vec<&ServiceState> = state.services.values().collect();
        services.sort_by_key(|s| s.id);
        let rules: Vec<ServiceRules> = services
            .iter()
            .map(|s| ServiceRules {
                id: s.id,
                key: s.service.key(),
                vip: s.service.vip,
                ports: s
                    .service
                    .ports
                    .iter()
                    .map(|p| (p.port, p.target_port))
                    .collect(),
                endpoints: s
                    .endpoints
                    .iter()
                    .filter_map(|uid| state.pods.get(uid).and_then(Option::as_ref))
                    .map(|p| p.pod.ip)
                    .collect(),
            })
            .collect();
        let (text, chains) = services::render(&rules, &state.chains);
        let applied = parallel(&self.nodes, |node| {
            cmd::iptables_restore(node.netns.path(), &text)
        });
        match applied.into_iter().find_map(Result::err) {
            None => {
                state.chains = chains;
                Ok(())
            }
            Some(e) => {
                // Some nodes may hold the new chains: remember them all, so the next
                // write deletes whichever are not needed.
                state.chains.extend(chains);
                Err(e)
            }
        }
    }

    fn live_processes(&self) -> Vec<Arc<ProcessInner>> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Stops our processes in `netns`, then kills anything else still in it.
    fn stop_processes_in(&self, netns: &Netns) {
        let ours: Vec<Arc<ProcessInner>> = self
            .live_processes()
            .into_iter()
            .filter(|p| p.netns() == netns.path())
            .collect();
        let refs: Vec<&ProcessInner> = ours.iter().map(|p| &**p).collect();
        process::stop_all(&refs);
        sweep::kill_processes_in(&[netns.path().to_owned()]);
    }

    /// Everything, in the order a node would: processes, pods' networks (CNI DEL),
    /// namespaces, files. Returns what failed.
    fn teardown_inner(&mut self) -> Vec<String> {
        self.torn_down = true;
        let mut failures = Vec::new();
        let pods: Vec<PodState> = std::mem::take(&mut self.state().pods)
            .into_values()
            .flatten()
            .collect();
        let pod_netns: BTreeSet<&Path> = pods.iter().map(|p| p.pod.netns.path()).collect();
        // Like a node being drained: the pods' processes go first, then their networks
        // (CNI DEL, while node agents still run), then the node and mesh processes.
        let (in_pods, others): (Vec<_>, Vec<_>) = self
            .live_processes()
            .into_iter()
            .partition(|p| pod_netns.contains(p.netns()));
        process::stop_all(&in_pods.iter().map(|p| &**p).collect::<Vec<_>>());
        let pod_paths: Vec<PathBuf> = pod_netns.iter().map(|p| p.to_path_buf()).collect();
        sweep::kill_processes_in(&pod_paths);
        let deleted = parallel(&pods, |p| {
            self.unmake_pod(&p.pod, &p.chain, Some(&p.cni_result))
        });
        failures.extend(
            deleted
                .into_iter()
                .filter_map(Result::err)
                .map(|e| e.to_string()),
        );
        process::stop_all(&others.iter().map(|p| &**p).collect::<Vec<_>>());
        let paths: Vec<PathBuf> = self
            .own_netns()
            .iter()
            .map(|n| Path::new("/run/netns").join(n))
            .collect();
        sweep::kill_processes_in(&paths);

        sweep::delete_netns(&self.own_netns());
        let left = self.own_netns();
        if !left.is_empty() {
            failures.push(format!("namespaces left: {}", left.join(" ")));
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                failures.push(format!("{}: {e}", self.dir.display()));
            }
        }
        failures
    }

    /// Every namespace whose name carries this mesh's id.
    fn own_netns(&self) -> Vec<String> {
        let prefix = format!("{}-", self.id());
        fs::read_dir("/run/netns")
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        let failures = self.teardown_inner();
        if !failures.is_empty() {
            // Drop cannot return an error, and a test's output is where this matters.
            eprintln!(
                "localmesh {}: teardown left things behind:\n  {}",
                self.id(),
                failures.join("\n  ")
            );
        }
    }
}

/// The uids in `endpoints` whose pods exist.
fn existing(state: &State, endpoints: &[String]) -> Vec<String> {
    endpoints
        .iter()
        .filter(|uid| matches!(state.pods.get(*uid), Some(Some(_))))
        .cloned()
        .collect()
}

/// Runs `f` on every item, a few at a time on scoped threads; results in item order.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new(items.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..PARALLELISM.min(items.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else {
                    break;
                };
                let r = f(item);
                results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .into_iter()
        .flatten()
        .collect()
}

/// Writes `text` to `path` through a temporary file and one rename, so a reader
/// watching `path` never sees half a file.
fn write_replacing(path: &Path, text: &str) -> Result<(), MeshError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| MeshError::Io { path, source }
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, text).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}
