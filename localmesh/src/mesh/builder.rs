//! Building a mesh: the fabric namespace and its bridge, then the nodes, each joined
//! to the bridge, routing to the other nodes' pods, with its service chains.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{parallel, LocalMesh, State, DEFAULT_CNI_PATH, DEFAULT_STOP_GRACE, POD_NETWORK};
use crate::cmd::{self, Cmd};
use crate::cni::NetworkConfigList;
use crate::naming::LiveId;
use crate::services;
use crate::sweep;
use crate::topology::{
    is_dns_label, Netns, Node, FABRIC_IP, FABRIC_IP6, MAX_NODES, UNDERLAY, UNDERLAY6,
};
use crate::MeshError;

/// Builds a [`LocalMesh`]: `LocalMesh::builder().nodes(["node-a", "node-b"]).build()`.
#[derive(Debug, Clone)]
pub struct MeshBuilder {
    nodes: Vec<String>,
    state_root: PathBuf,
    cni_path: Vec<PathBuf>,
    chained: Vec<Map<String, Value>>,
    stop_grace: Duration,
}

impl MeshBuilder {
    /// The nodes, by name (DNS labels), in order: node `k` gets underlay address
    /// `172.30.0.<k+1>` and pod CIDR `10.<k+1>.0.0/24`.
    pub fn nodes<I, S>(mut self, names: I) -> MeshBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nodes = names.into_iter().map(Into::into).collect();
        self
    }

    /// Where the mesh's state directory is made (default: [`crate::default_state_root`]).
    /// The sweeper run by `build` looks there.
    pub fn state_root(mut self, dir: impl Into<PathBuf>) -> MeshBuilder {
        self.state_root = dir.into();
        self
    }

    /// Adds a directory searched for CNI plugins (`CNI_PATH`), after those already set
    /// (default: [`DEFAULT_CNI_PATH`]).
    pub fn cni_dir(mut self, dir: impl Into<PathBuf>) -> MeshBuilder {
        self.cni_path.push(dir.into());
        self
    }

    /// Appends a plugin to every node's chain, after `ptp` (and after plugins appended
    /// before). It receives the previous plugin's result as `prevResult` on ADD, and
    /// the chain's result on DEL; `name` and `cniVersion` are added to it.
    pub fn chain_plugin(mut self, config: Value) -> MeshBuilder {
        let mut list = NetworkConfigList::new(POD_NETWORK);
        list.push(config);
        self.chained.extend(list.plugins);
        self
    }

    /// How long stopped processes get between SIGTERM and SIGKILL.
    pub fn stop_grace(mut self, grace: Duration) -> MeshBuilder {
        self.stop_grace = grace;
        self
    }

    /// Sweeps stale meshes, then makes the fabric and the nodes. On failure, whatever
    /// was made is removed again.
    pub fn build(self) -> Result<LocalMesh, MeshError> {
        if let Err(e) = sweep::sweep_stale_in(&self.state_root) {
            tracing::warn!("sweeping stale meshes: {e}");
        }
        check_node_names(&self.nodes)?;
        let live = LiveId::allocate();
        let id = live.id();
        let dir = self.state_root.join(id.to_string());
        for sub in ["logs", "cni/results"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(|source| MeshError::Io { path, source })?;
        }
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(k, name)| {
                Node::new(
                    k,
                    name.clone(),
                    Netns::named(id.netns_name(&format!("n-{name}"))),
                )
            })
            .collect();
        // From here on, dropping the mesh removes whatever exists of it.
        let mesh = LocalMesh {
            dir,
            fabric: Netns::named(id.netns_name("fabric")),
            nodes,
            cni_path: self.cni_path,
            chained: self.chained,
            stop_grace: self.stop_grace,
            state: Mutex::new(State::default()),
            processes: Mutex::new(Vec::new()),
            next_process: AtomicU32::new(0),
            torn_down: false,
            live,
        };
        mesh.make_fabric()?;
        let made = parallel(&mesh.nodes, |node| mesh.make_node(node));
        if let Some(e) = made.into_iter().find_map(Result::err) {
            return Err(e);
        }
        let routes: String = mesh
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "route add {} via {}\nroute add {} via {}\n",
                    n.pod_cidr, n.ip, n.pod_cidr6, n.ip6
                )
            })
            .collect();
        cmd::ip_batch(Some(mesh.fabric.name()), &routes)?;
        Ok(mesh)
    }
}

impl LocalMesh {
    pub fn builder() -> MeshBuilder {
        MeshBuilder {
            nodes: Vec::new(),
            state_root: crate::default_state_root(),
            cni_path: vec![PathBuf::from(DEFAULT_CNI_PATH)],
            chained: Vec::new(),
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }

    fn make_fabric(&self) -> Result<(), MeshError> {
        Cmd::new("ip")
            .args(["netns", "add", self.fabric.name()])
            .run()?;
        cmd::ip_batch(
            Some(self.fabric.name()),
            &format!(
                "link set lo up\n\
                 link add br0 type bridge\n\
                 link set br0 up\n\
                 addr add {FABRIC_IP}/{} dev br0\n\
                 addr add {FABRIC_IP6}/{} dev br0 nodad\n",
                UNDERLAY.prefix_len, UNDERLAY6.prefix_len
            ),
        )
    }

    /// A node: its namespace, a veth to the fabric bridge (`n<k>` there, `eth0` in the
    /// node), its underlay address, routes to the other nodes' pods, forwarding, the
    /// service chains, and its CNI config written out for whoever wants to read it.
    fn make_node(&self, node: &Node) -> Result<(), MeshError> {
        Cmd::new("ip")
            .args(["netns", "add", node.netns.name()])
            .run()?;
        let uplink = format!("n{}", node.index);
        cmd::ip_batch(
            Some(self.fabric.name()),
            &format!(
                "link add {uplink} type veth peer name eth0 netns {}\n\
                 link set {uplink} master br0\n\
                 link set {uplink} up\n",
                node.netns.name()
            ),
        )?;
        let mut script = format!(
            "link set lo up\n\
             link set eth0 up\n\
             addr add {}/{} dev eth0\n\
             addr add {}/{} dev eth0 nodad\n",
            node.ip, UNDERLAY.prefix_len, node.ip6, UNDERLAY6.prefix_len
        );
        for other in self.nodes.iter().filter(|o| o.index != node.index) {
            script.push_str(&format!(
                "route add {} via {}\nroute add {} via {}\n",
                other.pod_cidr, other.ip, other.pod_cidr6, other.ip6
            ));
        }
        // Forwarding, and no duplicate address detection on the pods' host-side
        // interfaces (set before `ip` or `ptp` makes any).
        Cmd::in_netns(node.netns.path(), "sysctl")
            .args([
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.default.accept_dad=0",
            ])
            .run()?;
        cmd::ip_batch(Some(node.netns.name()), &script)?;
        cmd::iptables_restore(node.netns.path(), &services::node_base())?;
        let dir = self.node_dir(node);
        fs::create_dir_all(&dir).map_err(|source| MeshError::Io {
            path: dir.clone(),
            source,
        })?;
        let conflist = dir.join(format!("10-{POD_NETWORK}.conflist"));
        let json = serde_json::to_string_pretty(&self.base_conflist(node))
            .map_err(|e| MeshError::Model(e.to_string()))?;
        fs::write(&conflist, json).map_err(|source| MeshError::Io {
            path: conflist,
            source,
        })
    }
}

fn check_node_names(names: &[String]) -> Result<(), MeshError> {
    if names.is_empty() || names.len() > MAX_NODES {
        return Err(MeshError::BadTopology(format!(
            "a mesh has 1 to {MAX_NODES} nodes, not {}",
            names.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for name in names {
        if !is_dns_label(name) {
            return Err(MeshError::BadName(name.clone()));
        }
        if !seen.insert(name) {
            return Err(MeshError::BadTopology(format!("node {name} listed twice")));
        }
    }
    Ok(())
}
