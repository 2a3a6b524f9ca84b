//! A Kubernetes-like cluster on one machine, built from code, for Ambit's integration
//! tests and `ambitctl local`: nodes and pods are Linux network namespaces, pods are
//! networked by a real CNI chain invoked exactly as a container runtime does (Debian's
//! `containernetworking-plugins`: `ptp` with `host-local`, dual-stack: every pod gets an
//! IPv4 and an IPv6 address), nodes route each other's pod CIDRs over a bridge, and
//! ClusterIP services (IPv4) are DNATed in every node the way
//! kube-proxy does it. The mesh's components (ambit-ca, ztunnel, later ambit-control
//! and ambit-cni) run in it as their real binaries, started with
//! [`LocalMesh::spawn_in`]; [`Ambient`] starts the control plane and a ztunnel per
//! node, and enrols pods as the node agent does.
//!
//! ```no_run
//! # use ambit_localmesh::{LocalMesh, PodSpec, ServiceSpec};
//! # fn main() -> Result<(), ambit_localmesh::MeshError> {
//! let mesh = LocalMesh::builder().nodes(["node-a", "node-b"]).build()?;
//! let server = mesh.add_pod("node-b", PodSpec::new("shop", "web"))?;
//! let client = mesh.add_pod("node-a", PodSpec::new("shop", "client"))?;
//! let web = mesh.add_service(ServiceSpec::new("shop", "web").port(80, 8080).endpoints([&server]))?;
//! let app = ambit_localmesh::target_binary("localmesh-app")?;
//! let echo = mesh.spawn_in(server.netns(), &app, ["echo", "--port", "8080"], &[])?;
//! echo.wait_for_log("listening", std::time::Duration::from_secs(5))?;
//! let to = web.addr(80).to_string();
//! let sent = mesh.run_in(client.netns(), &app, ["send", "--to", to.as_str(), "--bytes", "1000"],
//!     std::time::Duration::from_secs(5))?;
//! assert!(sent.status.success());
//! # Ok(()) }
//! ```
//!
//! Isolation: every name a mesh makes starts with its id `am<pid>x<seq>` ([`MeshId`]),
//! its files live in its own state directory, and every link it makes lives inside its
//! own namespaces, so meshes in parallel tests (threads or processes) never collide,
//! and [`sweep_stale`] can remove what killed runs left. Needs root, `ip`, `nsenter`,
//! `iptables-restore`, `nft`, `sysctl` and the CNI plugins.
//!
//! This crate must not: link any component crate (it starts their binaries); touch the
//! host's network namespace; leave anything behind when a mesh is dropped.
//!
//! Address plan (inside the mesh's own namespaces only): fabric bridge 172.30.0.254/24
//! and fd00:a5b1::fe/64; node k at 172.30.0.(k+1) and fd00:a5b1::(k+1), its pods in
//! 10.(k+1).0.0/24 and fd10:(k+1)::/64; service VIPs (IPv4 only) from 10.96.0.10. Pods
//! and nodes skip IPv6 duplicate address detection (`accept_dad=0`). Children are forked
//! by one long-lived spawner thread with `PR_SET_PDEATHSIG`, so they die with the test
//! process, not with a test thread. Teardown: pod processes, CNI DEL (reverse order),
//! node processes, namespaces, state.

pub mod ambient;
mod cmd;
pub mod cni;
pub mod manifests;
mod mesh;
mod model;
mod naming;
mod process;
mod services;
mod sweep;
mod topology;

use std::io;
use std::path::PathBuf;

pub use ambient::{Ambient, AmbientConfig, ServiceAccount, WaypointConfig, STATUS_FILE};
pub use ambit_core::model::{Protocol, ServicePort};
pub use ambit_net::process::raise_nofile_limit;
pub use mesh::{
    Completed, LocalMesh, MeshBuilder, DEFAULT_CNI_PATH, DEFAULT_STOP_GRACE, POD_NETWORK,
};
pub use naming::MeshId;
pub use nix::sys::signal::Signal;
pub use process::{Process, ProcessError};
pub use services::{POSTROUTING_CHAIN, SERVICES_CHAIN};
pub use sweep::{pid_alive, sweep_stale, sweep_stale_in, sweep_stale_with_prefix, SweepReport};
pub use topology::{
    Ipv4Cidr, Ipv6Cidr, Netns, Node, Pod, PodSpec, Service, ServiceSpec, FABRIC_IP, FABRIC_IP6,
    MAX_NODES, SERVICE_CIDR, UNDERLAY, UNDERLAY6,
};

/// Why building or changing a mesh failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI for pod {pod}: {source}")]
    Cni {
        pod: String,
        #[source]
        source: Box<cni::CniError>,
    },
    #[error("pod {pod}: the CNI result lacks an IPv4 or an IPv6 address: {result}")]
    NoPodIp { pod: String, result: String },
    #[error("network namespace {0} is still there after deleting it")]
    NetnsLeft(String),
    #[error("invalid topology: {0}")]
    BadTopology(String),
    #[error("`{0}` is not a valid name (a DNS label: a-z, 0-9, `-`, at most 63)")]
    BadName(String),
    #[error("no node named {0}")]
    UnknownNode(String),
    #[error("pod {0} already exists")]
    DuplicatePod(String),
    #[error("no pod {0} in this mesh")]
    UnknownPod(String),
    #[error("service {0} already exists")]
    DuplicateService(String),
    #[error("no service {0} in this mesh")]
    UnknownService(String),
    #[error("service {service}: {reason}")]
    BadService { service: String, reason: String },
    #[error("serializing the model: {0}")]
    Model(String),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("binary {name} not found at {}: build it first (cargo build --bins)", path.display())]
    BinaryNotFound { name: String, path: PathBuf },
    #[error("enrolling pod {pod}: {reason}")]
    Enrol { pod: String, reason: String },
    #[error("waited {waited:?} for {what}, in vain; logs:\n{log}")]
    NotWithin {
        what: String,
        waited: std::time::Duration,
        log: String,
    },
    #[error("tearing down mesh {mesh}: {}", failures.join("; "))]
    Teardown { mesh: String, failures: Vec<String> },
}

/// Where meshes make their state directories unless told otherwise:
/// `<temp dir>/ambit-localmesh`.
pub fn default_state_root() -> PathBuf {
    std::env::temp_dir().join("ambit-localmesh")
}

/// The path of a binary built by this workspace (`localmesh-app`, `ztunnel`,
/// `ambit-ca`, ...), found beside the running test executable: Cargo puts test
/// executables in `target/<profile>/deps/` and binaries in `target/<profile>/`.
pub fn target_binary(name: &str) -> Result<PathBuf, MeshError> {
    let exe = std::env::current_exe().map_err(|source| MeshError::Io {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    // Tests run from target/<profile>/deps, examples from target/<profile>/examples.
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MeshError::BinaryNotFound {
            name: name.to_owned(),
            path,
        })
    }
}
