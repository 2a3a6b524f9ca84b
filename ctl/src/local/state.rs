//! What a running local mesh records for the commands that come after `up`: the
//! supervisor's pid, and the mesh (`mesh.json`: namespaces, addresses, pods, services),
//! in the state directory.

use std::fs;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The supervisor's pid, written by the supervisor first thing (created exclusively:
/// one mesh per state directory).
pub const PID_FILE: &str = "supervisor.pid";
/// The supervisor's output: progress while starting, then its life.
pub const LOG_FILE: &str = "supervisor.log";
/// The running mesh, written once it runs.
pub const MESH_FILE: &str = "mesh.json";
/// Names for the demo app's clients (`IP name...`).
pub const HOSTS_FILE: &str = "hosts";
/// The line the supervisor prints once the mesh runs.
pub const READY_LINE: &str = "==> ready";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshState {
    pub supervisor: u32,
    /// The mesh id: the prefix of every namespace it made.
    pub id: String,
    /// The mesh's own state directory (logs, CNI state, the control plane's YAML).
    pub dir: PathBuf,
    /// The directory of YAML it runs.
    pub app: PathBuf,
    pub control: String,
    pub fabric_netns: PathBuf,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub services: Vec<ServiceState>,
    /// Every process the mesh runs.
    pub pids: Vec<u32>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub service_account: String,
    pub enrolled: bool,
    pub netns: PathBuf,
    pub http_ports: Vec<u16>,
    pub tcp_ports: Vec<u16>,
    /// The Gateway it runs the waypoint of, if it is a waypoint's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

impl PodState {
    pub fn uid(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceState {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    /// (port, target port)
    pub ports: Vec<(u16, u16)>,
    pub endpoints: Vec<String>,
}

impl MeshState {
    pub fn read(state_dir: &Path) -> anyhow::Result<MeshState> {
        let path = state_dir.join(MESH_FILE);
        let text = fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn write(&self, state_dir: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_replacing(&state_dir.join(MESH_FILE), &text)?;
        write_replacing(&state_dir.join(HOSTS_FILE), &self.hosts())?;
        Ok(())
    }

    /// The hosts file: each service as `name.ns`, `name.ns.svc` and
    /// `name.ns.svc.cluster.local`, each pod as `name.ns.pod`.
    pub fn hosts(&self) -> String {
        let mut out = String::new();
        for s in &self.services {
            let (n, ns) = (&s.name, &s.namespace);
            out.push_str(&format!(
                "{} {n}.{ns} {n}.{ns}.svc {n}.{ns}.svc.cluster.local\n",
                s.vip
            ));
        }
        for p in &self.pods {
            out.push_str(&format!("{} {}.{}.pod\n", p.ip, p.name, p.namespace));
        }
        out
    }

    /// The pod called `name`: `namespace/name`, or `name` alone when one namespace has it.
    pub fn pod(&self, name: &str) -> anyhow::Result<&PodState> {
        let all = || {
            self.pods
                .iter()
                .map(PodState::uid)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let matches: Vec<&PodState> = match name.split_once('/') {
            Some((ns, n)) => self
                .pods
                .iter()
                .filter(|p| p.namespace == ns && p.name == n)
                .collect(),
            None => self.pods.iter().filter(|p| p.name == name).collect(),
        };
        match matches.as_slice() {
            [one] => Ok(one),
            [] => anyhow::bail!("no pod {name} in the local mesh (its pods: {})", all()),
            several => anyhow::bail!(
                "pod name {name} is in several namespaces ({}): say which, as namespace/name",
                several
                    .iter()
                    .map(|p| p.uid())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The supervisor's pid from the pid file, if there is one.
pub fn read_pid(state_dir: &Path) -> Option<u32> {
    fs::read_to_string(state_dir.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Creates the pid file holding our pid; fails if it exists.
pub fn create_pid_file(state_dir: &Path) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(state_dir.join(PID_FILE))?;
    writeln!(file, "{}", std::process::id())
}

/// Removes what a mesh recorded (not the log: it tells how the last one ended).
pub fn clear(state_dir: &Path) {
    for file in [MESH_FILE, HOSTS_FILE, PID_FILE] {
        let _ = fs::remove_file(state_dir.join(file));
    }
}

pub use ambit_localmesh::pid_alive;

fn write_replacing(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("{}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))
}
