//! The mesh's components on a local mesh, the way a cluster runs them: the real
//! `ambit-control` in local mode in the fabric namespace (it reads the mesh's `k8s/`
//! directory and serves delta xDS and the CA on one port), one real `ztunnel` per node,
//! and, with [`AmbientConfig::node_agent`], the real node agent (`ambit-cni agent`) on
//! every node, which puts `ambit-cni` into the node's CNI chain so pods made afterwards
//! are enrolled at ADD, and enrols running pods when their labels change. Without it,
//! [`Ambient::enrol`] plays the agent's part directly (rules, hand-off, report), for
//! tests of ztunnel alone. Used by the end-to-end tests and by `ambitctl local`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambit_core::model::Protocol;
use ambit_net::handoff::HandoffClient;
use ambit_net::redirect::{self, RedirectConfig};
use ambit_proto::handoff::WorkloadInfo;

use crate::{LocalMesh, MeshError, Pod, Process};

/// The control plane's port (xDS and the CA).
pub const CONTROL_PORT: u16 = 15012;
/// ztunnel's admin port, on each node's loopback.
pub const ZTUNNEL_ADMIN_PORT: u16 = 15000;

/// What [`Ambient::start`] runs, and how.
#[derive(Debug, Clone)]
pub struct AmbientConfig {
    /// The `ambit-control` binary.
    pub control: PathBuf,
    /// The `ztunnel` binary.
    pub ztunnel: PathBuf,
    /// ztunnel's `--log` filter.
    pub ztunnel_log: String,
    /// More ztunnel flags.
    pub ztunnel_flags: Vec<String>,
    /// How long each component may take to start, and a model to reach every ztunnel.
    pub deadline: Duration,
    /// The `ambit-cni` binary, to run the node agent on every node; `None` to enrol
    /// pods with [`Ambient::enrol`] instead.
    pub node_agent: Option<PathBuf>,
    /// Service accounts of workloads that talk to the control plane as themselves
    /// (waypoints: their certificate and their xDS view). Each gets a bearer token in
    /// the CA's tokens file and in [`account_token_file`].
    pub accounts: Vec<ServiceAccount>,
}

/// A Kubernetes service account, `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// Its SPIFFE identity in the local mesh's trust domain.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.name
        )
    }
}

/// The local mesh's trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The namespace the install's components run in (the manifests' `ambit-system`).
pub const SYSTEM_NAMESPACE: &str = "ambit-system";

impl AmbientConfig {
    /// The binaries built by this workspace, found with [`crate::target_binary`].
    pub fn from_target_dir() -> Result<AmbientConfig, MeshError> {
        Ok(AmbientConfig {
            control: crate::target_binary("ambit-control")?,
            ztunnel: crate::target_binary("ztunnel")?,
            ztunnel_log: "info".into(),
            ztunnel_flags: Vec::new(),
            deadline: Duration::from_secs(30),
            node_agent: None,
            accounts: Vec::new(),
        })
    }

    /// Runs the node agent built by this workspace on every node.
    pub fn with_node_agents(mut self) -> Result<AmbientConfig, MeshError> {
        self.node_agent = Some(crate::target_binary("ambit-cni")?);
        Ok(self)
    }
}

/// The control plane and the ztunnels running on a mesh. Their processes stop when
/// this is dropped (and when the mesh is).
#[derive(Debug)]
pub struct Ambient {
    config: AmbientConfig,
    control: Process,
    ztunnels: Vec<Ztunnel>,
    /// The CA's tokens file, entry by entry: the nodes', then each account's.
    tokens: Vec<(Option<ServiceAccount>, String)>,
    /// ztunnels replaced by an upgrade, draining until they exit.
    draining: Vec<Process>,
}

/// What [`Ambient::upgrade_ztunnel`] did.
#[derive(Debug)]
pub struct Upgrade {
    /// The node's ztunnel before: stopping (SIGTERM), draining its open connections.
    pub old_pid: u32,
    /// The one serving the node's pods now.
    pub new_pid: u32,
    /// From starting the new process to its serving every pod of the node.
    pub handover: Duration,
}

#[derive(Debug)]
struct Ztunnel {
    node: String,
    process: Process,
    socket: PathBuf,
    /// The node agent, if the mesh runs them.
    agent: Option<Process>,
}

impl Ambient {
    /// Writes the nodes' CA tokens and the mesh as Kubernetes YAML, starts
    /// `ambit-control` in the fabric namespace and a ztunnel in every node, and waits
    /// until each is ready.
    pub fn start(mesh: &LocalMesh, config: AmbientConfig) -> Result<Ambient, MeshError> {
        let mut tokens = Vec::new();
        for node in mesh.nodes() {
            let token = random_token();
            write_secret(&token_file(mesh, node.name()), &token)?;
            tokens.push((
                None,
                format!(
                    "- token: \"{token}\"\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  nodeAgent: true\n  node: {}\n",
                    node.name()
                ),
            ));
        }
        for account in &config.accounts {
            tokens.push((Some(account.clone()), account_token(mesh, account)?));
        }
        write_tokens(mesh, &tokens)?;
        mesh.write_kubernetes()?;
        let control = start_control(mesh, &config)?;
        let mut ztunnels = Vec::new();
        for node in mesh.nodes() {
            let socket = handoff_socket(mesh, node.name());
            let process = start_ztunnel(mesh, &config, node.name())?;
            ztunnels.push(Ztunnel {
                node: node.name().to_owned(),
                process,
                socket,
                agent: None,
            });
        }
        let mut ambient = Ambient {
            config,
            control,
            ztunnels,
            tokens,
            draining: Vec::new(),
        };
        if ambient.config.node_agent.is_some() {
            for node in mesh.nodes() {
                ambient.restart_node_agent(mesh, node.name())?;
            }
        }
        Ok(ambient)
    }

    /// Gives `account` a bearer token the running control plane accepts (it reads its
    /// tokens file again when it changes), in [`account_token_file`]; for a waypoint
    /// started while the mesh runs. An account that has one keeps it.
    pub fn add_account(
        &mut self,
        mesh: &LocalMesh,
        account: &ServiceAccount,
    ) -> Result<(), MeshError> {
        if self.tokens.iter().any(|(a, _)| a.as_ref() == Some(account)) {
            return Ok(());
        }
        let entry = account_token(mesh, account)?;
        self.tokens.push((Some(account.clone()), entry));
        write_tokens(mesh, &self.tokens)
    }

    /// Takes `account`'s token away (the control plane no longer accepts it) and
    /// removes its token file.
    pub fn remove_account(
        &mut self,
        mesh: &LocalMesh,
        account: &ServiceAccount,
    ) -> Result<(), MeshError> {
        self.tokens.retain(|(a, _)| a.as_ref() != Some(account));
        write_tokens(mesh, &self.tokens)?;
        let _ = std::fs::remove_file(account_token_file(mesh, account));
        Ok(())
    }

    /// Starts `node`'s ztunnel again (after [`Process::stop`] or a kill), on the same
    /// hand-off socket; returns once it is ready.
    pub fn restart_ztunnel(&mut self, mesh: &LocalMesh, node: &str) -> Result<(), MeshError> {
        let process = start_ztunnel(mesh, &self.config, node)?;
        let z = self
            .ztunnels
            .iter_mut()
            .find(|z| z.node == node)
            .ok_or_else(|| MeshError::BadTopology(format!("no node {node}")))?;
        z.process = process;
        Ok(())
    }

    /// Upgrades `node`'s ztunnel in place, as a DaemonSet rolling update with a surge
    /// does: a new ztunnel (`binary`, else the configured one) starts beside the
    /// running one; once the node agent has handed it every pod (it then holds their
    /// listeners too), the old one is sent SIGTERM: it stops accepting and drains its
    /// open connections for up to its drain deadline, while the new one takes every new
    /// connection. Returns once the new one serves the node; the old one's exit is
    /// waited for by [`Ambient::draining`] and when the mesh stops.
    ///
    /// Without node agents the new ztunnel is not handed any pod: this then fails.
    pub fn upgrade_ztunnel(
        &mut self,
        mesh: &LocalMesh,
        node: &str,
        binary: Option<&std::path::Path>,
    ) -> Result<Upgrade, MeshError> {
        if self.config.node_agent.is_none() {
            return Err(MeshError::BadTopology(
                "an in-place upgrade needs node agents: they hand the pods to the new ztunnel"
                    .into(),
            ));
        }
        let index = self
            .ztunnels
            .iter()
            .position(|z| z.node == node)
            .ok_or_else(|| MeshError::BadTopology(format!("no node {node}")))?;
        let started = std::time::Instant::now();
        let mut config = self.config.clone();
        if let Some(binary) = binary {
            config.ztunnel = binary.to_owned();
        }
        let new = start_ztunnel(mesh, &config, node)?;
        // The agent notices the new hand-off socket, hands it every pod, then ends
        // its snapshot: from then on the new ztunnel holds every pod's listeners.
        new.wait_for_log("node agent snapshot served", self.config.deadline)?;
        let handover = started.elapsed();
        let old = std::mem::replace(&mut self.ztunnels[index].process, new);
        old.signal(nix::sys::signal::Signal::SIGTERM);
        let upgrade = Upgrade {
            old_pid: old.pid(),
            new_pid: self.ztunnels[index].process.pid(),
            handover,
        };
        self.draining.push(old);
        Ok(upgrade)
    }

    /// The ztunnels an upgrade replaced that are still draining (those that exited are
    /// forgotten).
    pub fn draining(&mut self) -> &[Process] {
        self.draining.retain(|p| matches!(p.try_wait(), Ok(None)));
        &self.draining
    }

    /// The node agent of `node`, if the mesh runs them.
    pub fn node_agent(&self, node: &str) -> Option<&Process> {
        self.find(node).and_then(|z| z.agent.as_ref())
    }

    /// Starts (or starts again, after [`Process::stop`]) `node`'s agent; returns once it
    /// has enrolled the node's pods from the model and serves the plugin.
    pub fn restart_node_agent(&mut self, mesh: &LocalMesh, node: &str) -> Result<(), MeshError> {
        let Some(binary) = self.config.node_agent.clone() else {
            return Err(MeshError::BadTopology(
                "this mesh runs no node agents".into(),
            ));
        };
        let n = mesh.node(node)?;
        let address = control_address(mesh).to_string();
        let dir = mesh.dir();
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        // As the manifests run it (its `agent` subcommand, its environment), with
        // this machine's paths and addresses on the command line.
        let manifest = crate::manifests::container(
            crate::manifests::Component::NodeAgent,
            &crate::manifests::PodFacts {
                pod_name: &format!("ambit-cni-{node}"),
                namespace: SYSTEM_NAMESPACE,
                node_name: node,
            },
        )?;
        let mut args = manifest.args.clone();
        args.extend([
            "--node".to_owned(),
            node.to_owned(),
            "--control-address".to_owned(),
            address,
            "--ca-root".to_owned(),
            path(dir.join("ca/root-cert.pem")),
            "--token-file".to_owned(),
            path(token_file(mesh, node)),
            "--handoff-socket".to_owned(),
            path(handoff_socket(mesh, node)),
            "--agent-socket".to_owned(),
            path(agent_socket(mesh, node)),
            "--conf-dir".to_owned(),
            path(mesh.cni_conf_dir(n)),
            "--bin-dir".to_owned(),
            path(mesh.cni_bin_dir(n)),
            "--retry-interval".to_owned(),
            "500ms".to_owned(),
            "--log".to_owned(),
            "info,ambit_cni=debug".to_owned(),
        ]);
        let process = mesh.spawn_in(n.netns(), &binary, &args, &manifest.env_refs())?;
        process.wait_for_log("node agent ready", self.config.deadline)?;
        let z = self
            .ztunnels
            .iter_mut()
            .find(|z| z.node == node)
            .ok_or_else(|| MeshError::BadTopology(format!("no node {node}")))?;
        z.agent = Some(process);
        Ok(())
    }

    /// Waits until every ztunnel's model says `pod` is reached by `protocol`; returns
    /// how long that took. ztunnel's config dump is read every 50 ms: nothing announces
    /// a model's content.
    pub async fn wait_for_protocol(
        &self,
        mesh: &LocalMesh,
        pod: &Pod,
        protocol: Protocol,
    ) -> Result<Duration, MeshError> {
        let start = Instant::now();
        let uid = pod.uid();
        loop {
            let mut all = true;
            for z in &self.ztunnels {
                let dump = config_dump(mesh, &z.node).await.unwrap_or_default();
                let seen = serde_json::from_str::<serde_json::Value>(&dump)
                    .ok()
                    .and_then(|v| v.get("model").cloned())
                    .and_then(|m| serde_json::from_value::<ambit_core::model::MeshConfig>(m).ok())
                    .and_then(|m| m.workloads.into_iter().find(|w| w.uid == uid))
                    .map(|w| w.protocol);
                if seen != Some(protocol) {
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(start.elapsed());
            }
            if start.elapsed() > self.config.deadline {
                return Err(MeshError::NotWithin {
                    what: format!("every ztunnel to see {uid} as {protocol:?}"),
                    waited: self.config.deadline,
                    log: self.logs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The control plane (`ambit-control`: xDS and the CA).
    pub fn control(&self) -> &Process {
        &self.control
    }

    /// Starts the control plane again (after [`Process::stop`]), on the same
    /// directory, root and port.
    pub fn restart_control(&mut self, mesh: &LocalMesh) -> Result<(), MeshError> {
        self.control = start_control(mesh, &self.config)?;
        Ok(())
    }

    /// The ztunnel of `node`.
    pub fn ztunnel(&self, node: &str) -> Option<&Process> {
        self.find(node).map(|z| &z.process)
    }

    /// The ztunnels, by node.
    pub fn ztunnels(&self) -> impl Iterator<Item = (&str, &Process)> {
        self.ztunnels.iter().map(|z| (z.node.as_str(), &z.process))
    }

    /// The hand-off socket of `node`'s ztunnel.
    pub fn handoff_socket(&self, node: &str) -> Option<&Path> {
        self.find(node).map(|z| z.socket.as_path())
    }

    /// Writes the mesh's current state for the control plane and waits until every
    /// ztunnel has received a new model.
    pub async fn update_model(&self, mesh: &LocalMesh) -> Result<(), MeshError> {
        let count = |z: &Ztunnel| z.process.log().matches("model received over xDS").count();
        let before: Vec<usize> = self.ztunnels.iter().map(count).collect();
        mesh.write_kubernetes()?;
        let start = Instant::now();
        loop {
            if self
                .ztunnels
                .iter()
                .zip(&before)
                .all(|(z, b)| count(z) > *b)
            {
                return Ok(());
            }
            if start.elapsed() > self.config.deadline {
                return Err(MeshError::NotWithin {
                    what: "every ztunnel to receive the new model".into(),
                    waited: self.config.deadline,
                    log: self.logs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Enrols `pod`. With node agents: labels it `istio.io/dataplane-mode=ambient` and
    /// waits until every ztunnel sees it as HBONE (the agent has enrolled it and
    /// reported). Without: plays the agent's part, as [`Ambient::enrol_as`].
    pub async fn enrol(&self, mesh: &LocalMesh, pod: &Pod) -> Result<(), MeshError> {
        if self.config.node_agent.is_none() {
            return self.enrol_as(mesh, pod, pod.service_account()).await;
        }
        let mut labels = pod.labels().clone();
        labels.insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
        mesh.set_pod_labels(pod, labels)?;
        mesh.write_kubernetes()?;
        self.wait_for_protocol(mesh, pod, Protocol::Hbone).await?;
        Ok(())
    }

    /// Enrols `pod` as the node agent does, without one: installs the redirect rules in
    /// it, hands it to its node's ztunnel (as `service_account`, which may differ from
    /// what the model says, to provoke an identity mismatch), and once ztunnel has
    /// taken it, marks it reported so that the control plane advertises it as HBONE.
    /// Not for meshes running node agents (ztunnel serves one agent at a time).
    pub async fn enrol_as(
        &self,
        mesh: &LocalMesh,
        pod: &Pod,
        service_account: &str,
    ) -> Result<(), MeshError> {
        let failed = |reason: String| MeshError::Enrol {
            pod: pod.uid(),
            reason,
        };
        let node = mesh.node(pod.node())?;
        let socket = self
            .handoff_socket(pod.node())
            .ok_or_else(|| failed(format!("no ztunnel on node {}", pod.node())))?;
        // The node's own connections to the pod (probes) leave from the SNAT address,
        // the one source the pod's rules exempt.
        let pod_ips: BTreeSet<IpAddr> = [IpAddr::V4(pod.ip()), IpAddr::V6(pod.ip6())].into();
        redirect::node_snat(node.netns().path(), &pod_ips, &BTreeSet::new())
            .map_err(|e| failed(format!("SNAT of the node's own connections: {e}")))?;
        redirect::install(pod.netns().path(), &RedirectConfig::default())
            .map_err(|e| failed(format!("installing the redirect rules: {e}")))?;
        let client = HandoffClient::connect(socket)
            .await
            .map_err(|e| failed(format!("{}: {e}", socket.display())))?;
        let ns = std::fs::File::open(pod.netns().path()).map_err(|source| MeshError::Io {
            path: pod.netns().path().to_owned(),
            source,
        })?;
        let info = WorkloadInfo {
            name: pod.name().to_string(),
            namespace: pod.namespace().to_string(),
            service_account: service_account.to_string(),
        };
        client
            .add(&pod.uid(), info, ns.as_fd())
            .await
            .map_err(|e| failed(format!("hand-off to the ztunnel of {}: {e}", pod.node())))?;
        // Its traffic is captured and ztunnel serves it: report the redirection, as the
        // node agent will, so the control plane advertises it as HBONE from now on.
        if mesh.protocol(pod)? != Protocol::Hbone {
            mesh.set_protocol(pod, Protocol::Hbone)?;
            self.update_model(mesh).await?;
        }
        Ok(())
    }

    /// Takes `pod` away from its ztunnel (`DelWorkload`), leaving its redirect rules.
    pub async fn remove(&self, pod: &Pod) -> Result<(), MeshError> {
        let failed = |reason: String| MeshError::Enrol {
            pod: pod.uid(),
            reason,
        };
        let socket = self
            .handoff_socket(pod.node())
            .ok_or_else(|| failed(format!("no ztunnel on node {}", pod.node())))?;
        let client = HandoffClient::connect(socket)
            .await
            .map_err(|e| failed(format!("{}: {e}", socket.display())))?;
        client
            .remove(&pod.uid())
            .await
            .map_err(|e| failed(format!("removing from the ztunnel of {}: {e}", pod.node())))
    }

    /// The control plane's and every ztunnel's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!("--- {} ---\n{}\n", self.control.label(), self.control.log());
        for z in &self.ztunnels {
            out.push_str(&format!(
                "--- ztunnel on {} ---\n{}\n",
                z.node,
                z.process.log()
            ));
            if let Some(agent) = &z.agent {
                out.push_str(&format!(
                    "--- node agent on {} ---\n{}\n",
                    z.node,
                    agent.log()
                ));
            }
        }
        out
    }

    fn find(&self, node: &str) -> Option<&Ztunnel> {
        self.ztunnels.iter().find(|z| z.node == node)
    }
}

/// A waypoint to run in a pod: the Gateway it serves, as which account.
#[derive(Debug, Clone)]
pub struct WaypointConfig {
    /// The `waypoint` binary.
    pub binary: PathBuf,
    /// The Gateway, `namespace/name`.
    pub gateway: ServiceAccount,
    /// The service account its pod runs as (by default named like the Gateway); it
    /// must be one of [`AmbientConfig::accounts`].
    pub account: ServiceAccount,
    /// Its `--log` filter.
    pub log: String,
    /// Its `--log-format`.
    pub log_format: ambit_net::process::LogFormat,
}

/// Starts the waypoint `config` in `pod`'s network namespace, as Kubernetes would run
/// its Deployment's container: its certificate and its model from the control plane,
/// authenticated with its account's token, HBONE on 15008 and readiness on 15021 in
/// the pod. Returns once it is ready.
pub fn start_waypoint(
    mesh: &LocalMesh,
    pod: &Pod,
    config: &WaypointConfig,
    deadline: Duration,
) -> Result<Process, MeshError> {
    let dir = mesh.dir();
    let address = control_address(mesh).to_string();
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    let args = vec![
        "--gateway".to_owned(),
        format!("{}/{}", config.gateway.namespace, config.gateway.name),
        "--service-account".to_owned(),
        config.account.name.clone(),
        "--trust-domain".to_owned(),
        TRUST_DOMAIN.to_owned(),
        "--control-address".to_owned(),
        address,
        "--ca-root".to_owned(),
        path(dir.join("ca/root-cert.pem")),
        "--token-file".to_owned(),
        path(account_token_file(mesh, &config.account)),
        "--log".to_owned(),
        config.log.clone(),
        "--log-format".to_owned(),
        config.log_format.to_string(),
    ];
    let process = mesh.spawn_in(pod.netns(), &config.binary, &args, &[])?;
    // Ready when its readiness endpoint says so, as a kubelet's probe would see it:
    // whatever its log level.
    let readiness = SocketAddr::new(pod.ip().into(), WAYPOINT_READINESS_PORT);
    process.wait_until("GET /healthz/ready answering 200", deadline, || {
        answers_ready(pod.netns().path(), readiness)
    })?;
    Ok(process)
}

/// The waypoint's readiness port, in its pod.
pub const WAYPOINT_READINESS_PORT: u16 = 15021;

/// Whether `GET /healthz/ready` on `addr`, from inside the network namespace at
/// `netns`, answers 200 (on a thread of its own, which alone enters the namespace).
fn answers_ready(netns: &std::path::Path, addr: SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).ok()?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(b"GET /healthz/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).ok()?;
        let head = String::from_utf8_lossy(&answer);
        Some(head.lines().next()?.split_whitespace().nth(1) == Some("200"))
    })
    .join()
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Where the control plane listens: the fabric's address, reachable from every node.
pub fn control_address(mesh: &LocalMesh) -> SocketAddr {
    SocketAddr::new(mesh.fabric_ip().into(), CONTROL_PORT)
}

/// Where `node`'s agent and ztunnel read their bearer token (mode 0600).
pub fn token_file(mesh: &LocalMesh, node: &str) -> PathBuf {
    mesh.dir().join(format!("{node}.token"))
}

/// Where a workload running as `account` (a waypoint) reads its bearer token (0600).
pub fn account_token_file(mesh: &LocalMesh, account: &ServiceAccount) -> PathBuf {
    mesh.dir()
        .join(format!("sa-{}-{}.token", account.namespace, account.name))
}

/// The label that enrols a pod or a namespace.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

fn handoff_socket(mesh: &LocalMesh, node: &str) -> PathBuf {
    mesh.dir().join(format!("{node}.sock"))
}

/// Where `node`'s agent listens for its plugin.
pub fn agent_socket(mesh: &LocalMesh, node: &str) -> PathBuf {
    mesh.dir().join(format!("{node}-cni.sock"))
}

/// `node`'s ztunnel, started and ready.
fn start_ztunnel(
    mesh: &LocalMesh,
    config: &AmbientConfig,
    node: &str,
) -> Result<Process, MeshError> {
    let dir = mesh.dir();
    let n = mesh.node(node)?;
    let address = control_address(mesh).to_string();
    let manifest = crate::manifests::container(
        crate::manifests::Component::Ztunnel,
        &crate::manifests::PodFacts {
            pod_name: &format!("ztunnel-{node}"),
            namespace: SYSTEM_NAMESPACE,
            node_name: node,
        },
    )?;
    let mut args = manifest.args.clone();
    args.extend(
        [
            "--node",
            node,
            "--xds-address",
            &address,
            "--ca-address",
            &address,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    for (flag, path) in [
        ("--ca-root", dir.join("ca/root-cert.pem")),
        ("--ca-token-file", token_file(mesh, node)),
        ("--handoff-socket", handoff_socket(mesh, node)),
    ] {
        args.push(flag.into());
        args.push(path.to_string_lossy().into_owned());
    }
    args.extend(["--log".to_owned(), config.ztunnel_log.clone()]);
    args.extend(config.ztunnel_flags.iter().cloned());
    let process = mesh.spawn_in(n.netns(), &config.ztunnel, &args, &manifest.env_refs())?;
    process.wait_for_log("ztunnel ready", config.deadline)?;
    Ok(process)
}

/// `GET path` from port `port` of `node`'s loopback (ztunnel's admin 15000, metrics
/// 15020), made from inside the node: the whole response, head and body.
pub async fn node_get(
    mesh: &LocalMesh,
    node: &str,
    port: u16,
    path: &str,
) -> std::io::Result<String> {
    node_request(mesh, node, port, "GET", path).await
}

/// [`node_get`] with another method, e.g. `POST /logging?level=...` to ztunnel's
/// admin.
pub async fn node_request(
    mesh: &LocalMesh,
    node: &str,
    port: u16,
    method: &str,
    path: &str,
) -> std::io::Result<String> {
    let netns = mesh.node(node).map_err(std::io::Error::other)?.netns();
    netns_request(netns, port, method, path).await
}

/// [`node_request`] to port `port` of any namespace's loopback (a node's or a pod's:
/// a proxy running inside a pod, such as the benchmark's Istio ztunnel).
pub async fn netns_request(
    netns: &crate::Netns,
    port: u16,
    method: &str,
    path: &str,
) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let ns = ambit_net::netns::NetnsHandle::from_path(netns.path())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    ns.run(move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .await
}

/// ztunnel's `/config_dump` on `node`: the body.
pub async fn config_dump(mesh: &LocalMesh, node: &str) -> std::io::Result<String> {
    let response = node_get(mesh, node, ZTUNNEL_ADMIN_PORT, "/config_dump").await?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// A node agent's bearer token: 256 random bits, hex (a CSPRNG seeded by the OS).
/// A new token for `account`, written to its token file; its tokens-file entry.
fn account_token(mesh: &LocalMesh, account: &ServiceAccount) -> Result<String, MeshError> {
    let token = random_token();
    write_secret(&account_token_file(mesh, account), &token)?;
    Ok(format!(
        "- token: \"{token}\"\n  identity: {}\n",
        account.identity()
    ))
}

fn write_tokens(
    mesh: &LocalMesh,
    tokens: &[(Option<ServiceAccount>, String)],
) -> Result<(), MeshError> {
    let text: String = tokens.iter().map(|(_, entry)| entry.as_str()).collect();
    write_secret(&mesh.dir().join("tokens.yaml"), &text)
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a file only its owner may read (mode 0600 from its creation, under a
/// temporary name renamed into place, so it is never readable by others even briefly).
fn write_secret(path: &Path, text: &str) -> Result<(), MeshError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| MeshError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// In the mesh's directory: the status each object would carry in a cluster, as
/// `ambit-control --status-file` writes it (what `ambitctl local status` shows of
/// routes).
pub const STATUS_FILE: &str = "status.yaml";

/// `ambit-control` in local mode in the fabric namespace: the mesh's `k8s/` directory
/// in, the model over delta xDS and the CA (root in `ca/`, the nodes' tokens) out, on
/// one port.
fn start_control(mesh: &LocalMesh, config: &AmbientConfig) -> Result<Process, MeshError> {
    let dir = mesh.dir();
    let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
    let manifest = crate::manifests::container(
        crate::manifests::Component::Control,
        &crate::manifests::PodFacts {
            pod_name: "ambit-control-local",
            namespace: SYSTEM_NAMESPACE,
            node_name: "fabric",
        },
    )?;
    let control = mesh.spawn_in(
        mesh.fabric(),
        &config.control,
        manifest.args.iter().cloned().chain([
            "--local-dir".to_owned(),
            path("k8s"),
            "--poll".to_owned(),
            "100ms".to_owned(),
            "--root-dir".to_owned(),
            path("ca"),
            "--listen".to_owned(),
            control_address(mesh).to_string(),
            "--tokens".to_owned(),
            path("tokens.yaml"),
            "--status-file".to_owned(),
            path(STATUS_FILE),
            // Reached by address: a foreign ztunnel (Istio's, `CA_ADDRESS=https://<ip>:15012`)
            // checks the serving certificate against it.
            "--ip-san".to_owned(),
            control_address(mesh).ip().to_string(),
        ]),
        &manifest.env_refs(),
    )?;
    control.wait_for_log("CA serving", config.deadline)?;
    Ok(control)
}
