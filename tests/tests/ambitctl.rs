//! `ambitctl local` as a user runs it (needs root): `up` on the bookshop example,
//! traffic through `exec` over HBONE with the caller's identity reported, then `down`
//! leaving no network namespace, host rule or process behind. Bad input fails clearly
//! and leaves nothing. Each test has its own state directory (`AMBITCTL_STATE_DIR`),
//! so it runs beside any other test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::bin;
use support::ctl::Ctl;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// The host namespace's firewall rules, without counters.
fn host_rules() -> String {
    let mut out = String::new();
    for (program, args) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let text = Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            // `:INPUT ACCEPT [12:3456]`: counters move with any traffic.
            let line = match line.find(" [") {
                Some(i) if line.starts_with(':') => &line[..i],
                _ => line,
            };
            // nft's `counter packets 12 bytes 3456` likewise (a container runtime's
            // rules on the host count its traffic).
            let line = without_nft_counts(line);
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// `line` with the numbers of each nft `counter packets N bytes M` left out.
fn without_nft_counts(line: &str) -> String {
    let mut words: Vec<&str> = Vec::new();
    let mut skip_number = false;
    for word in line.split(' ') {
        if skip_number && word.chars().all(|c| c.is_ascii_digit()) && !word.is_empty() {
            skip_number = false;
            continue;
        }
        skip_number = (words.last() == Some(&"counter") && word == "packets") || word == "bytes";
        words.push(word);
    }
    words.join(" ")
}

fn namespaces_of(id: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{id}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `f` until it returns true, or panics with `what()` after the deadline.
fn eventually(f: impl FnMut() -> bool, what: impl Fn() -> String) {
    support::poll_until(Duration::from_secs(30), f, what);
}

#[test]
fn up_runs_the_bookshop_over_hbone_and_down_leaves_nothing() {
    let rules_before = host_rules();
    let ctl = Ctl::new();
    let dir = example("bookshop");
    // JSON logs, as a log collector takes them (the waypoint's access log is read
    // below).
    let up = ctl.ok(&["local", "up", "--log-format", "json", dir.to_str().unwrap()]);
    assert!(up.contains("bookshop/frontend"), "{up}");
    assert!(up.contains("ambient (HBONE)"), "{up}");

    // One mesh at a time.
    let again = ctl.run(&["local", "up", dir.to_str().unwrap()]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already running"), "{err}");

    let mesh = ctl.mesh();
    let id = mesh["id"].as_str().unwrap().to_owned();
    let ip_of = |pod: &str| {
        mesh["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == pod)
            .unwrap()["ip"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // Enrolled to enrolled, across nodes, through the service: over HBONE, and the
    // catalog hears who called.
    let got = ctl.ok(&[
        "local",
        "exec",
        "bookshop/frontend",
        "--",
        "ambitctl",
        "app",
        "get",
        "http://catalog.bookshop/",
    ]);
    assert!(
        got.contains("hello from bookshop/catalog on node-b"),
        "{got}"
    );
    assert!(
        got.contains(&format!("caller: {}:", ip_of("frontend"))),
        "{got}"
    );
    assert!(
        got.contains("caller identity: spiffe://cluster.local/ns/bookshop/sa/frontend"),
        "{got}"
    );

    // Straight to the catalog's IPv6 address: over HBONE too.
    let catalog6 = mesh["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "catalog")
        .unwrap()["ip6"]
        .as_str()
        .unwrap()
        .to_owned();
    let url6 = format!("http://[{catalog6}]:8080/");
    let got6 = ctl.ok(&[
        "local", "exec", "frontend", "--", "ambitctl", "app", "get", &url6,
    ]);
    assert!(
        got6.contains("caller identity: spiffe://cluster.local/ns/bookshop/sa/frontend"),
        "{got6}"
    );

    // The TCP echo through the service too.
    let echoed = ctl.ok(&[
        "local",
        "exec",
        "frontend",
        "--",
        "ambitctl",
        "app",
        "send",
        "catalog.bookshop:9000",
        "hello catalog",
    ]);
    assert_eq!(echoed.trim(), "hello catalog");

    // From the namespace outside the mesh: plaintext, no identity.
    let plain = ctl.ok(&[
        "local",
        "exec",
        "legacy/batch",
        "--",
        "ambitctl",
        "app",
        "get",
        "http://catalog.bookshop/",
    ]);
    assert!(
        plain.contains(&format!("caller: {}:", ip_of("batch"))),
        "{plain}"
    );
    assert!(plain.contains("caller identity: none"), "{plain}");

    // Through the namespace's waypoint (orders is bound to it, with a read-only L7
    // policy): GET passes and the app hears the waypoint's identity; POST and /admin
    // are 403 from the waypoint; HTTP/2 with prior knowledge (curl) too; and the
    // plaintext pod cannot go around the waypoint.
    assert!(up.contains("waypoint bookshop/waypoint"), "{up}");
    let app = |pod: &str, args: &[&str]| {
        let mut all = vec!["local", "exec", pod, "--", "ambitctl", "app", "get"];
        all.extend_from_slice(args);
        ctl.run(&all)
    };
    let read = app("bookshop/frontend", &["http://orders.bookshop/books"]);
    let body = String::from_utf8_lossy(&read.stdout);
    assert!(read.status.success(), "{body}");
    assert!(
        body.contains("hello from bookshop/orders")
            && body.contains("caller identity: spiffe://cluster.local/ns/bookshop/sa/waypoint"),
        "{body}"
    );
    for args in [
        &["-X", "POST", "http://orders.bookshop/books"][..],
        &["http://orders.bookshop/admin/users"][..],
        &["http://orders.bookshop/books/../admin"][..],
    ] {
        let denied = app("bookshop/frontend", args);
        let body = String::from_utf8_lossy(&denied.stdout);
        assert_eq!(denied.status.code(), Some(1), "{args:?}: {body}");
        assert!(
            body.contains("HTTP 403") && body.contains("RBAC: access denied"),
            "{args:?}: {body}"
        );
    }
    let orders_vip = mesh["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "orders")
        .unwrap()["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    let curl = |args: &[&str]| {
        let mut all = vec![
            "local",
            "exec",
            "bookshop/frontend",
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ];
        all.extend_from_slice(args);
        let out = ctl.run(&all);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let books = format!("http://{orders_vip}/books");
    assert_eq!(curl(&["--http2-prior-knowledge", &books]), "200 2");
    assert_eq!(
        curl(&["--http2-prior-knowledge", "-X", "DELETE", &books]),
        "403 2"
    );
    assert_eq!(curl(&[&books]), "200 1.1");
    let around = app("legacy/batch", &["http://orders.bookshop/books"]);
    assert!(
        !around.status.success(),
        "plaintext went around the waypoint"
    );
    // And the client says the mesh refused it, whichever moment the reset came.
    let err = String::from_utf8_lossy(&around.stderr);
    assert!(err.contains("by the mesh"), "{err}");

    // The canary: the waypoint routes reviews 90/10 by its HTTPRoute (400 requests:
    // v2 within a 99.99 % binomial interval, 40 +- 23), and tagged requests to v2.
    let versions = |args: &[&str]| {
        let out = app("bookshop/frontend", args);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{body}");
        let count = |pod: &str| body.matches(&format!("hello from bookshop/{pod} ")).count();
        (count("reviews-v1"), count("reviews-v2"))
    };
    let (v1, v2) = versions(&["--count", "400", "http://reviews.bookshop/"]);
    assert_eq!(v1 + v2, 400);
    assert!((17..=63).contains(&v2), "{v2} of 400 to v2");
    assert_eq!(
        versions(&[
            "--count",
            "20",
            "-H",
            "x-canary: yes",
            "http://reviews.bookshop/"
        ]),
        (0, 20)
    );

    // The waypoint's access log: one JSON object per line, one line per request once
    // its response ended, the allowed GET and the denied POST among them.
    let logs = Path::new(mesh["dir"].as_str().unwrap()).join("logs");
    let access = || -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(&logs).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.contains("-waypoint-") {
                continue;
            }
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let value: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line}"));
                if value["target"] == "access" {
                    lines.push(value);
                }
            }
        }
        lines
    };
    // ztunnel as `local up` runs it: at info (below), so its access log has a JSON
    // line per connection (these requests went out of the frontend's ztunnel over
    // HBONE).
    let ztunnel_lines = || -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(&logs).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.contains("-ztunnel-") {
                let text = std::fs::read_to_string(&path).unwrap();
                lines.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
            }
        }
        lines
    };
    eventually(
        || {
            ztunnel_lines().iter().any(|v| {
                v["target"] == "access"
                    && v["message"] == "connection complete"
                    && v["direction"] == "outbound"
                    && v["src.identity"] == "spiffe://cluster.local/ns/bookshop/sa/frontend"
            })
        },
        || {
            format!(
                "no ztunnel access line for the frontend: {:#?}",
                ztunnel_lines()
            )
        },
    );

    let frontend = "spiffe://cluster.local/ns/bookshop/sa/frontend";
    let find = |method: &str, code: u64, protocol: &str| {
        access().into_iter().find(|l| {
            l["method"] == method
                && l["response_code"] == code
                && l["protocol"] == protocol
                && l["path"] == "/books"
        })
    };
    let mut got = None;
    eventually(
        || {
            got = find("GET", 200, "HTTP/2");
            got.is_some()
        },
        || format!("no access line for the HTTP/2 GET: {:#?}", access()),
    );
    let get = got.unwrap();
    assert_eq!(get["level"], "INFO", "{get}");
    assert_eq!(get["source_principal"], frontend, "{get}");
    assert_eq!(get["source_workload"], "frontend", "{get}");
    assert_eq!(
        get["destination_service"], "orders.bookshop.svc.cluster.local",
        "{get}"
    );
    assert_eq!(
        get["destination_principal"], "spiffe://cluster.local/ns/bookshop/sa/orders",
        "{get}"
    );
    assert_eq!(get["response_flags"], "-", "{get}");
    assert!(get["response_bytes"].as_u64().unwrap() > 0, "{get}");
    assert!(get["duration_ms"].is_u64(), "{get}");
    let upstream = get["upstream_host"].as_str().unwrap();
    assert!(
        upstream.starts_with(&format!("{}:", ip_of("orders"))),
        "{get}"
    );
    assert_eq!(get["trace_id"].as_str().unwrap().len(), 32, "{get}");
    assert_eq!(get["x_request_id"].as_str().unwrap().len(), 36, "{get}");
    let denied = find("DELETE", 403, "HTTP/2").unwrap_or_else(|| panic!("{:#?}", access()));
    assert_eq!(denied["upstream_host"], "-", "{denied}");
    assert_eq!(denied["source_principal"], frontend, "{denied}");
    assert!(find("GET", 200, "HTTP/1.1").is_some(), "{:#?}", access());

    // The destination ztunnel counted the frontend's connection as mutual TLS.
    let node_b = mesh["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-b")
        .unwrap()["netns"]
        .as_str()
        .unwrap()
        .to_owned();
    // `GET` of node-b's ztunnel's port on its loopback, from inside its namespace.
    let node_b_get = |url: &str| {
        let out = Command::new("nsenter")
            .arg(format!("--net={node_b}"))
            .arg("--")
            .arg(bin("ambitctl"))
            .args(["app", "get", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metrics = node_b_get("http://127.0.0.1:15020/metrics");
    let opened = support::metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/bookshop/sa/frontend",
            ),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(opened >= 2.0, "opened {opened}:\n{metrics}");
    // And it runs at `info`: no debug logging on the hot path.
    let filter = node_b_get("http://127.0.0.1:15000/logging");
    assert_eq!(filter.trim(), "info", "ztunnel's log filter");

    // A policy applied to the running mesh, as with kubectl: the frontend is denied,
    // then the policy is deleted and it is let through again.
    let policies = tempfile::tempdir().unwrap();
    let deny = policies.path().join("deny-frontend.yaml");
    std::fs::write(
        &deny,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: deny-frontend, namespace: bookshop}\n\
         spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/bookshop/sa/frontend]}}]}]}\n",
    )
    .unwrap();
    // Refused, nothing applied: the control plane could not read it as written.
    let bad = policies.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: allow, namespace: bookshop, labels: 5}\nspec: {rules: [{}]}\n",
    )
    .unwrap();
    let out = ctl.run(&["local", "apply", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.yaml:1: document 1") && err.contains("metadata.labels"),
        "{err}"
    );
    let k8s = Path::new(mesh["dir"].as_str().unwrap()).join("k8s");
    let applied = |stem: &str| {
        std::fs::read_dir(&k8s).unwrap().any(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.starts_with(&format!("applied-{stem}-")) && name.ends_with(".yaml")
        })
    };
    assert!(!applied("bad"));
    // `apply ... | head -1`: the reader goes, the policy is applied all the same.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin("ambitctl"))
        .args(["local", "apply", "-f", deny.to_str().unwrap()])
        .env("AMBITCTL_STATE_DIR", ctl.state.path())
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
    assert!(applied("deny-frontend"));
    let applied = ctl.ok(&["local", "apply", "-f", deny.to_str().unwrap()]);
    assert!(
        applied.contains("AuthorizationPolicy bookshop/deny-frontend applied"),
        "{applied}"
    );
    let frontend_gets = || {
        ctl.run(&[
            "local",
            "exec",
            "frontend",
            "--",
            "ambitctl",
            "app",
            "get",
            "http://catalog.bookshop/",
        ])
        .status
        .success()
    };
    // `authz explain` on the running mesh agrees with the traffic, pod by pod.
    let explain = |source: &str| {
        ctl.run(&[
            "authz",
            "explain",
            "--from",
            source,
            "--to",
            "bookshop/catalog",
            "--port",
            "80",
        ])
    };
    let agrees = |phase: &str| {
        for source in ["bookshop/frontend", "bookshop/catalog", "legacy/batch"] {
            let real = ctl
                .run(&[
                    "local",
                    "exec",
                    source,
                    "--",
                    "ambitctl",
                    "app",
                    "get",
                    "http://catalog.bookshop/",
                ])
                .status
                .success();
            let out = explain(source);
            let said = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(if real { 0 } else { 3 }),
                "{phase}: {source} → catalog: the traffic was {}, explain said:\n{said}",
                if real { "allowed" } else { "denied" }
            );
        }
    };
    eventually(
        || !frontend_gets(),
        || "the DENY to refuse the frontend".into(),
    );
    agrees("deny-frontend applied");
    // The denied client says so, not a parse error of nothing. The source ztunnel
    // resets the connection as soon as the destination refuses its tunnel: whether the
    // client sees that while its connect completes or while it reads is a race, and
    // both say the same thing.
    let denied = ctl.run(&[
        "local",
        "exec",
        "frontend",
        "--",
        "ambitctl",
        "app",
        "get",
        "http://catalog.bookshop/",
    ]);
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        err.contains("by the mesh")
            && err.contains("denied by policy")
            && !err.contains("not an HTTP response"),
        "{err}"
    );
    let out = explain("bookshop/frontend");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("explicitly denied by policy bookshop/deny-frontend")
            && said.contains("ztunnel on node-b"),
        "{said}"
    );
    ctl.ok(&["local", "delete", "-f", deny.to_str().unwrap()]);
    eventually(frontend_gets, || {
        "the deletion to let the frontend in".into()
    });
    agrees("deny-frontend deleted");

    // What each ztunnel holds, from its own admin endpoint.
    let config: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["ztunnel-config", "all", "--node", "node-b", "-o", "json"]))
            .unwrap();
    assert_eq!(config.as_array().unwrap().len(), 1, "{config:#}");
    let b = &config[0];
    assert_eq!(b["node"], "node-b");
    assert!(
        b["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["uid"] == "bookshop/catalog"),
        "{b:#}"
    );
    assert!(
        b["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "catalog"),
        "{b:#}"
    );
    let cert = b["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/bookshop/sa/catalog")
        .unwrap_or_else(|| panic!("no certificate of catalog on node-b: {b:#}"));
    assert_eq!(cert["state"], "valid");
    assert!(
        cert["serial"].as_str().is_some_and(|s| s.len() >= 8),
        "{cert}"
    );
    let table = ctl.ok(&["ztunnel-config", "workloads"]);
    assert!(
        table.contains("== ztunnel on node-a: workloads")
            && table.contains("== ztunnel on node-b: workloads")
            && table
                .lines()
                .any(|l| l.starts_with("bookshop") && l.contains("catalog") && l.contains("HBONE")),
        "{table}"
    );
    let certs = ctl.ok(&["ztunnel-config", "certificates", "--node", "node-b"]);
    assert!(
        certs.contains("spiffe://cluster.local/ns/bookshop/sa/catalog"),
        "{certs}"
    );
    let wrong = ctl.run(&["ztunnel-config", "all", "--node", "node-z"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("the mesh's nodes are node-a, node-b"));
    // A policy that selects nothing is applied, and `analyze`'s finding printed; a
    // file of the same name from another directory is applied beside it.
    let elsewhere = tempfile::tempdir().unwrap();
    let typo = elsewhere.path().join("deny-frontend.yaml");
    std::fs::write(
        &typo,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: allow-payments, namespace: bookshop}\n\
         spec: {selector: {matchLabels: {app: payments}}, rules: [{from: [{source: {namespaces: [bookshop]}}]}]}\n",
    )
    .unwrap();
    ctl.ok(&["local", "apply", "-f", deny.to_str().unwrap()]);
    let out = ctl.run(&["local", "apply", "-f", typo.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: Warning [AMB0009] PolicySelectsNothing AuthorizationPolicy bookshop/allow-payments")
            && err.contains(&format!("({}:", typo.display())),
        "{err}"
    );
    let copies = std::fs::read_dir(&k8s)
        .unwrap()
        .filter(|e| {
            let name = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            name.starts_with("applied-deny-frontend-")
        })
        .count();
    assert_eq!(copies, 2, "two files named deny-frontend.yaml, two copies");
    ctl.ok(&["local", "delete", "-f", typo.to_str().unwrap()]);
    ctl.ok(&["local", "delete", "-f", deny.to_str().unwrap()]);
    // New pods are not applied this way: they come from the directory `up` ran.
    let pod = policies.path().join("pod.yaml");
    std::fs::write(&pod, "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n").unwrap();
    let refused = ctl.run(&["local", "apply", "-f", pod.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("pod.yaml:1: Pod default/x: not in the running mesh"),
        "{refused:?}"
    );

    // exec passes the command's exit code through, and names a pod it cannot find.
    let code = ctl.run(&["local", "exec", "batch", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code.status.code(), Some(7));
    let missing = ctl.run(&["local", "exec", "nope", "--", "true"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("no pod nope"), "{err}");

    let status = ctl.ok(&["local", "status"]);
    assert!(status.contains("catalog.bookshop"), "{status}");
    // Each node's ztunnel as it answers now.
    for node in ["node-a ", "node-b "] {
        let row = status
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("no {node}row: {status}"));
        assert!(row.contains("serving, model version"), "{status}");
    }
    // The waypoint, its pod answering ready, its identity, and what binds to it as the
    // control plane binds it (the Services' own labels; not the per-version Services).
    let waypoint = status
        .lines()
        .skip_while(|l| !l.starts_with("WAYPOINT "))
        .find(|l| l.starts_with("bookshop/waypoint "))
        .unwrap_or_else(|| panic!("no waypoint row: {status}"));
    let cells: Vec<&str> = waypoint.split("  ").filter(|c| !c.is_empty()).collect();
    assert_eq!(
        cells.iter().map(|c| c.trim()).collect::<Vec<_>>(),
        [
            "bookshop/waypoint",
            "bookshop/waypoint-0",
            "ready",
            "spiffe://cluster.local/ns/bookshop/sa/waypoint",
            "Service bookshop/orders, Service bookshop/reviews",
        ],
        "{status}"
    );

    // Down: nothing of it is left.
    let mut pids: Vec<u64> = mesh["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    pids.push(mesh["supervisor"].as_u64().unwrap());
    assert!(!namespaces_of(&id).is_empty());
    let down = ctl.ok(&["local", "down"]);
    assert!(down.contains("gone"), "{down}");
    assert_eq!(namespaces_of(&id), Vec::<String>::new());
    eventually(
        || pids.iter().all(|p| !support::ctl::alive(*p)),
        || {
            format!(
                "processes still alive: {:?}",
                pids.iter()
                    .filter(|p| support::ctl::alive(**p))
                    .collect::<Vec<_>>()
            )
        },
    );
    assert_eq!(host_rules(), rules_before, "the host's rules changed");
    assert!(!ctl.state.path().join("mesh.json").exists());
    assert!(!Path::new(mesh["dir"].as_str().unwrap()).exists());

    let again = ctl.ok(&["local", "down"]);
    assert!(again.contains("no local mesh is running"), "{again}");
}

#[test]
fn yaml_that_does_not_parse_is_refused_by_file_and_line_with_nothing_left() {
    let ctl = Ctl::new();
    let app = tempfile::tempdir().unwrap();
    std::fs::write(
        app.path().join("shop.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [web\n",
    )
    .unwrap();
    let out = ctl.run(&["local", "up", app.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shop.yaml:"), "{err}");
    assert!(err.contains("not valid YAML"), "{err}");
    assert!(!ctl.state.path().join("supervisor.pid").exists());

    let exec = ctl.run(&["local", "exec", "shop/web", "--", "true"]);
    assert!(!exec.status.success());
    let err = String::from_utf8_lossy(&exec.stderr);
    assert!(err.contains("no local mesh is running"), "{err}");
}

#[test]
fn a_failure_while_starting_removes_what_was_made() {
    let ctl = Ctl::new();
    let app = tempfile::tempdir().unwrap();
    // Valid YAML the mesh cannot run: two services claim one cluster IP, found only
    // once the pods exist.
    std::fs::write(
        app.path().join("shop.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {nodeName: node-a, containers: [{name: web}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop}\nspec: {clusterIP: 10.96.0.50, selector: {app: web}, ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: shop}\nspec: {clusterIP: 10.96.0.50, selector: {app: web}, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let out = ctl.run(&["local", "up", app.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("VIP 10.96.0.50 is taken"),
        "{stdout}{stderr}"
    );
    let pid: u64 = stderr
        .split("supervisor pid ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no supervisor pid in: {stderr}"));
    assert!(!support::ctl::alive(pid));
    let prefix = format!("am{pid}x");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert_eq!(left, Vec::<String>::new());
    assert!(!ctl.state.path().join("supervisor.pid").exists());
}

/// `local apply` validates with the control plane's own reader and translation: what
/// the control plane would not enforce as written is refused before anything is
/// applied, naming the file, the document and the field; what it reads as Kubernetes
/// does (integer keys, a document on its `---` line) passes.
#[test]
fn apply_refuses_what_the_control_plane_would_not_enforce_by_file_document_and_field() {
    let ctl = Ctl::new();
    let dir = tempfile::tempdir().unwrap();
    let refused = |name: &str, text: &str, wanted: &[&str]| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = ctl.run(&["local", "apply", "-f", file.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{name}: {err}");
        assert!(out.status.code().is_some(), "{name}: {:?}", out.status);
        assert!(err.contains("refused, nothing applied"), "{name}: {err}");
        for w in wanted {
            assert!(err.contains(w), "{name}: {w:?} not in {err}");
        }
    };
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n";
    refused(
        "labels.yaml",
        &format!("{namespace}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop, labels: 5}}\nspec: {{}}\n"),
        &["labels.yaml:5: document 2", "metadata.labels"],
    );
    refused(
        "ip.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]}\n",
        &["ip.yaml:1: document 1", "spec.rules[0].from[0].source.ipBlocks[0]"],
    );
    refused(
        "version.yaml",
        "apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
        &["version.yaml:1: document 1", "security.istio.io/v2"],
    );
    refused(
        "mode.yaml",
        "--- {apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: web, namespace: shop}, spec: {selector: {matchLabels: {app: web}}, portLevelMtls: {9090: {mode: MAYBE}}}}\n",
        &["mode.yaml:1: document 1", "spec.portLevelMtls[9090].mode"],
    );
    // Valid as Kubernetes reads it: it gets as far as looking for the mesh.
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "--- {apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: default, namespace: istio-system}, spec: {mtls: {mode: STRICT}}}\n\
         --- {apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: web, namespace: shop}, spec: {selector: {matchLabels: {app: web}}, portLevelMtls: {9090: {mode: PERMISSIVE}}}}\n",
    )
    .unwrap();
    let out = ctl.run(&["local", "apply", "-f", good.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no local mesh is running"), "{err}");
}

/// Output into a pipe whose reader has gone (`ambitctl ... | head -1`) is dropped
/// quietly: no panic, no "Broken pipe", the command's own exit code.
#[test]
fn a_closed_pipe_on_stdout_is_not_a_crash() {
    let ctl = Ctl::new();
    let (reader, writer) = std::io::pipe().unwrap();
    // Closed before ambitctl writes: its first line meets EPIPE.
    drop(reader);
    let out = Command::new(bin("ambitctl"))
        .args(["local", "down"])
        .env("AMBITCTL_STATE_DIR", ctl.state.path())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
}

/// `local down` without root refuses at once, stops nothing and keeps the state of
/// the mesh, whose supervisor is still alive.
#[test]
fn down_without_root_refuses_at_once_and_keeps_the_state_of_a_running_mesh() {
    let ctl = Ctl::new();
    // A supervisor that is alive: a process of root's.
    let mut supervisor = Command::new("sleep").arg("600").spawn().unwrap();
    let pid_file = ctl.state.path().join("supervisor.pid");
    std::fs::write(&pid_file, format!("{}\n", supervisor.id())).unwrap();
    std::fs::write(ctl.state.path().join("mesh.json"), "{}").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for path in [ctl.state.path(), &pid_file] {
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(bin("ambitctl"))
        .args(["local", "down"])
        .env("AMBITCTL_STATE_DIR", ctl.state.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let alive = supervisor.try_wait().unwrap().is_none();
    let _ = supervisor.kill();
    let _ = supervisor.wait();
    // Not a mesh of ours: Drop's `down` must not find it.
    let kept = pid_file.exists() && ctl.state.path().join("mesh.json").exists();
    let _ = std::fs::remove_file(&pid_file);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("run ambitctl local down as root"), "{err}");
    assert!(alive, "the supervisor was left alone");
    assert!(kept, "the state of a running mesh is kept");
}

/// `local up` reads its directory with the control plane's reader (an integer
/// `portLevelMtls` key is fine) and refuses a policy it would not enforce as written.
#[test]
fn up_refuses_a_policy_the_control_plane_would_not_enforce() {
    let ctl = Ctl::new();
    let app = tempfile::tempdir().unwrap();
    std::fs::write(
        app.path().join("shop.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {nodeName: node-a, containers: [{name: web}]}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: web, namespace: shop}\n\
         spec: {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: STRICT}}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\n\
         spec: {rules: [{to: [{operation: {ports: [http]}}]}]}\n",
    )
    .unwrap();
    let out = ctl.run(&["local", "up", app.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("shop.yaml:11: document 3: AuthorizationPolicy shop/a: spec.rules[0].to[0].operation.ports[0]"),
        "{err}"
    );
    assert!(!err.contains("PeerAuthentication"), "{err}");
    assert!(err.contains("refused, nothing started"), "{err}");
    assert!(!ctl.state.path().join("supervisor.pid").exists());
}

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  nodeName: node-a
  serviceAccountName: client
  containers: [{name: client, image: example/client, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec:
  nodeName: node-b
  serviceAccountName: server
  containers: [{name: server, image: example/server, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: http}]
---
# Only GET, enforced by the Service's waypoint once it has one.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-read-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: server}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

/// The Gateway, and the Service as `up` read it but for its waypoint label.
const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// Every request to the shop's server aborted with 418 by fault injection.
const FAULT: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server-fault, namespace: shop}
spec:
  hosts: [server]
  http:
  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: server}}]
"#;

/// `ambitctl app get -X method` from `shop/client` to the shop's server: whether it
/// exited 0, and what it printed.
fn shop_request(ctl: &Ctl, method: &str) -> (bool, String) {
    let out = ctl.run(&[
        "local",
        "exec",
        "shop/client",
        "--",
        "ambitctl",
        "app",
        "get",
        "-X",
        method,
        "http://server.shop/items",
    ]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn apply_of_a_gateway_and_a_waypoint_label_takes_effect_on_the_running_mesh_and_delete_undoes_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shop.yaml"), SHOP).unwrap();
    let ctl = Ctl::new();
    ctl.ok(&["local", "up", dir.path().to_str().unwrap()]);
    let request = |method: &str| shop_request(&ctl, method).1;
    let direct = "caller identity: spiffe://cluster.local/ns/shop/sa/client";
    let via_waypoint = "caller identity: spiffe://cluster.local/ns/shop/sa/wp";
    // No waypoint yet: straight to the server, the policy is no waypoint's to enforce.
    let got = request("POST");
    assert!(
        got.contains("hello from shop/server") && got.contains(direct),
        "{got}"
    );

    let applied = dir.path().join("waypoint.yaml");
    std::fs::write(&applied, WAYPOINT).unwrap();
    let out = ctl.ok(&["local", "apply", "-f", applied.to_str().unwrap()]);
    assert!(
        out.contains("Gateway shop/wp: waypoint pod shop/wp-0"),
        "{out}"
    );
    assert!(
        out.contains("Service shop/server: now istio.io/use-waypoint=wp"),
        "{out}"
    );
    // Through the new waypoint: the POST is its L7 403, the GET passes as its identity.
    let seen = std::cell::RefCell::new(String::new());
    eventually(
        || {
            seen.replace(request("POST"));
            let now = seen.borrow();
            now.contains("HTTP 403") && now.contains("RBAC: access denied")
        },
        || {
            format!(
                "no 403 through the waypoint: {}\n{}",
                seen.borrow(),
                ctl.logs()
            )
        },
    );
    let got = request("GET");
    assert!(
        got.contains("hello from shop/server") && got.contains(via_waypoint),
        "{got}"
    );
    let status = ctl.ok(&["local", "status"]);
    let row = status
        .lines()
        .skip_while(|l| !l.starts_with("WAYPOINT "))
        .find(|l| l.starts_with("shop/wp "))
        .unwrap_or_else(|| panic!("no waypoint row: {status}"));
    assert!(
        row.contains("shop/wp-0")
            && row.contains(" ready ")
            && row.contains("spiffe://cluster.local/ns/shop/sa/wp")
            && row.ends_with("Service shop/server"),
        "{status}"
    );
    let waypoint_pid = ctl.process_in("wp-0");
    assert!(support::ctl::alive(waypoint_pid));

    // A VirtualService, as Istio users write it: its fault abort is injected by the
    // waypoint, `local status` shows it accepted, and deleting it undoes it.
    let vs = dir.path().join("fault.yaml");
    std::fs::write(&vs, FAULT).unwrap();
    let out = ctl.ok(&["local", "apply", "-f", vs.to_str().unwrap()]);
    assert!(out.contains("VirtualService shop/server-fault"), "{out}");
    eventually(
        || {
            seen.replace(request("GET"));
            seen.borrow().contains("HTTP 418")
        },
        || format!("no injected 418: {}\n{}", seen.borrow(), ctl.logs()),
    );
    let status = ctl.ok(&["local", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("VirtualService shop/server-fault") && l.contains(" True")),
        "{status}"
    );
    ctl.ok(&["local", "delete", "-f", vs.to_str().unwrap()]);
    eventually(
        || {
            seen.replace(request("GET"));
            seen.borrow().contains("hello from shop/server")
        },
        || format!("still aborted: {}\n{}", seen.borrow(), ctl.logs()),
    );

    // More than a waypoint label, or something new: refused, naming object and field.
    for (yaml, expected) in [
        (
            WAYPOINT.replace("port: 80,", "port: 81,"),
            "Service shop/server: field spec.ports[0].port differs",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: shop}\nspec: {containers: [{name: a, image: a}]}\n".to_owned(),
            "Pod shop/extra: not in the running mesh",
        ),
        (
            WAYPOINT.replace("istio-waypoint", "istio"),
            "spec.gatewayClassName is \"istio\"",
        ),
    ] {
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, yaml).unwrap();
        let out = ctl.run(&["local", "apply", "-f", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expected), "{expected}: {err}");
    }

    // Deleted: the waypoint stops, the label is as `up` read it, traffic goes direct.
    let out = ctl.ok(&["local", "delete", "-f", applied.to_str().unwrap()]);
    assert!(
        out.contains("Gateway shop/wp: waypoint pod shop/wp-0 stopped"),
        "{out}"
    );
    eventually(
        || {
            seen.replace(request("POST"));
            let now = seen.borrow();
            now.contains("hello from shop/server") && now.contains(direct)
        },
        || format!("not direct again: {}\n{}", seen.borrow(), ctl.logs()),
    );
    eventually(
        || !support::ctl::alive(waypoint_pid),
        || "the waypoint still runs".into(),
    );
    let status = ctl.ok(&["local", "status"]);
    assert!(!status.contains("shop/wp-0"), "{status}");
    ctl.ok(&["local", "down"]);
}

/// A process the test started in a pod's network namespace, killed when dropped.
struct Restarted(std::process::Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stopped_waypoint_refuses_its_traffic_naming_it_and_a_restarted_one_serves_it_again() {
    // The shop of the apply test, with the Service bound and the waypoint from `up`.
    let bound = SHOP.replace(
        "metadata: {name: server, namespace: shop}",
        "metadata: {name: server, namespace: shop, labels: {istio.io/use-waypoint: wp}}",
    );
    let gateway = WAYPOINT.split("---").next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shop.yaml"), format!("{bound}---{gateway}")).unwrap();
    let ctl = Ctl::new();
    ctl.ok(&["local", "up", dir.path().to_str().unwrap()]);
    let request = |method: &str| shop_request(&ctl, method);
    let via_waypoint = "caller identity: spiffe://cluster.local/ns/shop/sa/wp";
    let (ok, got) = request("GET");
    assert!(ok && got.contains(via_waypoint), "{got}");
    assert!(request("POST").1.contains("HTTP 403"));

    // Stopped (as a crashed container): the client's ztunnel refuses, naming the
    // waypoint, and the server is never reached around it, not even once.
    let pid = ctl.process_in("wp-0");
    let command: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split('\0')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    let netns = ctl.netns("wp-0");
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    eventually(
        || !support::ctl::alive(pid),
        || "the waypoint still runs".into(),
    );
    let logs = Path::new(ctl.mesh()["dir"].as_str().unwrap()).join("logs");
    let refusals = || -> Vec<String> {
        std::fs::read_dir(&logs)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("ztunnel"))
            .flat_map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("pod=shop/client") && l.contains("waypoint=shop/wp"))
                    .filter(|l| l.contains("connection reset") || l.contains("refused"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let before = refusals().len();
    for method in ["GET", "POST"] {
        let (ok, got) = request(method);
        assert!(
            !ok && !got.contains("hello from shop/server"),
            "{method} went around the stopped waypoint: {got}"
        );
    }
    eventually(
        || refusals().len() >= before + 2,
        || {
            format!(
                "no refusal naming the waypoint: {:?}\n{}",
                refusals(),
                ctl.logs()
            )
        },
    );

    // Restarted with the same command in its pod: served again, policy and all.
    let log = dir.path().join("waypoint-restarted.log");
    let restarted = Restarted(
        Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .args(&command)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    eventually(
        || {
            let (ok, got) = request("GET");
            ok && got.contains(via_waypoint)
        },
        || {
            format!(
                "not served again: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        },
    );
    let (ok, got) = request("POST");
    assert!(
        !ok && got.contains("HTTP 403") && got.contains("RBAC: access denied"),
        "{got}"
    );
    drop(restarted);
    ctl.ok(&["local", "down"]);
}

/// `ambitctl waypoint` on the running mesh, as istioctl waypoint is used: none listed,
/// one applied with the namespace enrolled and waited for, listed and programmed, its
/// L7 policy in force (and `authz explain` saying so), another refused without
/// --overwrite, then deleted and the traffic direct again.
#[test]
fn waypoint_apply_list_status_and_delete_on_the_running_mesh() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shop.yaml"), SHOP).unwrap();
    let ctl = Ctl::new();
    ctl.ok(&["local", "up", dir.path().to_str().unwrap()]);
    let listed = ctl.ok(&["waypoint", "list", "-n", "shop"]);
    assert!(listed.contains("No waypoints found."), "{listed}");

    let out = ctl.ok(&[
        "waypoint",
        "apply",
        "-n",
        "shop",
        "--name",
        "wp",
        "--enroll-namespace",
        "--wait",
    ]);
    assert!(out.contains("waypoint shop/wp programmed"), "{out}");
    let listed = ctl.ok(&["waypoint", "list", "-n", "shop"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with("wp "))
        .unwrap_or_else(|| panic!("{listed}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns, ["wp", "default", "service", "True"], "{listed}");
    let json: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["waypoint", "list", "-A", "-o", "json"])).unwrap();
    assert_eq!(json[0]["namespace"], "shop");
    assert_eq!(json[0]["programmed"], true);
    let status = ctl.ok(&["waypoint", "status", "-n", "shop"]);
    assert!(
        status.contains("Programmed   True") && status.contains("Service shop/server"),
        "{status}"
    );
    // The namespace's label binds the Service: its L7 policy (GET only) holds.
    let seen = std::cell::RefCell::new(String::new());
    eventually(
        || {
            seen.replace(shop_request(&ctl, "POST").1);
            seen.borrow().contains("HTTP 403")
        },
        || format!("no 403 through the waypoint: {}", seen.borrow()),
    );
    let explained = ctl.run(&[
        "authz",
        "explain",
        "--from",
        "shop/client",
        "--to",
        "shop/server",
        "--port",
        "80",
        "--method",
        "POST",
        "--path",
        "/items",
    ]);
    let said = String::from_utf8_lossy(&explained.stdout);
    assert_eq!(explained.status.code(), Some(3), "{said}");
    assert!(
        said.contains("waypoint shop/wp") && said.contains("(403)"),
        "{said}"
    );

    let refused = ctl.run(&[
        "waypoint",
        "apply",
        "-n",
        "shop",
        "--name",
        "other",
        "--enroll-namespace",
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("already uses waypoint wp") && err.contains("--overwrite"),
        "{err}"
    );

    let out = ctl.ok(&["waypoint", "delete", "-n", "shop", "wp"]);
    assert!(out.contains("waypoint shop/wp deleted"), "{out}");
    eventually(
        || {
            let (_, got) = shop_request(&ctl, "POST");
            got.contains("hello from shop/server")
        },
        || "the POST straight to the server again".into(),
    );
    let listed = ctl.ok(&["waypoint", "list", "-n", "shop"]);
    assert!(listed.contains("No waypoints found."), "{listed}");
    let missing = ctl.run(&["waypoint", "delete", "-n", "shop", "wp"]);
    assert!(!missing.status.success());
}
