//! HBONE interoperability: an independent client (Python's `ssl` + the `h2` package,
//! `tests/interop/hbone_client.py`, sharing no code with Ambit) holding a certificate
//! from the mesh CA CONNECTs to a pod's 15008 through the real ztunnel. A local target
//! gets `200` and an echo, a non-local one `400`, a service host name (Istio's double
//! HBONE) is resolved to the pod's target port — so the wire format is HBONE, not
//! something only our own client understands.
//!
//! The interpreter comes from `$AMBIT_PYTHON` (default `.venv/bin/python` in the
//! workspace), with `tests/interop/requirements.txt` installed; `scripts/test.sh` sets
//! both up before the Rust tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_localmesh::{Netns, Protocol};
use ambit_net::ca_client::{CaClientConfig, CertificateSource, FetchRequest, GrpcCaClient};
use ambit_net::cert_manager::new_key_and_csr;
use ambit_net::netns::NetnsHandle;
use support::{pod, two_nodes, Harness, DEADLINE};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/python";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/server";
const CA_ID: &str = "spiffe://cluster.local/ns/ambit-system/sa/ambit-control";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Python interpreter with the interop requirements; failing (never skipping) when
/// it is missing.
fn python() -> PathBuf {
    let path = std::env::var_os("AMBIT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python interpreter at {}: run scripts/test.sh, or create the venv \
         (python3 -m venv .venv && .venv/bin/pip install -r tests/interop/requirements.txt) \
         and/or set AMBIT_PYTHON",
        path.display()
    );
    path
}

/// DER of each PEM block in `pem` (a minimal base64 decoder: the tests crate has no
/// PEM parser, and this is the only place that needs one).
fn pem_blocks(pem: &str) -> Vec<Vec<u8>> {
    fn value(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    }
    let mut blocks = Vec::new();
    let mut body: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        if line.starts_with("-----BEGIN") {
            body = Some(String::new());
        } else if line.starts_with("-----END") {
            let text = body.take().expect("END without BEGIN");
            let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
            let mut der = Vec::with_capacity(bytes.len() * 3 / 4);
            for chunk in bytes.chunks(4) {
                let n = chunk
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (i, &c)| acc | value(c) << (18 - 6 * i));
                let out = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
                der.extend_from_slice(&out[..chunk.len() - 1]);
            }
            blocks.push(der);
        } else if let Some(body) = body.as_mut() {
            body.push_str(line);
        }
    }
    blocks
}

/// Client credentials written into the mesh directory.
struct ClientCert {
    chain: PathBuf,
    key: PathBuf,
    root: PathBuf,
}

/// Gets a certificate for [`CLIENT_ID`] from the mesh CA the way a node agent does
/// (node-a's token, impersonation), from inside node-a's namespace where the CA is
/// reachable, and writes chain, key and root as PEM files.
async fn client_cert(h: &Harness, node: &Netns) -> ClientCert {
    let dir = h.mesh.dir().to_path_buf();
    let root_pem = std::fs::read_to_string(dir.join("ca/root-cert.pem")).unwrap();
    let token = std::fs::read_to_string(dir.join("node-a.token")).unwrap();
    let config = CaClientConfig {
        address: format!("{}:15012", h.mesh.fabric_ip()),
        ca_identity: CA_ID.parse().unwrap(),
        roots: pem_blocks(&root_pem)
            .into_iter()
            .map(Into::into)
            .collect::<Vec<_>>()
            .into(),
        token: Some(token.trim().into()),
        impersonate: true,
        timeout: Duration::from_secs(10),
    };
    let identity: SpiffeId = CLIENT_ID.parse().unwrap();
    let (key_pem, csr_pem) = new_key_and_csr(&identity).unwrap();
    let ns = NetnsHandle::from_path(node.path()).unwrap();
    // The namespace's worker thread runs its own small runtime, so every socket the
    // client opens is created in node-a's namespace.
    let chain = ns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = GrpcCaClient::new(config)?;
                client
                    .fetch(FetchRequest {
                        identity,
                        csr_pem,
                        validity: Duration::from_secs(3600),
                        current: None,
                    })
                    .await
            })
            .map_err(std::io::Error::other)
        })
        .await
        .unwrap_or_else(|e| panic!("certificate for {CLIENT_ID}: {e}\n{}", h.logs()));
    assert!(chain.len() >= 2, "chain without a root: {chain:?}");
    let files = ClientCert {
        chain: dir.join("python-chain.pem"),
        key: dir.join("python-key.pem"),
        root: dir.join("python-root.pem"),
    };
    std::fs::write(&files.chain, chain.concat()).unwrap();
    std::fs::write(&files.key, key_pem).unwrap();
    std::fs::write(&files.root, chain.last().unwrap()).unwrap();
    files
}

/// What `hbone_client.py` printed.
#[derive(Debug)]
struct Answer {
    status: u16,
    reason: Option<String>,
    echo: Option<String>,
    raw: String,
}

/// Pulls `"key": value` out of the script's one-line JSON (no JSON crate here).
fn json_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{key}\": "))? + key.len() + 4;
    let rest = &json[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        // The values we read carry no escaped quotes.
        quoted.find('"').map(|end| &quoted[..end])
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim()).filter(|v| *v != "null")
    }
}

/// Runs the Python client in `node`'s namespace: CONNECT `target` through `connect`.
fn python_connect(
    h: &Harness,
    node: &Netns,
    certs: &ClientCert,
    connect: &str,
    target: &str,
    send: &str,
    forwarded_for: Option<&str>,
) -> Answer {
    let script = workspace_root().join("tests/interop/hbone_client.py");
    let mut args: Vec<&str> = vec![
        script.to_str().unwrap(),
        "--connect",
        connect,
        "--target",
        target,
        "--cert",
        certs.chain.to_str().unwrap(),
        "--key",
        certs.key.to_str().unwrap(),
        "--root",
        certs.root.to_str().unwrap(),
        "--expect-identity",
        SERVER_ID,
        "--send",
        send,
    ];
    if let Some(f) = forwarded_for {
        args.extend(["--forwarded-for", f]);
    }
    let out = h
        .mesh
        .run_in(node, python(), &args, DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(
        out.status.success(),
        "hbone_client.py to {target} failed ({}): {}\n{}",
        out.status,
        out.log,
        h.logs()
    );
    // The log mixes stdout and stderr; the answer is the one JSON line.
    let raw = out
        .log
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON from hbone_client.py: {}", out.log))
        .to_string();
    Answer {
        status: json_field(&raw, "status")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {raw}")),
        reason: json_field(&raw, "reason").map(str::to_owned),
        echo: json_field(&raw, "echo").map(str::to_owned),
        raw,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_h2_client_with_a_ca_certificate_speaks_hbone_to_ztunnel() {
    python(); // fail before building a mesh when the interpreter is missing
    let mesh = two_nodes();
    let server = pod(&mesh, "node-b", "shop", "server", "server");
    // The Python client gets its certificate with node-a's agent token, as a pod
    // running as shop/python on node-a would (node authorization).
    let _python = pod(&mesh, "node-a", "shop", "python", "python");
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    let h = Harness::start(mesh);
    let echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&server).await;

    let node_a = h.mesh.node("node-a").unwrap().netns().clone();
    let node_a_ip = h.mesh.node("node-a").unwrap().ip();
    let certs = client_cert(&h, &node_a).await;
    let connect = server.addr(15008).to_string();

    // A local target: 200, then the app's echo through the tunnel.
    let text = "hello from an independent HBONE client";
    let local = server.addr(8080).to_string();
    let ok = python_connect(&h, &node_a, &certs, &connect, &local, text, None);
    assert_eq!(ok.status, 200, "{ok:?}\n{}", h.logs());
    assert_eq!(ok.echo.as_deref(), Some(text), "{ok:?}");
    // The app saw the address the client named in `forwarded` (its own).
    echo.wait_for_log(&format!("accepted from {node_a_ip}:"), DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    let tunnel = h
        .ztunnel("node-b")
        .wait_for_log("direction=\"inbound\"", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(
        tunnel.contains(&format!("src.identity={CLIENT_ID}"))
            && tunnel.contains(&format!("bytes_recv={} ", text.len())),
        "the inbound tunnel should name the Python client's identity and bytes: {tunnel}"
    );

    // A target that is no pod of node-b's: 400, not_local, no echo.
    let elsewhere = "10.250.0.1:80";
    let refused = python_connect(&h, &node_a, &certs, &connect, elsewhere, text, None);
    assert_eq!(refused.status, 400, "{refused:?}\n{}", h.logs());
    assert_eq!(refused.reason.as_deref(), Some("not_local"), "{refused:?}");
    assert_eq!(refused.echo, None, "{refused:?}");
    let why = h
        .ztunnel("node-b")
        .wait_for_log("inbound HBONE CONNECT refused", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(why.contains("not_local"), "{why}");
    println!("200: {}\n400: {}", ok.raw, refused.raw);

    // Istio's double HBONE: the inner CONNECT names the service's host name and port,
    // which node-b's ztunnel resolves to the server pod's target port (issue 19).
    let service = h
        .mesh
        .add_service(
            ambit_localmesh::ServiceSpec::new("shop", "server")
                .port(80, 8080)
                .endpoints([&server]),
        )
        .unwrap();
    h.update_model().await;
    let by_name = python_connect(
        &h,
        &node_a,
        &certs,
        &connect,
        &format!("{}.shop.svc.cluster.local:80", service.name()),
        "by host name",
        None,
    );
    assert_eq!(by_name.status, 200, "{by_name:?}\n{}", h.logs());
    assert_eq!(by_name.echo.as_deref(), Some("by host name"), "{by_name:?}");
    let unknown = python_connect(
        &h,
        &node_a,
        &certs,
        &connect,
        "nothing.shop.svc.cluster.local:80",
        text,
        None,
    );
    assert_eq!(
        (unknown.status, unknown.reason.as_deref()),
        (503, Some("unknown_host")),
        "{unknown:?}"
    );

    // Claiming another identity's address (the server pod's own) in `forwarded` is not
    // honoured: the app sees the connection's real address, and ztunnel says why.
    let spoofed = format!("{}:4444", server.ip());
    let claimed = python_connect(
        &h,
        &node_a,
        &certs,
        &connect,
        &local,
        "spoof",
        Some(&spoofed),
    );
    assert_eq!(claimed.status, 200, "{claimed:?}\n{}", h.logs());
    let warned = h
        .ztunnel("node-b")
        .wait_for_log(
            "forwarded address does not belong to the peer's identity",
            DEADLINE,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", h.logs()));
    assert!(warned.contains(CLIENT_ID), "{warned}");
    assert!(
        !echo
            .log()
            .contains(&format!("accepted from {}:", server.ip())),
        "the app must not see the spoofed address:\n{}",
        echo.log()
    );
}
