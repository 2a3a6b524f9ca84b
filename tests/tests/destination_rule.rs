//! DestinationRules end to end in the local mesh (`ambitctl local up`, needs root):
//! real binaries, rules applied with `ambitctl local apply`, curl in the client pod,
//! HTTP servers of `tests/interop/mesh_app.py` (standard library only) in the pods.
//! The client is on node-a, `web-a` and `web-b` on node-b, every request through the
//! waypoint.
//!
//! - a consistent hash on a header keeps each user on one endpoint;
//! - `maxConnections: 1` with one pending request: 10 concurrent slow requests give
//!   2 answers and 8 × 503 `UO`, in the access log and the metrics;
//! - a backend that always fails is ejected (no traffic for `baseEjectionTime`) and
//!   comes back after it;
//! - a VirtualService over the rule's subsets: tagged requests to v2 only, the rest
//!   90/10 within the binomial 99.9 % interval.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::ctl::Ctl;
use support::{metric, poll_until};

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
spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, labels: {app: web, version: v1}}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: c, ports: [{name: echo, containerPort: 9000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: shop, labels: {app: web, version: v2}}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: c, ports: [{name: echo, containerPort: 9000}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: slow, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: web, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

fn mesh_app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/mesh_app.py")
}

/// A server in a pod's network namespace, killed (and reaped) when dropped.
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

impl Server {
    /// The requests it logged whose path contains `marker`.
    fn hits(&self, marker: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(marker))
            .count()
    }
}

/// `mesh_app.py named 8080 <pod> [fail]` in `pod`, once it listens.
fn serve(ctl: &Ctl, pod: &str, fail: bool) -> Server {
    let log = ctl.state.path().join(format!("{pod}-{fail}.log"));
    let mut args = vec!["-u".to_owned(), mesh_app().display().to_string()];
    args.extend(["named", "8080", pod].map(str::to_owned));
    if fail {
        args.push("fail".into());
    }
    let child = Command::new("nsenter")
        .arg(format!("--net={}", ctl.netns(pod).display()))
        .arg("--")
        .arg("python3")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let server = Server { child, log };
    poll_until(
        Duration::from_secs(30),
        || server.hits("listening") > 0,
        || std::fs::read_to_string(server.log.with_extension("err")).unwrap_or_default(),
    );
    server
}

/// curl in the client pod: (status, body).
fn curl(ctl: &Ctl, url: &str, header: Option<&str>) -> (u16, String) {
    let mut args = vec![
        "local",
        "exec",
        "client",
        "--",
        "curl",
        "-s",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code}",
    ];
    if let Some(h) = header {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = ctl.run(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// Writes `yaml` to a file and applies it.
fn apply(ctl: &Ctl, name: &str, yaml: &str) {
    let path = ctl.state.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    ctl.ok(&["local", "apply", "-f", path.to_str().unwrap()]);
}

fn rule(name: &str, host: &str, traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  host: {host}\n  trafficPolicy: {traffic_policy}\n"
    )
}

/// The waypoint's access-log lines (JSON).
fn access_log(ctl: &Ctl) -> Vec<serde_json::Value> {
    let mesh = ctl.mesh();
    let logs = Path::new(mesh["dir"].as_str().unwrap()).join("logs");
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().contains("-waypoint-") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if v["target"] == "access" {
                    lines.push(v);
                }
            }
        }
    }
    lines
}

#[test]
fn destination_rules_hash_limit_and_eject_in_the_waypoint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shop.yaml"), SHOP).unwrap();
    let ctl = Ctl::new();
    ctl.ok(&[
        "local",
        "up",
        "--log-format",
        "json",
        dir.path().to_str().unwrap(),
    ]);
    let web_a = serve(&ctl, "web-a", false);
    let mut web_b = serve(&ctl, "web-b", false);
    let web = format!("http://{}", ctl.vip("web"));
    let slow = format!("http://{}", ctl.vip("slow"));
    let server_of = |body: &str| -> String {
        serde_json::from_str::<serde_json::Value>(body)
            .map(|v| v["server"].as_str().unwrap_or("?").to_owned())
            .unwrap_or_else(|_| format!("not JSON: {body}"))
    };

    // 1. A consistent hash on x-user: once the rule is in effect, each user stays on
    // one endpoint, and the users spread over both.
    apply(
        &ctl,
        "hash",
        &rule(
            "web",
            "web",
            "{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}",
        ),
    );
    let sticky = |user: usize| -> Option<String> {
        let header = format!("x-user: user-{user}");
        let first = server_of(&curl(&ctl, &format!("{web}/hash"), Some(&header)).1);
        (0..4)
            .all(|_| server_of(&curl(&ctl, &format!("{web}/hash"), Some(&header)).1) == first)
            .then_some(first)
    };
    poll_until(
        Duration::from_secs(30),
        || sticky(0).is_some(),
        || "user-0 never stayed on one endpoint".into(),
    );
    let mut used = std::collections::BTreeSet::new();
    for user in 0..12 {
        let on = sticky(user).unwrap_or_else(|| panic!("user-{user} moved between endpoints"));
        used.insert(on);
    }
    assert_eq!(used.len(), 2, "{used:?}");

    // 2. maxConnections 1 with one pending request on `slow` (web-a only): of 10
    // concurrent 2 s requests, 2 are answered and 8 refused 503 UO.
    apply(
        &ctl,
        "pool",
        &rule(
            "slow",
            "slow.shop.svc.cluster.local",
            "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}",
        ),
    );
    // One curl sends all 10 at once, each on a connection of its own (separate
    // `local exec`s start too far apart on a busy machine: a 2 s request can end
    // before the last one starts).
    let burst = || -> Vec<u16> {
        let url = format!("{slow}/delay/2000");
        let mut args = vec![
            "local",
            "exec",
            "client",
            "--",
            "curl",
            "-s",
            "--max-time",
            "20",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "10",
            "-w",
            "%{http_code}\n",
        ];
        for _ in 0..10 {
            args.extend(["-o", "/dev/null", url.as_str()]);
        }
        let out = ctl.run(&args);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().parse().unwrap_or(0))
            .collect()
    };
    let mut answers = Vec::new();
    poll_until(
        Duration::from_secs(60),
        || {
            answers = burst();
            answers.contains(&503)
        },
        || "the pool never overflowed".into(),
    );
    let ok = answers.iter().filter(|s| **s == 200).count();
    let refused = answers.iter().filter(|s| **s == 503).count();
    // (The overflow's body, Envoy's, is checked by the waypoint's own tests.)
    assert_eq!((ok, refused), (2, 8), "{answers:?}");
    poll_until(
        Duration::from_secs(10),
        || {
            access_log(&ctl)
                .iter()
                .filter(|l| l["response_code"] == 503 && l["response_flags"] == "UO")
                .count()
                >= 8
        },
        || format!("no UO access lines: {:#?}", access_log(&ctl)),
    );
    let metrics = ctl.run(&[
        "local",
        "exec",
        "waypoint-0",
        "--",
        "curl",
        "-s",
        "http://127.0.0.1:15020/metrics",
    ]);
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let uo = metric(
        &metrics,
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "UO")],
    );
    assert!(uo >= 8.0, "{uo}: {metrics}");

    // 3. web-b fails every request: with outlier detection (2 in a row, 5 s) it is
    // ejected, gets nothing for 5 s (the default retry hides its failures), and comes
    // back after.
    drop(web_b);
    web_b = serve(&ctl, "web-b", true);
    apply(
        &ctl,
        "hash",
        &rule(
            "web",
            "web",
            "{outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 5s, maxEjectionPercent: 100}}",
        ),
    );
    let marker = "/eject";
    // Requests every ~100 ms; the times web-b was hit.
    let mut hit_at: Vec<Instant> = Vec::new();
    let mut seen = 0;
    let mut gaps = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while gaps.iter().all(|g: &Duration| *g < Duration::from_secs(4)) {
        assert!(Instant::now() < deadline, "web-b never ejected: {hit_at:?}");
        let (status, body) = curl(&ctl, &format!("{web}{marker}"), None);
        assert_eq!((status, server_of(&body)), (200, "web-a".into()), "{body}");
        let now = web_b.hits(marker);
        if now > seen {
            if let Some(last) = hit_at.last() {
                gaps.push(last.elapsed());
            }
            hit_at.push(Instant::now());
            seen = now;
        }
    }
    // It came back: ejected for at least the base time, not for ever.
    let gap = *gaps.last().unwrap();
    eprintln!("web-b's gaps between requests: {gaps:?}");
    assert!(gap >= Duration::from_millis(4500), "{gaps:?}");
    assert!(gap < Duration::from_secs(30), "{gaps:?}");
    assert!(web_a.hits(marker) > 0);
    drop(web_a);
    drop(web_b);
    ctl.ok(&["local", "down"]);
}

/// `count` GETs of `url` from the client pod in one curl (one connection), with
/// `header`: the server that answered each.
fn servers_of(ctl: &Ctl, url: &str, count: usize, header: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "local",
        "exec",
        "client",
        "--",
        "curl",
        "-s",
        "--max-time",
        "60",
    ];
    if let Some(h) = header {
        args.extend(["-H", h]);
    }
    args.extend(["-w", "\n"]);
    let urls = vec![url; count];
    args.extend(urls.iter().copied());
    let out = ctl.run(&args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .map(|v| v["server"].as_str().unwrap_or("?").to_owned())
                .unwrap_or_else(|_| format!("not JSON: {l}"))
        })
        .collect()
}

/// A VirtualService over a DestinationRule's subsets, as Istio users write a canary:
/// tagged requests to subset v2 only, the rest 90/10 between v1 and v2.
#[test]
fn a_virtual_service_splits_over_destination_rule_subsets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shop.yaml"), SHOP).unwrap();
    let ctl = Ctl::new();
    ctl.ok(&["local", "up", dir.path().to_str().unwrap()]);
    let _web_a = serve(&ctl, "web-a", false);
    let _web_b = serve(&ctl, "web-b", false);
    apply(
        &ctl,
        "canary",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: web, namespace: shop}\n\
         spec:\n  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: web, namespace: shop}\n\
         spec:\n  hosts: [web]\n  http:\n\
         \x20 - match: [{headers: {x-canary: {exact: \"yes\"}}}]\n\
         \x20   route: [{destination: {host: web, subset: v2}}]\n\
         \x20 - route:\n\
         \x20   - {destination: {host: web, subset: v1}, weight: 90}\n\
         \x20   - {destination: {host: web, subset: v2}, weight: 10}\n",
    );
    let web = format!("http://{}/canary", ctl.vip("web"));
    poll_until(
        Duration::from_secs(30),
        || {
            servers_of(&ctl, &web, 10, Some("x-canary: yes"))
                .iter()
                .all(|s| s == "web-b")
        },
        || {
            format!(
                "tagged requests not all on v2: {:?}",
                servers_of(&ctl, &web, 10, Some("x-canary: yes"))
            )
        },
    );
    // 90/10 over 400 requests: v2 within the binomial 99.9 % interval (40 +- 20).
    let untagged = servers_of(&ctl, &web, 400, None);
    assert_eq!(untagged.len(), 400, "{untagged:?}");
    let v2 = untagged.iter().filter(|s| *s == "web-b").count();
    let v1 = untagged.iter().filter(|s| *s == "web-a").count();
    assert_eq!(v1 + v2, 400, "{untagged:?}");
    assert!((20..=60).contains(&v2), "{v2} of 400 to v2");
    let status = ctl.ok(&["local", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("VirtualService shop/web") && l.contains(" True")),
        "{status}"
    );
    ctl.ok(&["local", "down"]);
}
