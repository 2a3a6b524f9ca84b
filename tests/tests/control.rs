//! ambit-control in local mode feeding a real ztunnel over delta xDS, in a local mesh
//! (needs root): the ztunnel's model follows the YAML directory, a file that stops
//! parsing leaves the model as it was, and the control plane's restart leaves the
//! ztunnel with its last model until it resyncs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ambit_localmesh::{LocalMesh, Process};
use ambit_net::netns::NetnsHandle;
use support::{bin, DEADLINE, TEST_LOG};

const NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
";

/// A pod on node-a whose redirection is reported: HBONE in the model.
fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  \
         annotations: {{ambient.istio.io/redirection: enabled}}\n\
         spec: {{nodeName: node-a, containers: [{{name: app, image: app}}]}}\n\
         status: {{podIP: {ip}}}\n"
    )
}

struct Setup {
    mesh: LocalMesh,
    dir: std::path::PathBuf,
    control: Option<Process>,
    ztunnel: Process,
}

impl Setup {
    fn start(files: &[(&str, String)]) -> Setup {
        let mesh = LocalMesh::builder().nodes(["node-a"]).build().unwrap();
        let dir = mesh.dir().join("k8s");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let token = "node-agent-token-for-node-a";
        std::fs::write(mesh.dir().join("node-a.token"), token).unwrap();
        std::fs::write(
            mesh.dir().join("tokens.yaml"),
            format!(
                "- token: \"{token}\"\n  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel\n  \
                 nodeAgent: true\n  node: node-a\n"
            ),
        )
        .unwrap();
        let control = start_control(&mesh, &dir);
        let address = address(&mesh);
        let mesh_dir = mesh.dir().to_path_buf();
        let node = mesh.node("node-a").unwrap().netns().clone();
        let ztunnel = mesh
            .spawn_in(
                &node,
                bin("ztunnel"),
                [
                    "--node",
                    "node-a",
                    "--xds-address",
                    &address,
                    "--ca-address",
                    &address,
                    "--ca-root",
                    mesh_dir.join("ca/root-cert.pem").to_str().unwrap(),
                    "--ca-token-file",
                    mesh_dir.join("node-a.token").to_str().unwrap(),
                    "--handoff-socket",
                    mesh_dir.join("node-a.sock").to_str().unwrap(),
                    "--log",
                    TEST_LOG,
                ],
                &[],
            )
            .unwrap();
        let setup = Setup {
            mesh,
            dir,
            control: Some(control),
            ztunnel,
        };
        setup
            .ztunnel
            .wait_for_log("ztunnel ready", DEADLINE)
            .unwrap_or_else(|e| panic!("{e}\n{}", setup.logs()));
        setup
    }

    fn start_control(&mut self) {
        self.control = Some(start_control(&self.mesh, &self.dir));
    }

    fn logs(&self) -> String {
        let control = self.control.as_ref().map(|c| c.log()).unwrap_or_default();
        format!(
            "--- ambit-control ---\n{control}\n--- ztunnel ---\n{}",
            self.ztunnel.log()
        )
    }

    /// ztunnel's `/config_dump`, fetched from inside node-a.
    async fn config_dump(&self) -> String {
        let ns = NetnsHandle::from_path(self.mesh.node("node-a").unwrap().netns().path()).unwrap();
        ns.run(|| {
            let addr: SocketAddr = "127.0.0.1:15000".parse().unwrap();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(
                b"GET /config_dump HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| panic!("config_dump: {e}\n{}", self.logs()))
    }

    /// Waits until ztunnel's config dump satisfies `what`; returns how long it took.
    async fn wait_for_dump(&self, label: &str, what: impl Fn(&str) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            let dump = self.config_dump().await;
            if what(&dump) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "ztunnel's model never showed {label}:\n{dump}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn write(&self, name: &str, text: &str) {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }
}

fn in_dump(dump: &str, uid: &str) -> bool {
    dump.contains(&format!("\"{uid}\""))
}

#[tokio::test(flavor = "multi_thread")]
async fn ztunnels_model_follows_the_yaml_directory_over_xds() {
    let s = Setup::start(&[
        ("namespace.yaml", NAMESPACE.to_owned()),
        ("web.yaml", pod("web", "10.1.0.9")),
    ]);
    s.wait_for_dump("shop/web", |d| {
        in_dump(d, "shop/web") && d.contains("HBONE")
    })
    .await;

    // A pod added to the directory reaches ztunnel.
    s.write("api.yaml", &pod("api", "10.1.0.10"));
    let took = s
        .wait_for_dump("shop/api", |d| in_dump(d, "shop/api"))
        .await;
    eprintln!("a new pod reached ztunnel in {took:?}");

    // A file that stops parsing is reported with its line, and its last good content
    // stays in the model.
    s.write(
        "api.yaml",
        &format!("{}---\nkind: a: b\n", pod("api", "10.1.0.10")),
    );
    s.control
        .as_ref()
        .unwrap()
        .wait_for_log("keeping the file's last good content", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert!(in_dump(&s.config_dump().await, "shop/api"));

    // Deleting a pod's file removes it.
    std::fs::remove_file(s.dir.join("api.yaml")).unwrap();
    s.wait_for_dump("shop/api gone", |d| {
        !in_dump(d, "shop/api") && in_dump(d, "shop/web")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ztunnel_keeps_its_model_while_the_control_plane_restarts_then_resyncs() {
    let mut s = Setup::start(&[
        ("namespace.yaml", NAMESPACE.to_owned()),
        ("web.yaml", pod("web", "10.1.0.9")),
    ]);
    s.wait_for_dump("shop/web", |d| in_dump(d, "shop/web"))
        .await;

    let control = s.control.take().unwrap();
    control.stop().unwrap();
    s.ztunnel
        .wait_for_log("reconnecting", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    // Meanwhile the directory changes; ztunnel keeps serving its last model.
    std::fs::remove_file(s.dir.join("web.yaml")).unwrap();
    s.write("api.yaml", &pod("api", "10.1.0.10"));
    assert!(in_dump(&s.config_dump().await, "shop/web"));

    s.start_control();
    s.wait_for_dump("the restarted control plane's model", |d| {
        in_dump(d, "shop/api") && !in_dump(d, "shop/web")
    })
    .await;
}

fn address(mesh: &LocalMesh) -> String {
    format!("{}:15012", mesh.fabric_ip())
}

/// ambit-control in the fabric namespace, on `dir`, with the mesh's CA and tokens.
fn start_control(mesh: &LocalMesh, dir: &Path) -> Process {
    let address = address(mesh);
    let control = mesh
        .spawn_in(
            mesh.fabric(),
            bin("ambit-control"),
            [
                "--local-dir",
                dir.to_str().unwrap(),
                "--poll",
                "100ms",
                "--root-dir",
                mesh.dir().join("ca").to_str().unwrap(),
                "--tokens",
                mesh.dir().join("tokens.yaml").to_str().unwrap(),
                "--listen",
                &address,
            ],
            &[],
        )
        .unwrap();
    control
        .wait_for_log("CA serving", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", control.log()));
    control
}
