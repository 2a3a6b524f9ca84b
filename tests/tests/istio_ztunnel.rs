//! Mixed meshes (issue 19): Istio's own ztunnel (the anchor binary, README in
//! `../shared/anchors/`) takes its certificate and its configuration from
//! `ambit-control`: `CA_ADDRESS` and `XDS_ADDRESS` point at the control plane, which
//! serves Istio's `istio.workload.Address` and `istio.security.Authorization` beside
//! Ambit's own types (decision record 0017). Its admin endpoint's `/config_dump` must
//! show the mesh's workloads, services and policies as Ambit's model has them; an
//! Ambit pod and the pod Istio's ztunnel serves then talk over HBONE both ways, each
//! side seeing the other's identity, nothing in plaintext on the fabric, both sides'
//! metrics counting it, and a DENY policy holds at Istio's ztunnel.
//!
//! The binary is `$AMBIT_ISTIO_ZTUNNEL`, else `/work/shared/anchors/istio-ztunnel`,
//! else `../shared/anchors/istio-ztunnel` from the workspace; without it the test says
//! it was skipped, and why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_localmesh::{Netns, Protocol, ServiceSpec};
use support::{apply, pod, two_nodes, Harness};

/// Where the anchor binary is, if it is on this machine.
/// How long each step may take (Istio's ztunnel fetches certificates and config lazily).
const WAIT: Duration = Duration::from_secs(30);

fn istio_ztunnel() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let candidates = [
        std::env::var_os("AMBIT_ISTIO_ZTUNNEL").map(PathBuf::from),
        Some(PathBuf::from("/work/shared/anchors/istio-ztunnel")),
        Some(workspace.join("../shared/anchors/istio-ztunnel")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// GET `path` from `127.0.0.1:port` inside `netns`: the body, or why not.
async fn get_in(netns: &Netns, port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let ns = ambit_net::netns::NetnsHandle::from_path(netns.path())?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    let response = ns
        .run(move || {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        })
        .await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("answered {head}")));
    }
    // A chunked body is read as JSON below; drop the chunk sizes.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return Ok(out);
    }
    Ok(body.to_owned())
}

/// The strings at `field` of each object in the dump's list `list`.
fn names(dump: &serde_json::Value, list: &str, field: &str) -> Vec<String> {
    dump[list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v[field].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_istio_ztunnel_takes_its_certificate_and_config_from_ambit_control() {
    let Some(binary) = istio_ztunnel() else {
        println!(
            "SKIPPED: Istio's ztunnel binary was not found ($AMBIT_ISTIO_ZTUNNEL, \
             /work/shared/anchors/istio-ztunnel, ../shared/anchors/istio-ztunnel): \
             this machine has no anchor binary, so the mixed-mesh test cannot run"
        );
        return;
    };
    let mesh = two_nodes();
    let client = pod(&mesh, "node-a", "shop", "client", "client");
    // Served by Istio's ztunnel, in dedicated mode inside its own namespace; Ambit's
    // ztunnel never takes it.
    let web = pod(&mesh, "node-b", "shop", "web", "web");
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    // Advertised as HBONE: Istio's ztunnel listens on its 15008.
    mesh.set_protocol(&web, Protocol::Hbone).unwrap();
    mesh.add_service(
        ServiceSpec::new("shop", "web")
            .port(80, 8080)
            .endpoints([&web]),
    )
    .unwrap();
    let h = Harness::start(mesh);
    h.enrol(&client).await;
    apply(
        &h,
        "deny-legacy.yaml",
        Some(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: deny-legacy, namespace: shop}\n\
             spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [legacy]\n",
        ),
    );
    // Enforced by whichever ztunnel serves the destination: here, Istio's for web.
    apply(
        &h,
        "deny-9000.yaml",
        Some(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: deny-9000, namespace: shop}\n\
             spec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"9000\"]\n",
        ),
    );
    h.update_model().await;

    // A dedicated-mode proxy serves one workload but needs the whole model, as a
    // node's ztunnel does: its token is a node agent's, with the workload's identity
    // (so the certificate it asks for, its own, is granted without impersonation).
    let dir = h.mesh.dir().to_path_buf();
    let token = "istio-ztunnel-web-token-0123456789abcdef";
    let token_file = dir.join("istio-web.token");
    std::fs::write(&token_file, token).unwrap();
    let tokens = dir.join("tokens.yaml");
    let mut text = std::fs::read_to_string(&tokens).unwrap();
    text.push_str(&format!(
        "- token: \"{token}\"\n  identity: spiffe://cluster.local/ns/shop/sa/web\n  nodeAgent: true\n  node: node-b\n"
    ));
    std::fs::write(&tokens, text).unwrap();

    let control = ambit_localmesh::ambient::control_address(&h.mesh);
    let root = dir.join("ca/root-cert.pem");
    let address = format!("https://{control}");
    let env: Vec<String> = [
        ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        ("RUST_LOG", "info"),
        ("PROXY_MODE", "dedicated"),
        ("PROXY_WORKLOAD_INFO", "shop/web/web"),
        ("NODE_NAME", "node-b"),
        ("CA_ADDRESS", &address),
        ("CA_ROOT_CA", root.to_str().unwrap()),
        ("XDS_ADDRESS", &address),
        ("XDS_ROOT_CA", root.to_str().unwrap()),
        ("AUTH_TOKEN", token_file.to_str().unwrap()),
        ("ENABLE_ORIG_SRC", "false"),
        ("ZTUNNEL_WORKER_THREADS", "1"),
        // Its own connections carry this mark, so the capture rule below skips them.
        ("PACKET_MARK", "1337"),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect();
    let mut args: Vec<String> = vec!["-i".into()];
    args.extend(env);
    args.push(binary.to_string_lossy().into_owned());
    args.push("proxy".into());
    let istio = h
        .mesh
        .spawn_in(web.netns(), "env", &args, &[])
        .unwrap_or_else(|e| panic!("starting Istio's ztunnel: {e}"));

    // Its view of the mesh, once xDS delivered it.
    let dump = support::eventually(
        WAIT,
        || async {
            let body = get_in(web.netns(), 15000, "/config_dump").await.ok()?;
            let dump = serde_json::from_str::<serde_json::Value>(&body).ok()?;
            let workloads = names(&dump, "workloads", "uid");
            let policies = names(&dump, "policies", "name");
            (workloads.iter().any(|w| w.contains("client"))
                && workloads.iter().any(|w| w.contains("web"))
                && policies.iter().any(|p| p == "deny-legacy"))
            .then_some(dump)
        },
        || {
            format!(
                "Istio's ztunnel to show the mesh in /config_dump\nIstio's ztunnel:\n{}\n{}",
                istio.log(),
                h.logs()
            )
        },
    )
    .await;
    let workloads = dump["workloads"].as_array().unwrap();
    let client_dump = workloads
        .iter()
        .find(|w| w["uid"].as_str().is_some_and(|u| u.contains("client")))
        .unwrap();
    assert_eq!(
        client_dump["protocol"].as_str(),
        Some("HBONE"),
        "{client_dump}"
    );
    assert_eq!(client_dump["serviceAccount"].as_str(), Some("client"));
    assert_eq!(client_dump["node"].as_str(), Some("node-a"));
    let hostnames = names(&dump, "services", "hostname");
    assert!(
        hostnames.contains(&"web.shop.svc.cluster.local".to_owned()),
        "{hostnames:?}\n{dump}"
    );
    let policy = dump["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "deny-legacy")
        .unwrap();
    assert_eq!(policy["action"].as_str(), Some("Deny"), "{policy}");
    // Ambit → Istio: the client's Ambit ztunnel sends HBONE to web's 15008, where
    // Istio's ztunnel terminates it with a certificate from Ambit's CA.
    let _echo = h.serve(&web, &["echo", "--port", "8080"]);
    let to = SocketAddr::new(web.ip().into(), 8080);
    support::eventually(
        WAIT,
        || async { support::connects(&h, &client, to).then_some(()) },
        || {
            format!(
                "client → web over HBONE through Istio's ztunnel\nIstio's ztunnel:\n{}\n{}",
                istio.log(),
                h.logs()
            )
        },
    )
    .await;
    let tunnel = h
        .ztunnel("node-a")
        .wait_for_log("direction=\"outbound\"", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(
        tunnel.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "the client's ztunnel should have verified web's identity: {tunnel}"
    );
    // A DENY policy from Ambit's model is enforced by Istio's ztunnel: web's port
    // 9000 is refused to the client.
    let _echo_9000 = h.serve(&web, &["echo", "--port", "9000"]);
    let denied = SocketAddr::new(web.ip().into(), 9000);
    istio
        .wait_for_log("listener established", Duration::from_secs(10))
        .unwrap();
    assert!(
        !support::connects(&h, &client, denied),
        "deny-9000 should hold at Istio's ztunnel\n{}",
        istio.log()
    );
    let refused = istio
        .wait_for_log(
            "explicitly denied by: shop/deny-9000",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("Istio's ztunnel should name the policy: {e}"));
    println!("Istio's ztunnel: {refused}");

    // Istio → Ambit: web's outbound is captured by Istio's ztunnel (REDIRECT to 15001,
    // its own marked traffic exempt), which tunnels it over HBONE to the client pod's
    // 15008, where Ambit's ztunnel sees web's identity.
    let capture = h
        .mesh
        .run_in(
            web.netns(),
            "iptables",
            [
                "-w",
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
                "0x539/0xfff",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(capture.status.success(), "iptables: {}", capture.log);
    let _client_echo = h.serve(&client, &["echo", "--port", "8080"]);
    let back = SocketAddr::new(client.ip().into(), 8080);
    support::eventually(
        WAIT,
        || async { support::connects(&h, &web, back).then_some(()) },
        || {
            format!(
                "web → client through Istio's ztunnel and Ambit's\nIstio's ztunnel:\n{}\n{}",
                istio.log(),
                h.logs()
            )
        },
    )
    .await;
    let inbound = h
        .ztunnel("node-a")
        .wait_for_log("direction=\"inbound\"", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(
        inbound.contains("src.identity=spiffe://cluster.local/ns/shop/sa/web"),
        "Ambit's ztunnel should see web's identity from Istio's ztunnel: {inbound}"
    );

    // Nothing crosses the fabric in plaintext, in either direction: a marker in the
    // request path is never seen there, HBONE to both pods' 15008 is.
    let _web_http = h.serve(&web, &["http", "--port", "8081", "--name", "web"]);
    let _client_http = h.serve(&client, &["http", "--port", "8081", "--name", "client"]);
    let wire = support::capture(&h);
    let secret = "mixed-mesh-secret-marker";
    for (from, to) in [(&client, &web), (&web, &client)] {
        let to = SocketAddr::new(to.ip().into(), 8081).to_string();
        let path = format!("/{secret}");
        support::eventually(
            WAIT,
            || async {
                let out = h.run_app(
                    from,
                    &["get", "--to", &to, "--path", &path, "--count", "1"],
                    Duration::from_secs(10),
                );
                (out.status.success() && out.log.contains("200 pod=")).then_some(())
            },
            || {
                format!(
                    "GET {to} from {} to succeed\nIstio's ztunnel:\n{}\n{}",
                    from.uid(),
                    istio.log(),
                    h.logs()
                )
            },
        )
        .await;
    }
    for pod in [&web, &client] {
        wire.wait_for_log(&format!("{}.15008", pod.ip()), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no HBONE to {} captured: {e}", pod.uid()));
    }
    wire.stop().unwrap();
    let captured = wire.log();
    assert!(
        !captured.contains(secret),
        "the marker crossed the fabric in plaintext:\n{captured}"
    );

    // Both sides count the traffic with Istio's metric names, each naming the peer
    // it verified.
    let istio_metrics = get_in(web.netns(), 15020, "/metrics").await.unwrap();
    let from_client = support::metric(
        &istio_metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
        ],
    );
    assert!(
        from_client >= 1.0,
        "Istio's ztunnel counted nothing from the client:\n{istio_metrics}"
    );
    let ambit_metrics = h.metrics("node-a").await;
    let from_web = support::metric(
        &ambit_metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", "spiffe://cluster.local/ns/shop/sa/web"),
        ],
    );
    assert!(
        from_web >= 1.0,
        "Ambit's ztunnel counted nothing from web:\n{ambit_metrics}"
    );

    // The certificate Istio's ztunnel presented came from Ambit's CA, for web.
    support::eventually(
        WAIT,
        || async {
            let dump = get_in(web.netns(), 15000, "/config_dump").await.ok()?;
            let dump = serde_json::from_str::<serde_json::Value>(&dump).ok()?;
            let certs = dump["certificates"].to_string();
            (certs.contains("spiffe://cluster.local/ns/shop/sa/web") && certs.contains("Available"))
                .then_some(())
        },
        || {
            format!(
                "Istio's ztunnel to hold a certificate for shop/web from Ambit's CA\n{}\n{}",
                istio.log(),
                h.logs()
            )
        },
    )
    .await;
    println!(
        "Istio's ztunnel took {} workloads, {} services and {} policies from ambit-control",
        workloads.len(),
        hostnames.len(),
        dump["policies"].as_array().map_or(0, Vec::len)
    );
}
