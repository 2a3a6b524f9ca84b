//! Istio's ztunnel as the anchor of ztunnel's benchmark (issue 16): its release binary
//! (`/work/shared/anchors/README.md`), run in dedicated mode inside two local-mesh
//! pods that Ambit does not enrol, one on each node, so that its network path is
//! Ambit's in-pod path: the client pod's outbound TCP is redirected (iptables
//! `REDIRECT`, its own sockets marked 1337 and exempt) to its 15001, which opens HBONE
//! (HTTP/2 CONNECT in mTLS) to the server pod's 15008, where the other instance
//! connects to the app. Both get their workloads from one static file
//! (`LOCAL_XDS_PATH`) and their certificates from Istio's built-in fake CA
//! (`FAKE_CA=true`); `ENABLE_ORIG_SRC=false`, since the server pod has no route back
//! to a spoofed source; two worker threads each, Istio's default for a node.
//!
//! The binary is found at `AMBIT_ISTIO_ZTUNNEL`, else `/work/shared/anchors/istio-ztunnel`,
//! else `../shared/anchors/istio-ztunnel` beside the repository. It is never part of
//! Ambit: the benchmark only runs it.

use std::path::{Path, PathBuf};

use ambit_localmesh::{Pod, Process};

use super::support::{metric, Harness, DEADLINE};
use super::RUN;

/// Istio's outbound capture port, the mark on its own sockets, its metrics port.
const OUTBOUND: u16 = 15001;
const PACKET_MARK: u32 = 1337;
const METRICS: u16 = 15020;

/// Where the anchor binary is, or why the Istio column is skipped (the inner `Err`).
/// A path in `AMBIT_ISTIO_ZTUNNEL` that is not there is an error (the outer `Err`),
/// not a skip: whoever set it meant to compare; set empty, it skips the column.
pub fn anchor_binary() -> Result<Result<PathBuf, String>, String> {
    if let Some(path) = std::env::var_os("AMBIT_ISTIO_ZTUNNEL") {
        if path.is_empty() {
            return Ok(Err(
                "AMBIT_ISTIO_ZTUNNEL is set and empty, which turns the Istio column off".into(),
            ));
        }
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(usable(path))
        } else {
            Err(format!(
                "AMBIT_ISTIO_ZTUNNEL={}: no such file (unset it to look in the usual places)",
                path.display()
            ))
        };
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        PathBuf::from("/work/shared/anchors/istio-ztunnel"),
        repo.join("../shared/anchors/istio-ztunnel"),
    ];
    Ok(match candidates.iter().find(|p| p.is_file()) {
        Some(path) => usable(path.clone()),
        None => Err(format!(
            "no Istio ztunnel binary: AMBIT_ISTIO_ZTUNNEL is unset and neither {} nor {} exists",
            candidates[0].display(),
            candidates[1].display()
        )),
    })
}

/// `path` if it runs here (`istio-ztunnel version`), else why not.
fn usable(path: PathBuf) -> Result<PathBuf, String> {
    match std::process::Command::new(&path).arg("version").output() {
        Ok(out) if out.status.success() => Ok(path),
        Ok(out) => Err(format!(
            "{} version failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{} does not run here: {e}", path.display())),
    }
}

/// The two Istio ztunnels, client side and server side.
pub struct Pair {
    pub client: Process,
    pub server: Process,
    client_pod: Pod,
    server_pod: Pod,
}

/// One workload of the static configuration.
fn workload(pod: &Pod) -> String {
    format!(
        "- uid: bench//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  \
         serviceAccount: {sa}\n  trustDomain: cluster.local\n  workloadIps: [{ip}]\n  \
         protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
        ns = pod.namespace(),
        name = pod.name(),
        sa = pod.service_account(),
        ip = pod.ip(),
        node = pod.node(),
    )
}

/// Starts Istio's ztunnel in `client` (capturing its outbound TCP) and in `server`,
/// both ready, and checks that a request from `client` to `server`'s `port` goes
/// through both, as HBONE to 15008.
pub async fn start(h: &Harness, binary: &Path, client: &Pod, server: &Pod, port: u16) -> Pair {
    let dir = h.mesh.dir().join("istio-ztunnel");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:\n{}{}services: []\npolicies: []\n",
            workload(client),
            workload(server)
        ),
    )
    .unwrap();
    let spawn = |pod: &Pod, mark: bool| {
        let info = format!(
            "PROXY_WORKLOAD_INFO={}/{}/{}",
            pod.namespace(),
            pod.name(),
            pod.service_account()
        );
        let node = format!("NODE_NAME={}", pod.node());
        let xds = format!("LOCAL_XDS_PATH={}", config.display());
        let mut args = vec![
            "-i".to_owned(),
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
            // Its default level, as Ambit's: an access-log line per connection.
            "RUST_LOG=info".into(),
            "PROXY_MODE=dedicated".into(),
            info,
            node,
            "FAKE_CA=true".into(),
            "XDS_ADDRESS=".into(),
            xds,
            "ENABLE_ORIG_SRC=false".into(),
            "ZTUNNEL_WORKER_THREADS=2".into(),
        ];
        if mark {
            args.push(format!("PACKET_MARK={PACKET_MARK}"));
        }
        args.push(binary.to_string_lossy().into_owned());
        args.push("proxy".into());
        // `env` execs the binary: the process's pid is the proxy's.
        let p = h.mesh.spawn_in(pod.netns(), "env", &args, &[]).unwrap();
        p.wait_for_log("marking server ready", DEADLINE)
            .unwrap_or_else(|e| panic!("Istio's ztunnel in {}: {e}", pod.name()));
        p
    };
    let server_proxy = spawn(server, false);
    let client_proxy = spawn(client, true);
    let mark = format!("0x{PACKET_MARK:x}/0xfff");
    let outbound = OUTBOUND.to_string();
    let out = h
        .mesh
        .run_in(
            client.netns(),
            "iptables",
            [
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "!",
                "-o",
                "lo",
                "-m",
                "mark",
                "!",
                "--mark",
                mark.as_str(),
                "-j",
                "REDIRECT",
                "--to-ports",
                outbound.as_str(),
            ],
            RUN,
        )
        .unwrap();
    assert!(
        out.status.success(),
        "iptables in {}: {}",
        client.name(),
        out.log
    );
    let pair = Pair {
        client: client_proxy,
        server: server_proxy,
        client_pod: client.clone(),
        server_pod: server.clone(),
    };
    // One request through it: both instances log it, the client's as HBONE to the
    // server pod's 15008 carrying the app's port.
    let url = format!("http://{}:{port}/", server.ip());
    let out = h
        .mesh
        .run_in(
            client.netns(),
            "curl",
            ["-sS", "-m", "10", "-o", "/dev/null", url.as_str()],
            RUN,
        )
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url} through Istio's ztunnel: {}",
        out.log
    );
    let hbone = format!("dst.addr={}:15008", server.ip());
    let app = format!("dst.hbone_addr={}:{port}", server.ip());
    for (proxy, direction) in [(&pair.client, "outbound"), (&pair.server, "inbound")] {
        proxy
            .wait_until("the access-log line of the check request", DEADLINE, || {
                proxy.log().lines().any(|l| {
                    l.contains(&hbone)
                        && l.contains(&app)
                        && l.contains(&format!("direction=\"{direction}\""))
                })
            })
            .unwrap_or_else(|e| panic!("Istio's ztunnel did not carry {url} as HBONE: {e}"));
    }
    pair
}

impl Pair {
    pub fn pids(&self) -> Vec<u32> {
        vec![self.client.pid(), self.server.pid()]
    }

    /// Connections each instance has counted (`istio_tcp_connections_opened_total`,
    /// reporter `source` on the client side and `destination` on the server side).
    pub async fn opened(&self) -> [f64; 2] {
        let read = |pod: &Pod, reporter: &'static str| {
            let netns = pod.netns().clone();
            async move {
                let text =
                    ambit_localmesh::ambient::netns_request(&netns, METRICS, "GET", "/metrics")
                        .await
                        .unwrap_or_else(|e| panic!("Istio's ztunnel metrics: {e}"));
                metric(
                    &text,
                    "istio_tcp_connections_opened_total",
                    &[("reporter", reporter)],
                )
            }
        };
        [
            read(&self.client_pod, "source").await,
            read(&self.server_pod, "destination").await,
        ]
    }
}
