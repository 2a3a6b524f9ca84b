//! The real `waypoint` binary against the real `ambit-control` (local mode) on
//! loopback: it gets its certificate from the CA on the control port with its bearer
//! token, takes its model over delta xDS, turns ready only then, and shows in its
//! config dump the Services bound to its Gateway. Bad flags stop it with an error
//! naming them. (Traffic through a waypoint in a local mesh is the local mesh's
//! integration; the data path is tested in `waypoint/tests/`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_localmesh::target_binary;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);
const TOKEN: &str = "waypoint-token-0123456789abcdef";

const MESH: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Service
metadata:
  name: waypoint
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
spec:
  clusterIP: 10.96.0.99
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {nodeName: node-a, serviceAccountName: waypoint, containers: [{name: waypoint}]}
status: {phase: Running, podIP: 10.1.0.50, podIPs: [{ip: 10.1.0.50}]}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: shop
  labels: {istio.io/use-waypoint: waypoint}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: free
  namespace: shop
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80}]
";

/// A child process killed (and reaped) when dropped, also when the test fails.
struct Killed(Child, std::path::PathBuf);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Killed {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

fn spawn(name: &'static str, args: &[String], dir: &Path) -> Killed {
    let log = dir.join(format!("{name}.log"));
    let child =
        Command::new(target_binary(name).unwrap_or_else(|e| panic!("{e}: cargo build --bins")))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
    Killed(child, log)
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

#[tokio::test]
async fn the_waypoint_gets_its_certificate_and_model_from_the_control_plane_and_turns_ready() {
    let dir = tempfile::tempdir().unwrap();
    let k8s = dir.path().join("k8s");
    std::fs::create_dir_all(&k8s).unwrap();
    std::fs::write(k8s.join("mesh.yaml"), MESH).unwrap();
    // A node-agent entry: until the control plane serves waypoints their own view,
    // only node agents may subscribe to the model.
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("- token: {TOKEN}\n  identity: spiffe://cluster.local/ns/shop/sa/waypoint\n\n"),
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let control_addr = free_port();
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let control = spawn(
        "ambit-control",
        &[
            "--local-dir".into(),
            p(&k8s),
            "--poll".into(),
            "100ms".into(),
            "--root-dir".into(),
            p(&dir.path().join("ca")),
            "--listen".into(),
            control_addr.to_string(),
            "--tokens".into(),
            p(&tokens),
        ],
        dir.path(),
    );
    let root = dir.path().join("ca/root-cert.pem");
    let started = Instant::now();
    while !root.is_file() {
        assert!(
            started.elapsed() < DEADLINE,
            "no CA root: {}",
            control.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (hbone, admin, metrics, readiness) = (free_port(), free_port(), free_port(), free_port());
    let waypoint_args = |token: &Path| -> Vec<String> {
        vec![
            "--gateway".into(),
            "shop/waypoint".into(),
            "--control-address".into(),
            control_addr.to_string(),
            "--ca-root".into(),
            p(&root),
            "--token-file".into(),
            p(token),
            "--hbone-addr".into(),
            hbone.to_string(),
            "--admin-addr".into(),
            admin.to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--readiness-addr".into(),
            readiness.to_string(),
            "--log".into(),
            "debug".into(),
        ]
    };
    let waypoint = spawn("waypoint", &waypoint_args(&token_file), dir.path());

    let started = Instant::now();
    loop {
        if let Some((200, _)) = get(readiness, "/healthz/ready").await {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "waypoint never ready: {:?}\n--- waypoint ---\n{}\n--- control ---\n{}",
            get(readiness, "/healthz/ready").await,
            waypoint.log(),
            control.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = get(admin, "/config_dump").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        dump["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/shop/sa/waypoint"
    );
    assert_eq!(dump["certificates"][0]["state"], "valid");
    assert_eq!(
        dump["waypoint"]["addresses"],
        serde_json::json!(["10.96.0.99"])
    );
    assert_eq!(
        dump["waypoint"]["services"],
        serde_json::json!(["shop/echo"]),
        "{body}"
    );
    assert_eq!(get(metrics, "/metrics").await.unwrap().0, 200);
    // The HBONE port is open.
    assert!(tokio::net::TcpStream::connect(hbone).await.is_ok());
    drop(waypoint);

    // A token file that is not there stops it at once, naming the flag.
    let output = Command::new(target_binary("waypoint").unwrap())
        .args(waypoint_args(&dir.path().join("missing")))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--token-file") && stderr.contains("missing"),
        "{stderr}"
    );
}
