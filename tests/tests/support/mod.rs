//! The end-to-end harness: a local mesh with the real `ambit-control` (fed the mesh as
//! Kubernetes YAML; the model over delta xDS, and the CA) and one real `ztunnel` per
//! node, and the node agent's part (redirect rules, hand-off, redirection report)
//! played by the test; all of it `ambit_localmesh::Ambient`, shared with `ambitctl`.
#![allow(dead_code)]

pub mod ctl;
pub mod promql;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_localmesh::{
    target_binary, Ambient, AmbientConfig, Completed, LocalMesh, Pod, PodSpec, Process,
};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// ztunnel's log filter in tests: what `ambitctl local up` runs it with. Tests read
/// its access log (one line per connection, at info) and its metrics.
pub const TEST_LOG: &str = "info";

/// A mesh with the control plane and one ztunnel per node, ready to enrol pods.
pub struct Harness {
    pub mesh: LocalMesh,
    pub ambient: Ambient,
}

pub fn bin(name: &str) -> PathBuf {
    target_binary(name)
        .unwrap_or_else(|e| panic!("{e}: build the binaries first (cargo build --bins)"))
}

pub fn app() -> PathBuf {
    bin("localmesh-app")
}

impl Harness {
    /// Builds the mesh, writes the model (with `hbone` pods marked HBONE), starts the
    /// CA in the fabric namespace and a ztunnel in every node.
    pub fn start(mesh: LocalMesh) -> Harness {
        Self::start_logging(mesh, TEST_LOG)
    }

    /// [`Harness::start`] with ztunnel's `--log` filter `log`.
    pub fn start_logging(mesh: LocalMesh, log: &str) -> Harness {
        Self::start_with(mesh, log, &[])
    }

    /// [`Harness::start_logging`] with more ztunnel flags.
    pub fn start_with(mesh: LocalMesh, log: &str, ztunnel_flags: &[&str]) -> Harness {
        Self::start_with_accounts(mesh, log, ztunnel_flags, Vec::new())
    }

    /// [`Harness::start_with`], with service accounts that talk to the control plane
    /// as themselves (waypoints; see [`AmbientConfig::accounts`]).
    pub fn start_with_accounts(
        mesh: LocalMesh,
        log: &str,
        ztunnel_flags: &[&str],
        accounts: Vec<ambit_localmesh::ServiceAccount>,
    ) -> Harness {
        let config = AmbientConfig {
            control: bin("ambit-control"),
            ztunnel: bin("ztunnel"),
            ztunnel_log: log.to_owned(),
            ztunnel_flags: ztunnel_flags.iter().map(|f| f.to_string()).collect(),
            deadline: DEADLINE,
            node_agent: None,
            accounts,
        };
        let ambient = Ambient::start(&mesh, config).unwrap_or_else(|e| panic!("{e}"));
        Harness { mesh, ambient }
    }

    /// Like [`Harness::start`], with the real node agent (`ambit-cni agent`) on every
    /// node: it puts `ambit-cni` into each node's CNI chain, so pods made from now on
    /// are enrolled at ADD when their labels ask for it, and enrols running pods when
    /// their labels change. [`Harness::enrol`] then labels the pod and waits.
    pub fn start_with_agents(mesh: LocalMesh) -> Harness {
        let config = AmbientConfig {
            control: bin("ambit-control"),
            ztunnel: bin("ztunnel"),
            ztunnel_log: TEST_LOG.to_owned(),
            ztunnel_flags: Vec::new(),
            deadline: DEADLINE,
            node_agent: Some(bin("ambit-cni")),
            accounts: Vec::new(),
        };
        let ambient = Ambient::start(&mesh, config).unwrap_or_else(|e| panic!("{e}"));
        Harness { mesh, ambient }
    }

    /// The control plane (`ambit-control`: xDS and the CA).
    pub fn control(&self) -> &Process {
        self.ambient.control()
    }

    /// Starts the control plane again (after [`Process::stop`]), on the same
    /// directory, root and port.
    pub fn restart_control(&mut self) {
        self.ambient
            .restart_control(&self.mesh)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The directory of Kubernetes YAML the control plane reads; tests may add files.
    pub fn k8s_dir(&self) -> PathBuf {
        self.mesh.dir().join("k8s")
    }

    pub fn ztunnel(&self, node: &str) -> &Process {
        self.ambient.ztunnel(node).unwrap()
    }

    /// Writes the mesh's current state for the control plane and waits until every
    /// ztunnel has received a new model.
    pub async fn update_model(&self) {
        self.ambient
            .update_model(&self.mesh)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Every ztunnel's log (and the CA's), for failure messages.
    pub fn logs(&self) -> String {
        self.ambient.logs()
    }

    /// Installs the redirect rules in `pod` and hands it to its node's ztunnel, as the
    /// node agent will.
    pub async fn enrol(&self, pod: &Pod) {
        self.enrol_as(pod, pod.service_account()).await;
    }

    /// Like [`Harness::enrol`], but tells ztunnel the pod runs as `service_account`
    /// (which may differ from what the model says, to provoke an identity mismatch).
    pub async fn enrol_as(&self, pod: &Pod, service_account: &str) {
        self.ambient
            .enrol_as(&self.mesh, pod, service_account)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// Takes `pod` away from its ztunnel (`DelWorkload`), leaving its redirect rules.
    pub async fn remove(&self, pod: &Pod) {
        self.ambient
            .remove(pod)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// Runs the test app in `pod` to completion.
    pub fn run_app(&self, pod: &Pod, args: &[&str], deadline: Duration) -> Completed {
        self.mesh
            .run_in(pod.netns(), app(), args, deadline)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// Starts a server mode of the test app in `pod` and waits until it listens.
    pub fn serve(&self, pod: &Pod, args: &[&str]) -> Process {
        let p = self.mesh.spawn_in(pod.netns(), app(), args, &[]).unwrap();
        p.wait_for_log("listening", DEADLINE).unwrap();
        p
    }

    /// `send` from `pod` to `to`, asserting every byte came back intact.
    pub fn send_ok(&self, pod: &Pod, to: SocketAddr, bytes: u64, connections: u64) {
        let to = to.to_string();
        let (bytes, connections) = (bytes.to_string(), connections.to_string());
        let out = self.run_app(
            pod,
            &[
                "send",
                "--to",
                &to,
                "--bytes",
                &bytes,
                "--connections",
                &connections,
            ],
            Duration::from_secs(180),
        );
        assert!(
            out.status.success(),
            "send to {to} failed ({}): {}\n{}",
            out.status,
            out.log,
            self.logs()
        );
    }

    /// The ztunnel of `node`'s Prometheus text, fetched from inside the node.
    pub async fn metrics(&self, node: &str) -> String {
        self.get(node, 15020, "/metrics").await
    }

    /// The ztunnel of `node`'s `/config_dump`, fetched from inside the node.
    pub async fn config_dump(&self, node: &str) -> String {
        self.get(node, 15000, "/config_dump").await
    }

    /// `GET path` from ztunnel's endpoint on `port` of `node`'s loopback: the whole
    /// response, head and body.
    async fn get(&self, node: &str, port: u16, path: &'static str) -> String {
        ambit_localmesh::ambient::node_get(&self.mesh, node, port, path)
            .await
            .unwrap_or_else(|e| panic!("{path} of {node}: {e}\n{}", self.logs()))
    }
}

/// The sum of the samples of `name` whose labels include every `labels` pair.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (lbls, value) = rest.rsplit_once(' ')?;
            if !(lbls.starts_with('{') || lbls.is_empty()) {
                return None; // a longer metric name
            }
            labels
                .iter()
                .all(|(k, v)| lbls.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Polls `f` until it returns `Some`, or panics with `what()` after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut f: F, what: impl Fn() -> String) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("not within {deadline:?}: {}", what());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `done` (blocking) until it holds; panics with `what()` after `deadline`.
pub fn poll_until(deadline: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > deadline {
            panic!("not within {deadline:?}: {}", what());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh mesh of two nodes, `node-a` and `node-b`.
pub fn two_nodes() -> LocalMesh {
    LocalMesh::builder()
        .nodes(["node-a", "node-b"])
        .build()
        .unwrap()
}

/// Adds pod `<namespace>/<name>` running as service account `sa` on `node`.
pub fn pod(mesh: &LocalMesh, node: &str, namespace: &str, name: &str, sa: &str) -> Pod {
    mesh.add_pod(node, PodSpec::new(namespace, name).service_account(sa))
        .unwrap()
}

/// A new connection from `pod`'s app to `to` is refused (the test app exits 2).
pub fn assert_refused(h: &Harness, pod: &Pod, to: std::net::SocketAddr) {
    let to = to.to_string();
    let out = h.run_app(pod, &["send", "--to", &to, "--bytes", "10"], DEADLINE);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a connection to {to} was not refused: {}\n{}",
        out.log,
        h.logs()
    );
    assert!(out.log.contains("refused"), "{}", out.log);
}

/// Starts `tcpdump` on the fabric bridge, printing payloads as ASCII.
pub fn capture(h: &Harness) -> Process {
    let dump = h
        .mesh
        .spawn_in(
            h.mesh.fabric(),
            "tcpdump",
            ["-i", "br0", "-n", "-l", "-U", "-A", "-s", "0", "tcp"],
            &[],
        )
        .unwrap();
    dump.wait_for_log("listening on", DEADLINE)
        .unwrap_or_else(|e| panic!("tcpdump (needs the tcpdump package): {e}"));
    dump
}

/// Replaces a file of the control plane's directory in one rename, as `kubectl apply`
/// replaces an object (`None`: deletes it).
pub fn apply(h: &Harness, name: &str, text: Option<&str>) {
    let path = h.k8s_dir().join(name);
    match text {
        Some(text) => {
            let tmp = h.k8s_dir().join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(tmp, path).unwrap();
        }
        None => std::fs::remove_file(path).unwrap(),
    }
}

/// Whether a connection from `pod` to `to` echoes intact.
pub fn connects(h: &Harness, pod: &Pod, to: SocketAddr) -> bool {
    let to = to.to_string();
    h.run_app(pod, &["send", "--to", &to, "--bytes", "100"], DEADLINE)
        .status
        .success()
}

/// Polls until `pod`'s connection to `to` succeeds (`want`) or fails; the delay. A
/// connection attempt is the only way to ask.
pub async fn until_connects(
    h: &Harness,
    pod: &Pod,
    to: SocketAddr,
    want: bool,
    what: &str,
) -> Duration {
    let start = Instant::now();
    eventually(
        Duration::from_secs(10),
        || async { (connects(h, pod, to) == want).then_some(()) },
        || format!("{what}\n{}", h.logs()),
    )
    .await;
    start.elapsed()
}
