//! The waypoint end to end in the local mesh (`ambitctl local up`, needs root), with
//! clients and servers that share no code with Ambit: curl, grpcio, websockets and
//! the standard library's HTTP server (`tests/interop/mesh_app.py`), run in the pods'
//! network namespaces. The client is on node-a, the servers on node-b, the waypoint
//! (Gateway `shop/waypoint`) on node-a: every request goes client → ztunnel → waypoint
//! → ztunnel → server over HBONE.
//!
//! - HTTP: L7 ALLOW/DENY answered by the waypoint over HTTP/1.1 and HTTP/2; the same
//!   kind of ALLOW on a pod without a waypoint fails closed at ztunnel; `traceparent`
//!   and `x-request-id`; bad input (431, CL+TE, `%00`, a slow client) bounded while
//!   other requests pass; the waypoint's metrics.
//! - Streams: gRPC method-level DENY, a 10,000-message server stream, a WebSocket echo
//!   and a 100 MB download checked by sha256 while the waypoint's RSS stays flat.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::ctl::Ctl;
use support::metric;

/// The shop: a client on node-a; `web` on node-b behind the waypoint (HTTP, gRPC and
/// WebSocket servers of mesh_app.py on 8080, 50051, 8765; the demo app's TCP echo on
/// 9000); `closed` on node-b with an L7 ALLOW and no waypoint.
const SHOP: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
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
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: c, ports: [{name: echo, containerPort: 9000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, version: v1}}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: c, ports: [{name: echo, containerPort: 9000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: closed, namespace: shop, labels: {app: closed}}
spec: {nodeName: node-b, serviceAccountName: closed, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: http-ws, port: 8765, targetPort: 8765}
---
apiVersion: v1
kind: Service
metadata: {name: rpc, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: web}
  ports:
  - {name: grpc, port: 50051, targetPort: 50051, appProtocol: grpc}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-read-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: web}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET], notPaths: [/admin, /admin/*]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-forbidden, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: rpc}]
  action: DENY
  rules: [{to: [{operation: {paths: [/test.Echo/Forbidden]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: closed-read-only, namespace: shop}
spec:
  selector: {matchLabels: {app: closed}}
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET]}}]}]
";

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// The Python interpreter with tests/interop/requirements.txt; failing (never
/// skipping) when it is missing.
fn python() -> PathBuf {
    let path = std::env::var_os("AMBIT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        path.exists(),
        "no Python interpreter at {}: run scripts/test.sh, or create the venv \
         (python3 -m venv .venv && .venv/bin/pip install -r tests/interop/requirements.txt) \
         and/or set AMBIT_PYTHON",
        path.display()
    );
    path
}

fn mesh_app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/mesh_app.py")
}

/// A mesh of [`SHOP`] brought up with `ambitctl local up`, down when dropped; the
/// servers started in it are stopped first.
struct Shop {
    servers: Vec<Server>,
    ctl: Ctl,
    _dir: tempfile::TempDir,
}

/// A process started in a pod's network namespace, killed (and reaped) when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Shop {
    fn up() -> Shop {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shop.yaml"), SHOP).unwrap();
        let ctl = Ctl::new();
        ctl.ok(&["local", "up", dir.path().to_str().unwrap()]);
        Shop {
            servers: Vec::new(),
            ctl,
            _dir: dir,
        }
    }

    /// Starts `mesh_app.py args` in `pod` and waits until it listens.
    fn serve(&mut self, pod: &str, args: &[&str]) {
        let log = self
            .ctl
            .state
            .path()
            .join(format!("{pod}-{}.log", args.join("-")));
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ctl.netns(pod).display()))
            .arg("--")
            .arg(python())
            .arg("-u")
            .arg(mesh_app())
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let server = Server { child, log };
        let start = Instant::now();
        while !std::fs::read_to_string(&server.log)
            .unwrap_or_default()
            .contains("listening")
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{args:?} in {pod} never listened: {}",
                std::fs::read_to_string(server.log.with_extension("err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.servers.push(server);
    }

    /// Runs `program args` in `pod` (`ambitctl local exec`).
    fn exec(&self, pod: &str, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["local", "exec", pod, "--", program];
        all.extend_from_slice(args);
        self.ctl.run(&all)
    }

    /// `mesh_app.py args` in `pod`: its stdout, asserting success.
    fn python(&self, pod: &str, args: &[&str]) -> String {
        let python = python();
        let app = mesh_app();
        let mut all = vec!["-u", app.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.exec(pod, python.to_str().unwrap(), &all);
        assert!(
            out.status.success(),
            "{args:?} in {pod}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.ctl.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// curl in the client pod: `status body` (the body last), curl's exit code.
    fn curl(&self, args: &[&str]) -> (String, Option<i32>) {
        let mut all = vec![
            "-s",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code} %{http_version}",
        ];
        all.extend_from_slice(args);
        let out = self.exec("client", "curl", &all);
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.code(),
        )
    }

    /// The waypoint's Prometheus text, from inside its pod.
    fn waypoint_metrics(&self) -> String {
        let out = self.exec(
            "waypoint-0",
            "curl",
            &["-s", "--max-time", "10", "http://127.0.0.1:15020/metrics"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The waypoint's process: the one of the mesh's processes in its pod's network
    /// namespace.
    fn waypoint_pid(&self) -> u64 {
        self.ctl.process_in("waypoint-0")
    }
}

/// The waypoint's resident set, KiB (`/proc/PID/status` VmRSS).
fn rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Splits curl's `-w` line off the body: (`"200 1.1"`, body).
fn status_and_body(out: &str) -> (&str, &str) {
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", out));
    (status, body)
}

#[test]
fn http_through_the_waypoint_with_curl_policies_tracing_bad_input_and_metrics() {
    let started = Instant::now();
    let mut shop = Shop::up();
    let up_took = started.elapsed();
    shop.serve("web", &["http", "8080"]);
    let web = shop.ctl.vip("web");
    let url = |path: &str| format!("http://{web}{path}");

    // Allowed GET and denied POST, over HTTP/1.1 and HTTP/2 with prior knowledge.
    for (flags, version) in [(&[][..], "1.1"), (&["--http2-prior-knowledge"][..], "2")] {
        let mut get = flags.to_vec();
        let public = url("/public");
        get.push(&public);
        let (out, _) = shop.curl(&get);
        let (status, body) = status_and_body(&out);
        assert_eq!(
            status,
            format!("200 {version}"),
            "{out}\n{}",
            shop.ctl.logs()
        );
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(seen["path"], "/public", "{body}");
        let mut post = flags.to_vec();
        let admin = url("/admin");
        post.extend(["-X", "POST", "-d", "x=1", &admin]);
        let (out, _) = shop.curl(&post);
        let (status, body) = status_and_body(&out);
        assert_eq!(status, format!("403 {version}"), "{out}");
        assert_eq!(body, "RBAC: access denied", "{out}");
    }

    // The same kind of ALLOW (methods) on a pod that has no waypoint: ztunnel cannot
    // see methods, so it fails closed: the connection is refused, not answered.
    let closed_ip = shop.ctl.mesh()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "closed")
        .unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    let (out, code) = shop.curl(&[&format!("http://{closed_ip}:8080/")]);
    assert_ne!(
        code,
        Some(0),
        "an L7 ALLOW without a waypoint let a GET through: {out}"
    );
    assert!(out.ends_with("000 0"), "{out}");

    // traceparent: the same trace id, a new parent span; x-request-id added.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let (out, _) = shop.curl(&[
        "-H",
        &format!("traceparent: 00-{trace}-{parent}-01"),
        &url("/traced"),
    ]);
    let (status, body) = status_and_body(&out);
    assert_eq!(status, "200 1.1", "{out}");
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    let got = seen["headers"]["traceparent"].as_str().unwrap_or_default();
    let parts: Vec<&str> = got.split('-').collect();
    assert_eq!(parts.len(), 4, "{got}");
    assert_eq!(parts[1], trace, "{got}");
    assert_ne!(parts[2], parent, "no new span: {got}");
    assert_eq!(parts[2].len(), 16, "{got}");
    let request_id = seen["headers"]["x-request-id"].as_str().unwrap_or_default();
    assert!(!request_id.is_empty(), "no x-request-id added: {body}");
    let (out, _) = shop.curl(&["-H", "x-request-id: mine", &url("/traced")]);
    let seen: serde_json::Value = serde_json::from_str(status_and_body(&out).1).unwrap();
    assert_eq!(seen["headers"]["x-request-id"], "mine", "{out}");

    // Bad input through the real path.
    let big = format!("x-big: {}", "a".repeat(100 * 1024));
    let (out, _) = shop.curl(&["-H", &big, &url("/public")]);
    assert_eq!(
        status_and_body(&out).0,
        "431 1.1",
        "100 KiB of headers: {out}"
    );
    let (out, _) = shop.curl(&[
        "-X",
        "GET",
        "-H",
        "content-length: 5",
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
        "0\r\n\r\n",
        &url("/public"),
    ]);
    assert!(
        out.ends_with("400 1.1") || out.ends_with("000 0"),
        "CL+TE must not be forwarded: {out}"
    );
    let (out, _) = shop.curl(&["--path-as-is", &url("/a%00b")]);
    assert_eq!(status_and_body(&out).0, "400 1.1", "%00 in the path: {out}");

    // A client sending its head one byte a second is cut off within the header
    // timeout (10 s) while another client's requests keep passing.
    let slow = {
        let (python, app, web) = (python(), mesh_app(), web.clone());
        let state = shop.ctl.state.path().to_owned();
        std::thread::spawn(move || {
            let out = Command::new(support::bin("ambitctl"))
                .args(["local", "exec", "client", "--"])
                .arg(python)
                .arg("-u")
                .arg(app)
                .args(["slow", &web, "80"])
                .env("AMBITCTL_STATE_DIR", state)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let mut served_meanwhile = 0;
    while !slow.is_finished() {
        let (out, _) = shop.curl(&[&url("/public")]);
        assert_eq!(
            status_and_body(&out).0,
            "200 1.1",
            "while a slow client waits: {out}"
        );
        served_meanwhile += 1;
    }
    let slow: serde_json::Value = serde_json::from_str(slow.join().unwrap().trim()).unwrap();
    let after = slow["after"].as_f64().unwrap();
    assert!(
        slow["ended"] != "sent whole head" && after < 20.0,
        "the slow client was not cut off in time: {slow}"
    );
    assert!(
        served_meanwhile >= 3,
        "{served_meanwhile} requests while the slow client waited"
    );

    // The waypoint's metrics name the source and destination, the code and the
    // protocol.
    let metrics = shop.waypoint_metrics();
    let source = [
        ("reporter", "waypoint"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_principal", CLIENT),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("request_protocol", "http"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let count = |more: &[(&str, &str)]| {
        let labels: Vec<(&str, &str)> = source.iter().chain(more).copied().collect();
        metric(&metrics, "istio_requests_total", &labels)
    };
    let served = count(&[
        ("destination_workload", "web"),
        ("destination_workload_namespace", "shop"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/web",
        ),
        ("response_code", "200"),
    ]);
    assert!(served >= 5.0, "{metrics}");
    // Denied before an endpoint was picked: no destination workload (as Envoy's).
    assert!(
        count(&[
            ("response_code", "403"),
            ("destination_workload", "unknown")
        ]) >= 2.0,
        "{metrics}"
    );
    assert!(
        count(&[("response_code", "400"), ("response_flags", "DPE")]) >= 1.0,
        "{metrics}"
    );
    for name in [
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
    ] {
        assert!(
            metric(
                &metrics,
                name,
                &[("reporter", "waypoint"), ("response_code", "200")]
            ) > 0.0,
            "{name}: {metrics}"
        );
    }
    eprintln!(
        "mesh up in {up_took:?}; test {:?}; slow client cut off after {after:.1}s; {served_meanwhile} requests meanwhile",
        started.elapsed()
    );
}

#[test]
fn grpc_websocket_and_a_100_mb_download_stream_through_the_waypoint_in_flat_memory() {
    let started = Instant::now();
    let mut shop = Shop::up();
    shop.serve("web", &["http", "8080"]);
    shop.serve("web", &["grpc", "50051"]);
    shop.serve("web", &["ws", "8765"]);
    let (web, rpc) = (shop.ctl.vip("web"), shop.ctl.vip("rpc"));

    // gRPC: the DENY names one method; the others work; a stream arrives whole.
    let out = shop.python("client", &["grpc-client", &format!("{rpc}:50051")]);
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["Unary"]["ok"], "hello", "{got}");
    assert_eq!(got["Forbidden"]["code"], "PERMISSION_DENIED", "{got}");
    assert_eq!(got["Stream"]["count"], 10_000, "{got}");
    assert_eq!(got["Stream"]["in_order"], true, "{got}");

    // WebSocket: an echo through the waypoint (an HTTP/1.1 Upgrade).
    let out = shop.python(
        "client",
        &["ws-client", &format!("ws://{web}:8765/"), "200"],
    );
    assert_eq!(out.trim(), "echoed 200");

    // 100 MB streamed, checked by hash, while the waypoint's RSS is sampled.
    let size: u64 = 100 * 1024 * 1024;
    let want = {
        let out = Command::new(python())
            .arg(mesh_app())
            .args(["digest", &size.to_string()])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let pid = shop.waypoint_pid();
    // Warm: a first download sets up the pools and buffers a steady state has.
    let small = format!("http://{web}/download/1048576");
    let (out, _) = shop.curl(&["-o", "/dev/null", &small]);
    assert_eq!(status_and_body(&out).0, "200 1.1", "{out}");
    let before = rss_kib(pid);
    let download = {
        let state = shop.ctl.state.path().to_owned();
        let url = format!("http://{web}/download/{size}");
        std::thread::spawn(move || {
            Command::new(support::bin("ambitctl"))
                .args(["local", "exec", "client", "--", "sh", "-c"])
                .arg(format!("curl -sS --max-time 120 {url} | sha256sum"))
                .env("AMBITCTL_STATE_DIR", state)
                .output()
                .unwrap()
        })
    };
    let mut peak = before;
    let mut samples = 0;
    while !download.is_finished() {
        peak = peak.max(rss_kib(pid));
        samples += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = download.join().unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "the 100 MB download arrived changed: {got}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grew_mib = (peak.saturating_sub(before)) as f64 / 1024.0;
    eprintln!(
        "waypoint RSS {before} KiB before, {peak} KiB peak over {samples} samples: grew {grew_mib:.1} MiB; test {:?}",
        started.elapsed()
    );
    // A proxy that buffered the body would grow by about 100 MB.
    assert!(
        grew_mib < 30.0,
        "the waypoint's RSS grew {grew_mib:.1} MiB over a 100 MB download"
    );

    // gRPC is counted with its status.
    let metrics = shop.waypoint_metrics();
    let grpc = |status: &str| {
        metric(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("source_principal", CLIENT),
                ("destination_service", "rpc.shop.svc.cluster.local"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", status),
            ],
        )
    };
    assert!(grpc("0") >= 2.0, "{metrics}");
    assert!(grpc("7") >= 1.0, "{metrics}");
}
